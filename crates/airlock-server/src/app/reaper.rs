//! The reaper: heartbeats for ready sandboxes, destruction of failed and idle
//! ones, and forgetting old history. Runs until the shutdown signal.

use super::state::SandboxState;
use super::App;
use crate::store::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// Consecutive missed heartbeats before a ready sandbox is declared failed.
const MISSED_HEARTBEATS: u32 = 3;

impl App {
    pub async fn run_reaper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut missed: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
        loop {
            self.reap_once(&mut missed).await;
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.reaper_every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn reap_once(self: &Arc<Self>, missed: &mut std::collections::HashMap<String, u32>) {
        let idle_before =
            now_ms() - i64::try_from(self.cfg.idle_ttl.as_millis()).unwrap_or(i64::MAX);
        match self.store.reapable(idle_before).await {
            Ok(rows) => {
                for row in rows {
                    if row.state == SandboxState::Ready {
                        tracing::info!(sandbox = %row.id, "reaping an idle sandbox");
                        if let Ok(true) = self
                            .store
                            .transition(
                                &row.id,
                                &[SandboxState::Ready],
                                SandboxState::Stopping,
                                Some("idle for longer than the idle TTL"),
                            )
                            .await
                        {
                            self.teardown(&row.id, SandboxState::Stopped).await;
                        }
                    } else {
                        self.teardown(&row.id, row.state).await;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reaper could not list sandboxes"),
        }
        if let Ok(rows) = self.store.live_sandboxes().await {
            for row in rows.into_iter().filter(|r| r.state == SandboxState::Ready) {
                let Ok(endpoints) = self.ready_endpoints(&row) else {
                    continue;
                };
                let answer = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.agent.health(endpoints.agent, &row.agent_token),
                )
                .await;
                let ok = match answer {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) if our_side(&e) => {
                        // Out of descriptors or memory here says nothing
                        // about the guest: neither a miss nor a heartbeat.
                        tracing::warn!(sandbox = %row.id, error = %super::sandboxes::chain(&e), "health check failed on our side; not counted against the sandbox");
                        continue;
                    }
                    _ => false,
                };
                if ok {
                    missed.remove(&row.id);
                    let _ = self.store.touch_heartbeat(&row.id).await;
                } else {
                    let n = missed.entry(row.id.clone()).or_default();
                    *n += 1;
                    if *n >= MISSED_HEARTBEATS {
                        missed.remove(&row.id);
                        self.fail(
                            &row.id,
                            "heartbeat",
                            "the sandbox's agent stopped answering",
                        )
                        .await;
                    }
                }
            }
        }
        self.reap_logins().await;
        self.finish_user_removals().await;
        if let Err(e) = self.remove_orphan_volumes().await {
            tracing::error!(error = %e, "could not look for removed users' volumes");
        }
        let forget_before =
            now_ms() - i64::try_from(self.cfg.history_ttl.as_millis()).unwrap_or(i64::MAX);
        let _ = self.store.purge_finished(forget_before).await;
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
