//! The replica's side of the node API: a [`Node`] and [`NodeEgress`] that
//! are an `airlock node` process on another host, reached over HTTP (see
//! [`super::wire`] for the routes). A node that cannot be reached is a
//! [`NodeError::Transient`]; an error the node's own driver reported comes
//! back as the very variant it had there.
//!
//! Guests behind a remote node are reached through [`Tunnels`]: the
//! endpoints this node hands out are loopback addresses of this process.

use super::tunnel::{Dialer, Tunnels};
use super::wire::{valid_sandbox_id, NodeHealth, StopBody, WaitReadyBody, WireErrorBody, MAX_WAIT};
use super::{
    BlockedPackets, CreateSandbox, EgressBinding, GuestEndpoints, Instance, Liveness, Node,
    NodeEgress, NodeError,
};
use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Calls that change the host (create, start, destroy, egress): a node's
/// driver may take a while to make or remove a namespace and its links.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Questions (inspect, list, liveness, counters, health).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// What `wait_ready` and `stop` allow the network on top of their own wait.
const SLACK: Duration = Duration::from_secs(5);

/// The most a node's answer may hold (a list of thousands of sandboxes
/// fits many times over).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// The most of an error answer that is read.
const MAX_ERROR_BYTES: usize = 64 * 1024;

enum Bounded {
    TooLarge,
    Http(reqwest::Error),
}

/// The body, read up to `limit` bytes.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Bounded> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Bounded::Http)? {
        if out.len() + chunk.len() > limit {
            return Err(Bounded::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A node on another host.
#[derive(Debug)]
pub struct RemoteNode {
    dialer: Dialer,
    http: reqwest::Client,
    tunnels: Arc<Tunnels>,
    /// The node's driver, once its health was read.
    backend: Mutex<Option<String>>,
}

impl RemoteNode {
    /// The node `name` whose API listens at `addr`, with its own tunnels.
    pub fn new(name: String, addr: SocketAddr, token: SecretString) -> Self {
        Self::with_tunnels(name, addr, token, Arc::new(Tunnels::new()))
    }

    /// Like [`RemoteNode::new`], with tunnels shared with other nodes.
    pub fn with_tunnels(
        name: String,
        addr: SocketAddr,
        token: SecretString,
        tunnels: Arc<Tunnels>,
    ) -> Self {
        // Node traffic never goes through a proxy from the environment.
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(ASK_TIMEOUT)
            .build()
            .unwrap_or_default();
        RemoteNode {
            dialer: Dialer { name, addr, token },
            http,
            tunnels,
            backend: Mutex::new(None),
        }
    }

    pub fn node_name(&self) -> &str {
        &self.dialer.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.dialer.addr
    }

    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// Close the tunnels of sandbox `id` (done by a successful destroy).
    pub fn forget(&self, id: &str) {
        self.tunnels.forget(id);
    }

    /// `GET /node/v1/health`: the node's name and driver.
    pub async fn health(&self) -> Result<NodeHealth, NodeError> {
        let h: NodeHealth = self
            .json(self.request(Method::GET, "/node/v1/health", ASK_TIMEOUT))
            .await?;
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.backend.clone());
        Ok(h)
    }

    fn request(&self, method: Method, path: &str, timeout: Duration) -> RequestBuilder {
        self.http
            .request(method, format!("http://{}{path}", self.dialer.addr))
            .bearer_auth(self.dialer.token.expose_secret())
            .timeout(timeout)
    }

    fn sandbox_path(&self, id: &str, rest: &str) -> Result<String, NodeError> {
        if !valid_sandbox_id(id) {
            return Err(NodeError::Failed(format!(
                "{id:?} is not a sandbox id a node takes"
            )));
        }
        Ok(format!("/node/v1/sandboxes/{id}{rest}"))
    }

    fn transient(&self, why: impl std::fmt::Display) -> NodeError {
        NodeError::Transient(format!(
            "node {} at {}: {why}",
            self.dialer.name, self.dialer.addr
        ))
    }

    /// Send; a 2xx answer, or the node's error as a [`NodeError`].
    async fn send(&self, rb: RequestBuilder) -> Result<reqwest::Response, NodeError> {
        let resp = rb
            .send()
            .await
            .map_err(|e| self.transient(crate::app::sandboxes::chain(&e.without_url())))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = read_bounded(resp, MAX_ERROR_BYTES)
            .await
            .unwrap_or_default();
        let parsed = serde_json::from_slice::<WireErrorBody>(&body).ok();
        if let Some(e) = parsed.as_ref().and_then(|b| b.node_error.clone()) {
            return Err(e);
        }
        let message = parsed
            .map(|b| format!("{}: {}", b.error.code, b.error.message))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        let said = format!(
            "node {} at {} answered {status}: {message}",
            self.dialer.name, self.dialer.addr
        );
        Err(match status {
            StatusCode::UNAUTHORIZED => NodeError::Failed(format!(
                "{said} (the replicas and the node must share the same node token)"
            )),
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS => NodeError::Transient(said),
            _ => NodeError::Failed(said),
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, NodeError> {
        let resp = self.send(rb).await?;
        let failed = |why: String| {
            NodeError::Failed(format!(
                "node {} at {}: its answer could not be read: {why}",
                self.dialer.name, self.dialer.addr
            ))
        };
        let body = match read_bounded(resp, MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(Bounded::TooLarge) => {
                return Err(failed(format!("larger than {MAX_ANSWER_BYTES} bytes")))
            }
            Err(Bounded::Http(e)) => {
                return Err(self.transient(crate::app::sandboxes::chain(&e.without_url())))
            }
        };
        serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))
    }

    async fn empty(&self, rb: RequestBuilder) -> Result<(), NodeError> {
        self.send(rb).await.map(drop)
    }
}

#[async_trait]
impl Node for RemoteNode {
    fn name(&self) -> String {
        match &*self.backend.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(backend) => format!("{backend} on node {}", self.dialer.name),
            None => format!("node {}", self.dialer.name),
        }
    }

    async fn create(&self, req: &CreateSandbox) -> Result<(), NodeError> {
        let path = self.sandbox_path(&req.id, "")?;
        self.empty(self.request(Method::PUT, &path, CHANGE_TIMEOUT).json(req))
            .await
    }

    async fn start(&self, id: &str) -> Result<(), NodeError> {
        let path = self.sandbox_path(id, "/start")?;
        self.empty(self.request(Method::POST, &path, CHANGE_TIMEOUT))
            .await
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<GuestEndpoints, NodeError> {
        let path = self.sandbox_path(id, "/wait_ready")?;
        let timeout = timeout.min(MAX_WAIT);
        let body = WaitReadyBody {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        self.json(
            self.request(Method::POST, &path, timeout + SLACK)
                .json(&body),
        )
        .await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError> {
        let path = self.sandbox_path(id, "/stop")?;
        let grace = grace.min(MAX_WAIT);
        let body = StopBody {
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        };
        self.empty(
            self.request(Method::POST, &path, grace + CHANGE_TIMEOUT)
                .json(&body),
        )
        .await
    }

    async fn destroy(&self, id: &str) -> Result<(), NodeError> {
        let path = self.sandbox_path(id, "")?;
        self.empty(self.request(Method::DELETE, &path, CHANGE_TIMEOUT))
            .await?;
        self.tunnels.forget(id);
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Instance, NodeError> {
        let path = self.sandbox_path(id, "")?;
        self.json(self.request(Method::GET, &path, ASK_TIMEOUT))
            .await
    }

    async fn list(&self) -> Result<Vec<Instance>, NodeError> {
        self.json(self.request(Method::GET, "/node/v1/sandboxes", ASK_TIMEOUT))
            .await
    }

    async fn liveness(&self, id: &str) -> Result<Liveness, NodeError> {
        let path = self.sandbox_path(id, "/liveness")?;
        self.json(self.request(Method::GET, &path, ASK_TIMEOUT))
            .await
    }

    async fn blocked_packets(&self, id: &str) -> Result<Option<BlockedPackets>, NodeError> {
        let path = self.sandbox_path(id, "/blocked")?;
        self.json(self.request(Method::GET, &path, ASK_TIMEOUT))
            .await
    }

    /// Loopback ends of tunnels through the node: the agent's port (which
    /// also serves the stream) and the VNC server's.
    async fn endpoints(&self, id: &str, guest: Ipv4Addr) -> Result<GuestEndpoints, NodeError> {
        let direct = GuestEndpoints::at(guest);
        let agent = self.tunnels.open(id, &self.dialer, direct.agent)?;
        let display = self.tunnels.open(id, &self.dialer, direct.display)?;
        let stream = if direct.stream == direct.agent {
            agent
        } else {
            self.tunnels.open(id, &self.dialer, direct.stream)?
        };
        Ok(GuestEndpoints {
            agent,
            display,
            stream,
        })
    }
}

#[async_trait]
impl NodeEgress for RemoteNode {
    async fn attach(&self, b: &EgressBinding) -> Result<(), NodeError> {
        let path = self.sandbox_path(&b.sandbox_id, "/egress")?;
        self.empty(self.request(Method::PUT, &path, CHANGE_TIMEOUT).json(b))
            .await
    }

    async fn rebind(&self, b: &EgressBinding) -> Result<(), NodeError> {
        let path = self.sandbox_path(&b.sandbox_id, "/egress/rebind")?;
        self.empty(self.request(Method::POST, &path, CHANGE_TIMEOUT).json(b))
            .await
    }

    async fn detach(&self, id: &str) -> Result<(), NodeError> {
        let path = self.sandbox_path(id, "/egress")?;
        self.empty(self.request(Method::DELETE, &path, CHANGE_TIMEOUT))
            .await
    }
}
