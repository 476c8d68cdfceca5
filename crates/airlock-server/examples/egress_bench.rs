//! Measures the forward proxy against a direct connection on the same path:
//! client → upstream CONNECT proxy → origin, with and without the forward
//! proxy in between. Everything runs on loopback in this process: the
//! origin echoes (latency) or discards (throughput); the upstream is a small
//! CONNECT proxy built here with hyper. Prints connect and round-trip
//! latency (p50/p99), throughput, and memory per idle listener.
//!
//! `cargo run --release -p airlock-server --example egress_bench`

use airlock_server::egress::{serve, ProxyConfig, Resolve, SecretString, Stats, Upstream};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
struct Fixed(Arc<Upstream>);

#[async_trait::async_trait]
impl Resolve for Fixed {
    async fn upstream(&self) -> Result<Arc<Upstream>, String> {
        Ok(self.0.clone())
    }
}

/// Origin: port 0 of the pair echoes, the other discards.
async fn origin(echo: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || (echo && s.write_all(&buf[..n]).await.is_err()) {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A minimal upstream: answers CONNECT with 200 and splices.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: hyper::Request<hyper::body::Incoming>| async move {
                        let target = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let (Ok(up), Ok(mut o)) =
                                (on.await, TcpStream::connect(target).await)
                            {
                                let _ = o.set_nodelay(true);
                                let _ =
                                    tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut o)
                                        .await;
                            }
                        });
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            Empty::<Bytes>::new(),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Open a tunnel through the proxy at `via` to `target`.
async fn tunnel(via: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(via).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.expect("read head");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

async fn measure(name: &str, via: SocketAddr, echo: SocketAddr, sink: SocketAddr) {
    let mut connects = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        drop(tunnel(via, echo).await);
        connects.push(t.elapsed());
    }
    let mut s = tunnel(via, echo).await;
    let mut rtts = Vec::new();
    let mut b = [0u8; 64];
    for _ in 0..5000 {
        let t = Instant::now();
        s.write_all(&b).await.expect("w");
        s.read_exact(&mut b).await.expect("r");
        rtts.push(t.elapsed());
    }
    let mut s = tunnel(via, sink).await;
    let chunk = vec![7u8; 256 * 1024];
    let total: usize = 1 << 30;
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&chunk).await.expect("w");
        sent += chunk.len();
    }
    s.shutdown().await.expect("shutdown");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{name:<22} connect p50 {:>7.0} µs p99 {:>7.0} µs | 64 B round trip p50 {:>5.0} µs p99 {:>5.0} µs | {:>6.0} MiB/s",
        pct(&mut connects, 0.5),
        pct(&mut connects, 0.99),
        pct(&mut rtts, 0.5),
        pct(&mut rtts, 0.99),
        (total as f64 / (1 << 20) as f64) / secs
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let (echo, sink, up) = (origin(true).await, origin(false).await, upstream().await);
    let resolve: Arc<dyn Resolve> = Arc::new(Fixed(Arc::new(Upstream::new(
        "127.0.0.1".into(),
        up.port(),
        "bench".into(),
        SecretString::from("bench"),
    ))));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = l.local_addr().expect("addr");
    tokio::spawn(serve(
        l,
        ProxyConfig::default(),
        resolve.clone(),
        Arc::new(Stats::default()),
    ));
    measure("direct (upstream only)", up, echo, sink).await;
    measure("via forward proxy", proxy, echo, sink).await;

    let n = 1000;
    let before = rss_kib();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        tasks.push(tokio::spawn(serve(
            l,
            ProxyConfig::default(),
            resolve.clone(),
            Arc::new(Stats::default()),
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    println!(
        "idle listeners: {n} use {} KiB more RSS: {:.1} KiB each",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / n as f64
    );
}
