//! Processes and files in a real sandbox, through the whole chain (API →
//! control plane → agent → the sandbox user's process), in one workspace:
//! output streams as it is printed, stdin round trip, a PTY's resize and
//! Ctrl-C, reattaching after a disconnect, a 10 MiB file both ways, path
//! escapes refused, and another user's 404s.

mod common;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::Digest;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const POOL: &str = "10.252.0.0/24";

async fn attach(
    h: &common::Harness,
    id: &str,
    pid: u64,
    offset: u64,
    token: Option<&str>,
) -> Result<Ws, u16> {
    let url = format!(
        "{}/api/v1/sandboxes/{id}/processes/{pid}/io?offset={offset}",
        h.base.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connecting the io socket: {e}"),
    }
}

/// What came over an io socket so far.
#[derive(Debug, Default)]
struct Seen {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<Value>,
}

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads frames until `done` holds, at most `within`.
async fn read_until(ws: &mut Ws, seen: &mut Seen, within: Duration, done: impl Fn(&Seen) -> bool) {
    let until = tokio::time::Instant::now() + within;
    while !done(seen) {
        let msg = match tokio::time::timeout_at(until, ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(other) => panic!("the socket ended: {other:?}; seen {:?}", seen.text()),
            Err(_) => panic!(
                "timed out; seen {:?} / {:?}",
                seen.text(),
                String::from_utf8_lossy(&seen.stderr)
            ),
        };
        match msg {
            Message::Binary(b) if b.first() == Some(&1) => seen.stdout.extend_from_slice(&b[1..]),
            Message::Binary(b) if b.first() == Some(&2) => seen.stderr.extend_from_slice(&b[1..]),
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json event");
                if v["type"] == "exit" {
                    seen.exit = Some(v);
                }
            }
            Message::Close(_) => {
                assert!(done(seen), "closed early; seen {:?}", seen.text());
                return;
            }
            _ => {}
        }
    }
}

async fn start(h: &common::Harness, id: &str, body: Value) -> u64 {
    let (status, info) = h
        .post(&format!("/api/v1/sandboxes/{id}/processes"), body)
        .await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["state"], "running");
    info["pid"].as_u64().expect("pid")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_and_files_in_a_real_sandbox() {
    if common::unmet().is_some() {
        return;
    }
    let h = common::start(POOL).await;
    let id = h.ready_sandbox("workspace").await;
    let procs = format!("/api/v1/sandboxes/{id}/processes");

    // 1. A line every 100 ms for 20 s, each stamped with the guest's clock
    //    (an nspawn guest shares the host's): each must reach us soon after
    //    it was printed. Buffering anywhere on the way would hold lines for
    //    seconds.
    let pid = start(
        &h,
        &id,
        json!({"argv": ["sh", "-c", "id -u >&2; for i in $(seq 1 200); do date +%s%N; sleep 0.1; done"]}),
    )
    .await;
    let mut ws = attach(&h, &id, pid, 0, None).await.expect("attach");
    let mut lags = Vec::new();
    let mut line = Vec::new();
    let mut stderr = Vec::new();
    while lags.len() < 200 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a line within 10 s")
            .expect("open")
            .expect("frame");
        let Message::Binary(b) = msg else { continue };
        if b[0] == 2 {
            stderr.extend_from_slice(&b[1..]);
            continue;
        }
        let arrived = now_ns();
        for &c in &b[1..] {
            if c == b'\n' {
                let printed: u128 = String::from_utf8_lossy(&line)
                    .trim()
                    .parse()
                    .expect("a time");
                lags.push(arrived.saturating_sub(printed) / 1_000_000);
                line.clear();
            } else {
                line.push(c);
            }
        }
    }
    let uid: u32 = String::from_utf8_lossy(&stderr)
        .trim()
        .parse()
        .expect("uid");
    assert_ne!(uid, 0, "processes run as the sandbox user, not root");
    let mut sorted = lags.clone();
    sorted.sort_unstable();
    let (p50, p99, max) = (sorted[100], sorted[198], sorted[199]);
    eprintln!("line lag over 200 lines: p50 {p50} ms, p99 {p99} ms, max {max} ms");
    // Each line within 100 ms at the median and nearly always; a loaded
    // 2-core machine may stall one line now and then, never by seconds.
    assert!(p50 <= 100, "median lag {p50} ms: {lags:?}");
    assert!(p99 <= 250 && max <= 1000, "lags {lags:?}");
    drop(ws);

    // 2. stdin round trip, then end-of-file ends `cat` with 0.
    let pid = start(&h, &id, json!({"argv": ["cat"], "stdin": true})).await;
    let mut ws = attach(&h, &id, pid, 0, None).await.expect("attach");
    ws.send(Message::Binary(b"hello stdin\n".to_vec().into()))
        .await
        .expect("send");
    let mut seen = Seen::default();
    read_until(&mut ws, &mut seen, Duration::from_secs(10), |s| {
        s.text().contains("hello stdin\n")
    })
    .await;
    ws.send(Message::Text(r#"{"type":"eof"}"#.into()))
        .await
        .expect("send");
    read_until(&mut ws, &mut seen, Duration::from_secs(10), |s| {
        s.exit.is_some()
    })
    .await;
    assert_eq!(seen.exit.as_ref().expect("exit")["exit_code"], 0);

    // 3. A PTY: its size, a resize that `stty size` sees, and Ctrl-C
    //    stopping the foreground program.
    let pid = start(
        &h,
        &id,
        json!({"argv": ["sh", "-c", "stty size; read x; stty size; exec sleep 60"], "pty": {"cols": 80, "rows": 24}}),
    )
    .await;
    let mut ws = attach(&h, &id, pid, 0, None).await.expect("attach");
    let mut seen = Seen::default();
    read_until(&mut ws, &mut seen, Duration::from_secs(10), |s| {
        s.text().contains("24 80")
    })
    .await;
    ws.send(Message::Text(
        r#"{"type":"resize","cols":132,"rows":43}"#.into(),
    ))
    .await
    .expect("resize");
    ws.send(Message::Binary(b"\r".to_vec().into()))
        .await
        .expect("enter");
    read_until(&mut ws, &mut seen, Duration::from_secs(10), |s| {
        s.text().contains("43 132")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // `sleep` in the foreground
    ws.send(Message::Binary(b"\x03".to_vec().into()))
        .await
        .expect("ctrl-c");
    read_until(&mut ws, &mut seen, Duration::from_secs(10), |s| {
        s.exit.is_some()
    })
    .await;
    assert_eq!(
        seen.exit.as_ref().expect("exit")["signal"],
        2,
        "{:?}",
        seen.exit
    );
    // The keystroke's round trip through the PTY (echo), for the record.
    let pid = start(
        &h,
        &id,
        json!({"argv": ["cat"], "pty": {"cols": 80, "rows": 24}}),
    )
    .await;
    let mut ws = attach(&h, &id, pid, 0, None).await.expect("attach");
    let mut trips = Vec::new();
    let mut seen = Seen::default();
    for i in 0..20 {
        let key = format!("{}", i % 10);
        let sent = Instant::now();
        ws.send(Message::Binary(key.clone().into_bytes().into()))
            .await
            .expect("key");
        let want = seen.stdout.len() + 1;
        read_until(&mut ws, &mut seen, Duration::from_secs(5), |s| {
            s.stdout.len() >= want
        })
        .await;
        trips.push(sent.elapsed().as_micros());
    }
    trips.sort_unstable();
    eprintln!(
        "PTY keystroke round trip: median {} µs, max {} µs",
        trips[10], trips[19]
    );
    drop(ws);

    // 4. A client leaves; the process goes on; a new client gets the backlog,
    //    and the listing shows it running until it is killed.
    let pid = start(
        &h,
        &id,
        json!({"argv": ["sh", "-c", "echo first; sleep 1; echo second; sleep 60"]}),
    )
    .await;
    let mut ws = attach(&h, &id, pid, 0, None).await.expect("attach");
    let mut seen = Seen::default();
    read_until(&mut ws, &mut seen, Duration::from_secs(10), |s| {
        s.text().contains("first")
    })
    .await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, info) = h.get(&format!("{procs}/{pid}")).await;
    assert_eq!(status, 200);
    assert_eq!(info["state"], "running", "{info}");
    let mut ws = attach(&h, &id, pid, 0, None).await.expect("reattach");
    let mut again = Seen::default();
    read_until(&mut ws, &mut again, Duration::from_secs(10), |s| {
        s.text().contains("second")
    })
    .await;
    assert_eq!(again.text(), "first\nsecond\n");
    // From an offset: only what comes after it.
    let mut ws2 = attach(&h, &id, pid, 6, None).await.expect("reattach at 6");
    let mut tail = Seen::default();
    read_until(&mut ws2, &mut tail, Duration::from_secs(10), |s| {
        s.text().contains("second")
    })
    .await;
    assert_eq!(tail.text(), "second\n");
    let (status, list) = h.get(&procs).await;
    assert_eq!(status, 200);
    assert!(list["processes"]
        .as_array()
        .expect("list")
        .iter()
        .any(|p| p["pid"] == pid));

    // 5. Another user sees none of it.
    let app = &h.running.as_ref().expect("running").app;
    let (_, mallory) = app.add_user("mallory").await.expect("user");
    for (method, path) in [
        (reqwest::Method::GET, format!("{procs}/{pid}")),
        (reqwest::Method::DELETE, format!("{procs}/{pid}")),
        (reqwest::Method::GET, procs.clone()),
        (
            reqwest::Method::GET,
            format!("/api/v1/sandboxes/{id}/files?path=.bashrc"),
        ),
    ] {
        let (status, body) = h.call(method.clone(), &path, Some(&mallory), None).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    assert_eq!(
        attach(&h, &id, pid, 0, Some(&mallory)).await.err(),
        Some(404)
    );
    let (status, info) = h.delete(&format!("{procs}/{pid}")).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["state"], "exited", "{info}");
    assert_eq!(info["signal"], 9);
    read_until(&mut ws, &mut again, Duration::from_secs(10), |s| {
        s.exit.is_some()
    })
    .await;

    // 6. Files: 10 MiB up and down, equal; owned by the user; a directory as tar.
    let files = h.url(&format!("/api/v1/sandboxes/{id}/files"));
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let resp = h
        .http
        .put(format!("{files}?path=big.bin"))
        .body(data.clone())
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 200);
    let written: Value = resp.json().await.expect("json");
    assert_eq!(written["size"], data.len());
    let got = h
        .http
        .get(format!("{files}?path=big.bin"))
        .send()
        .await
        .expect("get");
    assert_eq!(got.status().as_u16(), 200);
    let got = got.bytes().await.expect("body");
    assert_eq!(sha2::Sha256::digest(&got), sha2::Sha256::digest(&data));
    let out = h
        .exec(&id, &["sh", "-c", "stat -c %u big.bin; sha256sum big.bin; mkdir -p d/e; echo hi > d/e/f; ln -sfn /etc out; ln -sfn /etc/passwd pw"])
        .await;
    let stdout = out["stdout"].as_str().expect("stdout").to_owned();
    assert!(
        stdout.starts_with(&format!("{uid}\n")),
        "owned by the user: {stdout}"
    );
    assert!(
        stdout.contains(&hex::encode(sha2::Sha256::digest(&data))),
        "{stdout}"
    );
    let tar = h
        .http
        .get(format!("{files}?path=d"))
        .send()
        .await
        .expect("get dir");
    assert_eq!(tar.headers()["content-type"], "application/x-tar");
    let tar = tar.bytes().await.expect("tar");
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("d.tar"), &tar).expect("write");
    let listed = std::process::Command::new("tar")
        .arg("-tf")
        .arg(dir.path().join("d.tar"))
        .output()
        .expect("tar");
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "d/\nd/e/\nd/e/f\n");

    // Escapes: refused with 403 naming the path and why; nothing written.
    for (method, path, why) in [
        ("PUT", "../../etc/evil", "'..'"),
        ("PUT", "/etc/evil", "outside"),
        ("GET", "/etc/passwd", "outside"),
        ("PUT", "out/evil", "symlink leads out"),
        ("GET", "out/passwd", "symlink leads out"),
        ("GET", "pw", "symlink leads out"),
        ("PUT", "pw", "symlink"),
    ] {
        let url = format!("{files}?path={}", url_escape(path));
        let req = if method == "PUT" {
            h.http.put(url).body("x")
        } else {
            h.http.get(url)
        };
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{method} {path}");
        assert!(
            message.contains(path) && message.contains(why),
            "{method} {path}: {message}"
        );
    }
    let out = h
        .exec(
            &id,
            &["sh", "-c", "ls /etc/evil 2>&1; head -c 4 /etc/passwd"],
        )
        .await;
    assert!(
        out["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("No such file"),
        "{out}"
    );
    assert_eq!(
        out["stdout"].as_str().unwrap_or("").lines().last(),
        Some("root"),
        "{out}"
    );

    // An upload past 64 MiB, streamed in chunks with no length: 413, and
    // neither the file nor a half-written one beside it is left.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for _ in 0..65 {
            if tx.send(vec![7u8; 1 << 20]).await.is_err() {
                return;
            }
        }
    });
    let resp = h
        .http
        .put(format!("{files}?path=huge.bin"))
        .body(reqwest::Body::wrap(Chunks(rx)))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 413);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = h.exec(&id, &["sh", "-c", "ls -a | grep -c huge"]).await;
    assert_eq!(out["stdout"], "0\n", "{out}");

    // /exec is a process of the table, private to its request: the 1 MiB
    // cap per stream holds, and it is never listed.
    let out = h
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "head -c 1500000 /dev/zero | tr '\\0' a; echo err >&2; echo exec-marker >/dev/null",
            ],
        )
        .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(out["truncated"], true);
    assert_eq!(out["stdout"].as_str().map(str::len), Some(1 << 20));
    assert_eq!(out["stderr"], "err\n");
    let listed: Value = h
        .http
        .get(h.url(&format!("/api/v1/sandboxes/{id}/processes")))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(!listed.to_string().contains("exec-marker"), "{listed}");

    h.shutdown().await;
}

/// A request body sent in chunks, with no length said.
struct Chunks(tokio::sync::mpsc::Receiver<Vec<u8>>);

impl hyper::body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|c| Ok(hyper::body::Frame::data(bytes::Bytes::from(c)))))
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
