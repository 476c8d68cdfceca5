//! `airlock node`: one per host. It runs the sandboxes replicas place on it
//! (its driver, through [`LocalNode`]) and their egress forward proxies,
//! answers the node API (`node::wire`), renews its lease in the registry,
//! and keeps the host in line with the store: what the store no longer
//! wants on this node is destroyed, what it wants and still runs is
//! re-adopted (its forward proxy started again).

use crate::app::admission::{HostProbe, ProcProbe};
use crate::app::sandboxes::chain;
use crate::app::App;
use crate::config::Config;
use crate::node::{
    BlockedPackets, CreateSandbox, EgressBinding, GuestEndpoints, Instance, Liveness, LocalNode,
    Node, NodeEgress, NodeError,
};
use crate::server::StartError;
use crate::store::{now_ms, NodeRow, Store};
use airlock_drivers::{Driver, ImageRef, Lease};
use async_trait::async_trait;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// How often the node compares what it runs with what the store wants.
const RECONCILE_EVERY: Duration = Duration::from_secs(15);

/// The host's node: its driver, with the golden image's layers as this host
/// keeps them (a replica names the build; the layers are local paths).
#[derive(Debug)]
pub struct HostNode {
    inner: LocalNode,
    image: ImageRef,
    /// This node's name, and the app that reads the store: a create is
    /// checked against what the store says, not taken on the caller's word.
    name: String,
    app: std::sync::OnceLock<Weak<App>>,
}

impl HostNode {
    pub fn new(driver: Arc<dyn Driver>, image: ImageRef, name: String) -> Self {
        HostNode {
            inner: LocalNode::new(driver),
            image,
            name,
            app: std::sync::OnceLock::new(),
        }
    }

    /// The create as the store has it: the sandbox must be placed on this
    /// node and still `provisioning`; its lease is the one the store holds;
    /// a workspace's home is this node's own directory for it (never a path
    /// the caller names); its proxy port is the egress port or none.
    async fn checked(&self, req: &CreateSandbox) -> Result<CreateSandbox, NodeError> {
        let Some(app) = self.app.get().and_then(Weak::upgrade) else {
            return Err(NodeError::Transient(
                "the node is starting or stopping".into(),
            ));
        };
        let refuse =
            |why: String| NodeError::Failed(format!("refused to create {}: {why}", req.id));
        let row = app
            .store
            .sandbox(&req.id)
            .await
            .map_err(|e| NodeError::Transient(chain(&e)))?
            .ok_or_else(|| refuse("the store has no such sandbox".into()))?;
        let on = app
            .store
            .node_of(&req.id)
            .await
            .map_err(|e| NodeError::Transient(chain(&e)))?;
        if on.as_deref() != Some(self.name.as_str()) {
            return Err(refuse(format!("it is placed on {on:?}, not here")));
        }
        if row.state != crate::app::state::SandboxState::Provisioning {
            return Err(refuse(format!("it is {}", row.state)));
        }
        let lease = app.lease(&row).map_err(|e| refuse(e.to_string()))?;
        if crate::node::NodeLease::from(lease) != req.lease {
            return Err(refuse(
                "its address lease is not the one the store holds".into(),
            ));
        }
        if req
            .proxy_port
            .is_some_and(|p| p != crate::egress::PROXY_PORT)
        {
            return Err(refuse("its proxy port is not the egress port".into()));
        }
        let mut req = req.clone();
        req.home_volume = app
            .workspace_home(&row)
            .await
            .map_err(|e| refuse(chain(&e)))?;
        req.image = (&self.image).into();
        Ok(req)
    }
}

#[async_trait]
impl Node for HostNode {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn create(&self, req: &CreateSandbox) -> Result<(), NodeError> {
        if req.image.build_id != self.image.build_id {
            return Err(NodeError::Failed(format!(
                "this node has image {}, not {}",
                self.image.build_id, req.image.build_id
            )));
        }
        let req = self.checked(req).await?;
        self.inner.create(&req).await
    }

    async fn start(&self, id: &str) -> Result<(), NodeError> {
        self.inner.start(id).await
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<GuestEndpoints, NodeError> {
        self.inner.wait_ready(id, timeout).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError> {
        self.inner.stop(id, grace).await
    }

    async fn destroy(&self, id: &str) -> Result<(), NodeError> {
        self.inner.destroy(id).await
    }

    async fn inspect(&self, id: &str) -> Result<Instance, NodeError> {
        self.inner.inspect(id).await
    }

    async fn list(&self) -> Result<Vec<Instance>, NodeError> {
        self.inner.list().await
    }

    async fn liveness(&self, id: &str) -> Result<Liveness, NodeError> {
        self.inner.liveness(id).await
    }

    async fn blocked_packets(&self, id: &str) -> Result<Option<BlockedPackets>, NodeError> {
        self.inner.blocked_packets(id).await
    }
}

/// The forward proxies of this node's sandboxes, run by an app in this
/// process (which reads each owner's upstream from the store and vault).
#[derive(Debug)]
pub struct AppEgress(pub Weak<App>);

impl AppEgress {
    async fn row(
        &self,
        b: &EgressBinding,
    ) -> Result<(Arc<App>, crate::store::SandboxRow), NodeError> {
        let app = self
            .0
            .upgrade()
            .ok_or_else(|| NodeError::Transient("the node is shutting down".into()))?;
        let mut row = app
            .store
            .sandbox(&b.sandbox_id)
            .await
            .map_err(|e| NodeError::Transient(chain(&e)))?
            .ok_or_else(|| NodeError::NotFound(b.sandbox_id.clone()))?;
        row.owner_id = b.owner_id.clone();
        Ok((app, row))
    }
}

fn lease_of(b: &EgressBinding) -> Lease {
    Lease {
        index: b.lease.index,
        host: b.lease.host,
        guest: b.lease.guest,
        prefix_len: b.lease.prefix_len,
    }
}

#[async_trait]
impl NodeEgress for AppEgress {
    async fn attach(&self, b: &EgressBinding) -> Result<(), NodeError> {
        let (app, row) = self.row(b).await?;
        app.egress_attach(&row, &lease_of(b))
            .await
            .map_err(|e| NodeError::Failed(chain(&e)))
    }

    async fn rebind(&self, b: &EgressBinding) -> Result<(), NodeError> {
        let (app, row) = self.row(b).await?;
        app.egress_rebind(&row, &lease_of(b))
            .await
            .map_err(|e| NodeError::Failed(chain(&e)))
    }

    async fn detach(&self, id: &str) -> Result<(), NodeError> {
        if let Some(app) = self.0.upgrade() {
            app.egress_detach(id).await;
        }
        Ok(())
    }
}

/// This node's identity in the registry.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    /// Where replicas reach the node API.
    pub address: SocketAddr,
    pub started_at: i64,
    pub heartbeat: Duration,
    pub lease: Duration,
}

/// The node's row as it reports itself now.
pub fn report(
    id: &Identity,
    backend: &str,
    image: &ImageRef,
    probe: &dyn HostProbe,
    data_dir: &std::path::Path,
    running: usize,
) -> NodeRow {
    let now = now_ms();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    NodeRow {
        name: id.name.clone(),
        address: id.address.to_string(),
        backend: backend.to_owned(),
        image_build_id: image.build_id.clone(),
        cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        memory_total: total_memory().unwrap_or(0),
        memory_free: probe.memory_available().unwrap_or(0),
        disk_free: probe.disk_available(data_dir).unwrap_or(0),
        running: u32::try_from(running).unwrap_or(u32::MAX),
        started_at: id.started_at,
        heartbeat_at: now,
        lease_expires_at: now + i64::try_from(id.lease.as_millis()).unwrap_or(i64::MAX),
        draining: false,
    }
}

fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// What a reconciliation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Sandboxes the store no longer wants here, destroyed.
    pub destroyed: Vec<String>,
    /// Running sandboxes it wants whose forward proxy was (re)started.
    pub adopted: Vec<String>,
}

/// Make the host agree with the store: destroy what is not wanted on this
/// node; re-attach the forward proxy of what is wanted and running when
/// `adopt` (after a restart of this process, whose proxies died with it).
pub async fn reconcile(
    app: &Arc<App>,
    node: &dyn Node,
    name: &str,
    adopt: bool,
) -> Result<Reconciled, NodeError> {
    let instances = node.list().await?;
    let wanted: HashSet<String> = app
        .store
        .wanted_on(name)
        .await
        .map_err(|e| NodeError::Transient(chain(&e)))?
        .into_iter()
        .collect();
    let mut done = Reconciled::default();
    for inst in instances {
        if !wanted.contains(&inst.id) {
            // Placed here but not yet written? A row is placed before its
            // node is asked to create, so an unknown one is nobody's.
            tracing::warn!(sandbox = %inst.id, "destroying a sandbox the store does not want on this node");
            app.egress_detach(&inst.id).await;
            match node.destroy(&inst.id).await {
                Ok(()) => done.destroyed.push(inst.id),
                Err(e) => tracing::error!(sandbox = %inst.id, error = %e, "could not destroy"),
            }
        } else if adopt && inst.running {
            let Ok(Some(row)) = app.store.sandbox(&inst.id).await else {
                continue;
            };
            match app.lease(&row) {
                Ok(lease) => match app.egress_attach(&row, &lease).await {
                    Ok(()) => {
                        tracing::info!(sandbox = %row.id, "re-adopted a running sandbox");
                        done.adopted.push(row.id)
                    }
                    Err(e) => {
                        tracing::error!(sandbox = %row.id, error = %chain(&e), "could not restore egress")
                    }
                },
                Err(e) => tracing::error!(sandbox = %row.id, error = %chain(&e), "no lease"),
            }
        }
    }
    Ok(done)
}

/// A running `airlock node`.
#[derive(Debug)]
pub struct RunningNode {
    /// The node API's address.
    pub addr: SocketAddr,
    pub name: String,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    _lock: Arc<crate::instance::DataDirLock>,
}

impl RunningNode {
    /// Stop serving; the sandboxes keep running (a restart re-adopts them).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.http.await;
        self.app.stop_background();
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Wait until the node API ends (after a shutdown signal).
    pub async fn wait(self) -> std::io::Result<()> {
        let result = match self.http.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        let _ = self.shutdown.send(true);
        self.app.stop_background();
        result
    }
}

/// The host name, for a node not given a name.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// The address pool as the node API's guest network (`a.b.c.d/n`).
fn guest_net(cfg: &Config) -> Result<(Ipv4Addr, u8), StartError> {
    let bad = || {
        StartError::Config(crate::config::ConfigError::Invalid {
            field: "address_pool",
            message: "must be an IPv4 network like 10.248.0.0/16".into(),
        })
    };
    let (ip, len) = cfg.address_pool.split_once('/').ok_or_else(bad)?;
    Ok((
        ip.parse().map_err(|_| bad())?,
        len.parse().map_err(|_| bad())?,
    ))
}

/// Start `airlock node`: register, reconcile, serve the node API, renew the
/// lease until the shutdown signal.
pub async fn start(
    cfg: &Config,
    image: ImageRef,
    driver: Arc<dyn Driver>,
) -> Result<RunningNode, StartError> {
    cfg.validate_node()?;
    let token = cfg.cluster_token()?;
    let net = guest_net(cfg)?;
    let (lock, store, vault) = crate::server::open_data(cfg).await?;
    lock.record(&vault)?;
    let name = cfg.node.name.clone().unwrap_or_else(host_name);
    let host = Arc::new(HostNode::new(driver, image.clone(), name.clone()));
    // The app here only runs forward proxies: replicas drive the sandboxes.
    let seams = crate::app::Seams {
        node: host.clone(),
        guest: Arc::new(crate::app::agent::HttpGuest::default()),
        forwarders: Arc::new(crate::app::RealForwarders),
        probe: Arc::new(ProcProbe),
    };
    let app = App::with_seams(
        cfg.app_config(),
        store.clone(),
        seams,
        image.clone(),
        cfg.pool()?,
        vault,
    );
    let _ = host.app.set(Arc::downgrade(&app));
    let listener = tokio::net::TcpListener::bind(cfg.node.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.node.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.node.listen,
        source,
    })?;
    let identity = Identity {
        name,
        address: cfg.node.advertise.unwrap_or(addr),
        started_at: now_ms(),
        heartbeat: Duration::from_millis(cfg.node.heartbeat_ms),
        lease: Duration::from_millis(cfg.node.lease_ms),
    };
    let reconciled = reconcile(&app, &*host, &identity.name, true)
        .await
        .map_err(|e| StartError::Recover(e.to_string()))?;
    tracing::info!(node = %identity.name, adopted = reconciled.adopted.len(), destroyed = reconciled.destroyed.len(), "reconciled with the store");
    heartbeat_once(&store, &identity, &host, &image, &cfg.data_dir)
        .await
        .map_err(|e| StartError::Recover(format!("could not register the node: {e}")))?;
    let (shutdown, rx) = watch::channel(false);
    app.spawn(keep_lease(
        store,
        identity.clone(),
        host.clone(),
        image,
        cfg.data_dir.clone(),
        rx.clone(),
    ));
    app.spawn(keep_reconciling(
        Arc::downgrade(&app),
        host.clone(),
        identity.name.clone(),
        rx.clone(),
    ));
    let router = crate::node::wire::router(crate::node::wire::WireState {
        node: host,
        egress: Arc::new(AppEgress(Arc::downgrade(&app))),
        token: secrecy::SecretString::from(token),
        guest_net: net,
        name: identity.name.clone(),
    });
    let mut stop = rx;
    let http = tokio::spawn(crate::node::wire::serve(listener, router, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    tracing::info!(node = %identity.name, %addr, "node API listening");
    Ok(RunningNode {
        addr,
        name: identity.name,
        app,
        shutdown,
        http,
        _lock: lock,
    })
}

async fn heartbeat_once(
    store: &Store,
    id: &Identity,
    host: &HostNode,
    image: &ImageRef,
    data_dir: &std::path::Path,
) -> Result<(), String> {
    let running = host.list().await.map_err(|e| e.to_string())?.len();
    let row = report(id, &host.name(), image, &ProcProbe, data_dir, running);
    store.upsert_node(&row).await.map_err(|e| chain(&e))
}

async fn keep_lease(
    store: Store,
    id: Identity,
    host: Arc<HostNode>,
    image: ImageRef,
    data_dir: std::path::PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(id.heartbeat) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = heartbeat_once(&store, &id, &host, &image, &data_dir).await {
            tracing::warn!(error = %e, "could not renew the node's lease");
        }
    }
}

async fn keep_reconciling(
    app: Weak<App>,
    host: Arc<HostNode>,
    name: String,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(app) = app.upgrade() else { return };
        if let Err(e) = reconcile(&app, &*host, &name, false).await {
            tracing::warn!(error = %e, "could not reconcile with the store");
        }
    }
}
