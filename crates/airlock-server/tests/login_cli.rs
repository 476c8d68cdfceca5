//! `airlock login PROVIDER` and `airlock audit` end to end: the real CLI
//! against a real control plane and real sandboxes, with the test providers
//! and the local OAuth server of the login tests. The command prints the
//! page to sign in on, waits while the user signs in (played here as in
//! tests/logins.rs: approve at the OAuth server, follow its redirect inside
//! the browser sandbox), and says the workspace holds the credentials, with
//! exit code 0; a login that fails is 1, an unknown provider 65. Then
//! `airlock audit` lists the capture and the delivery.

mod common;
mod logins_support;

use logins_support::{approve_at, start_oauth, wait_login, write_test_providers, OAuth};
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POOL: &str = "10.248.10.0/24";

/// The `airlock` binary beside this test's.
fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    exe.parent()
        .and_then(std::path::Path::parent)
        .expect("target dir")
        .join("airlock")
}

/// The CLI as the token-less local user of `base` (the harness's user).
fn cli(base: &str, config: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env("AIRLOCK_URL", base)
        .env_remove("AIRLOCK_TOKEN")
        .env("AIRLOCK_CLIENT_CONFIG", config)
        .env_remove("AIRLOCK_CONFIG")
        .stdin(Stdio::null());
    cmd
}

fn output(mut cmd: Command) -> Output {
    cmd.output().expect("airlock runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airlock_login_waits_for_the_credentials_and_audit_lists_them() {
    if common::unmet().is_some() {
        return;
    }
    assert!(
        binary().exists(),
        "build the CLI first: cargo build -p airlock"
    );
    let oauth = Arc::new(OAuth::default());
    let port = start_oauth(oauth.clone()).await;
    let mut h = common::start(POOL).await;
    let dir = h.data_dir.join("test-providers");
    write_test_providers(&dir);
    h.cfg.providers_dir = Some(dir);
    h.cfg.egress_allow = vec!["oauth.test".into()];
    h.cfg.login_timeout_s = 600;
    h.restart().await;
    // The first request makes the local user; its upstream is the OAuth server.
    let _ = h.get("/api/v1/logins").await;
    let resp = h
        .http
        .put(h.url("/api/v1/egress/users/local"))
        .bearer_auth(h.admin_token().await)
        .json(&json!({ "url": format!("http://t:t@127.0.0.1:{port}") }))
        .send()
        .await
        .expect("put upstream");
    assert_eq!(resp.status().as_u16(), 200);
    let config = h.data_dir.join("client.json");
    std::fs::write(&config, "{}").expect("client config");

    // An unknown provider: refused as bad, 65, and nothing starts.
    let out = output(cli(&h.base, &config, &["login", "nosuch"]));
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown provider"),
        "{out:?}"
    );

    // The whole flow. The CLI prints the page, then waits.
    let started = Instant::now();
    let mut login = cli(&h.base, &config, &["login", "testoauth", "--wait-s", "400"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("airlock login");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = login.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = tokio::task::spawn_blocking(move || {
        let line = lines.recv_timeout(Duration::from_secs(120));
        (line, lines)
    });
    let (first, lines) = first.await.expect("reader");
    let first = first.expect("the CLI printed the sign-in page");
    let prefix = format!("Sign in to testoauth here: {}/view/", h.base);
    assert!(first.starts_with(&prefix), "{first}");
    let browser = first[prefix.len()..].trim().to_owned();

    let (_, listed) = h.get("/api/v1/logins").await;
    let id = listed["logins"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|x| x["browser_sandbox_id"] == browser.as_str())
        })
        .and_then(|x| x["id"].as_str())
        .unwrap_or_else(|| panic!("the CLI's login is listed: {listed}"))
        .to_owned();
    let waiting = wait_login(&h, None, &id, &["awaiting_user"], Duration::from_secs(150)).await;
    let url = waiting["login_url"].as_str().expect("login_url").to_owned();
    // Still waiting for the user: the CLI has not ended.
    assert!(login.try_wait().expect("wait").is_none());
    // The user signs in over the stream.
    let location = approve_at(port, &url).await;
    let script = format!(
        "require('http').get({location:?},r=>{{r.resume();r.on('end',()=>process.exit(r.statusCode===200?0:1))}})"
    );
    let out = h.exec(&browser, &["node", "-e", &script]).await;
    assert_eq!(out["exit_code"], 0, "{out}");

    let done = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(240);
        loop {
            if let Some(status) = login.try_wait().expect("wait") {
                let mut rest = Vec::new();
                while let Ok(l) = lines.recv_timeout(Duration::from_millis(500)) {
                    rest.push(l);
                }
                let mut err = String::new();
                if let Some(mut e) = login.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (status.code(), rest, err);
            }
            if Instant::now() > until {
                let _ = login.kill();
                return (None, Vec::new(), "still waiting after 240 s".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (code, rest, err) = done.await.expect("waiter");
    eprintln!(
        "airlock login testoauth: exit {code:?} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(code, Some(0), "stdout {rest:?} stderr {err}");
    let (_, finished) = h.get(&format!("/api/v1/logins/{id}")).await;
    let ws = finished["workspace_sandbox_id"]
        .as_str()
        .expect("workspace")
        .to_owned();
    assert_eq!(
        rest,
        vec![format!(
            "Signed in: your workspace {ws} holds the testoauth credentials."
        )],
        "{err}"
    );
    let out = h
        .exec(&ws, &["test", "-s", ".testcli/credentials.json"])
        .await;
    assert_eq!(out["exit_code"], 0, "the workspace holds the file: {out}");

    // A login whose command fails: the CLI says why and exits 1.
    let out = output(cli(
        &h.base,
        &config,
        &["login", "testfail", "--wait-s", "200"],
    ));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the login failed"),
        "{out:?}"
    );

    // audit: one line per event, newest first, the capture and the delivery.
    let out = output(cli(&h.base, &config, &["audit"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line_of = |kind: &str| {
        text.lines()
            .find(|l| l.split(' ').any(|f| f == format!("kind={kind}")))
            .unwrap_or_else(|| panic!("no {kind} event in {text}"))
            .to_owned()
    };
    for kind in ["captured", "delivered"] {
        let line = line_of(kind);
        assert!(line.contains("provider=testoauth"), "{line}");
        assert!(line.contains(&format!("login_id={id}")), "{line}");
    }
    assert!(line_of("delivered").contains(&format!("workspace_sandbox_id={ws}")));
    let out = output(cli(&h.base, &config, &["audit", "--json"]));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("audit --json is JSON");
    let events = json["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "captured" && e["login_id"] == id.as_str()),
        "{json}"
    );

    h.shutdown().await;
}
