//! Admission against a real store (SQLite in a temp dir), a fake host probe
//! and a clock the tests move.

use super::*;
use crate::app::logins::state::LoginState;
use crate::app::state::SandboxState;
use crate::store::{now_ms, LoginRow, SandboxRow};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Rig {
    admission: Arc<Admission>,
    store: Store,
    probe: Arc<FakeProbe>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

async fn rig(quotas: Quotas, memory: Option<u64>) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::open(&url).await.expect("open sqlite");
    let probe = Arc::new(FakeProbe::new(memory, Some(100 * GIB)));
    let clock = Arc::new(ManualClock::default());
    let settings = Settings {
        quotas,
        data_dir: dir.path().to_path_buf(),
        min_free_memory: 2 * GIB,
        min_free_disk: 2 * GIB,
        reserve_memory: 512 * MIB,
    };
    let admission = Arc::new(Admission::new(
        settings,
        store.clone(),
        probe.clone(),
        clock.clone(),
    ));
    Rig {
        admission,
        store,
        probe,
        clock,
        _dir: dir,
    }
}

fn quotas(max_sandboxes: u32, max_logins: u32, creates_per_minute: u32) -> Quotas {
    Quotas {
        max_sandboxes,
        max_logins,
        creates_per_minute,
    }
}

fn sandbox_row(id: &str, owner: &str) -> SandboxRow {
    let now = now_ms();
    SandboxRow {
        id: id.to_owned(),
        owner_id: owner.to_owned(),
        kind: airlock_proto::metadata::SandboxKind::Browser,
        state: SandboxState::Provisioning,
        failure_reason: None,
        image_build_id: "b".into(),
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
    }
}

fn login_row(id: &str, owner: &str, expires_at: i64) -> LoginRow {
    let now = now_ms();
    LoginRow {
        id: id.to_owned(),
        owner_id: owner.to_owned(),
        provider: "claude".into(),
        state: LoginState::Starting,
        reason: None,
        login_url: None,
        awaiting_code: false,
        browser_sandbox_id: None,
        workspace_sandbox_id: None,
        created_at: now,
        updated_at: now,
        expires_at,
        finished_at: None,
    }
}

/// What the app does for a create: admit, write the row, commit.
async fn create(admission: &Admission, store: &Store, owner: &str) -> Result<String, AppError> {
    let id = crate::app::sandboxes::new_id();
    let permit = admission.admit(owner, Ask::Sandbox, &id).await?;
    store
        .insert_sandbox(&sandbox_row(&id, owner))
        .await
        .expect("insert");
    permit.commit();
    Ok(id)
}

fn refusal(err: &AppError) -> Option<(Refusal, &str, Duration)> {
    match err {
        AppError::Quota {
            kind,
            message,
            retry_after,
        } => Some((*kind, message.as_str(), *retry_after)),
        _ => None,
    }
}

#[tokio::test]
async fn the_third_create_past_a_cap_of_two_is_refused_and_makes_nothing() {
    let r = rig(quotas(2, 3, 30), Some(64 * GIB)).await;
    r.store.insert_user("u", "u", None).await.expect("user");
    let first = create(&r.admission, &r.store, "u").await.expect("1st");
    create(&r.admission, &r.store, "u").await.expect("2nd");
    let held = r.admission.held_bytes();
    assert_eq!(held, 2 * 512 * MIB);

    let err = create(&r.admission, &r.store, "u")
        .await
        .expect_err("3rd is past the cap");
    let (kind, message, retry_after) = refusal(&err).expect("a quota refusal");
    assert_eq!(kind, Refusal::QuotaExceeded);
    assert!(
        message.contains("you have 2 live sandboxes, the limit (quota.max_sandboxes) is 2"),
        "{message}"
    );
    assert!(retry_after >= Duration::from_secs(1));
    // Nothing made, nothing held, nothing counted.
    assert_eq!(r.store.count_live_sandboxes("u").await.expect("count"), 2);
    assert_eq!(r.admission.held_bytes(), held);
    let usage = r.admission.usage("u").await.expect("usage");
    assert_eq!(usage.used.creates_last_minute, 2);

    // A stopped sandbox no longer counts.
    for e in [
        crate::app::state::Event::StopRequested(None),
        crate::app::state::Event::Released,
    ] {
        crate::app::state::advance(&r.store, &first, &e)
            .await
            .expect("stop");
    }
    create(&r.admission, &r.store, "u")
        .await
        .expect("room again after a stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_creates_at_the_cap_cannot_both_pass() {
    let r = rig(quotas(5, 3, 1000), Some(64 * GIB)).await;
    r.store.insert_user("u", "u", None).await.expect("user");
    create(&r.admission, &r.store, "u").await.expect("1st");
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (a, s) = (r.admission.clone(), r.store.clone());
            tokio::spawn(async move { create(&a, &s, "u").await })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => admitted += 1,
            Err(e) => assert_eq!(
                refusal(&e).map(|r| r.0),
                Some(Refusal::QuotaExceeded),
                "{e}"
            ),
        }
    }
    assert_eq!(admitted, 4, "exactly the 4 places left");
    assert_eq!(r.store.count_live_sandboxes("u").await.expect("count"), 5);
}

#[tokio::test]
async fn creates_per_minute_slide_with_the_clock() {
    let r = rig(quotas(100, 100, 3), Some(64 * GIB)).await;
    r.store.insert_user("u", "u", None).await.expect("user");
    create(&r.admission, &r.store, "u").await.expect("1");
    r.clock.advance(Duration::from_secs(20));
    create(&r.admission, &r.store, "u").await.expect("2");
    create(&r.admission, &r.store, "u").await.expect("3");

    let err = create(&r.admission, &r.store, "u")
        .await
        .expect_err("4th in a minute");
    let (kind, message, retry_after) = refusal(&err).expect("a rate refusal");
    assert_eq!(kind, Refusal::RateLimited);
    assert!(
        message.contains("the limit (quota.creates_per_minute) is 3"),
        "{message}"
    );
    // The oldest create leaves the window 40 s from now.
    assert_eq!(retry_after, Duration::from_secs(40));
    assert!(message.contains("try again in 40 s"), "{message}");

    // A login is a create too, and refused ones count for nothing.
    let err = r
        .admission
        .admit("u", Ask::Login, "x")
        .await
        .expect_err("login in the same window");
    assert_eq!(refusal(&err).map(|r| r.0), Some(Refusal::RateLimited));
    assert_eq!(
        r.admission
            .usage("u")
            .await
            .expect("usage")
            .used
            .creates_last_minute,
        3
    );

    r.clock.advance(Duration::from_secs(39));
    assert!(
        create(&r.admission, &r.store, "u").await.is_err(),
        "1 s early"
    );
    r.clock.advance(Duration::from_secs(1));
    create(&r.admission, &r.store, "u")
        .await
        .expect("the oldest create left the window");
    // Another user has a window of their own.
    r.store.insert_user("v", "v", None).await.expect("user");
    create(&r.admission, &r.store, "v")
        .await
        .expect("other user");
}

#[tokio::test]
async fn logins_under_way_are_capped_and_need_a_sandbox_place() {
    let r = rig(quotas(2, 1, 30), Some(64 * GIB)).await;
    r.store.insert_user("u", "u", None).await.expect("user");
    let expires = now_ms() + 90_000;
    r.store
        .insert_login(&login_row("l1", "u", expires))
        .await
        .expect("login");

    let err = r
        .admission
        .admit("u", Ask::Login, "s1")
        .await
        .expect_err("second login");
    let (kind, message, retry_after) = refusal(&err).expect("quota");
    assert_eq!(kind, Refusal::QuotaExceeded);
    assert!(
        message.contains("you have 1 login under way, the limit (quota.max_logins) is 1"),
        "{message}"
    );
    // The first login expires in about 90 s.
    assert!(
        (Duration::from_secs(80)..=Duration::from_secs(90)).contains(&retry_after),
        "{retry_after:?}"
    );
    assert_eq!(r.admission.held_bytes(), 0, "a refusal holds nothing");

    r.store
        .transition_login(
            "l1",
            LoginState::Starting,
            LoginState::Cancelled,
            &Default::default(),
        )
        .await
        .expect("cancel");
    // Two live sandboxes: no place for the login's browser sandbox.
    create(&r.admission, &r.store, "u").await.expect("1");
    create(&r.admission, &r.store, "u").await.expect("2");
    let err = r
        .admission
        .admit("u", Ask::Login, "s2")
        .await
        .expect_err("no sandbox place");
    let (_, message, _) = refusal(&err).expect("quota");
    assert!(
        message.starts_with("a login needs a browser sandbox, and you have 2 live sandboxes"),
        "{message}"
    );

    // What airlock makes for an admitted login passes the caps...
    let permit = r
        .admission
        .admit("u", Ask::OnBehalf, "w")
        .await
        .expect("on behalf");
    permit.commit();
    assert_eq!(
        r.admission
            .usage("u")
            .await
            .expect("usage")
            .used
            .creates_last_minute,
        2,
        "and is no create of the user's"
    );
    // ...but not the host's floor.
    r.probe.set_memory(Some(2 * GIB));
    let err = r
        .admission
        .admit("u", Ask::OnBehalf, "w2")
        .await
        .expect_err("no memory");
    assert!(matches!(err, AppError::NoCapacity(_)), "{err}");
}

/// 100 creates at once against 10 GiB available, a 2 GiB floor and 512 MiB
/// held per sandbox: exactly (10 − 2) GiB / 512 MiB = 16 pass, the rest get
/// 503 `no_capacity`, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_parallel_creates_never_overshoot_the_memory_floor() {
    let r = rig(quotas(1000, 1000, 1000), Some(10 * GIB)).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let a = r.admission.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let user = format!("user{i}");
                let id = format!("sb{i}");
                match a.admit(&user, Ask::Sandbox, &id).await {
                    Ok(permit) => {
                        tokio::task::yield_now().await;
                        permit.commit();
                        Ok(id)
                    }
                    Err(e) => Err(e),
                }
            })
        })
        .collect();
    let mut admitted = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(id) => admitted.push(id),
            Err(e) => {
                assert!(matches!(e, AppError::NoCapacity(_)), "{e}");
                let api = crate::http::error::ApiError::from(e);
                assert_eq!(api.status.as_u16(), 503);
                assert_eq!(api.code, "no_capacity");
                assert!(
                    api.message.contains("min_free_memory_mb"),
                    "{}",
                    api.message
                );
            }
        }
    }
    assert_eq!(admitted.len(), 16);
    assert_eq!(r.admission.held_bytes(), 8 * GIB);

    // One becomes ready: its hold goes (its guest's memory now shows in
    // the host's figures, which this fake keeps still), and one more fits.
    r.admission.release(&admitted[0]);
    r.admission.release(&admitted[0]);
    let permit = r
        .admission
        .admit("late", Ask::Sandbox, "late")
        .await
        .expect("a place freed");
    // Dropped uncommitted: the hold goes back.
    drop(permit);
    assert_eq!(r.admission.held_bytes(), 15 * 512 * MIB);
}

#[tokio::test]
async fn too_little_disk_is_507_and_unknown_host_figures_do_not_block() {
    let r = rig(Quotas::default(), None).await;
    r.probe.set_disk(Some(GIB));
    let err = r
        .admission
        .admit("u", Ask::Sandbox, "a")
        .await
        .expect_err("disk");
    assert!(matches!(err, AppError::NoStorage(_)), "{err}");
    r.probe.set_disk(None);
    r.admission
        .admit("u", Ask::Sandbox, "a")
        .await
        .expect("nothing known, nothing refused")
        .commit();
    assert!(r.admission.usage("u").await.expect("usage").host.is_none());
}

#[tokio::test]
async fn usage_counts_the_callers_own() {
    let r = rig(quotas(8, 3, 30), Some(10 * GIB)).await;
    for u in ["u", "v"] {
        r.store.insert_user(u, u, None).await.expect("user");
    }
    create(&r.admission, &r.store, "u").await.expect("1");
    create(&r.admission, &r.store, "u").await.expect("2");
    create(&r.admission, &r.store, "v").await.expect("other");
    r.store
        .insert_login(&login_row("l", "u", now_ms() + 60_000))
        .await
        .expect("login");
    let usage = r.admission.usage("u").await.expect("usage");
    assert_eq!(usage.limits, quotas(8, 3, 30));
    assert_eq!(
        usage.used,
        Used {
            sandboxes: 2,
            logins: 1,
            creates_last_minute: 2
        }
    );
    let host = usage.host.expect("the fake knows");
    assert_eq!(host.memory_available_mb, Some(10 * 1024));
    assert_eq!(host.memory_held_mb, 3 * 512);
    assert_eq!(host.reserve_mb, 512);
    let json = serde_json::to_value(&usage).expect("json");
    assert_eq!(json["limits"]["max_sandboxes"], 8);
    assert_eq!(json["used"]["creates_last_minute"], 2);
    r.clock.advance(RATE_WINDOW);
    let later = r.admission.usage("u").await.expect("usage");
    assert_eq!(later.used.creates_last_minute, 0);
    assert_eq!(later.used.sandboxes, 2);
}

#[test]
fn meminfo_is_read_in_bytes() {
    let text =
        "MemTotal:       24684544 kB\nMemFree:        21180000 kB\nMemAvailable:   23303168 kB\n";
    assert_eq!(meminfo_available(text), Some(23_303_168 << 10));
    assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
    assert!(ProcProbe.memory_available().is_some());
    assert!(ProcProbe.disk_available(Path::new("/")).is_some());
}

#[test]
fn retry_after_is_whole_seconds_rounded_up() {
    assert_eq!(whole_seconds(Duration::ZERO), 1);
    assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
    assert_eq!(whole_seconds(Duration::from_secs(40)), 40);
    assert_eq!(whole_seconds(Duration::from_millis(40_001)), 41);
}
