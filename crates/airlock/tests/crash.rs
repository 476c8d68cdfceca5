//! `kill -9` the control plane: running sandboxes stay up, and the next
//! `airlock up` re-adopts them as ready, with exec and the viewer working.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn unmet() -> Option<&'static str> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let why = if !root {
        Some("it needs root")
    } else if std::env::var_os("AIRLOCK_IMAGE_DIR").is_none() {
        Some("AIRLOCK_IMAGE_DIR does not name a built golden image")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the crash test, but {why}"
        );
        eprintln!("skipping: {why}");
    }
    why
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Up {
    child: Child,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(config: &std::path::Path, data: &std::path::Path) -> Up {
    let child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["up", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("airlock up starts");
    Up { child }
}

async fn wait_healthy(http: &reqwest::Client, base: &str, up: &mut Up) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = up.child.try_wait() {
            panic!("airlock up exited ({status}) before it served {base}; its stderr is above");
        }
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("airlock did not come up at {base}");
}

async fn state(http: &reqwest::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/api/v1/sandboxes/{id}"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// The viewer's WebSocket reaches the guest's display: the relay greets with RFB.
async fn viewer_greets(base: &str, id: &str) -> bool {
    let url = format!(
        "{}/api/v1/sandboxes/{id}/vnc",
        base.replace("http://", "ws://")
    );
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
        return false;
    };
    let greeting = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let ok = matches!(greeting, Ok(Some(Ok(Message::Binary(b)))) if b.starts_with(b"RFB 003.008"));
    let _ = ws.send(Message::Close(None)).await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_survive_kill_9_of_the_control_plane() {
    if unmet().is_some() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("airlock-crash-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let port = free_port();
    let config = tmp.path().join("airlock.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{port}\"\naddress_pool = \"10.232.31.0/24\"\n"),
    )
    .expect("config");
    let data = tmp.path().join("data");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let mut first = up(&config, &data);
    wait_healthy(&http, &base, &mut first).await;
    let created: Value = http
        .post(format!("{base}/api/v1/sandboxes"))
        .json(&json!({"kind": "browser"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = state(&http, &base, &id).await;
        if s["state"] == "ready" {
            break;
        }
        assert!(
            s["state"] != "failed" && Instant::now() < deadline,
            "not ready: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGKILL: no chance to clean up or say goodbye.
    first.child.kill().expect("kill -9");
    first.child.wait().expect("reaped");
    let mut second = up(&config, &data);
    wait_healthy(&http, &base, &mut second).await;

    let s = state(&http, &base, &id).await;
    assert_eq!(s["state"], "ready", "re-adopted as ready: {s}");
    let out: Value = http
        .post(format!("{base}/api/v1/sandboxes/{id}/exec"))
        .json(&json!({"argv": ["echo", "survived"]}))
        .send()
        .await
        .expect("exec")
        .json()
        .await
        .expect("json");
    assert_eq!(out["stdout"], "survived\n", "{out}");
    assert!(
        viewer_greets(&base, &id).await,
        "the viewer reconnects after the restart"
    );

    http.delete(format!("{base}/api/v1/sandboxes/{id}"))
        .send()
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&http, &base, &id).await["state"] != "stopped" {
        assert!(Instant::now() < deadline, "not stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !data.join("sandboxes").join(&id).exists(),
        "nothing left on disk"
    );
}
