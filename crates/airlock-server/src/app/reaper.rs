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
                let ok = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.agent.health(endpoints.agent, &row.agent_token),
                )
                .await
                .map(|r| r.is_ok())
                .unwrap_or(false);
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
