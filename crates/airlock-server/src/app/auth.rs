//! Users and API tokens. Tokens are random, shown once, and stored only as
//! SHA-256 digests.

use super::{App, AppError};
use crate::store::{Store, StoreError, UserRow};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The user that needs no token: for callers on this host's loopback, while
/// airlock listens on loopback only (see `http::guard`).
pub const LOCAL_USER: &str = "local";

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    format!("al_{}", hex::encode(rand::random::<[u8; 24]>()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Create a user; returns the user and its API token (shown only now). An
/// admin may do the admin actions over HTTP (egress account, others' upstreams).
pub async fn add_user(
    store: &Store,
    name: &str,
    admin: bool,
) -> Result<(UserRow, String), AppError> {
    if !valid_name(name) {
        return Err(AppError::BadInput(format!(
            "user name {name:?} must be 1–64 characters of letters, digits, '-', '_' or '.'"
        )));
    }
    let token = new_token();
    let id = hex::encode(rand::random::<[u8; 8]>());
    match store
        .insert_user_with(&id, name, Some(&hash_token(&token)), admin)
        .await
    {
        Ok(user) => Ok((user, token)),
        Err(StoreError::Conflict(_)) => {
            Err(AppError::Conflict(format!("user {name:?} already exists")))
        }
        Err(e) => Err(e.into()),
    }
}

async fn named(store: &Store, name: &str) -> Result<UserRow, AppError> {
    store
        .user_by_name(name)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("user {name:?}")))
}

fn not_local(name: &str, what: &str) -> Result<(), AppError> {
    if name == LOCAL_USER {
        return Err(AppError::BadInput(format!(
            "the {LOCAL_USER:?} user cannot be {what}: it has no token, being the token-less \
             user of a loopback-bound airlock"
        )));
    }
    Ok(())
}

fn being_removed(name: &str) -> AppError {
    AppError::Conflict(format!("user {name:?} is being removed"))
}

/// Give a user a new token; the old one gets 401 from now on (tokens are
/// looked up in the store on every request). Returns the new token.
pub async fn rotate_token(store: &Store, name: &str) -> Result<String, AppError> {
    not_local(name, "given a token")?;
    let user = named(store, name).await?;
    let token = new_token();
    if !store.set_token_hash(&user.id, &hash_token(&token)).await? {
        return Err(being_removed(name));
    }
    Ok(token)
}

/// Disable (its token gets 401, its data stays) or enable a user.
pub async fn set_disabled(store: &Store, name: &str, disabled: bool) -> Result<(), AppError> {
    not_local(name, if disabled { "disabled" } else { "enabled" })?;
    let user = named(store, name).await?;
    if !store.set_user_disabled(&user.id, disabled).await? {
        return Err(being_removed(name));
    }
    Ok(())
}

/// Every user.
pub async fn users(store: &Store) -> Result<Vec<UserRow>, AppError> {
    Ok(store.users().await?)
}

/// Where a removal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The user and every row naming it are gone.
    Done,
    /// The user is disabled and its secrets deleted; this many of its
    /// sandboxes still hold host resources. The control plane's reaper ends
    /// them and then deletes the user.
    Pending(u64),
}

const REMOVED_REASON: &str = "its user was removed";

/// `airlock user remove`: at once the user's token stops working, its logins
/// are cancelled, its credentials and egress rows are deleted and its live
/// sandboxes are told to stop; the user row goes as soon as no sandbox of it
/// holds host resources (now, or when the reaper has ended them), and with it
/// its volumes in `data_dir` (the home its CLIs were signed in in).
pub async fn remove_user(store: &Store, data_dir: &Path, name: &str) -> Result<Removal, AppError> {
    if name == LOCAL_USER {
        return Err(AppError::BadInput(format!(
            "the {LOCAL_USER:?} user cannot be removed"
        )));
    }
    let user = named(store, name).await?;
    store.begin_user_removal(&user.id, REMOVED_REASON).await?;
    finish_removal(store, data_dir, &user.id).await
}

/// Try to complete a started removal. Once the user's sandboxes are gone,
/// so is its volume directory (when something is still mounted there, a
/// running server's reaper deletes it later: see [`super::volumes`]).
pub async fn finish_removal(
    store: &Store,
    data_dir: &Path,
    user_id: &str,
) -> Result<Removal, AppError> {
    if store.finish_user_removal(user_id).await? {
        super::volumes::log_outcome(
            user_id,
            super::volumes::remove_user_volumes(data_dir, user_id),
        );
        return Ok(Removal::Done);
    }
    Ok(Removal::Pending(
        store.begin_user_removal(user_id, REMOVED_REASON).await?,
    ))
}

impl App {
    pub async fn add_user(&self, name: &str) -> Result<(UserRow, String), AppError> {
        add_user(&self.store, name, false).await
    }

    /// A user that may do admin actions over HTTP.
    pub async fn add_admin(&self, name: &str) -> Result<(UserRow, String), AppError> {
        add_user(&self.store, name, true).await
    }

    /// Run by the reaper: for every user being removed, stop what still runs
    /// of it (repeating the removal catches a sandbox created meanwhile), tear
    /// its stopping sandboxes down, and delete it once nothing holds resources.
    pub(crate) async fn finish_user_removals(self: &std::sync::Arc<Self>) {
        let Ok(users) = self.store.users_being_removed().await else {
            return;
        };
        for user in users {
            if let Err(e) = self
                .store
                .begin_user_removal(&user.id, REMOVED_REASON)
                .await
            {
                tracing::error!(user = %user.name, error = %e, "could not stop a removed user's sandboxes");
                continue;
            }
            for id in self
                .store
                .live_sandboxes_of(&user.id)
                .await
                .unwrap_or_default()
            {
                self.stop_and_wait(&id, REMOVED_REASON).await;
            }
            match finish_removal(&self.store, &self.cfg.data_dir, &user.id).await {
                Ok(Removal::Done) => tracing::info!(user = %user.name, "user removed"),
                Ok(Removal::Pending(n)) => {
                    tracing::info!(user = %user.name, sandboxes = n, "user removal waits for its sandboxes")
                }
                Err(e) => {
                    tracing::error!(user = %user.name, error = %e, "could not finish removing a user")
                }
            }
        }
    }

    /// Make sure the token-less local user exists.
    pub async fn ensure_local_user(&self) -> Result<UserRow, AppError> {
        if let Some(user) = self.store.user_by_name(LOCAL_USER).await? {
            return Ok(user);
        }
        match self.store.insert_user(LOCAL_USER, LOCAL_USER, None).await {
            Ok(user) => Ok(user),
            Err(StoreError::Conflict(_)) => self
                .store
                .user_by_name(LOCAL_USER)
                .await?
                .ok_or_else(|| AppError::Internal("local user vanished".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Who is calling: the token's owner, or the local user when no token was
    /// given and the front door (`http::guard`) found the caller local: a
    /// loopback peer with no proxy headers, on a loopback-bound listener,
    /// with `local_user` on ([`super::AppConfig::local_user_on`]).
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        local_caller: bool,
    ) -> Result<UserRow, AppError> {
        match token {
            Some(token) => self
                .store
                .user_by_token_hash(&hash_token(token))
                .await?
                .ok_or(AppError::Unauthorized),
            None if local_caller && self.cfg.local_user_on() => self.ensure_local_user().await,
            None => Err(AppError::Unauthorized),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_hashed_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), a);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("alice-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
