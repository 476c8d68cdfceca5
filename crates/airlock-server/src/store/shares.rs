//! View shares (see `app::shares`): a row per live share, the secret's
//! digest only. Revoking deletes the row; expired rows are dropped whenever
//! a share is created.

use super::{q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRow {
    pub id: String,
    pub sandbox_id: String,
    pub owner_id: String,
    pub input: bool,
    pub created_at: i64,
    pub expires_at: i64,
}

const COLUMNS: &str = "id, sandbox_id, owner_id, input, created_at, expires_at";

fn from_row(row: &AnyRow) -> Result<ShareRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(ShareRow {
        id: row.try_get("id").map_err(get)?,
        sandbox_id: row.try_get("sandbox_id").map_err(get)?,
        owner_id: row.try_get("owner_id").map_err(get)?,
        input: row.try_get::<i64, _>("input").map_err(get)? != 0,
        created_at: row.try_get("created_at").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
    })
}

impl Store {
    /// Keep a new share, unless its sandbox already has `per_sandbox` live
    /// ones (then `false`); expired shares go first.
    pub async fn insert_share(
        &self,
        row: &ShareRow,
        digest: &str,
        per_sandbox: u32,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin share"))?;
        sqlx::query("DELETE FROM view_shares WHERE expires_at <= $1")
            .bind(row.created_at)
            .execute(&mut *tx)
            .await
            .map_err(q("drop expired shares"))?;
        let live: i64 = sqlx::query("SELECT COUNT(*) AS n FROM view_shares WHERE sandbox_id = $1")
            .bind(&row.sandbox_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(q("count shares"))?
            .try_get("n")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if live >= i64::from(per_sandbox) {
            return Ok(false);
        }
        let sql = format!(
            "INSERT INTO view_shares ({COLUMNS}, digest) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        );
        sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.sandbox_id)
            .bind(&row.owner_id)
            .bind(i64::from(row.input))
            .bind(row.created_at)
            .bind(row.expires_at)
            .bind(digest)
            .execute(&mut *tx)
            .await
            .map_err(q("insert share"))?;
        tx.commit().await.map_err(q("commit share"))?;
        Ok(true)
    }

    /// The share a secret's digest stands for (expired or not).
    pub async fn share_by_digest(&self, digest: &str) -> Result<Option<ShareRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM view_shares WHERE digest = $1");
        sqlx::query(&sql)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("share by digest"))?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    pub async fn share(&self, id: &str) -> Result<Option<ShareRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM view_shares WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("share"))?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    /// A sandbox's shares that have not expired by `now`, oldest first.
    pub async fn shares_of(&self, sandbox_id: &str, now: i64) -> Result<Vec<ShareRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM view_shares WHERE sandbox_id = $1 AND expires_at > $2 \
             ORDER BY created_at, id"
        );
        sqlx::query(&sql)
            .bind(sandbox_id)
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(q("shares of a sandbox"))?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Switch a share between read-only and input; whether it was there.
    pub async fn set_share_input(&self, id: &str, input: bool) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE view_shares SET input = $1 WHERE id = $2")
            .bind(i64::from(input))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("set share input"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Revoke a share; whether it was there.
    pub async fn delete_share(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM view_shares WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("delete share"))?;
        Ok(done.rows_affected() > 0)
    }
}
