//! A warm pool on the real nspawn driver and golden image: two members boot
//! ahead of need; a user's create is handed one, `ready` at once; its agent
//! reports that user's session; its traffic leaves through that user's
//! upstream (a real local proxy standing in for the provider); the pool
//! fills up again. Addresses: 10.253.1.0/24.

mod common;

use common::unmet;
use secrecy::SecretString;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream HTTP proxy: records each request head and answers every one
/// with `answer`.
struct Upstream {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(answer: &'static str) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = tcp.write_all(reply.as_bytes()).await;
                });
            }
        });
        Upstream { port, heads, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_desktop_is_handed_to_its_user() {
    if unmet().is_some() {
        return;
    }
    let upstream = Upstream::start("through bob's upstream").await;
    let h = common::start_with("10.253.1.0/24", |cfg| {
        cfg.pool.browser = 2;
        cfg.pool.refill_every_s = 1;
        // The test's origin name resolves nowhere; the upstream answers it.
        cfg.egress_allow = vec!["origin.test".into()];
    })
    .await;
    let app = h.running.as_ref().expect("running").app.clone();
    let (_, bob_token) = app.add_user("bob").await.expect("bob");
    app.set_user_egress(
        "bob",
        &SecretString::from(format!("http://bob:bob-secret@127.0.0.1:{}", upstream.port)),
    )
    .await
    .expect("bob's upstream");

    // The pool fills: two members, one boot at a time.
    let filled = Instant::now();
    wait_pool(&app, 2, Duration::from_secs(240)).await;
    eprintln!("pool of 2 filled in {:?}", filled.elapsed());

    let asked = Instant::now();
    let (status, body) = h
        .call(
            reqwest::Method::POST,
            "/api/v1/sandboxes",
            Some(&bob_token),
            Some(json!({"kind": "browser"})),
        )
        .await;
    let took = asked.elapsed();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["from_pool"], true, "{body}");
    assert_eq!(body["state"], "ready", "{body}");
    assert_eq!(body["owner"], "bob");
    eprintln!("claim answered ready in {took:?}");
    let id = body["id"].as_str().expect("id").to_owned();

    // The agent holds bob's session.
    let session = app
        .guest_session(&id)
        .await
        .expect("session")
        .expect("a claimed member has one");
    assert_eq!(session.user_name, "bob");
    assert_eq!(session.sandbox_id, id);

    // Its traffic leaves through bob's upstream, with bob's credentials.
    let (status, out) = h
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            Some(&bob_token),
            Some(json!({"argv": ["sh", "-c", "curl -sS -m 20 http://origin.test/hello"]})),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["stdout"], "through bob's upstream", "{out}");
    let heads = upstream.heads();
    let head = heads
        .iter()
        .find(|h| h.contains("origin.test/hello"))
        .unwrap_or_else(|| panic!("the upstream saw no request for the origin: {heads:?}"));
    // base64("bob:bob-secret")
    assert!(
        head.contains("Basic Ym9iOmJvYi1zZWNyZXQ="),
        "bob's credentials: {head}"
    );

    // Another user (local) sees nothing of it; the pool fills up again.
    let (status, _) = h.get(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(status, 404);
    let refill = Instant::now();
    wait_pool(&app, 2, Duration::from_secs(240)).await;
    eprintln!("pool refilled in {:?}", refill.elapsed());
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("airlock_pool_hits_total{kind=\"browser\"} 1"),
        "{metrics}"
    );
    h.shutdown().await;
}

async fn wait_pool(app: &airlock_server::app::App, n: u32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = app.pool_status().await.expect("pool status");
        if status[0].ready >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool holds {status:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
