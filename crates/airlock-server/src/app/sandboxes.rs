//! The sandbox lifecycle: create, boot until ready, exec, delete, and recovery
//! after a restart. Each state is written to the store before the side effect
//! it names, so whatever a crash interrupts can be resumed or cleaned up.

use super::admission::{Ask, Permit};
use super::state::{self, Event, SandboxState};
use super::{App, AppError};
use crate::relay::rfb;
use crate::store::{now_ms, SandboxRow, StoreError, UserRow};
use airlock_drivers::{DriverError, Endpoints, Lease, SandboxSpec};
use airlock_proto::agent::{ExecRequest, ExecResponse};
use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) fn new_id() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

fn secret(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

/// Why a sandbox failed, as a metrics label (the full reason is in the row).
fn failure_label(err: &DriverError) -> &'static str {
    match err {
        DriverError::Timeout(_) => "boot_timeout",
        DriverError::GuestExited(_) => "guest_exited",
        DriverError::NotFound(_) => "lost",
        _ => "driver",
    }
}

impl App {
    /// `POST /sandboxes`: admitted against the caller's quotas and the host's
    /// room, then recorded; the boot runs in the background.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
    ) -> Result<SandboxRow, AppError> {
        let id = new_id();
        let permit = self.admission.admit(&user.id, Ask::Sandbox, &id).await?;
        self.create_admitted(user, kind, id, permit).await
    }

    /// A sandbox airlock makes for a login it already admitted (the
    /// workspace it delivers to, a browser sandbox made again after a
    /// restart): the host's room is checked, the user's caps are not.
    pub(crate) async fn create_sandbox_for(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
    ) -> Result<SandboxRow, AppError> {
        let id = new_id();
        let permit = self.admission.admit(&user.id, Ask::OnBehalf, &id).await?;
        self.create_admitted(user, kind, id, permit).await
    }

    /// Record sandbox `id` under an admission and start its boot. The permit
    /// is committed once the row is written; on any refusal it is dropped,
    /// which returns what it held.
    pub(crate) async fn create_admitted(
        self: &Arc<Self>,
        user: &UserRow,
        kind: SandboxKind,
        id: String,
        permit: Permit<'_>,
    ) -> Result<SandboxRow, AppError> {
        let row = {
            let _guard = self.lease_lock.lock().await;
            let used = self.store.used_leases().await?;
            let lease = self
                .pool
                .allocate(&used)
                .map_err(|e| AppError::NoCapacity(e.to_string()))?;
            let now = now_ms();
            let row = SandboxRow {
                id,
                owner_id: user.id.clone(),
                kind: kind.as_str().to_owned(),
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
            app.boot(&id).await;
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

    /// Start tearing a sandbox down; repeated calls are harmless.
    pub async fn delete_sandbox(
        self: &Arc<Self>,
        user: &UserRow,
        id: &str,
    ) -> Result<SandboxRow, AppError> {
        let row = self.sandbox_of(user, id).await?;
        let from = [
            SandboxState::Provisioning,
            SandboxState::Booting,
            SandboxState::Ready,
            SandboxState::Failed,
        ];
        if from.contains(&row.state) {
            state::transition(row.state, &Event::StopRequested)
                .map_err(|e| AppError::Conflict(e.to_string()))?;
            if self
                .store
                .transition(id, &from, SandboxState::Stopping, None)
                .await?
            {
                let app = self.clone();
                let id = id.to_owned();
                self.spawn(async move { app.teardown(&id, SandboxState::Stopped).await });
            }
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
        let endpoints = self.ready_endpoints(&row)?;
        let _ = self.store.touch_activity(id).await;
        self.agent
            .exec(endpoints.agent, &row.agent_token, &req)
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))
    }

    /// Where a ready sandbox is reached; a conflict for any other state.
    pub fn ready_endpoints(&self, row: &SandboxRow) -> Result<Endpoints, AppError> {
        if row.state != SandboxState::Ready {
            return Err(AppError::Conflict(format!(
                "sandbox {} is {}, not ready",
                row.id, row.state
            )));
        }
        let lease = self.lease(row)?;
        Ok(Endpoints::for_guest(lease.guest))
    }

    fn lease(&self, row: &SandboxRow) -> Result<Lease, AppError> {
        row.lease_index
            .and_then(|i| self.pool.lease(i))
            .ok_or_else(|| AppError::Internal(format!("sandbox {} holds no address", row.id)))
    }

    fn home_volume(&self, row: &SandboxRow) -> Option<PathBuf> {
        (row.kind == "workspace").then(|| {
            self.cfg
                .data_dir
                .join("volumes")
                .join(&row.owner_id)
                .join("home")
        })
    }

    async fn spec(&self, row: &SandboxRow) -> Result<SandboxSpec, AppError> {
        let lease = self.lease(row)?;
        let egress = self.egress_for(row, &lease).await?;
        let kind: SandboxKind = row
            .kind
            .parse()
            .map_err(|e: airlock_proto::metadata::UnknownKind| AppError::Internal(e.to_string()))?;
        Ok(SandboxSpec {
            id: row.id.clone(),
            kind,
            image: self.image.clone(),
            lease,
            metadata: Metadata {
                sandbox_id: row.id.clone(),
                kind,
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
            limits: self.cfg.limits,
            home_volume: self.home_volume(row),
        })
    }

    /// Retry transient driver failures a bounded number of times with backoff.
    async fn with_retries<F, Fut>(&self, what: &str, mut op: F) -> Result<(), DriverError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), DriverError>>,
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

    /// provisioning → booting → ready, or failed with the reason.
    pub(crate) async fn boot(self: &Arc<Self>, id: &str) {
        let started = Instant::now();
        let Ok(Some(row)) = self.store.sandbox(id).await else {
            return;
        };
        let spec = match self.spec(&row).await {
            Ok(spec) => spec,
            Err(e) => return self.fail(id, "create", &e.to_string()).await,
        };
        {
            let lock = self.lock_for(id);
            let _guard = lock.lock().await;
            if let Err(e) = self
                .with_retries("create", || self.driver.create(&spec))
                .await
            {
                return self
                    .fail(
                        id,
                        "create",
                        &format!("could not create the sandbox: {}", chain(&e)),
                    )
                    .await;
            }
            if let Err(e) = self.egress_attach(&row, &spec.lease).await {
                return self.fail(id, "egress", &e.to_string()).await;
            }
            match self
                .store
                .transition(
                    id,
                    &[SandboxState::Provisioning],
                    SandboxState::Booting,
                    None,
                )
                .await
            {
                Ok(true) => {}
                // Deleted meanwhile: its teardown owns it now.
                _ => return,
            }
            if let Err(e) = self.with_retries("start", || self.driver.start(id)).await {
                return self
                    .fail(
                        id,
                        "start",
                        &format!("could not start the sandbox: {}", chain(&e)),
                    )
                    .await;
            }
        }
        if let Err((label, reason)) = self.wait_until_ready(&row, started).await {
            return self.fail(id, label, &reason).await;
        }
        match self
            .store
            .transition(id, &[SandboxState::Booting], SandboxState::Ready, None)
            .await
        {
            Ok(true) => {
                self.metrics.ready(started.elapsed());
                tracing::info!(
                    sandbox = id,
                    took_ms = started.elapsed().as_millis() as u64,
                    "sandbox ready"
                );
            }
            _ => tracing::info!(sandbox = id, "sandbox left booting before it was ready"),
        }
    }

    /// Ready means: the agent answers with the right build, the VNC server
    /// takes our secret, and its first frame is not blank.
    async fn wait_until_ready(
        &self,
        row: &SandboxRow,
        started: Instant,
    ) -> Result<(), (&'static str, String)> {
        let deadline = started + self.cfg.boot_timeout;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let endpoints = self
            .driver
            .wait_ready(&row.id, remaining)
            .await
            .map_err(|e| {
                (
                    failure_label(&e),
                    format!("the guest did not come up: {}", chain(&e)),
                )
            })?;
        let mut last = String::from("not probed yet");
        while Instant::now() < deadline {
            if !self.still_booting(&row.id).await {
                return Ok(());
            }
            match self.probe(row, endpoints).await {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
            if let Ok(info) = self.driver.inspect(&row.id).await {
                if !info.running {
                    return Err((
                        "guest_exited",
                        format!("the guest exited while booting ({last})"),
                    ));
                }
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

    async fn probe(&self, row: &SandboxRow, endpoints: Endpoints) -> Result<(), String> {
        let health = self
            .agent
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
        let frame = tokio::time::timeout(Duration::from_secs(5), async {
            let mut tcp = tokio::net::TcpStream::connect(endpoints.vnc).await?;
            rfb::client_handshake(&mut tcp, &row.vnc_password).await?;
            rfb::read_frame(&mut rfb::IoWire(tcp)).await
        })
        .await
        .map_err(|_| "the VNC server did not send a frame in time".to_owned())?
        .map_err(|e| format!("VNC: {e}"))?;
        if !frame.looks_like_desktop() {
            return Err(format!(
                "the display is still blank ({} colours)",
                frame.distinct_colours
            ));
        }
        let _ = self.store.touch_heartbeat(&row.id).await;
        Ok(())
    }

    /// Mark failed (from any live state) and release the host resources.
    pub(crate) async fn fail(self: &Arc<Self>, id: &str, label: &'static str, reason: &str) {
        tracing::warn!(sandbox = id, reason, "sandbox failed");
        let live = [
            SandboxState::Provisioning,
            SandboxState::Booting,
            SandboxState::Ready,
            SandboxState::Stopping,
        ];
        match self
            .store
            .transition(id, &live, SandboxState::Failed, Some(reason))
            .await
        {
            Ok(true) => self.metrics.failed(label),
            Ok(false) => return,
            Err(e) => tracing::error!(sandbox = id, error = %e, "could not record the failure"),
        }
        self.teardown(id, SandboxState::Failed).await;
    }

    /// Destroy the sandbox's host resources and give its address back. Leaves
    /// the row in `end` (stopped after a delete, failed after a failure).
    pub(crate) async fn teardown(&self, id: &str, end: SandboxState) {
        let _ = self.stopping.send(id.to_owned());
        self.egress_detach(id).await;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        if let Err(e) = self
            .with_retries("destroy", || self.driver.destroy(id))
            .await
        {
            // Keep the lease: the reaper tries again, so nothing is handed out twice.
            tracing::error!(sandbox = id, error = %chain(&e), "destroy failed; the reaper will retry");
            return;
        }
        if let Err(e) = self.store.release_lease(id).await {
            tracing::error!(sandbox = id, error = %e, "could not release the lease");
            return;
        }
        if end == SandboxState::Stopped {
            let _ = self
                .store
                .transition(id, &[SandboxState::Stopping], SandboxState::Stopped, None)
                .await;
        }
        drop(_guard);
        self.forget_lock(id);
    }

    /// After a start: adopt what still runs, finish what was interrupted,
    /// remove what nobody owns.
    pub async fn recover(self: &Arc<Self>) -> Result<(), AppError> {
        let rows = self.store.live_sandboxes().await?;
        let known: std::collections::HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        let instances = self
            .driver
            .list()
            .await
            .map_err(|e| AppError::Internal(chain(&e)))?;
        for inst in &instances {
            if !known.contains(&inst.id) {
                tracing::warn!(sandbox = %inst.id, "removing an orphaned sandbox nobody owns");
                if let Err(e) = self.driver.destroy(&inst.id).await {
                    tracing::error!(sandbox = %inst.id, error = %chain(&e), "could not remove the orphan");
                }
            }
        }
        let running = |id: &str| instances.iter().any(|i| i.id == id && i.running);
        for row in rows {
            let app = self.clone();
            let adopted = matches!(row.state, SandboxState::Ready | SandboxState::Booting)
                && running(&row.id);
            if adopted {
                // Its forward proxy lived in the previous process.
                let reattached = match self.lease(&row) {
                    Ok(lease) => self.egress_attach(&row, &lease).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = reattached {
                    self.spawn(async move {
                        app.fail(&row.id, "egress", &format!("could not restore egress: {e}"))
                            .await
                    });
                    continue;
                }
            }
            match row.state {
                SandboxState::Ready if running(&row.id) => {
                    tracing::info!(sandbox = %row.id, "re-adopted a running sandbox");
                }
                SandboxState::Booting if running(&row.id) => {
                    self.spawn(async move {
                        let started = Instant::now();
                        match app.wait_until_ready(&row, started).await {
                            Ok(()) => {
                                let _ = app
                                    .store
                                    .transition(
                                        &row.id,
                                        &[SandboxState::Booting],
                                        SandboxState::Ready,
                                        None,
                                    )
                                    .await;
                            }
                            Err((label, reason)) => app.fail(&row.id, label, &reason).await,
                        }
                    });
                }
                SandboxState::Provisioning | SandboxState::Booting | SandboxState::Ready => {
                    self.spawn(async move {
                        app.fail(
                            &row.id,
                            "lost",
                            "the sandbox was interrupted by a control plane restart",
                        )
                        .await
                    });
                }
                SandboxState::Stopping => {
                    self.spawn(async move { app.teardown(&row.id, SandboxState::Stopped).await });
                }
                SandboxState::Failed | SandboxState::Stopped => {
                    self.spawn(async move { app.teardown(&row.id, row.state).await });
                }
            }
        }
        self.recover_logins().await;
        Ok(())
    }
}

/// An error with all its sources, on one line.
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
}
