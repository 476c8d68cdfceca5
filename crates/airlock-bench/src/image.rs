//! Golden image build time: cold into a fresh directory, after one changed
//! input (the agent binary), and with nothing changed. Runs the real builder
//! (`ImageStore::build`), verification included whenever something was built.

use crate::stats::{secs, Table};
use airlock_image::{BuildOptions, ImageStore, Progress};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Stages(Mutex<Vec<(String, Duration, bool)>>);

impl Progress for Stages {
    fn stage(&self, _name: &str, _estimate: Option<Duration>) {}
    fn message(&self, _msg: &str) {}
    fn done(&self, name: &str, took: Duration, cached: bool) {
        if let Ok(mut v) = self.0.lock() {
            v.push((name.to_owned(), took, cached));
        }
    }
}

impl Stages {
    fn summary(&self) -> String {
        let v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        v.iter()
            .map(|(n, d, cached)| {
                if *cached {
                    format!("{n} reused")
                } else {
                    format!("{n} {:.1}s", d.as_secs_f64())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn build(dir: &Path, agent: &Path) -> Result<(Duration, String, String)> {
    let store = ImageStore::new(dir.to_path_buf());
    let stages = Stages::default();
    let started = Instant::now();
    let m = store
        .build(&BuildOptions::new(agent.to_path_buf()), &stages)
        .with_context(|| format!("building the image in {}", dir.display()))?;
    Ok((started.elapsed(), m.build_id, stages.summary()))
}

/// `cp -al`: a hard-linked copy of a finished layer, so the changed-input case
/// starts from the same cached base and node layers a developer's machine has.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg("-l")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp -al")?;
    anyhow::ensure!(st.success(), "cp -al {} failed", from.display());
    Ok(())
}

pub fn run(cached: &Path, agent: &Path, cold: bool) -> Result<()> {
    let mut table = Table::new(
        "Golden image build",
        &[
            "case",
            "wall time",
            "build id",
            "stages (as the builder reported them)",
        ],
    );
    let work = tempfile::Builder::new()
        .prefix("airlock-bench-image-")
        .tempdir_in("/var/tmp")?;
    // A private copy: a rebuild of the agent elsewhere during a long cold build
    // must not turn "nothing changed" into "the agent changed".
    let pinned = work.path().join("airlock-agent.pinned");
    std::fs::copy(agent, &pinned).with_context(|| format!("copying {}", agent.display()))?;
    let agent = pinned.as_path();

    if cold {
        let dir = work.path().join("cold");
        eprintln!("image: cold build into {} (about 100 s)", dir.display());
        let (took, id, st) = build(&dir, agent)?;
        table.row(&[
            "cold: empty image dir, all layers + verification",
            &secs(took),
            &id,
            &st,
        ]);
        let (took, id, st) = build(&dir, agent)?;
        table.row(&[
            "nothing changed (after the cold build)",
            &secs(took),
            &id,
            &st,
        ]);
    }

    // Changed input: the cached image's base and node layers (hard links), and
    // an agent binary whose bytes differ (one byte appended: a new sha256).
    let dir = work.path().join("warm");
    std::fs::create_dir_all(dir.join("layers"))?;
    let layers = cached.join("layers");
    let mut linked = 0;
    for entry in
        std::fs::read_dir(&layers).with_context(|| format!("reading {}", layers.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("base-") || name.starts_with("node-") {
            link_tree(&entry.path(), &dir.join("layers").join(&name))?;
            linked += 1;
        }
    }
    anyhow::ensure!(
        linked >= 2,
        "no cached base and node layers in {}",
        layers.display()
    );
    let changed_agent: PathBuf = work.path().join("airlock-agent");
    let mut bytes = std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let (first, _, _) = build(&dir, agent)?;
    bytes.push(0);
    std::fs::write(&changed_agent, &bytes)?;
    std::fs::set_permissions(
        &changed_agent,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    table.row(&[
        "cached base+node linked in, files/meta/verify built (set-up, not a target)",
        &secs(first),
        "",
        "",
    ]);
    let (took, id, st) = build(&dir, &changed_agent)?;
    table.row(&[
        "one changed input: agent binary (new sha256)",
        &secs(took),
        &id,
        &st,
    ]);
    let (took, id, st) = build(&dir, &changed_agent)?;
    table.row(&["nothing changed", &secs(took), &id, &st]);
    table.print();
    Ok(())
}
