//! Rows of logins and of the sealed credentials they produced. A login's
//! state is written only by [`Store::write_login`], a compare-and-set that
//! takes a [`LoginWrite`], which only the login machine's `advance` makes;
//! everything else here reads, or writes columns that are not the state.

use super::{now_ms, q, Store, StoreError, UserRow};
use crate::app::logins::advance::LoginWrite;
use crate::app::logins::state::LoginState;
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRow {
    pub id: String,
    pub owner_id: String,
    pub provider: String,
    pub state: LoginState,
    pub reason: Option<String>,
    pub login_url: Option<String>,
    pub awaiting_code: bool,
    pub browser_sandbox_id: Option<String>,
    pub workspace_sandbox_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
    pub finished_at: Option<i64>,
}

/// A sealed credential record; `sealed` opens only with the vault.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub owner_id: String,
    pub provider: String,
    pub login_id: String,
    pub sealed: String,
    pub key_id: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_at: Option<i64>,
}

impl std::fmt::Debug for CredentialRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRow")
            .field("owner_id", &self.owner_id)
            .field("provider", &self.provider)
            .field("login_id", &self.login_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

const LOGIN_COLUMNS: &str = "id, owner_id, provider, state, reason, login_url, awaiting_code, \
    browser_sandbox_id, workspace_sandbox_id, created_at, updated_at, expires_at, finished_at";

const CRED_COLUMNS: &str =
    "owner_id, provider, login_id, sealed, key_id, created_at, updated_at, delivered_at";

fn login_from_row(row: &AnyRow) -> Result<LoginRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let state: String = row.try_get("state").map_err(get)?;
    let awaiting: i64 = row.try_get("awaiting_code").map_err(get)?;
    Ok(LoginRow {
        id: row.try_get("id").map_err(get)?,
        owner_id: row.try_get("owner_id").map_err(get)?,
        provider: row.try_get("provider").map_err(get)?,
        state: LoginState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown login state {state:?}")))?,
        reason: row.try_get("reason").map_err(get)?,
        login_url: row.try_get("login_url").map_err(get)?,
        awaiting_code: awaiting != 0,
        browser_sandbox_id: row.try_get("browser_sandbox_id").map_err(get)?,
        workspace_sandbox_id: row.try_get("workspace_sandbox_id").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
        updated_at: row.try_get("updated_at").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
        finished_at: row.try_get("finished_at").map_err(get)?,
    })
}

fn cred_from_row(row: &AnyRow) -> Result<CredentialRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(CredentialRow {
        owner_id: row.try_get("owner_id").map_err(get)?,
        provider: row.try_get("provider").map_err(get)?,
        login_id: row.try_get("login_id").map_err(get)?,
        sealed: row.try_get("sealed").map_err(get)?,
        key_id: row.try_get("key_id").map_err(get)?,
        created_at: row.try_get("created_at").map_err(get)?,
        updated_at: row.try_get("updated_at").map_err(get)?,
        delivered_at: row.try_get("delivered_at").map_err(get)?,
    })
}

impl Store {
    pub async fn user_by_id(&self, id: &str) -> Result<Option<UserRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM users WHERE id = $1",
            super::users::USER_COLUMNS
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("find user by id"))?;
        row.map(|r| super::users::user_from_row(&r)).transpose()
    }

    pub async fn insert_login(&self, row: &LoginRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO logins ({LOGIN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.owner_id)
            .bind(&row.provider)
            .bind(row.state.as_str())
            .bind(&row.reason)
            .bind(&row.login_url)
            .bind(i64::from(row.awaiting_code))
            .bind(&row.browser_sandbox_id)
            .bind(&row.workspace_sandbox_id)
            .bind(row.created_at)
            .bind(row.updated_at)
            .bind(row.expires_at)
            .bind(row.finished_at)
            .execute(&self.pool)
            .await
            .map_err(q("insert login"))?;
        Ok(())
    }

    pub async fn login(&self, id: &str) -> Result<Option<LoginRow>, StoreError> {
        let sql = format!("SELECT {LOGIN_COLUMNS} FROM logins WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get login"))?;
        row.map(|r| login_from_row(&r)).transpose()
    }

    pub async fn logins_of(&self, owner_id: &str) -> Result<Vec<LoginRow>, StoreError> {
        let sql = format!(
            "SELECT {LOGIN_COLUMNS} FROM logins WHERE owner_id = $1 ORDER BY created_at DESC LIMIT 50"
        );
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list logins"))?;
        rows.iter().map(login_from_row).collect()
    }

    /// Logins in one of `states`.
    pub async fn logins_in(&self, states: &[LoginState]) -> Result<Vec<LoginRow>, StoreError> {
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("SELECT {LOGIN_COLUMNS} FROM logins WHERE state IN ({list})");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list logins by state"))?;
        rows.iter().map(login_from_row).collect()
    }

    /// The compare-and-set under [`crate::app::logins::advance`]: move the
    /// login from `w.from` to `w.to` with the columns the machine chose, and
    /// (in the same transaction) write or mark its credential record. False
    /// when the login was not in `w.from` (another writer moved it first).
    pub(crate) async fn write_login(&self, w: &LoginWrite) -> Result<bool, StoreError> {
        let now = now_ms();
        let finished = w.to.is_final().then_some(now);
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        let res = sqlx::query(
            "UPDATE logins SET state = $1, updated_at = $2, \
               reason = COALESCE($3, reason), login_url = COALESCE($4, login_url), \
               workspace_sandbox_id = COALESCE($5, workspace_sandbox_id), \
               finished_at = COALESCE($6, finished_at), awaiting_code = 0 \
             WHERE id = $7 AND state = $8",
        )
        .bind(w.to.as_str())
        .bind(now)
        .bind(&w.reason)
        .bind(&w.login_url)
        .bind(&w.workspace_sandbox_id)
        .bind(finished)
        .bind(&w.id)
        .bind(w.from.as_str())
        .execute(&mut *tx)
        .await
        .map_err(q("update login"))?;
        if res.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(cred) = &w.credential {
            sqlx::query("DELETE FROM credentials WHERE owner_id = $1 AND provider = $2")
                .bind(&cred.owner_id)
                .bind(&cred.provider)
                .execute(&mut *tx)
                .await
                .map_err(q("replace credentials"))?;
            insert_credential(&mut tx, cred).await?;
        }
        if let Some((owner, provider)) = &w.delivered {
            sqlx::query(
                "UPDATE credentials SET delivered_at = $1 \
                 WHERE owner_id = $2 AND provider = $3 AND login_id = $4",
            )
            .bind(now)
            .bind(owner)
            .bind(provider)
            .bind(&w.id)
            .execute(&mut *tx)
            .await
            .map_err(q("mark credentials delivered"))?;
        }
        tx.commit().await.map_err(q("commit login"))?;
        Ok(true)
    }

    pub async fn set_login_fields(
        &self,
        id: &str,
        browser_sandbox_id: Option<&str>,
        awaiting_code: Option<bool>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE logins SET browser_sandbox_id = COALESCE($1, browser_sandbox_id), \
               awaiting_code = COALESCE($2, awaiting_code), updated_at = $3 WHERE id = $4",
        )
        .bind(browser_sandbox_id)
        .bind(awaiting_code.map(i64::from))
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("update login fields"))?;
        Ok(())
    }

    /// Put a credential record in place of the user's one for its provider,
    /// without touching any login (tests, imports): a login stores its own
    /// record through `advance`.
    pub async fn replace_credential(&self, cred: &CredentialRow) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        sqlx::query("DELETE FROM credentials WHERE owner_id = $1 AND provider = $2")
            .bind(&cred.owner_id)
            .bind(&cred.provider)
            .execute(&mut *tx)
            .await
            .map_err(q("replace credentials"))?;
        insert_credential(&mut tx, cred).await?;
        tx.commit().await.map_err(q("commit credentials"))?;
        Ok(())
    }

    pub async fn credential(
        &self,
        owner_id: &str,
        provider: &str,
    ) -> Result<Option<CredentialRow>, StoreError> {
        let sql =
            format!("SELECT {CRED_COLUMNS} FROM credentials WHERE owner_id = $1 AND provider = $2");
        let row = sqlx::query(&sql)
            .bind(owner_id)
            .bind(provider)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get credentials"))?;
        row.map(|r| cred_from_row(&r)).transpose()
    }

    pub async fn credentials_of(&self, owner_id: &str) -> Result<Vec<CredentialRow>, StoreError> {
        let sql =
            format!("SELECT {CRED_COLUMNS} FROM credentials WHERE owner_id = $1 ORDER BY provider");
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list credentials"))?;
        rows.iter().map(cred_from_row).collect()
    }

    pub async fn all_credentials(&self) -> Result<Vec<CredentialRow>, StoreError> {
        let sql = format!("SELECT {CRED_COLUMNS} FROM credentials");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list all credentials"))?;
        rows.iter().map(cred_from_row).collect()
    }

    /// Replace a record's ciphertext if it is still the one read (rotation).
    pub async fn reseal_credential(
        &self,
        owner_id: &str,
        provider: &str,
        old_sealed: &str,
        new_sealed: &str,
        key_id: &str,
    ) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE credentials SET sealed = $1, key_id = $2 \
             WHERE owner_id = $3 AND provider = $4 AND sealed = $5",
        )
        .bind(new_sealed)
        .bind(key_id)
        .bind(owner_id)
        .bind(provider)
        .bind(old_sealed)
        .execute(&self.pool)
        .await
        .map_err(q("reseal credentials"))?;
        Ok(res.rows_affected() == 1)
    }
}

async fn insert_credential(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    cred: &CredentialRow,
) -> Result<(), StoreError> {
    let sql =
        format!("INSERT INTO credentials ({CRED_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
    sqlx::query(&sql)
        .bind(&cred.owner_id)
        .bind(&cred.provider)
        .bind(&cred.login_id)
        .bind(&cred.sealed)
        .bind(&cred.key_id)
        .bind(cred.created_at)
        .bind(cred.updated_at)
        .bind(cred.delivered_at)
        .execute(&mut **tx)
        .await
        .map_err(q("insert credentials"))?;
    Ok(())
}
