//! The front door, from outside: the real control plane (`server::start`, the
//! real router and `serve()`, SQLite in a temp dir) on 127.0.0.1:0, asked by
//! reqwest and tokio-tungstenite the way a browser, a rebinding page or a
//! careless client would. Root-free: the driver is the real nspawn driver
//! over an empty temp dir, and no request here reaches it (the sandboxes the
//! tests need are rows written into the store, in states that never boot).

use airlock_drivers::host::RealHost;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::ImageRef;
use airlock_server::app::logins::state::LoginState;
use airlock_server::app::state::SandboxState;
use airlock_server::config::Config;
use airlock_server::server::{self, Running};
use airlock_server::store::{now_ms, LoginRow, SandboxRow};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Door {
    running: Option<Running>,
    base: String,
    host: String,
    http: reqwest::Client,
    alice: String,
    bob: String,
    /// An admin's token: the egress routes check their bodies only for an admin.
    admin: String,
    /// Alice's sandbox (failed: it never boots) and Bob's.
    mine: String,
    theirs: String,
    /// Bob's login.
    their_login: String,
    _tmp: tempfile::TempDir,
}

async fn open_door() -> Door {
    open_door_with(|_| {}).await
}

/// The door with some settings of the config file changed.
async fn open_door_with(settings: impl FnOnce(&mut Config)) -> Door {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: tmp.path().to_path_buf(),
        address_pool: "10.240.0.0/24".into(),
        webrtc: false,
        ..Config::default()
    };
    settings(&mut cfg);
    let driver = Arc::new(NspawnDriver::new(
        NspawnConfig::new(tmp.path().join("sandboxes")),
        Arc::new(RealHost),
    ));
    let image = ImageRef {
        build_id: "front-door".into(),
        layers: Vec::new(),
    };
    let running = server::start(&cfg, image, driver)
        .await
        .expect("server starts");
    let app = running.app.clone();
    let (alice, alice_token) = app.add_user("alice").await.expect("alice");
    let (bob, bob_token) = app.add_user("bob").await.expect("bob");
    let (_, admin_token) = app.add_admin("operator").await.expect("admin");
    let sandbox = |id: &str, owner: &str| SandboxRow {
        id: id.to_owned(),
        owner_id: owner.to_owned(),
        kind: airlock_proto::metadata::SandboxKind::Browser,
        state: SandboxState::Failed,
        failure_reason: Some("a test row; it never booted".into()),
        image_build_id: "front-door".into(),
        lease_index: None,
        agent_token: "not-a-real-agent-token".into(),
        vnc_password: "not-a-real-password".into(),
        display_width: 1280,
        display_height: 800,
        created_at: now_ms(),
        updated_at: now_ms(),
        ready_at: None,
        last_heartbeat_at: None,
        last_activity_at: now_ms(),
    };
    app.store
        .insert_sandbox(&sandbox("aaaaaaaaaaaaaaaa", &alice.id))
        .await
        .expect("alice's sandbox");
    app.store
        .insert_sandbox(&sandbox("bbbbbbbbbbbbbbbb", &bob.id))
        .await
        .expect("bob's sandbox");
    app.store
        .insert_login(&LoginRow {
            id: "cccccccccccccccc".into(),
            owner_id: bob.id.clone(),
            provider: "claude".into(),
            state: LoginState::Failed,
            reason: Some("a test row".into()),
            login_url: None,
            awaiting_code: false,
            browser_sandbox_id: Some("bbbbbbbbbbbbbbbb".into()),
            workspace_sandbox_id: None,
            created_at: now_ms(),
            updated_at: now_ms(),
            expires_at: now_ms() + 60_000,
            finished_at: Some(now_ms()),
        })
        .await
        .expect("bob's login");
    let host = running.addr.to_string();
    Door {
        base: format!("http://{host}"),
        host,
        running: Some(running),
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        alice: alice_token,
        bob: bob_token,
        admin: admin_token,
        mine: "aaaaaaaaaaaaaaaa".into(),
        theirs: "bbbbbbbbbbbbbbbb".into(),
        their_login: "cccccccccccccccc".into(),
        _tmp: tmp,
    }
}

/// One request, as raw as reqwest allows.
#[derive(Clone, Debug)]
struct Ask {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<(String, Vec<u8>)>,
}

impl Ask {
    fn new(method: Method, path: impl Into<String>) -> Ask {
        Ask {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }
    fn get(path: impl Into<String>) -> Ask {
        Ask::new(Method::GET, path)
    }
    fn post(path: impl Into<String>) -> Ask {
        Ask::new(Method::POST, path)
    }
    fn header(mut self, name: &str, value: impl Into<String>) -> Ask {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
    fn token(self, token: &str) -> Ask {
        self.header("authorization", format!("Bearer {token}"))
    }
    fn json(mut self, body: impl Into<Vec<u8>>) -> Ask {
        self.body = Some(("application/json".into(), body.into()));
        self
    }
    fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Ask {
        self.body = Some((content_type.into(), body.into()));
        self
    }
}

impl Door {
    async fn send(&self, ask: &Ask) -> (u16, HeaderMap, Vec<u8>) {
        let mut req = self
            .http
            .request(ask.method.clone(), format!("{}{}", self.base, ask.path));
        for (k, v) in &ask.headers {
            req = req.header(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        if let Some((ct, body)) = &ask.body {
            req = req.header("content-type", ct).body(body.clone());
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} {}: {e}", ask.method, ask.path));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        (status, headers, body)
    }

    async fn status(&self, ask: Ask) -> u16 {
        self.send(&ask).await.0
    }

    /// A WebSocket handshake: 101 when it was accepted, else the HTTP status.
    async fn ws(&self, path: &str, headers: &[(&str, String)]) -> u16 {
        let url = format!("ws://{}{}", self.host, path);
        let mut req = url.into_client_request().expect("ws request");
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((_, resp)) => resp.status().as_u16(),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("ws {path}: {e}"),
        }
    }

    async fn ticket(&self, token: &str, id: &str) -> (u16, Value) {
        let (status, _, body) = self
            .send(&Ask::post(format!("/api/v1/sandboxes/{id}/tickets")).token(token))
            .await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn own_origin(&self) -> String {
        format!("http://{}", self.host)
    }

    async fn close(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

#[tokio::test]
async fn a_rebinding_host_gets_421_without_or_with_a_token() {
    let d = open_door().await;
    let rebind = format!(
        "rebind.attacker.example:{}",
        d.host.rsplit(':').next().unwrap_or("0")
    );
    let (status, _, body) = d
        .send(&Ask::get("/api/v1/sandboxes").header("host", &rebind))
        .await;
    assert_eq!(status, 421);
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["error"]["code"], "misdirected", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&rebind) && message.contains("public_hosts"),
        "{message}"
    );
    // A create through the rebinding name, with its matching Origin.
    let create = Ask::post("/api/v1/sandboxes")
        .header("host", &rebind)
        .header("origin", format!("http://{rebind}"))
        .json(r#"{"kind":"browser"}"#);
    assert_eq!(d.status(create.clone()).await, 421);
    assert_eq!(d.status(create.token(&d.alice)).await, 421);
    // The names that are ours.
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        let ask = Ask::get("/api/v1/sandboxes").header("host", format!("{host}:1"));
        assert_eq!(d.status(ask).await, 200, "{host}");
    }
    d.close().await;
}

/// One HTTP/1.1 request written by hand; the status line's code.
async fn raw_status(addr: &str, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[tokio::test]
async fn the_request_targets_authority_counts_like_host() {
    let d = open_door().await;
    let port = d.host.rsplit(':').next().unwrap_or("0").to_owned();
    let ask = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let ours = format!("http://{}/api/v1/sandboxes", d.host);
    assert_eq!(raw_status(&d.host, &ask(&ours, &d.host)).await, 200);
    // Absolute form: the target's authority is the name the request is
    // for, whatever Host says; a rebinding one behind our Host is refused.
    let theirs = format!("http://rebind.attacker.example:{port}/api/v1/sandboxes");
    assert_eq!(raw_status(&d.host, &ask(&theirs, &d.host)).await, 421);
    d.close().await;
}

#[tokio::test]
async fn a_foreign_origin_websocket_gets_403_and_a_same_origin_one_passes() {
    let d = open_door().await;
    let vnc = format!("/api/v1/sandboxes/{}/vnc", d.mine);
    for origin in ["http://attacker.example", "null", "http://localhost:1"] {
        let (_, t) = d.ticket(&d.alice, &d.mine).await;
        let path = format!("{vnc}?ticket={}", t["ticket"].as_str().expect("ticket"));
        let status = d.ws(&path, &[("origin", origin.into())]).await;
        assert_eq!(status, 403, "{origin}");
    }
    let status = d
        .ws(
            &vnc,
            &[
                ("origin", "http://attacker.example".into()),
                ("authorization", format!("Bearer {}", d.alice)),
            ],
        )
        .await;
    assert_eq!(status, 403);
    let status = d
        .ws(
            &vnc,
            &[
                ("sec-fetch-site", "cross-site".into()),
                ("authorization", format!("Bearer {}", d.alice)),
            ],
        )
        .await;
    assert_eq!(status, 403);
    // Same origin: past the door. The sandbox never became ready, so the
    // relay upgrades and closes with a reason (or 404 for an unknown one).
    let (_, t) = d.ticket(&d.alice, &d.mine).await;
    let path = format!("{vnc}?ticket={}", t["ticket"].as_str().expect("ticket"));
    assert_eq!(d.ws(&path, &[("origin", d.own_origin())]).await, 101);
    let status = d
        .ws(
            "/api/v1/sandboxes/0123456789abcdef/vnc",
            &[
                ("origin", d.own_origin()),
                ("authorization", format!("Bearer {}", d.alice)),
            ],
        )
        .await;
    assert!(![403, 421].contains(&status) && status == 404, "{status}");
    d.close().await;
}

#[tokio::test]
async fn a_forwarded_request_without_a_token_is_not_local() {
    let d = open_door().await;
    assert_eq!(
        d.status(Ask::get("/api/v1/sandboxes")).await,
        200,
        "loopback, direct: local"
    );
    for (h, v) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ] {
        let (status, headers, _) = d.send(&Ask::get("/api/v1/sandboxes").header(h, v)).await;
        assert_eq!(status, 401, "{h}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        let ask = Ask::get("/api/v1/sandboxes").header(h, v).token(&d.alice);
        assert_eq!(d.status(ask).await, 200, "{h} with a token");
    }
    d.close().await;
}

#[tokio::test]
async fn behind_a_proxy_that_adds_no_forwarding_header_nobody_is_local() {
    // nginx's plain `proxy_pass http://127.0.0.1:PORT` on this host: a
    // loopback peer, `Host: 127.0.0.1:PORT`, no X-Forwarded-For.
    let proxied = |local_user| {
        move |cfg: &mut Config| {
            cfg.public_hosts = vec!["airlock.example.com".into()];
            cfg.local_user = local_user;
        }
    };
    let d = open_door_with(proxied(None)).await;
    for host in [d.host.clone(), "airlock.example.com".into()] {
        let (status, headers, _) = d
            .send(&Ask::get("/api/v1/sandboxes").header("host", &host))
            .await;
        assert_eq!(
            status, 401,
            "Host {host}: not local once public_hosts is set"
        );
        assert_eq!(headers["www-authenticate"], "Bearer");
        let ask = Ask::get("/api/v1/sandboxes")
            .header("host", &host)
            .token(&d.alice);
        assert_eq!(d.status(ask).await, 200, "Host {host} with a token");
    }
    d.close().await;
    // Said explicitly, it stays on (and `airlock up` calls it unsafe).
    let d = open_door_with(proxied(Some(true))).await;
    assert_eq!(d.status(Ask::get("/api/v1/sandboxes")).await, 200);
    d.close().await;
    let d = open_door_with(|cfg| cfg.local_user = Some(false)).await;
    assert_eq!(d.status(Ask::get("/api/v1/sandboxes")).await, 401);
    d.close().await;
}

#[tokio::test]
async fn a_token_in_the_url_works_only_on_the_viewer_sockets() {
    let d = open_door().await;
    for path in [
        "/api/v1/sandboxes".to_owned(),
        format!("/api/v1/sandboxes/{}", d.mine),
        "/api/v1/login-stats".to_owned(),
        "/metrics".to_owned(),
        "/".to_owned(),
    ] {
        let ask = Ask::get(format!("{path}?token={}", d.alice));
        assert_eq!(d.status(ask).await, 401, "{path}");
    }
    // Still accepted on the viewer socket, for one release.
    let path = format!("/api/v1/sandboxes/{}/vnc?token={}", d.mine, d.alice);
    assert_eq!(d.ws(&path, &[]).await, 101);
    d.close().await;
}

#[tokio::test]
async fn a_ticket_works_once_for_its_owner_and_sandbox() {
    let d = open_door().await;
    let (status, t) = d.ticket(&d.alice, &d.mine).await;
    assert_eq!(status, 201, "{t}");
    let ticket = t["ticket"].as_str().expect("ticket").to_owned();
    assert!(ticket.len() >= 32, "{ticket}");
    assert!(!ticket.contains(&d.alice));
    assert_eq!(
        t["vnc_url"],
        format!("/api/v1/sandboxes/{}/vnc?ticket={ticket}", d.mine)
    );
    assert_eq!(
        t["stream_url"],
        format!("/api/v1/sandboxes/{}/stream?ticket={ticket}", d.mine)
    );
    let expires = time::OffsetDateTime::parse(
        t["expires_at"].as_str().expect("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("rfc3339");
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left <= time::Duration::seconds(60) && left > time::Duration::seconds(50),
        "{left}"
    );
    let url = t["vnc_url"].as_str().expect("url").to_owned();
    assert_eq!(d.ws(&url, &[]).await, 101, "first use");
    assert_eq!(d.ws(&url, &[]).await, 401, "second use");
    // Bound to its sandbox: not good for another one, even the owner's own.
    let (_, t) = d.ticket(&d.alice, &d.mine).await;
    let other = format!(
        "/api/v1/sandboxes/{}/stream?ticket={}",
        d.theirs,
        t["ticket"].as_str().expect("t")
    );
    assert_eq!(d.ws(&other, &[]).await, 401);
    // Tickets for the owner only: a foreign sandbox is not found.
    assert_eq!(d.ticket(&d.alice, &d.theirs).await.0, 404);
    assert_eq!(d.ticket(&d.bob, &d.theirs).await.0, 201);
    assert_eq!(
        d.ws(
            &format!("/api/v1/sandboxes/{}/vnc?ticket=vt_00", d.mine),
            &[]
        )
        .await,
        401
    );
    // A ticket is no good once its user is disabled, even unused.
    let app = d.running.as_ref().expect("running").app.clone();
    let (carol, carol_token) = app.add_user("carol").await.expect("carol");
    let mut row = app
        .store
        .sandbox(&d.mine)
        .await
        .expect("store")
        .expect("alice's row");
    row.id = "dddddddddddddddd".into();
    row.owner_id = carol.id.clone();
    app.store
        .insert_sandbox(&row)
        .await
        .expect("carol's sandbox");
    let (status, t) = d.ticket(&carol_token, &row.id).await;
    assert_eq!(status, 201, "{t}");
    assert!(app
        .store
        .set_user_disabled(&carol.id, true)
        .await
        .expect("disable carol"));
    let url = t["vnc_url"].as_str().expect("url").to_owned();
    assert_eq!(d.ws(&url, &[]).await, 401, "a disabled user's ticket");
    // Described in the OpenAPI document.
    let (_, _, doc) = d.send(&Ask::get("/api/v1/openapi.json")).await;
    let doc: Value = serde_json::from_slice(&doc).expect("json");
    assert!(
        doc["paths"]["/api/v1/sandboxes/{id}/tickets"]["post"].is_object(),
        "no tickets path"
    );
    assert!(
        doc["components"]["schemas"]["Ticket"].is_object(),
        "no Ticket schema"
    );
    d.close().await;
}

#[tokio::test]
async fn pages_and_answers_carry_the_safety_headers() {
    let d = open_door().await;
    for (path, frame) in [
        ("/", "DENY"),
        ("/api/v1/sandboxes", "DENY"),
        ("/metrics", "DENY"),
        ("/view/aaaaaaaaaaaaaaaa", "SAMEORIGIN"),
        ("/api/v1/nothing", "DENY"),
    ] {
        let (_, h, _) = d.send(&Ask::get(path)).await;
        assert_eq!(h["x-frame-options"], frame, "{path}");
        let csp = if frame == "DENY" {
            "frame-ancestors 'none'"
        } else {
            "frame-ancestors 'self'"
        };
        assert_eq!(h["content-security-policy"], csp, "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
    }
    d.close().await;
}

#[tokio::test]
async fn login_stats_and_metrics_tell_nothing_of_other_users() {
    let d = open_door().await;
    let (_, _, body) = d.send(&Ask::get("/metrics")).await;
    let metrics = String::from_utf8_lossy(&body);
    assert!(
        !metrics.contains(&d.mine) && !metrics.contains(&d.theirs),
        "{metrics}"
    );
    assert!(!metrics.contains("sandbox=\""), "{metrics}");
    let (status, _, body) = d
        .send(&Ask::get("/api/v1/login-stats").token(&d.alice))
        .await;
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_slice(&body).expect("json");
    for (_, s) in stats["providers"].as_object().into_iter().flatten() {
        assert_eq!(s["started"], 0, "{stats}");
    }
    d.close().await;
}

#[tokio::test]
async fn bad_exec_input_is_a_400_naming_the_field() {
    let d = open_door().await;
    let exec = format!("/api/v1/sandboxes/{}/exec", d.mine);
    for (body, field) in [
        (json!({"argv": ["env"], "env": {"A=B": "x"}}), "env"),
        (json!({"argv": ["env"], "env": {"": "x"}}), "env"),
        (json!({"argv": ["env"], "env": {"A": "x\u{0}y"}}), "env"),
        (json!({"argv": ["echo", "a\u{0}b"]}), "argv[1]"),
        (json!({"argv": []}), "argv"),
        (json!({"argv": ["true"], "timeout_s": 0}), "timeout_s"),
        (json!({"argv": ["true"], "timeout_s": 601}), "timeout_s"),
    ] {
        let (status, _, resp) = d
            .send(&Ask::post(&exec).token(&d.alice).json(body.to_string()))
            .await;
        let resp: Value = serde_json::from_slice(&resp).expect("json");
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"]["code"], "bad_request");
        let message = resp["error"]["message"].as_str().unwrap_or("");
        assert!(message.starts_with(field), "{body}: {message}");
    }
    // Good input on a sandbox that is not ready: a conflict, not an outage.
    let ok = d
        .status(
            Ask::post(&exec)
                .token(&d.alice)
                .json(r#"{"argv":["true"]}"#),
        )
        .await;
    assert_eq!(ok, 409);
    d.close().await;
}

/// The hostile-input suite: every request a clean 4xx (JSON error on the API),
/// never a 5xx, never a WebSocket accepted across sites; the server answers
/// afterwards.
#[tokio::test]
async fn hostile_input_gets_clean_4xx_and_never_5xx() {
    let d = open_door().await;
    let started = Instant::now();
    let port = d.host.rsplit(':').next().unwrap_or("0").to_owned();
    let (a, b) = (d.alice.clone(), d.bob.clone());
    let admin = d.admin.clone();
    let (mine, theirs, their_login) = (d.mine.clone(), d.theirs.clone(), d.their_login.clone());
    let mut asks: Vec<(Ask, Option<u16>)> = Vec::new();
    macro_rules! want {
        ($ask:expr, $status:expr $(,)?) => {
            asks.push(($ask, Some($status)))
        };
    }

    // Rebinding and foreign Hosts, on every kind of route.
    for host in [
        format!("rebind.attacker.example:{port}"),
        "attacker.example".into(),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost.attacker.example:{port}"),
        format!("0.0.0.0:{port}"),
        format!("10.0.0.1:{port}"),
        "[::2]".into(),
        "xn--80ak6aa92e.example".into(),
    ] {
        for path in [
            "/",
            "/api/v1/sandboxes",
            "/metrics",
            "/view/x",
            "/api/v1/openapi.json",
            "/novnc/core/rfb.js",
        ] {
            want!(Ask::get(path).header("host", &host), 421);
        }
        want!(
            Ask::get("/api/v1/sandboxes")
                .header("host", &host)
                .token(&a),
            421
        );
        want!(
            Ask::post("/api/v1/sandboxes")
                .header("host", &host)
                .header("origin", format!("http://{host}"))
                .json(r#"{"kind":"browser"}"#),
            421,
        );
    }
    for host in [
        "user@127.0.0.1",
        "127.0.0.1:99999",
        "127.0.0.1:x",
        "[::1",
        "a b",
    ] {
        want!(Ask::get("/api/v1/sandboxes").header("host", host), 421);
    }

    // Cross-site state changes.
    for origin in [
        "http://attacker.example",
        "null",
        "https://127.0.0.1",
        &format!("http://localhost:{port}x"),
    ] {
        want!(
            Ask::post("/api/v1/sandboxes")
                .header("origin", origin)
                .json(r#"{"kind":"browser"}"#),
            403
        );
        want!(
            Ask::post("/api/v1/sandboxes")
                .header("origin", origin)
                .token(&a)
                .json(r#"{"kind":"browser"}"#),
            403
        );
        want!(
            Ask::new(Method::DELETE, format!("/api/v1/sandboxes/{mine}")).header("origin", origin),
            403
        );
        want!(
            Ask::post(format!("/api/v1/sandboxes/{mine}/tickets"))
                .header("origin", origin)
                .token(&a),
            403
        );
        want!(
            Ask::new(Method::PUT, "/api/v1/egress/settings")
                .header("origin", origin)
                .json("{}"),
            403
        );
    }
    want!(
        Ask::post("/api/v1/sandboxes")
            .header("sec-fetch-site", "cross-site")
            .json(r#"{"kind":"browser"}"#),
        403
    );
    want!(
        Ask::new(Method::DELETE, "/api/v1/egress/account").header("sec-fetch-site", "cross-site"),
        403
    );

    // Bad and absent tokens.
    for auth in [
        "Bearer nope",
        "Bearer ",
        "Basic YTpi",
        "bearer x",
        "Token x",
        "Bearer al_0000",
    ] {
        for path in [
            "/api/v1/sandboxes",
            "/api/v1/logins",
            "/api/v1/credentials",
            "/api/v1/login-stats",
        ] {
            want!(Ask::get(path).header("authorization", auth), 401);
        }
        want!(
            Ask::post("/api/v1/sandboxes")
                .header("authorization", auth)
                .json(r#"{"kind":"browser"}"#),
            401
        );
    }
    for (h, v) in [
        ("x-forwarded-for", "127.0.0.1"),
        ("forwarded", "for=127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
        ("via", "1.1 proxy"),
    ] {
        want!(Ask::get("/api/v1/sandboxes").header(h, v), 401);
        want!(
            Ask::post("/api/v1/sandboxes")
                .header(h, v)
                .json(r#"{"kind":"browser"}"#),
            401
        );
    }
    for path in [
        "/api/v1/sandboxes",
        "/api/v1/egress/account",
        "/metrics",
        "/",
        &format!("/api/v1/sandboxes/{mine}/exec"),
    ] {
        want!(Ask::get(format!("{path}?token={a}")), 401);
    }
    want!(
        Ask::get(format!("/api/v1/sandboxes/{mine}/vnc?ticket=vt_forged")),
        401
    );

    // Malformed bodies, wrong types, unknown fields, oversized and deep JSON.
    let deep = "[".repeat(20_000) + &"]".repeat(20_000);
    let deep_obj = "{\"kind\":".repeat(5_000) + "1" + &"}".repeat(5_000);
    let big = format!("{{\"kind\":\"{}\"}}", "b".repeat(200_000));
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"{\"kind\":1}".to_vec(),
        b"{\"kind\":\"vm\"}".to_vec(),
        b"{\"kind\":\"browser\",\"x\":1}".to_vec(),
        b"{\"kind\":\"br\\u0000owser\"}".to_vec(),
        b"{\"kind\":\"\x01\x02\"}".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
        deep.clone().into_bytes(),
        deep_obj.clone().into_bytes(),
    ];
    for body in &bodies {
        want!(
            Ask::post("/api/v1/sandboxes").token(&a).json(body.clone()),
            400
        );
        want!(
            Ask::post("/api/v1/logins").token(&a).json(body.clone()),
            400
        );
        want!(
            Ask::post(format!("/api/v1/sandboxes/{mine}/exec"))
                .token(&a)
                .json(body.clone()),
            400
        );
        // The admin's own route: any clean 4xx.
        asks.push((
            Ask::new(Method::PUT, "/api/v1/egress/account")
                .token(&admin)
                .json(body.clone()),
            None,
        ));
        // `local` is not an admin: refused before its body is read.
        want!(
            Ask::new(Method::PUT, "/api/v1/egress/account").json(body.clone()),
            403
        );
    }
    want!(
        Ask::post("/api/v1/sandboxes").token(&a).json(big.clone()),
        413
    );
    want!(
        Ask::post(format!("/api/v1/sandboxes/{mine}/exec"))
            .token(&a)
            .json(big.clone()),
        413
    );
    want!(
        Ask::post("/api/v1/sandboxes")
            .token(&a)
            .body("text/plain", r#"{"kind":"browser"}"#),
        400
    );
    want!(
        Ask::post("/api/v1/logins")
            .token(&a)
            .json(r#"{"provider":"nope"}"#),
        400
    );
    want!(
        Ask::post("/api/v1/logins")
            .token(&a)
            .json(r#"{"provider":"claude\u0000"}"#),
        400
    );
    want!(
        Ask::new(Method::PUT, "/api/v1/egress/users/alice")
            .token(&admin)
            .json(r#"{"url":"http://a b@c"}"#),
        400
    );
    want!(
        Ask::new(Method::PUT, "/api/v1/egress/users/alice")
            .token(&admin)
            .json(r#"{"url":"ftp://x"}"#),
        400
    );
    want!(
        Ask::new(Method::PUT, "/api/v1/egress/settings")
            .token(&admin)
            .json(r#"{"upstream_timeout_s":"x"}"#),
        400
    );

    // Exec input the agent would refuse.
    for body in [
        json!({"argv": ["env"], "env": {"A=B": "x"}}),
        json!({"argv": ["env"], "env": {"": "x"}}),
        json!({"argv": ["a\u{0}"]}),
        json!({"argv": []}),
        json!({"argv": [""]}),
        json!({"argv": ["true"], "timeout_s": 0}),
        json!({"argv": ["true"], "timeout_s": 100000}),
        json!({"argv": ["true"], "timeout_s": -1}),
        json!({"argv": "true"}),
        json!({"argv": ["true"], "cwd": "/"}),
    ] {
        want!(
            Ask::post(format!("/api/v1/sandboxes/{mine}/exec"))
                .token(&a)
                .json(body.to_string()),
            400
        );
    }

    // Bad ids, NUL and control characters in paths and queries.
    for id in [
        "..",
        "%2e%2e",
        "%00",
        "a%00b",
        "%01%02%1b",
        "%ff%fe",
        "%3Cscript%3E",
        "'%20OR%201=1%20--",
        "%0d%0aSet-Cookie:%20x=1",
        "%E2%80%AE",
        &"x".repeat(4000),
    ] {
        asks.push((Ask::get(format!("/api/v1/sandboxes/{id}")).token(&a), None));
        asks.push((Ask::get(format!("/api/v1/logins/{id}")).token(&a), None));
        asks.push((
            Ask::post(format!("/api/v1/sandboxes/{id}/tickets")).token(&a),
            None,
        ));
        asks.push((Ask::get(format!("/api/v1/egress/users/{id}")), None));
    }
    for (path, status) in [
        ("/api/v1/sandboxes/%00/egress", 400),
        ("/api/v1/nothing%00", 400),
        ("/%00", 400),
        ("/view/%00/x", 400),
        ("/novnc/%00", 400),
        ("/api/v1/%0a", 400),
        ("/api/v1/sandboxes?x=%00%01", 400),
        ("/metrics?%7f", 400),
        ("/novnc/..%2f..%2fetc%2fpasswd", 404),
        ("/..%2fCargo.toml", 404),
        ("/api/v1/sandboxes/%2e%2e%2f%2e%2e%2fmetrics", 404),
    ] {
        asks.push((Ask::get(path).token(&a), Some(status)));
    }

    // Wrong methods.
    for (method, path) in [
        (Method::PATCH, "/api/v1/sandboxes".to_owned()),
        (Method::PUT, format!("/api/v1/sandboxes/{mine}")),
        (Method::DELETE, "/api/v1/sandboxes".to_owned()),
        (Method::POST, format!("/api/v1/sandboxes/{mine}")),
        (Method::GET, format!("/api/v1/sandboxes/{mine}/exec")),
        (Method::GET, format!("/api/v1/sandboxes/{mine}/tickets")),
        (Method::POST, "/api/v1/login-stats".to_owned()),
        (Method::POST, "/metrics".to_owned()),
        (Method::DELETE, "/".to_owned()),
        (Method::PUT, "/api/v1/openapi.json".to_owned()),
        (Method::POST, format!("/api/v1/sandboxes/{mine}/vnc")),
        (
            Method::from_bytes(b"BREW").expect("method"),
            "/api/v1/sandboxes".to_owned(),
        ),
    ] {
        want!(Ask::new(method, path).token(&a), 405);
    }
    // A viewer route called without the upgrade.
    asks.push((
        Ask::get(format!("/api/v1/sandboxes/{mine}/vnc")).token(&a),
        None,
    ));

    // Other users' objects.
    for (method, path) in [
        (Method::GET, format!("/api/v1/sandboxes/{theirs}")),
        (Method::DELETE, format!("/api/v1/sandboxes/{theirs}")),
        (Method::GET, format!("/api/v1/sandboxes/{theirs}/egress")),
        (Method::POST, format!("/api/v1/sandboxes/{theirs}/tickets")),
        (Method::GET, format!("/api/v1/logins/{their_login}")),
        (Method::DELETE, format!("/api/v1/logins/{their_login}")),
    ] {
        want!(Ask::new(method, path).token(&a), 404);
    }
    want!(
        Ask::post(format!("/api/v1/sandboxes/{theirs}/exec"))
            .token(&a)
            .json(r#"{"argv":["id"]}"#),
        404
    );
    want!(
        Ask::post(format!("/api/v1/logins/{their_login}/code"))
            .token(&a)
            .json(r#"{"code":"x"}"#),
        404
    );
    for (method, path) in [
        (Method::GET, "/api/v1/egress/account"),
        (Method::DELETE, "/api/v1/egress/account"),
        (Method::GET, "/api/v1/egress/settings"),
        (Method::GET, "/api/v1/egress/users/bob"),
        (Method::DELETE, "/api/v1/egress/users/bob"),
    ] {
        want!(Ask::new(method, path).token(&b), 403);
    }

    let mut failures = Vec::new();
    let total = asks.len();
    for (ask, expect) in &asks {
        let (status, headers, body) = d.send(ask).await;
        let shown = format!("{} {:.120}", ask.method, ask.path);
        if !(400..500).contains(&status) && *expect != Some(status) {
            failures.push(format!("{shown}: {status} (want a 4xx)"));
            continue;
        }
        if let Some(e) = expect {
            if status != *e {
                failures.push(format!(
                    "{shown}: {status}, want {e}: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ));
                continue;
            }
        }
        if (400..500).contains(&status) && ask.path.starts_with("/api/") {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if !ct.starts_with("application/json")
                || !json["error"]["code"].is_string()
                || !json["error"]["message"].is_string()
            {
                failures.push(format!(
                    "{shown}: {status} without a JSON error: {:.200}",
                    String::from_utf8_lossy(&body)
                ));
            }
        }
    }

    // Cross-site WebSockets: never a 101.
    let mut ws_total = 0;
    for path in [
        format!("/api/v1/sandboxes/{mine}/vnc"),
        format!("/api/v1/sandboxes/{mine}/stream"),
    ] {
        for origin in ["http://attacker.example", "null", "http://127.0.0.1.nip.io"] {
            let (_, t) = d.ticket(&a, &mine).await;
            let with_ticket = format!("{path}?ticket={}", t["ticket"].as_str().unwrap_or(""));
            for (url, extra) in [
                (with_ticket.clone(), None),
                (format!("{path}?token={a}"), None),
                (path.clone(), Some(("authorization", format!("Bearer {a}")))),
                (path.clone(), None),
            ] {
                let mut headers = vec![("origin", origin.to_owned())];
                headers.extend(extra);
                let status = d.ws(&url, &headers).await;
                ws_total += 1;
                if status != 403 {
                    failures.push(format!("cross-site ws {path} from {origin}: {status}"));
                }
            }
        }
        let status = d
            .ws(
                &path,
                &[
                    ("host", format!("rebind.attacker.example:{port}")),
                    ("authorization", format!("Bearer {a}")),
                ],
            )
            .await;
        ws_total += 1;
        if status != 421 {
            failures.push(format!("rebinding ws {path}: {status}"));
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {} refused wrongly:\n{}",
        failures.len(),
        total + ws_total,
        failures.join("\n")
    );
    assert!(
        total + ws_total >= 150,
        "only {} requests",
        total + ws_total
    );
    let (status, _, body) = d.send(&Ask::get("/healthz")).await;
    assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
    assert_eq!(d.status(Ask::get("/api/v1/sandboxes").token(&a)).await, 200);
    eprintln!(
        "hostile input: {} requests, {} WebSocket handshakes, all refused as they should be, in {:?}",
        total,
        ws_total,
        started.elapsed()
    );
    d.close().await;
}
