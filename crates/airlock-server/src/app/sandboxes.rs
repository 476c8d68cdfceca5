//! The sandbox lifecycle: create, boot until ready, exec, delete, and recovery
//! after a restart. Every state change goes through [`App::advance`] (the
//! state machine's compare-and-set), which persists the state before the
//! effects it names run, so whatever a crash interrupts can be resumed or
//! cleaned up. Host work goes through the [`Node`](crate::node::Node), guest
//! questions through the [`Guest`](super::agent::Guest).

use super::admission::{Ask, Permit};
use super::pool::{self, Claim, Created};
use super::state::{self, AdvanceError, Effect, Event, Moved, SandboxState};
use super::{App, AppError};
use crate::node::{CreateSandbox, GuestEndpoints, NodeError};
use crate::store::{now_ms, SandboxRow, StoreError, UserRow};
use airlock_drivers::Lease;
use airlock_proto::agent::{ExecRequest, ExecResponse};
use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) fn new_id() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

fn secret(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

/// Why a restart found a sandbox gone.
pub(crate) const LOST_IN_RESTART: &str = "the sandbox was interrupted by a control plane restart";

impl App {
    /// `POST /sandboxes`: admitted against the caller's quotas and the host's
    /// room, then recorded; the boot runs in the background.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
    ) -> Result<SandboxRow, AppError> {
        Ok(self.create(user, kind).await?.row)
    }

    /// [`Self::create_sandbox`], saying whether a warm pool served it.
    pub async fn create(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
    ) -> Result<Created, AppError> {
        if kind == SandboxKind::Workspace {
            return self.create_workspace(user, None, false).await;
        }
        let id = new_id();
        let permit = self.admission.admit(&user.id, Ask::Sandbox, &id).await?;
        self.create_or_claim(user, kind, id, permit).await
    }

    /// A sandbox airlock makes for a login it already admitted (the
    /// workspace it delivers to, a browser sandbox made again after a
    /// restart): the host's room is checked, the user's caps are not.
    pub(crate) async fn create_sandbox_for(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
    ) -> Result<SandboxRow, AppError> {
        if kind == SandboxKind::Workspace {
            return Ok(self.create_workspace(user, None, true).await?.row);
        }
        let id = new_id();
        let permit = self.admission.admit(&user.id, Ask::OnBehalf, &id).await?;
        self.create_admitted(user, kind, id, permit).await
    }

    /// Record sandbox `id` under an admission and start its boot. The permit
    /// is committed once the row is written; on any refusal it is dropped,
    /// which returns what it held. The row's first state, `provisioning`,
    /// is the one state not written by [`App::advance`].
    pub(crate) async fn create_admitted(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
        id: String,
        permit: Permit<'_>,
    ) -> Result<SandboxRow, AppError> {
        Ok(self.create_or_claim(user, kind, id, permit).await?.row)
    }

    /// A user's create looks in the kind's warm pool first: a member handed
    /// over is ready at once. An empty pool, or a claim that broke half-way
    /// (its member destroyed), falls back to a cold create of `id` under the
    /// same admission. The pool's own creates are always cold.
    pub(crate) async fn create_or_claim(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
        id: String,
        permit: Permit<'_>,
    ) -> Result<Created, AppError> {
        if user.id != pool::OWNER && self.pools.serves(kind) {
            match self.claim(user, kind).await {
                Claim::Hit(row) => {
                    // It counts as a create; the memory held for a cold
                    // one is not needed (the member's guest already runs).
                    permit.commit();
                    self.admission.release(&id);
                    return Ok(Created {
                        row,
                        from_pool: true,
                    });
                }
                Claim::Empty => {}
                Claim::Broken(why) => {
                    tracing::warn!(user = %user.name, reason = %why, "falling back to a cold create")
                }
            }
        }
        // A guest past a kernel limit dies while booting: refuse it by name.
        if let Some(why) =
            super::limits::crossing(&super::limits::read(&super::limits::Cost::IDLE_BROWSER))
        {
            return Err(AppError::NoCapacity(why));
        }
        let row = self.create_cold(user, kind, id, permit).await?;
        Ok(Created {
            row,
            from_pool: false,
        })
    }

    async fn create_cold(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
        id: String,
        permit: Permit<'_>,
    ) -> Result<SandboxRow, AppError> {
        let row = {
            let _guard = self.lease_lock.lock().await;
            // Other replicas allocate from the same pool.
            let _shared = self.store.lock_leases().await?;
            let used = self.store.used_leases().await?;
            let lease = self
                .pool
                .allocate(&used)
                .map_err(|e| AppError::NoCapacity(e.to_string()))?;
            let now = now_ms();
            let row = SandboxRow {
                id,
                owner_id: user.id.clone(),
                kind,
                state: SandboxState::Provisioning,
                failure_reason: None,
                image_build_id: self.image.build_id.clone(),
                lease_index: Some(lease.index),
                agent_token: secret(24),
                vnc_password: secret(4),
                display_width: self.cfg.display.width,
                display_height: self.cfg.display.height,
                created_at: now,
                updated_at: now,
                ready_at: None,
                last_heartbeat_at: None,
                last_activity_at: now,
            };
            match self.store.insert_sandbox(&row).await {
                Ok(()) => row,
                Err(StoreError::Conflict(_)) if kind == SandboxKind::Workspace => {
                    return Err(AppError::Conflict(
                        "this user already has a workspace sandbox; delete it first".into(),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        };
        permit.commit();
        self.metrics.created();
        let app = self.clone();
        let id = row.id.clone();
        self.spawn(async move {
            app.provision(&id).await;
            // Ready, failed or deleted: the guest's memory shows in the
            // host's figures now, or is free again.
            app.admission.release(&id);
        });
        Ok(row)
    }

    /// A sandbox the user owns; another user's answers exactly like a missing one.
    pub async fn sandbox_of(&self, user: &UserRow, id: &str) -> Result<SandboxRow, AppError> {
        match self.store.sandbox(id).await? {
            Some(row) if row.owner_id == user.id => Ok(row),
            _ => Err(AppError::NotFound(format!("sandbox {id:?}"))),
        }
    }

    pub async fn sandboxes(&self, user: &UserRow) -> Result<Vec<SandboxRow>, AppError> {
        Ok(self.store.sandboxes_of(&user.id).await?)
    }

    /// Start tearing a sandbox down; repeated calls are harmless (a sandbox
    /// already stopping or ended is answered as it is).
    pub async fn delete_sandbox(
        self: &Arc<Self>,
        user: &UserRow,
        id: &str,
    ) -> Result<SandboxRow, AppError> {
        self.sandbox_of(user, id).await?;
        match self.advance(id, Event::StopRequested(None)).await {
            Ok(moved) => self.perform(id, moved.effects, false).await,
            Err(AdvanceError::Refused(_)) => {}
            Err(AdvanceError::NotFound(_)) => {
                return Err(AppError::NotFound(format!("sandbox {id:?}")))
            }
            Err(AdvanceError::Store(e)) => return Err(e.into()),
        }
        self.sandbox_of(user, id).await
    }

    pub async fn exec(
        &self,
        user: &UserRow,
        id: &str,
        req: ExecRequest,
    ) -> Result<ExecResponse, AppError> {
        check_exec(&req).map_err(AppError::BadInput)?;
        let row = self.sandbox_of(user, id).await?;
        let endpoints = self.ready_endpoints(&row).await?;
        let _ = self.store.touch_activity(id).await;
        // The agent runs it as a private process of its table (see the
        // agent's `exec` module); its refusals read as the process API's.
        self.guest
            .exec(endpoints.agent, &row.agent_token, &req)
            .await
            .map_err(|e| super::processes::refused(e, &format!("sandbox {id:?}")))
    }

    /// Someone uses the sandbox (an open viewer): keeps the idle reaper away.
    pub async fn note_activity(&self, id: &str) {
        if let Err(e) = self.store.touch_activity(id).await {
            tracing::debug!(sandbox = id, error = %e, "could not record activity");
        }
    }

    /// Where a ready sandbox is reached; a conflict for any other state.
    pub async fn ready_endpoints(&self, row: &SandboxRow) -> Result<GuestEndpoints, AppError> {
        if row.state != SandboxState::Ready {
            return Err(AppError::Conflict(format!(
                "sandbox {} is {}, not ready",
                row.id, row.state
            )));
        }
        self.endpoints(row).await
    }

    /// Where the guest of a started sandbox is reached (through its node).
    pub(crate) async fn endpoints(&self, row: &SandboxRow) -> Result<GuestEndpoints, AppError> {
        let lease = self.lease(row)?;
        self.node
            .endpoints(&row.id, lease.guest)
            .await
            .map_err(|e| AppError::Unavailable(format!("cannot reach sandbox {}: {e}", row.id)))
    }

    pub(crate) fn lease(&self, row: &SandboxRow) -> Result<Lease, AppError> {
        row.lease_index
            .and_then(|i| self.pool.lease(i))
            .ok_or_else(|| AppError::Internal(format!("sandbox {} holds no address", row.id)))
    }

    /// What the node is asked to make for this row.
    async fn create_request(&self, row: &SandboxRow) -> Result<CreateSandbox, AppError> {
        let lease = self.lease(row)?;
        let egress = self.egress_for(row, &lease).await?;
        Ok(CreateSandbox {
            id: row.id.clone(),
            kind: row.kind,
            image: (&self.image).into(),
            lease: lease.into(),
            metadata: Metadata {
                sandbox_id: row.id.clone(),
                kind: row.kind,
                agent_token: row.agent_token.clone(),
                vnc_password: row.vnc_password.clone(),
                display: Display {
                    width: row.display_width,
                    height: row.display_height,
                },
                network: Network {
                    address: lease.guest.to_string(),
                    gateway: lease.host.to_string(),
                    prefix_len: lease.prefix_len,
                },
                egress: egress.as_ref().map(|(e, _)| e.clone()),
            },
            proxy_port: egress.map(|(_, port)| port),
            limits: self.cfg.limits.into(),
            home_volume: self.workspace_home(row).await?,
        })
    }

    /// Retry transient node failures a bounded number of times with backoff.
    async fn with_retries<F, Fut>(&self, what: &str, mut op: F) -> Result<(), NodeError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), NodeError>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.cfg.driver_retries => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => return other,
            }
        }
    }

    // ---- the machine ----

    /// Move sandbox `id` by `event` (the only way a state is written); the
    /// caller runs the returned effects with [`App::perform`].
    pub(crate) async fn advance(&self, id: &str, event: Event) -> Result<Moved, AdvanceError> {
        let moved = state::advance(&self.store, id, &event).await;
        match &moved {
            Ok(m) => tracing::debug!(sandbox = id, from = %m.from, to = %m.to, "sandbox state"),
            Err(AdvanceError::Refused(r)) => tracing::debug!(sandbox = id, "{r}"),
            Err(_) => {}
        }
        moved
    }

    /// Run the effects of a persisted transition. Boots run in the
    /// background; a teardown too, unless `wait` (the reaper waits for its own).
    pub(crate) async fn perform(self: &Arc<Self>, id: &str, effects: Vec<Effect>, wait: bool) {
        for effect in effects {
            match effect {
                Effect::Boot => self.spawn(self.clone().boot_task(id.to_owned())),
                Effect::CountReady => {
                    if let Ok(Some(row)) = self.store.sandbox(id).await {
                        let took = Duration::from_millis(
                            u64::try_from(now_ms() - row.created_at).unwrap_or(0),
                        );
                        self.metrics.ready(took);
                        tracing::info!(
                            sandbox = id,
                            took_ms = took.as_millis() as u64,
                            "sandbox ready"
                        );
                    }
                }
                Effect::CountFailed(label) => self.metrics.failed(label),
                Effect::CloseViewers => {
                    let _ = self.stopping.send(id.to_owned());
                    // Other replicas serve viewers of it too.
                    if self.cfg.cluster {
                        if let Err(e) = self.store.notify_stopping(id).await {
                            tracing::warn!(sandbox = id, error = %e, "could not tell the other replicas");
                        }
                    }
                }
                Effect::Teardown if wait => self.teardown(id).await,
                Effect::Teardown => {
                    let (app, id) = (self.clone(), id.to_owned());
                    self.spawn(async move { app.teardown(&id).await });
                }
            }
        }
    }

    /// Mark failed (from a state that may fail) and release the host
    /// resources. A sandbox already stopping stays on its way to `stopped`.
    pub(crate) async fn fail(self: &Arc<Self>, id: &str, label: &'static str, reason: &str) {
        let event = Event::Fail {
            label,
            reason: reason.to_owned(),
        };
        match self.advance(id, event).await {
            Ok(moved) => {
                tracing::warn!(sandbox = id, reason, "sandbox failed");
                self.perform(id, moved.effects, false).await
            }
            Err(AdvanceError::Store(e)) => {
                tracing::error!(sandbox = id, error = %e, "could not record the failure")
            }
            Err(_) => {}
        }
    }

    // ---- create ----

    /// provisioning: the node makes the sandbox's resources and its egress
    /// is attached; then `Provisioned` (whose effect boots it), or failed.
    pub(crate) async fn provision(self: &Arc<Self>, id: &str) {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        // A delete may have come first: its teardown owns the sandbox then.
        let row = match store_retry(|| async { Ok(self.store.sandbox(id).await?) }).await {
            Ok(Some(row)) if row.state == SandboxState::Provisioning => row,
            _ => return,
        };
        let outcome = async {
            let req = store_retry(|| self.create_request(&row))
                .await
                .map_err(|e| ("create", chain(&e)))?;
            self.with_retries("create", || self.node.create(&req))
                .await
                .map_err(|e| ("create", format!("could not create the sandbox: {e}")))?;
            let lease = self.lease(&row).map_err(|e| ("egress", chain(&e)))?;
            self.forwarders
                .attach(self, &row, &lease)
                .await
                .map_err(|e| ("egress", chain(&e)))
        }
        .await;
        drop(guard);
        if let Err((label, reason)) = outcome {
            return self.fail(id, label, &reason).await;
        }
        // Refused: deleted meanwhile, and its teardown owns it now.
        if let Ok(moved) = self.advance(id, Event::Provisioned).await {
            self.perform(id, moved.effects, false).await;
        }
    }

    /// The boot as a task. Boxed with its `Send` spelled out: boot and
    /// perform call each other, and the compiler cannot see through the cycle.
    fn boot_task(self: Arc<Self>, id: String) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move { self.boot(&id).await })
    }

    /// booting: the node starts the guest; once it is ready, `Ready`.
    pub(crate) async fn boot(self: &Arc<Self>, id: &str) {
        let started = Instant::now();
        let row = {
            let lock = self.lock_for(id);
            let _guard = lock.lock().await;
            let row = match store_retry(|| async { Ok(self.store.sandbox(id).await?) }).await {
                Ok(Some(row)) if row.state == SandboxState::Booting => row,
                _ => return,
            };
            if let Err(e) = self.with_retries("start", || self.node.start(id)).await {
                drop(_guard);
                return self
                    .fail(id, "start", &format!("could not start the sandbox: {e}"))
                    .await;
            }
            row
        };
        self.await_ready(&row, started).await;
    }

    /// Wait for a booting guest and record the outcome (also for one a
    /// restart found booting).
    async fn await_ready(self: &Arc<Self>, row: &SandboxRow, started: Instant) {
        match self.wait_until_ready(row, started).await {
            Ok(()) => {
                // A pool's member waits, probed, for its user.
                let event = if row.owner_id == pool::OWNER {
                    Event::Pooled
                } else {
                    Event::Ready
                };
                if let Ok(moved) = self.advance(&row.id, event).await {
                    self.perform(&row.id, moved.effects, false).await;
                }
            }
            Err((label, reason)) => self.fail(&row.id, label, &reason).await,
        }
    }

    /// Ready means: the agent answers with the right build, the VNC server
    /// takes our secret, and its first frame is not blank. Ends early (Ok)
    /// when the sandbox left `booting` meanwhile.
    async fn wait_until_ready(
        &self,
        row: &SandboxRow,
        started: Instant,
    ) -> Result<(), (&'static str, String)> {
        let deadline = started + self.cfg.boot_timeout;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let endpoints = self
            .node
            .wait_ready(&row.id, remaining)
            .await
            .map_err(|e| (e.label(), format!("the guest did not come up: {e}")))?;
        let mut last = String::from("not probed yet");
        while Instant::now() < deadline {
            if !self.still_booting(&row.id).await {
                return Ok(());
            }
            match self.probe(row, endpoints).await {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
            if let Ok(crate::node::Liveness::Dead(what)) = self.node.liveness(&row.id).await {
                return Err((
                    "guest_exited",
                    format!("the guest died while booting: {what} ({last})"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err((
            "boot_timeout",
            format!(
                "not ready after {}s: {last}",
                self.cfg.boot_timeout.as_secs()
            ),
        ))
    }

    async fn still_booting(&self, id: &str) -> bool {
        matches!(self.store.sandbox(id).await, Ok(Some(row)) if row.state == SandboxState::Booting)
    }

    async fn probe(&self, row: &SandboxRow, endpoints: GuestEndpoints) -> Result<(), String> {
        let health = self
            .guest
            .health(endpoints.agent, &row.agent_token)
            .await
            .map_err(|e| e.to_string())?;
        if health.sandbox_id != row.id {
            return Err(format!(
                "the agent says it is sandbox {:?}",
                health.sandbox_id
            ));
        }
        if health.image_build_id != row.image_build_id {
            return Err(format!(
                "the guest runs image {} but {} was expected",
                health.image_build_id, row.image_build_id
            ));
        }
        self.guest
            .desktop_shown(endpoints.display, &row.vnc_password)
            .await?;
        let _ = self.store.touch_heartbeat(&row.id).await;
        Ok(())
    }

    // ---- delete ----

    /// Destroy the sandbox's host resources and give its address back; then
    /// `Released` (stopping → stopped; a failed sandbox stays failed).
    pub(crate) async fn teardown(&self, id: &str) {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        // Under the lock: a create under way may attach it until then.
        self.forwarders.detach(self, id).await;
        if let Err(e) = self.with_retries("destroy", || self.node.destroy(id)).await {
            // Keep the lease: the reaper tries again, so nothing is handed out twice.
            tracing::error!(sandbox = id, error = %e, "destroy failed; the reaper will retry");
            return;
        }
        if let Err(e) = self.store.release_lease(id).await {
            tracing::error!(sandbox = id, error = %e, "could not release the lease");
            return;
        }
        match self.advance(id, Event::Released).await {
            Ok(_) | Err(AdvanceError::Refused(_)) | Err(AdvanceError::NotFound(_)) => {}
            Err(AdvanceError::Store(e)) => {
                tracing::error!(sandbox = id, error = %e, "could not record the stop")
            }
        }
        drop(guard);
        self.forget_lock(id);
    }

    // ---- restart ----

    /// After a start: adopt what still runs, finish what was interrupted,
    /// remove what nobody owns.
    pub async fn recover(self: &Arc<Self>) -> Result<(), AppError> {
        let rows = self.store.live_sandboxes().await?;
        let known: std::collections::HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        let instances = self
            .node
            .list()
            .await
            .map_err(|e| AppError::Internal(e.to_string()))?;
        for inst in &instances {
            if !known.contains(&inst.id) {
                tracing::warn!(sandbox = %inst.id, "removing an orphaned sandbox nobody owns");
                if let Err(e) = self.node.destroy(&inst.id).await {
                    tracing::error!(sandbox = %inst.id, error = %e, "could not remove the orphan");
                }
            }
        }
        let running = |id: &str| instances.iter().any(|i| i.id == id && i.running);
        for row in rows {
            let app = self.clone();
            match row.state {
                SandboxState::Ready | SandboxState::Booting | SandboxState::Pooled
                    if running(&row.id) =>
                {
                    // Its forward proxy lived in the previous process.
                    let reattached = match self.lease(&row) {
                        Ok(lease) => self.forwarders.attach(self, &row, &lease).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = reattached {
                        self.spawn(async move {
                            app.fail(&row.id, "egress", &format!("could not restore egress: {e}"))
                                .await
                        });
                    } else if row.state == SandboxState::Booting {
                        self.spawn(async move { app.await_ready(&row, Instant::now()).await });
                    } else {
                        tracing::info!(sandbox = %row.id, "re-adopted a running sandbox");
                    }
                }
                SandboxState::Provisioning
                | SandboxState::Booting
                | SandboxState::Ready
                | SandboxState::Pooled => {
                    self.spawn(async move { app.fail(&row.id, "lost", LOST_IN_RESTART).await });
                }
                SandboxState::Stopping | SandboxState::Failed | SandboxState::Stopped => {
                    self.spawn(async move { app.teardown(&row.id).await });
                }
            }
        }
        self.recover_logins().await;
        Ok(())
    }
}

/// An error with all its sources, on one line.
/// A call retried while the database is briefly out of reach (restarting,
/// say): up to three more tries, a second apart. Anything else is returned
/// as it came.
async fn store_retry<T, F, Fut>(mut call: F) -> Result<T, AppError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AppError>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(AppError::Store(e)) if e.is_unavailable() && tries < 3 => {
                tries += 1;
                tracing::warn!(error = %chain(&e), "the database is out of reach; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Exec input the agent would refuse, refused here first with the field
/// named: the caller's mistake is a 400, not an outage (the agent's own 400
/// would reach the caller as a 502).
pub fn check_exec(req: &ExecRequest) -> Result<(), String> {
    let max = airlock_proto::agent::MAX_EXEC_TIMEOUT_S;
    match req.argv.first() {
        None => return Err("argv must name a program (it is empty)".into()),
        Some(program) if program.is_empty() => {
            return Err("argv[0] must name a program (it is an empty string)".into())
        }
        _ => {}
    }
    if let Some(i) = req.argv.iter().position(|a| a.contains('\0')) {
        return Err(format!("argv[{i}] must not contain a NUL character"));
    }
    for (key, value) in &req.env {
        if key.is_empty() {
            return Err("env: a variable name must not be empty".into());
        }
        if key.contains('=') || key.contains('\0') {
            return Err(format!(
                "env: the variable name {key:?} must not contain '=' or a NUL character"
            ));
        }
        if value.contains('\0') {
            return Err(format!(
                "env: the value of {key:?} must not contain a NUL character"
            ));
        }
    }
    if let Some(t) = req.timeout_s {
        if t == 0 || t > max {
            return Err(format!("timeout_s must be between 1 and {max} (it is {t})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod exec_checks {
    use super::*;

    fn req(argv: &[&str], env: &[(&str, &str)], timeout_s: Option<u64>) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            timeout_s,
        }
    }

    #[test]
    fn bad_exec_input_names_its_field() {
        assert!(check_exec(&req(&["true"], &[("A", "b")], Some(600))).is_ok());
        for (bad, field) in [
            (req(&[], &[], None), "argv"),
            (req(&[""], &[], None), "argv[0]"),
            (req(&["echo", "a\0b"], &[], None), "argv[1]"),
            (req(&["true"], &[("A=B", "x")], None), "env"),
            (req(&["true"], &[("", "x")], None), "env"),
            (req(&["true"], &[("A\0", "x")], None), "env"),
            (req(&["true"], &[("A", "x\0")], None), "env"),
            (req(&["true"], &[], Some(0)), "timeout_s"),
            (req(&["true"], &[], Some(601)), "timeout_s"),
        ] {
            let why = check_exec(&bad).expect_err(field);
            assert!(why.starts_with(field), "{why}");
        }
    }

    #[tokio::test]
    async fn a_briefly_unreachable_database_is_tried_again_and_a_refused_query_is_not() {
        use crate::store::StoreError;
        let calls = std::sync::atomic::AtomicU32::new(0);
        let got = store_retry(|| async {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                Err(AppError::Store(StoreError::Query {
                    what: "t",
                    source: sqlx::Error::PoolTimedOut,
                }))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(
            (got.ok(), calls.load(std::sync::atomic::Ordering::SeqCst)),
            (Some(7), 3)
        );
        let calls = std::sync::atomic::AtomicU32::new(0);
        let got: Result<(), _> = store_retry(|| async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(AppError::Store(StoreError::Query {
                what: "t",
                source: sqlx::Error::RowNotFound,
            }))
        })
        .await;
        assert!(got.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
