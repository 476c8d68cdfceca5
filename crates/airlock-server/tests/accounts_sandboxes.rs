//! Vault rotation on a running control plane with real sandboxes: with the
//! egress account, a user's upstream and stored credentials all set, rotate
//! (the way `airlock vault rotate` does: new key, SIGHUP, re-seal, retire,
//! SIGHUP); afterwards a sandbox boots, reaches its upstream through the
//! re-sealed account password, and a login delivers.

mod common;
mod logins_support;

use airlock_server::app::keyring;
use airlock_server::instance;
use airlock_server::vault::Vault;
use logins_support::{approve_at, start_oauth, wait_login, write_test_providers, OAuth};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// One login through the test provider, signed in; returns the workspace id.
async fn login_delivers(h: &common::Harness, port: u16) -> String {
    let (status, body) = h
        .post("/api/v1/logins", json!({ "provider": "testoauth" }))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let sb = body["browser_sandbox_id"].as_str().expect("sb").to_owned();
    let login = wait_login(h, None, &id, &["awaiting_user"], Duration::from_secs(150)).await;
    let url = login["login_url"].as_str().expect("url").to_owned();
    let location = approve_at(port, &url).await;
    let script = format!(
        "require('http').get({location:?},r=>{{r.resume();r.on('end',()=>process.exit(r.statusCode===200?0:1))}})"
    );
    let out = h.exec(&sb, &["node", "-e", &script]).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let done = wait_login(h, None, &id, &["completed"], Duration::from_secs(180)).await;
    done["workspace_sandbox_id"]
        .as_str()
        .expect("workspace")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_a_sandbox_boots_and_a_login_delivers() {
    if common::unmet().is_some() {
        return;
    }
    let marker = format!("CANARY{}", hex::encode(rand::random::<[u8; 8]>()));
    let oauth = Arc::new(OAuth {
        marker: marker.clone(),
        ..Default::default()
    });
    let port = start_oauth(oauth.clone()).await;
    let mut h = common::start("10.243.1.0/24").await;
    let providers = h.data_dir.join("test-providers");
    write_test_providers(&providers);
    h.cfg.providers_dir = Some(providers);
    // The test OAuth server is the upstream, on loopback: let its name through.
    h.cfg.egress_allow = vec!["oauth.test".into()];
    h.cfg.login_timeout_s = 600;
    h.restart().await;
    let _ = h.get("/api/v1/logins").await; // makes the local user
    let admin = h.admin_token().await;
    let app = h.running.as_ref().expect("running").app.clone();
    app.add_user("bob").await.expect("bob");
    // `local` leaves through the provider account (the OAuth server, which
    // also answers as a proxy); bob has an explicit upstream.
    for (path, body) in [
        (
            "/api/v1/egress/account",
            json!({"host": "127.0.0.1", "username": "t", "password": "t",
                   "port_min": port, "port_max": port}),
        ),
        (
            "/api/v1/egress/users/bob",
            json!({"url": format!("http://b:b-pass@127.0.0.1:{port}")}),
        ),
    ] {
        let (status, answer) = h
            .call(reqwest::Method::PUT, path, Some(&admin), Some(body))
            .await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    // A first login: credentials stored and delivered.
    let ws = login_delivers(&h, port).await;
    let sealed = app.store.sealed_values().await.expect("values");
    assert_eq!(
        sealed.len(),
        3,
        "account, upstream, credentials: {sealed:?}"
    );

    // Rotate, as `airlock vault rotate` does with a running server.
    let dir = h.data_dir.clone();
    let mut vault = Vault::load(&dir).expect("keyring");
    let new = vault.rotate().expect("rotate");
    instance::signal_reload(std::process::id()).expect("SIGHUP");
    assert!(
        instance::wait_for_keys(&dir, &new, &vault.key_ids(), Duration::from_secs(10)).await,
        "{:?}",
        instance::holder(&dir)
    );
    let done = keyring::reseal_and_retire(&app.store, &mut vault)
        .await
        .expect("reseal");
    assert_eq!(done.resealed, 3, "{done:?}");
    assert_eq!(done.retired, ["k1"]);
    instance::signal_reload(std::process::id()).expect("SIGHUP");
    assert!(
        instance::wait_for_keys(
            &dir,
            &new,
            std::slice::from_ref(&new),
            Duration::from_secs(10)
        )
        .await
    );
    for v in app.store.sealed_values().await.expect("values") {
        assert_eq!(Vault::key_of(&v.sealed), Some(new.as_str()), "{v:?}");
        app.vault
            .read()
            .await
            .open(&v.sealed, &keyring::aad_of(&v.at))
            .unwrap_or_else(|e| panic!("{v:?} opens on the server: {e}"));
    }

    // Afterwards: a fresh workspace boots, and a login (its browser sandbox
    // reaching the OAuth server through the re-sealed account password)
    // delivers into it.
    let (status, body) = h.delete(&format!("/api/v1/sandboxes/{ws}")).await;
    assert_eq!(status, 202, "{body}");
    h.wait_state(&ws, "stopped", Duration::from_secs(60)).await;
    let ws2 = login_delivers(&h, port).await;
    assert_ne!(ws2, ws);
    let out = h
        .exec(&ws2, &["sh", "-c", "cat .testcli/credentials.json"])
        .await;
    assert!(
        out["stdout"].as_str().unwrap_or("").contains(&marker),
        "the delivered file holds the issued token: {out}"
    );
    assert_eq!(*oauth.tokens_issued.lock().expect("lock"), 2);
    h.shutdown().await;
}

/// `airlock user remove` while the server runs and the user has a ready
/// sandbox: the token is refused at once, the running server's reaper ends
/// the sandbox (its host resources are released), then the user goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_ends_its_sandboxes_through_the_running_server() {
    if common::unmet().is_some() {
        return;
    }
    let h = common::start("10.243.2.0/24").await;
    let app = h.running.as_ref().expect("running").app.clone();
    let (dora, token) = app.add_user("dora").await.expect("dora");
    let (status, body) = h
        .call(
            reqwest::Method::POST,
            "/api/v1/sandboxes",
            Some(&token),
            Some(json!({"kind": "workspace"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, b) = h
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/sandboxes/{id}"),
                Some(&token),
                None,
            )
            .await;
        if b["state"] == "ready" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready: {b}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        h.data_dir
            .join("volumes")
            .join(&dora.id)
            .join("home")
            .is_dir(),
        "the ready workspace has its home volume"
    );
    let outcome = airlock_server::app::auth::remove_user(&app.store, &h.data_dir, "dora")
        .await
        .expect("remove");
    assert_eq!(outcome, airlock_server::app::auth::Removal::Pending(1));
    let (status, _) = h
        .call(
            reqwest::Method::GET,
            "/api/v1/sandboxes",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 401, "the token is refused at once");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while app.store.user_by_name("dora").await.expect("q").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the reaper did not finish the removal"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(app.store.sandbox(&id).await.expect("q").is_none());
    assert!(app
        .store
        .sandboxes_of(&dora.id)
        .await
        .expect("q")
        .is_empty());
    assert!(
        !h.data_dir.join("sandboxes").join(&id).exists(),
        "the sandbox's files are gone"
    );
    assert!(
        !h.data_dir.join("volumes").join(&dora.id).exists(),
        "the user's home volume (its signed-in CLIs) is gone"
    );
    assert!(
        !app.store
            .used_leases()
            .await
            .expect("q")
            .iter()
            .any(|_| true),
        "its address went back to the pool"
    );
    h.shutdown().await;
}
