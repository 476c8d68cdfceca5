//! The replica → node hop a viewer's bytes take when the sandbox runs on
//! another host: a guest port reached directly against the same port reached
//! through the loopback end of a [`RemoteNode`] tunnel, which dials the
//! node's API (`/node/v1/dial`, an HTTP upgrade) and splices the two. Three
//! parts, each on its own runtime as in production: the "guest" (an echo
//! server on a 127.x.y.z guest address, agent port), the node (the real
//! `node::wire` router over the fake node, two workers) and the replica (the
//! `RemoteNode`, its tunnel and the client, on the bench's runtime).

use crate::stats::{percentile, Table};
use airlock_server::node::fake::FakeNode;
use airlock_server::node::remote::RemoteNode;
use airlock_server::node::wire::{self, WireState};
use airlock_server::node::{EgressBinding, Node, NodeEgress, NodeError};
use anyhow::{Context, Result};
use secrecy::SecretString;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WARM_UP: usize = 200;

/// `airlock-bench hop` options.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Echo round trips per path and run (after 200 warm-up).
    #[arg(long, default_value_t = 2000)]
    rounds: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Runs, each path once per run, interleaved.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// New connections per path and run, for the set-up time.
    #[arg(long, default_value_t = 50)]
    connects: usize,
    /// MiB echoed per path and run for throughput (0: skip).
    #[arg(long, default_value_t = 64)]
    mib: u64,
}

/// The bench's node forwards no egress.
#[derive(Debug)]
struct NoEgress;

#[async_trait::async_trait]
impl NodeEgress for NoEgress {
    async fn attach(&self, _: &EgressBinding) -> Result<(), NodeError> {
        Ok(())
    }
    async fn rebind(&self, _: &EgressBinding) -> Result<(), NodeError> {
        Ok(())
    }
    async fn detach(&self, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
}

/// The guest: an echo server on the agent port of a free 127.x.y.z guest
/// address (the `.2` of a /30 block, as `dial` requires), on its own thread.
fn start_guest() -> Result<Ipv4Addr> {
    for _ in 0..50 {
        let [a, b, c, ..] = random_u64().to_le_bytes();
        let ip = Ipv4Addr::new(127, a | 1, b, (c & 0xfc) | 2);
        let Ok(std_listener) = std::net::TcpListener::bind((ip, airlock_proto::AGENT_PORT)) else {
            continue;
        };
        std_listener.set_nonblocking(true)?;
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
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
        });
        return Ok(ip);
    }
    anyhow::bail!(
        "no free 127.x.y.z:{} to bind the guest on",
        airlock_proto::AGENT_PORT
    )
}

/// The node's API, served as `airlock node` serves it, on two workers.
fn start_node(token: &str) -> Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let token = SecretString::from(token);
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            let app = wire::router(WireState {
                node: Arc::new(FakeNode::new()),
                egress: Arc::new(NoEgress),
                token,
                guest_net: (Ipv4Addr::new(127, 0, 0, 0), 8),
                name: "bench".into(),
            });
            let _ = wire::serve(listener, app, std::future::pending()).await;
        });
    });
    Ok(addr)
}

async fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(to)
        .await
        .with_context(|| format!("connect {to}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn round_trips(to: SocketAddr, rounds: usize, size: usize) -> Result<Vec<Duration>> {
    let mut s = connect(to).await?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut out = Vec::with_capacity(rounds);
    for i in 0..WARM_UP + rounds {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        if i >= WARM_UP {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// Connect and one small echo: what a new viewer or probe waits for first.
async fn set_ups(to: SocketAddr, count: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let mut s = connect(to).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// MiB/s of `mib` MiB written and echoed back at once.
async fn throughput(to: SocketAddr, mib: u64) -> Result<f64> {
    let total = mib * 1024 * 1024;
    let s = connect(to).await?;
    let (mut r, mut w) = s.into_split();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).await?;
            sent += n as u64;
        }
        Ok::<_, std::io::Error>(w)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the echo ended early");
        got += n as u64;
    }
    let took = t.elapsed();
    writer.await??;
    Ok(total as f64 / took.as_secs_f64() / (1024.0 * 1024.0))
}

/// A value no other run picks the same (std's hasher keys are random).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// Milliseconds to the microsecond: the hop is tens of them.
fn us(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn added(a: Duration, b: Duration) -> String {
    if a >= b {
        us(a - b)
    } else {
        format!("-{}", us(b - a))
    }
}

pub async fn run(o: Options) -> Result<()> {
    let token = format!("bench-{:016x}", random_u64());
    let guest_ip = start_guest()?;
    let node_addr = start_node(&token)?;
    let remote = RemoteNode::new("bench".into(), node_addr, SecretString::from(token));
    let health = remote.health().await.context("the node's health")?;
    eprintln!(
        "hop: node {} ({}) at {node_addr}, guest {guest_ip}:{}",
        health.name,
        health.backend,
        airlock_proto::AGENT_PORT
    );
    let direct = SocketAddr::from((guest_ip, airlock_proto::AGENT_PORT));
    let tunnel = remote
        .endpoints("bench", guest_ip)
        .await
        .context("tunnel endpoints")?
        .agent;
    let paths = [("direct", direct), ("through the node", tunnel)];
    let mut t = Table::new(
        &format!(
            "Replica → node hop: {}-byte echo round trips ({} per path and run, after {WARM_UP} warm-up), \
             connect + first echo ({} per path and run), {} MiB echoed",
            o.size, o.rounds, o.connects, o.mib
        ),
        &[
            "run",
            "path",
            "RTT p50",
            "RTT p90",
            "RTT p99",
            "added p50",
            "added p90",
            "added p99",
            "set-up p50",
            "set-up p99",
            "throughput",
        ],
    );
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    for run in 1..=o.repeats {
        let mut rtt = Vec::new();
        let mut setup = Vec::new();
        let mut thr = Vec::new();
        for (i, (name, to)) in paths.iter().enumerate() {
            eprintln!("hop: run {run}/{}: {name}", o.repeats);
            let r = round_trips(*to, o.rounds, o.size).await?;
            all[i].extend_from_slice(&r);
            rtt.push(r);
            setup.push(set_ups(*to, o.connects).await?);
            thr.push(if o.mib > 0 {
                Some(throughput(*to, o.mib).await?)
            } else {
                None
            });
        }
        for (i, (name, _)) in paths.iter().enumerate() {
            let p = |s: &[Duration], q: f64| percentile(s, q);
            let diff = |q: f64| {
                if i == 0 {
                    "–".to_owned()
                } else {
                    added(p(&rtt[i], q), p(&rtt[0], q))
                }
            };
            t.row(&[
                run.to_string(),
                name.to_string(),
                us(p(&rtt[i], 50.0)),
                us(p(&rtt[i], 90.0)),
                us(p(&rtt[i], 99.0)),
                diff(50.0),
                diff(90.0),
                diff(99.0),
                us(p(&setup[i], 50.0)),
                us(p(&setup[i], 99.0)),
                thr[i].map_or("–".to_owned(), |m| format!("{m:.0} MiB/s")),
            ]);
        }
    }
    t.print();
    let mut sum = Table::new(
        &format!("All runs together ({} round trips per path)", all[0].len()),
        &[
            "path",
            "RTT p50",
            "RTT p90",
            "RTT p99",
            "added p50",
            "added p90",
            "added p99",
        ],
    );
    for (i, (name, _)) in paths.iter().enumerate() {
        let diff = |q: f64| {
            if i == 0 {
                "–".to_owned()
            } else {
                added(percentile(&all[i], q), percentile(&all[0], q))
            }
        };
        sum.row(&[
            name.to_string(),
            us(percentile(&all[i], 50.0)),
            us(percentile(&all[i], 90.0)),
            us(percentile(&all[i], 99.0)),
            diff(50.0),
            diff(90.0),
            diff(99.0),
        ]);
    }
    sum.print();
    remote.destroy("bench").await.ok();
    Ok(())
}
