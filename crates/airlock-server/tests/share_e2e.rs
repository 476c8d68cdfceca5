//! A share link in a real headless Chromium (tests/e2e/share.mjs), against
//! one real sandbox: a second browser sees the desktop, its typing does not
//! reach the sandbox even with the page's own view-only switch turned off
//! (the relay drops it), the owner's does; the owner's drop-upload lands in
//! ~/Downloads and comes back as a download; a revoked link closes its view.

mod common;

use common::{browser_unmet, unmet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_link_cannot_type_and_the_owner_can_drop_files() {
    if unmet().is_some() || browser_unmet().is_some() {
        return;
    }
    let h = common::start("10.254.50.0/24").await;
    let id = h.ready_sandbox("browser").await;
    let mark = hex::encode(rand::random::<[u8; 6]>());
    let root = common::repo_root();
    let artifacts = root.join("target/e2e/share");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let status = tokio::process::Command::new("node")
        .arg(root.join("tests/e2e/share.mjs"))
        .args([
            "--url",
            &h.base,
            "--sandbox",
            &id,
            "--mark",
            &mark,
            "--artifacts",
        ])
        .arg(&artifacts)
        .status()
        .await
        .expect("node runs");
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots are in {}",
        artifacts.display()
    );
    // Seen from here too: the guest's line never ran, the owner's did, and
    // the dropped file is in the sandbox user's Downloads.
    let shared = h
        .exec(&id, &["sh", "-c", "cat /tmp/share-mark; true"])
        .await;
    assert!(
        !shared["stdout"].as_str().unwrap_or("").contains(&mark),
        "{shared}"
    );
    let owner = h.exec(&id, &["cat", "/tmp/owner-mark"]).await;
    assert!(
        owner["stdout"].as_str().unwrap_or("").contains(&mark),
        "{owner}"
    );
    let ls = h
        .exec(&id, &["sh", "-c", "ls \"$HOME/Downloads\" \"$HOME\""])
        .await;
    assert!(
        ls["stdout"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("dropped-{mark}.txt")),
        "{ls}"
    );
    let (status, _) = h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(status, 202);
    h.wait_state(&id, "stopped", std::time::Duration::from_secs(60))
        .await;
    h.shutdown().await;
}
