//! "Connect a CLI" end to end in a real headless Chromium: the UI starts a
//! login for the test-only provider, the user's click on the sign-in page is
//! made through the viewer (on the noVNC canvas), and the login completes with
//! the credential file in the workspace and the browser sandbox gone. The
//! OAuth server and the test provider are those of `logins.rs` (shared in
//! `logins_support`). Screenshots land in `target/e2e/login-*.png`.

mod common;
mod logins_support;

use logins_support::{start_oauth, write_test_providers, OAuth};
use serde_json::json;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_from_the_ui_signs_in_through_the_viewer() {
    if common::unmet().is_some() || common::browser_unmet().is_some() {
        return;
    }
    let root = common::repo_root();
    let oauth = Arc::new(OAuth {
        marker: format!("E2E{}", hex::encode(rand::random::<[u8; 6]>())),
        ..Default::default()
    });
    let port = start_oauth(oauth.clone()).await;
    let mut h = common::start("10.234.50.0/24").await;
    let dir = h.data_dir.join("test-providers");
    write_test_providers(&dir);
    h.cfg.providers_dir = Some(dir);
    // The test OAuth server is the upstream, on loopback: let its name through.
    h.cfg.egress_allow = vec!["oauth.test".into()];
    h.cfg.login_timeout_s = 600;
    h.restart().await;
    // The first authenticated request makes the default user; then the OAuth
    // server becomes its upstream proxy, the one way out of a sandbox.
    let _ = h.get("/api/v1/logins").await;
    let resp = h
        .http
        .put(h.url("/api/v1/egress/users/local"))
        .bearer_auth(h.admin_token().await)
        .json(&json!({ "url": format!("http://t:t@127.0.0.1:{port}") }))
        .send()
        .await
        .expect("put upstream");
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);

    let artifacts = root.join("target/e2e");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let status = tokio::process::Command::new("node")
        .arg(root.join("tests/e2e/login.mjs"))
        .args(["--url", &h.base, "--provider", "testoauth", "--artifacts"])
        .arg(&artifacts)
        .status()
        .await
        .expect("node runs");
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots are in {}",
        artifacts.display()
    );

    // Only the sandbox's Chromium can have asked for the sign-in page and
    // approved it (the script never calls the OAuth server): the click went
    // through the viewer.
    assert!(!oauth.authorize_requests.lock().expect("lock").is_empty());
    assert_eq!(*oauth.tokens_issued.lock().expect("lock"), 1);
    let (_, logins) = h.get("/api/v1/logins").await;
    let list = logins["logins"].as_array().expect("logins");
    assert_eq!(list.len(), 1, "{logins}");
    assert_eq!(list[0]["state"], "completed", "{logins}");
    let (_, creds) = h.get("/api/v1/credentials").await;
    assert_eq!(creds["credentials"][0]["provider"], "testoauth", "{creds}");
    h.shutdown().await;
}
