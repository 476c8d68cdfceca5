//! The admin's Nodes panel in a real headless Chromium (tests/e2e/nodes.mjs)
//! over the real control plane: a registry of two nodes written to its
//! store as `airlock node` would write it, an admin made as `airlock user
//! add --admin` makes one. No sandbox boots. Also the CLI's `sandbox ls`.

mod common;

#[allow(dead_code)]
#[path = "common/child.rs"]
mod child;

use airlock_proto::metadata::SandboxKind;
use airlock_server::app::state::SandboxState;
use airlock_server::store::{now_ms, NodeRow, SandboxRow};
use common::unmet;

fn node(name: &str, lease_expires_at: i64) -> NodeRow {
    NodeRow {
        name: name.into(),
        address: "127.0.0.1:7001".into(),
        backend: "nspawn".into(),
        image_build_id: "build".into(),
        cpus: 2,
        memory_total: 8 << 30,
        memory_free: 6 << 30,
        disk_free: 40 << 30,
        running: 0,
        started_at: lease_expires_at - 60_000,
        heartbeat_at: lease_expires_at - 10_000,
        lease_expires_at,
        draining: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_and_drain_nodes_in_the_page() {
    if unmet().is_some() || common::browser_unmet().is_some() {
        return;
    }
    let h = common::start("10.254.41.0/24").await;
    let app = h.running.as_ref().expect("running").app.clone();
    let store = app.store.clone();
    let (admin, token) = airlock_server::app::auth::add_user(&store, "root", true)
        .await
        .expect("admin");
    // alpha renews its lease for as long as the test runs; beta is lost.
    let now = now_ms();
    store
        .upsert_node(&node("alpha", now + 600_000))
        .await
        .expect("alpha");
    store
        .upsert_node(&node("beta", now - 5_000))
        .await
        .expect("beta");
    store
        .insert_sandbox(&SandboxRow {
            id: "lostone".into(),
            owner_id: admin.id.clone(),
            kind: SandboxKind::Browser,
            state: SandboxState::Provisioning,
            failure_reason: None,
            image_build_id: "build".into(),
            lease_index: None,
            agent_token: "t".into(),
            vnc_password: "p".into(),
            display_width: 1280,
            display_height: 800,
            created_at: now,
            updated_at: now,
            ready_at: None,
            last_heartbeat_at: None,
            last_activity_at: now,
        })
        .await
        .expect("sandbox");
    // Placed while provisioning, as a replica does, then failed with its node.
    store.place_sandbox("lostone", "beta").await.expect("place");
    airlock_server::app::state::advance(
        &store,
        "lostone",
        &airlock_server::app::state::Event::Fail {
            label: "node_lost",
            reason: "node lost: beta stopped renewing its lease".into(),
        },
    )
    .await
    .expect("failed");

    let root = common::repo_root();
    let artifacts = root.join("target/e2e-nodes");
    let status = tokio::process::Command::new("node")
        .arg(root.join("tests/e2e/nodes.mjs"))
        .args(["--url", &h.base, "--token", &token, "--artifacts"])
        .arg(&artifacts)
        .status()
        .await
        .expect("node runs");
    assert!(
        status.success(),
        "the browser check failed ({status}); screenshots are in {}",
        artifacts.display()
    );
    // The CLI's list names the node too (`airlock sandbox ls`).
    if child::unmet().is_none() {
        let out = tokio::process::Command::new(child::binary())
            .args(["sandbox", "ls"])
            .env("AIRLOCK_URL", &h.base)
            .env("AIRLOCK_TOKEN", &token)
            .output()
            .await
            .expect("airlock sandbox ls");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let head = text.lines().next().unwrap_or_default();
        assert!(head.trim_end().ends_with("NODE"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("lostone"))
            .unwrap_or_default();
        assert!(row.trim_end().ends_with(" beta"), "{text}");
    }
    // The clicks reached the store: drained, then resumed.
    let alpha = store.node("alpha").await.expect("q").expect("alpha");
    assert!(!alpha.draining, "Resume was the last click");
    drop(app);
    h.shutdown().await;
}
