//! Several workspaces per user. A workspace is known by a name its user
//! gives when creating it (`default` when none is given): the name is
//! unique among the user's live workspaces (a unique index in the store),
//! and it finds the workspace's home volume, so a workspace deleted and
//! made again under the same name comes back with the same home:
//!
//! ```text
//!  default  ──▶ <data_dir>/volumes/<user id>/home   (where it always was)
//!  <name>   ──▶ <data_dir>/volumes/<user id>/workspaces/<name>/home
//! ```
//!
//! How many a user may run at once is the per-user sandbox quota. A login
//! names the workspace it delivers to; stored credentials are delivered
//! to another workspace on request (`app/credentials.rs`).

use super::admission::Ask;
use super::pool::Created;
use super::state::SandboxState;
use super::{App, AppError};
use crate::store::{SandboxRow, StoreError, UserRow};
use airlock_proto::metadata::SandboxKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The workspace a create, a login or a delivery means when it names none.
pub const DEFAULT: &str = "default";

/// A name: 1 to 32 of lowercase letters, digits and `-`, starting with a
/// letter or digit (it becomes a directory name).
pub fn check_name(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(AppError::BadInput(
            "workspace: 1 to 32 lowercase letters, digits and '-', not starting with '-'".into(),
        ))
    }
}

/// The home volume of workspace `name` of user `owner_id`.
pub fn home_of(data_dir: &Path, owner_id: &str, name: &str) -> PathBuf {
    let user = super::volumes::root(data_dir).join(owner_id);
    if name == DEFAULT {
        user.join("home")
    } else {
        user.join("workspaces").join(name).join("home")
    }
}

/// One of a user's workspaces: its name, and the sandbox that runs it now.
#[derive(Debug, Clone)]
pub struct WorkspaceView {
    pub name: String,
    /// The live sandbox of this name, if one runs (or boots, or stops).
    pub sandbox: Option<SandboxRow>,
    /// Providers whose credentials were delivered here (and not revoked).
    pub providers: Vec<String>,
}

impl App {
    /// Make workspace `name` (default: `default`) for `user`: admitted
    /// against the user's quotas (or, `on_behalf` of a login that was
    /// admitted already, against the host's room only). A conflict when a
    /// live workspace of the user has that name.
    pub async fn create_workspace(
        self: &Arc<Self>,
        user: &UserRow,
        name: Option<&str>,
        on_behalf: bool,
    ) -> Result<Created, AppError> {
        let name = name.unwrap_or(DEFAULT);
        check_name(name)?;
        let id = super::sandboxes::new_id();
        let ask = if on_behalf {
            Ask::OnBehalf
        } else {
            Ask::Sandbox
        };
        let permit = self.admission.admit(&user.id, ask, &id).await?;
        match self.store.claim_workspace_name(&user.id, name, &id).await {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(AppError::Conflict(format!(
                    "this user already has a workspace named {name:?}; delete it first, or give another name"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        match self
            .create_or_claim(user, SandboxKind::Workspace, id.clone(), permit)
            .await
        {
            Ok(created) => {
                if created.row.id != id {
                    self.store.move_workspace_name(&id, &created.row.id).await?;
                }
                Ok(created)
            }
            Err(e) => {
                if let Err(drop) = self.store.drop_workspace_name(&id).await {
                    tracing::warn!(sandbox = %id, error = %drop, "could not free a workspace name");
                }
                Err(e)
            }
        }
    }

    /// The name workspace sandbox `sandbox_id` runs under.
    pub async fn workspace_name_of(&self, sandbox_id: &str) -> Result<String, AppError> {
        Ok(self
            .store
            .workspace_name(sandbox_id)
            .await?
            .unwrap_or_else(|| DEFAULT.to_owned()))
    }

    /// Where a sandbox's home volume is: its workspace's, by name; none
    /// for a browser sandbox.
    pub(crate) async fn workspace_home(
        &self,
        row: &SandboxRow,
    ) -> Result<Option<PathBuf>, AppError> {
        if row.kind != SandboxKind::Workspace {
            return Ok(None);
        }
        let name = self.workspace_name_of(&row.id).await?;
        Ok(Some(home_of(&self.cfg.data_dir, &row.owner_id, &name)))
    }

    /// The user's live workspaces, each with its name.
    pub(crate) async fn live_workspaces_of(
        &self,
        owner_id: &str,
    ) -> Result<Vec<(SandboxRow, String)>, AppError> {
        let mut out = Vec::new();
        for row in self.store.sandboxes_of(owner_id).await? {
            if row.kind == SandboxKind::Workspace && row.state.is_live() {
                let name = self.workspace_name_of(&row.id).await?;
                out.push((row, name));
            }
        }
        Ok(out)
    }

    /// The user's ready workspaces, each with its name.
    pub(crate) async fn ready_named_workspaces(
        &self,
        owner_id: &str,
    ) -> Result<Vec<(SandboxRow, String)>, AppError> {
        let mut all = self.live_workspaces_of(owner_id).await?;
        all.retain(|(row, _)| row.state == SandboxState::Ready);
        Ok(all)
    }

    /// The live sandbox of workspace `name`, if any.
    pub(crate) async fn live_workspace(
        &self,
        owner_id: &str,
        name: &str,
    ) -> Result<Option<SandboxRow>, AppError> {
        Ok(self
            .live_workspaces_of(owner_id)
            .await?
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(row, _)| row))
    }

    /// `GET /workspaces`: every workspace the user has made or had
    /// credentials delivered to, with the sandbox that runs it now.
    pub async fn workspaces(&self, user: &UserRow) -> Result<Vec<WorkspaceView>, AppError> {
        let live = self.live_workspaces_of(&user.id).await?;
        let placements = self.store.placements_of(&user.id).await?;
        let mut names: Vec<String> = self
            .store
            .workspace_names_of(&user.id)
            .await?
            .into_iter()
            .map(|(_, name)| name)
            .chain(live.iter().map(|(_, n)| n.clone()))
            .chain(placements.iter().map(|p| p.workspace.clone()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|name| WorkspaceView {
                sandbox: live
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(row, _)| row.clone()),
                providers: placements
                    .iter()
                    .filter(|p| p.workspace == name && p.state == "placed")
                    .map(|p| p.provider.clone())
                    .collect(),
                name,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_confined_to_one_directory() {
        for good in ["default", "a", "proj-2", "x".repeat(32).as_str()] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "a/b", "..", ".", "a b", "é", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let d = Path::new("/d");
        assert_eq!(home_of(d, "u1", "default"), Path::new("/d/volumes/u1/home"));
        assert_eq!(
            home_of(d, "u1", "proj"),
            Path::new("/d/volumes/u1/workspaces/proj/home")
        );
    }
}
