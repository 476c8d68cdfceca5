//! A shaped link between the browser and the control plane, for the viewer
//! benchmark: the browser runs in a network namespace of its own, joined to
//! this host by a veth pair that carries
//!
//! * a rate limit (`tc tbf`, both ends),
//! * random loss (an nftables table inside the namespace, each direction),
//! * delay: this kernel has no `netem`, so a relay on the host end of the
//!   link holds every packet (UDP) and every chunk (TCP) for half the round
//!   trip in each direction before passing it on to the control plane on
//!   loopback.
//!
//! Everything lives in the namespace or on the pair, and goes with them.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// Packets or chunks with the time they may go on.
type Delayed = mpsc::UnboundedSender<(Instant, Vec<u8>)>;
use tokio::time::Instant;

/// The link's figures.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub rtt: Duration,
    pub mbit: u32,
    /// Loss in each direction, per mille.
    pub loss_per_mille: u32,
}

/// The namespace, the veth pair and the delaying relays.
#[derive(Debug)]
pub struct Link {
    pub netns: String,
    /// The host end's address: what the browser connects to.
    pub host: Ipv4Addr,
    tasks: Vec<tokio::task::AbortHandle>,
}

const HOST: Ipv4Addr = Ipv4Addr::new(10, 237, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 237, 0, 2);

fn sh(args: &[&str]) -> Result<()> {
    let st = std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .with_context(|| format!("running {}", args[0]))?;
    if !st.success() {
        bail!("{} failed ({st})", args.join(" "));
    }
    Ok(())
}

impl Link {
    pub fn up(shape: Shape) -> Result<Self> {
        let id = std::process::id();
        let netns = format!("airlock-shape-{id}");
        let (h, n) = (format!("alsh{id}h"), format!("alsh{id}n"));
        let link = Link {
            netns: netns.clone(),
            host: HOST,
            tasks: Vec::new(),
        };
        let rate = format!("{}mbit", shape.mbit);
        let loss = shape.loss_per_mille.to_string();
        let table = format!(
            "table inet shape {{ chain input {{ type filter hook input priority 0; iifname \"{n}\" numgen random mod 1000 < {loss} drop; }}; \
             chain output {{ type filter hook output priority 0; oifname \"{n}\" numgen random mod 1000 < {loss} drop; }}; }}"
        );
        let steps: Vec<Vec<String>> = vec![
            vec!["ip", "netns", "add", &netns],
            vec![
                "ip", "link", "add", &h, "type", "veth", "peer", "name", &n, "netns", &netns,
            ],
            vec!["ip", "addr", "add", &format!("{HOST}/30"), "dev", &h],
            vec!["ip", "link", "set", &h, "up"],
            vec![
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{PEER}/30"),
                "dev",
                &n,
            ],
            vec!["ip", "-n", &netns, "link", "set", &n, "up"],
            vec!["ip", "-n", &netns, "link", "set", "lo", "up"],
            vec![
                "tc", "qdisc", "add", "dev", &h, "root", "tbf", "rate", &rate, "burst", "32kb",
                "latency", "100ms",
            ],
            vec![
                "ip", "netns", "exec", &netns, "tc", "qdisc", "add", "dev", &n, "root", "tbf",
                "rate", &rate, "burst", "32kb", "latency", "100ms",
            ],
            vec!["ip", "netns", "exec", &netns, "nft", &table],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(str::to_owned).collect())
        .collect();
        for step in &steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            sh(&args)?;
        }
        Ok(link)
    }

    /// Relay `port` of the host end to the same port on loopback, delayed by
    /// half the round trip each way (TCP; UDP too when `udp`).
    pub async fn relay(&mut self, port: u16, udp: bool, shape: Shape) -> Result<()> {
        let half = shape.rtt / 2;
        let listener = TcpListener::bind((self.host, port)).await?;
        self.tasks
            .push(tokio::spawn(relay_tcp(listener, port, half)).abort_handle());
        if udp {
            let socket = Arc::new(UdpSocket::bind((self.host, port)).await?);
            self.tasks
                .push(tokio::spawn(relay_udp(socket, port, half)).abort_handle());
        }
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The pair, its qdiscs and the namespace's table go with the namespace.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Pass chunks from `rd` to `wr`, each no sooner than `delay` after it arrived.
async fn delayed(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = rd.read(&mut buf).await {
        if n == 0
            || tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn relay_tcp(listener: TcpListener, port: u16, delay: Duration) {
    while let Ok((down, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
                return;
            };
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::join!(delayed(dr, uw, delay), delayed(ur, dw, delay));
        });
    }
}

async fn relay_udp(outer: Arc<UdpSocket>, port: u16, delay: Duration) {
    // One loopback socket per browser address, so the control plane sees
    // each browser as its own source.
    let mut flows: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    while let Ok((n, from)) = outer.recv_from(&mut buf).await {
        let due = Instant::now() + delay;
        let tx = match flows.get(&from) {
            Some(tx) => tx.clone(),
            None => {
                let Ok(inner) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await else {
                    continue;
                };
                if inner.connect((Ipv4Addr::LOCALHOST, port)).await.is_err() {
                    continue;
                }
                let inner = Arc::new(inner);
                let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                // Browser → control plane.
                let up = inner.clone();
                tokio::spawn(async move {
                    while let Some((due, p)) = rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        let _ = up.send(&p).await;
                    }
                });
                // Control plane → browser.
                let (back, outer) = (inner.clone(), outer.clone());
                tokio::spawn(async move {
                    let (btx, mut brx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                    let out = outer.clone();
                    tokio::spawn(async move {
                        while let Some((due, p)) = brx.recv().await {
                            tokio::time::sleep_until(due).await;
                            let _ = out.send_to(&p, from).await;
                        }
                    });
                    let mut b = vec![0u8; 2048];
                    while let Ok(n) = back.recv(&mut b).await {
                        if btx.send((Instant::now() + delay, b[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                });
                flows.insert(from, tx.clone());
                tx
            }
        };
        let _ = tx.send((due, buf[..n].to_vec()));
    }
}
