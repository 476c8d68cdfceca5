//! The network side of WebRTC: one UDP socket and one ICE-TCP listener shared
//! by every peer connection, and the routing of each arriving packet to its
//! peer. A packet from a known source goes to the peer that source belongs to;
//! a STUN binding request from a new source names the peer in its USERNAME
//! (`<our ufrag>:<their ufrag>`), and that source is remembered for the peer.
//! ICE-TCP frames packets with a 16-bit length (RFC 4571).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
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

#[derive(Debug)]
pub struct Endpoint {
    udp: Arc<UdpSocket>,
    udp_local: SocketAddr,
    tcp_local: SocketAddr,
    advertise: IpAddr,
    copies_kbps: u32,
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

async fn accept_tcp(listener: TcpListener, endpoint: std::sync::Weak<Endpoint>) {
    loop {
        let Ok((stream, source)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_tcp(stream, source, endpoint.clone()));
    }
}

/// One ICE-TCP connection: frames in go to the peer, frames out come from it.
async fn serve_tcp(stream: TcpStream, source: SocketAddr, endpoint: std::sync::Weak<Endpoint>) {
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
    let mut buf = vec![0u8; u16::MAX as usize];
    while let Ok(len) = rd.read_u16().await {
        let frame = &mut buf[..usize::from(len)];
        if rd.read_exact(frame).await.is_err() {
            break;
        }
        let Some(e) = endpoint.upgrade() else { break };
        let known = e.lock().by_source.contains_key(&(Protocol::Tcp, source));
        let delivered = e.deliver(Packet {
            proto: Protocol::Tcp,
            source,
            destination: local,
            data: frame.to_vec(),
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
}
