//! The `Node` seam: what the control plane asks of a host that runs
//! sandboxes. Today one implementation, [`LocalNode`], wraps a driver in this
//! process; a remote node later puts a network between the two sides, so
//! every call here is keyed by sandbox id, idempotent (a repeated create,
//! stop or destroy is harmless), and takes and returns plain data that
//! serializes: no handle, reference or shared memory crosses the seam.
//!
//! [`fake::FakeNode`] is the in-memory implementation the orchestration's
//! unit tests use, with failures and delays injectable at every step.

pub mod fake;
pub mod remote;
pub mod tunnel;
pub mod wire;

use airlock_drivers::host::{Host, RealHost};
use airlock_drivers::net::{firewall, link::LinkNames};
use airlock_drivers::{Driver, DriverError, ImageRef, Lease, Limits, SandboxSpec};
use airlock_proto::metadata::{Metadata, SandboxKind};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The golden image build a sandbox boots, as layer directories on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeImage {
    pub build_id: String,
    /// Overlay lower layers, uppermost first.
    pub layers: Vec<PathBuf>,
}

/// The address block the control plane gave the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLease {
    pub index: u32,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix_len: u8,
}

/// What one sandbox may use (see [`airlock_drivers::Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLimits {
    pub memory_bytes: Option<u64>,
    pub max_pids: Option<u64>,
    pub cpu_millis: Option<u32>,
    pub io_bps: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub home_disk_bytes: Option<u64>,
}

/// Everything a node needs to create one sandbox. Carries the guest's
/// secrets (in `metadata`), so its `Debug` is the metadata's redacted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSandbox {
    pub id: String,
    pub kind: SandboxKind,
    pub image: NodeImage,
    pub lease: NodeLease,
    pub metadata: Metadata,
    pub limits: NodeLimits,
    /// The one gateway port the sandbox may reach (its egress proxy).
    pub proxy_port: Option<u16>,
    /// For workspaces: the persistent directory mounted as the user's home.
    pub home_volume: Option<PathBuf>,
}

/// Where the control plane reaches a booted guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestEndpoints {
    /// The guest's `airlock-agent` (health, exec, logins).
    pub agent: SocketAddr,
    /// The guest's VNC server (viewer relay, readiness and heartbeat probes).
    pub display: SocketAddr,
    /// Where the guest's encoded video stream is asked for (WebRTC viewers).
    pub stream: SocketAddr,
}

impl GuestEndpoints {
    /// The fixed ports of a guest at `address` (every driver uses them).
    pub fn at(address: Ipv4Addr) -> Self {
        GuestEndpoints {
            agent: SocketAddr::from((address, airlock_proto::AGENT_PORT)),
            display: SocketAddr::from((address, airlock_proto::VNC_PORT)),
            stream: SocketAddr::from((address, airlock_proto::AGENT_PORT)),
        }
    }
}

/// One sandbox the node holds resources for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub running: bool,
}

/// Whether a started sandbox's supervisor and payload are all alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    Alive,
    /// Something died; the text names what.
    Dead(String),
}

/// Packets a sandbox's host-side firewall dropped, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedPackets {
    /// Outbound TCP to anything but the proxy port.
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
    pub other: u64,
    /// IPv6 link-local multicast (neighbour discovery); never leaves the link.
    pub link_local: u64,
    /// Packets from elsewhere the host would have forwarded to the guest.
    pub inbound: u64,
}

impl BlockedPackets {
    /// Outbound attempts to get out another way (link-local noise excluded).
    pub fn outbound(&self) -> u64 {
        self.tcp + self.udp + self.icmp + self.other
    }
}

/// A node call that failed, as data (a remote node sends it back as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NodeError {
    #[error("sandbox {0} is not known to the node")]
    NotFound(String),
    /// Worth retrying: the host was briefly unable.
    #[error("transient host failure: {0}")]
    Transient(String),
    #[error("the guest did not become reachable within {0}s")]
    Timeout(u64),
    #[error("guest exited during boot: {0}")]
    GuestExited(String),
    /// Anything else, with its whole cause chain.
    #[error("{0}")]
    Failed(String),
}

impl NodeError {
    pub fn is_transient(&self) -> bool {
        matches!(self, NodeError::Transient(_))
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            NodeError::Timeout(_) => "boot_timeout",
            NodeError::GuestExited(_) => "guest_exited",
            NodeError::NotFound(_) => "lost",
            _ => "driver",
        }
    }
}

impl From<DriverError> for NodeError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::NotFound(id) => NodeError::NotFound(id),
            DriverError::Transient(why) => NodeError::Transient(why),
            DriverError::Timeout(d) => NodeError::Timeout(d.as_secs()),
            DriverError::GuestExited(why) => NodeError::GuestExited(why),
            other => NodeError::Failed(crate::app::sandboxes::chain(&other)),
        }
    }
}

/// What the control plane asks of a host. Every call is keyed by sandbox id
/// and idempotent: the caller may repeat any of them after a timeout or a
/// restart without knowing whether the first one landed.
#[async_trait]
pub trait Node: Send + Sync + std::fmt::Debug + 'static {
    /// The backend, for logs and messages (`nspawn`, `qemu`, `fake`…).
    fn name(&self) -> String;
    /// Make the sandbox's private resources; a repeat with the same id is a no-op.
    async fn create(&self, req: &CreateSandbox) -> Result<(), NodeError>;
    /// Boot the guest.
    async fn start(&self, id: &str) -> Result<(), NodeError>;
    /// Wait until the guest's agent accepts connections; where to reach it.
    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<GuestEndpoints, NodeError>;
    /// Ask the guest to power off; force it after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError>;
    /// Stop if needed and release everything the sandbox holds on the host;
    /// success for a sandbox that is already gone.
    async fn destroy(&self, id: &str) -> Result<(), NodeError>;
    async fn inspect(&self, id: &str) -> Result<Instance, NodeError>;
    /// Every sandbox the node holds resources for, running or not.
    async fn list(&self) -> Result<Vec<Instance>, NodeError>;
    /// Whether the supervisor and the payload of a started sandbox are alive.
    async fn liveness(&self, id: &str) -> Result<Liveness, NodeError>;
    /// The sandbox's firewall drop counters; `None` when its rules are not installed.
    async fn blocked_packets(&self, id: &str) -> Result<Option<BlockedPackets>, NodeError>;
    /// Where the control plane reaches the guest at `guest` (its leased
    /// address). A node in this process answers the guest's own ports; a
    /// remote node answers local ends of tunnels through itself.
    async fn endpoints(&self, _id: &str, guest: Ipv4Addr) -> Result<GuestEndpoints, NodeError> {
        Ok(GuestEndpoints::at(guest))
    }
}

/// One sandbox's egress forward proxy as the node that holds the sandbox
/// runs it: on the sandbox's gateway address, with its owner's upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressBinding {
    pub sandbox_id: String,
    /// Whose upstream the proxy uses (changes on a warm pool's claim).
    pub owner_id: String,
    pub lease: NodeLease,
}

/// The egress forward proxies of the sandboxes a node holds.
#[async_trait]
pub trait NodeEgress: Send + Sync + std::fmt::Debug + 'static {
    /// Start (or restart) the proxy.
    async fn attach(&self, b: &EgressBinding) -> Result<(), NodeError>;
    /// The running proxy now uses `b.owner_id`'s upstream; starts one if none runs.
    async fn rebind(&self, b: &EgressBinding) -> Result<(), NodeError>;
    /// Stop it; harmless when there is none.
    async fn detach(&self, id: &str) -> Result<(), NodeError>;
}

/// The node in this process: a driver, called directly, and the host's
/// firewall read through the drivers' host seam.
#[derive(Debug, Clone)]
pub struct LocalNode {
    driver: Arc<dyn Driver>,
    host: Arc<dyn Host>,
}

impl LocalNode {
    pub fn new(driver: Arc<dyn Driver>) -> Self {
        LocalNode {
            driver,
            host: Arc::new(RealHost),
        }
    }
}

fn spec_of(req: &CreateSandbox) -> SandboxSpec {
    let l = req.limits;
    SandboxSpec {
        id: req.id.clone(),
        kind: req.kind,
        image: ImageRef {
            build_id: req.image.build_id.clone(),
            layers: req.image.layers.clone(),
        },
        lease: Lease {
            index: req.lease.index,
            host: req.lease.host,
            guest: req.lease.guest,
            prefix_len: req.lease.prefix_len,
        },
        metadata: req.metadata.clone(),
        limits: Limits {
            memory_bytes: l.memory_bytes,
            max_pids: l.max_pids,
            cpu_millis: l.cpu_millis,
            io_bps: l.io_bps,
            disk_bytes: l.disk_bytes,
            home_disk_bytes: l.home_disk_bytes,
        },
        proxy_port: req.proxy_port,
        home_volume: req.home_volume.clone(),
    }
}

impl From<Lease> for NodeLease {
    fn from(l: Lease) -> Self {
        NodeLease {
            index: l.index,
            host: l.host,
            guest: l.guest,
            prefix_len: l.prefix_len,
        }
    }
}

impl From<Limits> for NodeLimits {
    fn from(l: Limits) -> Self {
        NodeLimits {
            memory_bytes: l.memory_bytes,
            max_pids: l.max_pids,
            cpu_millis: l.cpu_millis,
            io_bps: l.io_bps,
            disk_bytes: l.disk_bytes,
            home_disk_bytes: l.home_disk_bytes,
        }
    }
}

impl From<&ImageRef> for NodeImage {
    fn from(i: &ImageRef) -> Self {
        NodeImage {
            build_id: i.build_id.clone(),
            layers: i.layers.clone(),
        }
    }
}

#[async_trait]
impl Node for LocalNode {
    fn name(&self) -> String {
        self.driver.name().to_owned()
    }

    async fn create(&self, req: &CreateSandbox) -> Result<(), NodeError> {
        Ok(self.driver.create(&spec_of(req)).await?)
    }

    async fn start(&self, id: &str) -> Result<(), NodeError> {
        Ok(self.driver.start(id).await?)
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<GuestEndpoints, NodeError> {
        let e = self.driver.wait_ready(id, timeout).await?;
        Ok(GuestEndpoints {
            agent: e.agent,
            display: e.vnc,
            stream: e.agent,
        })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError> {
        Ok(self.driver.stop(id, grace).await?)
    }

    async fn destroy(&self, id: &str) -> Result<(), NodeError> {
        Ok(self.driver.destroy(id).await?)
    }

    async fn inspect(&self, id: &str) -> Result<Instance, NodeError> {
        let i = self.driver.inspect(id).await?;
        Ok(Instance {
            id: i.id,
            running: i.running,
        })
    }

    async fn list(&self) -> Result<Vec<Instance>, NodeError> {
        let all = self.driver.list().await?;
        Ok(all
            .into_iter()
            .map(|i| Instance {
                id: i.id,
                running: i.running,
            })
            .collect())
    }

    async fn liveness(&self, id: &str) -> Result<Liveness, NodeError> {
        Ok(match self.driver.liveness(id).await? {
            airlock_drivers::Liveness::Alive => Liveness::Alive,
            airlock_drivers::Liveness::Dead(what) => Liveness::Dead(what),
        })
    }

    async fn blocked_packets(&self, id: &str) -> Result<Option<BlockedPackets>, NodeError> {
        let counters = firewall::blocked(&*self.host, &LinkNames::for_sandbox(id))
            .await
            .map_err(|e| NodeError::Failed(crate::app::sandboxes::chain(&e)))?;
        Ok(counters.map(|b| BlockedPackets {
            tcp: b.tcp,
            udp: b.udp,
            icmp: b.icmp,
            other: b.other,
            link_local: b.link_local,
            inbound: b.inbound,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything that crosses the seam survives a trip through JSON, as it
    /// must once a network sits between the two sides.
    #[test]
    fn calls_are_plain_data() {
        let req = fake::tests_support::create_request("abc", 3);
        let json = serde_json::to_string(&req).expect("serialize");
        let back: CreateSandbox = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, req);
        for e in [
            NodeError::NotFound("x".into()),
            NodeError::Timeout(5),
            NodeError::Failed("a: b".into()),
        ] {
            let back: NodeError =
                serde_json::from_str(&serde_json::to_string(&e).expect("ser")).expect("de");
            assert_eq!(back, e);
        }
        let ends = GuestEndpoints::at(Ipv4Addr::new(10, 247, 0, 2));
        let back: GuestEndpoints =
            serde_json::from_str(&serde_json::to_string(&ends).expect("ser")).expect("de");
        assert_eq!(back, ends);
    }
}
