//! `airlock vault …`: the keyring that seals credentials at rest.

use crate::{load_config, Common};
use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show which keys the keyring holds and which one seals new records.
    Status(Common),
    /// Add a new key, re-seal every stored credential under it, then retire
    /// the old keys (only once every record was re-sealed).
    Rotate(Common),
}

pub async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Status(common) => {
            let cfg = load_config(&common)?;
            let vault = airlock_server::vault::Vault::load(&cfg.data_dir)?;
            println!("current key: {}", vault.current_key_id());
            println!("keys: {}", vault.key_ids().join(", "));
        }
        Command::Rotate(common) => {
            let cfg = load_config(&common)?;
            let mut vault = airlock_server::vault::Vault::load(&cfg.data_dir)?;
            let store = airlock_server::store::Store::open(&cfg.database_url()).await?;
            let new = vault.rotate().context("adding a key")?;
            println!("new key: {new}");
            let n = airlock_server::app::logins::reseal_all(&store, &vault)
                .await
                .context(
                    "re-sealing the stored credentials (the old keys stay until this works)",
                )?;
            println!("re-sealed {n} credential record(s)");
            let old = vault.retire_old_keys()?;
            println!("retired: {}", old.join(", "));
        }
    }
    Ok(())
}
