//! `airlock egress …`: upstream proxies for users' sandboxes (owned by the egress work).

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set an explicit upstream proxy for one user: http://USER:PASS@HOST:PORT
    User { name: String, url: String },
}

pub async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::User { .. } => bail!("egress settings are not part of this build yet"),
    }
}
