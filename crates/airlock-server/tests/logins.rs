//! Logins against the real nspawn driver and the real golden image: the real
//! CLIs print their login URLs; a whole flow against a local OAuth server;
//! failures; a restart while the user is signing in; the canary.

mod common;
mod logins_support;

use logins_support::{
    approve_at, query, start_oauth, wait_gone, wait_login, write_test_providers, OAuth,
};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Each real CLI, in the real image, prints (or asks a browser to open) its
/// login URL, with no network: provider host, client id, redirect, PKCE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clis_print_their_login_urls() {
    if common::unmet().is_some() {
        return;
    }
    let h = common::start("10.234.1.0/24").await;
    let mut seen = Vec::new();
    for provider in ["codex", "claude", "gemini"] {
        let (status, body) = h
            .post("/api/v1/logins", json!({ "provider": provider }))
            .await;
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().expect("id").to_owned();
        let sb = body["browser_sandbox_id"]
            .as_str()
            .expect("sandbox")
            .to_owned();
        let login = wait_login(&h, None, &id, &["awaiting_user"], Duration::from_secs(150)).await;
        let url = login["login_url"].as_str().expect("login_url").to_owned();
        let q = query(&url);
        eprintln!("{provider}: {url}");
        match provider {
            "codex" => {
                assert!(
                    url.starts_with("https://auth.openai.com/oauth/authorize?"),
                    "{url}"
                );
                assert_eq!(q["client_id"], "app_EMoamEEZ73f0CkXaXp7hrann");
                assert_eq!(q["redirect_uri"], "http://127.0.0.1:1455/auth/callback");
            }
            "claude" => {
                assert!(
                    url.starts_with("https://claude.com/cai/oauth/authorize?"),
                    "{url}"
                );
                assert_eq!(q["client_id"], "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
                assert!(q["redirect_uri"].starts_with("http://localhost:"), "{url}");
                assert!(q["redirect_uri"].ends_with("/callback"), "{url}");
            }
            _ => {
                assert!(
                    url.starts_with("https://accounts.google.com/o/oauth2/v2/auth?"),
                    "{url}"
                );
                assert!(
                    q["client_id"].ends_with(".apps.googleusercontent.com"),
                    "{url}"
                );
                assert!(q["redirect_uri"].starts_with("http://127.0.0.1:"), "{url}");
                assert!(q["redirect_uri"].ends_with("/oauth2callback"), "{url}");
            }
        }
        if provider != "gemini" {
            assert_eq!(q["code_challenge_method"], "S256", "{url}");
            assert_eq!(q["code_challenge"].len(), 43, "{url}");
        }
        assert!(q.contains_key("state"), "{url}");
        // Cancel: the browser sandbox goes.
        let (status, body) = h.delete(&format!("/api/v1/logins/{id}")).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["state"], "cancelled");
        wait_gone(&h, None, &sb, Duration::from_secs(60)).await;
        seen.push(provider);
    }
    assert_eq!(seen.len(), 3);
    h.shutdown().await;
}

fn test_harness_cfg(h: &mut common::Harness, timeout_s: u64) {
    let dir = h.data_dir.join("test-providers");
    write_test_providers(&dir);
    h.cfg.providers_dir = Some(dir);
    // The test OAuth server is the upstream, on loopback: let its name through.
    h.cfg.egress_allow = vec!["oauth.test".into()];
    h.cfg.login_timeout_s = timeout_s;
}

/// Sign the user in the way Chromium would after the click: approve at the
/// OAuth server, then follow its redirect inside the browser sandbox (the
/// callback listens on the sandbox's own loopback).
async fn sign_in(h: &common::Harness, oauth_port: u16, url: &str, browser: &str) {
    let location = approve_at(oauth_port, url).await;
    assert!(location.starts_with("http://127.0.0.1:"), "{location}");
    let script = format!(
        "require('http').get({location:?},r=>{{r.resume();r.on('end',()=>process.exit(r.statusCode===200?0:1))}})"
    );
    let out = h.exec(browser, &["node", "-e", &script]).await;
    assert_eq!(out["exit_code"], 0, "{out}");
}

/// The whole flow through the API, a restart of the control plane while the
/// user signs in, a second login replacing the first, and the canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_with_a_local_oauth_server() {
    if common::unmet().is_some() {
        return;
    }
    let marker = format!("CANARY{}", hex::encode(rand::random::<[u8; 8]>()));
    let oauth = Arc::new(OAuth {
        marker: marker.clone(),
        ..Default::default()
    });
    let port = start_oauth(oauth.clone()).await;
    let mut h = common::start("10.234.2.0/24").await;
    test_harness_cfg(&mut h, 600);
    h.restart().await;
    // The first authenticated request makes the default user.
    let _ = h.get("/api/v1/logins").await;
    let (status, body) = h
        .http
        .put(h.url("/api/v1/egress/users/local"))
        .bearer_auth(h.admin_token().await)
        .json(&json!({ "url": format!("http://t:t@127.0.0.1:{port}") }))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("put upstream");
    assert_eq!(status, 200, "{:?}", body.text().await);
    let mut responses = String::new();

    for round in 0..2 {
        let (status, body) = h
            .post("/api/v1/logins", json!({ "provider": "testoauth" }))
            .await;
        assert_eq!(status, 201, "{body}");
        responses.push_str(&body.to_string());
        let id = body["id"].as_str().expect("id").to_owned();
        let sb = body["browser_sandbox_id"].as_str().expect("sb").to_owned();
        let login = wait_login(&h, None, &id, &["awaiting_user"], Duration::from_secs(150)).await;
        let url = login["login_url"].as_str().expect("url").to_owned();
        assert!(url.starts_with("http://oauth.test/authorize?"), "{url}");
        // Chromium in the sandbox opened it, through the proxy chain.
        let deadline = Instant::now() + Duration::from_secs(30);
        while oauth.authorize_requests.lock().expect("lock").len() < round + 1 {
            assert!(
                Instant::now() < deadline,
                "Chromium never asked for the sign-in page"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The first login lives through a restart of the control plane while
        // the user signs in.
        if round == 0 {
            // The control plane dies while the user is signing in.
            h.restart().await;
            let (_, b) = h.get(&format!("/api/v1/logins/{id}")).await;
            assert_eq!(b["state"], "awaiting_user", "{b}");
        }
        sign_in(&h, port, &url, &sb).await;
        let done = wait_login(&h, None, &id, &["completed"], Duration::from_secs(180)).await;
        responses.push_str(&done.to_string());
        assert!(done["error"].is_null(), "{done}");
        let ws = done["workspace_sandbox_id"]
            .as_str()
            .expect("ws")
            .to_owned();
        wait_gone(&h, None, &sb, Duration::from_secs(60)).await;
        // The file is in the workspace, 0600, the user's, and it is the token
        // the OAuth server issued.
        let out = h
            .exec(
                &ws,
                &[
                    "sh",
                    "-c",
                    "stat -c '%a %U' .testcli/credentials.json; cat .testcli/credentials.json",
                ],
            )
            .await;
        let text = out["stdout"].as_str().unwrap_or("");
        assert!(text.starts_with("600 airlock\n"), "{out}");
        assert!(
            text.contains(&marker),
            "the delivered file holds the issued token"
        );
        assert_eq!(
            *oauth.tokens_issued.lock().expect("lock"),
            (round + 1) as u32
        );
    }
    // One record for the provider, replaced by the second login.
    let (_, creds) = h.get("/api/v1/credentials").await;
    responses.push_str(&creds.to_string());
    let list = creds["credentials"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{creds}");
    assert_eq!(list[0]["provider"], "testoauth");
    assert!(!list[0]["delivered_at"].is_null());

    // Canary: nowhere in plaintext but the workspace's own file.
    for path in [
        "/api/v1/logins",
        "/api/v1/sandboxes",
        "/api/v1/login-stats",
        "/api/v1/openapi.json",
    ] {
        let (_, b) = h.get(path).await;
        responses.push_str(&b.to_string());
    }
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("airlock_logins_completed_total{provider=\"testoauth\"} 2"),
        "{metrics}"
    );
    responses.push_str(&metrics);
    assert!(
        !responses.contains(&marker),
        "canary in an API answer or the metrics"
    );
    let mut hits = Vec::new();
    for entry in walk(&h.data_dir) {
        if entry.starts_with(h.data_dir.join("volumes"))
            || entry.starts_with(h.data_dir.join("sandboxes"))
        {
            continue; // the workspace's home and guests' disks: where the file belongs
        }
        if let Ok(bytes) = std::fs::read(&entry) {
            if common::contains(&bytes, &marker) {
                hits.push(entry.display().to_string());
            }
        }
    }
    assert!(hits.is_empty(), "canary in plaintext in {hits:?}");
    h.shutdown().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(walk(&p)),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
    out
}

/// The CLI exits early: failed, with its last output as the reason. The user
/// never signs in: expired at the timeout. Both browser sandboxes destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_exit_and_expiry() {
    if common::unmet().is_some() {
        return;
    }
    let mut h = common::start("10.234.3.0/24").await;
    test_harness_cfg(&mut h, 40);
    h.restart().await;
    let (status, body) = h
        .post("/api/v1/logins", json!({ "provider": "nope" }))
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, fail) = h
        .post("/api/v1/logins", json!({ "provider": "testfail" }))
        .await;
    let (_, idle) = h
        .post("/api/v1/logins", json!({ "provider": "testidle" }))
        .await;
    let deadline = Instant::now() + Duration::from_secs(150);
    let (mut f, mut i);
    loop {
        f = h
            .get(&format!(
                "/api/v1/logins/{}",
                fail["id"].as_str().expect("id")
            ))
            .await
            .1;
        i = h
            .get(&format!(
                "/api/v1/logins/{}",
                idle["id"].as_str().expect("id")
            ))
            .await
            .1;
        if f["state"] == "failed" && i["state"] == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "{f} {i}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reason = f["error"].as_str().unwrap_or("");
    assert!(
        reason.contains("status 3") && reason.contains("cannot reach oauth.test"),
        "{reason}"
    );
    assert!(
        i["error"]
            .as_str()
            .unwrap_or("")
            .contains("not signed in within"),
        "{i}"
    );
    wait_gone(
        &h,
        None,
        fail["browser_sandbox_id"].as_str().expect("sb"),
        Duration::from_secs(60),
    )
    .await;
    wait_gone(
        &h,
        None,
        idle["browser_sandbox_id"].as_str().expect("sb"),
        Duration::from_secs(60),
    )
    .await;
    let metrics = h.metrics().await;
    assert!(metrics.contains("reason=\"expired\""), "{metrics}");
    assert!(metrics.contains("reason=\"cli_exited\""), "{metrics}");
    h.shutdown().await;
}
