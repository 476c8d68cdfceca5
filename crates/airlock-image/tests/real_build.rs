//! The real build: mmdebstrap, npm and systemd-nspawn, into the directory named
//! by `AIRLOCK_IMAGE_DIR` (CI points it at a cache outside the clone, so a run
//! whose inputs did not change costs seconds). Without that variable the test
//! says so and does nothing: a cold build downloads a Debian system.

use airlock_image::{expected_inputs, BuildOptions, ImageStore, Progress};
use std::path::PathBuf;
use std::time::Duration;

struct Log;

impl Progress for Log {
    fn stage(&self, name: &str, estimate: Option<Duration>) {
        eprintln!("stage {name} (estimate {estimate:?})");
    }
    fn message(&self, _msg: &str) {}
    fn done(&self, name: &str, took: Duration, cached: bool) {
        eprintln!(
            "stage {name}: {} in {took:.1?}",
            if cached { "reused" } else { "built" }
        );
    }
}

fn agent_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AIRLOCK_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("airlock-agent"))
        .find(|p| p.is_file())
}

#[test]
fn real_image_builds_verifies_and_is_fresh() {
    let Some(dir) = std::env::var_os("AIRLOCK_IMAGE_DIR") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build the real image, but AIRLOCK_IMAGE_DIR is not set"
        );
        eprintln!("SKIPPED real_image_builds_verifies_and_is_fresh: set AIRLOCK_IMAGE_DIR to a directory outside the clone to build the real golden image (needs root, mmdebstrap, npm, systemd-nspawn)");
        return;
    };
    let agent = agent_bin().expect("no airlock-agent binary: run `cargo build --release -p airlock-agent` first or set AIRLOCK_AGENT_BIN");
    let store = ImageStore::new(PathBuf::from(dir));
    let m = store
        .build(&BuildOptions::new(agent.clone()), &Log)
        .expect("image build");
    assert_eq!(m.layers.len(), 4);
    assert!(
        m.versions
            .get("node")
            .is_some_and(|v| v.starts_with("v22.")),
        "{:?}",
        m.versions
    );
    for cli in ["codex", "claude", "gemini", "chromium"] {
        assert!(
            m.versions.contains_key(cli),
            "{cli} missing from {:?}",
            m.versions
        );
    }
    m.check_fresh(&expected_inputs(&agent).expect("inputs"))
        .expect("fresh");
    assert_eq!(
        store.current().expect("current").map(|c| c.build_id),
        Some(m.build_id.clone())
    );
    let report = store.verify(&m).expect("verify");
    assert!(report.ok(), "{}", report.failures());
}
