//! `airlock egress …`: upstream proxies for users' sandboxes. Works on the
//! database directly (like `airlock user add`); a running control plane picks
//! changes up within seconds. Passwords are sealed with the vault's key and
//! never printed.

use crate::{load_config, Common};
use airlock_server::app::egress as eg;
#[cfg(test)]
use airlock_server::egress::ExposeSecret;
use airlock_server::egress::SecretString;
use airlock_server::vault::KeyringLock;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set an explicit upstream proxy for one user, http://USER:PASS@HOST:PORT,
    /// read from stdin (URL `-`) or from --url-file, never from the command
    /// line (any local user sees argv); without either, show the user's upstream.
    User {
        name: String,
        /// `-`: read the URL from the first line of stdin.
        url: Option<String>,
        /// Read the URL from the first line of this file.
        #[arg(long, conflicts_with = "url")]
        url_file: Option<std::path::PathBuf>,
        /// Remove the user's explicit upstream (the account applies again).
        #[arg(long, conflicts_with_all = ["url", "url_file"])]
        clear: bool,
        #[command(flatten)]
        common: Common,
    },
    /// The provider account: host, credentials, and the port range users get ports from.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Show or change the echo URL (exit-IP check) and the upstream timeout.
    Settings {
        /// An http:// URL that answers with the caller's address; "" clears it.
        #[arg(long)]
        echo_url: Option<String>,
        /// Seconds to wait for the upstream (1–120).
        #[arg(long)]
        upstream_timeout_s: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Set the account. The password comes from AIRLOCK_EGRESS_PASSWORD or,
    /// with --password-stdin, the first line of stdin (never the command line).
    Set(AccountArgs),
    Show(Common),
    /// Remove the account; every user's port is released.
    Clear(Common),
}

#[derive(Debug, Args)]
pub struct AccountArgs {
    #[arg(long)]
    host: String,
    #[arg(long)]
    username: String,
    /// A range such as 10001-10999.
    #[arg(long)]
    ports: String,
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    common: Common,
}

/// The store, and the keyring with a shared hold on it: a `vault rotate`
/// cannot retire the key this command seals with until the hold is dropped,
/// after the sealed row is written (keep it for as long as the vault is used).
async fn open(
    common: &Common,
) -> Result<(
    airlock_server::store::Store,
    airlock_server::vault::Vault,
    KeyringLock,
)> {
    let cfg = load_config(common)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create {}", cfg.data_dir.display()))?;
    let store = airlock_server::store::Store::open(&cfg.database_url()).await?;
    let hold = KeyringLock::shared(&cfg.data_dir)?;
    let vault = airlock_server::vault::Vault::load(&cfg.data_dir)?;
    Ok((store, vault, hold))
}

fn stdin_line() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("could not read stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// The upstream URL from stdin (`-`) or a file. A URL given on the command
/// line is refused when it holds a password: argv is public on this host.
fn upstream_url(
    arg: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Option<SecretString>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read {}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim().to_owned();
        return Ok(Some(SecretString::from(line)));
    }
    match arg {
        None => Ok(None),
        Some(dash) if dash == "-" => Ok(Some(SecretString::from(stdin_line()?))),
        Some(url) => {
            if has_password(&url) {
                bail!(
                    "the upstream URL holds a password, and a command line is visible to every \
                     process on this host: give it on stdin (`airlock egress user NAME - < file`, \
                     or pipe it in) or with `--url-file FILE` — and change that password, since it \
                     was just exposed"
                );
            }
            Ok(Some(SecretString::from(url)))
        }
    }
}

/// Whether a URL carries `user:password@` (or looks as if it might: text
/// that does not parse but has an `@` is treated as holding one).
fn has_password(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => u.password().is_some(),
        Err(_) => url.contains('@'),
    }
}

fn print_user(v: &eg::UserEgressView) {
    match &v.upstream {
        Some(up) => println!("{}: {} ({})", v.user, up, v.source),
        None => println!(
            "{}: no upstream; its sandboxes reach nothing outside",
            v.user
        ),
    }
}

pub async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::User {
            name,
            url,
            url_file,
            clear,
            common,
        } => {
            let url = upstream_url(url, url_file.as_deref())?;
            let (store, vault, _hold) = open(&common).await?;
            if clear {
                let had = eg::clear_user_upstream(&store, &name).await?;
                if !had {
                    eprintln!("{name} had no explicit upstream");
                }
            } else if let Some(url) = url {
                eg::set_user_upstream(&store, &vault, &name, &url).await?;
            }
            print_user(&eg::user_egress(&store, &name).await?);
        }
        Command::Account(AccountCommand::Set(a)) => {
            let (store, vault, _hold) = open(&a.common).await?;
            let (min, max) = a
                .ports
                .split_once('-')
                .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)))
                .context("--ports must be a range such as 10001-10999")?;
            let password = if a.password_stdin {
                stdin_line()?
            } else {
                match std::env::var("AIRLOCK_EGRESS_PASSWORD") {
                    Ok(p) => p,
                    Err(_) => bail!(
                        "give the password in AIRLOCK_EGRESS_PASSWORD or with --password-stdin"
                    ),
                }
            };
            let input = eg::AccountInput {
                host: a.host,
                username: a.username,
                password: SecretString::from(password),
                port_min: min,
                port_max: max,
            };
            let view = eg::set_account(&store, &vault, &input).await?;
            println!(
                "provider account: {} ({} ports assigned)",
                view.masked, view.ports_assigned
            );
        }
        Command::Account(AccountCommand::Show(common)) => {
            let (store, _, _) = open(&common).await?;
            match eg::account(&store).await? {
                Some(view) => println!(
                    "provider account: {} ({} ports assigned)",
                    view.masked, view.ports_assigned
                ),
                None => println!("no provider account is set"),
            }
        }
        Command::Account(AccountCommand::Clear(common)) => {
            let (store, _, _) = open(&common).await?;
            if eg::clear_account(&store).await? {
                println!("provider account removed; users' ports released");
            } else {
                println!("no provider account was set");
            }
        }
        Command::Settings {
            echo_url,
            upstream_timeout_s,
            common,
        } => {
            let (store, _, _) = open(&common).await?;
            let mut s = eg::settings(&store).await?;
            if echo_url.is_some() || upstream_timeout_s.is_some() {
                if let Some(url) = echo_url {
                    s.echo_url = (!url.is_empty()).then_some(url);
                }
                if upstream_timeout_s.is_some() {
                    s.upstream_timeout_s = upstream_timeout_s;
                }
                s = eg::set_settings(&store, &s).await?;
            }
            println!(
                "echo URL: {}\nupstream timeout: {}s",
                s.echo_url.as_deref().unwrap_or("(none)"),
                s.upstream_timeout_s.unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_on_the_command_line_is_refused() {
        let err = upstream_url(Some("http://u:hunter2@h:1".into()), None).expect_err("refused");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("--url-file") && !msg.contains("hunter2"),
            "{msg}"
        );
        assert!(has_password("http://u:p@h:1"));
        assert!(!has_password("http://u@h:1"));
        assert!(has_password("not a url but u:p@h"));
        // A file works, and only its first line is read.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("url");
        std::fs::write(&file, "http://u:p@h:1\nignored\n").expect("write");
        let url = upstream_url(None, Some(&file))
            .expect("file")
            .expect("some");
        assert_eq!(url.expose_secret(), "http://u:p@h:1");
    }
}
