//! Rotating the vault's key over everything it sealed, and a running control
//! plane picking the new keyring up.
//!
//! `airlock vault rotate` (see `crates/airlock/src/vault.rs` for the order
//! with a running server):
//! 1. [`Vault::rotate`] adds a key and makes it current (old keys stay);
//! 2. [`reseal_and_retire`] re-seals every sealed value the store holds (see
//!    `store::sealed`) under it, in one transaction, then retires each old key
//!    that no stored value names any more.
//!
//! A value that does not open stops the run before anything is written, so a
//! key is never retired over a value it alone opens.

use super::{App, AppError};
use crate::store::{SealedRef, Store};
use crate::vault::{Aad, Vault, VaultError};
use secrecy::ExposeSecret;
use std::collections::BTreeSet;

/// What a sealed value is bound to (as the code that sealed it chose).
pub fn aad_of(at: &SealedRef) -> Aad {
    match at {
        SealedRef::Credential {
            owner_id,
            provider,
            login_id,
        } => super::logins::aad(owner_id, provider, login_id),
        SealedRef::EgressAccount => super::egress::account_aad(),
        SealedRef::EgressUpstream { user_id } => super::egress::upstream_aad(user_id),
    }
}

fn describe(at: &SealedRef) -> String {
    match at {
        SealedRef::Credential {
            owner_id, provider, ..
        } => format!("the {provider} credentials of user id {owner_id}"),
        SealedRef::EgressAccount => "the egress account's password".into(),
        SealedRef::EgressUpstream { user_id } => {
            format!("the upstream password of user id {user_id}")
        }
    }
}

/// The outcome of one re-sealing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resealed {
    /// Values re-sealed under the current key.
    pub resealed: usize,
    /// Keys dropped from the keyring.
    pub retired: Vec<String>,
    /// Old keys kept because a stored value still names them.
    pub kept: Vec<String>,
}

/// The key ids that stored values name.
pub async fn keys_in_use(store: &Store) -> Result<BTreeSet<String>, AppError> {
    Ok(store
        .sealed_values()
        .await?
        .iter()
        .filter_map(|v| Vault::key_of(&v.sealed).map(str::to_owned))
        .collect())
}

/// Re-seal every stored value under the vault's current key in one
/// transaction, then retire the keys no stored value names.
pub async fn reseal_and_retire(store: &Store, vault: &mut Vault) -> Result<Resealed, AppError> {
    let current = vault.current_key_id().to_owned();
    let sealer: &Vault = vault;
    let resealed = store
        .reseal_all(&current, |v| -> Result<Option<String>, AppError> {
            if Vault::key_of(&v.sealed) == Some(current.as_str()) {
                return Ok(None);
            }
            let aad = aad_of(&v.at);
            let plain = sealer.open(&v.sealed, &aad).map_err(|e| {
                AppError::Internal(format!(
                    "{} does not open ({e}); nothing was re-sealed and no key was retired",
                    describe(&v.at)
                ))
            })?;
            Ok(Some(sealer.seal(plain.expose_secret(), &aad)))
        })
        .await??;
    let in_use = keys_in_use(store).await?;
    let retired = vault.retire_unused(&in_use).map_err(vault_error)?;
    let kept = in_use.into_iter().filter(|k| *k != current).collect();
    Ok(Resealed {
        resealed,
        retired,
        kept,
    })
}

fn vault_error(e: VaultError) -> AppError {
    AppError::Internal(format!("the keyring: {e}"))
}

impl App {
    /// Load the keyring from the data dir again (after `airlock vault rotate`
    /// changed it): new records are sealed with its current key from now on.
    /// The old keyring stays when the new one does not load, or lacks a key
    /// that a stored value names.
    pub async fn reload_vault(&self) -> Result<(), AppError> {
        let fresh = Vault::load(&self.cfg.data_dir).map_err(vault_error)?;
        let missing: Vec<String> = keys_in_use(&self.store)
            .await?
            .into_iter()
            .filter(|k| !fresh.key_ids().contains(k))
            .collect();
        if !missing.is_empty() {
            return Err(AppError::Internal(format!(
                "the keyring on disk lacks key(s) {} that stored values name; keeping the loaded one",
                missing.join(", ")
            )));
        }
        tracing::info!(
            current = fresh.current_key_id(),
            keys = fresh.key_ids().join(","),
            "vault keyring reloaded"
        );
        *self.vault.write().await = fresh;
        Ok(())
    }
}
