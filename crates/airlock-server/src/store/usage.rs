//! Counts behind the per-user quotas: live sandboxes and logins under way.

use super::{q, Store, StoreError};
use sqlx::Row;

impl Store {
    /// Sandboxes of `owner_id` not stopped and not failed.
    pub async fn count_live_sandboxes(&self, owner_id: &str) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes WHERE owner_id = $1 \
             AND state IN ('provisioning', 'booting', 'ready', 'stopping', 'pooled')",
        )
        .bind(owner_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("count live sandboxes"))?;
        let n: i64 = row
            .try_get("n")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Logins of `owner_id` not finished, and the earliest time one of them
    /// expires (ms).
    pub async fn live_logins(&self, owner_id: &str) -> Result<(u64, Option<i64>), StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(expires_at) AS first FROM logins WHERE owner_id = $1 \
             AND state NOT IN ('completed', 'failed', 'expired', 'cancelled')",
        )
        .bind(owner_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("count live logins"))?;
        let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        let n: i64 = row.try_get("n").map_err(get)?;
        let first: Option<i64> = row.try_get("first").map_err(get)?;
        Ok((u64::try_from(n).unwrap_or(0), first))
    }
}
