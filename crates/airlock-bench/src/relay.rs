//! The viewer relay against a direct TCP connection and against Debian's
//! websockify, all three in front of the same load source: a small RFB server
//! that does the VncAuth handshake (so the relay authenticates to it exactly as
//! to a guest's Xvnc) and then either echoes or streams bytes as fast as the
//! socket takes them, so no VNC server's polling sets the ceiling.

use crate::rfbc::vnc_auth;
use crate::stats::{ms, percentile, Table};
use crate::wire::{greet_none, WsClient};
use airlock_server::relay::rfb::{IoWire, Wire};
use airlock_server::relay::ws::{relay, Target};
use anyhow::{Context, Result};
use axum::extract::ws::WebSocketUpgrade;
use axum::routing::get;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASSWORD: &str = "bench-pw";
const MSG: usize = 16;

/// The load source: one task per connection, on its own thread and runtime.
fn start_source() -> Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = serve_source(s).await;
                });
            }
        });
    });
    Ok(addr)
}

async fn serve_source(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.write_all(b"RFB 003.008\n").await?;
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await?;
    s.write_all(&[1, 2]).await?;
    if s.read_u8().await? != 2 {
        return Ok(());
    }
    let challenge: [u8; 16] = *b"airlock-bench-ch";
    s.write_all(&challenge).await?;
    let mut resp = [0u8; 16];
    s.read_exact(&mut resp).await?;
    if resp != airlock_proto::vncauth::challenge_response(PASSWORD, &challenge) {
        s.write_all(&1u32.to_be_bytes()).await?;
        return Ok(());
    }
    s.write_all(&0u32.to_be_bytes()).await?;
    match s.read_u8().await? {
        b'E' => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        b'B' => {
            let total = s.read_u64().await?;
            let buf = vec![0x5au8; 64 * 1024];
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).await?;
                sent += n as u64;
            }
            let mut rest = [0u8; 1];
            let _ = s.read(&mut rest).await;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The real relay, mounted the way the control plane mounts it, on its own
/// two-worker runtime (the control plane's size on this machine).
fn start_relay(source: SocketAddr) -> Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let (stop_tx, _) = tokio::sync::broadcast::channel::<String>(4);
            let app = axum::Router::new().route(
                "/vnc",
                get(move |ws: WebSocketUpgrade| {
                    let rx = stop_tx.subscribe();
                    async move {
                        ws.protocols(["binary"])
                            .on_upgrade(move |socket| async move {
                                let target = Target {
                                    sandbox_id: "bench".into(),
                                    vnc: source,
                                    password: PASSWORD.into(),
                                };
                                relay(socket, target, rx, Box::new(|_| {})).await;
                            })
                    }
                }),
            );
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            let _ = axum::serve(listener, app).await;
        });
    });
    Ok(addr)
}

/// Debian's websockify in front of the same source.
struct Websockify {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Websockify {
    async fn start(source: SocketAddr) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = std::process::Command::new("websockify")
            .arg(addr.to_string())
            .arg(source.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting websockify (Debian package websockify)")?;
        let ws = Websockify { child, addr };
        // Python starts slowly on a busy machine: allow it half a minute.
        for _ in 0..600 {
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(ws);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("websockify did not start listening on {addr}")
    }
}

impl Drop for Websockify {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Direct(SocketAddr),
    Relay(SocketAddr),
    Websockify(SocketAddr),
}

enum Conn {
    Tcp(IoWire<TcpStream>),
    Ws(Box<WsClient>),
}

impl Conn {
    async fn open(path: Path) -> Result<Self> {
        Ok(match path {
            Path::Direct(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                let mut w = IoWire(s);
                vnc_auth(&mut w, PASSWORD).await?;
                Conn::Tcp(w)
            }
            Path::Relay(a) => {
                let mut w = WsClient::connect(&format!("ws://{a}/vnc")).await?;
                greet_none(&mut w).await?;
                Conn::Ws(Box::new(w))
            }
            Path::Websockify(a) => {
                let mut w = WsClient::connect(&format!("ws://{a}/")).await?;
                vnc_auth(&mut w, PASSWORD).await?;
                Conn::Ws(Box::new(w))
            }
        })
    }

    async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(w) => w.write_all(b).await,
            Conn::Ws(w) => w.write_all(b).await,
        }
    }

    async fn read_exact(&mut self, b: &mut [u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(w) => w.read_exact(b).await,
            Conn::Ws(w) => w.read_exact(b).await,
        }
    }

    /// Bytes of the next read, whatever size it came in.
    async fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(w) => match w.0.read(buf).await? {
                0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => Ok(n),
            },
            Conn::Ws(w) => w.next_chunk().await,
        }
    }

    async fn close(self) {
        match self {
            Conn::Tcp(mut w) => {
                let _ = w.0.shutdown().await;
            }
            Conn::Ws(w) => (*w).close().await,
        }
    }
}

async fn latency(path: Path, rounds: usize) -> Result<Vec<Duration>> {
    let mut c = Conn::open(path).await?;
    c.write(b"E").await?;
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut out = Vec::with_capacity(rounds);
    for i in 0..rounds + 200 {
        let t = Instant::now();
        c.write(&msg).await?;
        c.read_exact(&mut back).await?;
        if i >= 200 {
            out.push(t.elapsed());
        }
    }
    c.close().await;
    Ok(out)
}

async fn throughput(path: Path, bytes: u64) -> Result<f64> {
    let mut c = Conn::open(path).await?;
    let mut req = vec![b'B'];
    req.extend_from_slice(&bytes.to_be_bytes());
    let t = Instant::now();
    c.write(&req).await?;
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < bytes {
        got += c.read_some(&mut buf).await? as u64;
    }
    let took = t.elapsed();
    c.close().await;
    Ok(bytes as f64 / took.as_secs_f64() / (1024.0 * 1024.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn run(rounds: usize, mib: u64, repeats: usize) -> Result<()> {
    let source = start_source()?;
    let relay_addr = start_relay(source)?;
    let wsf = Websockify::start(source).await?;
    let paths = [
        ("direct TCP", Path::Direct(source)),
        ("airlock relay (WS)", Path::Relay(relay_addr)),
        ("websockify 0.10 (WS)", Path::Websockify(wsf.addr)),
    ];
    let mut lat = Vec::new();
    let mut thr = Vec::new();
    // Interleave the paths so a burst of load from elsewhere hits all of them.
    let mut lat_samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    let mut thr_samples: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..repeats {
        for (i, (_, p)) in paths.iter().enumerate() {
            lat_samples[i].extend(latency(*p, rounds).await?);
            thr_samples[i].push(throughput(*p, mib * 1024 * 1024).await?);
        }
    }
    for i in 0..paths.len() {
        lat.push((
            percentile(&lat_samples[i], 50.0),
            percentile(&lat_samples[i], 99.0),
        ));
        thr.push(median(thr_samples[i].clone()));
    }
    let mut t = Table::new(
        &format!(
            "Viewer relay: {MSG}-byte echo round trips ({} per path) and a {mib} MiB stream (median of {repeats})",
            rounds * repeats
        ),
        &[
            "path",
            "RTT p50",
            "RTT p99",
            "added p50",
            "added p99",
            "throughput",
            "vs direct",
        ],
    );
    for (i, (name, _)) in paths.iter().enumerate() {
        let added = |a: Duration, b: Duration| {
            if i == 0 {
                "-".to_owned()
            } else {
                ms(a.saturating_sub(b))
            }
        };
        t.row(&[
            name.to_string(),
            ms(lat[i].0),
            ms(lat[i].1),
            added(lat[i].0, lat[0].0),
            added(lat[i].1, lat[0].1),
            format!("{:.0} MiB/s", thr[i]),
            format!("{:.0}%", thr[i] / thr[0] * 100.0),
        ]);
    }
    t.print();
    drop(wsf);
    Ok(())
}
