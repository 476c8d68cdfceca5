//! Rows of egress: the provider account, users' ports in its range, users'
//! explicit upstreams, and small settings. Passwords arrive here already
//! sealed by the vault; the store never sees them in plaintext.

use super::{now_ms, q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

/// The one provider account's id.
pub const ACCOUNT_ID: &str = "default";

#[derive(Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub host: String,
    pub username: String,
    pub password_sealed: String,
    pub port_min: u16,
    pub port_max: u16,
    pub updated_at: i64,
}

impl std::fmt::Debug for AccountRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountRow")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("ports", &(self.port_min..=self.port_max))
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamRow {
    pub user_id: String,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password_sealed: String,
    pub updated_at: i64,
}

impl std::fmt::Debug for UpstreamRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamRow")
            .field("user_id", &self.user_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn port(row: &AnyRow, col: &str) -> Result<u16, StoreError> {
    let v: i64 = row
        .try_get(col)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    u16::try_from(v).map_err(|_| StoreError::Corrupt(format!("{col} {v} is not a port")))
}

fn text(row: &AnyRow, col: &str) -> Result<String, StoreError> {
    row.try_get(col)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    pub async fn egress_account(&self) -> Result<Option<AccountRow>, StoreError> {
        let row = sqlx::query(
            "SELECT host, username, password_sealed, port_min, port_max, updated_at \
             FROM egress_accounts WHERE id = $1",
        )
        .bind(ACCOUNT_ID)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("read the egress account"))?;
        row.map(|r| {
            Ok(AccountRow {
                host: text(&r, "host")?,
                username: text(&r, "username")?,
                password_sealed: text(&r, "password_sealed")?,
                port_min: port(&r, "port_min")?,
                port_max: port(&r, "port_max")?,
                updated_at: r
                    .try_get("updated_at")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            })
        })
        .transpose()
    }

    /// Create or replace the account. Ports outside a new range are released
    /// in the same transaction, so they are reassigned on next use.
    pub async fn set_egress_account(&self, a: &AccountRow) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        sqlx::query(
            "INSERT INTO egress_accounts (id, host, username, password_sealed, port_min, port_max, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET host = $2, username = $3, password_sealed = $4, \
             port_min = $5, port_max = $6, updated_at = $7",
        )
        .bind(ACCOUNT_ID)
        .bind(&a.host)
        .bind(&a.username)
        .bind(&a.password_sealed)
        .bind(i64::from(a.port_min))
        .bind(i64::from(a.port_max))
        .bind(a.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(q("write the egress account"))?;
        sqlx::query(
            "DELETE FROM egress_user_ports WHERE account_id = $1 AND (port < $2 OR port > $3)",
        )
        .bind(ACCOUNT_ID)
        .bind(i64::from(a.port_min))
        .bind(i64::from(a.port_max))
        .execute(&mut *tx)
        .await
        .map_err(q("release ports outside the range"))?;
        tx.commit().await.map_err(q("commit"))
    }

    /// Remove the account and every port given from it; true if there was one.
    pub async fn delete_egress_account(&self) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        sqlx::query("DELETE FROM egress_user_ports WHERE account_id = $1")
            .bind(ACCOUNT_ID)
            .execute(&mut *tx)
            .await
            .map_err(q("release the account's ports"))?;
        let done = sqlx::query("DELETE FROM egress_accounts WHERE id = $1")
            .bind(ACCOUNT_ID)
            .execute(&mut *tx)
            .await
            .map_err(q("delete the egress account"))?;
        tx.commit().await.map_err(q("commit"))?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn egress_user_port(&self, user_id: &str) -> Result<Option<u16>, StoreError> {
        let row = sqlx::query(
            "SELECT port FROM egress_user_ports WHERE user_id = $1 AND account_id = $2",
        )
        .bind(user_id)
        .bind(ACCOUNT_ID)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("read a user's port"))?;
        row.map(|r| port(&r, "port")).transpose()
    }

    /// The user's port, assigning the lowest free one in `min..=max` if it has
    /// none. `None` when the range is full. Uniqueness is the database's: two
    /// racing assignments cannot both take a port.
    pub async fn assign_egress_port(
        &self,
        user_id: &str,
        min: u16,
        max: u16,
    ) -> Result<Option<u16>, StoreError> {
        for _ in 0..8 {
            if let Some(p) = self.egress_user_port(user_id).await? {
                return Ok(Some(p));
            }
            let used = sqlx::query(
                "SELECT port FROM egress_user_ports WHERE account_id = $1 ORDER BY port",
            )
            .bind(ACCOUNT_ID)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list assigned ports"))?;
            let used: std::collections::BTreeSet<u16> = used
                .iter()
                .map(|r| port(r, "port"))
                .collect::<Result<_, _>>()?;
            let Some(free) = (min..=max).find(|p| !used.contains(p)) else {
                return Ok(None);
            };
            let inserted = sqlx::query(
                "INSERT INTO egress_user_ports (user_id, account_id, port, assigned_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(user_id)
            .bind(ACCOUNT_ID)
            .bind(i64::from(free))
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(q("insert port"));
            match inserted {
                Ok(_) => return Ok(Some(free)),
                // Someone took it (or gave this user one) meanwhile: look again.
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict("a port (contended)".into()))
    }

    pub async fn egress_ports_assigned(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM egress_user_ports WHERE account_id = $1")
            .bind(ACCOUNT_ID)
            .fetch_one(&self.pool)
            .await
            .map_err(q("count assigned ports"))?;
        let n: i64 = row
            .try_get("n")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub async fn release_egress_port(&self, user_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM egress_user_ports WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(q("release a user's port"))?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn egress_upstream(&self, user_id: &str) -> Result<Option<UpstreamRow>, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, host, port, username, password_sealed, updated_at \
             FROM egress_user_upstreams WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("read a user's upstream"))?;
        row.map(|r| {
            Ok(UpstreamRow {
                user_id: text(&r, "user_id")?,
                host: text(&r, "host")?,
                port: port(&r, "port")?,
                username: text(&r, "username")?,
                password_sealed: text(&r, "password_sealed")?,
                updated_at: r
                    .try_get("updated_at")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            })
        })
        .transpose()
    }

    pub async fn set_egress_upstream(&self, u: &UpstreamRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO egress_user_upstreams (user_id, host, port, username, password_sealed, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id) DO UPDATE SET host = $2, port = $3, username = $4, \
             password_sealed = $5, updated_at = $6",
        )
        .bind(&u.user_id)
        .bind(&u.host)
        .bind(i64::from(u.port))
        .bind(&u.username)
        .bind(&u.password_sealed)
        .bind(u.updated_at)
        .execute(&self.pool)
        .await
        .map_err(q("write a user's upstream"))?;
        Ok(())
    }

    pub async fn delete_egress_upstream(&self, user_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM egress_user_upstreams WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(q("delete a user's upstream"))?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn egress_setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM egress_settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read an egress setting"))?;
        row.map(|r| text(&r, "value")).transpose()
    }

    /// Set (`Some`) or clear (`None`) a setting.
    pub async fn set_egress_setting(
        &self,
        name: &str,
        value: Option<&str>,
    ) -> Result<(), StoreError> {
        match value {
            Some(value) => sqlx::query(
                "INSERT INTO egress_settings (name, value, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET value = $2, updated_at = $3",
            )
            .bind(name)
            .bind(value)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(q("write an egress setting"))?,
            None => sqlx::query("DELETE FROM egress_settings WHERE name = $1")
                .bind(name)
                .execute(&self.pool)
                .await
                .map_err(q("clear an egress setting"))?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        (Store::open(&url).await.expect("open"), dir)
    }

    fn account(min: u16, max: u16) -> AccountRow {
        AccountRow {
            host: "127.0.0.1".into(),
            username: "acct".into(),
            password_sealed: "v1:k1:x:y".into(),
            port_min: min,
            port_max: max,
            updated_at: now_ms(),
        }
    }

    #[tokio::test]
    async fn ports_are_unique_persistent_and_released() {
        let (store, _dir) = store().await;
        for u in ["a", "b", "c"] {
            store.insert_user(u, u, None).await.expect("user");
        }
        store
            .set_egress_account(&account(10001, 10002))
            .await
            .expect("account");
        let pa = store
            .assign_egress_port("a", 10001, 10002)
            .await
            .expect("a");
        let pb = store
            .assign_egress_port("b", 10001, 10002)
            .await
            .expect("b");
        assert_eq!((pa, pb), (Some(10001), Some(10002)));
        // Asking again gives the same port; the range is full for a third user.
        assert_eq!(
            store
                .assign_egress_port("a", 10001, 10002)
                .await
                .expect("a"),
            pa
        );
        assert_eq!(
            store
                .assign_egress_port("c", 10001, 10002)
                .await
                .expect("c"),
            None
        );
        // Removing a user frees its port for the next one.
        assert_eq!(store.begin_user_removal("a").await.expect("begin"), 0);
        assert!(store.finish_user_removal("a").await.expect("remove"));
        assert!(store.user_by_name("a").await.expect("lookup").is_none());
        assert_eq!(
            store
                .assign_egress_port("c", 10001, 10002)
                .await
                .expect("c"),
            Some(10001)
        );
        // Shrinking the range releases ports outside it.
        store
            .set_egress_account(&account(10001, 10001))
            .await
            .expect("shrink");
        assert_eq!(store.egress_user_port("b").await.expect("b"), None);
    }

    #[tokio::test]
    async fn upstreams_and_settings_round_trip() {
        let (store, _dir) = store().await;
        store.insert_user("u", "u", None).await.expect("user");
        let row = UpstreamRow {
            user_id: "u".into(),
            host: "h".into(),
            port: 1,
            username: "n".into(),
            password_sealed: "sealed".into(),
            updated_at: 5,
        };
        store.set_egress_upstream(&row).await.expect("set");
        store
            .set_egress_upstream(&UpstreamRow {
                port: 2,
                ..row.clone()
            })
            .await
            .expect("replace");
        assert_eq!(
            store
                .egress_upstream("u")
                .await
                .expect("get")
                .map(|r| r.port),
            Some(2)
        );
        assert!(store.delete_egress_upstream("u").await.expect("delete"));
        assert!(store.egress_upstream("u").await.expect("get").is_none());
        store
            .set_egress_setting("echo_url", Some("http://x/"))
            .await
            .expect("set");
        assert_eq!(
            store
                .egress_setting("echo_url")
                .await
                .expect("get")
                .as_deref(),
            Some("http://x/")
        );
        store
            .set_egress_setting("echo_url", None)
            .await
            .expect("clear");
        assert!(store
            .egress_setting("echo_url")
            .await
            .expect("get")
            .is_none());
    }
}
