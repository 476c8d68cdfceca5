//! Sandbox drivers. Every backend implements [`Driver`]; the control plane never
//! knows which one it talks to. Host operations (processes, mounts, links) sit
//! behind [`host::Host`] so the logic can be tested against a fake.

pub mod files;
pub mod firecracker;
pub mod host;
pub mod net;
pub mod nspawn;
pub mod qemu;
pub mod supervise;
pub mod userns;
pub mod vm;

use airlock_proto::metadata::{Metadata, SandboxKind};
use async_trait::async_trait;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The golden image as a driver sees it: read-only layers, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub build_id: String,
    /// Directories stacked as overlay lower layers, uppermost first.
    pub layers: Vec<PathBuf>,
}

impl ImageRef {
    /// The image a build's manifest describes.
    pub fn of(manifest: &airlock_image::Manifest) -> ImageRef {
        ImageRef {
            build_id: manifest.build_id.clone(),
            layers: manifest.layer_dirs_top_first(),
        }
    }
}

/// What the host gave a sandbox from the address pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Index of the block in the pool; stable across restarts (it is persisted).
    pub index: u32,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix_len: u8,
}

/// What one sandbox may use. A limit that is set but cannot be applied fails
/// the create, naming the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub max_pids: Option<u64>,
    /// CPU time, in thousandths of one CPU (1000: one whole CPU).
    pub cpu_millis: Option<u32>,
    /// Bytes per second read and written, each, on the block device that
    /// holds the sandbox's writable layer.
    pub io_bps: Option<u64>,
    /// Size of the sandbox's writable layer: a filesystem of its own, so a
    /// guest that fills it gets ENOSPC and the host's disk is untouched.
    pub disk_bytes: Option<u64>,
    /// Size of a workspace's home volume, likewise.
    pub home_disk_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: Some(2 << 30),
            max_pids: Some(4096),
            cpu_millis: None,
            io_bps: None,
            disk_bytes: None,
            home_disk_bytes: None,
        }
    }
}

/// Everything a driver needs to create one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub kind: SandboxKind,
    pub image: ImageRef,
    pub lease: Lease,
    pub metadata: Metadata,
    pub limits: Limits,
    /// The one port on the gateway the sandbox may reach (its egress proxy);
    /// `None`: the sandbox reaches nothing outside itself.
    pub proxy_port: Option<u16>,
    /// For workspaces: the persistent directory mounted as the user's home.
    pub home_volume: Option<PathBuf>,
}

/// Where the control plane reaches a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub agent: SocketAddr,
    pub vnc: SocketAddr,
}

impl Endpoints {
    pub fn for_guest(guest: Ipv4Addr) -> Self {
        Endpoints {
            agent: SocketAddr::from((guest, airlock_proto::AGENT_PORT)),
            vnc: SocketAddr::from((guest, airlock_proto::VNC_PORT)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub running: bool,
    pub pid: Option<u32>,
}

/// Whether a sandbox's processes are all still there. A sandbox is alive
/// only while its supervisor (systemd-nspawn, QEMU, Firecracker) and its
/// payload both are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Something died; the text names what (e.g. "systemd-nspawn (pid 4242) exited").
    Dead(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("sandbox {0} is not known to the driver")]
    NotFound(String),
    /// Worth retrying: the host was briefly unable (busy device, racing cleanup).
    #[error("transient host failure: {0}")]
    Transient(String),
    #[error("{context}")]
    Host {
        context: String,
        #[source]
        source: host::HostError,
    },
    #[error("guest did not become reachable within {0:?}")]
    Timeout(Duration),
    #[error("guest exited during boot: {0}")]
    GuestExited(String),
    #[error("{0}")]
    Other(String),
}

impl DriverError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DriverError::Transient(_))
    }
}

/// One sandbox backend. Methods are idempotent where it matters for recovery:
/// `destroy` of a half-made or already-gone sandbox succeeds and releases whatever
/// is left.
#[async_trait]
pub trait Driver: Send + Sync + std::fmt::Debug + 'static {
    fn name(&self) -> &'static str;
    /// Prepare the sandbox's private resources (writable layer, link, metadata).
    async fn create(&self, spec: &SandboxSpec) -> Result<(), DriverError>;
    /// Boot the guest.
    async fn start(&self, id: &str) -> Result<(), DriverError>;
    /// Wait until the guest's agent port accepts connections.
    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Endpoints, DriverError>;
    /// Ask the guest to power off; force it after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError>;
    /// Stop if needed and release everything the sandbox holds on the host.
    async fn destroy(&self, id: &str) -> Result<(), DriverError>;
    async fn inspect(&self, id: &str) -> Result<InstanceInfo, DriverError>;
    /// Every sandbox this driver holds resources for, running or not.
    async fn list(&self) -> Result<Vec<InstanceInfo>, DriverError>;
    /// Whether the supervisor and the payload of a started sandbox are
    /// alive. Cheap (a few non-blocking checks of the host, never a call
    /// into the guest): it is asked every few seconds per sandbox.
    async fn liveness(&self, id: &str) -> Result<Liveness, DriverError>;
}
