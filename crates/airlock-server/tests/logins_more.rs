//! More logins against the real nspawn driver and the real golden image: five
//! users signing in at the same time (no crossed credentials), the paste-code
//! route (claude's manual one) with bad input refused, and the canary kept out
//! of the control plane's own log at debug level.
//!
//! The OAuth server and the test providers are those of `logins.rs` (shared in
//! `logins_support`).

mod common;
mod logins_support;

use common::contains;
use logins_support::{
    approve_at, capture_logs, query, start_oauth, wait_gone, wait_login, write_paste_provider,
    write_test_providers, OAuth,
};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
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

struct Done {
    name: String,
    login: String,
    browser: String,
    workspace: String,
    code: String,
    stat: String,
    file: Value,
}

/// One user's whole login, as that user: start, wait for the URL, approve,
/// follow the redirect inside the browser sandbox, wait until completed, read
/// the delivered file.
async fn flow(h: &common::Harness, port: u16, name: String, token: String) -> Done {
    let t = Some(token.as_str());
    let (login, browser) = start_login(h, t, "testoauth").await;
    let waiting = wait_login(h, t, &login, &["awaiting_user"], Duration::from_secs(600)).await;
    let url = waiting["login_url"].as_str().expect("url").to_owned();
    assert!(url.starts_with("http://oauth.test/authorize?"), "{url}");
    let location = approve_at(port, &url).await;
    assert!(location.starts_with("http://127.0.0.1:"), "{location}");
    let code = query(&location)["code"].clone();
    eprintln!("{name}: login {login} awaiting the user; approved with code {code}");
    // Chromium follows the redirect to the CLI's callback on the sandbox's
    // own loopback.
    let script = format!(
        "require('http').get({location:?},r=>{{r.resume();r.on('end',()=>process.exit(r.statusCode===200?0:1))}})"
    );
    let out = exec(h, t, &browser, &["node", "-e", &script]).await;
    assert_eq!(out["exit_code"], 0, "{name}: {out}");
    let done = wait_login(h, t, &login, &["completed"], Duration::from_secs(900)).await;
    assert!(done["error"].is_null(), "{done}");
    let workspace = done["workspace_sandbox_id"]
        .as_str()
        .expect("ws")
        .to_owned();
    let (stat, file) = delivered(h, t, &workspace).await;
    eprintln!("{name}: login {login} completed into workspace {workspace}");
    Done {
        name,
        login,
        browser,
        workspace,
        code,
        stat,
        file,
    }
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

/// Five users sign in at the same time: every login completes, and each
/// user's workspace holds the very token issued for that user's own code;
/// each sees only its own login and record; the browser sandboxes go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_users_sign_in_at_once() {
    if common::unmet().is_some() {
        return;
    }
    let Bed {
        logs,
        marker,
        oauth,
        port,
        h,
    } = bed("10.234.60.0/24", |cfg| {
        cfg.login_timeout_s = 1500;
        // Ten sandboxes booting on two cores at once take longer than one.
        cfg.boot_timeout_s = 600;
    })
    .await;
    // The first request makes the local user; an admin sets upstreams.
    let _ = get(&h, "/api/v1/logins", None).await;
    let admin = h.admin_token().await;
    let app = h.running.as_ref().expect("running").app.clone();
    let upstream = json!({ "url": format!("http://t:t@127.0.0.1:{port}") });
    let mut users = Vec::new();
    for name in ["ada", "bea", "cyd", "dot", "eve"] {
        let (_, token) = app.add_user(name).await.expect("user");
        let path = format!("/api/v1/egress/users/{name}");
        // A user cannot choose its own upstream: the admin does.
        let (status, _) = h
            .call(Method::PUT, &path, Some(&token), Some(upstream.clone()))
            .await;
        assert_eq!(status, 403, "{name} set its own upstream");
        let (status, body) = h
            .call(Method::PUT, &path, Some(&admin), Some(upstream.clone()))
            .await;
        assert_eq!(status, 200, "{body}");
        users.push((name.to_owned(), token));
    }

    let started = Instant::now();
    let done = futures::future::join_all(
        users
            .iter()
            .map(|(name, token)| flow(&h, port, name.clone(), token.clone())),
    )
    .await;
    eprintln!("five logins completed in {:?}", started.elapsed());

    let tokens: HashMap<&str, &str> = users
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let issued = oauth.issued.lock().expect("lock").clone();
    assert_eq!(issued.len(), 5, "{issued:?}");
    assert_eq!(*oauth.tokens_issued.lock().expect("lock"), 5);
    let distinct = |f: fn(&Done) -> &str| done.iter().map(f).collect::<HashSet<_>>().len();
    assert_eq!(distinct(|d| d.login.as_str()), 5);
    assert_eq!(distinct(|d| d.browser.as_str()), 5);
    assert_eq!(distinct(|d| d.workspace.as_str()), 5);
    assert_eq!(distinct(|d| d.code.as_str()), 5);
    for d in &done {
        let t = Some(tokens[d.name.as_str()]);
        // No crossed credentials: this user's file holds the token issued
        // for this user's code.
        assert_eq!(d.stat, "600 airlock", "{}", d.name);
        let want = issued
            .get(&d.code)
            .unwrap_or_else(|| panic!("{}: no token for its code", d.name));
        assert_eq!(
            d.file["access_token"].as_str(),
            Some(want.as_str()),
            "{} holds another user's token",
            d.name
        );
        // The workspace is this user's.
        let ws = get(&h, &format!("/api/v1/sandboxes/{}", d.workspace), t).await;
        assert_eq!(ws["kind"], "workspace", "{ws}");
        // Only its own record and login.
        let creds = get(&h, "/api/v1/credentials", t).await;
        let list = creds["credentials"].as_array().expect("list");
        assert_eq!(list.len(), 1, "{}: {creds}", d.name);
        assert_eq!(list[0]["provider"], "testoauth");
        assert_eq!(list[0]["login_id"], d.login.as_str(), "{}: {creds}", d.name);
        assert!(!list[0]["delivered_at"].is_null(), "{creds}");
        let logins = get(&h, "/api/v1/logins", t).await;
        let ids: Vec<&str> = logins["logins"]
            .as_array()
            .expect("logins")
            .iter()
            .filter_map(|l| l["id"].as_str())
            .collect();
        assert_eq!(ids, [d.login.as_str()], "{}", d.name);
        // Its own totals, not everybody's.
        let stats = get(&h, "/api/v1/login-stats", t).await;
        assert_eq!(
            stats["providers"]["testoauth"]["started"], 1,
            "{}: {stats}",
            d.name
        );
        // Nobody else's login, sandbox or workspace is visible to it.
        for other in done.iter().filter(|o| o.name != d.name) {
            for path in [
                format!("/api/v1/logins/{}", other.login),
                format!("/api/v1/sandboxes/{}", other.workspace),
            ] {
                let (status, _) = h.call(Method::GET, &path, t, None).await;
                assert_eq!(status, 404, "{} sees {path}", d.name);
            }
        }
        wait_gone(&h, t, &d.browser, Duration::from_secs(120)).await;
    }
    // The admin signed nothing in.
    let creds = get(&h, "/api/v1/credentials", None).await;
    assert_eq!(creds["credentials"], json!([]), "{creds}");
    let stats = get(&h, "/api/v1/login-stats", None).await;
    assert_eq!(stats["providers"]["testoauth"]["started"], 0, "{stats}");

    let ids: Vec<String> = done.iter().map(|d| d.login.clone()).collect();
    assert_log_clean(&logs, &marker, &ids);
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
