//! `airlock`: the one binary. Thin: parses the command line, renders progress,
//! and calls into the library crates.

mod client;
mod doctor;
mod egress;
mod node;
mod progress;
mod vault;

use airlock_drivers::host::RealHost;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::vm::VmRecord;
use airlock_drivers::ImageRef;
use airlock_image::{ImageStore, Manifest};
use airlock_server::config::{Config, DriverKind};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "airlock",
    version,
    about = "Disposable desktops in the browser"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane and its web UI (builds the golden image first if missing).
    Up(UpArgs),
    /// Build, check or describe the golden image.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage users and their API tokens.
    #[command(subcommand)]
    User(UserCommand),
    /// Upstream proxies that sandboxes' traffic leaves through.
    #[command(subcommand)]
    Egress(egress::Command),
    /// The keyring that seals credentials at rest.
    #[command(subcommand)]
    Vault(vault::Command),
    /// Say which drivers this host can run, and why not.
    Doctor,
    /// Run this host as a cluster node (`airlock node --config …`), or list
    /// and drain nodes (`airlock node ls|drain|resume`).
    Node(node::NodeArgs),
    /// Your sandboxes on a running airlock, over its API (see `client::exit` for exit codes).
    Sandbox {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::SandboxCommand,
    },
    /// Sign a CLI in (claude, codex, gemini): prints the page to sign in on, waits.
    Login {
        #[command(flatten)]
        conn: client::Conn,
        #[command(flatten)]
        args: client::LoginArgs,
    },
    /// The credentials your logins captured.
    Credentials {
        #[command(flatten)]
        conn: client::Conn,
        #[command(subcommand)]
        cmd: client::CredentialsCommand,
    },
    /// Your audit trail.
    Audit {
        #[command(flatten)]
        conn: client::Conn,
        #[command(flatten)]
        args: client::AuditArgs,
    },
}

#[derive(Debug, Args)]
pub(crate) struct Common {
    /// TOML config file (see docs/airlock.example.toml).
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "AIRLOCK_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, env = "AIRLOCK_LISTEN")]
    listen: Option<SocketAddr>,
    #[arg(long, env = "AIRLOCK_DRIVER")]
    driver: Option<DriverKind>,
    /// `postgres://…` to use PostgreSQL instead of the embedded SQLite. It may
    /// hold a password: prefer the environment variable (or the config file)
    /// to the flag, which every local user sees in the process list.
    #[arg(long, env = "AIRLOCK_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build the golden image (incremental: unchanged layers are reused).
    Build(ImageArgs),
    /// Check the current image: manifest matches this binary, and the programs run inside it.
    Verify(ImageArgs),
    /// Describe the current image.
    Show(Common),
    /// Remove old builds with their layers, ext4 files and guest kernels; the
    /// current build, builds that sandboxes under the data dir still run from
    /// (any driver), and the builds named are kept.
    Prune {
        #[command(flatten)]
        common: Common,
        /// Build ids to keep as well.
        keep: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ImageArgs {
    #[command(flatten)]
    common: Common,
    /// Also the VM artefacts the qemu and firecracker drivers boot: the image
    /// as ext4 and a guest kernel (cached; the first kernel build takes minutes).
    #[arg(long)]
    vm: bool,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user; prints its API token as the last line.
    Add {
        name: String,
        /// May do admin actions over HTTP: the egress account, other users'
        /// upstreams, egress settings.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List the users: name, admin, state.
    Ls(Common),
    /// A user's API token.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Refuse a user's token (401) until `enable`; its sandboxes and data stay.
    Disable {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Accept a disabled user's token again.
    Enable {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a user: its token stops working, its logins are cancelled, its
    /// credentials and egress rows are deleted, and its sandboxes are ended
    /// (by the running server's reaper, or by the next `airlock up`); the
    /// user itself goes once they have ended.
    Remove {
        name: String,
        /// How long to wait for a running server to end the user's sandboxes.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Give the user a new token, printed as the last line; the old one gets
    /// 401 at once, also on a running server.
    Rotate {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// The image builds that sandboxes under `data_dir` boot from, whichever
/// driver made them: a container's layers, a VM's ext4 and kernel.
fn builds_in_use(data_dir: &Path) -> Vec<String> {
    let containers = NspawnDriver::new(
        NspawnConfig::new(data_dir.join("sandboxes")),
        Arc::new(RealHost),
    );
    let entries = |dir: PathBuf| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    };
    let mut ids: Vec<String> = entries(data_dir.join("sandboxes"))
        .filter_map(|p| {
            let id = p.file_name()?.to_string_lossy().into_owned();
            containers.image_of(&id).ok().map(|image| image.build_id)
        })
        .collect();
    for vms in ["qemu", "firecracker"] {
        ids.extend(entries(data_dir.join(vms)).filter_map(|p| {
            let id = p.file_name()?.to_string_lossy().into_owned();
            VmRecord::read(&p, &id).ok().map(|r| r.build_id)
        }));
    }
    ids
}

pub(crate) fn load_config(common: &Common) -> Result<Config> {
    let mut cfg = match &common.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &common.data_dir {
        cfg.data_dir = dir.clone();
    }
    if let Some(dir) = &common.image_dir {
        cfg.image_dir = Some(dir.clone());
    }
    Ok(cfg)
}

/// The agent binary baked into the image: next to this executable unless
/// `AIRLOCK_AGENT_BIN` says otherwise.
fn agent_bin() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("AIRLOCK_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("could not find the airlock executable")?;
    let path = exe.with_file_name("airlock-agent");
    if !path.exists() {
        bail!("airlock-agent was not found next to {} (build it with `cargo build --release`, or set AIRLOCK_AGENT_BIN)", exe.display());
    }
    Ok(path)
}

fn build_image(store: &ImageStore, agent: &Path) -> Result<Manifest> {
    let progress = progress::Bars::new();
    let opts = airlock_image::BuildOptions::new(agent.to_path_buf());
    let manifest = store
        .build(&opts, &progress)
        .context("building the golden image failed")?;
    Ok(manifest)
}

/// The current image if it matches this binary; built first if there is none.
pub(crate) fn fresh_image(cfg: &Config) -> Result<Manifest> {
    let store = ImageStore::new(cfg.image_dir());
    let agent = agent_bin()?;
    let expected = airlock_image::expected_inputs(&agent)?;
    match store.current()? {
        Some(manifest) => {
            manifest.check_fresh(&expected)?;
            Ok(manifest)
        }
        None => {
            eprintln!(
                "No golden image in {} yet: building it now.",
                cfg.image_dir().display()
            );
            build_image(&store, &agent)
        }
    }
}

async fn up(args: UpArgs) -> Result<()> {
    let mut cfg = load_config(&args.common)?;
    if let Some(listen) = args.listen {
        cfg.listen = listen;
    }
    if let Some(driver) = args.driver {
        cfg.driver = driver;
    }
    if let Some(url) = args.database_url {
        cfg.database_url = Some(url);
    }
    cfg.validate()?;
    if cfg.cluster.enabled {
        let running = airlock_server::cluster::replica::start(&cfg).await?;
        shutdown_on_signals(running.shutdown_handle());
        println!(
            "airlock is up: http://{}/  (a replica; sandboxes run on the cluster's nodes)",
            running.addr
        );
        running.wait().await?;
        return Ok(());
    }
    let manifest = tokio::task::block_in_place(|| fresh_image(&cfg))?;
    let image = ImageRef::of(&manifest);
    if cfg.driver == DriverKind::Nspawn && !cfg.listen.ip().is_loopback() {
        eprintln!(
            "warning: the nspawn driver runs sandboxes as containers that share this host's kernel; \
             that suits one trusted user or development. Users who must not trust each other need a VM driver."
        );
    }
    doctor::warn_density(&cfg);
    let driver = airlock_server::server::driver_for(&cfg, &manifest)?;
    let driver_name = driver.name();
    let running = airlock_server::server::start(&cfg, image, driver).await?;
    shutdown_on_signals(running.shutdown_handle());
    println!(
        "airlock is up: http://{}/  (image {}, driver {driver_name})",
        running.addr, manifest.build_id
    );
    println!("{}", cfg.local_access());
    running.wait().await?;
    Ok(())
}

/// SIGINT or SIGTERM (systemd's stop) ends serving gracefully; the
/// sandboxes keep running for the next start to re-adopt.
pub(crate) fn shutdown_on_signals(shutdown: tokio::sync::watch::Sender<bool>) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        let _ = shutdown.send(true);
    });
}

fn image_command(cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Build(ImageArgs { common, vm }) => {
            let cfg = load_config(&common)?;
            let store = ImageStore::new(cfg.image_dir());
            let mut manifest = build_image(&store, &agent_bin()?)?;
            if vm {
                manifest = store
                    .build_vm(&manifest, &progress::Bars::new())
                    .context("building the VM artefacts failed")?;
            }
            println!("golden image {} is built", manifest.build_id);
        }
        ImageCommand::Verify(ImageArgs { common, vm }) => {
            let cfg = load_config(&common)?;
            let store = ImageStore::new(cfg.image_dir());
            let Some(manifest) = store.current()? else {
                bail!("{}", no_image_yet(&store));
            };
            manifest.check_fresh(&airlock_image::expected_inputs(&agent_bin()?)?)?;
            let report = store.verify(&manifest)?;
            for check in &report.checks {
                println!(
                    "{} {:<28} {}",
                    if check.ok { "ok  " } else { "FAIL" },
                    check.name,
                    check.detail
                );
            }
            if !report.ok() {
                bail!("golden image {} failed verification", manifest.build_id);
            }
            if vm {
                let checks = airlock_image::vm::verify(&manifest)?;
                for check in &checks {
                    let mark = if check.ok { "ok  " } else { "FAIL" };
                    println!("{mark} {:<28} {}", check.name, check.detail);
                }
                if checks.iter().any(|c| !c.ok) {
                    bail!(
                        "the VM artefacts of {} failed verification",
                        manifest.build_id
                    );
                }
            }
        }
        ImageCommand::Prune { common, mut keep } => {
            let cfg = load_config(&common)?;
            let store = ImageStore::new(cfg.image_dir());
            if !store.exists()? {
                println!("nothing to prune: {}", no_image_yet(&store));
                return Ok(());
            }
            keep.extend(builds_in_use(&cfg.data_dir));
            for path in store.prune(&keep)? {
                println!("removed {}", path.display());
            }
        }
        ImageCommand::Show(common) => {
            let cfg = load_config(&common)?;
            let store = ImageStore::new(cfg.image_dir());
            match store.current()? {
                Some(manifest) => println!("{}", serde_json_pretty(&manifest)?),
                None => println!("{}", no_image_yet(&store)),
            }
        }
    }
    Ok(())
}

/// What to say where an image directory holds no build (or is not made yet).
fn no_image_yet(store: &ImageStore) -> String {
    format!(
        "there is no golden image in {} yet; `airlock image build` makes one (and `airlock up` does on its first start)",
        store.dir().display()
    )
}

fn serde_json_pretty(manifest: &Manifest) -> Result<String> {
    serde_json::to_string_pretty(manifest).context("could not print the manifest")
}

pub(crate) async fn open_store(common: &Common) -> Result<(Config, airlock_server::store::Store)> {
    let cfg = load_config(common)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create {}", cfg.data_dir.display()))?;
    let store = airlock_server::store::Store::open(&cfg.database_url()).await?;
    Ok((cfg, store))
}

async fn user_command(cmd: UserCommand) -> Result<()> {
    use airlock_server::app::auth;
    match cmd {
        UserCommand::Add {
            name,
            admin,
            common,
        } => {
            let (_, store) = open_store(&common).await?;
            let (user, token) = auth::add_user(&store, &name, admin).await?;
            eprintln!(
                "{} {} added (id {}); its API token, shown only now:",
                if admin { "admin" } else { "user" },
                user.name,
                user.id
            );
            println!("{token}");
        }
        UserCommand::Ls(common) => {
            let (_, store) = open_store(&common).await?;
            println!("{:<24} {:<6} {:<9} CREATED", "NAME", "ADMIN", "STATE");
            for u in auth::users(&store).await? {
                let state = if u.removing {
                    "removing"
                } else if u.disabled {
                    "disabled"
                } else {
                    "active"
                };
                let created = time::OffsetDateTime::from_unix_timestamp(u.created_at / 1000)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                let admin = if u.admin { "yes" } else { "no" };
                println!("{:<24} {admin:<6} {state:<9} {created}", u.name);
            }
        }
        UserCommand::Token(TokenCommand::Rotate { name, common }) => {
            let (_, store) = open_store(&common).await?;
            let token = auth::rotate_token(&store, &name).await?;
            eprintln!("{name} has a new API token (the old one no longer works), shown only now:");
            println!("{token}");
        }
        UserCommand::Disable { name, common } => {
            let (_, store) = open_store(&common).await?;
            auth::set_disabled(&store, &name, true).await?;
            eprintln!(
                "user {name} is disabled: its token gets 401 until `airlock user enable {name}`"
            );
        }
        UserCommand::Enable { name, common } => {
            let (_, store) = open_store(&common).await?;
            auth::set_disabled(&store, &name, false).await?;
            eprintln!("user {name} is enabled");
        }
        UserCommand::Remove {
            name,
            wait_s,
            common,
        } => {
            let (cfg, store) = open_store(&common).await?;
            let n = match auth::remove_user(&store, &cfg.data_dir, &name).await? {
                auth::Removal::Done => {
                    eprintln!(
                        "user {name} removed, with its logins, credentials, egress settings and volumes"
                    );
                    return Ok(());
                }
                auth::Removal::Pending(n) => n,
            };
            let Some(server) = airlock_server::instance::holder(&cfg.data_dir)? else {
                eprintln!(
                    "user {name} is disabled, its logins cancelled and its credentials and egress \
                     settings deleted; {n} of its sandboxes still hold resources and are marked to \
                     stop: the next `airlock up` ends them, then removes the user"
                );
                return Ok(());
            };
            eprintln!(
                "user {name} is disabled; the running server{} is ending its {n} sandbox(es)…",
                server
                    .pid
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default()
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_s);
            while std::time::Instant::now() < deadline {
                if store.user_by_name(&name).await?.is_none() {
                    eprintln!(
                        "user {name} removed, with its logins, credentials, egress settings and volumes"
                    );
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            bail!(
                "user {name} is disabled and its sandboxes are stopping, but they did not end within \
                 {wait_s} s; the server removes the user once they have (see `airlock user ls`)"
            );
        }
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Image(cmd) => tokio::task::block_in_place(|| image_command(cmd)),
            Command::User(cmd) => user_command(cmd).await,
            Command::Egress(cmd) => egress::run(cmd).await,
            Command::Vault(cmd) => vault::run(cmd).await,
            Command::Doctor => doctor::run().await,
            Command::Node(args) => node::run(args).await,
            Command::Sandbox { conn, cmd } => client::run_sandbox(conn, cmd).await,
            Command::Login { conn, args } => client::run_login(conn, args).await,
            Command::Credentials { conn, cmd } => client::run_credentials(conn, cmd).await,
            Command::Audit { conn, args } => client::run_audit(conn, args).await,
        }
    });
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
