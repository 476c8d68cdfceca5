//! `airlock-bench`: measures the parts of airlock that set how it feels and
//! what it costs — golden image builds, sandbox start and memory, the viewer
//! relay, key press to pixel — and a soak run. Every subcommand prints tables
//! (Markdown) on stdout and its progress on stderr. Figures and how they were
//! taken: docs/performance.md.

mod fuzz;
mod image;
mod keypress;
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
    /// The quick ones: relay, sandboxes, keypress, and image without the cold build.
    All {
        #[arg(long, env = "AIRLOCK_IMAGE_DIR")]
        image_dir: PathBuf,
        #[arg(long, env = "AIRLOCK_AGENT_BIN")]
        agent: PathBuf,
    },
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
        Cmd::Fuzz {
            minutes,
            target,
            seed,
            out,
        } => fuzz::run(minutes, target.as_deref(), seed, &out),
        Cmd::Soak { minutes } => rt.block_on(soak::run(minutes)),
        Cmd::All { image_dir, agent } => {
            rt.block_on(relay::run(2000, 256, 5))?;
            rt.block_on(sandboxes::run(10, Duration::from_secs(30)))?;
            rt.block_on(keypress::run(100, Duration::from_millis(150)))?;
            image::run(&image_dir, &agent, false)
        }
    }
}
