//! Persistence: users and sandboxes in SQLite (default, embedded) or PostgreSQL,
//! through one code path (sqlx's `Any` driver and portable SQL). The store knows
//! nothing of HTTP; it never decides lifecycle rules, it only records them, with
//! compare-and-set updates so two writers cannot both win.

use crate::app::state::SandboxState;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::collections::BTreeSet;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("could not open the database {url}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not migrate the database schema")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| {
        if let sqlx::Error::Database(db) = &source {
            if db.is_unique_violation() {
                return StoreError::Conflict(what.trim_start_matches("insert ").to_owned());
            }
        }
        StoreError::Query { what, source }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Clone, PartialEq, Eq)]
pub struct SandboxRow {
    pub id: String,
    pub owner_id: String,
    pub kind: String,
    pub state: SandboxState,
    pub failure_reason: Option<String>,
    pub image_build_id: String,
    pub lease_index: Option<u32>,
    pub agent_token: String,
    pub vnc_password: String,
    pub display_width: u32,
    pub display_height: u32,
    pub created_at: i64,
    pub updated_at: i64,
    pub ready_at: Option<i64>,
    pub last_heartbeat_at: Option<i64>,
    pub last_activity_at: i64,
}

impl std::fmt::Debug for SandboxRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxRow")
            .field("id", &self.id)
            .field("owner_id", &self.owner_id)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .field("failure_reason", &self.failure_reason)
            .field("lease_index", &self.lease_index)
            .finish_non_exhaustive()
    }
}

const SANDBOX_COLUMNS: &str = "id, owner_id, kind, state, failure_reason, image_build_id, lease_index, agent_token, \
     vnc_password, display_width, display_height, created_at, updated_at, ready_at, last_heartbeat_at, last_activity_at";

fn sandbox_from_row(row: &AnyRow) -> Result<SandboxRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let state: String = row.try_get("state").map_err(get)?;
    let lease: Option<i64> = row.try_get("lease_index").map_err(get)?;
    let width: i64 = row.try_get("display_width").map_err(get)?;
    let height: i64 = row.try_get("display_height").map_err(get)?;
    Ok(SandboxRow {
        id: row.try_get("id").map_err(get)?,
        owner_id: row.try_get("owner_id").map_err(get)?,
        kind: row.try_get("kind").map_err(get)?,
        state: SandboxState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown state {state:?}")))?,
        failure_reason: row.try_get("failure_reason").map_err(get)?,
        image_build_id: row.try_get("image_build_id").map_err(get)?,
        lease_index: lease.map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
        agent_token: row.try_get("agent_token").map_err(get)?,
        vnc_password: row.try_get("vnc_password").map_err(get)?,
        display_width: u32::try_from(width).unwrap_or(0),
        display_height: u32::try_from(height).unwrap_or(0),
        created_at: row.try_get("created_at").map_err(get)?,
        updated_at: row.try_get("updated_at").map_err(get)?,
        ready_at: row.try_get("ready_at").map_err(get)?,
        last_heartbeat_at: row.try_get("last_heartbeat_at").map_err(get)?,
        last_activity_at: row.try_get("last_activity_at").map_err(get)?,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Open (creating a SQLite file if needed) and migrate.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let connect_url = if is_sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_owned()
        };
        let mut options = AnyPoolOptions::new().max_connections(if is_sqlite { 1 } else { 8 });
        if is_sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let redacted = redact_url(url);
        let pool = options
            .connect(&connect_url)
            .await
            .map_err(|source| StoreError::Open {
                url: redacted,
                source,
            })?;
        MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Store { pool })
    }

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

    // ---- sandboxes ----

    pub async fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        );
        sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.owner_id)
            .bind(&row.kind)
            .bind(row.state.as_str())
            .bind(&row.failure_reason)
            .bind(&row.image_build_id)
            .bind(row.lease_index.map(i64::from))
            .bind(&row.agent_token)
            .bind(&row.vnc_password)
            .bind(i64::from(row.display_width))
            .bind(i64::from(row.display_height))
            .bind(row.created_at)
            .bind(row.updated_at)
            .bind(row.ready_at)
            .bind(row.last_heartbeat_at)
            .bind(row.last_activity_at)
            .execute(&self.pool)
            .await
            .map_err(q("insert sandbox"))?;
        Ok(())
    }

    pub async fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get sandbox"))?;
        row.map(|r| sandbox_from_row(&r)).transpose()
    }

    pub async fn sandboxes_of(&self, owner_id: &str) -> Result<Vec<SandboxRow>, StoreError> {
        let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = $1 ORDER BY created_at DESC, id");
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list sandboxes"))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Every sandbox that may hold host resources.
    pub async fn live_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state IN ('provisioning', 'booting', 'ready', 'stopping') \
             OR lease_index IS NOT NULL ORDER BY created_at"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list live sandboxes"))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Failed sandboxes and those idle since before `idle_before` (ms).
    pub async fn reapable(&self, idle_before: i64) -> Result<Vec<SandboxRow>, StoreError> {
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE (state = 'failed' AND lease_index IS NOT NULL) \
             OR (state = 'ready' AND kind = 'browser' AND last_activity_at < $1)"
        );
        let rows = sqlx::query(&sql)
            .bind(idle_before)
            .fetch_all(&self.pool)
            .await
            .map_err(q("find reapable"))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    pub async fn used_leases(&self) -> Result<BTreeSet<u32>, StoreError> {
        let rows = sqlx::query("SELECT lease_index FROM sandboxes WHERE lease_index IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list leases"))?;
        let mut out = BTreeSet::new();
        for row in rows {
            let v: i64 = row
                .try_get(0)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.insert(u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("lease {v}")))?);
        }
        Ok(out)
    }

    /// Move `id` to `to` only if it is currently in one of `from`. Returns whether it moved.
    pub async fn transition(
        &self,
        id: &str,
        from: &[SandboxState],
        to: SandboxState,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 5)).collect();
        let ready_clause = if to == SandboxState::Ready {
            ", ready_at = $2, last_activity_at = $2"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE sandboxes SET state = $1, updated_at = $2, failure_reason = COALESCE($3, failure_reason){ready_clause} \
             WHERE id = $4 AND state IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now_ms())
            .bind(reason)
            .bind(id);
        for s in from {
            query = query.bind(s.as_str());
        }
        let done = query
            .execute(&self.pool)
            .await
            .map_err(q("update sandbox state"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn release_lease(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET lease_index = NULL, updated_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("release lease"))?;
        Ok(())
    }

    pub async fn touch_heartbeat(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET last_heartbeat_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("record heartbeat"))?;
        Ok(())
    }

    pub async fn touch_activity(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET last_activity_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("record activity"))?;
        Ok(())
    }

    /// Forget finished sandboxes older than `before` (ms).
    pub async fn purge_finished(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM sandboxes WHERE state IN ('stopped', 'failed') AND lease_index IS NULL AND updated_at < $1",
        )
        .bind(before)
        .execute(&self.pool)
        .await
        .map_err(q("purge finished sandboxes"))?;
        Ok(done.rows_affected())
    }

    pub async fn count_by_state(&self) -> Result<Vec<(SandboxState, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM sandboxes GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .map_err(q("count sandboxes"))?;
        let mut out = Vec::new();
        for row in rows {
            let state: String = row
                .try_get("state")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let n: i64 = row
                .try_get("n")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Some(s) = SandboxState::parse(&state) {
                out.push((s, n));
            }
        }
        Ok(out)
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

/// A database URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
