//! More logins against the real nspawn driver and the real golden image: ten
//! users starting the real CLIs' logins at the same time (each URL passing
//! its provider's rule, nothing left after), the paste-code route (claude's
//! manual one) with bad input refused, and the canary kept out of the
//! control plane's own log at debug level.
//!
//! The OAuth server and the test providers are those of `logins.rs` (shared in
//! `logins_support`).

mod common;
mod logins_support;

#[allow(dead_code)]
#[path = "../../airlock-bench/src/leaks.rs"]
mod leaks;

use common::contains;
use logins_support::{
    approve_at, capture_logs, query, start_oauth, wait_gone, wait_login, write_paste_provider,
    write_test_providers, OAuth,
};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn get(h: &common::Harness, path: &str, token: Option<&str>) -> Value {
    let (status, body) = h.call(Method::GET, path, token, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Starts a login as the user of `token`: its id and its browser sandbox's.
async fn start_login(h: &common::Harness, token: Option<&str>, provider: &str) -> (String, String) {
    let (status, body) = h
        .call(
            Method::POST,
            "/api/v1/logins",
            token,
            Some(json!({ "provider": provider })),
        )
        .await;
    assert_eq!(status, 201, "{provider}: {body}");
    (
        body["id"].as_str().expect("id").to_owned(),
        body["browser_sandbox_id"].as_str().expect("sb").to_owned(),
    )
}

async fn exec(h: &common::Harness, token: Option<&str>, id: &str, argv: &[&str]) -> Value {
    let (status, body) = h
        .call(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            token,
            Some(json!({ "argv": argv, "timeout_s": 120 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The credential file in a workspace: its mode and owner, and its contents.
async fn delivered(h: &common::Harness, token: Option<&str>, ws: &str) -> (String, Value) {
    let out = exec(
        h,
        token,
        ws,
        &[
            "sh",
            "-c",
            "stat -c '%a %U' .testcli/credentials.json && cat .testcli/credentials.json",
        ],
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let text = out["stdout"].as_str().unwrap_or("");
    let (stat, json) = text.split_once('\n').expect("two parts");
    (
        stat.to_owned(),
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")),
    )
}

/// The control plane's log (captured at debug level) says something about
/// each of `ids` — so the capture works and the check below could fail — and
/// holds no trace of the canary.
fn assert_log_clean(logs: &Mutex<Vec<u8>>, marker: &str, ids: &[String]) {
    let logs = logs.lock().unwrap_or_else(|p| p.into_inner());
    assert!(!logs.is_empty(), "nothing was captured");
    assert!(
        contains(&logs, " DEBUG "),
        "the capture is not at debug level"
    );
    for id in ids {
        assert!(
            contains(&logs, &format!("login={id}")),
            "the captured log never mentions login {id}"
        );
    }
    assert!(
        contains(&logs, "credentials sealed and stored"),
        "the captured log misses the login's steps"
    );
    assert!(
        !contains(&logs, marker),
        "the canary is in the control plane's log"
    );
    eprintln!(
        "control-plane log: {} bytes captured, no canary",
        logs.len()
    );
}

/// A control plane for these tests: the test providers (the paste one
/// included), the control plane's log captured, and a local OAuth server
/// whose tokens carry a fresh canary.
struct Bed {
    logs: Arc<Mutex<Vec<u8>>>,
    marker: String,
    oauth: Arc<OAuth>,
    port: u16,
    h: common::Harness,
}

async fn bed(pool: &str, adjust: impl FnOnce(&mut airlock_server::config::Config)) -> Bed {
    let logs = capture_logs();
    let marker = format!("CANARY{}", hex::encode(rand::random::<[u8; 8]>()));
    let oauth = Arc::new(OAuth {
        marker: marker.clone(),
        ..Default::default()
    });
    let port = start_oauth(oauth.clone()).await;
    let mut h = common::start(pool).await;
    let dir = h.data_dir.join("test-providers");
    write_test_providers(&dir);
    write_paste_provider(&dir);
    h.cfg.providers_dir = Some(dir);
    // The test OAuth server is the upstream, on loopback: let its name through.
    h.cfg.egress_allow = vec!["oauth.test".into()];
    adjust(&mut h.cfg);
    h.restart().await;
    Bed {
        logs,
        marker,
        oauth,
        port,
        h,
    }
}

/// The three real CLIs in turn, ten users at once (the load: ten
/// sandboxes booting and ten CLIs starting on a small host): every login
/// reaches `awaiting_user` with a URL that passes its provider's rule (and,
/// checked here on its own, the parameters each CLI was seen to send), each
/// user sees only its own login, and each login went through its steps in
/// order. Then all are cancelled, and nothing is left on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_real_sign_ins_at_once() {
    if common::unmet().is_some() {
        return;
    }
    let pool = "10.250.1.0/24";
    let mut h = common::start(pool).await;
    // Ten sandboxes booting on two cores take longer than one.
    h.cfg.boot_timeout_s = 300;
    h.restart().await;
    let _ = get(&h, "/api/v1/logins", None).await;
    let app = h.running.as_ref().expect("running").app.clone();
    let providers =
        airlock_server::app::logins::providers::Providers::load(None).expect("providers");
    let mut users = Vec::new();
    for i in 0..10 {
        let (_, token) = app.add_user(&format!("u{i}")).await.expect("user");
        users.push(token);
    }
    let names = ["claude", "codex", "gemini"];
    let started = Instant::now();
    let mut logins = Vec::new();
    for (i, token) in users.iter().enumerate() {
        let provider = names[i % names.len()];
        let (id, sb) = start_login(&h, Some(token), provider).await;
        logins.push((provider, id, sb, token.clone()));
    }
    let mut scope = leaks::Scope::new(&h.data_dir, pool);
    let reached = futures::future::join_all(logins.iter().map(|(_, id, _, token)| {
        wait_login(
            &h,
            Some(token),
            id,
            &["awaiting_user"],
            Duration::from_secs(180),
        )
    }))
    .await;
    let took = started.elapsed();
    for ((provider, id, sb, token), login) in logins.iter().zip(&reached) {
        scope.remember(sb);
        let url = login["login_url"].as_str().expect("login_url");
        let def = providers.get(provider).expect("provider");
        assert!(
            def.url_prefixes.iter().any(|p| url.starts_with(p.as_str())),
            "{provider}: {url}"
        );
        assert_eq!(def.url.refuses(url), None, "{provider}: {url}");
        // What the real CLIs were seen to send, apart from the rule.
        let q = query(url);
        assert!(!q.get("client_id").is_none_or(|c| c.is_empty()), "{url}");
        assert_eq!(q["response_type"], "code", "{url}");
        assert!(q.contains_key("state"), "{url}");
        let redirect = &q["redirect_uri"];
        assert!(
            redirect.starts_with("http://127.0.0.1:") || redirect.starts_with("http://localhost:"),
            "{url}"
        );
        if *provider != "gemini" {
            assert_eq!(q["code_challenge_method"], "S256", "{url}");
            assert_eq!(q["code_challenge"].len(), 43, "{url}");
        }
        // Its steps, in order, each entered once.
        let steps: Vec<&str> = login["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|m| m["step"].as_str())
            .collect();
        assert_eq!(steps.first(), Some(&"sandbox"), "{provider}: {login}");
        assert_eq!(steps.get(1), Some(&"agent"), "{provider}: {login}");
        let want_prompts = *provider == "gemini";
        assert_eq!(
            steps.contains(&"prompts"),
            want_prompts,
            "{provider}: {login}"
        );
        assert!(
            login["step"].is_null(),
            "no step once awaiting the user: {login}"
        );
        eprintln!(
            "{provider} {id}: {}",
            login["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .map(|m| format!(
                    "{} at {:.1}s",
                    m["step"].as_str().unwrap_or("?"),
                    m["after_s"].as_f64().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Another user's login is not there for this one.
        let list = get(&h, "/api/v1/logins", Some(token)).await;
        assert_eq!(list["logins"].as_array().map(Vec::len), Some(1), "{list}");
    }
    eprintln!("ten logins reached the sign-in page in {took:?}");
    // Cancel all: every browser sandbox goes, and nothing is left.
    for (_, id, _, token) in &logins {
        let (status, body) = h
            .call(
                Method::DELETE,
                &format!("/api/v1/logins/{id}"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["state"], "cancelled", "{body}");
    }
    for (_, _, sb, token) in &logins {
        wait_gone(&h, Some(token), sb, Duration::from_secs(120)).await;
    }
    assert_eq!(
        leaks::settle(&scope, Duration::from_secs(60)).await,
        Vec::new()
    );
    h.shutdown().await;
}

/// Claude's manual route: the OAuth server's redirect is a page that shows a
/// code, the CLI waits at "Paste code here if prompted", and the user's code
/// reaches it through `POST /logins/{id}/code`. Bad codes, codes from another
/// user and codes for a login not waiting for one are refused and change
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pasted_code_completes_the_login() {
    if common::unmet().is_some() {
        return;
    }
    let Bed {
        logs,
        marker,
        oauth,
        port,
        h,
    } = bed("10.234.61.0/24", |cfg| cfg.login_timeout_s = 900).await;
    let _ = get(&h, "/api/v1/logins", None).await;
    let admin = h.admin_token().await;
    let (status, body) = h
        .call(
            Method::PUT,
            "/api/v1/egress/users/local",
            Some(&admin),
            Some(json!({ "url": format!("http://t:t@127.0.0.1:{port}") })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let app = h.running.as_ref().expect("running").app.clone();
    let (_, other) = app.add_user("mallory").await.expect("user");

    let providers = get(&h, "/api/v1/providers", None).await;
    let takes_code: HashMap<&str, bool> = providers["providers"]
        .as_array()
        .expect("providers")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["takes_code"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(takes_code.get("testpaste"), Some(&true), "{providers}");
    assert_eq!(takes_code.get("testoauth"), Some(&false), "{providers}");

    let (id, sb) = start_login(&h, None, "testpaste").await;
    let code_path = format!("/api/v1/logins/{id}/code");
    // Too early: no code is awaited while the login is starting.
    let (status, body) = h
        .call(Method::POST, &code_path, None, Some(json!({"code": "x#y"})))
        .await;
    assert_eq!(status, 409, "{body}");

    let waiting = wait_login(&h, None, &id, &["awaiting_user"], Duration::from_secs(300)).await;
    let url = waiting["login_url"].as_str().expect("url").to_owned();
    assert!(url.starts_with("http://oauth.test/authorize?"), "{url}");
    assert_eq!(query(&url)["redirect_uri"], "http://oauth.test/code");
    // The CLI shows its prompt: the login says it awaits a code.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = get(&h, &format!("/api/v1/logins/{id}"), None).await;
        if l["awaiting_code"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI waits at its code prompt, but the login does not say so: {l}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Bad input: refused with a 4xx that says why; nothing reaches the CLI
    // (which would exit on a wrong line, failing the login below).
    for (body, want) in [
        (json!({ "code": "" }), 400),
        (json!({ "code": "   " }), 400),
        (json!({ "code": "abc\u{7}def" }), 400),
        (json!({ "code": "abc\ndef" }), 400),
        (json!({ "code": "a".repeat(5000) }), 400),
        (json!({}), 400),
        (json!({ "code": 5 }), 400),
        (json!({ "code": "x", "extra": 1 }), 400),
    ] {
        let (status, answer) = h
            .call(Method::POST, &code_path, None, Some(body.clone()))
            .await;
        assert_eq!(status, want, "{body} → {answer}");
        let msg = answer["error"]["message"].as_str().unwrap_or("");
        assert!(!msg.is_empty(), "{body} → {answer}");
        eprintln!("bad code → {status} {msg}");
    }
    // Another user's login does not exist for that user; an unknown one
    // neither.
    let (status, answer) = h
        .call(
            Method::POST,
            &code_path,
            Some(&other),
            Some(json!({ "code": "x#y" })),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = h
        .call(
            Method::POST,
            "/api/v1/logins/0000000000000000/code",
            None,
            Some(json!({ "code": "x#y" })),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let l = get(&h, &format!("/api/v1/logins/{id}"), None).await;
    assert_eq!(l["state"], "awaiting_user", "{l}");
    assert_eq!(l["awaiting_code"], true, "{l}");

    // The user signs in; the OAuth server sends the browser to its code page.
    let location = approve_at(port, &url).await;
    assert!(
        location.starts_with("http://oauth.test/code?"),
        "{location}"
    );
    // What the page shows is what the user pastes.
    let page = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(location.replace("http://oauth.test/", &format!("http://127.0.0.1:{port}/")))
        .send()
        .await
        .expect("code page")
        .text()
        .await
        .expect("text");
    let shown = page
        .split_once("<pre id=code>")
        .and_then(|(_, rest)| rest.split_once("</pre>"))
        .map(|(c, _)| c.to_owned())
        .expect("the page shows a code");
    let code = query(&location)["code"].clone();
    assert!(shown.starts_with(&format!("{code}#")), "{shown}");
    let (status, answer) = h
        .call(
            Method::POST,
            &code_path,
            None,
            Some(json!({ "code": format!("  {shown}\n") })),
        )
        .await;
    assert_eq!(status, 204, "{answer}");

    let done = wait_login(&h, None, &id, &["completed"], Duration::from_secs(300)).await;
    assert!(done["error"].is_null(), "{done}");
    assert_eq!(done["awaiting_code"], false, "{done}");
    let ws = done["workspace_sandbox_id"]
        .as_str()
        .expect("ws")
        .to_owned();
    wait_gone(&h, None, &sb, Duration::from_secs(120)).await;
    let (stat, file) = delivered(&h, None, &ws).await;
    assert_eq!(stat, "600 airlock");
    let issued = oauth.issued.lock().expect("lock").clone();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(
        file["access_token"].as_str(),
        issued.get(&code).map(String::as_str),
        "the workspace holds the token issued for the pasted code"
    );

    // A code for a login that no longer awaits one: refused, nothing changes.
    let creds = get(&h, "/api/v1/credentials", None).await;
    let (status, answer) = h
        .call(
            Method::POST,
            &code_path,
            None,
            Some(json!({ "code": shown })),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("completed"),
        "{answer}"
    );
    let after = get(&h, &format!("/api/v1/logins/{id}"), None).await;
    assert_eq!(after["state"], "completed");
    assert_eq!(after["updated_at"], done["updated_at"], "{after}");
    assert_eq!(get(&h, "/api/v1/credentials", None).await, creds);
    assert_eq!(*oauth.tokens_issued.lock().expect("lock"), 1);

    // A login whose CLI takes no code (testoauth): its code is refused while
    // it waits for the user.
    let (plain, plain_sb) = start_login(&h, None, "testoauth").await;
    wait_login(
        &h,
        None,
        &plain,
        &["awaiting_user"],
        Duration::from_secs(300),
    )
    .await;
    let (status, answer) = h
        .call(
            Method::POST,
            &format!("/api/v1/logins/{plain}/code"),
            None,
            Some(json!({ "code": "x#y" })),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    let l = get(&h, &format!("/api/v1/logins/{plain}"), None).await;
    assert_eq!(l["state"], "awaiting_user", "{l}");
    let (status, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/logins/{plain}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, 202);
    wait_gone(&h, None, &plain_sb, Duration::from_secs(120)).await;

    assert_log_clean(&logs, &marker, &[id, plain]);
    h.shutdown().await;
}
