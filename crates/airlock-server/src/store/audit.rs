//! The audit trail of credential events (captured, delivered, re-captured,
//! expired, refresh failed, revoked), per user. Rows name times, providers,
//! workspaces and logins, never a secret; the app decides what an event is
//! (`app/credentials.rs`), the store only keeps and pages them.

use super::{q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: String,
    pub owner_id: String,
    pub at: i64,
    pub kind: String,
    pub provider: String,
    pub workspace_sandbox_id: Option<String>,
    pub login_id: Option<String>,
    pub detail: Option<String>,
}

const COLUMNS: &str = "id, owner_id, at, kind, provider, workspace_sandbox_id, login_id, detail";

fn from_row(row: &AnyRow) -> Result<AuditRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(AuditRow {
        id: row.try_get("id").map_err(get)?,
        owner_id: row.try_get("owner_id").map_err(get)?,
        at: row.try_get("at").map_err(get)?,
        kind: row.try_get("kind").map_err(get)?,
        provider: row.try_get("provider").map_err(get)?,
        workspace_sandbox_id: row.try_get("workspace_sandbox_id").map_err(get)?,
        login_id: row.try_get("login_id").map_err(get)?,
        detail: row.try_get("detail").map_err(get)?,
    })
}

impl Store {
    pub async fn insert_audit(&self, row: &AuditRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO credential_events ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        );
        sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.owner_id)
            .bind(row.at)
            .bind(&row.kind)
            .bind(&row.provider)
            .bind(&row.workspace_sandbox_id)
            .bind(&row.login_id)
            .bind(&row.detail)
            .execute(&self.pool)
            .await
            .map_err(q("insert audit event"))?;
        Ok(())
    }

    /// A user's events, newest first, at most `limit`, strictly older than
    /// `before` (time, id) when given: the cursor of the previous page.
    pub async fn audit_of(
        &self,
        owner_id: &str,
        before: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let (at, id) = before.unwrap_or((i64::MAX, ""));
        let sql = format!(
            "SELECT {COLUMNS} FROM credential_events WHERE owner_id = $1 \
             AND (at < $2 OR (at = $3 AND id < $4)) \
             ORDER BY at DESC, id DESC LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .bind(at)
            .bind(at)
            .bind(if before.is_some() { id } else { "" })
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(q("list audit events"))?;
        rows.iter().map(from_row).collect()
    }
}
