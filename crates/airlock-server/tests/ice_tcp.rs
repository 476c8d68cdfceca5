//! The ICE-TCP port under a flood of idle connections, against the real
//! control plane: the API keeps answering, connections past the caps are
//! closed at once, the rest when the first-frame deadline passes, and (with
//! the golden image) a ready sandbox keeps working and is not failed.

mod common;

use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::{host::RealHost, ImageRef};
use airlock_server::config::Config;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const FLOOD: usize = 2000;

/// The golden image's control plane when there is one; else the same server
/// over an image it never boots (the flood needs no sandbox).
async fn start(adjust: impl FnOnce(&mut Config)) -> (common::Harness, bool) {
    if (std::env::var_os("CI").is_some() || common::image().is_some()) && common::unmet().is_none()
    {
        return (common::start_with("10.244.1.0/24", adjust).await, true);
    }
    let tmp = tempfile::Builder::new()
        .prefix("airlock-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: tmp.path().to_path_buf(),
        address_pool: "10.244.1.0/24".into(),
        webrtc_udp_port: 0,
        webrtc_tcp_port: 0,
        ..Config::default()
    };
    adjust(&mut cfg);
    let driver = Arc::new(NspawnDriver::new(
        NspawnConfig::new(cfg.data_dir.join("sandboxes")),
        Arc::new(RealHost),
    ));
    let image = ImageRef {
        build_id: "none".into(),
        layers: Vec::new(),
    };
    let running = airlock_server::server::start(&cfg, image, driver)
        .await
        .expect("server starts");
    let base = format!("http://{}", running.addr);
    (common::Harness::adopt(running, base, cfg, tmp), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_on_ice_tcp_stops_nothing() {
    let (h, real) = start(|cfg| {
        cfg.webrtc_tcp_max_connections = 200;
        cfg.webrtc_tcp_max_per_ip = 100;
        cfg.webrtc_tcp_first_frame_ms = 2000;
    })
    .await;
    let sandbox = if real {
        Some(h.ready_sandbox("browser").await)
    } else {
        None
    };
    let endpoint = h
        .running
        .as_ref()
        .and_then(|r| r.app.webrtc.get().cloned())
        .expect("WebRTC is on");
    let port = endpoint.tcp_addr();

    // 2,000 silent connections from four addresses (100 each may stay).
    let mut conns = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        let from = format!("127.0.1.{}", 1 + i % 4);
        sock.bind(format!("{from}:0").parse().expect("addr"))
            .expect("bind");
        match tokio::time::timeout(Duration::from_secs(2), sock.connect(port)).await {
            Ok(Ok(tcp)) => conns.push(tcp),
            other => panic!("connection {i} was not even queued: {other:?}"),
        }
    }
    let flooded = Instant::now();
    // The API answers during the flood.
    for _ in 0..5 {
        let t = Instant::now();
        let resp = h.http.get(h.url("/healthz")).send().await.expect("healthz");
        assert!(resp.status().is_success());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    if let Some(id) = &sandbox {
        let out = h.exec(id, &["true"]).await;
        assert_eq!(out["exit_code"], 0, "{out}");
    }
    assert!(
        endpoint.tcp_connections() <= 200,
        "{} kept",
        endpoint.tcp_connections()
    );
    // Past the caps: closed at once. The rest: by the first-frame deadline.
    let mut closed_early = 0;
    let mut closed_late = 0;
    for tcp in &mut conns {
        match closed(tcp, Duration::from_millis(1)).await {
            true => closed_early += 1,
            false => {
                assert!(closed(tcp, Duration::from_secs(4)).await, "never closed");
                closed_late += 1;
            }
        }
    }
    assert!(flooded.elapsed() < Duration::from_secs(8));
    assert!(
        closed_early >= FLOOD - 200,
        "{closed_early} closed at accept"
    );
    assert!(closed_late <= 200, "{closed_late} held until the deadline");
    assert_eq!(endpoint.tcp_connections(), 0);

    let resp = h.http.get(h.url("/healthz")).send().await.expect("healthz");
    assert!(resp.status().is_success());
    if let Some(id) = &sandbox {
        let (_, row) = h.get(&format!("/api/v1/sandboxes/{id}")).await;
        assert_eq!(row["state"], "ready", "{row}");
        let out = h.exec(id, &["true"]).await;
        assert_eq!(out["exit_code"], 0, "{out}");
    }
    h.shutdown().await;
}

/// Whether the server closed `tcp` within `wait` (EOF or reset).
async fn closed(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, tcp.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}
