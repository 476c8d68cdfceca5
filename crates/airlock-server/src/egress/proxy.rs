//! One sandbox's forward proxy. HTTP/1.1 parsing and framing are hyper's, on
//! both sides: the sandbox's client talks to a hyper server connection, and we
//! talk to the upstream proxy through a hyper client connection.
//!
//! ```text
//! guest ──CONNECT h:p──▶ listener ──CONNECT h:p + Proxy-Authorization──▶ upstream
//!       ◀── 200 ───────────────── ◀── 2xx ──────────────────────────────
//!       ◀══════════ bytes both ways, bounded buffers, counted ═════════▶
//!
//! guest ──GET http://h/x──▶ listener ──GET http://h/x + Proxy-Authorization──▶ upstream
//! ```
//!
//! A target on this host or its sandbox network is refused with `403` before
//! the upstream hears of it (guard.rs): the upstream may well be able to reach
//! our loopback, our control plane or other guests.
//!
//! The upstream's failures (refused, wrong credentials, no answer in time)
//! reach the client at once as `502`/`504` with a plain-text reason, and are
//! kept as the sandbox's last upstream error. A `407` from the upstream is
//! never passed on: the client holds no credentials to offer, and Chromium
//! would show a login prompt for the upstream's realm.

use super::guard::{Guard, Refused, Target};
use super::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

type Body = BoxBody<Bytes, hyper::Error>;
type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a sandbox's traffic goes now. Asked once per client connection (and
/// per plain-HTTP upstream connection), so a changed setting applies to the
/// next connection without restarting the listener.
#[async_trait]
pub trait Resolve: Send + Sync + std::fmt::Debug + 'static {
    /// The upstream to use, or why there is none (told to the client).
    async fn upstream(&self) -> Result<Arc<Upstream>, String>;
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Only this peer may connect (the sandbox's guest address).
    pub allowed_peer: Option<IpAddr>,
    /// To open the TCP connection to the upstream.
    pub connect_timeout: Duration,
    /// For the upstream's response head, after the request was sent.
    pub response_timeout: Duration,
    /// Per direction of a tunnel.
    pub buffer_size: usize,
    /// Client connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Destinations refused besides the fixed ones (the sandbox pool).
    pub guard: Guard,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            allowed_peer: None,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            buffer_size: 16 * 1024,
            max_connections: 512,
            guard: Guard::default(),
        }
    }
}

/// What one listener saw. The counters are shared with the metrics registry.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read from the sandbox (requests, uploads, TLS from the client).
    pub bytes_out: Counter,
    /// Bytes written to the sandbox.
    pub bytes_in: Counter,
    pub connections: Counter,
    pub upstream_failures: Counter,
    /// Requests refused for their destination, by reason (shared by every
    /// listener: no sandbox label).
    pub refused: Family<RefusedLabel, Counter>,
    health: Mutex<Health>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub reason: String,
}

/// The upstream as this listener last found it (unix milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub last_ok_ms: Option<i64>,
    pub last_error: Option<(i64, String)>,
}

impl Health {
    /// True when the latest thing the upstream did was fail.
    pub fn failing(&self) -> bool {
        match (&self.last_error, self.last_ok_ms) {
            (Some((at, _)), Some(ok)) => *at >= ok,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

impl Stats {
    /// Stats whose counters are shared with someone else (the metrics registry).
    pub fn with_counters(
        bytes_out: Counter,
        bytes_in: Counter,
        connections: Counter,
        upstream_failures: Counter,
    ) -> Self {
        Stats {
            bytes_out,
            bytes_in,
            connections,
            upstream_failures,
            refused: Family::default(),
            health: Mutex::default(),
        }
    }

    /// Count refusals into `family` (the metrics registry's).
    pub fn with_refused(mut self, family: Family<RefusedLabel, Counter>) -> Self {
        self.refused = family;
        self
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn ok(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.last_ok_ms = Some(crate::store::now_ms());
    }
    fn failed(&self, message: &str) {
        self.upstream_failures.inc();
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.last_error = Some((crate::store::now_ms(), message.to_owned()));
    }
}

#[derive(Debug, Clone)]
struct Ctx {
    cfg: ProxyConfig,
    resolve: Arc<dyn Resolve>,
    stats: Arc<Stats>,
}

/// Accept and serve until the task is dropped or aborted; every connection
/// (tunnels included) lives inside this task and ends with it.
pub async fn serve(
    listener: TcpListener,
    cfg: ProxyConfig,
    resolve: Arc<dyn Resolve>,
    stats: Arc<Stats>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    let ctx = Ctx {
        cfg,
        resolve,
        stats,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of descriptors and the like: do not spin.
                        tracing::warn!(error = %e, "egress proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if ctx.cfg.allowed_peer.is_some_and(|ip| ip != peer.ip()) {
                    tracing::warn!(%peer, "egress proxy refused a connection from outside its sandbox");
                    continue;
                }
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "egress proxy is at its connection limit");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                ctx.stats.connections.inc();
                let ctx = ctx.clone();
                conns.spawn(async move {
                    connection(tcp, ctx).await;
                    drop(permit);
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn connection(tcp: TcpStream, ctx: Ctx) {
    let io = TokioIo::new(Counted {
        inner: tcp,
        read: ctx.stats.bytes_out.clone(),
        written: ctx.stats.bytes_in.clone(),
    });
    let tunnel: Arc<Mutex<Option<Tunnel>>> = Arc::default();
    let pooled: Arc<tokio::sync::Mutex<Option<client::SendRequest<Incoming>>>> = Arc::default();
    let svc = {
        let (ctx, tunnel) = (ctx.clone(), tunnel.clone());
        hyper::service::service_fn(move |req| {
            let (ctx, tunnel, pooled) = (ctx.clone(), tunnel.clone(), pooled.clone());
            async move {
                let resp = if req.method() == Method::CONNECT {
                    connect(req, &ctx, &tunnel).await
                } else {
                    forward(req, &ctx, &pooled).await
                };
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .preserve_header_case(true)
        .serve_connection(io, svc)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "egress client connection ended with an error");
    }
    // A CONNECT that succeeded hands the connection over to its tunnel.
    let pending = tunnel.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(tunnel) = pending {
        tunnel.await;
    }
}

async fn connect(
    mut req: Request<Incoming>,
    ctx: &Ctx,
    tunnel: &Mutex<Option<Tunnel>>,
) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return reply(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let Some(port) = authority.port_u16() else {
        return reply(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let up = match ctx.resolve.upstream().await {
        Ok(up) => up,
        Err(why) => return reply(StatusCode::BAD_GATEWAY, &why),
    };
    let target = match guard(ctx, &up, "CONNECT", authority.host(), port).await {
        Ok(target) => target.authority(port),
        Err(resp) => return resp,
    };
    let (mut sender, _conn) = match open(&up, ctx).await {
        Ok(pair) => pair,
        Err(resp) => return resp,
    };
    let upreq = Request::builder()
        .method(Method::CONNECT)
        .uri(target.as_str())
        .header(header::HOST, target.as_str())
        .header(header::PROXY_AUTHORIZATION, up.authorization())
        .body(Empty::<Bytes>::new());
    let Ok(upreq) = upreq else {
        return reply(
            StatusCode::BAD_REQUEST,
            "CONNECT target is not a valid authority",
        );
    };
    let resp = match timeout(ctx.cfg.response_timeout, sender.send_request(upreq)).await {
        Err(_) => return no_answer(ctx, &up),
        Ok(Err(e)) => return dropped(ctx, &up, &e),
        Ok(Ok(resp)) => resp,
    };
    if !resp.status().is_success() {
        let why = refused(&up, resp.status(), &format!("CONNECT {authority}"));
        return fail(ctx, StatusCode::BAD_GATEWAY, &why);
    }
    ctx.stats.ok();
    let client_side = hyper::upgrade::on(&mut req);
    let buffer = ctx.cfg.buffer_size;
    let relay: Tunnel = Box::pin(async move {
        let (Ok(client_io), Ok(upstream_io)) = (client_side.await, hyper::upgrade::on(resp).await)
        else {
            return;
        };
        let (mut a, mut b) = (TokioIo::new(client_io), TokioIo::new(upstream_io));
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, buffer, buffer).await;
    });
    *tunnel.lock().unwrap_or_else(|p| p.into_inner()) = Some(relay);
    Response::new(empty())
}

async fn forward(
    req: Request<Incoming>,
    ctx: &Ctx,
    pooled: &tokio::sync::Mutex<Option<client::SendRequest<Incoming>>>,
) -> Response<Body> {
    let uri = req.uri().clone();
    let Some(authority) = uri.authority().cloned() else {
        return reply(
            StatusCode::BAD_REQUEST,
            "this is a proxy: send absolute http:// URLs, or CONNECT host:port",
        );
    };
    if uri.scheme_str() != Some("http") {
        return reply(
            StatusCode::BAD_REQUEST,
            "only http:// URLs are forwarded as requests; use CONNECT for anything else",
        );
    }
    let up = match ctx.resolve.upstream().await {
        Ok(up) => up,
        Err(why) => return reply(StatusCode::BAD_GATEWAY, &why),
    };
    let port = authority.port_u16().unwrap_or(80);
    let method = req.method().clone();
    let target = match guard(ctx, &up, method.as_str(), authority.host(), port).await {
        // The port as the client wrote it (none for the default).
        Ok(target) => match authority.port_u16() {
            Some(port) => target.authority(port),
            None => target.host(),
        },
        Err(resp) => return resp,
    };
    let (mut parts, body) = req.into_parts();
    // The upstream goes where we checked; `Host` keeps the name.
    let mut uri = hyper::http::uri::Parts::from(parts.uri.clone());
    uri.authority = target.parse().ok();
    match hyper::Uri::from_parts(uri) {
        Ok(pinned) if pinned.authority().is_some() => parts.uri = pinned,
        _ => return reply(StatusCode::BAD_REQUEST, "the URL's host is not valid"),
    }
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::PROXY_AUTHORIZATION, up.authorization());
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    }
    let upreq = Request::from_parts(parts, body);

    let mut slot = pooled.lock().await;
    let reusable = match slot.as_mut() {
        Some(sender) => matches!(
            timeout(Duration::from_millis(50), sender.ready()).await,
            Ok(Ok(()))
        ),
        None => false,
    };
    if !reusable {
        match open(&up, ctx).await {
            Ok((sender, _conn)) => *slot = Some(sender),
            Err(resp) => return resp,
        }
    }
    let Some(sender) = slot.as_mut() else {
        return reply(StatusCode::BAD_GATEWAY, "no upstream connection");
    };
    let resp = match timeout(ctx.cfg.response_timeout, sender.send_request(upreq)).await {
        Err(_) => {
            *slot = None;
            return no_answer(ctx, &up);
        }
        Ok(Err(e)) => {
            *slot = None;
            return dropped(ctx, &up, &e);
        }
        Ok(Ok(resp)) => resp,
    };
    if resp.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        *slot = None;
        let why = refused(&up, resp.status(), &format!("GET {authority}"));
        return fail(ctx, StatusCode::BAD_GATEWAY, &why);
    }
    ctx.stats.ok();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// A fresh connection to the upstream proxy; its driver runs on its own task
/// and ends when the connection does.
async fn open<B>(
    up: &Upstream,
    ctx: &Ctx,
) -> Result<(client::SendRequest<B>, tokio::task::JoinHandle<()>), Response<Body>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = match timeout(ctx.cfg.connect_timeout, TcpStream::connect(up.authority())).await {
        Err(_) => {
            let why = format!(
                "the upstream proxy {} did not accept a connection within {}s",
                up.masked(),
                ctx.cfg.connect_timeout.as_secs_f32()
            );
            return Err(fail(ctx, StatusCode::GATEWAY_TIMEOUT, &why));
        }
        Ok(Err(e)) => {
            let why = format!("could not reach the upstream proxy {}: {e}", up.masked());
            return Err(fail(ctx, StatusCode::BAD_GATEWAY, &why));
        }
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let handshake = client::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(tcp))
        .await;
    let (sender, conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => return Err(dropped(ctx, up, &e)),
    };
    let driver = tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok((sender, driver))
}

/// The checked destination, or the client's `403` (`400` for a host that is
/// not one), counted.
async fn guard(
    ctx: &Ctx,
    up: &Upstream,
    what: &str,
    host: &str,
    port: u16,
) -> Result<Target, Response<Body>> {
    let checked = match ctx.cfg.guard.check(host, port).await {
        Ok(Target::Name(_)) if ctx.cfg.guard.near(&up.host).await => Err(Some(Refused {
            reason: super::Refusal::Unresolved,
            addr: None,
        })),
        other => other,
    };
    match checked {
        Ok(target) => Ok(target),
        Err(None) => Err(reply(
            StatusCode::BAD_REQUEST,
            &format!("{host:?} is not a host name or address"),
        )),
        Err(Some(Refused { reason, addr })) => {
            ctx.stats
                .refused
                .get_or_create(&RefusedLabel {
                    reason: reason.label().to_owned(),
                })
                .inc();
            let resolved = match addr {
                Some(ip) if ip.to_string() != host.trim_matches(['[', ']']) => {
                    format!(" ({host} is {ip})")
                }
                _ => String::new(),
            };
            tracing::info!(
                host,
                port,
                reason = reason.label(),
                "egress refused a destination"
            );
            Err(reply(
                StatusCode::FORBIDDEN,
                &format!(
                    "{what} {host}:{port} refused: the destination{resolved} is {}; \
                     a sandbox may not reach the airlock host or its network through this proxy",
                    reason.describe()
                ),
            ))
        }
    }
}

fn refused(up: &Upstream, status: StatusCode, what: &str) -> String {
    let reason = status.canonical_reason().unwrap_or("");
    let hint = if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        " (it refused the credentials)"
    } else {
        ""
    };
    format!(
        "the upstream proxy {} answered {} {reason} to {what}{hint}",
        up.masked(),
        status.as_u16()
    )
}

fn no_answer(ctx: &Ctx, up: &Upstream) -> Response<Body> {
    let why = format!(
        "the upstream proxy {} did not answer within {}s",
        up.masked(),
        ctx.cfg.response_timeout.as_secs_f32()
    );
    fail(ctx, StatusCode::GATEWAY_TIMEOUT, &why)
}

fn dropped(ctx: &Ctx, up: &Upstream, e: &hyper::Error) -> Response<Body> {
    let why = format!(
        "the upstream proxy {} broke off the exchange: {e}",
        up.masked()
    );
    fail(ctx, StatusCode::BAD_GATEWAY, &why)
}

fn fail(ctx: &Ctx, status: StatusCode, why: &str) -> Response<Body> {
    tracing::info!(reason = why, "egress upstream failure");
    ctx.stats.failed(why);
    reply(status, why)
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A short plain-text answer of our own; the connection closes after it.
fn reply(status: StatusCode, message: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("airlock egress: {message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Headers that belong to one hop, including any the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
    headers.remove("keep-alive");
}

/// A stream that counts what passes through it.
struct Counted<S> {
    inner: S,
    read: Counter,
    written: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            self.read.inc_by((buf.filled().len() - before) as u64);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.written.inc_by(n as u64);
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.written.inc_by(n as u64);
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9v"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn health_says_failing_only_after_the_latest_error() {
        let mut h = Health::default();
        assert!(!h.failing());
        h.last_error = Some((10, "x".into()));
        assert!(h.failing());
        h.last_ok_ms = Some(11);
        assert!(!h.failing());
    }

    /// An upstream that accepts every request (CONNECT gets 200, anything
    /// else 204) and remembers each request line.
    async fn recording_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut rd = BufReader::new(tcp);
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let first = line.trim_end().to_owned();
                        loop {
                            let mut h = String::new();
                            if rd.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        let answer: &[u8] = if first.starts_with("CONNECT") {
                            b"HTTP/1.1 200 OK\r\n\r\n"
                        } else {
                            b"HTTP/1.1 204 No Content\r\n\r\n"
                        };
                        log.lock().expect("log").push(first);
                        if rd.get_mut().write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[derive(Debug)]
    struct Fixed(Arc<Upstream>);
    #[async_trait]
    impl Resolve for Fixed {
        async fn upstream(&self) -> Result<Arc<Upstream>, String> {
            Ok(self.0.clone())
        }
    }

    /// One request on a fresh connection; the status code of the answer.
    async fn ask(proxy: std::net::SocketAddr, head: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(proxy).await.expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = timeout(Duration::from_secs(10), tcp.read(&mut buf))
                .await
                .expect("answer in time")
                .expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        // The body (our own replies are short and sent at once).
        if let Ok(Ok(n)) = timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, text)
    }

    #[tokio::test]
    async fn this_host_and_the_sandbox_network_are_refused_before_the_upstream() {
        let (up_addr, seen) = recording_upstream().await;
        let up = Upstream::parse(&format!("http://u:p@{up_addr}")).expect("upstream");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy = listener.local_addr().expect("addr");
        let cfg = ProxyConfig {
            guard: Guard::default().with_pool(std::net::Ipv4Addr::new(10, 244, 0, 0), 16),
            ..ProxyConfig::default()
        };
        let stats = Arc::new(Stats::default());
        let server = tokio::spawn(serve(
            listener,
            cfg,
            Arc::new(Fixed(Arc::new(up))),
            stats.clone(),
        ));
        // The control plane (the proxy's own port stands in for it), the
        // upstream itself, the gateway and other guests, and the cloud
        // metadata address, however they are spelled.
        let cp = proxy.port();
        let refused = [
            format!("CONNECT 127.0.0.1:{cp} HTTP/1.1\r\nHost: 127.0.0.1:{cp}\r\n\r\n"),
            format!("CONNECT localhost:{cp} HTTP/1.1\r\n\r\n"),
            format!("CONNECT 127.1:{cp} HTTP/1.1\r\n\r\n"),
            format!("CONNECT 2130706433:{cp} HTTP/1.1\r\n\r\n"),
            format!("CONNECT [::1]:{cp} HTTP/1.1\r\n\r\n"),
            format!("CONNECT [::ffff:127.0.0.1]:{cp} HTTP/1.1\r\n\r\n"),
            format!("CONNECT {up_addr} HTTP/1.1\r\n\r\n"),
            "CONNECT 10.244.0.1:4000 HTTP/1.1\r\n\r\n".to_owned(),
            "CONNECT 10.244.7.2:7000 HTTP/1.1\r\n\r\n".to_owned(),
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n".to_owned(),
            "CONNECT 0.0.0.0:80 HTTP/1.1\r\n\r\n".to_owned(),
            format!("GET http://127.0.0.1:{cp}/api/v1/sandboxes HTTP/1.1\r\nHost: 127.0.0.1:{cp}\r\n\r\n"),
            format!("GET http://localhost:{cp}/ HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            "GET http://10.244.0.1:4000/ HTTP/1.1\r\nHost: 10.244.0.1\r\n\r\n".to_owned(),
            "GET http://[fe80::1]/ HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
            // This upstream is on loopback: a name we cannot check could be ours.
            "CONNECT no-such-name.invalid:443 HTTP/1.1\r\n\r\n".to_owned(),
        ];
        for head in &refused {
            let (code, text) = ask(proxy, head).await;
            assert_eq!(code, 403, "{head:?} → {text}");
            assert!(text.contains("may not reach the airlock host"), "{text}");
            assert!(!text.contains("upstream proxy http"), "{text}");
        }
        // A non-loopback address of this host (the control plane listens on
        // them too when bound to 0.0.0.0), when it has one.
        let own: Vec<IpAddr> = std::fs::read_to_string("/proc/net/fib_trie")
            .map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().strip_prefix("|-- "))
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut host_checked = 0;
        for ip in own.iter().filter(|ip| !ip.is_loopback()) {
            if Guard::default().check_addr(*ip) == Some(super::super::Refusal::Host) {
                let (code, text) = ask(proxy, &format!("CONNECT {ip}:{cp} HTTP/1.1\r\n\r\n")).await;
                assert_eq!(code, 403, "{ip}: {text}");
                host_checked += 1;
            }
        }
        assert!(
            seen.lock().expect("log").is_empty(),
            "the upstream heard of a refused target: {:?}",
            seen.lock().expect("log")
        );
        let count = |reason: &str| {
            stats
                .refused
                .get_or_create(&RefusedLabel {
                    reason: reason.into(),
                })
                .get()
        };
        assert_eq!(count("loopback"), 9);
        assert_eq!(count("sandbox_pool"), 3);
        assert_eq!(count("link_local"), 2);
        assert_eq!(count("not_a_host"), 1);
        assert_eq!(count("host_address"), host_checked);
        assert_eq!(count("unresolved"), 1);

        // Elsewhere is passed on, by address.
        let (code, text) = ask(proxy, "CONNECT 192.0.2.200:443 HTTP/1.1\r\n\r\n").await;
        assert_eq!(code, 200, "{text}");
        let (code, text) = ask(
            proxy,
            "GET http://192.0.2.200/x?y HTTP/1.1\r\nHost: site.example\r\n\r\n",
        )
        .await;
        assert_eq!(code, 204, "{text}");
        let seen = seen.lock().expect("log").clone();
        assert_eq!(
            seen,
            vec![
                "CONNECT 192.0.2.200:443 HTTP/1.1".to_owned(),
                "GET http://192.0.2.200/x?y HTTP/1.1".to_owned(),
            ]
        );
        server.abort();
    }
}
