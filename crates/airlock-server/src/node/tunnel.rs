//! Loopback ends of pipes to guests behind a remote node. The control plane
//! reaches a guest's agent and VNC server by dialing a `SocketAddr`; for a
//! guest on another host that address is a listener on 127.0.0.1 here, and
//! each connection accepted there asks the node to `dial` the guest (an HTTP
//! upgrade, see [`super::wire`]) and then copies bytes both ways. So the HTTP
//! client to the agent, the RFB relay and the stream puller work unchanged.
//!
//! One listener per (node, guest address and port), reused for as long as a
//! sandbox that uses it lives; [`Tunnels::forget`] closes the listener and
//! every pipe through it once no sandbox uses it any more, and
//! [`Tunnels::sweep`] closes listeners nobody used for a while (a sandbox
//! another replica destroyed is never forgotten here otherwise).

use super::wire::DIAL_PROTOCOL;
use super::NodeError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{self, HeaderValue};
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long a pipe may take to be set up through the node.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Copy buffers per direction: a video frame or a screen update in few reads.
const PIPE_BUFFER: usize = 64 * 1024;

/// Once one direction of a pipe has ended, how long the other may go on. A
/// half-closed connection is legal, but a guest that vanished with its
/// sandbox never closes its side, and its pipe must not live for ever.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Copy `a` to `b` and `b` to `a`, passing each end's close on as a
/// write shutdown, until both directions ended (or the second outlived
/// [`HALF_CLOSE_GRACE`]). Both sides of a tunnel use it: the replica between
/// the local connection and the upgraded one, the node between the upgraded
/// one and the guest.
pub(crate) async fn splice<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let there = one_way(&mut ar, &mut bw);
    let back = one_way(&mut br, &mut aw);
    tokio::pin!(there, back);
    tokio::select! {
        _ = &mut there => { let _ = tokio::time::timeout(HALF_CLOSE_GRACE, back).await; }
        _ = &mut back => { let _ = tokio::time::timeout(HALF_CLOSE_GRACE, there).await; }
    }
}

async fn one_way<R, W>(r: &mut R, w: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PIPE_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
    }
}

/// How to reach one node's `dial` route.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// The node's name, for messages.
    pub name: String,
    pub addr: SocketAddr,
    pub token: SecretString,
}

impl Dialer {
    /// A connection to `guest` through the node, with `TCP_NODELAY` on the
    /// way to the node (the node sets it on its side and towards the guest).
    pub async fn dial(
        &self,
        guest: SocketAddr,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
        tokio::time::timeout(DIAL_TIMEOUT, self.dial_now(guest))
            .await
            .unwrap_or_else(|_| Err(format!("no pipe within {} s", DIAL_TIMEOUT.as_secs())))
            .map_err(|why| format!("node {} at {}: dial {guest}: {why}", self.name, self.addr))
    }

    async fn dial_now(
        &self,
        guest: SocketAddr,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut auth = HeaderValue::try_from(format!("Bearer {}", self.token.expose_secret()))
            .map_err(|_| "the node token is not a valid header value".to_owned())?;
        auth.set_sensitive(true);
        let req = hyper::Request::get(format!("/node/v1/dial?to={guest}"))
            .header(header::HOST, self.addr.to_string())
            .header(header::AUTHORIZATION, auth)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, DIAL_PROTOCOL)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 16 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<super::wire::WireErrorBody>(&body)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(format!("refused ({status}): {message}"));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| e.to_string())?;
        Ok(TokioIo::new(upgraded))
    }
}

/// One loopback listener and the sandboxes that use it.
#[derive(Debug)]
struct Entry {
    local: SocketAddr,
    ids: BTreeSet<String>,
    use_: Arc<Use>,
    /// Dropped with the entry: the listener and its pipes see it and end.
    _open: watch::Sender<()>,
}

/// Whether a listener is in use: pipes open through it, and when it was
/// last handed out or connected to.
#[derive(Debug)]
struct Use {
    pipes: AtomicUsize,
    last: Mutex<Instant>,
}

impl Use {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.pipes.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed(),
        )
    }
}

/// Counts a pipe while it lives.
struct PipeGuard(Arc<Use>);

impl Drop for PipeGuard {
    fn drop(&mut self) {
        self.0.pipes.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// The loopback listeners of tunnels, by (node, guest address and port).
#[derive(Debug, Default)]
pub struct Tunnels {
    entries: Mutex<HashMap<(SocketAddr, SocketAddr), Entry>>,
}

impl Tunnels {
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loopback address whose connections reach `guest` through the
    /// node of `dialer`, for sandbox `id`; the same one for as long as a
    /// sandbox uses it. Must run inside a Tokio runtime.
    pub fn open(
        &self,
        id: &str,
        dialer: &Dialer,
        guest: SocketAddr,
    ) -> Result<SocketAddr, NodeError> {
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(&(dialer.addr, guest)) {
            e.ids.insert(id.to_owned());
            e.use_.touch();
            return Ok(e.local);
        }
        let failed = |e: std::io::Error| {
            NodeError::Failed(format!(
                "a loopback listener for the tunnel to {guest}: {e}"
            ))
        };
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(failed)?;
        std_listener.set_nonblocking(true).map_err(failed)?;
        let local = std_listener.local_addr().map_err(failed)?;
        let listener = TcpListener::from_std(std_listener).map_err(failed)?;
        let (open, closed) = watch::channel(());
        let use_ = Arc::new(Use {
            pipes: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        });
        tokio::spawn(accept(
            listener,
            dialer.clone(),
            guest,
            closed,
            use_.clone(),
        ));
        entries.insert(
            (dialer.addr, guest),
            Entry {
                local,
                ids: BTreeSet::from([id.to_owned()]),
                use_,
                _open: open,
            },
        );
        Ok(local)
    }

    /// Sandbox `id` is gone: close the listeners only it used, and their pipes.
    pub fn forget(&self, id: &str) {
        self.entries().retain(|_, e| {
            e.ids.remove(id);
            !e.ids.is_empty()
        });
    }

    /// Close the listeners with no pipe open that were neither handed out
    /// nor connected to for `idle`; how many. Run it now and then: a later
    /// `open` for the same guest makes a new listener.
    pub fn sweep(&self, idle: Duration) -> usize {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|_, e| e.use_.idle_for().is_none_or(|d| d < idle));
        before - entries.len()
    }

    /// How many listeners are open (for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn accept(
    listener: TcpListener,
    dialer: Dialer,
    guest: SocketAddr,
    mut closed: watch::Receiver<()>,
    use_: Arc<Use>,
) {
    loop {
        tokio::select! {
            _ = closed.changed() => return,
            got = listener.accept() => match got {
                Ok((conn, peer)) => {
                    // The tunnel is this process's: another local user of the
                    // host must not reach the guest's ports through it.
                    if !local_peer_is_ours(peer, conn.local_addr().ok()) {
                        tracing::warn!(guest = %guest, %peer, "refused a tunnel connection from another local user");
                        continue;
                    }
                    use_.pipes.fetch_add(1, Ordering::AcqRel);
                    use_.touch();
                    let guard = PipeGuard(use_.clone());
                    tokio::spawn(pipe(conn, dialer.clone(), guest, closed.clone(), guard));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(guest = %guest, error = %e, "tunnel listener could not accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn pipe(
    conn: TcpStream,
    dialer: Dialer,
    guest: SocketAddr,
    mut closed: watch::Receiver<()>,
    _counted: PipeGuard,
) {
    let _ = conn.set_nodelay(true);
    let far = tokio::select! {
        _ = closed.changed() => return,
        far = dialer.dial(guest) => match far {
            Ok(far) => far,
            Err(why) => {
                tracing::warn!(error = %why, "tunnel to a guest could not be opened");
                return;
            }
        },
    };
    tokio::select! {
        _ = closed.changed() => {}
        _ = splice(conn, far) => {}
    }
}

/// Whether the loopback connection from `peer` to `local` belongs to this
/// process's user (or root): its socket's owner in `/proc/net/tcp`. Unknown
/// (the table unreadable, the socket gone) is a refusal.
fn local_peer_is_ours(peer: SocketAddr, local: Option<SocketAddr>) -> bool {
    let (Some(local), Ok(table)) = (local, std::fs::read_to_string("/proc/net/tcp")) else {
        return false;
    };
    let ours = rustix::process::geteuid().as_raw();
    owner_of(&table, peer, local).is_some_and(|uid| uid == ours || uid == 0)
}

/// `/proc/net/tcp`'s address form: the IPv4 address as a little-endian
/// 32-bit hex number, then the port in hex.
fn proc_addr(a: SocketAddr) -> Option<String> {
    let SocketAddr::V4(v4) = a else { return None };
    Some(format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    ))
}

/// The uid owning the socket whose local end is `from` and remote end `to`.
fn owner_of(table: &str, from: SocketAddr, to: SocketAddr) -> Option<u32> {
    let (from, to) = (proc_addr(from)?, proc_addr(to)?);
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&from.as_str()) && f.get(2) == Some(&to.as_str()))
            .then(|| f.get(7)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    #[test]
    fn the_owner_of_a_loopback_connection_is_read_from_the_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:A1B2 0100007F:1F40 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1\n\
   1: 0100007F:1F40 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 12346 1\n";
        let client: SocketAddr = "127.0.0.1:41394".parse().expect("addr");
        let server: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
        assert_eq!(owner_of(table, client, server), Some(1000));
        assert_eq!(owner_of(table, server, client), Some(0));
        let other: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        assert_eq!(owner_of(table, other, server), None);
    }

    /// A connection this process makes is its own; as root, one made by
    /// `nobody` is not.
    #[tokio::test]
    async fn only_this_user_may_use_a_tunnel() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let at = listener.local_addr().expect("addr");
        let _mine = tokio::net::TcpStream::connect(at).await.expect("connect");
        let (conn, peer) = listener.accept().await.expect("accept");
        assert!(local_peer_is_ours(peer, conn.local_addr().ok()));
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let mut other = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--", "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{}; sleep 5", at.port()))
            .spawn()
            .expect("runuser");
        let (conn, peer) =
            tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept())
                .await
                .expect("nobody connected")
                .expect("accept");
        assert!(
            !local_peer_is_ours(peer, conn.local_addr().ok()),
            "nobody was let in"
        );
        let _ = other.kill();
        let _ = other.wait();
    }
}
