//! Chaos and churn with the real nspawn driver: many sandboxes created,
//! used and deleted leave nothing behind; a sandbox whose supervisor is
//! killed becomes `failed` by name and is cleaned up, one whose agent or
//! display is killed works again (the guest restarts them) or fails by name; a control
//! plane killed with SIGKILL in the middle of creates and deletes comes back
//! telling the truth and leaking nothing.
//!
//! The churn loop and the leak checker are `airlock-bench churn`'s own
//! (crates/airlock-bench/src), included here so CI runs the very code the
//! figures in docs/performance.md come from.

mod common;

#[allow(dead_code)]
#[path = "../../airlock-bench/src/stats.rs"]
mod stats;

#[allow(dead_code)]
#[path = "../../airlock-bench/src/churn.rs"]
mod churn;

#[allow(dead_code)]
#[path = "../../airlock-bench/src/leaks.rs"]
mod leaks;

#[allow(dead_code)]
#[path = "common/child.rs"]
mod child;

#[allow(dead_code)]
#[path = "common/pg.rs"]
mod pg;
use pg::OwnPostgres;

mod logins_support;

use churn::Api;
use common::unmet;
use leaks::Scope;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The settled states: nothing is under way any more.
const SETTLED: [&str; 3] = ["ready", "failed", "stopped"];

/// The checker is only worth its "nothing left" if it sees a sandbox's
/// footprint: while one runs, every kind of resource it holds is found; once
/// deleted, none is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leak_checker_sees_a_running_sandbox() {
    if unmet().is_some() {
        return;
    }
    let pool = "10.245.5.0/24";
    let h = common::start(pool).await;
    let id = h.ready_sandbox("browser").await;
    let mut scope = Scope::new(&h.data_dir, pool);
    scope.remember(&id);
    assert_eq!(scope.uid_bases.len(), 1, "the sandbox's uid range");
    let found = leaks::check(&scope).await;
    let kinds: std::collections::BTreeSet<&str> = found.iter().map(|l| l.kind).collect();
    for kind in [
        "link",
        "netns",
        "nftables",
        "address",
        "listener",
        "cgroup",
        "process",
        "mount",
        "loop",
        "uid range",
        "directory",
        "store row",
        "lease",
    ] {
        assert!(
            kinds.contains(kind),
            "no {kind} found for a running sandbox: {found:#?}"
        );
    }
    assert!(
        found
            .iter()
            .any(|l| l.kind == "process" && l.what.contains("systemd-nspawn")),
        "{found:#?}"
    );
    assert!(
        !leaks::of_sandbox(&scope, &id).is_empty(),
        "the sandbox's own footprint"
    );
    let (status, _) = h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(status, 202);
    h.wait_state(&id, "stopped", Duration::from_secs(60)).await;
    assert_eq!(
        leaks::settle(&scope, Duration::from_secs(30)).await,
        Vec::new()
    );
    h.shutdown().await;
}

/// Churn as CI runs it: 100 cycles, 4 at a time, through the bench's loop;
/// every cycle completes and the leak checker finds nothing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    if unmet().is_some() {
        return;
    }
    let pool = "10.245.1.0/24";
    let h = common::start_with(pool, |cfg| {
        cfg.quota.creates_per_minute = 10_000;
        cfg.quota.max_sandboxes = 100;
    })
    .await;
    let cycles = std::env::var("AIRLOCK_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let opts = churn::Options {
        cycles,
        parallel: 4,
        kind: "browser".into(),
        boot_timeout: Duration::from_secs(120),
        stop_timeout: Duration::from_secs(60),
    };
    let api = Api::new(&h.base, None);
    let scope = Mutex::new(Scope::new(&h.data_dir, pool));
    let out = churn::run(&api, &opts, &|id| scope.lock().expect("scope").remember(id)).await;
    let mut scope = scope.into_inner().expect("scope");
    scope.ids.extend(out.ids.iter().cloned());
    let left = leaks::settle(&scope, Duration::from_secs(30)).await;
    churn::print(&out, &opts, &left);
    let failures: Vec<String> = out
        .failures
        .iter()
        .map(|f| format!("cycle {} at {}: {}", f.cycle, f.step, f.reason))
        .collect();
    assert_eq!(failures, Vec::<String>::new());
    assert_eq!(out.completed, cycles);
    assert_eq!(left, Vec::new());
    h.shutdown().await;
}

/// Deleted at several moments of its create and boot: each sandbox ends
/// `stopped` (not `failed`), and nothing is left, its forwarder included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_deleted_while_booting_ends_stopped_and_leaks_nothing() {
    if unmet().is_some() {
        return;
    }
    let pool = "10.245.6.0/24";
    let h = common::start(pool).await;
    let api = Api::new(&h.base, None);
    let mut scope = Scope::new(&h.data_dir, pool);
    let mut ends = Vec::new();
    for delay_ms in [0u64, 100, 300, 600, 1000, 2000] {
        let id = create(&api).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let seen = api.sandbox(&id).await["state"].clone();
        assert_eq!(delete(&api, &id).await, 202);
        let end = api
            .wait_state(&id, &["stopped"], Duration::from_secs(30))
            .await;
        ends.push(format!(
            "{delay_ms} ms ({seen}): {end:?}",
            end = end.map(|b| b["state"].clone())
        ));
        scope.ids.insert(id);
    }
    eprintln!("deleted during create and boot:\n{}", ends.join("\n"));
    let left = leaks::settle(&scope, Duration::from_secs(30)).await;
    assert!(
        ends.iter().all(|e| e.ends_with("Ok(String(\"stopped\"))")) && left.is_empty(),
        "ends: {ends:#?}\nleft behind: {left:#?}"
    );
    h.shutdown().await;
}

/// SIGKILL, from the host, every process of sandbox `id` named `comm`;
/// their pids (at least one, or the test fails).
fn kill_in_sandbox(id: &str, comm: &str) -> Vec<u32> {
    let procs = leaks::sandbox_processes(id);
    let victims: Vec<u32> = procs
        .iter()
        .filter(|(_, c)| c == comm)
        .map(|(pid, _)| *pid)
        .collect();
    assert!(
        !victims.is_empty(),
        "no {comm} in the sandbox's cgroups: {procs:?}"
    );
    for pid in &victims {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -9 {pid}");
    }
    victims
}

/// Kill one process of a ready sandbox with SIGKILL from the host; within
/// 15 s the API says `failed`, naming it, and once torn down the sandbox
/// holds nothing on the host, its pool address included.
async fn killed_process_fails_the_sandbox(pool: &str, comm: &str, named: &[&str]) {
    if unmet().is_some() {
        return;
    }
    let h = common::start(pool).await;
    let id = h.ready_sandbox("browser").await;
    let mut scope = Scope::new(&h.data_dir, pool);
    scope.remember(&id);
    let victims = kill_in_sandbox(&id, comm);
    let killed = Instant::now();
    let api = Api::new(&h.base, None);
    let body = api
        .wait_state(&id, &["failed"], Duration::from_secs(15))
        .await;
    let body = match body {
        Err(e) if !e.starts_with("failed") => panic!(
            "15 s after {comm} (pid {victims:?}) was killed the sandbox is {e}: {}",
            api.sandbox(&id).await
        ),
        Err(e) => panic!("{e}"),
        Ok(b) => b,
    };
    let reason = churn::reason(&body).to_lowercase();
    eprintln!(
        "{comm} killed: failed after {:?}: {reason}",
        killed.elapsed()
    );
    assert!(
        named.iter().any(|n| reason.contains(n)),
        "the reason names none of {named:?}: {reason}"
    );
    let left = leaks::settle(&scope, Duration::from_secs(30)).await;
    assert_eq!(left, Vec::new(), "left after {comm} was killed");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nspawn_fails_the_sandbox_and_leaks_nothing() {
    killed_process_fails_the_sandbox("10.245.2.0/24", "systemd-nspawn", &["nspawn"]).await;
}

/// Kill one service inside a ready guest from the host with SIGKILL. The
/// guest's own systemd restarts the agent and Xvnc (`Restart=always`, 1 s),
/// so the truthful outcome is a sandbox that works again: within 30 s it is
/// `ready` and `works` passes. A sandbox that does not heal is `failed` by
/// the heartbeat (three missed checks, 15 s) with a reason naming `named`;
/// either way it is then deleted and leaves nothing.
async fn killed_service_heals_or_fails_truthfully(
    pool: &str,
    comm: &str,
    named: &[&str],
    works: impl Fn(String, String) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) {
    if unmet().is_some() {
        return;
    }
    let h = common::start(pool).await;
    let id = h.ready_sandbox("browser").await;
    let mut scope = Scope::new(&h.data_dir, pool);
    scope.remember(&id);
    let victims = kill_in_sandbox(&id, comm);
    let killed = Instant::now();
    let api = Api::new(&h.base, None);
    let outcome = loop {
        let body = api.sandbox(&id).await;
        let state = body["state"].as_str().unwrap_or_default().to_owned();
        if state == "failed" {
            let reason = churn::reason(&body).to_lowercase();
            assert!(
                named.iter().any(|n| reason.contains(n)),
                "failed, but the reason names none of {named:?}: {reason}"
            );
            break format!("failed after {:?}: {reason}", killed.elapsed());
        }
        assert_eq!(state, "ready", "{comm} killed: the sandbox is {body}");
        if works(h.base.clone(), id.clone()).await {
            let back = killed.elapsed();
            // Working again, and the control plane still says so a
            // heartbeat round later (it did not fail a healthy sandbox).
            tokio::time::sleep(Duration::from_secs(6)).await;
            let body = api.sandbox(&id).await;
            assert_eq!(body["state"], "ready", "healed, then {body}");
            break format!("working again after {back:?}");
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "30 s after {comm} was killed the sandbox is still `ready` but does not work"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("{comm} (pids {victims:?}) killed: {outcome}");
    let code = delete(&api, &id).await;
    assert!(
        code == 202 || code == 204 || code == 200,
        "delete answered {code}"
    );
    api.wait_state(&id, &["stopped", "failed"], Duration::from_secs(60))
        .await
        .expect("deleted");
    let left = leaks::settle(&scope, Duration::from_secs(30)).await;
    assert_eq!(left, Vec::new(), "left after {comm} was killed");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_heals_or_fails_truthfully_and_leaks_nothing() {
    killed_service_heals_or_fails_truthfully(
        "10.245.3.0/24",
        "airlock-agent",
        &["agent"],
        |base, id| {
            Box::pin(async move {
                // Exec reaches the agent: a new one answers.
                let reply = Api::new(&base, None)
                    .call(
                        reqwest::Method::POST,
                        &format!("/api/v1/sandboxes/{id}/exec"),
                        Some(json!({"argv": ["true"]})),
                    )
                    .await;
                matches!(reply, Ok(r) if r.status == 200 && r.body["exit_code"] == 0)
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vnc_server_heals_or_fails_truthfully_and_leaks_nothing() {
    killed_service_heals_or_fails_truthfully(
        "10.245.4.0/24",
        "Xvnc",
        &["xvnc", "display"],
        |base, id| {
            Box::pin(async move {
                // The relay reaches a display that paints a desktop again.
                matches!(common::viewer::frame(&base, &id).await, Ok(f) if f.looks_like_desktop())
            })
        },
    )
    .await;
}

/// Ask for a browser sandbox; whatever the API answers.
async fn ask_create(api: &Api) -> churn::Answer {
    api.call(
        reqwest::Method::POST,
        "/api/v1/sandboxes",
        Some(json!({"kind": "browser"})),
    )
    .await
    .expect("an answer to a create")
}

/// Create a sandbox; its id.
async fn create(api: &Api) -> String {
    let a = ask_create(api).await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.body["id"].as_str().expect("id").to_owned()
}

async fn delete(api: &Api, id: &str) -> u16 {
    api.call(
        reqwest::Method::DELETE,
        &format!("/api/v1/sandboxes/{id}"),
        None,
    )
    .await
    .expect("delete")
    .status
}

/// After a restart: within 30 s every sandbox has settled, and what each
/// says is true — a ready one runs and answers exec, a stopped or failed one
/// holds nothing on the host. `expect` pins a state where the test knows it.
async fn truthful_within_30s(
    plane: &child::ChildPlane,
    since: Instant,
    ids: &[(&str, Option<&str>)],
) -> Vec<(String, String)> {
    let api = Api::new(&plane.base, None);
    let scope = Scope::new(&plane.data_dir, &plane.pool);
    let deadline = since + Duration::from_secs(30);
    let mut states = Vec::new();
    for (id, expect) in ids {
        let body = loop {
            let body = api.sandbox(id).await;
            let state = body["state"].as_str().unwrap_or("");
            if SETTLED.contains(&state) {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "30 s after the restart sandbox {id} is still {state:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let state = body["state"].as_str().unwrap_or("").to_owned();
        eprintln!(
            "after the restart {id} is {state} ({:?} after it): {}",
            since.elapsed(),
            churn::reason(&body)
        );
        if let Some(want) = expect {
            assert_eq!(state, *want, "sandbox {id}: {body}");
        }
        if state == "ready" {
            let a = api
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/sandboxes/{id}/exec"),
                    Some(json!({"argv": ["echo", "alive"], "timeout_s": 10})),
                )
                .await
                .expect("exec");
            assert_eq!(
                (a.status, a.body["stdout"].clone()),
                (200, Value::from("alive\n")),
                "sandbox {id} says ready: {}",
                a.body
            );
        } else {
            // Its teardown may still be finishing: give it until the deadline.
            let left = loop {
                let left = leaks::of_sandbox(&scope, id);
                if left.is_empty() || Instant::now() >= deadline {
                    break left;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            assert_eq!(left, Vec::new(), "sandbox {id} says {state}");
        }
        states.push((id.to_string(), state));
    }
    states
}

/// Delete what is still live, wait until it has stopped, then nothing of
/// the data dir, the pool or the store may be left.
async fn delete_all_and_check(plane: &child::ChildPlane, ids: &[String]) {
    let api = Api::new(&plane.base, None);
    for id in ids {
        let state = api.sandbox(id).await["state"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if state != "stopped" {
            delete(&api, id).await;
        }
    }
    for id in ids {
        let end = api
            .wait_state(id, &["stopped"], Duration::from_secs(60))
            .await;
        assert!(end.is_ok(), "sandbox {id} did not stop: {end:?}");
    }
    let mut scope = Scope::new(&plane.data_dir, &plane.pool);
    scope.ids.extend(ids.iter().cloned());
    scope.ignore_pids.extend(plane.pid());
    let left = leaks::settle(&scope, Duration::from_secs(30)).await;
    assert_eq!(left, Vec::new());
}

/// SIGKILL the control plane with work in flight — a ready sandbox, one
/// just created, one booting, one being deleted — and start it again over
/// the same data dir: within 30 s the ready one is re-adopted and answers,
/// the deleted one is stopped, the interrupted ones have settled truthfully,
/// and after deleting everything nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_control_plane_with_work_in_flight_comes_back_truthful() {
    if unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let mut plane = child::ChildPlane::start("10.245.10.0/24");
    let api = Api::new(&plane.base, None);
    let ready = create(&api).await;
    let deleting = create(&api).await;
    for id in [&ready, &deleting] {
        api.wait_state(id, &["ready"], Duration::from_secs(120))
            .await
            .expect("ready");
    }
    let booting = create(&api).await;
    api.wait_state(&booting, &["booting", "ready"], Duration::from_secs(60))
        .await
        .expect("booting");
    assert_eq!(delete(&api, &deleting).await, 202);
    let fresh = create(&api).await;
    let since = plane.crash_and_restart();
    let states = truthful_within_30s(
        &plane,
        since,
        &[
            (ready.as_str(), Some("ready")),
            (deleting.as_str(), Some("stopped")),
            (booting.as_str(), None),
            (fresh.as_str(), None),
        ],
    )
    .await;
    eprintln!("settled: {states:?}");
    delete_all_and_check(&plane, &[ready, deleting, booting, fresh]).await;
}

/// SIGKILL the control plane at several moments of one create (just after
/// the `POST` answered, then later and later into the boot) and restart it
/// each time: the sandbox settles truthfully within 30 s and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_at_each_point_of_a_create_leaks_nothing() {
    if unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let mut plane = child::ChildPlane::start("10.245.11.0/24");
    let mut ids = Vec::new();
    let mut reached = Vec::new();
    for delay_ms in [
        0u64, 20, 40, 60, 80, 100, 130, 160, 200, 250, 300, 400, 700, 1000, 2500,
    ] {
        let api = Api::new(&plane.base, None);
        let id = create(&api).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let seen = api.sandbox(&id).await["state"].clone();
        // How far the create had come on the host when the kill fell.
        let scope = Scope::new(&plane.data_dir, &plane.pool);
        let had: std::collections::BTreeSet<&str> = leaks::of_sandbox(&scope, &id)
            .iter()
            .map(|l| l.kind)
            .collect();
        let since = plane.crash_and_restart();
        let end = truthful_within_30s(&plane, since, &[(&id, None)]).await;
        reached.push(format!(
            "{delay_ms:>5} ms: {seen} with {had:?} → {}",
            end[0].1
        ));
        ids.push(id);
    }
    eprintln!(
        "killed during a create, and how each ended:\n{}",
        reached.join("\n")
    );
    delete_all_and_check(&plane, &ids).await;
}

/// SIGKILL the control plane at several moments of a delete: after the
/// restart the sandbox ends `stopped` within 30 s and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_during_a_delete_still_stops_the_sandbox() {
    if unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let mut plane = child::ChildPlane::start("10.245.12.0/24");
    let mut ids = Vec::new();
    for delay_ms in [0u64, 200, 800] {
        let api = Api::new(&plane.base, None);
        let id = create(&api).await;
        api.wait_state(&id, &["ready"], Duration::from_secs(120))
            .await
            .expect("ready");
        assert_eq!(delete(&api, &id).await, 202);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let since = plane.crash_and_restart();
        truthful_within_30s(&plane, since, &[(&id, Some("stopped"))]).await;
        ids.push(id);
    }
    delete_all_and_check(&plane, &ids).await;
}

/// Poll a login until it is in one of `want`; `Err` when it ends otherwise
/// or takes longer than `within`.
async fn wait_login(api: &Api, id: &str, want: &[&str], within: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    loop {
        let a = api
            .call(reqwest::Method::GET, &format!("/api/v1/logins/{id}"), None)
            .await?;
        let state = a.body["state"].as_str().unwrap_or("").to_owned();
        if want.contains(&state.as_str()) {
            return Ok(a.body);
        }
        if ["failed", "expired", "cancelled"].contains(&state.as_str())
            || Instant::now() >= deadline
        {
            return Err(format!("login is {state}: {}", a.body));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// SIGKILL the control plane twice during a login: while the user is
/// signing in, and right after the OAuth callback (while the credentials are
/// captured, sealed, stored and delivered). The login still completes, the
/// user signed in once, one credential is stored and delivered, the
/// workspace holds the issued token, and nothing leaks once all is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_during_a_login_loses_and_repeats_nothing() {
    if unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let marker = format!("CANARY{}", hex::encode(rand::random::<[u8; 8]>()));
    let oauth = Arc::new(logins_support::OAuth {
        marker: marker.clone(),
        ..Default::default()
    });
    let port = logins_support::start_oauth(oauth.clone()).await;
    let providers = tempfile::tempdir().expect("tempdir");
    logins_support::write_test_providers(providers.path());
    let mut plane = child::ChildPlane::start_with(
        "10.245.13.0/24",
        &format!(
            "providers_dir = \"{}\"\negress_allow = [\"oauth.test\"]\nlogin_timeout_s = 600",
            providers.path().display()
        ),
    );
    let api = Api::new(&plane.base, None);
    // The first authenticated request makes the user `local`.
    let _ = api.call(reqwest::Method::GET, "/api/v1/logins", None).await;
    let admin = Api::new(&plane.base, Some(plane.admin_token("chaos-admin")));
    let a = admin
        .call(
            reqwest::Method::PUT,
            "/api/v1/egress/users/local",
            Some(json!({ "url": format!("http://t:t@127.0.0.1:{port}") })),
        )
        .await
        .expect("put upstream");
    assert_eq!(a.status, 200, "{}", a.body);
    let start_login = |api: Api| async move {
        let a = api
            .call(
                reqwest::Method::POST,
                "/api/v1/logins",
                Some(json!({ "provider": "testoauth" })),
            )
            .await
            .expect("login");
        assert_eq!(a.status, 201, "{}", a.body);
        a.body
    };

    // Killed as a login starts: after the restart it has moved on (or ended,
    // saying why) within 30 s; it is cancelled and its browser goes.
    let first = start_login(api.clone()).await;
    let first_id = first["id"].as_str().expect("id").to_owned();
    let first_browser = first["browser_sandbox_id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    plane.crash_and_restart();
    let api = Api::new(&plane.base, None);
    let settled = wait_login(
        &api,
        &first_id,
        &["awaiting_user", "failed", "cancelled", "expired"],
        Duration::from_secs(30),
    )
    .await;
    eprintln!("a login killed while starting: {settled:?}");
    let settled = settled.expect("the login settles within 30 s");
    if settled["state"] == "failed" {
        assert!(
            settled["error"].is_string(),
            "failed, saying why: {settled}"
        );
    }
    let a = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/logins/{first_id}"),
            None,
        )
        .await
        .expect("cancel");
    assert!(
        a.status < 300 || a.status == 409,
        "{}: {}",
        a.status,
        a.body
    );
    if !first_browser.is_empty() {
        let gone = api
            .wait_state(
                &first_browser,
                &["stopped", "failed"],
                Duration::from_secs(60),
            )
            .await;
        assert!(gone.is_ok(), "the first login's browser: {gone:?}");
    }
    let asked_before = oauth.authorize_requests.lock().expect("lock").len();

    let second = start_login(api.clone()).await;
    let id = second["id"].as_str().expect("id").to_owned();
    let browser = second["browser_sandbox_id"]
        .as_str()
        .expect("sb")
        .to_owned();
    let login = wait_login(&api, &id, &["awaiting_user"], Duration::from_secs(150))
        .await
        .expect("awaiting_user");
    let url = login["login_url"].as_str().expect("url").to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while oauth.authorize_requests.lock().expect("lock").len() <= asked_before {
        assert!(
            Instant::now() < deadline,
            "Chromium never asked for the sign-in page"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Killed while the user signs in: the login and its browser are still there.
    let since = plane.crash_and_restart();
    let api = Api::new(&plane.base, None);
    truthful_within_30s(&plane, since, &[(browser.as_str(), Some("ready"))]).await;
    let login = wait_login(&api, &id, &["awaiting_user"], Duration::from_secs(5))
        .await
        .expect("still awaiting the user after the restart");
    assert_eq!(login["login_url"], Value::from(url.clone()));

    // The user signs in; the control plane dies as the callback lands.
    let location = logins_support::approve_at(port, &url).await;
    let script = format!(
        "require('http').get({location:?},r=>{{r.resume();r.on('end',()=>process.exit(r.statusCode===200?0:1))}})"
    );
    let a = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sandboxes/{browser}/exec"),
            Some(json!({ "argv": ["node", "-e", script], "timeout_s": 30 })),
        )
        .await
        .expect("exec");
    assert_eq!(
        (a.status, a.body["exit_code"].clone()),
        (200, Value::from(0)),
        "{}",
        a.body
    );
    // Then once more at each state the login shows on its way to completed
    // (captured, stored, delivered, as fast as they pass).
    let mut api = api;
    let mut seen = String::from("awaiting_user");
    let mut killed_at = Vec::new();
    let done = loop {
        let deadline = Instant::now() + Duration::from_secs(120);
        let state = loop {
            let a = api
                .call(reqwest::Method::GET, &format!("/api/v1/logins/{id}"), None)
                .await
                .expect("login");
            let state = a.body["state"].as_str().unwrap_or("").to_owned();
            if state != seen {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "login stuck at {state}: {}",
                a.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if ["completed", "failed", "expired", "cancelled"].contains(&state.as_str()) {
            break wait_login(&api, &id, &["completed"], Duration::from_secs(1)).await;
        }
        plane.crash_and_restart();
        api = Api::new(&plane.base, None);
        killed_at.push(state.clone());
        seen = state;
    };
    eprintln!("the control plane was killed with the login at {killed_at:?}");
    let seen = format!("{killed_at:?}");
    let done = done.unwrap_or_else(|e| panic!("killed while {seen}: {e}"));
    assert_eq!(
        *oauth.tokens_issued.lock().expect("lock"),
        1,
        "signed in once"
    );
    let creds = api
        .call(reqwest::Method::GET, "/api/v1/credentials", None)
        .await
        .expect("credentials")
        .body;
    let list = creds["credentials"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{creds}");
    assert!(!list[0]["delivered_at"].is_null(), "{creds}");
    let workspace = done["workspace_sandbox_id"]
        .as_str()
        .expect("ws")
        .to_owned();
    let a = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sandboxes/{workspace}/exec"),
            Some(json!({ "argv": ["cat", ".testcli/credentials.json"], "timeout_s": 10 })),
        )
        .await
        .expect("exec");
    assert!(
        a.body["stdout"].as_str().unwrap_or("").contains(&marker),
        "the workspace holds the issued token: {}",
        a.body
    );
    let mut all = vec![browser, workspace];
    if !first_browser.is_empty() {
        all.push(first_browser);
    }
    delete_all_and_check(&plane, &all).await;
}

/// PostgreSQL stops under a running control plane with ready sandboxes, and
/// starts again 20 s later. Meanwhile the API answers at once with 503
/// `store_unavailable` (not a hang, not a 500, not a 401 for a good token),
/// a create makes nothing, and the supervisor fails no sandbox because it
/// cannot write. Afterwards the sandboxes are still ready and answer, a
/// create works, and deleting everything leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_a_running_control_plane_loses_nothing() {
    if unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let (pg, url) = OwnPostgres::start();
    let plane =
        child::ChildPlane::start_with("10.245.20.0/24", &format!("database_url = \"{url}\""));
    let token = plane.admin_token("chaos-admin");
    let api = Api::new(&plane.base, None);
    let with_token = Api::new(&plane.base, Some(token));
    let mut ids = vec![create(&api).await, create(&api).await];
    for id in &ids {
        api.wait_state(id, &["ready"], Duration::from_secs(120))
            .await
            .expect("ready");
    }

    pg.stop();
    let down = Instant::now();
    for (who, api) in [("local", &api), ("token", &with_token)] {
        let started = Instant::now();
        let a = api
            .call(reqwest::Method::GET, "/api/v1/sandboxes", None)
            .await
            .expect("an answer while the database is down");
        assert_eq!(
            (a.status, a.body["error"]["code"].as_str()),
            (503, Some("store_unavailable")),
            "{who}: {}",
            a.body
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{who}: the answer took {:?}",
            started.elapsed()
        );
        assert!(a.retry_after.is_some(), "{who}: no Retry-After");
    }
    let a = ask_create(&api).await;
    assert_eq!(a.status, 503, "{}", a.body);
    // Four supervisor rounds without a database.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down.elapsed())).await;
    pg.restart();

    let back = Instant::now();
    let listed = loop {
        let a = api
            .call(reqwest::Method::GET, "/api/v1/sandboxes", None)
            .await
            .expect("list");
        if a.status == 200 {
            break a.body;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "30 s after PostgreSQL came back the API still answers {}: {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "the API answered again {:?} after PostgreSQL came back",
        back.elapsed()
    );
    let count = listed
        .as_array()
        .or_else(|| listed["sandboxes"].as_array())
        .map_or(0, Vec::len);
    assert_eq!(
        count, 2,
        "the create during the outage made a row: {listed}"
    );
    let states = truthful_within_30s(
        &plane,
        back,
        &[
            (ids[0].as_str(), Some("ready")),
            (ids[1].as_str(), Some("ready")),
        ],
    )
    .await;
    eprintln!("after the outage: {states:?}");
    let fresh = create(&api).await;
    api.wait_state(&fresh, &["ready"], Duration::from_secs(120))
        .await
        .expect("a create after the outage");
    ids.push(fresh);
    delete_all_and_check(&plane, &ids).await;
}

/// A small ext4 file system of the test's own, mounted from a file, to be
/// filled up without touching the machine's disk.
struct SmallDisk {
    _dir: tempfile::TempDir,
    mount: std::path::PathBuf,
}

impl SmallDisk {
    fn new(mib: u64) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("airlock-chaos-disk-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let file = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(mib << 20))
            .expect("disk file");
        for (cmd, args) in [
            ("mkfs.ext4", vec!["-q", "-F", file.to_str().expect("utf-8")]),
            (
                "mount",
                vec![
                    "-o",
                    "loop",
                    file.to_str().expect("utf-8"),
                    mount.to_str().expect("utf-8"),
                ],
            ),
        ] {
            let out = std::process::Command::new(cmd)
                .args(&args)
                .output()
                .expect(cmd);
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        SmallDisk { _dir: dir, mount }
    }

    /// Take every free block (as root, the reserved ones too).
    fn fill(&self) {
        let ballast = self.mount.join("ballast");
        let mut f = std::fs::File::create(&ballast).expect("ballast");
        let chunk = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        for size in [65536, 4096, 512, 1] {
            while std::io::Write::write_all(&mut f, &chunk[..size]).is_ok() {}
        }
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.mount.join("ballast")).expect("ballast");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
    }
}

/// The disk holding the data directory fills up completely under a running
/// control plane with a ready sandbox. Meanwhile a create is refused with
/// 507, reads answer, no sandbox is failed for a write the disk refused, and
/// a delete goes through (the control plane gives back its disk reserve).
/// Once space is freed a create works, the database reads back after a
/// restart, and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_disk_refuses_new_work_clearly_and_recovers() {
    if unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let disk = SmallDisk::new(512);
    let mut plane =
        child::ChildPlane::start_in("10.245.21.0/24", "", Some(disk.mount.join("data")));
    let api = Api::new(&plane.base, None);
    let mut ids = vec![create(&api).await];
    api.wait_state(&ids[0], &["ready"], Duration::from_secs(120))
        .await
        .expect("ready");

    disk.fill();
    let a = ask_create(&api).await;
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{}",
        a.body
    );
    // Three supervisor rounds with nothing writable.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let list = api
        .call(reqwest::Method::GET, "/api/v1/sandboxes", None)
        .await
        .expect("list");
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(
        list.body["sandboxes"].as_array().map(Vec::len),
        Some(1),
        "{}",
        list.body
    );
    let still = api.sandbox(&ids[0]).await;
    assert_eq!(
        still["state"], "ready",
        "a full disk failed the sandbox: {still}"
    );
    // The control plane gave back its disk reserve: a delete, which frees
    // space, goes through.
    assert_eq!(delete(&api, &ids[0]).await, 202, "a delete on a full disk");
    api.wait_state(&ids[0], &["stopped"], Duration::from_secs(60))
        .await
        .expect("stopped on a full disk");

    disk.free();
    let fresh = create(&api).await;
    api.wait_state(&fresh, &["ready"], Duration::from_secs(120))
        .await
        .expect("a create once there is room");
    ids.push(fresh);
    // The database survived: a restarted control plane reads it.
    plane.crash_and_restart();
    delete_all_and_check(&plane, &ids).await;
    drop(plane);
}
