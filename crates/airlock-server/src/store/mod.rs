//! Persistence: users and sandboxes in SQLite (default, embedded) or PostgreSQL,
//! through one code path (sqlx's `Any` driver and portable SQL). The store knows
//! nothing of HTTP; it never decides lifecycle rules, it only records them, with
//! compare-and-set updates so two writers cannot both win.

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

mod audit;
mod credhealth;
mod egress;
mod logins;
mod nodes;
mod sandboxes;
mod sealed;
mod shares;
mod tickets;
mod usage;
mod users;
mod workspaces;

pub use audit::AuditRow;
pub use credhealth::HealthRow;
pub use egress::{AccountRow, UpstreamRow, ACCOUNT_ID as EGRESS_ACCOUNT_ID};
pub use logins::{CredentialRow, LoginRow};
pub use nodes::{Leadership, NodeRow, UserLock};
pub use sandboxes::SandboxRow;
pub use sealed::{SealedRef, SealedValue};
pub use shares::ShareRow;
pub use users::UserRow;
pub use workspaces::PlacementRow;

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

impl StoreError {
    /// The database could not be reached (stopped, restarting, its
    /// connections cut, none free in time), as opposed to a query it
    /// refused: a caller may try again shortly.
    pub fn is_unavailable(&self) -> bool {
        let (StoreError::Open { source, .. } | StoreError::Query { source, .. }) = self else {
            return false;
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => true,
            // PostgreSQL's classes 08 (connection exception) and 57P
            // (operator intervention: the server shutting down).
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }
}

impl StoreError {
    /// The database refused a write because its disk is full (SQLite's
    /// SQLITE_FULL, PostgreSQL's 53100): freeing space fixes it.
    pub fn is_disk_full(&self) -> bool {
        let StoreError::Query {
            source: sqlx::Error::Database(db),
            ..
        } = self
        else {
            return false;
        };
        matches!(db.code().as_deref(), Some("13" | "53100"))
    }
}

pub(crate) fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| {
        if let sqlx::Error::Database(db) = &source {
            if db.is_unique_violation() {
                return StoreError::Conflict(what.trim_start_matches("insert ").to_owned());
            }
        }
        StoreError::Query { what, source }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// PostgreSQL (many processes may share it) rather than SQLite.
    postgres: bool,
    /// The URL it was opened with, for a `LISTEN` connection of its own.
    /// Holds the password: never logged or shown.
    url: std::sync::Arc<str>,
    /// Connections that user locks may hold at once (see `Store::lock_user`).
    lock_slots: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Never the URL (it may hold the password) nor the pool's options.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
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
        // While the database is away, a request waits at most 5 s for a
        // connection and then gets 503 `store_unavailable`, not a hang.
        let mut options = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 1 } else { 8 })
            .acquire_timeout(std::time::Duration::from_secs(5));
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
        Ok(Store {
            pool,
            postgres: !is_sqlite,
            url: url.into(),
            lock_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
        })
    }
}

#[cfg(test)]
impl Store {
    /// Close every connection for good: from now on each query fails as
    /// unavailable (a database that went away, for tests).
    pub(crate) async fn close_for_test(&self) {
        self.pool.close().await;
    }
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
