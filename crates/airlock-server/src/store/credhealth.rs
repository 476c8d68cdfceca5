//! What the control plane last found out about each stored credential
//! record (its health, expiry and version), the revocations still to be
//! carried into a workspace, and the two writes that touch a `credentials`
//! record besides a login's: revoking it and re-capturing it. Each is one
//! transaction, and the re-capture a compare-and-set on the sealed value,
//! so a login that replaced the record meanwhile wins.

use super::{now_ms, q, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRow {
    pub owner_id: String,
    pub provider: String,
    /// `healthy`, `expiring`, `expired`, `refresh_failed` or `revoked`.
    pub status: String,
    pub expires_at: Option<i64>,
    pub checked_at: i64,
    pub workspace_sandbox_id: Option<String>,
    /// Why the status is what it is; never a secret.
    pub detail: Option<String>,
    /// 1 for what a login captured, one more for each re-capture.
    pub version: i64,
}

const COLUMNS: &str =
    "owner_id, provider, status, expires_at, checked_at, workspace_sandbox_id, detail, version";

fn from_row(row: &AnyRow) -> Result<HealthRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    Ok(HealthRow {
        owner_id: row.try_get("owner_id").map_err(get)?,
        provider: row.try_get("provider").map_err(get)?,
        status: row.try_get("status").map_err(get)?,
        expires_at: row.try_get("expires_at").map_err(get)?,
        checked_at: row.try_get("checked_at").map_err(get)?,
        workspace_sandbox_id: row.try_get("workspace_sandbox_id").map_err(get)?,
        detail: row.try_get("detail").map_err(get)?,
        version: row.try_get("version").map_err(get)?,
    })
}

async fn upsert(conn: &mut sqlx::AnyConnection, h: &HealthRow) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO credential_health ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (owner_id, provider) DO UPDATE SET status = excluded.status, \
         expires_at = excluded.expires_at, checked_at = excluded.checked_at, \
         workspace_sandbox_id = excluded.workspace_sandbox_id, detail = excluded.detail, \
         version = excluded.version"
    );
    sqlx::query(&sql)
        .bind(&h.owner_id)
        .bind(&h.provider)
        .bind(&h.status)
        .bind(h.expires_at)
        .bind(h.checked_at)
        .bind(&h.workspace_sandbox_id)
        .bind(&h.detail)
        .bind(h.version)
        .execute(conn)
        .await
        .map_err(q("write credential health"))?;
    Ok(())
}

impl Store {
    pub async fn put_health(&self, h: &HealthRow) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(q("connect"))?;
        upsert(&mut conn, h).await
    }

    pub async fn health(
        &self,
        owner_id: &str,
        provider: &str,
    ) -> Result<Option<HealthRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM credential_health WHERE owner_id = $1 AND provider = $2"
        );
        let row = sqlx::query(&sql)
            .bind(owner_id)
            .bind(provider)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get credential health"))?;
        row.map(|r| from_row(&r)).transpose()
    }

    pub async fn health_of(&self, owner_id: &str) -> Result<Vec<HealthRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM credential_health WHERE owner_id = $1");
        let rows = sqlx::query(&sql)
            .bind(owner_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list credential health"))?;
        rows.iter().map(from_row).collect()
    }

    /// Records by (provider, status), over all users (metrics).
    pub async fn health_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT h.provider, h.status, COUNT(*) AS n FROM credential_health h \
             JOIN credentials c ON c.owner_id = h.owner_id AND c.provider = h.provider \
             GROUP BY h.provider, h.status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("count credential health"))?;
        let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("provider").map_err(get)?,
                    r.try_get("status").map_err(get)?,
                    r.try_get("n").map_err(get)?,
                ))
            })
            .collect()
    }

    /// Delete the user's record for `provider` and its health, and note the
    /// revocation for the workspace, in one transaction. True when there
    /// was a record.
    pub async fn revoke_credential(
        &self,
        owner_id: &str,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        let gone = sqlx::query("DELETE FROM credentials WHERE owner_id = $1 AND provider = $2")
            .bind(owner_id)
            .bind(provider)
            .execute(&mut *tx)
            .await
            .map_err(q("delete credentials"))?
            .rows_affected();
        sqlx::query("DELETE FROM credential_health WHERE owner_id = $1 AND provider = $2")
            .bind(owner_id)
            .bind(provider)
            .execute(&mut *tx)
            .await
            .map_err(q("delete credential health"))?;
        if gone > 0 {
            // In the same transaction: a delivery that read the record
            // before it finds the generation moved after writing, and takes
            // its files back out.
            super::workspaces::bump_generation(&mut tx, owner_id, provider).await?;
            sqlx::query(
                "INSERT INTO credential_revocations (owner_id, provider, revoked_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (owner_id, provider) \
                 DO UPDATE SET revoked_at = excluded.revoked_at",
            )
            .bind(owner_id)
            .bind(provider)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(q("note revocation"))?;
        }
        tx.commit().await.map_err(q("commit revocation"))?;
        Ok(gone > 0)
    }

    /// Providers revoked for this user whose files may still be in its home.
    pub async fn revocations_of(&self, owner_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider FROM credential_revocations WHERE owner_id = $1 ORDER BY provider",
        )
        .bind(owner_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list revocations"))?;
        rows.iter()
            .map(|r| {
                r.try_get("provider")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// The files are gone (or a new login captured the provider again).
    pub async fn clear_revocation(&self, owner_id: &str, provider: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM credential_revocations WHERE owner_id = $1 AND provider = $2")
            .bind(owner_id)
            .bind(provider)
            .execute(&self.pool)
            .await
            .map_err(q("clear revocation"))?;
        Ok(())
    }

    /// Replace the record's sealed value with a re-captured one, if it is
    /// still the one read, and write its health (with the new version) in
    /// the same transaction. False when another writer changed the record.
    pub async fn recapture_credential(
        &self,
        old_sealed: &str,
        new_sealed: &str,
        key_id: &str,
        health: &HealthRow,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        let res = sqlx::query(
            "UPDATE credentials SET sealed = $1, key_id = $2, updated_at = $3 \
             WHERE owner_id = $4 AND provider = $5 AND sealed = $6",
        )
        .bind(new_sealed)
        .bind(key_id)
        .bind(now_ms())
        .bind(&health.owner_id)
        .bind(&health.provider)
        .bind(old_sealed)
        .execute(&mut *tx)
        .await
        .map_err(q("re-capture credentials"))?;
        if res.rows_affected() != 1 {
            return Ok(false);
        }
        upsert(&mut tx, health).await?;
        tx.commit().await.map_err(q("commit re-capture"))?;
        Ok(true)
    }
}
