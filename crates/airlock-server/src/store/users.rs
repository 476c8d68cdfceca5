//! Users, their token digests, their admin flag, and their removal: a user
//! being removed is disabled at once, and its row goes (with its logins,
//! credentials and egress rows) once none of its sandboxes holds host resources.

use super::{now_ms, q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    /// May do admin actions over HTTP (the egress account, others' upstreams).
    pub admin: bool,
    /// Its token gets 401 (disabled, or being removed).
    pub disabled: bool,
    /// `airlock user remove` started; the row goes once its sandboxes ended.
    pub removing: bool,
}

pub(super) const USER_COLUMNS: &str = "id, name, created_at, admin, disabled_at, removing_at";

/// A sandbox that still holds host resources (or may soon).
const HOLDS_RESOURCES: &str = "(state NOT IN ('stopped', 'failed') OR lease_index IS NOT NULL)";

impl Store {
    // ---- users ----

    pub async fn insert_user(
        &self,
        id: &str,
        name: &str,
        token_hash: Option<&str>,
    ) -> Result<UserRow, StoreError> {
        self.insert_user_with(id, name, token_hash, false).await
    }

    pub async fn insert_user_with(
        &self,
        id: &str,
        name: &str,
        token_hash: Option<&str>,
        admin: bool,
    ) -> Result<UserRow, StoreError> {
        let created_at = now_ms();
        sqlx::query(
            "INSERT INTO users (id, name, token_hash, created_at, admin) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(token_hash)
        .bind(created_at)
        .bind(i64::from(admin))
        .execute(&self.pool)
        .await
        .map_err(q("insert user"))?;
        Ok(UserRow {
            id: id.to_owned(),
            name: name.to_owned(),
            created_at,
            admin,
            disabled: false,
            removing: false,
        })
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("find user by name"))?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    /// The enabled user holding this token digest. Looked up on every request,
    /// so a rotated or disabled token stops working at once.
    pub async fn user_by_token_hash(&self, hash: &str) -> Result<Option<UserRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE token_hash = $1 AND disabled_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("find user by token"))?;
        row.map(|r| user_from_row(&r)).transpose()
    }

    pub async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id <> '{}' ORDER BY name",
            crate::app::pool::OWNER
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(q("list users"))?;
        rows.iter().map(user_from_row).collect()
    }

    /// Replace a user's token digest; false when there is no such user or it
    /// is being removed.
    pub async fn set_token_hash(&self, user_id: &str, hash: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE users SET token_hash = $1 WHERE id = $2 AND removing_at IS NULL")
                .bind(hash)
                .bind(user_id)
                .execute(&self.pool)
                .await
                .map_err(q("set a token"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Disable (`true`) or enable a user; false when there is no such user or
    /// it is being removed.
    pub async fn set_user_disabled(
        &self,
        user_id: &str,
        disabled: bool,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE users SET disabled_at = $1 WHERE id = $2 AND removing_at IS NULL")
                .bind(disabled.then(now_ms))
                .bind(user_id)
                .execute(&self.pool)
                .await
                .map_err(q("disable a user"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Start removing a user, in one transaction: its token stops working,
    /// and its credentials and egress rows are deleted. Its sandboxes and
    /// logins are not touched here: a running control plane's reaper (or the
    /// next start) stops each sandbox through the sandbox machine, and the
    /// caller ends each live login through the login machine
    /// (`app::logins::end_logins_of`). Repeating it is harmless.
    /// Returns how many of its sandboxes still hold host resources.
    pub async fn begin_user_removal(&self, user_id: &str) -> Result<u64, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        sqlx::query(
            "UPDATE users SET token_hash = NULL, disabled_at = COALESCE(disabled_at, $1), \
             removing_at = COALESCE(removing_at, $1) WHERE id = $2",
        )
        .bind(now)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(q("mark a user removed"))?;
        for stmt in [
            "DELETE FROM credentials WHERE owner_id = $1",
            "DELETE FROM credential_health WHERE owner_id = $1",
            "DELETE FROM credential_revocations WHERE owner_id = $1",
            "DELETE FROM credential_events WHERE owner_id = $1",
            "DELETE FROM egress_user_upstreams WHERE user_id = $1",
            "DELETE FROM egress_user_ports WHERE user_id = $1",
        ] {
            sqlx::query(stmt)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(q("delete a user's secrets"))?;
        }
        let live = count_holding(&mut tx, user_id).await?;
        tx.commit().await.map_err(q("commit"))?;
        Ok(live)
    }

    /// Delete a user being removed, with every row that names it, once none
    /// of its sandboxes holds host resources. False while some still do.
    pub async fn finish_user_removal(&self, user_id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        if count_holding(&mut tx, user_id).await? > 0 {
            return Ok(false);
        }
        for stmt in [
            "DELETE FROM credentials WHERE owner_id = $1",
            "DELETE FROM credential_health WHERE owner_id = $1",
            "DELETE FROM credential_revocations WHERE owner_id = $1",
            "DELETE FROM credential_events WHERE owner_id = $1",
            "DELETE FROM egress_user_upstreams WHERE user_id = $1",
            "DELETE FROM egress_user_ports WHERE user_id = $1",
            "DELETE FROM credential_placements WHERE owner_id = $1",
            "DELETE FROM credential_generations WHERE owner_id = $1",
            "DELETE FROM workspace_names WHERE owner_id = $1",
            "DELETE FROM login_targets WHERE login_id IN (SELECT id FROM logins WHERE owner_id = $1)",
            "DELETE FROM logins WHERE owner_id = $1",
            "DELETE FROM sandboxes WHERE owner_id = $1",
            "DELETE FROM users WHERE id = $1",
        ] {
            sqlx::query(stmt)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(q("remove a user"))?;
        }
        tx.commit().await.map_err(q("commit"))?;
        Ok(true)
    }

    /// Users whose removal started and has not finished.
    pub async fn users_being_removed(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE removing_at IS NOT NULL"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(q("list users being removed"))?;
        rows.iter().map(user_from_row).collect()
    }

    /// Ids of a user's sandboxes that still hold (or may hold) host
    /// resources: the ones a removal must stop.
    pub async fn live_sandboxes_of(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT id FROM sandboxes WHERE owner_id = $1 AND {HOLDS_RESOURCES}"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list a user's live sandboxes"))?;
        rows.iter()
            .map(|r| {
                r.try_get("id")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }
}

async fn count_holding(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    user_id: &str,
) -> Result<u64, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT COUNT(*) AS n FROM sandboxes WHERE owner_id = $1 AND {HOLDS_RESOURCES}"
    ))
    .bind(user_id)
    .fetch_one(&mut **tx)
    .await
    .map_err(q("count a user's live sandboxes"))?;
    let n: i64 = row
        .try_get("n")
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(super) fn user_from_row(row: &AnyRow) -> Result<UserRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let admin: i64 = row.try_get("admin").map_err(get)?;
    let disabled_at: Option<i64> = row.try_get("disabled_at").map_err(get)?;
    let removing_at: Option<i64> = row.try_get("removing_at").map_err(get)?;
    Ok(UserRow {
        id: row.try_get("id").map_err(get)?,
        name: row.try_get("name").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
        admin: admin != 0,
        disabled: disabled_at.is_some(),
        removing: removing_at.is_some(),
    })
}
