//! The replica's side of many hosts: [`Cluster`] is the `Node` the app holds
//! when sandboxes run on `airlock node` processes. It places a new sandbox
//! (`placement::place` over the registry), records the choice in the
//! sandbox's row, and sends every later call for that sandbox to the node it
//! is on. The app does not know there is more than one host.

use super::placement::{self, Need};
use crate::app::admission::HostProbe;
use crate::app::{App, AppError, Forwarders};
use crate::node::{
    BlockedPackets, CreateSandbox, EgressBinding, GuestEndpoints, Instance, Liveness, Node,
    NodeEgress, NodeError,
};
use crate::store::{now_ms, NodeRow, SandboxRow, Store};
use airlock_drivers::Lease;
use async_trait::async_trait;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One node as the replica talks to it.
#[derive(Debug, Clone)]
pub struct Member {
    pub node: Arc<dyn Node>,
    pub egress: Arc<dyn NodeEgress>,
}

/// Makes the client of a registered node (the real one: `RemoteNode` over
/// HTTP; tests: fakes).
pub type Connector = Arc<dyn Fn(&NodeRow) -> Member + Send + Sync>;

/// The registry as last read, and the clients made for it.
#[derive(Default)]
struct Known {
    read_at: Option<Instant>,
    rows: Vec<NodeRow>,
    /// By node name, with the address the client was made for.
    members: HashMap<String, (String, Member)>,
    /// Sandbox id → node name (a placement never changes).
    placed: HashMap<String, String>,
}

/// See the module doc.
pub struct Cluster {
    store: Store,
    connect: Connector,
    /// What placement asks of a node besides the image.
    need: Need,
    known: Mutex<Known>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// Placements remembered at most (each is read again from the store).
const MAX_PLACED: usize = 100_000;

/// How stale the registry may be for routing and the capacity probe.
const FRESH: Duration = Duration::from_millis(1000);

impl Cluster {
    pub fn new(store: Store, connect: Connector, need: Need) -> Arc<Self> {
        Arc::new(Cluster {
            store,
            connect,
            need,
            known: Mutex::new(Known::default()),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registry, read again when older than [`FRESH`].
    pub async fn nodes(&self) -> Result<Vec<NodeRow>, NodeError> {
        {
            let k = self.known();
            if k.read_at.is_some_and(|t| t.elapsed() < FRESH) {
                return Ok(k.rows.clone());
            }
        }
        self.read_nodes().await
    }

    /// The registry as it is now (placement must see a drain at once).
    async fn read_nodes(&self) -> Result<Vec<NodeRow>, NodeError> {
        let rows =
            self.store.nodes().await.map_err(|e| {
                NodeError::Transient(format!("could not read the node registry: {e}"))
            })?;
        let mut k = self.known();
        k.read_at = Some(Instant::now());
        k.rows = rows.clone();
        // Only a cache: sandboxes other replicas destroyed leave entries
        // here, so it is dropped whole now and then and read again.
        if k.placed.len() > MAX_PLACED {
            k.placed.clear();
        }
        Ok(rows)
    }

    /// The client of a node, made once per address.
    fn member(&self, row: &NodeRow) -> Member {
        let mut k = self.known();
        if let Some((addr, m)) = k.members.get(&row.name) {
            if *addr == row.address {
                return m.clone();
            }
        }
        let m = (self.connect)(row);
        k.members
            .insert(row.name.clone(), (row.address.clone(), m.clone()));
        m
    }

    /// The node a sandbox was placed on, if any.
    async fn node_name(&self, id: &str) -> Result<Option<String>, NodeError> {
        if let Some(n) = self.known().placed.get(id) {
            return Ok(Some(n.clone()));
        }
        let name =
            self.store.node_of(id).await.map_err(|e| {
                NodeError::Transient(format!("could not read where {id} runs: {e}"))
            })?;
        if let Some(n) = &name {
            self.known().placed.insert(id.to_owned(), n.clone());
        }
        Ok(name)
    }

    /// The client for the node a sandbox is on; an error naming the node
    /// when it is gone from the registry or its lease ran out.
    async fn route(&self, id: &str) -> Result<Member, NodeError> {
        let Some(name) = self.node_name(id).await?.filter(|n| !n.is_empty()) else {
            return Err(NodeError::NotFound(id.to_owned()));
        };
        let rows = self.nodes().await?;
        let Some(row) = rows.iter().find(|n| n.name == name) else {
            return Err(NodeError::Transient(format!(
                "node {name} is not registered"
            )));
        };
        if !row.alive(now_ms()) {
            // Not worth retrying now: the reaper tries again later.
            return Err(NodeError::Failed(format!(
                "node {name} is lost: its lease expired at {}",
                crate::app::rfc3339(row.lease_expires_at)
            )));
        }
        Ok(self.member(row))
    }

    /// Where the sandbox goes: where it already is, or a placement.
    async fn place(&self, req: &CreateSandbox) -> Result<Member, NodeError> {
        if self.node_name(&req.id).await?.is_none() {
            let rows = self.read_nodes().await?;
            let load: HashMap<String, u32> = self
                .store
                .load_by_node()
                .await
                .map_err(|e| NodeError::Transient(format!("could not count the nodes' load: {e}")))?
                .into_iter()
                .collect();
            let need = Need {
                image_build_id: req.image.build_id.clone(),
                ..self.need.clone()
            };
            let chosen = placement::place(&rows, &load, &need, now_ms())
                .map_err(|e| NodeError::Failed(format!("could not place the sandbox: {e}")))?;
            let on = self
                .store
                .place_sandbox(&req.id, &chosen)
                .await
                .map_err(|e| {
                    NodeError::Transient(format!("could not record the placement: {e}"))
                })?;
            match on {
                Some(n) if n.is_empty() => {
                    return Err(NodeError::Failed(
                        "the sandbox was deleted before it was placed".into(),
                    ))
                }
                Some(n) => {
                    tracing::info!(sandbox = %req.id, node = %n, "placed");
                    self.known().placed.insert(req.id.clone(), n);
                }
                None => return Err(NodeError::NotFound(req.id.clone())),
            }
        }
        self.route(&req.id).await
    }

    /// A sandbox is gone for good: forget where it was.
    fn forget(&self, id: &str) {
        self.known().placed.remove(id);
    }

    /// The most memory and disk any open node has (the admission's probe).
    fn room(&self) -> (Option<u64>, Option<u64>) {
        let k = self.known();
        let now = now_ms();
        let open = k.rows.iter().filter(|n| n.alive(now) && !n.draining);
        let (mut mem, mut disk) = (None, None);
        for n in open {
            mem = Some(mem.unwrap_or(0).max(n.memory_free));
            disk = Some(disk.unwrap_or(0).max(n.disk_free));
        }
        (mem.or(Some(0)), disk.or(Some(0)))
    }

    /// Keep the registry fresh for the capacity probe (which cannot wait).
    pub async fn refresh(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.nodes().await {
                tracing::warn!(error = %e, "could not read the node registry");
            }
            tokio::select! {
                _ = tokio::time::sleep(FRESH) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

#[async_trait]
impl Node for Cluster {
    fn name(&self) -> String {
        "cluster".into()
    }

    async fn create(&self, req: &CreateSandbox) -> Result<(), NodeError> {
        self.place(req).await?.node.create(req).await
    }

    async fn start(&self, id: &str) -> Result<(), NodeError> {
        self.route(id).await?.node.start(id).await
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<GuestEndpoints, NodeError> {
        let m = self.route(id).await?;
        let at = m.node.wait_ready(id, timeout).await?;
        let std::net::IpAddr::V4(guest) = at.agent.ip() else {
            return Err(NodeError::Failed(format!(
                "node answered a non-IPv4 guest address {}",
                at.agent
            )));
        };
        m.node.endpoints(id, guest).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError> {
        self.route(id).await?.node.stop(id, grace).await
    }

    async fn destroy(&self, id: &str) -> Result<(), NodeError> {
        match self.route(id).await {
            // Never placed: make sure it never is (a create on another
            // replica may be about to place it), then nothing was made.
            Err(NodeError::NotFound(_)) => {
                let now = self.store.withdraw_placement(id).await.map_err(|e| {
                    NodeError::Transient(format!("could not withdraw the placement: {e}"))
                })?;
                match now.filter(|n| !n.is_empty()) {
                    None => Ok(()),
                    Some(_) => {
                        self.forget(id);
                        let m = self.route(id).await?;
                        m.node.destroy(id).await
                    }
                }
            }
            Err(e) => Err(e),
            Ok(m) => {
                m.node.destroy(id).await?;
                self.forget(id);
                Ok(())
            }
        }
    }

    async fn inspect(&self, id: &str) -> Result<Instance, NodeError> {
        self.route(id).await?.node.inspect(id).await
    }

    /// Every sandbox on every node that is up.
    async fn list(&self) -> Result<Vec<Instance>, NodeError> {
        let now = now_ms();
        let mut all = Vec::new();
        for row in self.nodes().await?.iter().filter(|n| n.alive(now)) {
            all.extend(self.member(row).node.list().await?);
        }
        Ok(all)
    }

    async fn liveness(&self, id: &str) -> Result<Liveness, NodeError> {
        self.route(id).await?.node.liveness(id).await
    }

    async fn blocked_packets(&self, id: &str) -> Result<Option<BlockedPackets>, NodeError> {
        self.route(id).await?.node.blocked_packets(id).await
    }

    async fn endpoints(&self, id: &str, guest: Ipv4Addr) -> Result<GuestEndpoints, NodeError> {
        self.route(id).await?.node.endpoints(id, guest).await
    }
}

/// The egress forward proxies, run by the node each sandbox is on.
#[derive(Debug)]
pub struct ClusterForwarders(pub Arc<Cluster>);

fn binding(row: &SandboxRow, lease: &Lease) -> EgressBinding {
    EgressBinding {
        sandbox_id: row.id.clone(),
        owner_id: row.owner_id.clone(),
        lease: (*lease).into(),
    }
}

#[async_trait]
impl Forwarders for ClusterForwarders {
    async fn attach(
        &self,
        _app: &Arc<App>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        let m = self
            .0
            .route(&row.id)
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))?;
        m.egress
            .attach(&binding(row, lease))
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))
    }

    async fn detach(&self, _app: &App, id: &str) {
        match self.0.route(id).await {
            Ok(m) => {
                if let Err(e) = m.egress.detach(id).await {
                    tracing::warn!(sandbox = id, error = %e, "could not stop the egress proxy");
                }
            }
            Err(NodeError::NotFound(_)) => {}
            // A lost node's proxies went with it.
            Err(e) => {
                tracing::warn!(sandbox = id, error = %e, "could not reach the node to stop the egress proxy")
            }
        }
    }

    async fn rebind(
        &self,
        _app: &Arc<App>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        let m = self
            .0
            .route(&row.id)
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))?;
        m.egress
            .rebind(&binding(row, lease))
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))
    }
}

/// The admission's view of room: the best open node's (see [`Cluster::room`]).
#[derive(Debug)]
pub struct ClusterProbe(pub Arc<Cluster>);

impl HostProbe for ClusterProbe {
    fn memory_available(&self) -> Option<u64> {
        self.0.room().0
    }

    fn disk_available(&self, _path: &Path) -> Option<u64> {
        self.0.room().1
    }
}
