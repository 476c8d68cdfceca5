//! The network side of WebRTC: one UDP socket and one ICE-TCP listener shared
//! by every peer connection, and the routing of each arriving packet to its
//! peer. A packet from a known source goes to the peer that source belongs to;
//! a STUN binding request from a new source names the peer in its USERNAME
//! (`<our ufrag>:<their ufrag>`), and that source is remembered for the peer.
//! ICE-TCP frames packets with a 16-bit length (RFC 4571).
//!
//! The ICE-TCP port is open to anyone who can reach the control plane, so a
//! connection costs little until it proves to be a peer's: a cap on
//! connections in all and per source address (more are closed at accept), a
//! deadline for the first whole frame (it must be a check for one of our
//! peers), an idle timeout after that, frames read into memory only as their
//! bytes arrive, and accept errors (out of descriptors) waited out with a
//! growing pause instead of retried in a spin.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use str0m::ice::StunMessage;
use str0m::net::{Protocol, TcpType};
use str0m::Candidate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// Where the sockets listen and what address the candidates carry.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub bind: IpAddr,
    pub udp_port: u16,
    pub tcp_port: u16,
    pub advertise: IpAddr,
    /// Budget of second copies of video packets per viewer (copies.rs).
    pub copies_kbps: u32,
    pub tcp_limits: TcpLimits,
    /// Estimate each viewer's bandwidth and set the guest's encoder to it
    /// (bitrate.rs); off: the encoder keeps its fixed rate.
    pub adaptive_bitrate: bool,
}

/// What one ICE-TCP connection may take before it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub max_per_ip: usize,
    /// The first whole frame (a check for one of our peers) must arrive within this.
    pub first_frame: Duration,
    /// A connection with no frame for this long is closed (ICE consent checks
    /// come every few seconds on a live one).
    pub idle: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            max_connections: 1024,
            max_per_ip: 32,
            first_frame: Duration::from_secs(5),
            idle: Duration::from_secs(30),
        }
    }
}

/// One packet for one peer.
#[derive(Debug)]
pub struct Packet {
    pub proto: Protocol,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub data: Vec<u8>,
    pub at: Instant,
}

/// Packets queued per peer before new ones are dropped (as the network would).
const PEER_QUEUE: usize = 512;
/// Frames queued per ICE-TCP connection before new ones are dropped.
const TCP_QUEUE: usize = 1024;
/// Largest datagram we read.
const MAX_DATAGRAM: usize = 2048;

#[derive(Debug, Default)]
struct Routes {
    by_ufrag: HashMap<String, mpsc::Sender<Packet>>,
    by_source: HashMap<(Protocol, SocketAddr), String>,
    tcp: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
}

/// ICE-TCP connections open now, in all and by source address.
#[derive(Debug, Default)]
struct TcpCount {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// One counted connection; dropping it gives the place back.
#[derive(Debug)]
struct TcpSlot {
    endpoint: std::sync::Weak<Endpoint>,
    ip: IpAddr,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        if let Some(e) = self.endpoint.upgrade() {
            let mut c = e.tcp_count.lock().unwrap_or_else(|p| p.into_inner());
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.by_ip.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_ip.remove(&self.ip);
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct Endpoint {
    udp: Arc<UdpSocket>,
    udp_local: SocketAddr,
    tcp_local: SocketAddr,
    advertise: IpAddr,
    copies_kbps: u32,
    adaptive_bitrate: bool,
    tcp_limits: TcpLimits,
    tcp_count: Mutex<TcpCount>,
    routes: Mutex<Routes>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A peer's registration; dropping it forgets the peer's routes.
#[derive(Debug)]
pub struct Route {
    endpoint: Arc<Endpoint>,
    ufrag: String,
}

impl Drop for Route {
    fn drop(&mut self) {
        let mut r = self.endpoint.lock();
        r.by_ufrag.remove(&self.ufrag);
        r.by_source.retain(|_, u| *u != self.ufrag);
    }
}

impl Endpoint {
    /// Bind both sockets and start reading them.
    pub async fn start(cfg: &EndpointConfig) -> std::io::Result<Arc<Self>> {
        let udp = UdpSocket::bind(SocketAddr::new(cfg.bind, cfg.udp_port)).await?;
        let tcp = TcpListener::bind(SocketAddr::new(cfg.bind, cfg.tcp_port)).await?;
        let endpoint = Arc::new(Endpoint {
            udp_local: udp.local_addr()?,
            tcp_local: tcp.local_addr()?,
            udp: Arc::new(udp),
            advertise: cfg.advertise,
            copies_kbps: cfg.copies_kbps,
            adaptive_bitrate: cfg.adaptive_bitrate,
            tcp_limits: cfg.tcp_limits,
            tcp_count: Mutex::default(),
            routes: Mutex::default(),
            tasks: Mutex::default(),
        });
        let weak = Arc::downgrade(&endpoint);
        // Packets are handed to str0m as sent to the advertised candidate
        // (behind NAT or a relay the socket's own address differs from it).
        let udp_dest = SocketAddr::new(cfg.advertise, endpoint.udp_local.port());
        let udp_task = tokio::spawn(read_udp(endpoint.udp.clone(), udp_dest, weak.clone()));
        let tcp_task = tokio::spawn(accept_tcp(tcp, weak));
        endpoint
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([udp_task.abort_handle(), tcp_task.abort_handle()]);
        Ok(endpoint)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_local
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_local
    }

    pub fn copies_kbps(&self) -> u32 {
        self.copies_kbps
    }

    /// Viewers' bandwidth estimates set the guest's encoder (bitrate.rs).
    pub fn adaptive_bitrate(&self) -> bool {
        self.adaptive_bitrate
    }

    /// ICE-TCP connections open now.
    pub fn tcp_connections(&self) -> usize {
        self.tcp_count
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }

    /// A place for a new connection from `ip`, unless a cap is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<TcpSlot> {
        let mut c = self.tcp_count.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.by_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.tcp_limits.max_connections || from_ip >= self.tcp_limits.max_per_ip {
            return None;
        }
        c.total += 1;
        c.by_ip.insert(ip, from_ip + 1);
        Some(TcpSlot {
            endpoint: Arc::downgrade(self),
            ip,
        })
    }

    /// The host candidates every peer offers: UDP, and passive ICE-TCP.
    pub fn candidates(&self) -> Vec<Candidate> {
        let udp = SocketAddr::new(self.advertise, self.udp_local.port());
        let tcp = SocketAddr::new(self.advertise, self.tcp_local.port());
        [
            Candidate::host(udp, "udp").ok(),
            Candidate::builder()
                .tcp()
                .host(tcp)
                .tcptype(TcpType::Passive)
                .build()
                .ok(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Packets whose STUN username starts with `ufrag` go to the returned queue.
    pub fn register(self: &Arc<Self>, ufrag: &str) -> (Route, mpsc::Receiver<Packet>) {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        self.lock().by_ufrag.insert(ufrag.to_owned(), tx);
        (
            Route {
                endpoint: self.clone(),
                ufrag: ufrag.to_owned(),
            },
            rx,
        )
    }

    /// Send what a peer produced. Loss under pressure is fine: RTP recovers.
    pub fn send(&self, proto: Protocol, destination: SocketAddr, data: &[u8]) {
        match proto {
            Protocol::Udp => {
                if let Err(e) = self.udp.try_send_to(data, destination) {
                    tracing::trace!(%destination, error = %e, "UDP send dropped");
                }
            }
            _ => {
                let tx = self.lock().tcp.get(&destination).cloned();
                if let Some(tx) = tx {
                    let _ = tx.try_send(data.to_vec());
                }
            }
        }
    }

    /// Route one arriving packet; `false` when no peer wants it.
    fn deliver(&self, packet: Packet) -> bool {
        let key = (packet.proto, packet.source);
        let tx = {
            let mut r = self.lock();
            let known = r
                .by_source
                .get(&key)
                .and_then(|u| r.by_ufrag.get(u))
                .cloned();
            match known {
                Some(tx) => Some(tx),
                None => match local_ufrag(&packet.data) {
                    Some(ufrag) => {
                        let tx = r.by_ufrag.get(&ufrag).cloned();
                        if tx.is_some() {
                            r.by_source.insert(key, ufrag);
                        }
                        tx
                    }
                    None => None,
                },
            }
        };
        match tx {
            Some(tx) => tx.try_send(packet).is_ok(),
            None => false,
        }
    }

    /// Stop reading both sockets (the control plane is stopping).
    pub fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first half of a STUN binding request's USERNAME: our ufrag.
pub fn local_ufrag(data: &[u8]) -> Option<String> {
    let msg = StunMessage::parse(data).ok()?;
    if !msg.is_binding_request() {
        return None;
    }
    msg.split_username().map(|(local, _)| local.to_owned())
}

async fn read_udp(socket: Arc<UdpSocket>, local: SocketAddr, endpoint: std::sync::Weak<Endpoint>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, source)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        endpoint.deliver(Packet {
            proto: Protocol::Udp,
            source,
            destination: local,
            data: buf[..n].to_vec(),
            at: Instant::now(),
        });
    }
}

/// Longest pause after failed accepts in a row.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_tcp(listener: TcpListener, endpoint: std::sync::Weak<Endpoint>) {
    let mut pause = Duration::ZERO;
    loop {
        let (stream, source) = match listener.accept().await {
            Ok(pair) => {
                pause = Duration::ZERO;
                pair
            }
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: accepting
                // again at once fails again, in a loop that takes a core.
                pause = (pause * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                if pause == ACCEPT_BACKOFF_MAX {
                    tracing::warn!(error = %e, "ICE-TCP accept keeps failing");
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Some(e) = endpoint.upgrade() else { return };
        let Some(slot) = e.admit(source.ip()) else {
            tracing::debug!(%source, "ICE-TCP connection over the cap, closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let limits = e.tcp_limits;
        drop(e);
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            serve_tcp(stream, source, endpoint, limits).await;
            drop(slot);
        });
    }
}

/// One RFC 4571 frame, read into memory only as its bytes arrive (a length
/// alone reserves nothing); `None` at the end of the stream or on an error.
async fn read_frame(rd: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let len = rd.read_u16().await.ok()?;
    let mut frame = Vec::new();
    let n = rd.take(u64::from(len)).read_to_end(&mut frame).await.ok()?;
    (n == usize::from(len)).then_some(frame)
}

/// One ICE-TCP connection: frames in go to the peer, frames out come from it.
async fn serve_tcp(
    stream: TcpStream,
    source: SocketAddr,
    endpoint: std::sync::Weak<Endpoint>,
    limits: TcpLimits,
) {
    let Some(local) = endpoint
        .upgrade()
        .map(|e| SocketAddr::new(e.advertise, e.tcp_local.port()))
    else {
        return;
    };
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    match endpoint.upgrade() {
        Some(e) => e.lock().tcp.insert(source, tx),
        None => return,
    };
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let Ok(len) = u16::try_from(frame.len()) else {
                continue;
            };
            let mut out = Vec::with_capacity(frame.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&frame);
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let mut deadline = limits.first_frame;
    loop {
        let Ok(Some(frame)) = tokio::time::timeout(deadline, read_frame(&mut rd)).await else {
            break;
        };
        deadline = limits.idle;
        let Some(e) = endpoint.upgrade() else { break };
        let known = e.lock().by_source.contains_key(&(Protocol::Tcp, source));
        let delivered = e.deliver(Packet {
            proto: Protocol::Tcp,
            source,
            destination: local,
            data: frame,
            at: Instant::now(),
        });
        // A connection that opens with anything but a check for one of our
        // peers is not ours to keep.
        if !known && !delivered {
            break;
        }
    }
    writer.abort();
    if let Some(e) = endpoint.upgrade() {
        let mut r = e.lock();
        r.tcp.remove(&source);
        r.by_source.remove(&(Protocol::Tcp, source));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::ice::TransId;

    fn binding_request(username: &str) -> Vec<u8> {
        // As a browser sends it: priority, and integrity (any key will do
        // for routing; the peer's Rtc checks it).
        let msg = StunMessage::binding_request(username, TransId::new(), true, 7, 100, false);
        let mut buf = vec![0u8; 512];
        let n = msg
            .to_bytes(Some(b"pass"), &mut buf, |_, _| [0u8; 20])
            .expect("encode");
        buf.truncate(n);
        buf
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), f)
            .await
            .expect("in time")
    }

    #[test]
    fn the_local_ufrag_comes_from_a_binding_request() {
        assert_eq!(
            local_ufrag(&binding_request("ours:theirs")).as_deref(),
            Some("ours")
        );
        assert_eq!(local_ufrag(b"\x80\x60 not stun"), None);
        assert_eq!(local_ufrag(&[]), None);
    }

    #[tokio::test]
    async fn packets_reach_the_peer_their_check_names() {
        let cfg = EndpointConfig {
            bind: "127.0.0.1".parse().expect("ip"),
            udp_port: 0,
            tcp_port: 0,
            // As behind NAT or a relay: browsers are told another address.
            advertise: "192.0.2.7".parse().expect("ip"),
            copies_kbps: 0,
            tcp_limits: TcpLimits::default(),
            adaptive_bitrate: false,
        };
        let e = Endpoint::start(&cfg).await.expect("bind");
        let (_a, mut a_rx) = e.register("aaaa");
        let (b, mut b_rx) = e.register("bbbb");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        // Unknown source, not a check for us: dropped.
        client.send_to(b"hello", e.udp_addr()).await.expect("send");
        // A check for b: b gets it, and later packets from that source too.
        client
            .send_to(&binding_request("bbbb:x"), e.udp_addr())
            .await
            .expect("send");
        client.send_to(b"media", e.udp_addr()).await.expect("send");
        let first = within(b_rx.recv()).await.expect("check");
        assert_eq!(first.proto, Protocol::Udp);
        // str0m matches packets to candidates: they arrive "at" the advertised one.
        assert_eq!(
            first.destination,
            SocketAddr::new(cfg.advertise, e.udp_addr().port())
        );
        let media = within(b_rx.recv()).await.expect("media");
        assert_eq!(media.data, b"media");
        assert!(a_rx.try_recv().is_err());
        // Over ICE-TCP, with RFC 4571 framing.
        let mut tcp = TcpStream::connect(e.tcp_addr()).await.expect("connect");
        let check = binding_request("aaaa:y");
        let mut framed = (check.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&check);
        tcp.write_all(&framed).await.expect("write");
        let got = within(a_rx.recv()).await.expect("tcp check");
        assert_eq!(got.proto, Protocol::Tcp);
        assert_eq!(got.destination.ip(), cfg.advertise);
        assert_eq!(got.data, check);
        // Replies go back framed on the same connection.
        e.send(Protocol::Tcp, got.source, b"reply");
        let len = tcp.read_u16().await.expect("len");
        let mut reply = vec![0u8; usize::from(len)];
        tcp.read_exact(&mut reply).await.expect("reply");
        assert_eq!(reply, b"reply");
        // A forgotten peer gets nothing more.
        drop(b);
        client.send_to(b"late", e.udp_addr()).await.expect("send");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(b_rx.try_recv().is_err());
        let candidates = e.candidates();
        assert_eq!(candidates.len(), 2);
        assert!(candidates.iter().all(|c| c.addr().ip() == cfg.advertise));
    }

    fn limited(limits: TcpLimits) -> EndpointConfig {
        EndpointConfig {
            bind: "127.0.0.1".parse().expect("ip"),
            udp_port: 0,
            tcp_port: 0,
            advertise: "127.0.0.1".parse().expect("ip"),
            copies_kbps: 0,
            tcp_limits: limits,
            adaptive_bitrate: false,
        }
    }

    /// A connection from `from` (any 127/8 address); open once accepted.
    async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(from.parse().expect("ip"), 0))
            .expect("bind");
        sock.connect(to).await.expect("connect")
    }

    /// Whether the server closed `tcp` within `wait`.
    async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, tcp.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    async fn settle(e: &Endpoint, want: usize) {
        for _ in 0..100 {
            if e.tcp_connections() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(e.tcp_connections(), want);
    }

    #[tokio::test]
    async fn ice_tcp_connections_are_capped_and_silent_ones_closed() {
        let e = Endpoint::start(&limited(TcpLimits {
            max_connections: 6,
            max_per_ip: 4,
            first_frame: Duration::from_millis(700),
            idle: Duration::from_millis(1500),
        }))
        .await
        .expect("bind");
        let (_peer, mut rx) = e.register("peer");
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(connect_from("127.0.0.1", e.tcp_addr()).await);
        }
        settle(&e, 4).await;
        // A fifth from the same address: closed at once.
        let mut extra = connect_from("127.0.0.1", e.tcp_addr()).await;
        assert!(closed_within(&mut extra, Duration::from_millis(300)).await);
        // Others may come up to the total.
        for _ in 0..2 {
            held.push(connect_from("127.0.0.2", e.tcp_addr()).await);
        }
        settle(&e, 6).await;
        let mut over = connect_from("127.0.0.3", e.tcp_addr()).await;
        assert!(closed_within(&mut over, Duration::from_millis(300)).await);

        // One of them checks in: it outlives the first-frame deadline.
        let check = binding_request("peer:x");
        let mut framed = (check.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&check);
        held[0].write_all(&framed).await.expect("write");
        within(rx.recv()).await.expect("check delivered");
        let checked = Instant::now();
        // A frame's length and half of it, then nothing: still closed at the deadline.
        held[1].write_all(&[0x00, 0x40, 1, 2]).await.expect("write");
        for tcp in held.iter_mut().skip(1) {
            assert!(closed_within(tcp, Duration::from_millis(1500)).await);
        }
        settle(&e, 1).await;
        // The peer's connection ends when it has been silent for the idle time.
        assert!(closed_within(&mut held[0], Duration::from_secs(4)).await);
        assert!(
            checked.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            checked.elapsed()
        );
        settle(&e, 0).await;
        // Places are given back: new connections are taken again.
        let _again = connect_from("127.0.0.1", e.tcp_addr()).await;
        settle(&e, 1).await;
    }

    /// CPU time this process has used (user + system), from its
    /// `/proc/self/stat`, opened beforehand (there may be no descriptor left).
    fn cpu_time(stat: &mut std::fs::File) -> Duration {
        use std::io::{Read, Seek};
        let mut text = String::new();
        stat.rewind().expect("rewind");
        stat.read_to_string(&mut text).expect("stat");
        let stat = text;
        let after = stat.rsplit_once(')').expect("comm").1;
        let f: Vec<u64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // Fields 14 and 15 (utime, stime) in clock ticks of 1/100 s.
        Duration::from_millis((f[11] + f[12]) * 10)
    }

    /// Out of descriptors, a pending connection cannot be accepted; the
    /// accept loop must wait, not spin (it took a whole core before).
    /// nextest runs each test in its own process, so the lowered limit stays here.
    #[tokio::test]
    async fn accept_errors_back_off() {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let e = Endpoint::start(&limited(TcpLimits::default()))
            .await
            .expect("bind");
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        let mut stat = std::fs::File::open("/proc/self/stat").expect("stat");
        let before = getrlimit(Resource::Nofile);
        let open = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
        let low = Rlimit {
            current: Some(open.saturating_sub(1)),
            maximum: before.maximum,
        };
        setrlimit(Resource::Nofile, low).expect("lower");
        let _client = sock.connect(e.tcp_addr()).await.expect("connect");
        let cpu = cpu_time(&mut stat);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = cpu_time(&mut stat) - cpu;
        setrlimit(Resource::Nofile, before).expect("restore");
        assert!(
            used < Duration::from_millis(300),
            "accept spun: {used:?} of CPU in 2 s"
        );
        // With descriptors back, the connection is taken within the pause.
        settle(&e, 1).await;
    }
}
