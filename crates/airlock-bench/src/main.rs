//! `airlock-bench`: measures the parts of airlock that set how it feels and
//! what it costs — golden image builds, sandbox start and memory, the viewer
//! relay, key press to pixel — a soak run, and churn (create, exec, delete
//! over and over, then a leak check). Every subcommand prints tables
//! (Markdown) on stdout and its progress on stderr. Figures and how they were
//! taken: docs/performance.md.

mod churn;
mod cluster;
mod fuzz;
mod hop;
mod image;
mod keypress;
mod leaks;
mod logins;
mod pool;
mod processes;
mod relay;
mod rfbc;
mod sandbox;
mod sandboxes;
mod shaped;
mod soak;
mod stats;
mod viewer;
mod wire;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "airlock-bench",
    about = "Benchmarks and a soak run for airlock"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Golden image build time: cold, one changed input, nothing changed.
    Image {
        /// The built image whose base and node layers the changed-input case links in.
        #[arg(long, env = "AIRLOCK_IMAGE_DIR")]
        image_dir: PathBuf,
        /// The agent binary to bake in.
        #[arg(long, env = "AIRLOCK_AGENT_BIN")]
        agent: PathBuf,
        /// Skip the cold build (about 100 s and a Debian mirror).
        #[arg(long)]
        no_cold: bool,
    },
    /// Viewer relay vs direct TCP vs websockify: latency and throughput.
    Relay {
        /// Echo round trips per path and repeat.
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
        /// MiB streamed per throughput run.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Runs per path, interleaved.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Sandbox create → ready, idle memory, and how many fit on this machine.
    Sandboxes {
        /// Sandboxes created one after another and kept running together.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Seconds to let them idle before measuring memory.
        #[arg(long, default_value_t = 30)]
        settle: u64,
    },
    /// Key press → changed pixel: sandbox through the relay vs bare Xvnc + Chromium.
    Keypress {
        #[arg(long, default_value_t = 100)]
        presses: usize,
        /// Milliseconds between presses.
        #[arg(long, default_value_t = 150)]
        gap_ms: u64,
    },
    /// Logins under load: N at once (the real CLIs), time to the sign-in
    /// page, failures, and the time in each step.
    Logins {
        #[arg(long, default_value_t = 10)]
        concurrent: usize,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// Processes through the API: start latency (API → first byte), output
    /// throughput, and the PTY's keystroke round trip.
    Processes {
        /// Processes started for the latency figure.
        #[arg(long, default_value_t = 30)]
        starts: usize,
        /// MiB per throughput run.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Keystrokes for the round-trip figure.
        #[arg(long, default_value_t = 200)]
        keys: usize,
    },
    /// One sandbox, one viewer, a key press a second; memory and disconnects.
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// Input to photon through the viewer in headless Chromium: WebRTC vs noVNC
    /// (run from the repository root; needs `npm ci --prefix tests/e2e`).
    Viewer(viewer::Options),
    /// The fuzz targets (airlock-fuzz), each for its share of the time:
    /// executions per second and anything found.
    Fuzz {
        /// Minutes in all, shared between the targets.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Only this target (upstream_url, rfb, stream_messages, agent_json, login_screen).
        #[arg(long)]
        target: Option<String>,
        /// PRNG seed (a run is repeatable from its seed).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the inputs of findings are written.
        #[arg(long, default_value = "fuzz-findings")]
        out: PathBuf,
    },
    /// Create → ready → exec → delete → stopped, over and over, against a
    /// running control plane; then what was left on the host (must be nothing).
    /// The API token comes from AIRLOCK_TOKEN (none: the loopback user `local`).
    Churn(ChurnArgs),
    /// The replica → node hop: a guest port directly vs through a remote
    /// node's tunnel (latency, set-up, throughput), all on loopback.
    Hop(hop::Options),
    /// Warm pools: claim → ready at a steady rate and in bursts, hit rate,
    /// and the time to fill the pool again.
    Pool(pool::Options),
    /// Many hosts: placement decision time, create → ready through a
    /// replica vs a single host, many creates over three nodes, and how
    /// long a killed node takes to be noticed (real `airlock node` and
    /// `airlock up` processes and a PostgreSQL of its own; root).
    Cluster(cluster::Options),
    /// The quick ones: relay, sandboxes, keypress, and image without the cold build.
    All {
        #[arg(long, env = "AIRLOCK_IMAGE_DIR")]
        image_dir: PathBuf,
        #[arg(long, env = "AIRLOCK_AGENT_BIN")]
        agent: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ChurnArgs {
    #[arg(long, default_value_t = 100)]
    cycles: usize,
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Sandbox kind: browser or workspace.
    #[arg(long, default_value = "browser")]
    kind: String,
    /// The control plane's config file: its data dir, address pool and store
    /// are where the leak check looks, its listen address is the API.
    #[arg(long, env = "AIRLOCK_CONFIG")]
    config: Option<PathBuf>,
    /// The API (default: the config's listen address).
    #[arg(long)]
    url: Option<String>,
    #[arg(long, env = "AIRLOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds a sandbox may take to become ready.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
}

async fn churn_command(args: ChurnArgs) -> Result<()> {
    let mut cfg = match &args.config {
        Some(path) => airlock_server::config::Config::from_file(path)?,
        None => airlock_server::config::Config::default(),
    };
    if let Some(dir) = args.data_dir {
        cfg.data_dir = dir;
    }
    let url = args.url.unwrap_or_else(|| format!("http://{}", cfg.listen));
    let needed = u32::try_from(args.parallel).unwrap_or(u32::MAX);
    if cfg.quota.max_sandboxes < needed || cfg.quota.creates_per_minute < 60 {
        eprintln!(
            "churn: [quota] allows {} live sandboxes and {} creates a minute per user; \
             refused creates are retried after Retry-After, which slows the run. Raise \
             max_sandboxes and creates_per_minute under [quota] in the server's config.",
            cfg.quota.max_sandboxes, cfg.quota.creates_per_minute
        );
    }
    let mut scope = leaks::Scope::new(&cfg.data_dir, &cfg.address_pool);
    scope.database_url = cfg.database_url.clone();
    let before = leaks::check(&scope).await;
    if !before.is_empty() {
        eprintln!(
            "churn: {} things were left before the run (not counted):",
            before.len()
        );
        for l in &before {
            eprintln!("  {l}");
        }
    }
    let api = churn::Api::new(&url, std::env::var("AIRLOCK_TOKEN").ok());
    let opts = churn::Options {
        cycles: args.cycles,
        parallel: args.parallel,
        kind: args.kind,
        boot_timeout: Duration::from_secs(args.boot_timeout),
        stop_timeout: Duration::from_secs(60),
    };
    let seen = std::sync::Mutex::new(scope);
    let out = churn::run(&api, &opts, &|id| {
        seen.lock().expect("scope").remember(id);
    })
    .await;
    let mut scope = seen.into_inner().expect("scope");
    scope.ids.extend(out.ids.iter().cloned());
    let found: Vec<_> = leaks::settle(&scope, Duration::from_secs(30))
        .await
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    churn::print(&out, &opts, &found);
    if !out.failures.is_empty() || !found.is_empty() {
        anyhow::bail!(
            "{} cycles failed, {} things left behind",
            out.failures.len(),
            found.len()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Image {
            image_dir,
            agent,
            no_cold,
        } => image::run(&image_dir, &agent, !no_cold),
        Cmd::Relay {
            rounds,
            mib,
            repeats,
        } => rt.block_on(relay::run(rounds, mib, repeats)),
        Cmd::Sandboxes { count, settle } => {
            rt.block_on(sandboxes::run(count, Duration::from_secs(settle)))
        }
        Cmd::Keypress { presses, gap_ms } => {
            rt.block_on(keypress::run(presses, Duration::from_millis(gap_ms)))
        }
        Cmd::Viewer(opts) => rt.block_on(viewer::run(opts)),
        Cmd::Processes { starts, mib, keys } => rt.block_on(processes::run(starts, mib, keys)),
        Cmd::Fuzz {
            minutes,
            target,
            seed,
            out,
        } => fuzz::run(minutes, target.as_deref(), seed, &out),
        Cmd::Churn(args) => rt.block_on(churn_command(args)),
        Cmd::Soak { minutes } => rt.block_on(soak::run(minutes)),
        Cmd::Logins { concurrent, rounds } => rt.block_on(logins::run(concurrent, rounds)),
        Cmd::Pool(opts) => rt.block_on(pool::run(opts)),
        Cmd::Hop(opts) => rt.block_on(hop::run(opts)),
        Cmd::Cluster(opts) => rt.block_on(cluster::run(opts)),
        Cmd::All { image_dir, agent } => {
            rt.block_on(relay::run(2000, 256, 5))?;
            rt.block_on(sandboxes::run(10, Duration::from_secs(30)))?;
            rt.block_on(keypress::run(100, Duration::from_millis(150)))?;
            image::run(&image_dir, &agent, false)
        }
    }
}
