//! Application logic between the HTTP handlers and the store and the node:
//! who may do what, and the sandbox lifecycle with its recovery and reaping.
//! What it asks of the world outside the process goes through seams with
//! real and fake implementations ([`Seams`]): the host ([`Node`]), the guest
//! ([`agent::Guest`]), the egress forwarders ([`Forwarders`]) and the host's
//! room ([`admission::HostProbe`]).

pub mod admission;
pub mod agent;
pub mod auth;
pub mod credentials;
pub mod egress;
pub mod keyring;
#[cfg(test)]
pub(crate) mod lifecycle_tests;
pub mod limits;
pub mod logins;
pub mod nodes;
pub mod pool;
pub mod processes;
pub mod reaper;
pub mod reserve;
pub mod sandboxes;
pub mod shares;
pub mod state;
pub mod tickets;
pub mod volumes;
pub mod workspaces;

use crate::metrics::Metrics;
use crate::node::{LocalNode, Node};
use crate::store::{SandboxRow, Store, StoreError};
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::{Driver, ImageRef, Lease, Limits};
use airlock_proto::metadata::Display;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// Settings the app works with, already validated.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub data_dir: PathBuf,
    pub loopback_only: bool,
    pub display: Display,
    pub limits: Limits,
    /// From `booting` to `ready`, at most.
    pub boot_timeout: Duration,
    /// A browser sandbox with no viewer and no exec for this long is reaped.
    pub idle_ttl: Duration,
    /// Finished sandboxes stay listed this long.
    pub history_ttl: Duration,
    pub reaper_every: Duration,
    /// How often ready sandboxes are checked (node liveness, agent, display).
    pub supervise_every: Duration,
    /// A sandbox `stopping` this long gets its teardown again from the reaper.
    pub stuck_stopping: Duration,
    /// Bounded retries of transient driver failures.
    pub driver_retries: u32,
    /// Bytes of host memory that must stay available for a new sandbox.
    pub min_free_memory: u64,
    /// Bytes that must stay free on the disk holding `data_dir` (writable
    /// layers, VM disks) for a new sandbox.
    pub min_free_disk: u64,
    /// A login not signed in by then expires.
    pub login_timeout: Duration,
    /// Provider definitions added to those of the image (tests, local providers).
    pub providers_dir: Option<PathBuf>,
    /// Frames per second a guest encodes for WebRTC viewers.
    pub webrtc_fps: u32,
    /// Names the egress forwarder passes on unchecked (`egress_allow`).
    pub egress_allow: Vec<String>,
    // ---- guard (http/guard.rs) ----
    /// The configured listen address (its IP is one of the server's names).
    pub listen: std::net::SocketAddr,
    /// Validated `public_hosts` and `allowed_origins` of the config.
    pub public_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    /// The `local_user` setting: `None` is automatic (see [`Self::local_user_on`]).
    pub local_user: Option<bool>,

    // ---- quotas and capacity reservation (quota) ----
    /// Per-user caps.
    pub quota: admission::Quotas,
    /// Bytes of memory each sandbox holds from admission until ready.
    pub reserve_memory: u64,

    // ---- warm pools (app/pool.rs) ----
    pub pool: pool::PoolSettings,

    // ---- many hosts (cluster/) ----
    /// Sandboxes run on `airlock node` processes and other replicas share
    /// the store: recovery and the reaper's work are the leader's, and a
    /// sandbox left booting by a replica that went away is failed.
    pub cluster: bool,

    // ---- screen recording (recording/) ----
    pub recording: crate::recording::RecordingConfig,
}

impl AppConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        AppConfig {
            data_dir,
            loopback_only: true,
            display: Display::default(),
            limits: Limits::default(),
            boot_timeout: Duration::from_secs(90),
            idle_ttl: Duration::from_secs(2 * 3600),
            history_ttl: Duration::from_secs(24 * 3600),
            reaper_every: Duration::from_secs(10),
            supervise_every: Duration::from_secs(5),
            stuck_stopping: Duration::from_secs(60),
            driver_retries: 3,
            min_free_memory: 768 << 20,
            min_free_disk: 2048 << 20,
            login_timeout: Duration::from_secs(15 * 60),
            providers_dir: None,
            webrtc_fps: airlock_proto::stream::DEFAULT_FPS,
            egress_allow: Vec::new(),
            // ---- guard ----
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 4000)),
            public_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            local_user: None,

            // ---- quotas and capacity reservation (quota) ----
            quota: admission::Quotas::default(),
            reserve_memory: 512 << 20,

            // ---- warm pools ----
            pool: pool::PoolSettings::default(),
            recording: crate::recording::RecordingConfig::default(),

            cluster: false,
        }
    }

    /// Whether a direct loopback caller without a token may act as `local`:
    /// never on a listener that is not loopback-bound; when `local_user` is
    /// unset, only while no `public_hosts` are configured (a proxy on this
    /// host that adds no `X-Forwarded-For` would make every caller local).
    pub fn local_user_on(&self) -> bool {
        self.loopback_only && self.local_user.unwrap_or(self.public_hosts.is_empty())
    }
}

/// A store timestamp (ms since the epoch) in RFC 3339, as every API answer
/// writes times; empty for one out of range.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Errors as the app states them; `http::error` maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadInput(String),
    #[error("missing or unknown API token")]
    Unauthorized,
    /// The caller may not do this to an object it owns (a path that leads
    /// out of where a sandbox's files may be).
    #[error("{0}")]
    Forbidden(String),
    /// A body beyond its documented limit.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NoCapacity(String),
    /// The host's disk is too full for new work.
    #[error("{0}")]
    NoStorage(String),
    #[error("{0}")]
    Unavailable(String),
    /// A per-user quota or rate limit refused the request; nothing was made.
    #[error("{message}")]
    Quota {
        kind: admission::Refusal,
        message: String,
        /// When trying again may succeed.
        retry_after: Duration,
    },
    #[error("storage failed")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// A sandbox's egress forward proxy, started and stopped with the sandbox.
#[async_trait::async_trait]
pub trait Forwarders: Send + Sync + std::fmt::Debug + 'static {
    /// Start (or restart) the forward proxy of a sandbox whose link exists.
    async fn attach(&self, app: &Arc<App>, row: &SandboxRow, lease: &Lease)
        -> Result<(), AppError>;
    /// Stop it; harmless when there is none.
    async fn detach(&self, app: &App, id: &str);
    /// A pool's claim: the running proxy now uses `row`'s owner's upstream.
    async fn rebind(
        &self,
        app: &Arc<App>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        self.attach(app, row, lease).await
    }
}

/// The real forwarders: a proxy listening on the sandbox's gateway address.
#[derive(Debug, Default)]
pub struct RealForwarders;

#[async_trait::async_trait]
impl Forwarders for RealForwarders {
    async fn attach(
        &self,
        app: &Arc<App>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        app.egress_attach(row, lease).await
    }

    async fn detach(&self, app: &App, id: &str) {
        app.egress_detach(id).await
    }

    async fn rebind(
        &self,
        app: &Arc<App>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        app.egress_rebind(row, lease).await
    }
}

/// Forwarders for unit tests: a set of attached sandbox ids, and a failure
/// to inject.
#[derive(Debug, Default)]
pub struct FakeForwarders {
    attached: Mutex<std::collections::BTreeSet<String>>,
    fail: Mutex<Option<String>>,
    /// Whose upstream each attached forwarder uses, by sandbox id.
    owners: Mutex<HashMap<String, String>>,
}

impl FakeForwarders {
    pub fn attached(&self) -> Vec<String> {
        let attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        attached.iter().cloned().collect()
    }

    /// The user whose upstream sandbox `id`'s forwarder uses.
    pub fn owner_of(&self, id: &str) -> Option<String> {
        let owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.get(id).cloned()
    }

    /// Attaching fails with `why` (None: works again).
    pub fn fail_with(&self, why: Option<&str>) {
        *self.fail.lock().unwrap_or_else(|p| p.into_inner()) = why.map(str::to_owned);
    }
}

#[async_trait::async_trait]
impl Forwarders for FakeForwarders {
    async fn attach(
        &self,
        _app: &Arc<App>,
        row: &SandboxRow,
        _lease: &Lease,
    ) -> Result<(), AppError> {
        if let Some(why) = self.fail.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(AppError::Internal(why));
        }
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        attached.insert(row.id.clone());
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.insert(row.id.clone(), row.owner_id.clone());
        Ok(())
    }

    async fn detach(&self, _app: &App, id: &str) {
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        attached.remove(id);
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.remove(id);
    }
}

/// What the app reaches outside the process through, each a trait with a
/// real and a fake implementation.
#[derive(Debug, Clone)]
pub struct Seams {
    pub node: Arc<dyn Node>,
    pub guest: Arc<dyn agent::Guest>,
    pub forwarders: Arc<dyn Forwarders>,
    pub probe: Arc<dyn admission::HostProbe>,
}

impl Seams {
    /// The real thing: a driver in this process, HTTP and RFB to the guests.
    pub fn real(driver: Arc<dyn Driver>) -> Self {
        Seams {
            node: Arc::new(LocalNode::new(driver)),
            guest: Arc::new(agent::HttpGuest::default()),
            forwarders: Arc::new(RealForwarders),
            probe: Arc::new(admission::ProcProbe),
        }
    }
}

#[derive(Debug)]
pub struct App {
    pub cfg: AppConfig,
    pub store: Store,
    /// The host that runs the sandboxes.
    pub node: Arc<dyn Node>,
    /// The guests' agents and displays.
    pub guest: Arc<dyn agent::Guest>,
    pub forwarders: Arc<dyn Forwarders>,
    pub image: ImageRef,
    pub pool: AddressPool,
    pub metrics: Metrics,
    /// Ids of sandboxes going away, so their viewers close with a reason.
    pub stopping: broadcast::Sender<String>,
    pub vault: tokio::sync::RwLock<crate::vault::Vault>,
    pub egress: egress::EgressState,
    pub logins: logins::LoginsState,
    /// Health checks, re-capture, revocation and audit of stored credentials.
    pub credentials: credentials::CredentialsState,
    /// The WebRTC sockets, once bound (unset when WebRTC is off).
    pub webrtc: std::sync::OnceLock<Arc<crate::webrtc::Endpoint>>,
    /// One video link per sandbox with WebRTC viewers.
    pub streams: Arc<crate::webrtc::hub::Hubs>,
    pub stream_metrics: Arc<crate::webrtc::StreamMetrics>,
    /// Screen recordings under way and on disk.
    pub recordings: Arc<crate::recording::Recordings>,
    /// Per-user quotas and the host's room, checked before anything is made.
    pub admission: admission::Admission,
    /// Warm pools of booted sandboxes.
    pub pools: pool::Pools,
    /// Serialises lease allocation.
    lease_lock: tokio::sync::Mutex<()>,
    /// Background work (boots, teardowns, logins), so a stop can end it all
    /// at once, as a process exit would.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// One lock per sandbox: driver work on a sandbox never overlaps.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Consecutive missed heartbeats per ready sandbox.
    missed: Mutex<HashMap<String, u32>>,
    /// Held while this process is the one that reaps, supervises, refills
    /// and recovers (`cluster::duties`).
    pub(crate) leader: tokio::sync::Mutex<Option<crate::store::Leadership>>,
    /// The leader's view of the nodes' heartbeats (`cluster::duties`).
    pub(crate) node_watch: Mutex<crate::cluster::duties::Watch>,
    /// This process among the cluster's replicas (new at each start).
    pub replica_id: String,
}

impl App {
    /// An app over a driver in this process.
    pub fn new(
        cfg: AppConfig,
        store: Store,
        driver: Arc<dyn Driver>,
        image: ImageRef,
        pool: AddressPool,
        vault: crate::vault::Vault,
    ) -> Arc<Self> {
        Self::with_seams(cfg, store, Seams::real(driver), image, pool, vault)
    }

    pub fn with_seams(
        cfg: AppConfig,
        store: Store,
        seams: Seams,
        image: ImageRef,
        pool: AddressPool,
        vault: crate::vault::Vault,
    ) -> Arc<Self> {
        let (stopping, _) = broadcast::channel(256);
        let metrics = Metrics::new();
        let stream_metrics = Arc::new(crate::webrtc::StreamMetrics::new(&metrics));
        let admission = admission::Admission::new(
            admission::Settings::of(&cfg),
            store.clone(),
            seams.probe,
            Arc::new(admission::SystemClock),
        );
        let pools = pool::Pools::new(cfg.pool, &metrics);
        let recordings = Arc::new(crate::recording::Recordings::new(
            cfg.recording.clone(),
            &cfg.data_dir,
            &metrics,
        ));
        Arc::new(App {
            cfg,
            store,
            node: seams.node,
            guest: seams.guest,
            forwarders: seams.forwarders,
            image,
            pool,
            metrics,
            stopping,
            vault: tokio::sync::RwLock::new(vault),
            egress: egress::EgressState::default(),
            logins: logins::LoginsState::default(),
            credentials: credentials::CredentialsState::default(),
            webrtc: std::sync::OnceLock::new(),
            streams: Arc::default(),
            stream_metrics,
            recordings,
            admission,
            pools,
            lease_lock: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            locks: Mutex::new(HashMap::new()),
            missed: Mutex::new(HashMap::new()),
            leader: tokio::sync::Mutex::new(None),
            node_watch: Mutex::default(),
            replica_id: format!("r-{}", hex::encode(rand::random::<[u8; 8]>())),
        })
    }

    /// Run `work` in the background, tracked so [`App::stop_background`] ends it.
    pub(crate) fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(work).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    /// End all background work and every per-sandbox listener. Sandboxes keep
    /// running: the next start re-adopts them and resumes what was under way.
    pub fn stop_background(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
        }
        if let Some(endpoint) = self.webrtc.get() {
            endpoint.stop();
        }
        self.egress_stop_all();
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    fn forget_lock(&self, id: &str) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(id);
    }
}
