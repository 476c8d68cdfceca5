//! Users and API tokens. Tokens are random, shown once, and stored only as
//! SHA-256 digests.

use super::{App, AppError};
use crate::store::{Store, StoreError, UserRow};
use sha2::{Digest, Sha256};

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

/// Create a user; returns the user and its API token (shown only now).
pub async fn add_user(store: &Store, name: &str) -> Result<(UserRow, String), AppError> {
    if !valid_name(name) {
        return Err(AppError::BadInput(format!(
            "user name {name:?} must be 1–64 characters of letters, digits, '-', '_' or '.'"
        )));
    }
    let token = new_token();
    let id = hex::encode(rand::random::<[u8; 8]>());
    match store
        .insert_user(&id, name, Some(&hash_token(&token)))
        .await
    {
        Ok(user) => Ok((user, token)),
        Err(StoreError::Conflict(_)) => {
            Err(AppError::Conflict(format!("user {name:?} already exists")))
        }
        Err(e) => Err(e.into()),
    }
}

impl App {
    pub async fn add_user(&self, name: &str) -> Result<(UserRow, String), AppError> {
        add_user(&self.store, name).await
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
