//! Per-user quotas through the real control plane and the real nspawn driver:
//! past a cap, a create gets 429 with `Retry-After`, and nothing is made.
//! (The admission logic itself, its rate window and the memory ledger under
//! 100 parallel creates, is tested root-free in `app/admission/tests.rs`.)

mod common;

use common::unmet;
use serde_json::{json, Value};
use std::time::Duration;

/// Until a deleted sandbox no longer counts: stopped, or failed when the
/// delete cut its boot short.
async fn wait_ended(h: &common::Harness, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, sb) = h.get(&format!("/api/v1/sandboxes/{id}")).await;
        if ["stopped", "failed"].contains(&sb["state"].as_str().unwrap_or("")) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} still {}",
            sb["state"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_third_create_past_a_cap_of_two_gets_429_and_makes_nothing() {
    if unmet().is_some() {
        return;
    }
    let h = common::start_with("10.241.0.0/24", |cfg| cfg.quota.max_sandboxes = 2).await;
    // Three at once: the count and the create are one step, so exactly two
    // pass, whatever the interleaving.
    let send = || {
        h.http
            .post(h.url("/api/v1/sandboxes"))
            .json(&json!({"kind": "browser"}))
            .send()
    };
    let answers = futures::future::join_all([send(), send(), send()]).await;
    let mut ids = Vec::new();
    let mut refused = Vec::new();
    for resp in answers {
        let resp = resp.expect("request");
        match resp.status().as_u16() {
            201 => {
                let body: Value = resp.json().await.expect("json");
                ids.push(body["id"].as_str().expect("id").to_owned());
            }
            429 => refused.push(resp),
            other => panic!(
                "unexpected {other}: {}",
                resp.text().await.unwrap_or_default()
            ),
        }
    }
    assert_eq!((ids.len(), refused.len()), (2, 1), "two made, one refused");
    let resp = refused.pop().expect("the refusal");
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!(retry_after >= 1);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("you have 2 live sandboxes, the limit (quota.max_sandboxes) is 2"),
        "{body}"
    );
    let (_, list) = h.get("/api/v1/sandboxes").await;
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    // A login needs a browser sandbox: refused the same way, no login row.
    let (status, body) = h
        .post("/api/v1/logins", json!({"provider": "claude"}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let (_, logins) = h.get("/api/v1/logins").await;
    assert_eq!(
        logins["logins"].as_array().map(Vec::len),
        Some(0),
        "{logins}"
    );

    let (status, usage) = h.get("/api/v1/usage").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(usage["limits"]["max_sandboxes"], 2);
    assert_eq!(usage["used"]["sandboxes"], 2);
    assert_eq!(usage["used"]["logins"], 0);
    assert_eq!(usage["used"]["creates_last_minute"], 2);

    // A deleted sandbox frees its place once it has stopped.
    h.delete(&format!("/api/v1/sandboxes/{}", ids[0])).await;
    wait_ended(&h, &ids[0]).await;
    let (status, body) = h
        .post("/api/v1/sandboxes", json!({"kind": "browser"}))
        .await;
    assert_eq!(status, 201, "{body}");
    h.shutdown().await;
}

/// The page's quota line and a refused create, in a real headless Chromium
/// (tests/e2e/quota.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_quota_line_and_the_refusal() {
    if unmet().is_some() || common::browser_unmet().is_some() {
        return;
    }
    let h = common::start_with("10.241.1.0/24", |cfg| cfg.quota.max_sandboxes = 1).await;
    let root = common::repo_root();
    let artifacts = root.join("target/e2e-quota");
    let status = tokio::process::Command::new("node")
        .arg(root.join("tests/e2e/quota.mjs"))
        .args(["--url", &h.base, "--artifacts"])
        .arg(&artifacts)
        .status()
        .await
        .expect("node runs");
    assert!(
        status.success(),
        "the browser check failed ({status}); screenshots are in {}",
        artifacts.display()
    );
    let (_, list) = h.get("/api/v1/sandboxes").await;
    let made = list["sandboxes"].as_array().cloned().unwrap_or_default();
    assert_eq!(made.len(), 1, "the refused click made nothing: {list}");
    let id = made[0]["id"].as_str().expect("id");
    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    wait_ended(&h, id).await;
    h.shutdown().await;
}
