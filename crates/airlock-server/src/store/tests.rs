//! The same tests against SQLite and, when `AIRLOCK_TEST_POSTGRES_URL` names a
//! server (CI starts one), against PostgreSQL.

use super::*;
use crate::app::state::SandboxState;

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (Store::open(&url).await.expect("open sqlite"), dir)
}

/// A fresh database on the PostgreSQL server, or `None` (with the reason
/// printed) when no server is configured.
async fn postgres() -> Option<Store> {
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

fn sandbox(id: &str, owner: &str, kind: &str, lease: Option<u32>) -> SandboxRow {
    let now = now_ms();
    SandboxRow {
        id: id.into(),
        owner_id: owner.into(),
        kind: kind.into(),
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
    assert!(store
        .transition(
            "s1",
            &[SandboxState::Provisioning],
            SandboxState::Booting,
            None
        )
        .await
        .expect("t"));
    assert!(!store
        .transition(
            "s1",
            &[SandboxState::Provisioning],
            SandboxState::Booting,
            None
        )
        .await
        .expect("t"));
    assert!(store
        .transition("s1", &[SandboxState::Booting], SandboxState::Ready, None)
        .await
        .expect("t"));
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

    // One live workspace per user.
    store
        .insert_sandbox(&sandbox("w1", "u1", "workspace", Some(1)))
        .await
        .expect("first workspace");
    let second = store
        .insert_sandbox(&sandbox("w2", "u1", "workspace", Some(2)))
        .await;
    assert!(matches!(second, Err(StoreError::Conflict(_))), "{second:?}");

    assert_eq!(store.used_leases().await.expect("q"), [0, 1].into());
    assert_eq!(store.sandboxes_of("u1").await.expect("q").len(), 2);
    assert_eq!(store.live_sandboxes().await.expect("q").len(), 2);

    // Finish s1: stopping, released, stopped; the lease goes back.
    store
        .transition("s1", &[SandboxState::Ready], SandboxState::Stopping, None)
        .await
        .expect("t");
    store.release_lease("s1").await.expect("release");
    store
        .transition("s1", &[SandboxState::Stopping], SandboxState::Stopped, None)
        .await
        .expect("t");
    assert_eq!(store.used_leases().await.expect("q"), [1].into());
    assert_eq!(store.purge_finished(now_ms() + 1).await.expect("purge"), 1);
    assert!(store.sandbox("s1").await.expect("q").is_none());

    // A failure reason sticks.
    store
        .transition(
            "w1",
            &[SandboxState::Provisioning],
            SandboxState::Failed,
            Some("boom"),
        )
        .await
        .expect("t");
    let w1 = store.sandbox("w1").await.expect("q").expect("row");
    assert_eq!(w1.failure_reason.as_deref(), Some("boom"));
    assert_eq!(
        store.reapable(0).await.expect("q").len(),
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
    store
        .transition(
            "q1",
            &[SandboxState::Provisioning],
            SandboxState::Failed,
            None,
        )
        .await
        .expect("t");
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
    store
        .transition_login(
            "l1",
            LoginState::Starting,
            LoginState::Expired,
            &LoginUpdate::default(),
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
