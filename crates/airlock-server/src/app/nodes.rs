//! The cluster's nodes as an operator sees them over the API: the registry
//! (docs/cluster.md) with each node's state, lease, capacity and load, and
//! draining or resuming one. Admins only; a single host (SQLite, the node in
//! the process) registers no node, so its list is empty.

use super::{rfc3339, AppError};
use crate::store::{NodeRow, Store, UserRow};
use serde::Serialize;
use std::collections::HashMap;

/// Where a node stands, as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Its lease is current and it takes new sandboxes.
    Up,
    /// Its lease is current; it keeps what it runs but takes nothing new.
    Draining,
    /// Its lease ran out: its sandboxes are failed ("node lost").
    Lost,
}

/// One node of the registry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    /// Where replicas reach its node API (`host:port`).
    pub address: String,
    pub state: NodeState,
    /// The operator stopped placement on it (`drain`); kept while it is lost.
    pub draining: bool,
    /// RFC 3339.
    pub lease_expires_at: String,
    /// Milliseconds until the lease runs out; negative once it has.
    pub lease_left_ms: i64,
    pub heartbeat_at: String,
    pub started_at: String,
    /// The driver it boots sandboxes with (`nspawn`, `qemu`, `firecracker`).
    pub backend: String,
    pub image_build_id: String,
    pub cpus: u32,
    /// Bytes, as the node last reported them.
    pub memory_total: u64,
    pub memory_free: u64,
    pub disk_free: u64,
    /// Sandboxes the node last reported holding resources for.
    pub running: u32,
    /// Live sandboxes the store has placed on it (wanted, or still holding
    /// an address lease): what placement counts.
    pub load: u32,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// Nodes are the operator's: an admin that is not disabled. The token-less
/// `local` user is not one by being local.
pub fn may_operate(user: &UserRow) -> bool {
    user.admin && !user.disabled
}

/// A registry row as the API shows it at `now` (ms).
pub fn view(n: NodeRow, load: u32, now: i64) -> NodeView {
    let state = match (n.alive(now), n.draining) {
        (false, _) => NodeState::Lost,
        (true, true) => NodeState::Draining,
        (true, false) => NodeState::Up,
    };
    NodeView {
        state,
        draining: n.draining,
        lease_expires_at: rfc3339(n.lease_expires_at),
        lease_left_ms: n.lease_expires_at.saturating_sub(now),
        heartbeat_at: rfc3339(n.heartbeat_at),
        started_at: rfc3339(n.started_at),
        load,
        name: n.name,
        address: n.address,
        backend: n.backend,
        image_build_id: n.image_build_id,
        cpus: n.cpus,
        memory_total: n.memory_total,
        memory_free: n.memory_free,
        disk_free: n.disk_free,
        running: n.running,
    }
}

/// Every registered node, by name.
pub async fn list(store: &Store, now: i64) -> Result<NodeList, AppError> {
    let load: HashMap<String, u32> = store.load_by_node().await?.into_iter().collect();
    let nodes = store
        .nodes()
        .await?
        .into_iter()
        .map(|n| {
            let l = load.get(&n.name).copied().unwrap_or(0);
            view(n, l, now)
        })
        .collect();
    Ok(NodeList { nodes })
}

/// Stop (`true`) or resume (`false`) placement on `name`; the node as it is
/// now. What already runs there keeps running: `airlock node drain` waits
/// for it to end.
pub async fn set_draining(
    store: &Store,
    name: &str,
    draining: bool,
    now: i64,
) -> Result<NodeView, AppError> {
    let unknown = || AppError::NotFound(format!("node {name:?}"));
    if !store.set_node_draining(name, draining).await? {
        return Err(unknown());
    }
    let row = store.node(name).await?.ok_or_else(unknown)?;
    let load = store
        .load_by_node()
        .await?
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, l)| l);
    tracing::info!(node = %name, draining, "node placement changed by an admin");
    Ok(view(row, load, now))
}
