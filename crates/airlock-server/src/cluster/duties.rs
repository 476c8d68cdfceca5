//! What exactly one process does for the whole cluster, and how it is
//! chosen: a PostgreSQL advisory lock ([`crate::store::Store::try_lead`]),
//! held on a connection of its own. A leader that dies lets go with its
//! connection, and another replica takes over at its next tick.

use crate::app::App;
use crate::store::{now_ms, NodeRow};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The advisory lock key of the leader ("airlock" in ASCII).
const LEADER_KEY: i64 = 0x0061_6972_6c6f_636b;

/// A sandbox in `provisioning` or `booting` this long past its boot
/// timeout has nobody driving it.
const ABANDONED_AFTER: Duration = Duration::from_secs(30);

/// A login with no driver recorded this long after its creation has none.
const UNCLAIMED_LOGIN: Duration = Duration::from_secs(30);

/// How often a replica renews its lease, and how long one lasts.
pub const REPLICA_HEARTBEAT: Duration = Duration::from_secs(2);
pub const REPLICA_LEASE: Duration = Duration::from_secs(10);

/// What the leader has seen of each node's heartbeats, on its own clock: a
/// node is lost when its heartbeat has not changed for its lease's length,
/// counted from when this process saw it change or became the leader,
/// whichever is later. So neither a clock that differs between hosts nor a
/// database that was away (its leases all expired meanwhile) fails a node
/// that is still renewing.
#[derive(Debug, Default)]
pub struct Watch {
    since: Option<Instant>,
    seen: HashMap<String, (i64, Instant)>,
}

impl Watch {
    /// Leading from now on: nothing seen before counts.
    fn lead(&mut self, now: Instant) {
        self.since = Some(now);
        self.seen.clear();
    }

    /// The nodes lost as of `now`, after noting the heartbeats in `rows`.
    pub fn lost<'a>(&mut self, rows: &'a [NodeRow], now: Instant) -> Vec<&'a NodeRow> {
        let since = *self.since.get_or_insert(now);
        self.seen
            .retain(|name, _| rows.iter().any(|r| &r.name == name));
        rows.iter()
            .filter(|n| {
                let seen = self
                    .seen
                    .entry(n.name.clone())
                    .or_insert((n.heartbeat_at, now));
                if seen.0 != n.heartbeat_at {
                    *seen = (n.heartbeat_at, now);
                }
                let lease = u64::try_from(n.lease_expires_at - n.heartbeat_at).unwrap_or(0);
                let quiet = now.saturating_duration_since(seen.1.max(since));
                quiet >= Duration::from_millis(lease)
            })
            .collect()
    }
}

impl App {
    /// Whether this process leads now; tries to become the leader if no one
    /// holds the lock.
    pub async fn leading(&self) -> bool {
        let mut leader = self.leader.lock().await;
        if let Some(l) = leader.as_mut() {
            if l.leading() {
                if l.holds().await {
                    return true;
                }
                tracing::warn!("lost the leadership (its database connection ended)");
                *leader = None;
            }
        }
        // A follower asks again on the connection it asked on before.
        match self.store.contend(LEADER_KEY, leader.take()).await {
            Ok(Some(l)) => {
                let won = l.leading();
                if won {
                    self.watch().lead(Instant::now());
                    if self.cfg.cluster {
                        tracing::info!("leading: this replica now reaps, supervises and recovers");
                    }
                }
                *leader = Some(l);
                won
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not ask for the leadership");
                false
            }
        }
    }

    /// Renew this replica's lease until the app goes (`cluster` only).
    pub async fn keep_replica_lease(self: Arc<Self>) {
        let started = now_ms();
        loop {
            let now = now_ms();
            let until = now + i64::try_from(REPLICA_LEASE.as_millis()).unwrap_or(i64::MAX);
            if let Err(e) = self
                .store
                .renew_replica(&self.replica_id, started, now, until)
                .await
            {
                tracing::warn!(error = %e, "could not renew this replica's lease");
            }
            tokio::time::sleep(REPLICA_HEARTBEAT).await;
        }
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.node_watch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One round of the leader's cluster work: fail the sandboxes of lost
    /// nodes, and those a replica left half-made.
    pub async fn cluster_once(self: &Arc<Self>) {
        let now = now_ms();
        match self.store.nodes().await {
            Ok(rows) => {
                let lost: Vec<(String, i64)> = self
                    .watch()
                    .lost(&rows, Instant::now())
                    .into_iter()
                    .map(|n| (n.name.clone(), n.heartbeat_at))
                    .collect();
                for (node, last) in lost {
                    let ids = match self.store.wanted_on(&node).await {
                        Ok(ids) => ids,
                        Err(e) => {
                            tracing::warn!(error = %e, %node, "could not list a lost node's sandboxes");
                            continue;
                        }
                    };
                    for id in ids {
                        let why = format!(
                            "node lost: {node} stopped renewing its lease (its last heartbeat was at {})",
                            crate::app::rfc3339(last)
                        );
                        tracing::warn!(sandbox = %id, %node, "failing a sandbox of a lost node");
                        self.fail(&id, "node_lost", &why).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the node registry"),
        }
        // Logins whose replica went away: this one drives them on.
        let states: Vec<&str> = crate::app::logins::state::LoginState::LIVE
            .iter()
            .map(|s| s.as_str())
            .collect();
        let unclaimed = now - i64::try_from(UNCLAIMED_LOGIN.as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .take_orphaned_logins(&states, now, unclaimed, &self.replica_id)
            .await
        {
            Ok(ids) => {
                for id in ids {
                    tracing::warn!(login = %id, "taking over a login whose replica went away");
                    self.spawn_driver(&id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for orphaned logins"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, heartbeat_at: i64) -> NodeRow {
        NodeRow {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            backend: "fake".into(),
            image_build_id: "b".into(),
            cpus: 1,
            memory_total: 0,
            memory_free: 0,
            disk_free: 0,
            running: 0,
            started_at: 0,
            heartbeat_at,
            // A 10 s lease, on the node's own clock.
            lease_expires_at: heartbeat_at + 10_000,
            draining: false,
        }
    }

    fn beat(n: &mut NodeRow) {
        n.heartbeat_at += 2_000;
        n.lease_expires_at = n.heartbeat_at + 10_000;
    }

    /// Heartbeats that keep changing keep a node, whatever its clock says;
    /// one silent for its lease's length on the leader's clock is lost; a
    /// new leader gives every node a whole lease first.
    #[test]
    fn a_node_is_lost_after_a_silent_lease_on_the_leaders_clock() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut w = Watch::default();
        w.lead(t0);
        // "b" reports times an hour in the past (a skewed clock) but renews.
        let mut a = row("a", 5_000_000);
        let mut b = row("b", 1_400_000);
        for i in 1..=30u64 {
            beat(&mut a);
            beat(&mut b);
            let rows = [a.clone(), b.clone()];
            assert!(w.lost(&rows, s(i * 2)).is_empty(), "lost while renewing");
        }
        // "a" stops: lost once 10 s pass on the leader's clock, not before.
        for i in 31..=34u64 {
            beat(&mut b);
            let rows = [a.clone(), b.clone()];
            assert!(w.lost(&rows, s(i * 2)).is_empty(), "lost too early at {i}");
        }
        beat(&mut b);
        let rows = [a.clone(), b.clone()];
        let lost: Vec<_> = w
            .lost(&rows, s(70))
            .iter()
            .map(|n| n.name.clone())
            .collect();
        assert_eq!(lost, ["a"]);
        // The database was away for a minute: a new leader waits a lease.
        w.lead(s(200));
        let rows = [a.clone(), b.clone()];
        assert!(w.lost(&rows, s(205)).is_empty(), "no grace after leading");
        assert_eq!(w.lost(&rows, s(216)).len(), 2);
    }
}
