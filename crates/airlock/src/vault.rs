//! `airlock vault …`: the keyring that seals secrets at rest (credentials,
//! the egress account's password, users' upstream passwords).
//!
//! `rotate` with a running server, in this order, so the server never seals
//! with a key that is about to go and never lacks one that a record names:
//! 1. add a key to the keyring file and make it current (old keys stay);
//! 2. SIGHUP the server (its pid is in `<data_dir>/airlock.lock`) and wait
//!    until it writes back that it holds the new keyring;
//! 3. re-seal every sealed value in one transaction; retire the keys no
//!    value names any more;
//! 4. SIGHUP again so the server drops the retired keys too.
//!
//! Without a server, the command holds the data dir's lock throughout, so
//! none starts half-way. It holds `<data_dir>/vault.lock` exclusively from
//! loading the keyring to retiring keys, so an `airlock egress` command (which
//! holds it shared while it seals) cannot write a row under a retired key.

use crate::{load_config, Common};
use airlock_server::app::keyring;
use airlock_server::instance::{self, Probe};
use airlock_server::vault::{KeyringLock, Vault};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::Path;
use std::time::Duration;

/// How long a running server gets to reload its keyring.
const RELOAD_WITHIN: Duration = Duration::from_secs(15);

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show which keys the keyring holds, which one seals new records, and
    /// which keys stored records name.
    Status(Common),
    /// Add a new key, re-seal every stored secret under it (in one
    /// transaction), then retire the old keys that no record names. A running
    /// server is told to reload its keyring (SIGHUP) and waited for.
    Rotate(Common),
}

async fn reload(dir: &Path, pid: u32, vault: &Vault) -> Result<()> {
    instance::signal_reload(pid)
        .with_context(|| format!("could not signal the running server (pid {pid})"))?;
    if !instance::wait_for_keys(dir, vault.current_key_id(), &vault.key_ids(), RELOAD_WITHIN).await
    {
        bail!(
            "the running server (pid {pid}) did not report the new keyring within {}s; its log says why",
            RELOAD_WITHIN.as_secs()
        );
    }
    Ok(())
}

pub async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Status(common) => {
            let cfg = load_config(&common)?;
            let vault = Vault::load(&cfg.data_dir)?;
            println!("current key: {}", vault.current_key_id());
            println!("keys: {}", vault.key_ids().join(", "));
            let store = airlock_server::store::Store::open(&cfg.database_url()).await?;
            let used = keyring::keys_in_use(&store).await?;
            println!(
                "named by stored records: {}",
                used.into_iter().collect::<Vec<_>>().join(", ")
            );
            if let Some(h) = instance::holder(&cfg.data_dir)? {
                println!(
                    "running server: pid {}, holding {} (current {})",
                    h.pid.map(|p| p.to_string()).unwrap_or_default(),
                    h.vault_keys.unwrap_or_default(),
                    h.vault_current.unwrap_or_default()
                );
            }
        }
        Command::Rotate(common) => {
            let cfg = load_config(&common)?;
            let dir = cfg.data_dir.clone();
            let store = airlock_server::store::Store::open(&cfg.database_url()).await?;
            // Held until the end when no server runs, so none starts meanwhile.
            let (_lock, server) = match instance::probe(&dir)? {
                Probe::Free(lock) => (Some(lock), None),
                Probe::Held(h) => {
                    let pid = h.pid.context(
                        "a server holds the data dir's lock but did not write its pid; stop it and rotate again",
                    )?;
                    (None, Some(pid))
                }
            };
            // No `egress` command seals with a key between our loading the
            // keyring and retiring its old keys (they hold this shared).
            let _keyring = KeyringLock::exclusive(&dir)?;
            let mut vault = Vault::load(&dir)?;
            let new = vault.rotate().context("adding a key")?;
            println!("new key: {new}");
            if let Some(pid) = server {
                reload(&dir, pid, &vault).await.context(
                    "nothing was re-sealed and no key was retired (the new key is current on disk)",
                )?;
                println!("the running server (pid {pid}) seals with {new} now");
            }
            let done = keyring::reseal_and_retire(&store, &mut vault)
                .await
                .context("re-sealing the stored secrets (the old keys stay until this works)")?;
            println!("re-sealed {} stored secret(s)", done.resealed);
            if !done.kept.is_empty() {
                println!(
                    "kept (still named by a stored record): {}",
                    done.kept.join(", ")
                );
            }
            if done.retired.is_empty() {
                println!("retired: none");
            } else {
                println!("retired: {}", done.retired.join(", "));
                if let Some(pid) = server {
                    reload(&dir, pid, &vault).await.context(
                        "the old keys are gone from disk, but the server still holds them",
                    )?;
                }
            }
        }
    }
    Ok(())
}
