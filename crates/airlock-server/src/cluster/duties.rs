//! What exactly one process does for the whole cluster, and how it is
//! chosen: a PostgreSQL advisory lock ([`crate::store::Store::try_lead`]),
//! held on a connection of its own. A leader that dies lets go with its
//! connection, and another replica takes over at its next tick.

use crate::app::App;
use crate::store::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// The advisory lock key of the leader ("airlock" in ASCII).
const LEADER_KEY: i64 = 0x0061_6972_6c6f_636b;

/// A sandbox in `provisioning` or `booting` this long past its boot
/// timeout has nobody driving it.
const ABANDONED_AFTER: Duration = Duration::from_secs(30);

impl App {
    /// Whether this process leads now; tries to become the leader if no one
    /// holds the lock.
    pub async fn leading(&self) -> bool {
        let mut leader = self.leader.lock().await;
        if let Some(l) = leader.as_mut() {
            if l.holds().await {
                return true;
            }
            tracing::warn!("lost the leadership (its database connection ended)");
            *leader = None;
        }
        match self.store.try_lead(LEADER_KEY).await {
            Ok(Some(l)) => {
                if self.cfg.cluster {
                    tracing::info!("leading: this replica now reaps, supervises and recovers");
                }
                *leader = Some(l);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not ask for the leadership");
                false
            }
        }
    }

    /// One round of the leader's cluster work: fail the sandboxes of lost
    /// nodes, and those a replica left half-made.
    pub async fn cluster_once(self: &Arc<Self>) {
        let now = now_ms();
        match self.store.on_lost_nodes(now).await {
            Ok(lost) => {
                for (id, node, expired) in lost {
                    let why = format!(
                        "node lost: {node} stopped renewing its lease, which expired at {}",
                        crate::app::rfc3339(expired)
                    );
                    tracing::warn!(sandbox = %id, %node, "failing a sandbox of a lost node");
                    self.fail(&id, "node_lost", &why).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for lost nodes"),
        }
        let limit = self.cfg.boot_timeout + ABANDONED_AFTER;
        let before = now - i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
        match self.store.abandoned(before).await {
            Ok(ids) => {
                for id in ids {
                    self.fail(
                        &id,
                        "abandoned",
                        "nobody finished making it: the replica that started it went away",
                    )
                    .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for abandoned sandboxes"),
        }
    }
}
