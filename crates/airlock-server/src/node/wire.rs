//! The node's HTTP API: what an `airlock node` process serves so that the
//! control plane's replicas can drive its sandboxes over the network. Every
//! [`Node`] and [`NodeEgress`] call is one JSON route; a [`NodeError`] travels
//! as data and the caller ([`super::remote::RemoteNode`]) gets the same
//! variant back. One more route, `dial`, upgrades its connection to a raw
//! TCP pipe to a guest's agent or VNC port, so that the replica reaches guests
//! that only the node can route to. It is confined to guest addresses and
//! the two guest ports: the node is never an open proxy.
//!
//! Every route needs the cluster's node token (`Authorization: Bearer`),
//! compared in constant time; nothing runs before it matched.

use super::{CreateSandbox, EgressBinding, Node, NodeEgress, NodeError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Request bodies are small JSON documents; a create with its metadata is a
/// few KiB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The longest `wait_ready` or `stop` grace a caller may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The `Upgrade:` protocol of the `dial` route.
pub const DIAL_PROTOCOL: &str = "airlock-tcp";

/// How long the node tries to reach a guest port for a `dial`.
const DIAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest sandbox id the node takes (ids are 12 hex digits today).
const MAX_ID_LEN: usize = 64;

/// What the node's API serves with.
#[derive(Debug)]
pub struct WireState {
    pub node: Arc<dyn Node>,
    pub egress: Arc<dyn NodeEgress>,
    /// The cluster's node token (its `Debug` is redacted).
    pub token: SecretString,
    /// The address pool guests live in, as (base, prefix length): the only
    /// addresses `dial` connects to.
    pub guest_net: (Ipv4Addr, u8),
    /// This node's name in the cluster.
    pub name: String,
}

/// `GET /node/v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub name: String,
    /// The node's driver (`nspawn`, `qemu`, `firecracker`, `fake`).
    pub backend: String,
}

/// `POST /node/v1/sandboxes/{id}/wait_ready`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitReadyBody {
    pub timeout_ms: u64,
}

/// `POST /node/v1/sandboxes/{id}/stop`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    pub grace_ms: u64,
}

/// Every error answer: the project's `{"error":{"code","message"}}`, and for
/// a failed node call the [`NodeError`] itself, so the caller gets it back
/// as the same variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireErrorBody {
    pub error: WireErrorDetail,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_error: Option<NodeError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireErrorDetail {
    /// `bad_request`, `unauthorized`, `forbidden`, `no_route`, `too_large`,
    /// `bad_gateway`, or for a node call: `not_found`, `transient`,
    /// `timeout`, `guest_exited`, `failed`.
    pub code: String,
    pub message: String,
}

/// The status a [`NodeError`] travels with (the caller maps it back).
pub fn node_error_status(e: &NodeError) -> (StatusCode, &'static str) {
    match e {
        NodeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        NodeError::Transient(_) => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
        NodeError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        NodeError::GuestExited(_) => (StatusCode::CONFLICT, "guest_exited"),
        NodeError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
    }
}

/// Why the node's API refused or failed a request.
#[derive(Debug)]
enum WireError {
    BadRequest(String),
    Unauthorized,
    Forbidden(String),
    NoRoute,
    TooLarge,
    BadGateway(String),
    Node(NodeError),
}

impl IntoResponse for WireError {
    fn into_response(self) -> Response {
        let (status, code, message, node_error) = match self {
            WireError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m, None),
            WireError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong node token".to_owned(),
                None,
            ),
            WireError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m, None),
            WireError::NoRoute => (
                StatusCode::NOT_FOUND,
                "no_route",
                "no such route on this node (is it running the same airlock version?)".to_owned(),
                None,
            ),
            WireError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                None,
            ),
            WireError::BadGateway(m) => (StatusCode::BAD_GATEWAY, "bad_gateway", m, None),
            WireError::Node(e) => {
                let (status, code) = node_error_status(&e);
                (status, code, e.to_string(), Some(e))
            }
        };
        let body = WireErrorBody {
            error: WireErrorDetail {
                code: code.to_owned(),
                message,
            },
            node_error,
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<NodeError> for WireError {
    fn from(e: NodeError) -> Self {
        WireError::Node(e)
    }
}

/// What the handlers share; the token is kept only as its digest.
#[derive(Debug)]
struct Shared {
    node: Arc<dyn Node>,
    egress: Arc<dyn NodeEgress>,
    token_digest: [u8; 32],
    guest_net: (Ipv4Addr, u8),
    name: String,
}

type St = State<Arc<Shared>>;

/// The node's API, to be served with upgrades on (`axum::serve` does; see
/// [`serve`] for the listener with `TCP_NODELAY`).
pub fn router(state: WireState) -> Router {
    let shared = Arc::new(Shared {
        node: state.node,
        egress: state.egress,
        token_digest: Sha256::digest(state.token.expose_secret().as_bytes()).into(),
        guest_net: state.guest_net,
        name: state.name,
    });
    Router::new()
        .route("/node/v1/health", get(health))
        .route("/node/v1/sandboxes", get(list))
        .route(
            "/node/v1/sandboxes/{id}",
            put(create).get(inspect).delete(destroy),
        )
        .route("/node/v1/sandboxes/{id}/start", post(start))
        .route("/node/v1/sandboxes/{id}/wait_ready", post(wait_ready))
        .route("/node/v1/sandboxes/{id}/stop", post(stop))
        .route("/node/v1/sandboxes/{id}/liveness", get(liveness))
        .route("/node/v1/sandboxes/{id}/blocked", get(blocked))
        .route(
            "/node/v1/sandboxes/{id}/egress",
            put(egress_attach).delete(egress_detach),
        )
        .route("/node/v1/sandboxes/{id}/egress/rebind", post(egress_rebind))
        .route("/node/v1/dial", get(dial))
        .fallback(|| async { WireError::NoRoute })
        .method_not_allowed_fallback(|| async { WireError::NoRoute })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// Serve `router` on `listener` with `TCP_NODELAY` on every accepted
/// connection (the `dial` pipes carry keystrokes), until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Equal digests, compared in time that does not depend on where they differ.
fn token_matches(presented: &[u8], expected_digest: &[u8; 32]) -> bool {
    let got: [u8; 32] = Sha256::digest(presented).into();
    got.iter()
        .zip(expected_digest)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn require_token(State(s): St, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if presented.is_empty() || !token_matches(presented, &s.token_digest) {
        tracing::warn!(path = %req.uri().path(), "node API request without a valid node token");
        return WireError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Sandbox ids are short names the drivers build paths and interface names
/// from: letters, digits, `-` and `_`, at most 64 of them.
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn sandbox_id(path: Result<Path<String>, PathRejection>) -> Result<String, WireError> {
    let Path(id) = path.map_err(|_| bad("the sandbox id in the path is not valid"))?;
    if !valid_sandbox_id(&id) {
        return Err(bad(
            "the sandbox id in the path is not valid (1 to 64 letters, digits, '-' or '_')",
        ));
    }
    Ok(id)
}

fn bad(m: &str) -> WireError {
    WireError::BadRequest(m.to_owned())
}

/// A JSON body, whatever the Content-Type says; its errors as ours.
fn body<T: DeserializeOwned>(raw: Result<Bytes, BytesRejection>) -> Result<T, WireError> {
    let raw = raw.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            WireError::TooLarge
        } else {
            WireError::BadRequest(format!("the request body could not be read: {r}"))
        }
    })?;
    serde_json::from_slice(&raw)
        .map_err(|e| WireError::BadRequest(format!("the request body is not valid: {e}")))
}

fn bounded(ms: u64, what: &str) -> Result<Duration, WireError> {
    let d = Duration::from_millis(ms);
    if d > MAX_WAIT {
        return Err(WireError::BadRequest(format!(
            "{what} is at most {} ms",
            MAX_WAIT.as_millis()
        )));
    }
    Ok(d)
}

/// The node call's outcome; a failure is logged here, once, on the node.
fn done<T>(what: &str, id: &str, r: Result<T, NodeError>) -> Result<T, WireError> {
    r.map_err(|e| {
        // An unknown sandbox is an everyday answer (a repeated destroy, a
        // reconciliation), not an incident.
        if matches!(e, NodeError::NotFound(_)) {
            tracing::debug!(call = what, sandbox = %id, error = %e, "node call failed");
        } else {
            tracing::warn!(call = what, sandbox = %id, error = %e, "node call failed");
        }
        WireError::Node(e)
    })
}

async fn health(State(s): St) -> Json<NodeHealth> {
    Json(NodeHealth {
        name: s.name.clone(),
        backend: s.node.name(),
    })
}

async fn list(State(s): St) -> Result<Response, WireError> {
    let all = done("list", "", s.node.list().await)?;
    Ok(Json(all).into_response())
}

async fn create(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, WireError> {
    let id = sandbox_id(path)?;
    let req: CreateSandbox = body(raw)?;
    if req.id != id {
        return Err(bad(
            "the sandbox id in the body differs from the one in the path",
        ));
    }
    done("create", &id, s.node.create(&req).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, WireError> {
    let id = sandbox_id(path)?;
    done("start", &id, s.node.start(&id).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn wait_ready(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, WireError> {
    let id = sandbox_id(path)?;
    let b: WaitReadyBody = body(raw)?;
    let timeout = bounded(b.timeout_ms, "timeout_ms")?;
    let ends = done("wait_ready", &id, s.node.wait_ready(&id, timeout).await)?;
    Ok(Json(ends).into_response())
}

async fn stop(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, WireError> {
    let id = sandbox_id(path)?;
    let b: StopBody = body(raw)?;
    let grace = bounded(b.grace_ms, "grace_ms")?;
    done("stop", &id, s.node.stop(&id, grace).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn destroy(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, WireError> {
    let id = sandbox_id(path)?;
    done("destroy", &id, s.node.destroy(&id).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn inspect(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, WireError> {
    let id = sandbox_id(path)?;
    let i = done("inspect", &id, s.node.inspect(&id).await)?;
    Ok(Json(i).into_response())
}

async fn liveness(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, WireError> {
    let id = sandbox_id(path)?;
    let l = done("liveness", &id, s.node.liveness(&id).await)?;
    Ok(Json(l).into_response())
}

async fn blocked(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, WireError> {
    let id = sandbox_id(path)?;
    let b = done("blocked_packets", &id, s.node.blocked_packets(&id).await)?;
    Ok(Json(b).into_response())
}

fn binding_for(
    path: Result<Path<String>, PathRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<EgressBinding, WireError> {
    let id = sandbox_id(path)?;
    let b: EgressBinding = body(raw)?;
    if b.sandbox_id != id {
        return Err(bad(
            "the sandbox id in the body differs from the one in the path",
        ));
    }
    Ok(b)
}

async fn egress_attach(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, WireError> {
    let b = binding_for(path, raw)?;
    done("egress_attach", &b.sandbox_id, s.egress.attach(&b).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn egress_rebind(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, WireError> {
    let b = binding_for(path, raw)?;
    done("egress_rebind", &b.sandbox_id, s.egress.rebind(&b).await)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn egress_detach(
    State(s): St,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, WireError> {
    let id = sandbox_id(path)?;
    done("egress_detach", &id, s.egress.detach(&id).await)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether `to` is a place `dial` may connect to: the guest end (`.2`) of a
/// /30 block of the guest network, on the agent's or the VNC server's port.
/// The host ends of the blocks are the node's own addresses, so they are
/// refused too.
pub fn dial_allowed(guest_net: (Ipv4Addr, u8), to: SocketAddr) -> Result<SocketAddrV4, String> {
    let SocketAddr::V4(to) = to else {
        return Err("only IPv4 guest addresses can be dialed".into());
    };
    if to.port() != airlock_proto::AGENT_PORT && to.port() != airlock_proto::VNC_PORT {
        return Err(format!(
            "only the guest ports {} and {} can be dialed",
            airlock_proto::AGENT_PORT,
            airlock_proto::VNC_PORT
        ));
    }
    let (base, len) = guest_net;
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    let ip = u32::from(*to.ip());
    if ip & mask != u32::from(base) & mask || ip.wrapping_sub(u32::from(base) & mask) % 4 != 2 {
        return Err(format!(
            "{} is not a guest address of this node's pool {base}/{len}",
            to.ip()
        ));
    }
    Ok(to)
}

#[derive(Debug)]
struct DialQuery {
    to: String,
}

fn asks_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let ours = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(DIAL_PROTOCOL));
    connection_upgrade && ours
}

/// `GET /node/v1/dial?to=IP:PORT`: connect first (so a refusal is a 502,
/// not a pipe that closes), then answer 101 and splice the two connections.
async fn dial(State(s): St, mut req: Request) -> Result<Response, WireError> {
    let q: DialQuery = req
        .uri()
        .query()
        .and_then(dial_query)
        .ok_or_else(|| bad("dial needs ?to=IP:PORT"))?;
    let to: SocketAddr =
        q.to.parse()
            .map_err(|_| bad("to: an IPv4 address and port, IP:PORT"))?;
    let to = dial_allowed(s.guest_net, to).map_err(WireError::Forbidden)?;
    if !asks_upgrade(req.headers()) {
        return Err(WireError::BadRequest(format!(
            "dial needs `Connection: Upgrade` and `Upgrade: {DIAL_PROTOCOL}`"
        )));
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(WireError::BadRequest(
            "this connection cannot be upgraded".into(),
        ));
    };
    let guest = match tokio::time::timeout(DIAL_CONNECT_TIMEOUT, TcpStream::connect(to)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(WireError::BadGateway(format!("could not reach {to}: {e}"))),
        Err(_) => {
            return Err(WireError::BadGateway(format!(
                "could not reach {to} within {} s",
                DIAL_CONNECT_TIMEOUT.as_secs()
            )))
        }
    };
    let _ = guest.set_nodelay(true);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                super::tunnel::splice(hyper_util::rt::TokioIo::new(upgraded), guest).await;
            }
            Err(e) => tracing::debug!(to = %to, error = %e, "dial upgrade failed"),
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(DIAL_PROTOCOL)),
        ],
    )
        .into_response())
}

/// `to=` out of a query string (percent-decoded).
fn dial_query(q: &str) -> Option<DialQuery> {
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "to")
        .map(|(_, v)| DialQuery { to: v.into_owned() })
}

#[cfg(test)]
mod tests;
