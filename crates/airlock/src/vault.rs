//! `airlock vault …`: the keyring that seals credentials at rest.

use crate::{load_config, Common};
use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show which keys the keyring holds and which one seals new records.
    Status(Common),
}

pub async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Status(common) => {
            let cfg = load_config(&common)?;
            let vault = airlock_server::vault::Vault::load(&cfg.data_dir)?;
            println!("current key: {}", vault.current_key_id());
            println!("keys: {}", vault.key_ids().join(", "));
        }
    }
    Ok(())
}
