//! Several workspaces per user: the name each workspace sandbox was made
//! under (unique among a user's live ones, by a unique index), the
//! workspace a login delivers to, where each provider's files were placed,
//! and the revocation generation a delivery compares against.

use super::{now_ms, q, Store, StoreError};
use sqlx::Row;

/// The states in which a sandbox still holds its workspace name.
const LIVE: &str = "('provisioning', 'booting', 'ready', 'stopping', 'pooled')";

/// A name row whose sandbox row never appeared (the process stopped
/// between the two writes) frees its name after this long.
const UNBORN_MS: i64 = 60_000;

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Where a provider's files are in one named workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementRow {
    pub provider: String,
    pub workspace: String,
    /// `placed`, or `revoking` (to be removed when the workspace next runs).
    pub state: String,
}

impl Store {
    /// Take `name` for workspace sandbox `sandbox_id` of `owner_id`. A name
    /// whose sandbox has ended is freed first. `Conflict` when a live
    /// workspace of the user holds it.
    pub async fn claim_workspace_name(
        &self,
        owner_id: &str,
        name: &str,
        sandbox_id: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let free = format!(
            "UPDATE workspace_names SET live = NULL WHERE owner_id = $1 AND name = $2 \
             AND live IS NOT NULL AND ( \
               EXISTS (SELECT 1 FROM sandboxes s WHERE s.id = workspace_names.sandbox_id \
                       AND s.state NOT IN {LIVE}) \
               OR (NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.id = workspace_names.sandbox_id) \
                   AND created_at < $3))"
        );
        sqlx::query(&free)
            .bind(owner_id)
            .bind(name)
            .bind(now - UNBORN_MS)
            .execute(&self.pool)
            .await
            .map_err(q("free workspace name"))?;
        sqlx::query(
            "INSERT INTO workspace_names (sandbox_id, owner_id, name, live, created_at) \
             VALUES ($1, $2, $3, 1, $4)",
        )
        .bind(sandbox_id)
        .bind(owner_id)
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("insert workspace name"))?;
        Ok(())
    }

    /// The create did not happen: the name is free again.
    pub async fn drop_workspace_name(&self, sandbox_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM workspace_names WHERE sandbox_id = $1")
            .bind(sandbox_id)
            .execute(&self.pool)
            .await
            .map_err(q("drop workspace name"))?;
        Ok(())
    }

    /// A warm pool handed over another sandbox than the one named.
    pub async fn move_workspace_name(&self, from: &str, to: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE workspace_names SET sandbox_id = $2 WHERE sandbox_id = $1")
            .bind(from)
            .bind(to)
            .execute(&self.pool)
            .await
            .map_err(q("move workspace name"))?;
        Ok(())
    }

    /// The name sandbox `sandbox_id` was made under (none: made before
    /// names existed, which is "default").
    pub async fn workspace_name(&self, sandbox_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT name FROM workspace_names WHERE sandbox_id = $1")
            .bind(sandbox_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read workspace name"))?;
        row.map(|r| r.try_get("name").map_err(corrupt)).transpose()
    }

    /// Every (sandbox id, name) row of the user, live or not.
    pub async fn workspace_names_of(
        &self,
        owner_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT sandbox_id, name FROM workspace_names WHERE owner_id = $1 ORDER BY created_at",
        )
        .bind(owner_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list workspace names"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("sandbox_id").map_err(corrupt)?,
                    r.try_get("name").map_err(corrupt)?,
                ))
            })
            .collect()
    }

    /// Login `login_id` delivers to workspace `name`.
    pub async fn set_login_target(&self, login_id: &str, name: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO login_targets (login_id, workspace) VALUES ($1, $2)")
            .bind(login_id)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("insert login target"))?;
        Ok(())
    }

    pub async fn login_target(&self, login_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT workspace FROM login_targets WHERE login_id = $1")
            .bind(login_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("read login target"))?;
        row.map(|r| r.try_get("workspace").map_err(corrupt))
            .transpose()
    }

    /// The provider's files were written into workspace `name`.
    pub async fn place_credentials(
        &self,
        owner_id: &str,
        provider: &str,
        workspace: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO credential_placements (owner_id, provider, workspace, state, at) \
             VALUES ($1, $2, $3, 'placed', $4) ON CONFLICT (owner_id, provider, workspace) \
             DO UPDATE SET state = 'placed', at = excluded.at",
        )
        .bind(owner_id)
        .bind(provider)
        .bind(workspace)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(q("place credentials"))?;
        Ok(())
    }

    /// Every placement of the provider's files becomes `revoking`.
    pub async fn revoke_placements(
        &self,
        owner_id: &str,
        provider: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE credential_placements SET state = 'revoking', at = $3 \
             WHERE owner_id = $1 AND provider = $2",
        )
        .bind(owner_id)
        .bind(provider)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(q("revoke placements"))?;
        Ok(())
    }

    /// The files are gone from workspace `name` (revoked and removed).
    pub async fn drop_placement(
        &self,
        owner_id: &str,
        provider: &str,
        workspace: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM credential_placements WHERE owner_id = $1 AND provider = $2 \
             AND workspace = $3 AND state = 'revoking'",
        )
        .bind(owner_id)
        .bind(provider)
        .bind(workspace)
        .execute(&self.pool)
        .await
        .map_err(q("drop placement"))?;
        Ok(())
    }

    pub async fn placements_of(&self, owner_id: &str) -> Result<Vec<PlacementRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider, workspace, state FROM credential_placements WHERE owner_id = $1 \
             ORDER BY provider, workspace",
        )
        .bind(owner_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list placements"))?;
        rows.iter()
            .map(|r| {
                Ok(PlacementRow {
                    provider: r.try_get("provider").map_err(corrupt)?,
                    workspace: r.try_get("workspace").map_err(corrupt)?,
                    state: r.try_get("state").map_err(corrupt)?,
                })
            })
            .collect()
    }

    /// How many times the user's record for `provider` was revoked (0:
    /// never).
    pub async fn credential_generation(
        &self,
        owner_id: &str,
        provider: &str,
    ) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT generation FROM credential_generations WHERE owner_id = $1 AND provider = $2",
        )
        .bind(owner_id)
        .bind(provider)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("read credential generation"))?;
        Ok(match row {
            Some(r) => r.try_get("generation").map_err(corrupt)?,
            None => 0,
        })
    }
}

/// Bump the revocation generation inside a revocation's transaction.
pub(super) async fn bump_generation(
    conn: &mut sqlx::AnyConnection,
    owner_id: &str,
    provider: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO credential_generations (owner_id, provider, generation) VALUES ($1, $2, 1) \
         ON CONFLICT (owner_id, provider) \
         DO UPDATE SET generation = credential_generations.generation + 1",
    )
    .bind(owner_id)
    .bind(provider)
    .execute(conn)
    .await
    .map_err(q("bump credential generation"))?;
    Ok(())
}
