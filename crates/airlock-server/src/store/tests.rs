//! The same tests against SQLite and, when `AIRLOCK_TEST_POSTGRES_URL` names a
//! server (CI starts one), against PostgreSQL.

use super::*;
use crate::app::state::{advance, Event, SandboxState};

pub(super) async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (Store::open(&url).await.expect("open sqlite"), dir)
}

/// A fresh database on the PostgreSQL server, or `None` (with the reason
/// printed) when no server is configured.
pub(super) async fn postgres() -> Option<Store> {
    let Ok(base) = std::env::var("AIRLOCK_TEST_POSTGRES_URL") else {
        eprintln!(
            "skipping the PostgreSQL half: AIRLOCK_TEST_POSTGRES_URL is not set (.ci/run sets it)"
        );
        return None;
    };
    sqlx::any::install_default_drivers();
    let name = format!("airlock_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    let admin = sqlx::AnyPool::connect(&base)
        .await
        .expect("connect to the PostgreSQL test server");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    let (prefix, _) = base.rsplit_once('/').expect("URL has a database path");
    Some(
        Store::open(&format!("{prefix}/{name}"))
            .await
            .expect("open postgres"),
    )
}

/// Move a sandbox through the state machine (the store's state writes are
/// reachable only from there).
async fn go(store: &Store, id: &str, events: &[Event]) -> bool {
    for e in events {
        if advance(store, id, e).await.is_err() {
            return false;
        }
    }
    true
}

fn fail(reason: &str) -> Event {
    Event::Fail {
        label: "test",
        reason: reason.into(),
    }
}

fn sandbox(id: &str, owner: &str, kind: &str, lease: Option<u32>) -> SandboxRow {
    let now = now_ms();
    SandboxRow {
        id: id.into(),
        owner_id: owner.into(),
        kind: kind.parse().expect("a kind"),
        state: SandboxState::Provisioning,
        failure_reason: None,
        image_build_id: "b".into(),
        lease_index: lease,
        agent_token: "t".into(),
        vnc_password: "p".into(),
        display_width: 1280,
        display_height: 800,
        created_at: now,
        updated_at: now,
        ready_at: None,
        last_heartbeat_at: None,
        last_activity_at: now,
    }
}

async fn exercise(store: &Store) {
    // Users.
    let u = store
        .insert_user("u1", "alice", Some("h1"))
        .await
        .expect("insert user");
    assert_eq!(
        store.user_by_name("alice").await.expect("q"),
        Some(u.clone())
    );
    assert_eq!(store.user_by_token_hash("h1").await.expect("q"), Some(u));
    assert!(store.user_by_token_hash("nope").await.expect("q").is_none());
    let dup = store.insert_user("u2", "alice", None).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");

    // Sandboxes and compare-and-set transitions.
    store
        .insert_sandbox(&sandbox("s1", "u1", "browser", Some(0)))
        .await
        .expect("insert");
    let got = store.sandbox("s1").await.expect("q").expect("exists");
    assert_eq!(got.state, SandboxState::Provisioning);
    assert_eq!(got.lease_index, Some(0));
    assert!(go(store, "s1", &[Event::Provisioned]).await);
    assert!(!go(store, "s1", &[Event::Provisioned]).await);
    assert!(go(store, "s1", &[Event::Ready]).await);
    assert!(store
        .sandbox("s1")
        .await
        .expect("q")
        .expect("row")
        .ready_at
        .is_some());

    // A lease cannot be held twice.
    let clash = store
        .insert_sandbox(&sandbox("s2", "u1", "browser", Some(0)))
        .await;
    assert!(matches!(clash, Err(StoreError::Conflict(_))), "{clash:?}");
    assert!(
        store.sandbox("s2").await.expect("q").is_none(),
        "failed insert left no row"
    );

    // One live workspace per user and name (migration 0040).
    store
        .claim_workspace_name("u1", "default", "w1")
        .await
        .expect("name");
    store
        .insert_sandbox(&sandbox("w1", "u1", "workspace", Some(1)))
        .await
        .expect("first workspace");
    let second = store.claim_workspace_name("u1", "default", "w2").await;
    assert!(matches!(second, Err(StoreError::Conflict(_))), "{second:?}");
    store
        .claim_workspace_name("u1", "proj", "w3")
        .await
        .expect("another name");
    store.drop_workspace_name("w3").await.expect("drop");
    assert_eq!(
        store.workspace_name("w1").await.expect("q").as_deref(),
        Some("default")
    );

    assert_eq!(store.used_leases().await.expect("q"), [0, 1].into());
    assert_eq!(store.sandboxes_of("u1").await.expect("q").len(), 2);
    assert_eq!(store.live_sandboxes().await.expect("q").len(), 2);

    // Finish s1: stopping, released, stopped; the lease goes back.
    assert!(go(store, "s1", &[Event::StopRequested(None)]).await);
    store.release_lease("s1").await.expect("release");
    assert!(go(store, "s1", &[Event::Released]).await);
    assert_eq!(store.used_leases().await.expect("q"), [1].into());
    assert_eq!(store.purge_finished(now_ms() + 1).await.expect("purge"), 1);
    assert!(store.sandbox("s1").await.expect("q").is_none());

    // A failure reason sticks.
    assert!(go(store, "w1", &[fail("boom")]).await);
    let w1 = store.sandbox("w1").await.expect("q").expect("row");
    assert_eq!(w1.failure_reason.as_deref(), Some("boom"));
    assert_eq!(
        store.reapable(0, 0).await.expect("q").len(),
        1,
        "failed with a lease is reapable"
    );
}

#[tokio::test]
async fn store_on_sqlite() {
    let (store, _dir) = sqlite().await;
    exercise(&store).await;
}

#[tokio::test]
async fn store_on_postgres() {
    if let Some(store) = postgres().await {
        exercise(&store).await;
    }
}

fn login(id: &str, owner: &str, state: crate::app::logins::state::LoginState) -> LoginRow {
    let now = now_ms();
    LoginRow {
        id: id.into(),
        owner_id: owner.into(),
        provider: "claude".into(),
        state,
        reason: None,
        login_url: None,
        awaiting_code: false,
        browser_sandbox_id: None,
        workspace_sandbox_id: None,
        created_at: now,
        updated_at: now,
        expires_at: now + 60_000,
        finished_at: None,
    }
}

async fn count(store: &Store, sql: &str, id: &str) -> i64 {
    use sqlx::Row;
    sqlx::query(sql)
        .bind(id)
        .fetch_one(&store.pool)
        .await
        .expect("count")
        .try_get(0)
        .expect("n")
}

/// Admin flag, token rotation, disabling, and removal of a user with logins,
/// credentials, egress rows and a sandbox that still holds its address.
async fn accounts(store: &Store) {
    use crate::app::logins::state::LoginState;
    let admin = store
        .insert_user_with("a1", "root-ish", Some("ha"), true)
        .await
        .expect("admin");
    assert!(admin.admin);
    let got = store.user_by_token_hash("ha").await.expect("q").expect("a");
    assert!(got.admin && !got.disabled);
    // Rotation: the old digest is gone at once.
    assert!(store.set_token_hash("a1", "hb").await.expect("rotate"));
    assert!(store.user_by_token_hash("ha").await.expect("q").is_none());
    assert!(store.user_by_token_hash("hb").await.expect("q").is_some());
    // Disabled: no token works; enabled again: it does.
    assert!(store.set_user_disabled("a1", true).await.expect("disable"));
    assert!(store.user_by_token_hash("hb").await.expect("q").is_none());
    assert!(
        store
            .user_by_name("root-ish")
            .await
            .expect("q")
            .expect("u")
            .disabled
    );
    assert!(store.set_user_disabled("a1", false).await.expect("enable"));
    assert!(store.user_by_token_hash("hb").await.expect("q").is_some());

    // A user with everything.
    store
        .insert_user("r1", "leaving", Some("hr"))
        .await
        .expect("user");
    store
        .insert_login(&login("l1", "r1", LoginState::Captured))
        .await
        .expect("login");
    store
        .insert_login(&login("l2", "r1", LoginState::AwaitingUser))
        .await
        .expect("login");
    let cred = CredentialRow {
        owner_id: "r1".into(),
        provider: "claude".into(),
        login_id: "l1".into(),
        sealed: "v1:k1:x:y".into(),
        key_id: "k1".into(),
        created_at: now_ms(),
        updated_at: now_ms(),
        delivered_at: None,
    };
    store.replace_credential(&cred).await.expect("creds");
    store
        .set_egress_account(&AccountRow {
            host: "h".into(),
            username: "u".into(),
            password_sealed: "v1:k1:x:y".into(),
            port_min: 1000,
            port_max: 1001,
            updated_at: now_ms(),
        })
        .await
        .expect("account");
    store
        .assign_egress_port("r1", 1000, 1001)
        .await
        .expect("port");
    store
        .set_egress_upstream(&UpstreamRow {
            user_id: "r1".into(),
            host: "h".into(),
            port: 1,
            username: "n".into(),
            password_sealed: "v1:k1:x:y".into(),
            updated_at: now_ms(),
        })
        .await
        .expect("upstream");
    store
        .insert_sandbox(&sandbox("rs1", "r1", "workspace", Some(40)))
        .await
        .expect("sandbox");
    assert!(go(store, "rs1", &[Event::Provisioned, Event::Ready]).await);

    // Removal starts: token, logins, secrets go now; the sandbox is left to
    // the app, which stops it through the state machine.
    assert_eq!(store.begin_user_removal("r1").await.expect("begin"), 1);
    assert!(store.user_by_token_hash("hr").await.expect("q").is_none());
    let u = store
        .user_by_name("leaving")
        .await
        .expect("q")
        .expect("still there");
    assert!(u.removing && u.disabled);
    // The store leaves the logins' states to the login machine.
    for l in store.logins_of("r1").await.expect("logins") {
        assert!(!l.state.is_final(), "{}", l.id);
    }
    crate::app::logins::end_logins_of(store, "r1", "gone")
        .await
        .expect("end logins");
    for l in store.logins_of("r1").await.expect("logins") {
        assert_eq!(l.state, LoginState::Cancelled, "{}", l.id);
        assert_eq!(l.reason.as_deref(), Some("gone"));
    }
    assert!(store.credentials_of("r1").await.expect("creds").is_empty());
    assert!(store.egress_upstream("r1").await.expect("up").is_none());
    assert_eq!(store.egress_user_port("r1").await.expect("port"), None);
    assert_eq!(
        store.sandbox("rs1").await.expect("q").expect("row").state,
        SandboxState::Ready
    );
    assert_eq!(store.live_sandboxes_of("r1").await.expect("q"), ["rs1"]);
    assert!(go(store, "rs1", &[Event::StopRequested(Some("gone".into()))]).await);
    assert_eq!(store.users_being_removed().await.expect("q").len(), 1);
    // Not while the sandbox holds its address; a token cannot come back meanwhile.
    assert!(!store.finish_user_removal("r1").await.expect("finish"));
    assert!(!store.set_token_hash("r1", "hx").await.expect("rotate"));
    assert!(!store.set_user_disabled("r1", false).await.expect("enable"));
    store.release_lease("rs1").await.expect("release");
    assert!(go(store, "rs1", &[Event::Released]).await);
    assert!(store.finish_user_removal("r1").await.expect("finish"));
    assert!(store.user_by_name("leaving").await.expect("q").is_none());
    for sql in [
        "SELECT COUNT(*) FROM users WHERE id = $1",
        "SELECT COUNT(*) FROM logins WHERE owner_id = $1",
        "SELECT COUNT(*) FROM credentials WHERE owner_id = $1",
        "SELECT COUNT(*) FROM sandboxes WHERE owner_id = $1",
        "SELECT COUNT(*) FROM egress_user_ports WHERE user_id = $1",
        "SELECT COUNT(*) FROM egress_user_upstreams WHERE user_id = $1",
    ] {
        assert_eq!(count(store, sql, "r1").await, 0, "{sql}");
    }
    assert!(store.users_being_removed().await.expect("q").is_empty());
}

/// Rotation over every sealed column: the egress account, a user's upstream
/// and credentials all re-seal under the new key in one go, the old key
/// leaves the keyring file, and everything opens with the keyring reloaded.
async fn rotation(store: &Store) {
    use crate::app::{egress as eg, keyring};
    use crate::vault::Vault;
    use secrecy::{ExposeSecret, SecretString};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vault = Vault::load(dir.path()).expect("keyring");
    store.insert_user("v1", "vera", None).await.expect("user");
    eg::set_account(
        store,
        &vault,
        &eg::AccountInput {
            host: "127.0.0.1".into(),
            username: "acct".into(),
            password: SecretString::from("account-canary"),
            port_min: 2000,
            port_max: 2001,
        },
    )
    .await
    .expect("account");
    eg::set_user_upstream(
        store,
        &vault,
        "vera",
        &SecretString::from("http://me:upstream-canary@127.0.0.1:3128"),
    )
    .await
    .expect("upstream");
    store
        .insert_login(&login(
            "vl",
            "v1",
            crate::app::logins::state::LoginState::Captured,
        ))
        .await
        .expect("login");
    let at = SealedRef::Credential {
        owner_id: "v1".into(),
        provider: "claude".into(),
        login_id: "vl".into(),
    };
    let cred = CredentialRow {
        owner_id: "v1".into(),
        provider: "claude".into(),
        login_id: "vl".into(),
        sealed: vault.seal(b"credential-canary", &keyring::aad_of(&at)),
        key_id: vault.current_key_id().into(),
        created_at: now_ms(),
        updated_at: now_ms(),
        delivered_at: None,
    };
    store.replace_credential(&cred).await.expect("creds");
    let before = store.sealed_values().await.expect("values");
    assert_eq!(before.len(), 3, "{before:?}");

    // A value that does not open stops the run: nothing changes, nothing retires.
    let stranger = Vault::ephemeral();
    store
        .set_egress_upstream(&UpstreamRow {
            user_id: "v1".into(),
            host: "127.0.0.1".into(),
            port: 3128,
            username: "me".into(),
            password_sealed: stranger.seal(
                b"x",
                &keyring::aad_of(&SealedRef::EgressUpstream {
                    user_id: "v1".into(),
                }),
            ),
            updated_at: now_ms(),
        })
        .await
        .expect("foreign");
    vault.rotate().expect("rotate");
    let err = keyring::reseal_and_retire(store, &mut vault)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("upstream password"), "{err}");
    assert_eq!(vault.key_ids(), ["k1", "k2"]);
    for v in store.sealed_values().await.expect("values") {
        assert_eq!(Vault::key_of(&v.sealed), Some("k1"), "{v:?} untouched");
    }

    // With the upstream set properly, the run goes through.
    eg::set_user_upstream(
        store,
        &vault,
        "vera",
        &SecretString::from("http://me:upstream-canary@127.0.0.1:3128"),
    )
    .await
    .expect("upstream again");
    let done = keyring::reseal_and_retire(store, &mut vault)
        .await
        .expect("reseal");
    assert_eq!(
        done.resealed, 2,
        "the account and the credentials; the upstream was already k2"
    );
    assert_eq!(done.retired, ["k1"]);
    assert!(done.kept.is_empty());
    let file = std::fs::read_to_string(dir.path().join(crate::vault::KEYRING_FILE)).expect("file");
    assert!(!file.contains("\"k1\""), "k1 left the keyring file");
    let reloaded = Vault::load(dir.path()).expect("reload");
    assert_eq!(reloaded.key_ids(), ["k2"]);
    let mut plains = Vec::new();
    for v in store.sealed_values().await.expect("values") {
        assert_eq!(Vault::key_of(&v.sealed), Some("k2"));
        let plain = reloaded
            .open(&v.sealed, &keyring::aad_of(&v.at))
            .unwrap_or_else(|e| panic!("{v:?} opens with the new key: {e}"));
        plains.push(String::from_utf8(plain.expose_secret().clone()).expect("utf8"));
    }
    plains.sort();
    assert_eq!(
        plains,
        ["account-canary", "credential-canary", "upstream-canary"]
    );
    assert_eq!(
        store.credentials_of("v1").await.expect("creds")[0].key_id,
        "k2",
        "the credentials' key column follows"
    );
    assert_eq!(
        keyring::keys_in_use(store).await.expect("in use"),
        ["k2".to_owned()].into()
    );
}

#[tokio::test]
async fn accounts_and_rotation_on_sqlite() {
    let (store, _dir) = sqlite().await;
    accounts(&store).await;
    rotation(&store).await;
}

#[tokio::test]
async fn accounts_and_rotation_on_postgres() {
    if let Some(store) = postgres().await {
        accounts(&store).await;
        rotation(&store).await;
    }
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    {
        let store = Store::open(&url).await.expect("open");
        store.insert_user("u1", "bob", None).await.expect("insert");
    }
    let store = Store::open(&url).await.expect("reopen");
    assert!(store.user_by_name("bob").await.expect("q").is_some());
}

#[test]
fn urls_are_redacted() {
    assert_eq!(
        redact_url("postgres://me:secret@db:5432/x"),
        "postgres://me:***@db:5432/x"
    );
    assert_eq!(
        redact_url("sqlite:///var/lib/a.db"),
        "sqlite:///var/lib/a.db"
    );
}

/// The counts behind the per-user quotas: live sandboxes, logins under way.
async fn quota_counts(store: &Store) {
    use crate::app::logins::state::LoginState;
    for u in ["qa", "qb"] {
        store.insert_user(u, u, None).await.expect("user");
    }
    for (id, owner) in [("q1", "qa"), ("q2", "qa"), ("q3", "qb")] {
        store
            .insert_sandbox(&sandbox(id, owner, "browser", None))
            .await
            .expect("insert");
    }
    assert_eq!(store.count_live_sandboxes("qa").await.expect("q"), 2);
    assert!(go(store, "q1", &[fail("x")]).await);
    assert_eq!(store.count_live_sandboxes("qa").await.expect("q"), 1);
    assert_eq!(store.count_live_sandboxes("nobody").await.expect("q"), 0);

    assert_eq!(store.live_logins("qa").await.expect("q"), (0, None));
    let now = now_ms();
    for (id, expires) in [("l1", now + 5_000), ("l2", now + 9_000)] {
        store
            .insert_login(&LoginRow {
                id: id.into(),
                owner_id: "qa".into(),
                provider: "claude".into(),
                state: LoginState::Starting,
                reason: None,
                login_url: None,
                awaiting_code: false,
                browser_sandbox_id: None,
                workspace_sandbox_id: None,
                created_at: now,
                updated_at: now,
                expires_at: expires,
                finished_at: None,
            })
            .await
            .expect("login");
    }
    assert_eq!(
        store.live_logins("qa").await.expect("q"),
        (2, Some(now + 5_000))
    );
    crate::app::logins::advance(
        store,
        "l1",
        &crate::app::logins::state::Event::Expire {
            reason: "late".into(),
        },
    )
    .await
    .expect("t");
    assert_eq!(
        store.live_logins("qa").await.expect("q"),
        (1, Some(now + 9_000))
    );
    assert_eq!(store.live_logins("qb").await.expect("q"), (0, None));
}

#[tokio::test]
async fn quota_counts_on_sqlite() {
    let (store, _dir) = sqlite().await;
    quota_counts(&store).await;
}

#[tokio::test]
async fn quota_counts_on_postgres() {
    if let Some(store) = postgres().await {
        quota_counts(&store).await;
    }
}

// ---- credential audit, health and revocation (store/audit.rs, store/credhealth.rs) ----

async fn credential_tables(store: &Store) {
    let user = store.insert_user("c1", "carol", None).await.expect("user");
    let other = store.insert_user("c2", "dave", None).await.expect("user");
    for (i, owner) in [(0, &user), (1, &user), (2, &user), (3, &other)] {
        store
            .insert_audit(&AuditRow {
                id: format!("e{i}"),
                owner_id: owner.id.clone(),
                at: 1000 + i64::from(i / 2),
                kind: "captured".into(),
                provider: "claude".into(),
                workspace_sandbox_id: None,
                login_id: Some(format!("l{i}")),
                detail: None,
            })
            .await
            .expect("audit");
    }
    // Newest first; e0 and e1 share a millisecond and page apart by id.
    let p1 = store.audit_of(&user.id, None, 2).await.expect("page");
    let ids: Vec<_> = p1.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["e2", "e1"]);
    let last = p1.last().expect("last");
    let p2 = store
        .audit_of(&user.id, Some((last.at, &last.id)), 2)
        .await
        .expect("page 2");
    assert_eq!(p2.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["e0"]);

    let cred = CredentialRow {
        owner_id: user.id.clone(),
        provider: "claude".into(),
        login_id: "l1".into(),
        sealed: "v1:k1:old".into(),
        key_id: "k1".into(),
        created_at: 1,
        updated_at: 1,
        delivered_at: Some(2),
    };
    store.replace_credential(&cred).await.expect("record");
    store
        .replace_credential(&CredentialRow {
            owner_id: other.id.clone(),
            ..cred.clone()
        })
        .await
        .expect("other's record");
    let mut health = HealthRow {
        owner_id: user.id.clone(),
        provider: "claude".into(),
        status: "healthy".into(),
        expires_at: Some(5),
        checked_at: 3,
        workspace_sandbox_id: None,
        detail: None,
        version: 1,
    };
    store.put_health(&health).await.expect("health");
    health.status = "expiring".into();
    store.put_health(&health).await.expect("health again");
    assert_eq!(
        store.health(&user.id, "claude").await.expect("q"),
        Some(health.clone())
    );
    // Re-capture: a compare-and-set on the sealed value.
    health.version = 2;
    assert!(store
        .recapture_credential("v1:k1:old", "v1:k1:new", "k1", &health)
        .await
        .expect("recapture"));
    assert!(!store
        .recapture_credential("v1:k1:old", "v1:k1:newer", "k1", &health)
        .await
        .expect("stale recapture"));
    let now = store
        .credential(&user.id, "claude")
        .await
        .expect("q")
        .expect("row");
    assert_eq!(
        (now.sealed.as_str(), now.login_id.as_str()),
        ("v1:k1:new", "l1")
    );
    assert_eq!(store.health_of(&user.id).await.expect("q")[0].version, 2);
    assert_eq!(
        store.health_counts().await.expect("counts"),
        [("claude".to_owned(), "expiring".to_owned(), 1)]
    );
    // Revocation: once, and only the owner's.
    assert!(store
        .revoke_credential(&user.id, "claude")
        .await
        .expect("revoke"));
    assert!(!store
        .revoke_credential(&user.id, "claude")
        .await
        .expect("again"));
    assert!(store
        .credential(&user.id, "claude")
        .await
        .expect("q")
        .is_none());
    assert!(store.health_of(&user.id).await.expect("q").is_empty());
    assert_eq!(store.revocations_of(&user.id).await.expect("q"), ["claude"]);
    assert!(store
        .credential(&other.id, "claude")
        .await
        .expect("q")
        .is_some());
    assert!(store.revocations_of(&other.id).await.expect("q").is_empty());
    store
        .clear_revocation(&user.id, "claude")
        .await
        .expect("clear");
    assert!(store.revocations_of(&user.id).await.expect("q").is_empty());
    // A removed user's rows go with it; the other's stay.
    assert!(store
        .revoke_credential(&other.id, "claude")
        .await
        .expect("revoke"));
    store.replace_credential(&cred).await.expect("record again");
    assert!(store
        .revoke_credential(&user.id, "claude")
        .await
        .expect("revoke"));
    let mut others = health.clone();
    others.owner_id = other.id.clone();
    for h in [&health, &others] {
        store.put_health(h).await.expect("health");
    }
    // Every revocation moved the generation a delivery compares against.
    assert_eq!(
        store
            .credential_generation(&user.id, "claude")
            .await
            .expect("q"),
        2
    );
    assert_eq!(
        store
            .credential_generation(&other.id, "claude")
            .await
            .expect("q"),
        1
    );
    assert_eq!(
        store
            .credential_generation(&other.id, "none")
            .await
            .expect("q"),
        0
    );
    for (u, ws) in [(&user.id, "wu"), (&other.id, "wo")] {
        store
            .place_credentials(u, "claude", "default")
            .await
            .expect("place");
        store
            .claim_workspace_name(u, "default", ws)
            .await
            .expect("name");
    }
    store
        .revoke_placements(&user.id, "claude")
        .await
        .expect("revoking");
    let placed = store.placements_of(&user.id).await.expect("q");
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].state, "revoking");
    assert!(store.finish_user_removal(&user.id).await.expect("remove"));
    for table in [
        "credential_events",
        "credential_health",
        "credential_revocations",
        "credential_placements",
        "credential_generations",
        "workspace_names",
    ] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE owner_id = $1");
        assert_eq!(count(store, &sql, &user.id).await, 0, "{table}");
        assert!(
            count(store, &sql, &other.id).await > 0,
            "{table} of the other user"
        );
    }
}

#[tokio::test]
async fn credential_tables_on_sqlite() {
    let (store, _dir) = sqlite().await;
    credential_tables(&store).await;
}

#[tokio::test]
async fn credential_tables_on_postgres() {
    if let Some(store) = postgres().await {
        credential_tables(&store).await;
    }
}

/// Warm pools: a claim is one compare-and-set of state, owner and image,
/// won by exactly one caller; a broken claim's member goes back to the
/// pool's name only once it can never be claimed again.
async fn pool_claims(store: &Store) {
    use crate::app::pool::OWNER;
    use crate::app::state::claim;
    store.insert_user("u1", "alice", None).await.expect("u1");
    store.insert_user("u2", "bob", None).await.expect("u2");
    let users = store.users().await.expect("users");
    assert!(
        users.iter().all(|u| u.id != OWNER),
        "the pool's owner is no user to list"
    );
    for (id, lease) in [("m1", 1), ("m2", 2)] {
        store
            .insert_sandbox(&sandbox(id, OWNER, "browser", Some(lease)))
            .await
            .expect("member");
        assert!(go(store, id, &[Event::Provisioned, Event::Pooled]).await);
    }
    assert_eq!(store.count_live_sandboxes(OWNER).await.expect("n"), 2);
    assert_eq!(store.count_live_sandboxes("u1").await.expect("n"), 0);
    assert!(
        claim(store, "m1", OWNER, "u1", "another-build")
            .await
            .expect("claim")
            .is_none(),
        "a member of another image is never handed out"
    );
    let moved = claim(store, "m1", OWNER, "u1", "b").await.expect("claim");
    assert_eq!(moved.map(|m| m.to), Some(SandboxState::Ready));
    let row = store.sandbox("m1").await.expect("q").expect("row");
    assert_eq!(
        (row.owner_id.as_str(), row.state),
        ("u1", SandboxState::Ready)
    );
    assert!(row.ready_at.is_some());
    assert!(
        claim(store, "m1", OWNER, "u2", "b")
            .await
            .expect("claim")
            .is_none(),
        "handed out at most once"
    );
    // Two at once for one member: one winner.
    let (a, b) = tokio::join!(
        claim(store, "m2", OWNER, "u1", "b"),
        claim(store, "m2", OWNER, "u2", "b")
    );
    let wins = [a.expect("a"), b.expect("b")]
        .iter()
        .filter(|m| m.is_some())
        .count();
    assert_eq!(wins, 1);
    // Still ready: the member stays its user's.
    assert!(!store.disown_sandbox("m1", "u1", OWNER).await.expect("q"));
    assert!(go(store, "m1", &[fail("could not be handed over")]).await);
    assert!(store.disown_sandbox("m1", "u1", OWNER).await.expect("q"));
    assert_eq!(
        store.sandbox("m1").await.expect("q").expect("row").owner_id,
        OWNER
    );
    assert!(
        !store
            .sandboxes_of("u1")
            .await
            .expect("list")
            .iter()
            .any(|r| r.id == "m1"),
        "a broken claim leaves nothing in the user's list"
    );
}

#[tokio::test]
async fn pool_claims_on_sqlite() {
    let (store, _dir) = sqlite().await;
    pool_claims(&store).await;
}

#[tokio::test]
async fn pool_claims_on_postgres() {
    if let Some(store) = postgres().await {
        pool_claims(&store).await;
    }
}

fn node_row(name: &str, lease_until: i64) -> NodeRow {
    NodeRow {
        name: name.into(),
        address: "127.0.0.1:4100".into(),
        backend: "nspawn".into(),
        image_build_id: "b".into(),
        cpus: 2,
        memory_total: 8 << 30,
        memory_free: 4 << 30,
        disk_free: 50 << 30,
        running: 0,
        started_at: 1,
        heartbeat_at: 1,
        lease_expires_at: lease_until,
        draining: false,
    }
}

/// The registry, placement column, tickets: the same SQL on both databases.
async fn cluster_tables(store: &Store) {
    let now = now_ms();
    store.insert_user("c1", "cora", None).await.expect("user");
    store
        .upsert_node(&node_row("n1", now + 10_000))
        .await
        .expect("register");
    let mut again = node_row("n1", now + 20_000);
    again.running = 3;
    store.upsert_node(&again).await.expect("renew");
    store
        .upsert_node(&node_row("n2", now - 1))
        .await
        .expect("register");
    assert!(store.set_node_draining("n1", true).await.expect("drain"));
    assert!(!store.set_node_draining("nope", true).await.expect("drain"));
    // A renewal keeps the operator's drain.
    store.upsert_node(&again).await.expect("renew");
    let nodes = store.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 2);
    assert!(
        nodes[0].draining && nodes[0].running == 3 && nodes[0].lease_expires_at == now + 20_000
    );

    for (id, lease) in [("s1", 1), ("s2", 2)] {
        store
            .insert_sandbox(&sandbox(id, "c1", "browser", Some(lease)))
            .await
            .expect("sandbox");
    }
    assert_eq!(
        store
            .place_sandbox("s1", "n1")
            .await
            .expect("place")
            .as_deref(),
        Some("n1")
    );
    // Placed once: a second placement keeps the first.
    assert_eq!(
        store
            .place_sandbox("s1", "n2")
            .await
            .expect("place")
            .as_deref(),
        Some("n1")
    );
    assert_eq!(
        store
            .place_sandbox("s2", "n2")
            .await
            .expect("place")
            .as_deref(),
        Some("n2")
    );
    assert_eq!(store.wanted_on("n1").await.expect("wanted"), ["s1"]);
    assert_eq!(store.leased_on("n2").await.expect("leased"), ["s2"]);
    let load = store.load_by_node().await.expect("load");
    assert_eq!(load.len(), 2);
    assert_eq!(
        store
            .abandoned(now_ms() + 1)
            .await
            .expect("abandoned")
            .len(),
        2
    );
    assert!(store
        .abandoned(now - 60_000)
        .await
        .expect("abandoned")
        .is_empty());

    assert!(store.delete_node("n2").await.expect("forget"));
    assert!(!store.delete_node("n2").await.expect("forget"));
    assert_eq!(store.nodes().await.expect("nodes").len(), 1);

    // Tickets: single use, and at most `per_user` unused ones per user.
    for (i, d) in ["d1", "d2", "d3"].iter().enumerate() {
        let at = now + i64::try_from(i).expect("small");
        store
            .insert_ticket(d, "s1", "c1", at, at + 60_000, 2)
            .await
            .expect("ticket");
    }
    assert_eq!(
        store.take_ticket("d1").await.expect("take"),
        None,
        "the oldest went"
    );
    let got = store
        .take_ticket("d3")
        .await
        .expect("take")
        .expect("a ticket");
    assert_eq!((got.0.as_str(), got.1.as_str()), ("s1", "c1"));
    assert_eq!(
        store.take_ticket("d3").await.expect("take"),
        None,
        "single use"
    );
    assert!(store.take_ticket("d2").await.expect("take").is_some());

    // Logins of a replica that went away go to the one that asks; those of
    // a live replica, and fresh ones not yet claimed, stay where they are.
    use crate::app::logins::state::LoginState;
    store
        .renew_replica("r-live", now, now, now + 10_000)
        .await
        .expect("replica");
    store
        .renew_replica("r-dead", now - 60_000, now - 60_000, now - 50_000)
        .await
        .expect("replica");
    for (id, driver) in [
        ("l-live", Some("r-live")),
        ("l-dead", Some("r-dead")),
        ("l-new", None),
    ] {
        store
            .insert_login(&login(id, "c1", LoginState::AwaitingUser))
            .await
            .expect("login");
        if let Some(d) = driver {
            store.set_login_driver(id, d).await.expect("driver");
        }
    }
    let live = ["starting", "awaiting_user"];
    let taken = store
        .take_orphaned_logins(&live, now, now - 30_000, "r-me")
        .await
        .expect("take");
    assert_eq!(taken, ["l-dead"]);
    let taken = store
        .take_orphaned_logins(&live, now, now_ms() + 1, "r-me")
        .await
        .expect("take");
    assert_eq!(taken, ["l-new"], "an old unclaimed one");
    let taken = store
        .take_orphaned_logins(&live, now, now_ms() + 1, "r-me")
        .await
        .expect("take");
    assert!(taken.is_empty(), "taken twice: {taken:?}");
}

#[tokio::test]
async fn cluster_tables_on_sqlite() {
    let (store, _dir) = sqlite().await;
    cluster_tables(&store).await;
    // One process owns an SQLite file: it always leads, and needs no user lock.
    assert!(store.try_lead(1).await.expect("lead").is_some());
    assert!(store.lock_user("c1").await.expect("lock").is_none());
}

/// Two processes on one PostgreSQL: one leader at a time, one admission
/// of a user at a time, and a stopping sandbox announced to the other.
#[tokio::test]
async fn cluster_coordination_on_postgres() {
    let Some(a) = postgres().await else { return };
    cluster_tables(&a).await;
    let b = Store::open(&a.url).await.expect("a second process");
    let key = 0x0bad_cafe;
    let mut led = a
        .try_lead(key)
        .await
        .expect("lead")
        .expect("the first leads");
    assert!(led.holds().await);
    assert!(
        b.try_lead(key).await.expect("lead").is_none(),
        "two leaders"
    );
    drop(led);
    let mut taken = None;
    for _ in 0..50 {
        taken = b.try_lead(key).await.expect("lead");
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(taken.is_some(), "the leadership was not handed over");

    let held = a
        .lock_user("c1")
        .await
        .expect("lock")
        .expect("postgres locks");
    let waited =
        tokio::time::timeout(std::time::Duration::from_millis(300), b.lock_user("c1")).await;
    assert!(waited.is_err(), "both processes held one user's lock");
    let other = tokio::time::timeout(std::time::Duration::from_secs(5), b.lock_user("c2"))
        .await
        .expect("another user's lock is free")
        .expect("lock");
    drop((held, other));
    tokio::time::timeout(std::time::Duration::from_secs(5), b.lock_user("c1"))
        .await
        .expect("released with its holder")
        .expect("lock");

    let mut listener = b
        .listen_stopping()
        .await
        .expect("listen")
        .expect("postgres");
    a.notify_stopping("s1").await.expect("notify");
    let heard = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .expect("heard in time")
        .expect("a notification");
    assert_eq!(heard.payload(), "s1");
}
