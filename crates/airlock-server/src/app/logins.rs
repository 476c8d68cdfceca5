//! Login sessions: a CLI signed in inside a browser sandbox, its credentials
//! captured, sealed in the vault and delivered to the user's workspace.
//!
//! One task drives each login from the state in its row (`state.rs` lists
//! what follows each state). Every state is written before its side effect;
//! after a restart `recover_logins` starts the task again from the row, and
//! every side effect is safe to repeat (the agent answers a repeated start
//! with the running login; delivery rewrites the same files; destroying a
//! sandbox twice is harmless).

pub mod providers;
pub mod state;

use super::{App, AppError};
use crate::store::{now_ms, CredentialRow, LoginRow, LoginUpdate, UserRow};
use crate::vault::Aad;
use airlock_proto::agent::ExecRequest;
use airlock_proto::login::{AgentLoginPhase, FileSet, LoginInput, LoginStart, LoginStatus};
use airlock_proto::metadata::SandboxKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretBox};
use state::{transition, Event, LoginState};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const POLL: Duration = Duration::from_millis(500);
/// Agent calls that fail this many times in a row fail the login.
const AGENT_PATIENCE: u32 = 20;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailLabel {
    provider: String,
    reason: String,
}

#[derive(Debug)]
struct LoginMetrics {
    started: Family<ProviderLabel, Counter>,
    completed: Family<ProviderLabel, Counter>,
    failed: Family<FailLabel, Counter>,
    seconds: Family<ProviderLabel, Histogram>,
}

fn seconds_histogram() -> Histogram {
    Histogram::new([5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0])
}

/// Totals for the UI's panel.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ProviderStats {
    pub started: u64,
    pub completed: u64,
    /// By reason: `expired`, `cancelled`, `cli_exited`, `sandbox`, `agent`, `delivery`, `internal`.
    pub failed: BTreeMap<String, u64>,
    /// Mean seconds from start to completed, over completed logins.
    pub mean_seconds_to_complete: Option<f64>,
    #[serde(skip)]
    total_seconds: f64,
}

#[derive(Debug, Default)]
pub struct LoginsState {
    providers: OnceLock<providers::Providers>,
    metrics: OnceLock<LoginMetrics>,
    /// By (owner id, provider): each user sees only their own totals.
    stats: Mutex<BTreeMap<(String, String), ProviderStats>>,
    /// Logins with a driving task, so a restart's recovery never starts two.
    driving: Mutex<HashSet<String>>,
}

fn new_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

pub(crate) fn aad(owner: &str, provider: &str, login_id: &str) -> Aad {
    Aad::new(owner, &format!("credentials:{provider}"), login_id)
}

/// Why a login failed, as a metrics label.
#[derive(Debug, Clone, Copy)]
enum Why {
    CliExited,
    Sandbox,
    Agent,
    Delivery,
    Internal,
}

impl Why {
    fn label(self) -> &'static str {
        match self {
            Why::CliExited => "cli_exited",
            Why::Sandbox => "sandbox",
            Why::Agent => "agent",
            Why::Delivery => "delivery",
            Why::Internal => "internal",
        }
    }
}

/// What one step of the driver decided.
enum Step {
    Again,
    Wait,
    Done,
}

impl App {
    pub fn providers(&self) -> &providers::Providers {
        self.logins.providers.get_or_init(|| {
            match providers::Providers::load(self.cfg.providers_dir.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "provider definitions are invalid; logins are off");
                    providers::Providers::default()
                }
            }
        })
    }

    fn login_metrics(&self) -> &LoginMetrics {
        self.logins.metrics.get_or_init(|| {
            let m = LoginMetrics {
                started: Family::default(),
                completed: Family::default(),
                failed: Family::default(),
                seconds: Family::new_with_constructor(seconds_histogram),
            };
            self.metrics.register(
                "logins_started",
                "Logins started, by provider",
                m.started.clone(),
            );
            self.metrics.register(
                "logins_completed",
                "Logins completed, by provider",
                m.completed.clone(),
            );
            self.metrics.register(
                "logins_failed",
                "Logins that ended without credentials delivered, by provider and reason",
                m.failed.clone(),
            );
            self.metrics.register(
                "login_seconds_to_complete",
                "Time from starting a login to completed",
                m.seconds.clone(),
            );
            m
        })
    }

    fn count_started(&self, owner: &str, provider: &str) {
        self.login_metrics()
            .started
            .get_or_create(&ProviderLabel {
                provider: provider.to_owned(),
            })
            .inc();
        let mut s = self.logins.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.entry((owner.to_owned(), provider.to_owned()))
            .or_default()
            .started += 1;
    }

    fn count_failed(&self, owner: &str, provider: &str, reason: &str) {
        self.login_metrics()
            .failed
            .get_or_create(&FailLabel {
                provider: provider.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        let mut s = self.logins.stats.lock().unwrap_or_else(|p| p.into_inner());
        *s.entry((owner.to_owned(), provider.to_owned()))
            .or_default()
            .failed
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    fn count_completed(&self, owner: &str, provider: &str, seconds: f64) {
        let label = ProviderLabel {
            provider: provider.to_owned(),
        };
        let m = self.login_metrics();
        m.completed.get_or_create(&label).inc();
        m.seconds.get_or_create(&label).observe(seconds);
        let mut s = self.logins.stats.lock().unwrap_or_else(|p| p.into_inner());
        let e = s
            .entry((owner.to_owned(), provider.to_owned()))
            .or_default();
        e.completed += 1;
        e.total_seconds += seconds;
        e.mean_seconds_to_complete = Some(e.total_seconds / e.completed as f64);
    }

    /// The caller's own login totals, by provider (every provider listed).
    pub fn login_stats(&self, user: &UserRow) -> BTreeMap<String, ProviderStats> {
        let mut out: BTreeMap<String, ProviderStats> = self
            .logins
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((owner, _), _)| *owner == user.id)
            .map(|((_, provider), s)| (provider.clone(), s.clone()))
            .collect();
        for p in self.providers().list() {
            out.entry(p.name.clone()).or_default();
        }
        out
    }

    /// `POST /logins`: a login row, then its browser sandbox; the rest runs
    /// in the background.
    pub async fn start_login(
        self: &Arc<Self>,
        user: &UserRow,
        provider: &str,
    ) -> Result<LoginRow, AppError> {
        if self.providers().get(provider).is_none() {
            let names: Vec<&str> = self
                .providers()
                .list()
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            return Err(AppError::BadInput(format!(
                "unknown provider {provider:?}; known: {}",
                names.join(", ")
            )));
        }
        // The login and its browser sandbox are admitted together, before
        // either is written: a refusal leaves nothing behind.
        let sandbox_id = super::sandboxes::new_id();
        let permit = self
            .admission
            .admit(&user.id, super::admission::Ask::Login, &sandbox_id)
            .await?;
        let now = now_ms();
        let timeout = i64::try_from(self.cfg.login_timeout.as_millis()).unwrap_or(i64::MAX);
        let mut row = LoginRow {
            id: new_id(),
            owner_id: user.id.clone(),
            provider: provider.to_owned(),
            state: LoginState::Starting,
            reason: None,
            login_url: None,
            awaiting_code: false,
            browser_sandbox_id: None,
            workspace_sandbox_id: None,
            created_at: now,
            updated_at: now,
            expires_at: now.saturating_add(timeout),
            finished_at: None,
        };
        self.store.insert_login(&row).await?;
        let sandbox = match self
            .create_admitted(user, SandboxKind::Browser, sandbox_id, permit)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // Nothing was made: the login ends here, with the reason.
                let _ = self
                    .store
                    .transition_login(
                        &row.id,
                        LoginState::Starting,
                        LoginState::Failed,
                        &LoginUpdate {
                            reason: Some(format!("no browser sandbox: {e}")),
                            ..Default::default()
                        },
                    )
                    .await;
                return Err(e);
            }
        };
        self.store
            .set_login_fields(&row.id, Some(&sandbox.id), None)
            .await?;
        row.browser_sandbox_id = Some(sandbox.id);
        self.count_started(&user.id, provider);
        tracing::info!(login = %row.id, provider, user = %user.name, "login started");
        self.spawn_driver(&row.id);
        Ok(row)
    }

    pub async fn login_of(&self, user: &UserRow, id: &str) -> Result<LoginRow, AppError> {
        match self.store.login(id).await? {
            Some(row) if row.owner_id == user.id => Ok(row),
            _ => Err(AppError::NotFound(format!("login {id:?}"))),
        }
    }

    pub async fn logins_list(&self, user: &UserRow) -> Result<Vec<LoginRow>, AppError> {
        Ok(self.store.logins_of(&user.id).await?)
    }

    pub async fn credentials_list(&self, user: &UserRow) -> Result<Vec<CredentialRow>, AppError> {
        Ok(self.store.credentials_of(&user.id).await?)
    }

    /// `DELETE /logins/{id}`: cancel one still waiting on the user.
    pub async fn cancel_login(
        self: &Arc<Self>,
        user: &UserRow,
        id: &str,
    ) -> Result<LoginRow, AppError> {
        let row = self.login_of(user, id).await?;
        if row.state.is_final() {
            return Ok(row);
        }
        let to = transition(row.state, &Event::Cancel)
            .map_err(|e| AppError::Conflict(format!("{e}: its credentials are already stored")))?;
        if self
            .store
            .transition_login(
                id,
                row.state,
                to,
                &LoginUpdate {
                    reason: Some("cancelled by the user".into()),
                    ..Default::default()
                },
            )
            .await?
        {
            self.count_failed(&row.owner_id, &row.provider, "cancelled");
            self.end_browser(&row).await;
        }
        self.login_of(user, id).await
    }

    /// A code the user pasted, typed into the CLI.
    pub async fn submit_code(&self, user: &UserRow, id: &str, code: &str) -> Result<(), AppError> {
        let row = self.login_of(user, id).await?;
        if row.state != LoginState::AwaitingUser {
            return Err(AppError::Conflict(format!(
                "login {id} is {}, not awaiting_user",
                row.state
            )));
        }
        // Typed into a CLI that reads no code, it would answer whatever that
        // CLI asks next.
        if self
            .providers()
            .get(&row.provider)
            .is_none_or(|p| p.code_prompt.is_none())
        {
            return Err(AppError::Conflict(format!(
                "the {} login takes no code",
                row.provider
            )));
        }
        let code = code.trim();
        if code.is_empty() || code.len() > 4096 || code.chars().any(char::is_control) {
            return Err(AppError::BadInput(
                "code: 1 to 4096 characters without control characters".into(),
            ));
        }
        let sb = self.browser_of(&row).await?;
        let endpoints = self.ready_endpoints(&sb)?;
        self.agent
            .call::<_, serde_json::Value>(
                Method::POST,
                endpoints.agent,
                &sb.agent_token,
                &format!("/login/{id}/input"),
                Some(&LoginInput {
                    text: code.to_owned(),
                }),
            )
            .await
            .map_err(|e| AppError::Unavailable(format!("typing the code: {e}")))?;
        self.store.set_login_fields(id, None, Some(false)).await?;
        Ok(())
    }

    async fn browser_of(&self, row: &LoginRow) -> Result<crate::store::SandboxRow, AppError> {
        let sid = row
            .browser_sandbox_id
            .as_deref()
            .ok_or_else(|| AppError::Conflict("the login has no browser sandbox yet".into()))?;
        self.store
            .sandbox(sid)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("sandbox {sid:?}")))
    }

    /// After a restart: carry on with logins that were under way, and finish
    /// tearing down after those that ended.
    pub(crate) async fn recover_logins(self: &Arc<Self>) {
        let _ = self.login_metrics();
        let _ = self.providers();
        let live = [
            LoginState::Starting,
            LoginState::AwaitingUser,
            LoginState::Captured,
            LoginState::Stored,
            LoginState::Delivered,
        ];
        match self.store.logins_in(&live).await {
            Ok(rows) => {
                for row in rows {
                    tracing::info!(login = %row.id, state = %row.state, "resuming login");
                    self.spawn_driver(&row.id);
                }
            }
            Err(e) => tracing::error!(error = %e, "could not list logins to resume"),
        }
        if let Ok(rows) = self
            .store
            .logins_in(&[
                LoginState::Failed,
                LoginState::Expired,
                LoginState::Cancelled,
            ])
            .await
        {
            for row in rows {
                if let Ok(sb) = self.browser_of(&row).await {
                    if sb.state.is_live() {
                        self.end_browser(&row).await;
                    }
                }
            }
        }
    }

    /// Called by the reaper on every round: logins past their deadline expire.
    pub(crate) async fn reap_logins(self: &Arc<Self>) {
        let Ok(rows) = self
            .store
            .logins_in(&[LoginState::Starting, LoginState::AwaitingUser])
            .await
        else {
            return;
        };
        let now = now_ms();
        for row in rows.into_iter().filter(|r| r.expires_at <= now) {
            self.expire(&row).await;
        }
    }

    async fn expire(self: &Arc<Self>, row: &LoginRow) {
        let Ok(to) = transition(row.state, &Event::Expire) else {
            return;
        };
        let secs = (row.expires_at - row.created_at) / 1000;
        if let Ok(true) = self
            .store
            .transition_login(
                &row.id,
                row.state,
                to,
                &LoginUpdate {
                    reason: Some(format!("not signed in within {secs} s")),
                    ..Default::default()
                },
            )
            .await
        {
            tracing::info!(login = %row.id, "login expired");
            self.count_failed(&row.owner_id, &row.provider, "expired");
            self.end_browser(row).await;
        }
    }

    /// Destroy a login's browser sandbox (and the login command with it).
    async fn end_browser(self: &Arc<Self>, row: &LoginRow) {
        let Some(sid) = &row.browser_sandbox_id else {
            return;
        };
        let owner = match self.store.user_by_id(&row.owner_id).await {
            Ok(Some(u)) => u,
            _ => return,
        };
        if let Err(e) = self.delete_sandbox(&owner, sid).await {
            tracing::warn!(login = %row.id, sandbox = %sid, error = %e, "could not destroy the browser sandbox");
        }
    }

    fn spawn_driver(self: &Arc<Self>, id: &str) {
        {
            let mut d = self
                .logins
                .driving
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !d.insert(id.to_owned()) {
                return;
            }
        }
        let app = self.clone();
        let id = id.to_owned();
        self.spawn(async move {
            app.drive(&id).await;
            app.logins
                .driving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    async fn drive(self: &Arc<Self>, id: &str) {
        let mut agent_misses = 0u32;
        loop {
            let row = match self.store.login(id).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(login = %id, error = %e, "reading the login failed");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            let step = match self.step(&row, &mut agent_misses).await {
                Ok(s) => s,
                Err((why, reason)) => {
                    self.fail_login(&row, why, &reason).await;
                    Step::Done
                }
            };
            match step {
                Step::Again => {}
                Step::Wait => tokio::time::sleep(POLL).await,
                Step::Done => return,
            }
        }
    }

    async fn fail_login(self: &Arc<Self>, row: &LoginRow, why: Why, reason: &str) {
        if transition(row.state, &Event::Fail(reason.to_owned())).is_err() {
            return;
        }
        if let Ok(true) = self
            .store
            .transition_login(
                &row.id,
                row.state,
                LoginState::Failed,
                &LoginUpdate {
                    reason: Some(reason.to_owned()),
                    ..Default::default()
                },
            )
            .await
        {
            tracing::warn!(login = %row.id, reason, "login failed");
            self.count_failed(&row.owner_id, &row.provider, why.label());
            self.end_browser(row).await;
        }
    }

    async fn step(
        self: &Arc<Self>,
        row: &LoginRow,
        agent_misses: &mut u32,
    ) -> Result<Step, (Why, String)> {
        let internal = |e: &dyn std::fmt::Display| (Why::Internal, e.to_string());
        match row.state {
            LoginState::Starting | LoginState::AwaitingUser => {
                if row.expires_at <= now_ms() {
                    self.expire(row).await;
                    return Ok(Step::Done);
                }
                let Some(def) = self.providers().get(&row.provider).cloned() else {
                    return Err((
                        Why::Internal,
                        format!("provider {:?} is no longer defined", row.provider),
                    ));
                };
                let Some(sid) = row.browser_sandbox_id.clone() else {
                    // Interrupted between the row and its sandbox.
                    let owner = self
                        .store
                        .user_by_id(&row.owner_id)
                        .await
                        .map_err(|e| internal(&e))?
                        .ok_or_else(|| (Why::Internal, "owner is gone".to_owned()))?;
                    let sb = self
                        .create_sandbox_for(&owner, SandboxKind::Browser)
                        .await
                        .map_err(|e| (Why::Sandbox, format!("no browser sandbox: {e}")))?;
                    self.store
                        .set_login_fields(&row.id, Some(&sb.id), None)
                        .await
                        .map_err(|e| internal(&e))?;
                    return Ok(Step::Again);
                };
                let sb = self
                    .store
                    .sandbox(&sid)
                    .await
                    .map_err(|e| internal(&e))?
                    .ok_or_else(|| (Why::Sandbox, "the browser sandbox is gone".to_owned()))?;
                match sb.state {
                    super::state::SandboxState::Ready => {}
                    super::state::SandboxState::Provisioning
                    | super::state::SandboxState::Booting => return Ok(Step::Wait),
                    other => {
                        return Err((
                            Why::Sandbox,
                            format!(
                                "the browser sandbox is {other}{}",
                                sb.failure_reason
                                    .map(|r| format!(": {r}"))
                                    .unwrap_or_default()
                            ),
                        ))
                    }
                }
                let endpoints = self.ready_endpoints(&sb).map_err(|e| internal(&e))?;
                // Start is idempotent: after a restart it answers the running login.
                let status: Result<Option<LoginStatus>, _> = if row.state == LoginState::Starting {
                    self.agent
                        .call(
                            Method::POST,
                            endpoints.agent,
                            &sb.agent_token,
                            "/login",
                            Some(&LoginStart {
                                login_id: row.id.clone(),
                                provider: def,
                            }),
                        )
                        .await
                } else {
                    self.agent
                        .call::<(), _>(
                            Method::GET,
                            endpoints.agent,
                            &sb.agent_token,
                            &format!("/login/{}", row.id),
                            None,
                        )
                        .await
                };
                let status = match status {
                    Ok(Some(s)) => {
                        *agent_misses = 0;
                        s
                    }
                    Err(crate::app::agent::AgentError::Status { status: 404, .. })
                        if row.state == LoginState::AwaitingUser =>
                    {
                        return Err((
                            Why::Agent,
                            "the sandbox's agent no longer runs this login (it restarted)".into(),
                        ))
                    }
                    other => {
                        *agent_misses += 1;
                        if *agent_misses >= AGENT_PATIENCE {
                            let why = match other {
                                Err(e) => e.to_string(),
                                Ok(_) => "empty answer".into(),
                            };
                            return Err((Why::Agent, format!("the agent did not answer: {why}")));
                        }
                        return Ok(Step::Wait);
                    }
                };
                match status.phase {
                    AgentLoginPhase::Failed => Err((
                        Why::CliExited,
                        status
                            .error
                            .unwrap_or_else(|| "the login command failed".into()),
                    )),
                    AgentLoginPhase::Captured => {
                        let ok = self
                            .store
                            .transition_login(
                                &row.id,
                                row.state,
                                LoginState::Captured,
                                &LoginUpdate {
                                    login_url: status.login_url,
                                    ..Default::default()
                                },
                            )
                            .await
                            .map_err(|e| internal(&e))?;
                        Ok(if ok { Step::Again } else { Step::Wait })
                    }
                    AgentLoginPhase::AwaitingUser | AgentLoginPhase::Running => {
                        if row.state == LoginState::Starting && status.login_url.is_some() {
                            self.store
                                .transition_login(
                                    &row.id,
                                    LoginState::Starting,
                                    LoginState::AwaitingUser,
                                    &LoginUpdate {
                                        login_url: status.login_url,
                                        ..Default::default()
                                    },
                                )
                                .await
                                .map_err(|e| internal(&e))?;
                        } else if status.awaiting_code != row.awaiting_code {
                            self.store
                                .set_login_fields(&row.id, None, Some(status.awaiting_code))
                                .await
                                .map_err(|e| internal(&e))?;
                        }
                        Ok(Step::Wait)
                    }
                }
            }
            LoginState::Captured => {
                let sb = self.browser_of(row).await.map_err(|e| internal(&e))?;
                let endpoints = self
                    .ready_endpoints(&sb)
                    .map_err(|e| (Why::Sandbox, e.to_string()))?;
                let files: FileSet = self
                    .agent
                    .call::<(), FileSet>(
                        Method::GET,
                        endpoints.agent,
                        &sb.agent_token,
                        &format!("/login/{}/credentials", row.id),
                        None,
                    )
                    .await
                    .map_err(|e| (Why::Agent, format!("fetching the credentials: {e}")))?
                    .ok_or_else(|| (Why::Agent, "the agent sent no credentials".to_owned()))?;
                let plain = SecretBox::new(Box::new(
                    serde_json::to_vec(&files).map_err(|e| internal(&e))?,
                ));
                drop(files);
                let vault = self.vault.read().await;
                let sealed = vault.seal(
                    plain.expose_secret(),
                    &aad(&row.owner_id, &row.provider, &row.id),
                );
                let key_id = vault.current_key_id().to_owned();
                // The keyring stays read-locked until the record is stored: a
                // reload (vault rotate) waits, so it never misses a record
                // sealed under a key it is about to retire.
                let now = now_ms();
                let cred = CredentialRow {
                    owner_id: row.owner_id.clone(),
                    provider: row.provider.clone(),
                    login_id: row.id.clone(),
                    sealed,
                    key_id,
                    created_at: now,
                    updated_at: now,
                    delivered_at: None,
                };
                self.store
                    .store_credentials(&row.id, &cred)
                    .await
                    .map_err(|e| internal(&e))?;
                drop(vault);
                tracing::info!(login = %row.id, "credentials sealed and stored");
                Ok(Step::Again)
            }
            LoginState::Stored => {
                let workspace = self.deliver(row).await?;
                self.store
                    .transition_login(
                        &row.id,
                        LoginState::Stored,
                        LoginState::Delivered,
                        &LoginUpdate {
                            workspace_sandbox_id: Some(workspace),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| internal(&e))?;
                Ok(Step::Again)
            }
            LoginState::Delivered => {
                self.end_browser(row).await;
                if self
                    .store
                    .transition_login(
                        &row.id,
                        LoginState::Delivered,
                        LoginState::Completed,
                        &LoginUpdate::default(),
                    )
                    .await
                    .map_err(|e| internal(&e))?
                {
                    let secs = (now_ms() - row.created_at) as f64 / 1000.0;
                    self.count_completed(&row.owner_id, &row.provider, secs);
                    tracing::info!(login = %row.id, seconds = secs, "login completed");
                }
                Ok(Step::Done)
            }
            _ => Ok(Step::Done),
        }
    }

    /// The user's live workspace, created if there is none, once ready.
    async fn ready_workspace(
        self: &Arc<Self>,
        owner: &UserRow,
    ) -> Result<crate::store::SandboxRow, (Why, String)> {
        let deadline =
            tokio::time::Instant::now() + self.cfg.boot_timeout + Duration::from_secs(30);
        loop {
            let rows = self
                .store
                .sandboxes_of(&owner.id)
                .await
                .map_err(|e| (Why::Internal, e.to_string()))?;
            let live = rows
                .into_iter()
                .find(|r| r.kind == SandboxKind::Workspace && r.state.is_live());
            match live {
                Some(r) if r.state == super::state::SandboxState::Ready => return Ok(r),
                Some(r) if r.state == super::state::SandboxState::Stopping => {}
                Some(_) => {}
                None => match self.create_sandbox_for(owner, SandboxKind::Workspace).await {
                    Ok(_) | Err(AppError::Conflict(_)) => {}
                    Err(e) => return Err((Why::Delivery, format!("no workspace sandbox: {e}"))),
                },
            }
            if tokio::time::Instant::now() > deadline {
                return Err((
                    Why::Delivery,
                    "the workspace sandbox did not become ready".into(),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Open the stored record and write its files into the workspace; check
    /// the CLI there where it has a way to say it is signed in.
    async fn deliver(self: &Arc<Self>, row: &LoginRow) -> Result<String, (Why, String)> {
        let internal = |e: &dyn std::fmt::Display| (Why::Internal, e.to_string());
        let owner = self
            .store
            .user_by_id(&row.owner_id)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| (Why::Internal, "owner is gone".to_owned()))?;
        let cred = self
            .store
            .credential(&row.owner_id, &row.provider)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| {
                (
                    Why::Internal,
                    "the stored credentials are missing".to_owned(),
                )
            })?;
        let ws = self.ready_workspace(&owner).await?;
        let endpoints = self.ready_endpoints(&ws).map_err(|e| internal(&e))?;
        {
            let vault = self.vault.read().await;
            let plain = vault
                .open(
                    &cred.sealed,
                    &aad(&cred.owner_id, &cred.provider, &cred.login_id),
                )
                .map_err(|e| {
                    (
                        Why::Internal,
                        format!("opening the stored credentials: {e}"),
                    )
                })?;
            drop(vault);
            let files: FileSet = serde_json::from_slice(plain.expose_secret()).map_err(|_| {
                (
                    Why::Internal,
                    "the stored credentials are unreadable".into(),
                )
            })?;
            self.agent
                .call::<_, serde_json::Value>(
                    Method::POST,
                    endpoints.agent,
                    &ws.agent_token,
                    "/credentials/deliver",
                    Some(&files),
                )
                .await
                .map_err(|e| (Why::Delivery, format!("writing into the workspace: {e}")))?;
        }
        if let Some(check) = self
            .providers()
            .get(&row.provider)
            .and_then(|p| p.check.clone())
        {
            let out = self
                .agent
                .exec(
                    endpoints.agent,
                    &ws.agent_token,
                    &ExecRequest {
                        argv: check.clone(),
                        env: Default::default(),
                        timeout_s: Some(60),
                    },
                )
                .await
                .map_err(|e| (Why::Delivery, format!("checking in the workspace: {e}")))?;
            if out.exit_code != Some(0) {
                let said: String = format!("{} {}", out.stdout, out.stderr)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(300)
                    .collect();
                return Err((
                    Why::Delivery,
                    format!(
                        "`{}` in the workspace does not report itself signed in (exit {:?}): {said}",
                        check.join(" "),
                        out.exit_code
                    ),
                ));
            }
        }
        self.store
            .mark_delivered(&row.owner_id, &row.provider)
            .await
            .map_err(|e| internal(&e))?;
        tracing::info!(login = %row.id, workspace = %ws.id, "credentials delivered");
        Ok(ws.id)
    }
}
