//! The HTTP client commands: `airlock sandbox …`, `airlock login PROVIDER`,
//! `airlock credentials …`, `airlock audit`. They talk to a running airlock
//! over its public API (`/api/v1`) with a token, and exit with codes scripts
//! can rely on ([`exit`]).
//!
//! Where the server is and who we are: `--url`/`AIRLOCK_URL` and
//! `--token`/`AIRLOCK_TOKEN`, else the config file
//! (`$XDG_CONFIG_HOME/airlock/client.json`, `{"url": "…", "token": "…"}`),
//! else `http://127.0.0.1:4000` without a token (the local user, when the
//! server allows one).

mod api;
mod commands;
mod io;
mod record;

pub use commands::{run_audit, run_credentials, run_login, run_sandbox};

use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Exit codes: `0` success; the remote process's own code for `exec` and
/// `shell` (128 + N when signal N ended it); for the client's own failures:
pub mod exit {
    /// Something else went wrong.
    pub const FAILURE: i32 = 1;
    /// The request was refused as bad (400, 413).
    pub const BAD_REQUEST: i32 = 65;
    /// No such sandbox, process, file or credential (404).
    pub const NOT_FOUND: i32 = 66;
    /// The server is unreachable or failing (5xx, 502 from a guest).
    pub const UNAVAILABLE: i32 = 69;
    /// Try again later: the sandbox is not ready, a quota or limit (409, 429).
    pub const TEMPORARY: i32 = 75;
    /// The token is missing, wrong or not allowed (401, 403), or a path leads
    /// out of the sandbox user's files (403).
    pub const NO_PERMISSION: i32 = 77;
    /// The client's configuration is unusable (a bad URL or config file).
    pub const CONFIG: i32 = 78;
    /// A wait ran out (`--wait-s`).
    pub const TIMEOUT: i32 = 124;
}

#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// The airlock server (default: the config file's, else http://127.0.0.1:4000).
    #[arg(long, env = "AIRLOCK_URL", global = true)]
    pub url: Option<String>,
    /// API token (default: the config file's; none for the local user).
    #[arg(long, env = "AIRLOCK_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Client config file (JSON: {"url": …, "token": …}).
    #[arg(long, env = "AIRLOCK_CLIENT_CONFIG", global = true)]
    pub client_config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and wait until it is ready; prints its id.
    Create {
        /// `workspace` (the long-lived one) or `browser`.
        #[arg(long, default_value = "workspace")]
        kind: String,
        /// A workspace's name (default `default`): one live workspace per
        /// name, whose home is kept under that name across rebuilds.
        #[arg(long)]
        name: Option<String>,
        /// Return at once, without waiting for ready.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 300)]
        wait_s: u64,
    },
    /// List your sandboxes.
    Ls {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Your named workspaces, the sandbox running each, and the
    /// providers whose credentials each holds.
    Workspaces {
        #[arg(long)]
        json: bool,
    },
    /// End a sandbox.
    Rm { id: String },
    /// Run a command, streaming its output; exits with its exit code.
    Exec {
        id: String,
        /// Pass this process's stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Environment for the command, NAME=VALUE.
        #[arg(short, long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Working directory (relative to the home).
        #[arg(long)]
        cwd: Option<String>,
        /// Kill it after this many seconds.
        #[arg(long)]
        timeout_s: Option<u64>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// An interactive terminal (bash on a PTY, or the command given).
    Shell {
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Copy a file: `cp LOCAL ID:PATH` up, `cp ID:PATH LOCAL` down (a
    /// directory comes down as a .tar; `-` is stdout).
    Cp { from: String, to: String },
    /// A process's output: what the backlog holds, then (with -f) as it comes.
    Logs {
        id: String,
        /// The process (see `ps`); the newest when omitted.
        pid: Option<u32>,
        #[arg(short, long)]
        follow: bool,
    },
    /// List the sandbox's processes.
    Ps { id: String },
    /// Make a link that shows the sandbox's desktop to someone without an
    /// account: read-only unless --input. Prints the link (shown only now).
    Share {
        id: String,
        /// How long the link works: 90s, 30m, 1h … at most 24h.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Let the link's holder type, click and paste too.
        #[arg(long)]
        input: bool,
    },
    /// The sandbox's live share links (never their secrets).
    Shares {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Grant (`on`) or take back (`off`) input on a share link; open
    /// viewers follow within a second.
    ShareInput {
        id: String,
        share: String,
        #[arg(value_parser = ["on", "off"])]
        input: String,
    },
    /// Revoke a share link; its open viewers close.
    Unshare { id: String, share: String },
    /// Screen recordings: `start`, `stop`, `ls`, `get RID -o FILE`.
    Record {
        id: String,
        #[command(subcommand)]
        cmd: record::RecordCommand,
    },
    /// Kill a process (SIGKILL, or --signal).
    Kill {
        id: String,
        pid: u32,
        #[arg(long)]
        signal: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// The credentials you hold (no secrets).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Forget a provider's credentials (the files leave every workspace).
    Rm { provider: String },
    /// Write the stored credentials into another of your workspaces
    /// (it must be ready).
    Deliver {
        provider: String,
        /// The workspace's name.
        #[arg(long, default_value = "default")]
        workspace: String,
    },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// `claude`, `codex` or `gemini`.
    pub provider: String,
    /// The workspace to deliver to, by name (made if it does not run).
    #[arg(long)]
    pub workspace: Option<String>,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub wait_s: u64,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
}
