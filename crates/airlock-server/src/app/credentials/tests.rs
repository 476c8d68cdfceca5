//! Keeping credentials healthy, without root: the real app, store (SQLite in
//! a temp dir) and vault over the fake node and the fake guest, whose
//! workspaces keep a home of files (as delivered, or as a CLI there
//! rewrites them). Nothing of the app, store or vault is faked.

use super::*;
use crate::app::admission::FakeProbe;
use crate::app::agent::fake::FakeGuest;
use crate::app::{AppConfig, FakeForwarders, Seams};
use crate::node::fake::FakeNode;
use crate::store::Store;
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::ImageRef;
use airlock_proto::agent::ExecResponse;
use airlock_proto::login::FileBlob;
use base64::engine::general_purpose::STANDARD as B64;
use std::time::Instant;

const P: &str = "testcli";
const PATH: &str = ".testcli/creds.json";
const CANARY: &str = "CANARY-c0ffee-SECRET";

struct Bed {
    app: Arc<App>,
    guest: Arc<FakeGuest>,
    node: Arc<FakeNode>,
    pool: String,
    store: Store,
    alice: UserRow,
    bob: UserRow,
    dir: tempfile::TempDir,
}

/// Each bed its own /24 of the 10.251.0.0/16 pool.
fn pool() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 256;
    format!("10.251.{n}.0/24")
}

/// A credential file as the test CLI writes it.
fn file(token: &str, refresh: &str, expires_at: i64) -> FileSet {
    let json = serde_json::json!({
        "token": format!("{CANARY}-{token}"),
        "refresh": refresh,
        "expires_at": expires_at,
    });
    FileSet {
        files: vec![FileBlob {
            path: PATH.into(),
            contents_b64: B64.encode(json.to_string()),
        }],
    }
}

impl Bed {
    async fn new() -> Bed {
        let dir = tempfile::tempdir().expect("tmp");
        let providers = dir.path().join("providers");
        std::fs::create_dir_all(&providers).expect("dir");
        std::fs::write(
            providers.join("testcli.toml"),
            format!(
                "name = \"{P}\"\ndisplay_name = \"Test CLI\"\ncommand = [\"testcli\", \"login\"]\n\
                 url_prefixes = [\"https://fake.test/\"]\n\
                 credentials = [{{ path = \"{PATH}\", json_keys = [\"token\"], expiry_key = \"expires_at\", \
                 expiry_format = \"unix_ms\", refresh_key = \"refresh\" }}]\n\
                 check = [\"testcli\", \"status\"]\n"
            ),
        )
        .expect("provider");
        let mut cfg = AppConfig::new(dir.path().to_owned());
        cfg.providers_dir = Some(providers);
        cfg.boot_timeout = Duration::from_secs(5);
        let url = format!("sqlite://{}", dir.path().join("airlock.db").display());
        let store = Store::open(&url).await.expect("store");
        let alice = store.insert_user("u1", "alice", None).await.expect("user");
        let bob = store.insert_user("u2", "bob", None).await.expect("user");
        let node = Arc::new(FakeNode::new());
        let guest = Arc::new(FakeGuest::new(node.clone()));
        let seams = Seams {
            node: node.clone(),
            guest: guest.clone(),
            forwarders: Arc::new(FakeForwarders::default()),
            probe: Arc::new(FakeProbe::new(Some(64 << 30), Some(1 << 40))),
        };
        let image = ImageRef {
            build_id: "build-1".into(),
            layers: vec![],
        };
        let vault = crate::vault::Vault::load(dir.path()).expect("vault");
        let pool_range = pool();
        let pool = AddressPool::parse(&pool_range).expect("pool");
        let app = App::with_seams(cfg, store.clone(), seams, image, pool, vault);
        Bed {
            app,
            guest,
            node,
            pool: pool_range,
            store,
            alice,
            bob,
            dir,
        }
    }

    /// A second control plane over the same database, data dir, vault,
    /// node and guests: another process, with its own per-user locks.
    fn other_process(&self) -> Arc<App> {
        let mut cfg = AppConfig::new(self.dir.path().to_owned());
        cfg.providers_dir = Some(self.dir.path().join("providers"));
        cfg.boot_timeout = Duration::from_secs(5);
        let seams = Seams {
            node: self.node.clone(),
            guest: self.guest.clone(),
            forwarders: Arc::new(FakeForwarders::default()),
            probe: Arc::new(FakeProbe::new(Some(64 << 30), Some(1 << 40))),
        };
        let image = ImageRef {
            build_id: "build-1".into(),
            layers: vec![],
        };
        let vault = crate::vault::Vault::load(self.dir.path()).expect("vault");
        let pool = AddressPool::parse(&self.pool).expect("pool");
        App::with_seams(cfg, self.store.clone(), seams, image, pool, vault)
    }

    /// A ready workspace of `user` named `name`.
    async fn named(&self, user: &UserRow, name: &str) -> String {
        let id = self
            .app
            .create_workspace(user, Some(name), false)
            .await
            .expect("create")
            .row
            .id;
        self.until_ready(&id).await;
        id
    }

    async fn until_ready(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = self.store.sandbox(id).await.expect("q").expect("row");
            if row.state == SandboxState::Ready {
                return;
            }
            assert!(Instant::now() < deadline, "workspace is {}", row.state);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn until_ended(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = self.store.sandbox(id).await.expect("q").expect("row");
            if !row.state.is_live() {
                return;
            }
            assert!(Instant::now() < deadline, "workspace is {}", row.state);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A ready workspace of `user`.
    async fn workspace(&self, user: &UserRow) -> String {
        let id = self
            .app
            .create_sandbox(user, SandboxKind::Workspace)
            .await
            .expect("create")
            .id;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = self.store.sandbox(&id).await.expect("q").expect("row");
            if row.state == SandboxState::Ready {
                return id;
            }
            assert!(Instant::now() < deadline, "workspace is {}", row.state);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What a login's capture and delivery leave: the sealed record (as
    /// the login's `advance` writes it), the hooks the login steps call,
    /// and the files in the workspace.
    async fn signed_in(&self, user: &UserRow, login: &str, files: &FileSet, ws: Option<&str>) {
        let plain = serde_json::to_vec(files).expect("json");
        let sealed = self
            .app
            .vault
            .read()
            .await
            .seal(&plain, &crate::app::logins::aad(&user.id, P, login));
        let now = now_ms();
        self.store
            .replace_credential(&CredentialRow {
                owner_id: user.id.clone(),
                provider: P.into(),
                login_id: login.into(),
                sealed,
                key_id: "k1".into(),
                created_at: now,
                updated_at: now,
                delivered_at: ws.map(|_| now),
            })
            .await
            .expect("record");
        self.app.credentials_captured(&user.id, P, login).await;
        if let Some(ws) = ws {
            for f in &files.files {
                self.guest.put_home_file(ws, &f.path, Some(&f.contents_b64));
            }
            self.app.credentials_delivered(&user.id, P, login, ws).await;
        }
    }

    /// The record's files, opened.
    async fn vault_copy(&self, user: &UserRow) -> Option<FileSet> {
        let cred = self.store.credential(&user.id, P).await.expect("q")?;
        self.app.open_record(&cred).await
    }

    async fn view(&self, user: &UserRow) -> Vec<CredentialView> {
        self.app.credentials_view(user).await.expect("view")
    }

    async fn kinds(&self, user: &UserRow) -> Vec<String> {
        let (rows, _) = self
            .app
            .audit_page(user, None, Some(200))
            .await
            .expect("audit");
        rows.into_iter().rev().map(|r| r.kind).collect()
    }
}

fn ws_file(bed: &Bed, ws: &str) -> Option<String> {
    bed.guest.home_file(ws, PATH)
}

const MIN: i64 = 60_000;

#[test]
fn expiry_formats_are_read_where_the_definition_says() {
    let def = |key: &str, format: ExpiryFormat| CredentialFile {
        path: "a".into(),
        expiry_key: Some(key.into()),
        expiry_format: Some(format),
        ..Default::default()
    };
    let doc =
        br#"{"a":{"ms":1700000000123,"s":1700000000,"t":"2023-11-14T22:13:20Z","bad":"soon"}}"#;
    assert_eq!(
        expiry_of(&def("a.ms", ExpiryFormat::UnixMs), doc),
        Some(1_700_000_000_123)
    );
    assert_eq!(
        expiry_of(&def("a.s", ExpiryFormat::UnixS), doc),
        Some(1_700_000_000_000)
    );
    assert_eq!(
        expiry_of(&def("a.t", ExpiryFormat::Rfc3339), doc),
        Some(1_700_000_000_000)
    );
    for (key, f) in [
        ("a.bad", ExpiryFormat::UnixMs),
        ("a.bad", ExpiryFormat::Rfc3339),
        ("a.missing", ExpiryFormat::UnixMs),
        ("a.ms", ExpiryFormat::JwtExp),
    ] {
        assert_eq!(expiry_of(&def(key, f), doc), None, "{key}");
    }
    assert_eq!(
        expiry_of(&def("a.ms", ExpiryFormat::UnixMs), b"not json"),
        None
    );
    assert_eq!(expiry_of(&CredentialFile::default(), doc), None);
    let jwt = format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1700000000,"sub":"x"}"#)
    );
    let doc = serde_json::json!({ "tokens": { "access_token": jwt } }).to_string();
    assert_eq!(
        expiry_of(
            &def("tokens.access_token", ExpiryFormat::JwtExp),
            doc.as_bytes()
        ),
        Some(1_700_000_000_000)
    );
}

/// The three CLIs' files, shaped as their packages write them (the field
/// names and units read in claude-code's and gemini-cli's bundles and the
/// codex binary; see docs/credentials.md), against the image's provider data.
#[test]
fn the_real_clis_files_have_their_expiry_where_the_providers_say() {
    let providers = crate::app::logins::providers::Providers::load(None).expect("providers");
    let exp_s: i64 = 1_900_000_000;
    let jwt = format!(
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{}.sig",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            r#"{{"aud":["https://api.openai.com/v1"],"exp":{exp_s},"iat":1899000000}}"#
        ))
    );
    let files = [
        (
            "claude",
            serde_json::json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-x", "refreshToken": "sk-ant-ort01-y",
                "expiresAt": exp_s * 1000, "scopes": ["user:inference"], "subscriptionType": "pro"}}),
            serde_json::json!({"claudeAiOauth": {"accessToken": "", "refreshToken": "", "expiresAt": 0}}),
        ),
        (
            "codex",
            serde_json::json!({"OPENAI_API_KEY": null, "tokens": {"id_token": "a.b.c", "access_token": jwt,
                "refresh_token": "rt_x", "account_id": "acc"}, "last_refresh": "2026-12-01T10:00:00Z"}),
            serde_json::json!({"OPENAI_API_KEY": null, "tokens": {"id_token": "", "access_token": jwt,
                "refresh_token": "", "account_id": "acc"}}),
        ),
        (
            "gemini",
            serde_json::json!({"access_token": "ya29.x", "refresh_token": "1//y", "scope": "openid",
                "token_type": "Bearer", "id_token": "a.b.c", "expiry_date": exp_s * 1000}),
            serde_json::json!({"access_token": "ya29.x", "refresh_token": "", "expiry_date": exp_s * 1000}),
        ),
    ];
    for (name, live, dead) in files {
        let def = providers.get(name).expect(name);
        let cred = &def.credentials[0];
        let bytes = live.to_string().into_bytes();
        assert_eq!(expiry_of(cred, &bytes), Some(exp_s * 1000), "{name}");
        assert_eq!(refreshable(cred, &bytes), Some(true), "{name}");
        assert_eq!(
            refreshable(cred, dead.to_string().as_bytes()),
            Some(false),
            "{name}"
        );
    }
}

#[test]
fn the_status_follows_from_what_was_read() {
    let now = 1_000_000_000;
    let w = 30 * MIN;
    let j = |exp, refresh, check| judge(now, w, exp, refresh, check).0;
    assert_eq!(j(None, None, None), Health::Healthy);
    assert_eq!(
        j(Some(now + 2 * 60 * MIN), Some(true), Some(true)),
        Health::Healthy
    );
    assert_eq!(j(Some(now + 2 * MIN), Some(true), None), Health::Expiring);
    assert_eq!(j(Some(now - 1), Some(true), None), Health::Expired);
    assert_eq!(
        j(Some(now + 2 * 60 * MIN), Some(false), Some(true)),
        Health::RefreshFailed
    );
    assert_eq!(
        j(Some(now - 1), Some(true), Some(false)),
        Health::RefreshFailed
    );
    assert_eq!(
        j(Some(now + 2 * 60 * MIN), Some(true), Some(false)),
        Health::Revoked
    );
    assert_eq!(j(None, None, Some(false)), Health::Revoked);
}

/// A token that expires in two minutes is refreshed by the CLI in the
/// workspace: the check seals the new file as version 2, the old version
/// is gone from the store, and the trail says so once.
#[tokio::test]
async fn a_refreshed_file_is_captured_back_as_a_new_version() {
    let bed = Bed::new().await;
    let ws = bed.workspace(&bed.alice).await;
    let first = file("v1", "r1", now_ms() + 2 * MIN);
    bed.signed_in(&bed.alice, "login1", &first, Some(&ws)).await;
    let old_sealed = bed
        .store
        .credential(&bed.alice.id, P)
        .await
        .expect("q")
        .expect("record")
        .sealed;
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].status, Some(Health::Expiring));
    assert!(!v[0].sign_in_again());

    bed.app.check_credentials_once().await;
    assert_eq!(bed.vault_copy(&bed.alice).await, Some(first.clone()));
    assert_eq!(bed.kinds(&bed.alice).await, ["captured", "delivered"]);

    // The CLI refreshes: a new access token, a new expiry.
    let refreshed = file("v2", "r2", now_ms() + 120 * MIN);
    bed.guest
        .put_home_file(&ws, PATH, Some(&refreshed.files[0].contents_b64));
    bed.app.check_credentials_once().await;
    assert_eq!(bed.vault_copy(&bed.alice).await, Some(refreshed.clone()));
    let cred = bed
        .store
        .credential(&bed.alice.id, P)
        .await
        .expect("q")
        .expect("record");
    assert_ne!(cred.sealed, old_sealed);
    assert_eq!(cred.login_id, "login1");
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].status, Some(Health::Healthy));
    let h = v[0].health.clone().expect("health");
    assert_eq!(h.version, 2);
    assert_eq!(h.workspace_sandbox_id.as_deref(), Some(ws.as_str()));
    assert!(h.expires_at.is_some_and(|e| e > now_ms() + 100 * MIN));
    // Checked again with nothing changed: no new event, same version.
    bed.app.check_credentials_once().await;
    assert_eq!(
        bed.kinds(&bed.alice).await,
        ["captured", "delivered", "recaptured"]
    );
    assert_eq!(
        bed.view(&bed.alice).await[0]
            .health
            .as_ref()
            .map(|h| h.version),
        Some(2)
    );
    // The old ciphertext is in no row of the store.
    let all = bed.store.all_credentials().await.expect("all");
    assert!(all.iter().all(|c| c.sealed != old_sealed));
}

/// A refused refresh (the CLI empties its refresh token) is
/// `refresh_failed` with "Sign in again", audited once; the dead file is
/// not captured over the vault's copy.
#[tokio::test]
async fn a_refused_refresh_is_refresh_failed_and_asks_for_a_new_login() {
    let bed = Bed::new().await;
    let ws = bed.workspace(&bed.alice).await;
    let first = file("v1", "r1", now_ms() + 2 * MIN);
    bed.signed_in(&bed.alice, "login1", &first, Some(&ws)).await;
    let dead = file("dead", "", 0);
    bed.guest
        .put_home_file(&ws, PATH, Some(&dead.files[0].contents_b64));
    bed.app.check_credentials_once().await;
    bed.app.check_credentials_once().await;
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].status, Some(Health::RefreshFailed));
    assert_eq!(v[0].refreshable, Some(false));
    assert!(v[0].sign_in_again());
    assert_eq!(bed.vault_copy(&bed.alice).await, Some(first));
    assert_eq!(
        bed.kinds(&bed.alice).await,
        ["captured", "delivered", "refresh_failed"]
    );
    let m = bed.app.metrics.render(&[]);
    assert!(
        m.contains("airlock_credentials{provider=\"testcli\",status=\"refresh_failed\"} 1"),
        "{m}"
    );
}

/// The provider's check fails while the token has not expired: revoked.
#[tokio::test]
async fn a_failing_check_with_a_live_token_is_revoked() {
    let bed = Bed::new().await;
    let ws = bed.workspace(&bed.alice).await;
    bed.signed_in(
        &bed.alice,
        "login1",
        &file("v1", "r1", now_ms() + 600 * MIN),
        Some(&ws),
    )
    .await;
    bed.app.check_credentials_once().await;
    assert_eq!(bed.view(&bed.alice).await[0].status, Some(Health::Healthy));
    assert!(bed
        .guest
        .execs()
        .iter()
        .any(|(s, argv)| *s == ws && argv == &["testcli", "status"]));
    bed.guest.script(
        "testcli",
        ExecResponse {
            exit_code: Some(1),
            stdout: "Not logged in".into(),
            stderr: String::new(),
            timed_out: false,
            truncated: false,
        },
    );
    bed.app.check_credentials_once().await;
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].status, Some(Health::Revoked));
    assert!(v[0].sign_in_again());
}

/// Files gone from a running workspace (a rebuilt home) come back from the vault.
#[tokio::test]
async fn missing_files_are_delivered_again() {
    let bed = Bed::new().await;
    let ws = bed.workspace(&bed.alice).await;
    let first = file("v1", "r1", now_ms() + 600 * MIN);
    bed.signed_in(&bed.alice, "login1", &first, Some(&ws)).await;
    bed.guest.put_home_file(&ws, PATH, None);
    bed.app.check_credentials_once().await;
    assert_eq!(
        ws_file(&bed, &ws),
        Some(first.files[0].contents_b64.clone())
    );
    assert_eq!(
        bed.kinds(&bed.alice).await,
        ["captured", "delivered", "delivered"]
    );
}

/// Revoke removes the workspace's files and the vault row; the second is a
/// no-op; another user's record stays; bad names are refused.
#[tokio::test]
async fn revocation_removes_files_and_record_once_and_only_the_callers() {
    let bed = Bed::new().await;
    let ws = bed.workspace(&bed.alice).await;
    bed.signed_in(
        &bed.alice,
        "login1",
        &file("a", "r", now_ms() + 600 * MIN),
        Some(&ws),
    )
    .await;
    bed.signed_in(
        &bed.bob,
        "login2",
        &file("b", "r", now_ms() + 600 * MIN),
        None,
    )
    .await;
    assert!(ws_file(&bed, &ws).is_some());
    assert!(bed
        .app
        .revoke_credentials(&bed.alice, P)
        .await
        .expect("revoke"));
    assert_eq!(ws_file(&bed, &ws), None);
    assert!(bed
        .store
        .credential(&bed.alice.id, P)
        .await
        .expect("q")
        .is_none());
    assert!(bed.view(&bed.alice).await.is_empty());
    assert!(bed
        .store
        .revocations_of(&bed.alice.id)
        .await
        .expect("q")
        .is_empty());
    assert!(!bed
        .app
        .revoke_credentials(&bed.alice, P)
        .await
        .expect("again"));
    assert!(!bed
        .app
        .revoke_credentials(&bed.alice, "never")
        .await
        .expect("none"));
    assert_eq!(
        bed.kinds(&bed.alice).await,
        ["captured", "delivered", "revoked"]
    );
    // Bob's record and trail are his own and untouched.
    assert!(bed
        .store
        .credential(&bed.bob.id, P)
        .await
        .expect("q")
        .is_some());
    assert_eq!(bed.kinds(&bed.bob).await, ["captured"]);
    for bad in ["", "../x", "A", &"x".repeat(33)] {
        assert!(
            matches!(
                bed.app.revoke_credentials(&bed.alice, bad).await,
                Err(AppError::BadInput(_))
            ),
            "{bad:?}"
        );
    }
    // A check afterwards brings nothing back.
    bed.app.check_credentials_once().await;
    assert_eq!(ws_file(&bed, &ws), None);
}

/// Revoked while no workspace runs: the files go at the next check of a
/// ready one (the home outlives its workspace), and are not delivered again.
#[tokio::test]
async fn revoked_without_a_workspace_the_files_go_when_one_runs() {
    let bed = Bed::new().await;
    let f = file("a", "r", now_ms() + 600 * MIN);
    bed.signed_in(&bed.alice, "login1", &f, None).await;
    assert!(bed
        .app
        .revoke_credentials(&bed.alice, P)
        .await
        .expect("revoke"));
    assert_eq!(
        bed.store.revocations_of(&bed.alice.id).await.expect("q"),
        [P]
    );
    let ws = bed.workspace(&bed.alice).await;
    // The persistent home still holds the old files.
    bed.guest
        .put_home_file(&ws, PATH, Some(&f.files[0].contents_b64));
    bed.app.check_credentials_once().await;
    assert_eq!(ws_file(&bed, &ws), None);
    assert!(bed
        .store
        .revocations_of(&bed.alice.id)
        .await
        .expect("q")
        .is_empty());
    // A new login for the provider is not undone by the old revocation.
    bed.signed_in(&bed.alice, "login3", &f, Some(&ws)).await;
    bed.app.check_credentials_once().await;
    assert!(ws_file(&bed, &ws).is_some());
}

#[tokio::test]
async fn the_audit_pages_are_bounded_and_the_callers_own() {
    let bed = Bed::new().await;
    for i in 0..5 {
        bed.app
            .audit(
                &bed.alice.id,
                AuditKind::Delivered,
                P,
                Some("ws"),
                Some(&format!("l{i}")),
                None,
            )
            .await;
    }
    let (page1, next) = bed
        .app
        .audit_page(&bed.alice, None, Some(2))
        .await
        .expect("p1");
    assert_eq!(page1.len(), 2);
    let (page2, next2) = bed
        .app
        .audit_page(&bed.alice, next.as_deref(), Some(2))
        .await
        .expect("p2");
    let (page3, next3) = bed
        .app
        .audit_page(&bed.alice, next2.as_deref(), Some(2))
        .await
        .expect("p3");
    assert_eq!((page2.len(), page3.len(), next3), (2, 1, None));
    let mut logins: Vec<_> = [page1, page2, page3]
        .concat()
        .into_iter()
        .filter_map(|r| r.login_id)
        .collect();
    logins.sort();
    assert_eq!(logins, ["l0", "l1", "l2", "l3", "l4"]);
    for (before, limit) in [
        (None, Some(0)),
        (None, Some(201)),
        (Some("zz"), None),
        (Some("1-x'"), None),
    ] {
        assert!(
            matches!(
                bed.app.audit_page(&bed.alice, before, limit).await,
                Err(AppError::BadInput(_))
            ),
            "{before:?} {limit:?}"
        );
    }
    assert!(bed
        .app
        .audit_page(&bed.bob, None, None)
        .await
        .expect("bob")
        .0
        .is_empty());
}

/// The canary in the credential file reaches no API answer, no metric and
/// no byte of the database, through capture, delivery, re-capture, a
/// refused refresh and revocation.
#[tokio::test]
async fn the_secret_appears_in_no_answer_metric_or_database_byte() {
    let bed = Bed::new().await;
    let ws = bed.workspace(&bed.alice).await;
    bed.signed_in(
        &bed.alice,
        "login1",
        &file("v1", "r1", now_ms() + 2 * MIN),
        Some(&ws),
    )
    .await;
    bed.app.check_credentials_once().await;
    let refreshed = file("v2", "r2", now_ms() + 120 * MIN);
    bed.guest
        .put_home_file(&ws, PATH, Some(&refreshed.files[0].contents_b64));
    bed.app.check_credentials_once().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let local = bed.app.ensure_local_user().await.expect("local");
    // The API answers as the local user: give it the same history.
    bed.signed_in(
        &local,
        "login9",
        &file("v9", "r9", now_ms() + 2 * MIN),
        None,
    )
    .await;
    bed.app.check_credentials_once().await;
    let mut rx2 = rx.clone();
    let server = tokio::spawn(crate::http::serve(listener, bed.app.clone(), async move {
        let _ = rx2.wait_for(|s| *s).await;
    }));
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("http://{addr}{path}");
        async move {
            let resp = http.get(url).send().await.expect("get");
            (resp.status(), resp.text().await.expect("text"))
        }
    };
    let (status, creds) = get("/api/v1/credentials").await;
    assert_eq!(status, 200, "{creds}");
    assert!(creds.contains("\"status\":\"expiring\""), "{creds}");
    assert!(creds.contains("\"expires_at\":\"20"), "{creds}");
    let (_, audit) = get("/api/v1/audit?limit=200").await;
    assert!(audit.contains("\"kind\":\"captured\""), "{audit}");
    let (status, bad) = get("/api/v1/audit?limit=0").await;
    assert_eq!(status, 400, "{bad}");
    let (status, bad) = get("/api/v1/audit?what=1").await;
    assert_eq!(status, 400, "{bad}");
    let (_, openapi) = get("/api/v1/openapi.json").await;
    assert!(
        openapi.contains("/api/v1/audit") && openapi.contains("/api/v1/credentials/{provider}")
    );
    let del = http
        .delete(format!("http://{addr}/api/v1/credentials/{P}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(del.status(), 204);
    let del = http
        .delete(format!("http://{addr}/api/v1/credentials/{P}"))
        .send()
        .await
        .expect("delete again");
    assert_eq!(del.status(), 204);
    let (_, audit_after) = get("/api/v1/audit").await;
    assert_eq!(
        audit_after.matches("\"kind\":\"revoked\"").count(),
        1,
        "{audit_after}"
    );
    let (_, metrics) = get("/metrics").await;
    assert!(
        metrics.contains("airlock_credential_events_total"),
        "{metrics}"
    );
    let _ = stop.send(true);
    let _ = server.await;

    for (what, text) in [
        ("credentials", &creds),
        ("audit", &audit),
        ("audit after", &audit_after),
        ("metrics", &metrics),
    ] {
        assert!(!text.contains(CANARY), "the secret is in the {what} answer");
    }
    // Every file of the database (with its write-ahead log).
    let b64 = B64.encode(CANARY);
    for entry in std::fs::read_dir(bed.dir.path()).expect("dir").flatten() {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let hay = String::from_utf8_lossy(&bytes);
        assert!(
            !hay.contains(CANARY) && !hay.contains(&b64[..16]),
            "the secret is in {}",
            entry.path().display()
        );
    }
}

/// The script that reads files back from a workspace, run for real by
/// `sh` in a home of temp files: regular files come back whole, links and
/// absent files are left out, and the output parses.
#[tokio::test]
async fn the_workspace_reader_script_reads_what_the_agent_would() {
    let home = tempfile::tempdir().expect("home");
    std::fs::create_dir_all(home.path().join(".t")).expect("dir");
    std::fs::write(
        home.path().join(".t/a.json"),
        format!("{{\"k\":\"{CANARY}\"}}\n"),
    )
    .expect("a");
    std::os::unix::fs::symlink("/etc/hostname", home.path().join(".t/link")).expect("link");
    let req = crate::app::agent::read_files_request(&[
        ".t/a.json".into(),
        ".t/link".into(),
        ".t/none".into(),
        "../escape".into(),
    ]);
    assert!(!req.argv.iter().any(|a| a == "../escape"));
    let out = tokio::process::Command::new(&req.argv[0])
        .args(&req.argv[1..])
        .envs(&req.env)
        .current_dir(home.path())
        .output()
        .await
        .expect("sh");
    let resp = ExecResponse {
        exit_code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        timed_out: false,
        truncated: false,
    };
    let set = crate::app::agent::parse_read_files(&resp).expect("parse");
    assert_eq!(set.files.len(), 1, "{resp:?}");
    assert_eq!(set.files[0].path, ".t/a.json");
    assert_eq!(
        B64.decode(&set.files[0].contents_b64).expect("b64"),
        format!("{{\"k\":\"{CANARY}\"}}\n").into_bytes()
    );
}

// ---- several workspaces per user ----

/// Workspaces are named; each name is live once; each keeps its home
/// under its name across a rebuild; a bad name changes nothing.
#[tokio::test]
async fn each_named_workspace_has_its_own_home_kept_across_rebuilds() {
    let bed = Bed::new().await;
    let a = bed.workspace(&bed.alice).await;
    let b = bed.named(&bed.alice, "proj").await;
    let home = |id: &str| {
        bed.node
            .instance(id)
            .expect("on the node")
            .req
            .home_volume
            .expect("a home")
    };
    let (home_a, home_b) = (home(&a), home(&b));
    assert!(home_a.ends_with(format!("volumes/{}/home", bed.alice.id)));
    assert!(home_b.ends_with(format!("volumes/{}/workspaces/proj/home", bed.alice.id)));
    // Each name once while live, per user: bob may have his own "proj".
    for name in [None, Some("proj")] {
        let again = bed.app.create_workspace(&bed.alice, name, false).await;
        assert!(matches!(again, Err(AppError::Conflict(_))), "{again:?}");
    }
    let bobs = bed.named(&bed.bob, "proj").await;
    assert!(home(&bobs).ends_with(format!("volumes/{}/workspaces/proj/home", bed.bob.id)));
    for bad in ["../x", "Proj", "", "-a", "a/b"] {
        let got = bed.app.create_workspace(&bed.alice, Some(bad), false).await;
        assert!(
            matches!(got, Err(AppError::BadInput(_))),
            "{bad:?}: {got:?}"
        );
    }
    // Rebuilt under the same name: the same home, a new sandbox.
    bed.app
        .delete_sandbox(&bed.alice, &b)
        .await
        .expect("delete");
    bed.until_ended(&b).await;
    let b2 = bed.named(&bed.alice, "proj").await;
    assert_ne!(b2, b);
    assert_eq!(home(&b2), home_b);
    let names: Vec<(String, Option<String>)> = bed
        .app
        .workspaces(&bed.alice)
        .await
        .expect("list")
        .into_iter()
        .map(|w| (w.name, w.sandbox.map(|s| s.id)))
        .collect();
    assert_eq!(
        names,
        [
            ("default".to_owned(), Some(a.clone())),
            ("proj".to_owned(), Some(b2.clone()))
        ]
    );
}

/// Delivered on request to a second workspace: the files land there,
/// audited; a missing workspace or record is 404, another user's is not
/// reachable, a bad name is 400.
#[tokio::test]
async fn stored_credentials_are_delivered_to_another_workspace_on_request() {
    let bed = Bed::new().await;
    let a = bed.workspace(&bed.alice).await;
    let b = bed.named(&bed.alice, "proj").await;
    let first = file("v1", "r1", now_ms() + 600 * MIN);
    bed.signed_in(&bed.alice, "login1", &first, Some(&a)).await;
    assert_eq!(ws_file(&bed, &b), None);
    let to = bed
        .app
        .deliver_to(&bed.alice, P, Some("proj"))
        .await
        .expect("deliver");
    assert_eq!(to.id, b);
    assert_eq!(ws_file(&bed, &b), Some(first.files[0].contents_b64.clone()));
    assert_eq!(
        bed.kinds(&bed.alice).await,
        ["captured", "delivered", "delivered"]
    );
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].workspaces, ["default", "proj"]);
    for (user, provider, name, want) in [
        (&bed.alice, P, Some("nope"), "404"),
        (&bed.alice, "other", Some("proj"), "404"),
        (&bed.bob, P, None, "404"),
        (&bed.alice, P, Some("../x"), "400"),
        (&bed.alice, "../x", None, "400"),
    ] {
        let got = bed.app.deliver_to(user, provider, name).await;
        let code = match &got {
            Err(AppError::NotFound(_)) => "404",
            Err(AppError::BadInput(_)) => "400",
            other => panic!("{provider} {name:?}: {other:?}"),
        };
        assert_eq!(code, want, "{provider} {name:?}");
    }
    assert_eq!(bed.kinds(&bed.alice).await.len(), 3, "nothing more audited");
}

/// The check looks into every workspace the files went to: a refresh in
/// the second is captured back and carried to the first; a refused
/// refresh in the first is `refresh_failed`, naming that workspace.
#[tokio::test]
async fn the_check_covers_every_workspace_the_files_went_to() {
    let bed = Bed::new().await;
    let a = bed.workspace(&bed.alice).await;
    let b = bed.named(&bed.alice, "proj").await;
    bed.signed_in(
        &bed.alice,
        "login1",
        &file("v1", "r1", now_ms() + 2 * MIN),
        Some(&a),
    )
    .await;
    bed.app
        .deliver_to(&bed.alice, P, Some("proj"))
        .await
        .expect("deliver");
    // The CLI in "proj" refreshes.
    let refreshed = file("v2", "r2", now_ms() + 120 * MIN);
    bed.guest
        .put_home_file(&b, PATH, Some(&refreshed.files[0].contents_b64));
    bed.app.check_credentials_once().await;
    assert_eq!(bed.vault_copy(&bed.alice).await, Some(refreshed.clone()));
    bed.app.check_credentials_once().await;
    assert_eq!(
        ws_file(&bed, &a),
        Some(refreshed.files[0].contents_b64.clone()),
        "the first workspace gets the refreshed files, not the other way round"
    );
    assert_eq!(bed.vault_copy(&bed.alice).await, Some(refreshed.clone()));
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].status, Some(Health::Healthy));
    assert_eq!(v[0].health.as_ref().map(|h| h.version), Some(2));
    // A refused refresh in "default" while "proj" is fine: the worse wins.
    let dead = file("dead", "", 0);
    bed.guest
        .put_home_file(&a, PATH, Some(&dead.files[0].contents_b64));
    bed.app.check_credentials_once().await;
    let v = bed.view(&bed.alice).await;
    assert_eq!(v[0].status, Some(Health::RefreshFailed));
    assert_eq!(
        v[0].health
            .as_ref()
            .and_then(|h| h.workspace_sandbox_id.clone()),
        Some(a.clone())
    );
    assert_eq!(bed.vault_copy(&bed.alice).await, Some(refreshed));
    let kinds = bed.kinds(&bed.alice).await;
    assert_eq!(
        kinds,
        [
            "captured",
            "delivered",
            "delivered",
            "recaptured",
            "delivered",
            "refresh_failed"
        ]
    );
}

/// Revocation takes the files out of every ready workspace, and out of a
/// stopped one when it runs again under its name (its home kept them).
#[tokio::test]
async fn revocation_reaches_every_workspace_even_one_not_running() {
    let bed = Bed::new().await;
    let a = bed.workspace(&bed.alice).await;
    let b = bed.named(&bed.alice, "proj").await;
    let c = bed.named(&bed.alice, "side").await;
    let first = file("v1", "r1", now_ms() + 600 * MIN);
    bed.signed_in(&bed.alice, "login1", &first, Some(&a)).await;
    for name in ["proj", "side"] {
        bed.app
            .deliver_to(&bed.alice, P, Some(name))
            .await
            .expect("deliver");
    }
    // "side" stops with the files in its home.
    bed.app
        .delete_sandbox(&bed.alice, &c)
        .await
        .expect("delete");
    bed.until_ended(&c).await;
    assert!(bed
        .app
        .revoke_credentials(&bed.alice, P)
        .await
        .expect("revoke"));
    assert_eq!(ws_file(&bed, &a), None);
    assert_eq!(ws_file(&bed, &b), None);
    // "side" runs again; its kept home still holds the files until the check.
    let c2 = bed.named(&bed.alice, "side").await;
    bed.guest
        .put_home_file(&c2, PATH, Some(&first.files[0].contents_b64));
    bed.app.check_credentials_once().await;
    assert_eq!(ws_file(&bed, &c2), None);
    assert!(bed
        .store
        .placements_of(&bed.alice.id)
        .await
        .expect("q")
        .is_empty());
    // And the check does not bring them back anywhere.
    bed.app.check_credentials_once().await;
    for ws in [&a, &b, &c2] {
        assert_eq!(ws_file(&bed, ws), None, "{ws}");
    }
}

/// A delivery in one process races a revocation in another (each with its
/// own per-user lock): the delivery reads the record, the revocation runs
/// whole (its sweep finds nothing new to remove), then the delivery writes.
/// The store's revocation generation makes the delivery take its files
/// back out; without it the revoked files would stay in the workspace.
#[tokio::test]
async fn a_delivery_racing_a_revocation_in_another_process_leaves_no_files() {
    let bed = Bed::new().await;
    let a = bed.workspace(&bed.alice).await;
    let b = bed.named(&bed.alice, "proj").await;
    let first = file("v1", "r1", now_ms() + 600 * MIN);
    bed.signed_in(&bed.alice, "login1", &first, Some(&a)).await;
    let other = bed.other_process();
    let gate = bed.guest.hold_deliveries();
    let reached = gate.reached.notified();
    let app = bed.app.clone();
    let alice = bed.alice.clone();
    let delivery = tokio::spawn(async move { app.deliver_to(&alice, P, Some("proj")).await });
    reached.await;
    assert!(other
        .revoke_credentials(&bed.alice, P)
        .await
        .expect("revoke"));
    assert_eq!(ws_file(&bed, &a), None);
    gate.open.add_permits(1);
    let got = delivery.await.expect("join");
    assert!(matches!(got, Err(AppError::Conflict(_))), "{got:?}");
    assert_eq!(
        ws_file(&bed, &b),
        None,
        "the revoked files were written back"
    );
    // Nor does a check in either process bring them back.
    gate.open.add_permits(100);
    other.check_credentials_once().await;
    bed.app.check_credentials_once().await;
    assert_eq!(ws_file(&bed, &a), None);
    assert_eq!(ws_file(&bed, &b), None);
}

/// The workspace endpoints through the real HTTP server: names at create,
/// `GET /workspaces`, delivery on request, and every bad request a JSON 4xx
/// that changes nothing; all in the OpenAPI document.
#[tokio::test]
async fn the_workspace_endpoints_answer_over_http() {
    let bed = Bed::new().await;
    let local = bed.app.ensure_local_user().await.expect("local");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::http::serve(listener, bed.app.clone(), async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let post = |path: &str, body: serde_json::Value| {
        let req = http.post(format!("http://{addr}{path}")).json(&body);
        async move {
            let resp = req.send().await.expect("post");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.expect("json");
            (status, body)
        }
    };
    let get = |path: &str| {
        let req = http.get(format!("http://{addr}{path}"));
        async move {
            let resp = req.send().await.expect("get");
            let status = resp.status().as_u16();
            (status, resp.text().await.expect("text"))
        }
    };
    for (path, body) in [
        (
            "/api/v1/sandboxes",
            serde_json::json!({"kind": "browser", "name": "x"}),
        ),
        (
            "/api/v1/sandboxes",
            serde_json::json!({"kind": "workspace", "name": "../x"}),
        ),
        (
            "/api/v1/logins",
            serde_json::json!({"provider": P, "workspace": "A"}),
        ),
        (
            "/api/v1/credentials/testcli/deliver",
            serde_json::json!({"workspace": "proj", "extra": 1}),
        ),
        (
            "/api/v1/credentials/testcli/deliver",
            serde_json::json!({"workspace": "a/b"}),
        ),
    ] {
        let (status, answer) = post(path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    assert!(bed
        .store
        .sandboxes_of(&local.id)
        .await
        .expect("q")
        .is_empty());
    let (status, made) = post(
        "/api/v1/sandboxes",
        serde_json::json!({"kind": "workspace", "name": "proj"}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let id = made["id"].as_str().expect("id").to_owned();
    bed.until_ready(&id).await;
    let (status, again) = post(
        "/api/v1/sandboxes",
        serde_json::json!({"kind": "workspace", "name": "proj"}),
    )
    .await;
    assert_eq!(status, 409, "{again}");
    // No record yet: 404; then one, delivered there.
    let (status, none) = post(
        "/api/v1/credentials/testcli/deliver",
        serde_json::json!({"workspace": "proj"}),
    )
    .await;
    assert_eq!(status, 404, "{none}");
    let first = file("v1", "r1", now_ms() + 600 * MIN);
    bed.signed_in(&local, "login1", &first, None).await;
    let (status, done) = post(
        "/api/v1/credentials/testcli/deliver",
        serde_json::json!({"workspace": "proj"}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["workspace_sandbox_id"], id.as_str(), "{done}");
    assert_eq!(
        ws_file(&bed, &id),
        Some(first.files[0].contents_b64.clone())
    );
    let (status, list) = get("/api/v1/workspaces").await;
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list["workspaces"][0]["name"], "proj", "{list}");
    assert_eq!(list["workspaces"][0]["sandbox_id"], id.as_str(), "{list}");
    assert_eq!(list["workspaces"][0]["providers"], serde_json::json!([P]));
    let (_, openapi) = get("/api/v1/openapi.json").await;
    for path in [
        "/api/v1/workspaces",
        "/api/v1/credentials/{provider}/deliver",
    ] {
        assert!(openapi.contains(path), "{path} not in the OpenAPI document");
    }
    assert!(!list.to_string().contains(CANARY));
    let _ = stop.send(true);
    let _ = server.await;
}
