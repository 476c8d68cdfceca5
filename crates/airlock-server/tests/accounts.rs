//! Identities, admin rights and the vault against the real control plane on
//! port 0. No sandbox boots here: the server gets the real nspawn driver over
//! an empty data dir and an image it never uses, so these run without root.

use airlock_drivers::host::RealHost;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::ImageRef;
use airlock_server::app::logins::state::LoginState;
use airlock_server::app::{auth, keyring};
use airlock_server::config::Config;
use airlock_server::instance;
use airlock_server::server::{self, Running, StartError};
use airlock_server::store::{CredentialRow, LoginRow};
use airlock_server::vault::Vault;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        address_pool: "10.243.0.0/24".into(),
        webrtc: false,
        ..Config::default()
    }
}

async fn launch(cfg: &Config) -> Result<Running, StartError> {
    let driver = Arc::new(NspawnDriver::new(
        NspawnConfig::new(cfg.data_dir.join("sandboxes")),
        Arc::new(RealHost),
    ));
    let image = ImageRef {
        build_id: "unused".into(),
        layers: Vec::new(),
    };
    server::start(cfg, image, driver).await
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn of(running: &Running) -> Self {
        Api {
            base: format!("http://{}", running.addr),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_an_admin_and_a_rotated_token_dies_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let running = launch(&config(tmp.path())).await.expect("starts");
    let api = Api::of(&running);
    let app = running.app.clone();
    let (_, bob) = app.add_user("bob").await.expect("bob");
    let (boss_row, boss) = app.add_admin("boss").await.expect("boss");
    assert!(boss_row.admin);
    use reqwest::Method as M;

    let account = json!({"host": "127.0.0.1", "username": "acct", "password": "pw-canary",
                         "port_min": 30001, "port_max": 30002});
    let upstream = json!({"url": "http://me:pw-canary@127.0.0.1:3128"});
    let admin_calls: Vec<(M, &str, Option<Value>)> = vec![
        (M::GET, "/api/v1/egress/settings", None),
        (
            M::PUT,
            "/api/v1/egress/settings",
            Some(json!({"echo_url": null})),
        ),
        (M::PUT, "/api/v1/egress/account", Some(account.clone())),
        (M::GET, "/api/v1/egress/account", None),
        (M::PUT, "/api/v1/egress/users/bob", Some(upstream.clone())),
        (M::GET, "/api/v1/egress/users/bob", None),
        (M::DELETE, "/api/v1/egress/users/bob", None),
        (M::DELETE, "/api/v1/egress/account", None),
    ];
    // The token-less local user and a plain user: 403, and nothing changes.
    for who in [None, Some(bob.as_str())] {
        for (method, path, body) in &admin_calls {
            let (status, answer) = api.call(method.clone(), path, who, body.clone()).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (403, Some("forbidden")),
                "{method} {path} as {who:?}: {answer}"
            );
        }
    }
    assert!(app.store.egress_account().await.expect("q").is_none());
    // The local user still does everything that is not admin.
    let (status, body) = api.call(M::GET, "/api/v1/sandboxes", None, None).await;
    assert_eq!(status, 200, "{body}");
    // The admin's token: each call goes through.
    for (method, path, body) in &admin_calls {
        let (status, answer) = api
            .call(method.clone(), path, Some(&boss), body.clone())
            .await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} as the admin: {status} {answer}"
        );
        assert!(!answer.to_string().contains("pw-canary"), "{answer}");
    }

    // Rotation: the old token gets 401 on the very next request.
    let fresh = auth::rotate_token(&app.store, "boss")
        .await
        .expect("rotate");
    assert_ne!(fresh, boss);
    let (status, _) = api
        .call(M::GET, "/api/v1/sandboxes", Some(&boss), None)
        .await;
    assert_eq!(status, 401, "the old token is refused at once");
    let (status, _) = api
        .call(M::GET, "/api/v1/egress/settings", Some(&fresh), None)
        .await;
    assert_eq!(status, 200, "the new token works");
    // Disabled: 401, admin or not; enabled again: it works.
    auth::set_disabled(&app.store, "boss", true)
        .await
        .expect("disable");
    let (status, _) = api
        .call(M::GET, "/api/v1/sandboxes", Some(&fresh), None)
        .await;
    assert_eq!(status, 401);
    auth::set_disabled(&app.store, "boss", false)
        .await
        .expect("enable");
    let (status, _) = api
        .call(M::GET, "/api/v1/sandboxes", Some(&fresh), None)
        .await;
    assert_eq!(status, 200);
    // `local` has no token to rotate and cannot be disabled or removed.
    for err in [
        auth::rotate_token(&app.store, "local").await.map(|_| ()),
        auth::set_disabled(&app.store, "local", true).await,
        auth::remove_user(&app.store, tmp.path(), "local")
            .await
            .map(|_| ()),
    ] {
        assert!(err.expect_err("refused").to_string().contains("local"));
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_refuses() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path());
    let first = launch(&cfg).await.expect("first starts");
    let err = launch(&cfg).await.expect_err("second refused");
    let msg = err.to_string();
    assert!(matches!(err, StartError::Lock(_)), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id()))
            && msg.contains(&tmp.path().display().to_string()),
        "names the holder and the dir: {msg}"
    );
    // The first still serves; once it stops, the data dir is free again.
    let (status, _) = Api::of(&first)
        .call(reqwest::Method::GET, "/api/v1/sandboxes", None, None)
        .await;
    assert_eq!(status, 200);
    first.stop().await;
    let again = launch(&cfg).await.expect("starts after the first stopped");
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_reloads_the_keyring_on_sighup_and_rotation_covers_every_secret() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let running = launch(&config(tmp.path())).await.expect("starts");
    let api = Api::of(&running);
    let app = running.app.clone();
    let (_, boss) = app.add_admin("boss").await.expect("boss");
    app.add_user("bob").await.expect("bob");
    use reqwest::Method as M;
    let (status, body) = api
        .call(
            M::PUT,
            "/api/v1/egress/account",
            Some(&boss),
            Some(
                json!({"host": "127.0.0.1", "username": "acct", "password": "acct-canary",
                        "port_min": 30001, "port_max": 30002}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .call(
            M::PUT,
            "/api/v1/egress/users/bob",
            Some(&boss),
            Some(json!({"url": "http://me:up-canary@127.0.0.1:3128"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let dir = tmp.path();
    let held = instance::holder(dir)
        .expect("probe")
        .expect("the server holds the dir");
    assert_eq!(held.pid, Some(std::process::id()));
    assert_eq!(held.vault_keys.as_deref(), Some("k1"));

    // What `airlock vault rotate` does with a running server.
    let mut vault = Vault::load(dir).expect("keyring");
    assert_eq!(vault.rotate().expect("rotate"), "k2");
    instance::signal_reload(std::process::id()).expect("SIGHUP");
    assert!(
        instance::wait_for_keys(dir, "k2", &vault.key_ids(), Duration::from_secs(10)).await,
        "the server reports the new keyring: {:?}",
        instance::holder(dir)
    );
    assert_eq!(app.vault.read().await.current_key_id(), "k2");
    // A secret set now is sealed with the new key by the server.
    let (status, body) = api
        .call(
            M::PUT,
            "/api/v1/egress/users/bob",
            Some(&boss),
            Some(json!({"url": "http://me:up2-canary@127.0.0.1:3128"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let up = app
        .store
        .egress_upstream(
            &app.store
                .user_by_name("bob")
                .await
                .expect("q")
                .expect("bob")
                .id,
        )
        .await
        .expect("q")
        .expect("row");
    assert_eq!(Vault::key_of(&up.password_sealed), Some("k2"));
    let done = keyring::reseal_and_retire(&app.store, &mut vault)
        .await
        .expect("reseal");
    assert_eq!(
        (done.resealed, done.retired.clone()),
        (1, vec!["k1".to_owned()])
    );
    instance::signal_reload(std::process::id()).expect("SIGHUP");
    assert!(
        instance::wait_for_keys(dir, "k2", &["k2".to_owned()], Duration::from_secs(10)).await,
        "the server dropped the retired key: {:?}",
        instance::holder(dir)
    );
    // Every stored secret opens with what the server now holds.
    let server_vault = app.vault.read().await;
    assert_eq!(server_vault.key_ids(), ["k2"]);
    for v in app.store.sealed_values().await.expect("values") {
        server_vault
            .open(&v.sealed, &keyring::aad_of(&v.at))
            .unwrap_or_else(|e| panic!("{v:?}: {e}"));
    }
    drop(server_vault);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_with_logins_and_credentials_leaves_no_row() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let running = launch(&config(tmp.path())).await.expect("starts");
    let api = Api::of(&running);
    let app = running.app.clone();
    let (carol, token) = app.add_user("carol").await.expect("carol");
    // A finished login that stored credentials, and one still waiting.
    let now = airlock_server::store::now_ms();
    for (id, state) in [
        ("l1", LoginState::Captured),
        ("l2", LoginState::AwaitingUser),
    ] {
        app.store
            .insert_login(&LoginRow {
                id: id.into(),
                owner_id: carol.id.clone(),
                provider: "claude".into(),
                state,
                reason: None,
                login_url: None,
                awaiting_code: false,
                browser_sandbox_id: None,
                workspace_sandbox_id: None,
                created_at: now,
                updated_at: now,
                expires_at: now + 600_000,
                finished_at: None,
            })
            .await
            .expect("login");
    }
    let cred = CredentialRow {
        owner_id: carol.id.clone(),
        provider: "claude".into(),
        login_id: "l1".into(),
        sealed: app.vault.read().await.seal(
            b"x",
            &airlock_server::vault::Aad::new(&carol.id, "credentials:claude", "l1"),
        ),
        key_id: "k1".into(),
        created_at: now,
        updated_at: now,
        delivered_at: None,
    };
    app.store.replace_credential(&cred).await.expect("creds");
    let (boss_user, boss) = app.add_admin("boss").await.expect("boss");
    let (status, _) = api
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/users/carol",
            Some(&boss),
            Some(json!({"url": "http://me:pw@127.0.0.1:3128"})),
        )
        .await;
    assert_eq!(status, 200);
    // Its home volume, with a link out of it; and a volume whose user is
    // gone already (a removal that found it mounted leaves one behind).
    let volumes = tmp.path().join("volumes");
    let home = volumes.join(&carol.id).join("home");
    std::fs::create_dir_all(home.join(".claude")).expect("home");
    std::fs::write(home.join(".claude/.credentials.json"), "signed in").expect("creds");
    let outside = tmp.path().join("not-carols");
    std::fs::write(&outside, "keep").expect("outside");
    std::os::unix::fs::symlink(&outside, home.join("link")).expect("link");
    std::fs::create_dir_all(volumes.join("gone-user").join("home")).expect("orphan");
    std::fs::create_dir_all(volumes.join(&boss_user.id).join("home")).expect("boss");
    // It failed with a foreign-key error before; now it removes everything,
    // and the user's token is refused.
    let outcome = auth::remove_user(&app.store, tmp.path(), "carol")
        .await
        .expect("remove");
    assert_eq!(outcome, auth::Removal::Done);
    let (status, _) = api
        .call(
            reqwest::Method::GET,
            "/api/v1/sandboxes",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 401);
    assert!(app.store.user_by_name("carol").await.expect("q").is_none());
    assert!(app.store.logins_of(&carol.id).await.expect("q").is_empty());
    assert!(app
        .store
        .credentials_of(&carol.id)
        .await
        .expect("q")
        .is_empty());
    assert!(app
        .store
        .egress_upstream(&carol.id)
        .await
        .expect("q")
        .is_none());
    assert!(!volumes.join(&carol.id).exists(), "carol's home is gone");
    assert_eq!(std::fs::read_to_string(&outside).expect("kept"), "keep");
    // The reaper's sweep takes the orphan and leaves a live user's volume.
    app.remove_orphan_volumes().await.expect("sweep");
    assert!(!volumes.join("gone-user").exists());
    assert!(volumes.join(&boss_user.id).join("home").exists());
    running.stop().await;
}
