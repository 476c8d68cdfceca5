//! Credentials kept in a real workspace (nspawn, the golden image, the real
//! agent): a record delivered again when its file is missing, the file a
//! CLI rewrote captured back as a new version, revocation removing the file,
//! the audit trail, and the canary. The checks run through the service's own
//! round (`check_credentials_once`), as the periodic task does.

mod common;

use airlock_server::app::credentials::record_aad;
use airlock_server::store::{now_ms, CredentialRow};
use serde_json::json;

const PROVIDER: &str = "testkeep";
const FILE: &str = ".testkeep/creds.json";

fn write_provider(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("testkeep.toml"),
        format!(
            "name = \"{PROVIDER}\"\ndisplay_name = \"Test keep\"\ncommand = [\"true\"]\n\
             url_prefixes = [\"http://oauth.test/authorize?\"]\n\
             credentials = [{{ path = \"{FILE}\", json_keys = [\"token\"], expiry_key = \"expires_at\", \
             expiry_format = \"unix_ms\", refresh_key = \"refresh\" }}]\n\
             check = [\"test\", \"-s\", \"{FILE}\"]\n"
        ),
    )
    .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_in_a_real_workspace_refreshed_and_revoked() {
    if common::unmet().is_some() {
        return;
    }
    let marker = format!("CANARY{}", hex::encode(rand::random::<[u8; 8]>()));
    let providers = tempfile::tempdir().expect("tmp");
    write_provider(providers.path());
    let dir = providers.path().to_owned();
    let h = common::start_with("10.251.1.0/24", move |cfg| {
        cfg.providers_dir = Some(dir);
    })
    .await;
    let app = h.running.as_ref().expect("running").app.clone();
    let (status, _) = h.get("/api/v1/credentials").await;
    assert_eq!(status, 200);
    let user = app
        .store
        .user_by_name("local")
        .await
        .expect("q")
        .expect("local user");
    let ws = h.ready_sandbox("workspace").await;

    // A record as a login stores it, already delivered once (to a home
    // that no longer has it).
    let first = json!({ "token": format!("{marker}-v1"), "refresh": "r1", "expires_at": now_ms() + 120_000 });
    let files =
        json!({ "files": [{ "path": FILE, "contents_b64": base64_of(&first.to_string()) }] });
    let sealed = app.vault.read().await.seal(
        files.to_string().as_bytes(),
        &record_aad(&user.id, PROVIDER, "login1"),
    );
    let now = now_ms();
    app.store
        .replace_credential(&CredentialRow {
            owner_id: user.id.clone(),
            provider: PROVIDER.into(),
            login_id: "login1".into(),
            sealed: sealed.clone(),
            key_id: app.vault.read().await.current_key_id().to_owned(),
            created_at: now,
            updated_at: now,
            delivered_at: Some(now),
        })
        .await
        .expect("record");
    app.credentials_captured(&user.id, PROVIDER, "login1").await;

    // The check finds the file missing and delivers it through the agent.
    app.check_credentials_once().await;
    let out = h
        .exec(
            &ws,
            &["sh", "-c", &format!("stat -c '%a %U' {FILE}; cat {FILE}")],
        )
        .await;
    let text = out["stdout"].as_str().unwrap_or("");
    assert!(text.starts_with("600 airlock\n"), "{out}");
    assert!(text.contains(&format!("{marker}-v1")), "{out}");
    let (_, creds) = h.get("/api/v1/credentials").await;
    assert_eq!(creds["credentials"][0]["status"], "expiring", "{creds}");
    assert_eq!(creds["credentials"][0]["version"], 1, "{creds}");

    // The "CLI" refreshes its tokens in the workspace (temp file, rename).
    let second = json!({ "token": format!("{marker}-v2"), "refresh": "r2", "expires_at": now_ms() + 7_200_000 });
    let script = format!(
        "printf '%s' '{}' > .testkeep/.tmp && mv .testkeep/.tmp {FILE}",
        second
    );
    let out = h.exec(&ws, &["sh", "-c", &script]).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    app.check_credentials_once().await;
    app.check_credentials_once().await;
    let (_, creds) = h.get("/api/v1/credentials").await;
    let c = &creds["credentials"][0];
    assert_eq!(c["version"], 2, "{creds}");
    assert_eq!(c["status"], "healthy", "{creds}");
    assert_eq!(c["workspace_sandbox_id"], ws.as_str(), "{creds}");
    let record = app
        .store
        .credential(&user.id, PROVIDER)
        .await
        .expect("q")
        .expect("record");
    assert_ne!(record.sealed, sealed, "the old version is gone");
    let opened = app
        .vault
        .read()
        .await
        .open(&record.sealed, &record_aad(&user.id, PROVIDER, "login1"))
        .expect("opens");
    let opened =
        String::from_utf8_lossy(secrecy::ExposeSecret::expose_secret(&opened)).into_owned();
    assert!(
        opened.contains(&base64_of(&second.to_string())),
        "the vault holds the refreshed file"
    );

    // Revoke: the file leaves the workspace; the second is a no-op.
    for _ in 0..2 {
        let resp = h
            .http
            .delete(h.url(&format!("/api/v1/credentials/{PROVIDER}")))
            .send()
            .await
            .expect("delete");
        assert_eq!(resp.status(), 204);
    }
    let out = h.exec(&ws, &["test", "-e", FILE]).await;
    assert_eq!(out["exit_code"], 1, "the file is gone: {out}");
    app.check_credentials_once().await;
    let out = h.exec(&ws, &["test", "-e", FILE]).await;
    assert_eq!(out["exit_code"], 1, "and not delivered again: {out}");
    let (_, creds) = h.get("/api/v1/credentials").await;
    assert_eq!(creds["credentials"], json!([]), "{creds}");

    let (_, audit) = h.get("/api/v1/audit").await;
    let kinds: Vec<&str> = audit["events"]
        .as_array()
        .expect("events")
        .iter()
        .rev()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["captured", "delivered", "recaptured", "revoked"],
        "{audit}"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("airlock_credential_events_total{kind=\"recaptured\"} 1"),
        "{metrics}"
    );
    for text in [creds.to_string(), audit.to_string(), metrics] {
        assert!(!text.contains(&marker), "the canary in an answer: {text}");
    }
    let (status, _) = h.delete(&format!("/api/v1/sandboxes/{ws}")).await;
    assert_eq!(status, 202);
    h.wait_state(&ws, "stopped", std::time::Duration::from_secs(60))
        .await;
    h.shutdown().await;
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
