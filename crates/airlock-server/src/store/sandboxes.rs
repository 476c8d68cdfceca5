//! Sandbox rows: lifecycle state, leases, secrets the control plane needs to
//! reach the guest, timestamps.

use super::{now_ms, q, Store, StoreError};
use crate::app::state::{SandboxState, StateWrite};
use airlock_proto::metadata::SandboxKind;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::BTreeSet;

#[derive(Clone, PartialEq, Eq)]
pub struct SandboxRow {
    pub id: String,
    pub owner_id: String,
    pub kind: SandboxKind,
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
    let kind: String = row.try_get("kind").map_err(get)?;
    let lease: Option<i64> = row.try_get("lease_index").map_err(get)?;
    let width: i64 = row.try_get("display_width").map_err(get)?;
    let height: i64 = row.try_get("display_height").map_err(get)?;
    Ok(SandboxRow {
        id: row.try_get("id").map_err(get)?,
        owner_id: row.try_get("owner_id").map_err(get)?,
        kind: kind
            .parse()
            .map_err(|e: airlock_proto::metadata::UnknownKind| {
                StoreError::Corrupt(e.to_string())
            })?,
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

impl Store {
    // ---- sandboxes ----

    pub async fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        );
        sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.owner_id)
            .bind(row.kind.as_str())
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
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state IN ('provisioning', 'booting', 'ready', 'stopping', 'pooled') \
             OR lease_index IS NOT NULL ORDER BY created_at"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list live sandboxes"))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Failed sandboxes still holding resources, browser sandboxes idle
    /// since before `idle_before`, and sandboxes `stopping` since before
    /// `stuck_before` (ms).
    pub async fn reapable(
        &self,
        idle_before: i64,
        stuck_before: i64,
    ) -> Result<Vec<SandboxRow>, StoreError> {
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE (state = 'failed' AND lease_index IS NOT NULL) \
             OR (state = 'ready' AND kind = 'browser' AND last_activity_at < $1) \
             OR (state = 'stopping' AND updated_at < $2)"
        );
        let rows = sqlx::query(&sql)
            .bind(idle_before)
            .bind(stuck_before)
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

    /// Move `id` from `from` to `to` if it is still in `from` (compare and
    /// set); whether it moved. Only [`crate::app::state::advance`] can call
    /// it: it takes the proof that module alone makes.
    pub async fn set_sandbox_state(
        &self,
        _from_the_machine: &StateWrite,
        id: &str,
        from: SandboxState,
        to: SandboxState,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let ready_clause = if to == SandboxState::Ready {
            ", ready_at = $2, last_activity_at = $2"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE sandboxes SET state = $1, updated_at = $2, failure_reason = COALESCE($3, failure_reason){ready_clause} \
             WHERE id = $4 AND state = $5"
        );
        let done = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now_ms())
            .bind(reason)
            .bind(id)
            .bind(from.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("update sandbox state"))?;
        Ok(done.rows_affected() == 1)
    }

    /// A pool's claim: `id` goes from `pooled` (owned by `pool_owner`,
    /// running `image_build_id`) to `ready` and to `owner` in one
    /// compare-and-set; whether this call won it. Its times start again: to
    /// its new owner it was created, and became ready, now.
    pub async fn claim_sandbox(
        &self,
        _from_the_machine: &StateWrite,
        id: &str,
        pool_owner: &str,
        owner: &str,
        image_build_id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET state = 'ready', owner_id = $1, created_at = $2, updated_at = $2, \
             ready_at = $2, last_activity_at = $2 \
             WHERE id = $3 AND state = 'pooled' AND owner_id = $4 AND image_build_id = $5",
        )
        .bind(owner)
        .bind(now_ms())
        .bind(id)
        .bind(pool_owner)
        .bind(image_build_id)
        .execute(&self.pool)
        .await
        .map_err(q("claim a pool member"))?;
        Ok(done.rows_affected() == 1)
    }

    /// A member whose claim failed half-way goes back to the pool's name
    /// (it is already failed or stopping, so never handed out again): the
    /// user's list and quota show nothing of it.
    pub async fn disown_sandbox(
        &self,
        id: &str,
        owner: &str,
        pool_owner: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sandboxes SET owner_id = $1, updated_at = $2 \
             WHERE id = $3 AND owner_id = $4 AND state NOT IN ('ready', 'pooled')",
        )
        .bind(pool_owner)
        .bind(now_ms())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(q("disown a pool member"))?;
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
