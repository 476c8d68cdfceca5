//! Builds, verifies or shows the golden image without the rest of airlock:
//! `cargo run --release -p airlock-image --example image -- build|verify|show|prune`
//! with `AIRLOCK_IMAGE_DIR` naming the image directory and `AIRLOCK_AGENT_BIN`
//! the agent (default: target/release/airlock-agent beside this example).

use airlock_image::{expected_inputs, BuildOptions, ImageStore, Progress};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Stderr(Instant);

impl Progress for Stderr {
    fn stage(&self, name: &str, estimate: Option<Duration>) {
        eprintln!(
            "[{:7.1}s] == {name} (estimate {:?})",
            self.0.elapsed().as_secs_f64(),
            estimate.unwrap_or_default()
        );
    }
    fn message(&self, msg: &str) {
        eprintln!("[{:7.1}s]    {msg}", self.0.elapsed().as_secs_f64());
    }
    fn done(&self, name: &str, took: Duration, cached: bool) {
        let how = if cached { "reused" } else { "built" };
        eprintln!(
            "[{:7.1}s] == {name} {how} in {:.1}s",
            self.0.elapsed().as_secs_f64(),
            took.as_secs_f64()
        );
    }
}

fn agent_bin() -> PathBuf {
    match std::env::var_os(airlock_image::AGENT_BIN_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            airlock_image::default_agent_bin().unwrap_or_else(|_| PathBuf::from("airlock-agent"))
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::var_os(airlock_image::IMAGE_DIR_ENV).ok_or("set AIRLOCK_IMAGE_DIR")?;
    let store = ImageStore::new(PathBuf::from(dir));
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "build" => {
            let mut opts = BuildOptions::new(agent_bin());
            opts.force_verify = std::env::args().any(|a| a == "--verify");
            let m = store.build(&opts, &Stderr(Instant::now()))?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        "verify" => {
            let m = store.current()?.ok_or("no current image")?;
            let started = Instant::now();
            let report = store.verify(&m)?;
            eprintln!("verified in {:.1}s", started.elapsed().as_secs_f64());
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok() {
                return Err(report.failures().into());
            }
        }
        "show" => {
            let m = store.current()?.ok_or("no current image")?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            match m.check_fresh(&expected_inputs(&agent_bin())?) {
                Ok(()) => eprintln!("fresh"),
                Err(stale) => eprintln!("{stale}"),
            }
        }
        "prune" => {
            let keep: Vec<String> = std::env::args().skip(2).collect();
            for path in store.prune(&keep)? {
                println!("removed {}", path.display());
            }
        }
        _ => {
            return Err("usage: image build [--verify] | verify | show | prune [BUILD_ID…]".into())
        }
    }
    Ok(())
}
