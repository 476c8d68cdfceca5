//! `airlock up` as one of many replicas (`[cluster] enabled`): the app over
//! a [`Cluster`] of registered nodes instead of a driver in this process.

use super::placement::Need;
use super::router::{Cluster, ClusterForwarders, ClusterProbe, Connector, Member};
use crate::app::Seams;
use crate::config::Config;
use crate::node::remote::RemoteNode;
use crate::node::tunnel::Tunnels;
use crate::server::{Running, StartError};
use crate::store::{now_ms, NodeRow};
use airlock_drivers::ImageRef;
use secrecy::SecretString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// How long a replica waits at start for a node to learn the image from.
const WAIT_FOR_NODES: Duration = Duration::from_secs(60);

/// Clients of the registered nodes over HTTP, sharing one set of tunnels.
fn connector(token: SecretString, tunnels: Arc<Tunnels>) -> Connector {
    Arc::new(move |row: &NodeRow| {
        // A name that does not resolve yields a client whose every call
        // fails as unreachable, naming the address.
        let addr = row
            .address
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let remote = Arc::new(RemoteNode::with_tunnels(
            row.name.clone(),
            addr,
            token.clone(),
            tunnels.clone(),
        ));
        Member {
            node: remote.clone(),
            egress: remote,
        }
    })
}

/// The image build the nodes that are up hold (the most common one): a
/// replica names the build, each node boots its own copy of it.
async fn image_of_nodes(cluster: &Cluster) -> Result<ImageRef, StartError> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_NODES;
    loop {
        let now = now_ms();
        if let Ok(rows) = cluster.nodes().await {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for n in rows.iter().filter(|n| n.alive(now)) {
                match counts.iter_mut().find(|(b, _)| *b == n.image_build_id) {
                    Some((_, c)) => *c += 1,
                    None => counts.push((n.image_build_id.clone(), 1)),
                }
            }
            if let Some((build_id, _)) = counts.into_iter().max_by_key(|(_, c)| *c) {
                return Ok(ImageRef {
                    build_id,
                    layers: Vec::new(),
                });
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::Recover(format!(
                "no node registered within {}s: start `airlock node` on a host first",
                WAIT_FOR_NODES.as_secs()
            )));
        }
        tracing::info!("waiting for a node to register");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Start a replica.
pub async fn start(cfg: &Config) -> Result<Running, StartError> {
    cfg.validate()?;
    let token = SecretString::from(cfg.cluster_token()?);
    let opened = crate::server::open_data(cfg).await?;
    let app_cfg = cfg.app_config();
    let need = Need {
        image_build_id: String::new(),
        memory: app_cfg.reserve_memory,
        min_free_memory: app_cfg.min_free_memory,
        min_free_disk: app_cfg.min_free_disk,
    };
    let tunnels = Arc::new(Tunnels::new());
    let cluster = Cluster::new(opened.1.clone(), connector(token, tunnels.clone()), need);
    let image = image_of_nodes(&cluster).await?;
    tracing::info!(image = %image.build_id, "the nodes hold this image");
    let seams = Seams {
        node: cluster.clone(),
        guest: Arc::new(crate::app::agent::HttpGuest::default()),
        forwarders: Arc::new(ClusterForwarders(cluster.clone())),
        probe: Arc::new(ClusterProbe(cluster.clone())),
    };
    let running = crate::server::serve(cfg, image, seams, opened).await?;
    running
        .app
        .spawn(cluster.refresh(running.shutdown_handle().subscribe()));
    running
        .app
        .spawn(relay_stopping(Arc::downgrade(&running.app)));
    running.app.spawn(sweep_tunnels(tunnels));
    running.app.spawn(running.app.clone().keep_replica_lease());
    Ok(running)
}

/// A sandbox another replica stops: close the viewers this one serves for
/// it, as for one it stops itself.
async fn relay_stopping(app: std::sync::Weak<crate::app::App>) {
    loop {
        let Some(store) = app.upgrade().map(|a| a.store.clone()) else {
            return;
        };
        match store.listen_stopping().await {
            Ok(Some(mut listener)) => loop {
                match listener.recv().await {
                    Ok(n) => {
                        let Some(app) = app.upgrade() else { return };
                        let _ = app.stopping.send(n.payload().to_owned());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the stopping notifications; listening again");
                        break;
                    }
                }
            },
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "cannot listen for stopping sandboxes"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Tunnels no pipe used for a while go (a sandbox another replica
/// destroyed leaves its tunnels here until then).
async fn sweep_tunnels(tunnels: Arc<Tunnels>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let gone = tunnels.sweep(Duration::from_secs(300));
        if gone > 0 {
            tracing::debug!(gone, "closed idle tunnels");
        }
    }
}
