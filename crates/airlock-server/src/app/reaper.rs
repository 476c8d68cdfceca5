//! The reaper and the supervisor. The supervisor (every `supervise_every`)
//! asks the node whether each ready sandbox's supervisor and payload are
//! alive, and heartbeats its agent and its display: a death fails the
//! sandbox at once with a reason naming what died; three missed heartbeats
//! fail it too. The reaper (every `reaper_every`) stops idle sandboxes,
//! finishes teardowns that did not complete, and forgets old history.
//! Both run until the shutdown signal.

use super::state::{AdvanceError, Event, SandboxState};
use super::App;
use crate::node::{Liveness, NodeError};
use crate::store::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// Consecutive missed heartbeats before a ready sandbox is declared failed.
const MISSED_HEARTBEATS: u32 = 3;

pub(crate) const IDLE_REASON: &str = "idle for longer than the idle TTL";

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl App {
    pub async fn run_reaper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut reap = tokio::time::interval(self.cfg.reaper_every);
        let mut watch = tokio::time::interval(self.cfg.supervise_every);
        // Lost nodes are looked for more often than the reaper runs: a
        // node's sandboxes fail within its lease plus this.
        let mut nodes = tokio::time::interval(Duration::from_secs(2));
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        nodes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Among replicas sharing one database, only the leader does this work.
        loop {
            tokio::select! {
                _ = watch.tick() => if self.leading().await { self.supervise_once().await },
                _ = reap.tick() => if self.leading().await { self.reap_once().await },
                _ = nodes.tick(), if self.cfg.cluster => if self.leading().await { self.cluster_once().await },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One round of supervision over the ready sandboxes.
    pub(crate) async fn supervise_once(self: &Arc<Self>) {
        if let Some(free) = self.admission.data_disk_available() {
            super::reserve::adjust(&self.cfg.data_dir, free);
        }
        let Ok(rows) = self.store.live_sandboxes().await else {
            return;
        };
        let ready: Vec<_> = rows
            .into_iter()
            .filter(|r| matches!(r.state, SandboxState::Ready | SandboxState::Pooled))
            .collect();
        {
            let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            missed.retain(|id, _| ready.iter().any(|r| &r.id == id));
        }
        for row in ready {
            match self.node.liveness(&row.id).await {
                Ok(Liveness::Alive) => {}
                Ok(Liveness::Dead(what)) => {
                    self.fail(&row.id, "died", &format!("the sandbox died: {what}"))
                        .await;
                    continue;
                }
                Err(NodeError::NotFound(_)) => {
                    self.fail(&row.id, "lost", "the node no longer holds the sandbox")
                        .await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(sandbox = %row.id, error = %e, "could not ask the node whether the sandbox lives");
                }
            }
            let Ok(endpoints) = self.ready_endpoints(&row).await else {
                continue;
            };
            let agent = tokio::time::timeout(
                Duration::from_secs(5),
                self.guest.health(endpoints.agent, &row.agent_token),
            )
            .await;
            let miss = match agent {
                Ok(Ok(_)) => None,
                Ok(Err(e)) if our_side(&e) => {
                    // Out of descriptors or memory here says nothing
                    // about the guest: neither a miss nor a heartbeat.
                    tracing::warn!(sandbox = %row.id, error = %super::sandboxes::chain(&e), "health check failed on our side; not counted against the sandbox");
                    continue;
                }
                _ => Some("the sandbox's agent stopped answering".to_owned()),
            };
            let miss = match miss {
                Some(m) => Some(m),
                None => self
                    .guest
                    .display_answers(endpoints.display, &row.vnc_password)
                    .await
                    .err()
                    .map(|why| format!("the sandbox's display stopped answering ({why})")),
            };
            let failed = {
                let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
                match &miss {
                    None => {
                        missed.remove(&row.id);
                        None
                    }
                    Some(why) => {
                        let n = missed.entry(row.id.clone()).or_default();
                        *n += 1;
                        (*n >= MISSED_HEARTBEATS).then(|| {
                            missed.remove(&row.id);
                            why.clone()
                        })
                    }
                }
            };
            if miss.is_none() {
                let _ = self.store.touch_heartbeat(&row.id).await;
            }
            if let Some(why) = failed {
                self.fail(&row.id, "heartbeat", &why).await;
            }
        }
    }

    /// One round of reaping.
    pub(crate) async fn reap_once(self: &Arc<Self>) {
        let idle_before = now_ms() - ms(self.cfg.idle_ttl);
        // Left `stopping` that long: its teardown failed (a destroy); again.
        let stuck_before = now_ms() - ms(self.cfg.stuck_stopping);
        match self.store.reapable(idle_before, stuck_before).await {
            Ok(rows) => {
                for row in rows {
                    if row.state == SandboxState::Ready {
                        tracing::info!(sandbox = %row.id, "reaping an idle sandbox");
                        let stop = Event::StopRequested(Some(IDLE_REASON.into()));
                        match self.advance(&row.id, stop).await {
                            Ok(moved) => self.perform(&row.id, moved.effects, true).await,
                            Err(AdvanceError::Store(e)) => {
                                tracing::error!(sandbox = %row.id, error = %e, "could not stop an idle sandbox")
                            }
                            Err(_) => {}
                        }
                    } else {
                        self.teardown(&row.id).await;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reaper could not list sandboxes"),
        }
        self.reap_logins().await;
        self.finish_user_removals().await;
        if let Err(e) = self.remove_orphan_volumes().await {
            tracing::error!(error = %e, "could not look for removed users' volumes");
        }
        let forget_before = now_ms() - ms(self.cfg.history_ttl);
        let _ = self.store.purge_finished(forget_before).await;
    }

    /// Stop a sandbox for a reason of the control plane's own (a user's
    /// removal) and wait for its teardown.
    pub(crate) async fn stop_and_wait(self: &Arc<Self>, id: &str, reason: &str) {
        match self
            .advance(id, Event::StopRequested(Some(reason.to_owned())))
            .await
        {
            Ok(moved) => self.perform(id, moved.effects, true).await,
            // Already on its way out: finish what an earlier run began.
            Err(AdvanceError::Refused(r)) if r.from == SandboxState::Stopping => {
                self.teardown(id).await
            }
            Err(AdvanceError::Store(e)) => {
                tracing::error!(sandbox = id, error = %e, "could not stop a sandbox")
            }
            Err(_) => {}
        }
    }
}

/// Whether a failed call to an agent failed for want of something on the
/// control plane's side (descriptors, memory, buffers), not the guest's.
pub(crate) fn our_side(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustix::io::Errno;
    let ours = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].map(|e| e.raw_os_error());
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some_and(|code| ours.contains(&code)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::agent::{AgentClient, AgentError};

    #[test]
    fn only_errors_of_our_own_side_are_ours() {
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert!(our_side(&emfile));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!our_side(&refused));
        let status = AgentError::Status {
            status: 500,
            message: "x".into(),
        };
        assert!(!our_side(&status));
    }

    /// With every descriptor in use, the health check of a live agent fails
    /// with EMFILE; the reaper must see that as its own trouble. (Own test
    /// process: nextest runs each test alone, so the lowered limit stays here.)
    #[tokio::test]
    async fn a_health_check_without_descriptors_is_our_fault() {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = AgentClient::new();
        let before = getrlimit(Resource::Nofile);
        let open = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
        let low = rustix::process::Rlimit {
            current: Some(open + 2),
            maximum: before.maximum,
        };
        setrlimit(Resource::Nofile, low).expect("lower the limit");
        let mut hold = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hold.push(f);
        }
        let got = client.health(addr, "token").await;
        drop(hold);
        setrlimit(Resource::Nofile, before).expect("restore the limit");
        let err: AgentError = got.expect_err("no descriptor left");
        assert!(our_side(&err), "{err:?}");
        drop(listener);
    }
}
