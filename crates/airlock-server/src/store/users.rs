//! Users and their token digests.

use super::{now_ms, q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

impl Store {
    // ---- users ----

    pub async fn insert_user(
        &self,
        id: &str,
        name: &str,
        token_hash: Option<&str>,
    ) -> Result<UserRow, StoreError> {
        let created_at = now_ms();
        sqlx::query("INSERT INTO users (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(name)
            .bind(token_hash)
            .bind(created_at)
            .execute(&self.pool)
            .await
            .map_err(q("insert user"))?;
        Ok(UserRow {
            id: id.to_owned(),
            name: name.to_owned(),
            created_at,
        })
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query("SELECT id, name, created_at FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("find user by name"))?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    pub async fn user_by_token_hash(&self, hash: &str) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query("SELECT id, name, created_at FROM users WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("find user by token"))?;
        row.map(|r| user_from_row(&r)).transpose()
    }
}

fn user_from_row(row: &AnyRow) -> Result<UserRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(UserRow {
        id: row.try_get("id").map_err(get)?,
        name: row.try_get("name").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
    })
}
