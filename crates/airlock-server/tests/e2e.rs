//! End to end in a real headless Chromium: the UI creates a sandbox, the noVNC
//! viewer shows its desktop, typing into the terminal over the viewer changes
//! the sandbox (checked through exec). Screenshots land in `target/e2e/`.
//! Once with the nspawn driver, once with the QEMU driver (the same image as a
//! microVM, under TCG where KVM does not run guests).

mod common;

use airlock_server::config::DriverKind;
use common::{browser_unmet, unmet};
use std::path::PathBuf;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_shows_a_live_desktop_that_takes_typing() {
    if unmet().is_some() || browser_unmet().is_some() {
        return;
    }
    let h = common::start("10.232.20.0/24").await;
    drive_the_ui(h, "target/e2e").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_desktop_as_a_qemu_microvm() {
    if unmet().is_some() || browser_unmet().is_some() || common::qemu_unmet().is_some() {
        return;
    }
    let h = common::start_with("10.232.21.0/24", |cfg| {
        cfg.driver = DriverKind::Qemu;
        // Emulated (TCG) guests boot in tens of seconds on a busy host.
        cfg.boot_timeout_s = 300;
    })
    .await;
    drive_the_ui(h, "target/e2e/qemu").await;
}

/// Runs tests/e2e/desktop.mjs against the harness and checks the UI's delete
/// left nothing behind.
async fn drive_the_ui(h: common::Harness, artifacts: &str) {
    let root = common::repo_root();
    let script = root.join("tests/e2e/desktop.mjs");
    let artifacts: PathBuf = root.join(artifacts);
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let status = tokio::process::Command::new("node")
        .arg(&script)
        .args(["--url", &h.base, "--artifacts"])
        .arg(&artifacts)
        .status()
        .await
        .expect("node runs");
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots are in {}",
        artifacts.display()
    );
    let (_, list) = h.get("/api/v1/sandboxes").await;
    for sb in list["sandboxes"].as_array().into_iter().flatten() {
        let id = sb["id"].as_str().unwrap_or_default();
        assert!(
            ["stopped", "stopping"].contains(&sb["state"].as_str().unwrap_or("")),
            "the UI's delete left {id} {}",
            sb["state"]
        );
        h.wait_state(id, "stopped", std::time::Duration::from_secs(30))
            .await;
        assert_eq!(common::leftovers(&h.data_dir, id), Vec::<String>::new());
    }
    h.shutdown().await;
}
