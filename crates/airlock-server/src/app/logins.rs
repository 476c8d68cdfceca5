//! Login sessions: a CLI signed in inside a browser sandbox, its credentials
//! captured, sealed in the vault and delivered to the user's workspace.
//!
//! The state machine (`state.rs`) decides every transition and names the
//! effect that follows; `advance.rs` is the only writer of the state; the
//! effect handlers (`steps.rs`) do the I/O, each step under its own deadline,
//! and end in the next event. One task drives each login. Every state is
//! written before its side effect, so after a restart `recover_logins` starts
//! the task again from the row, and every side effect is safe to repeat (the
//! agent answers a repeated start with the running login; delivery rewrites
//! the same files; destroying a sandbox twice is harmless).

pub mod advance;
pub mod progress;
pub mod providers;
pub mod state;
mod steps;
#[cfg(test)]
mod tests;

pub use advance::{advance, AdvanceError, Advanced};

use super::{App, AppConfig, AppError};
use crate::store::{now_ms, LoginRow, Store, UserRow};
use crate::vault::Aad;
use airlock_proto::login::LoginInput;
use airlock_proto::metadata::SandboxKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use state::{resume, Effect, Event, LoginState};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use steps::Next;

/// How long each step of a login may take, and how often it looks.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Between two looks at the agent or a sandbox.
    pub poll: Duration,
    /// The browser sandbox made and ready.
    pub sandbox: Duration,
    /// The agent unreachable this long in a row fails the login.
    pub agent: Duration,
    /// The agent accepting the login command, and the command drawing its
    /// first screen.
    pub cli_start: Duration,
    /// From the command's first screen to its last prompt answered.
    pub prompts: Duration,
    /// From its prompts answered (or its first screen, without prompts) to
    /// its sign-in URL. The agent's own, shorter wait (the rule's
    /// `hook_wait_s`) fails first when the command showed something that
    /// does not qualify.
    pub url: Duration,
    /// Fetching the credentials once the agent saw them.
    pub capture: Duration,
    /// The workspace ready, the files written and checked.
    pub delivery: Duration,
}

impl Timing {
    pub fn of(cfg: &AppConfig) -> Self {
        Timing {
            poll: Duration::from_millis(500),
            sandbox: cfg.boot_timeout + Duration::from_secs(30),
            agent: Duration::from_secs(15),
            cli_start: Duration::from_secs(60),
            prompts: Duration::from_secs(90),
            url: Duration::from_secs(90),
            capture: Duration::from_secs(60),
            delivery: cfg.boot_timeout + Duration::from_secs(90),
        }
    }
}

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
    /// By reason: `expired`, `cancelled`, or the step that failed (`sandbox`,
    /// `agent`, `cli_start`, `cli_exited`, `url`, `capture`, `delivery`, `internal`).
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
    /// Unset: [`Timing::of`] the app's config.
    timing: RwLock<Option<Timing>>,
    /// The step each login in `starting` is at.
    pub progress: progress::Progress,
}

impl LoginsState {
    /// Use other step deadlines (tests: short ones).
    pub fn set_timing(&self, timing: Timing) {
        *self.timing.write().unwrap_or_else(|p| p.into_inner()) = Some(timing);
    }
}

/// Where a guest's agent listens, and the token it takes.
struct AgentAt {
    addr: std::net::SocketAddr,
    token: String,
}

fn new_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

pub(crate) fn aad(owner: &str, provider: &str, login_id: &str) -> Aad {
    Aad::new(owner, &format!("credentials:{provider}"), login_id)
}

/// End every live login of a user being removed, each through the machine
/// (`OwnerRemoved`). Their browser sandboxes are stopped with the user's
/// other sandboxes.
pub async fn end_logins_of(store: &Store, user_id: &str, reason: &str) -> Result<(), AppError> {
    for row in store.logins_in(&LoginState::LIVE).await? {
        if row.owner_id != user_id {
            continue;
        }
        let event = Event::OwnerRemoved {
            reason: reason.to_owned(),
        };
        match advance(store, &row.id, &event).await {
            Ok(_) | Err(AdvanceError::Refused(_) | AdvanceError::NotFound(_)) => {}
            Err(AdvanceError::Store(e)) => return Err(e.into()),
            Err(e) => return Err(AppError::Internal(e.to_string())),
        }
    }
    Ok(())
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

    fn timing(&self) -> Timing {
        self.logins
            .timing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| Timing::of(&self.cfg))
    }

    /// `POST /logins`: a login row, then its browser sandbox; the rest runs
    /// in the background.
    pub async fn start_login(
        self: &Arc<Self>,
        user: &UserRow,
        provider: &str,
    ) -> Result<LoginRow, AppError> {
        self.start_login_to(user, provider, None).await
    }

    /// [`Self::start_login`], delivering to the caller's workspace named
    /// `workspace` (default `default`; made if it does not run).
    pub async fn start_login_to(
        self: &Arc<Self>,
        user: &UserRow,
        provider: &str,
        workspace: Option<&str>,
    ) -> Result<LoginRow, AppError> {
        if let Some(name) = workspace {
            super::workspaces::check_name(name)?;
        }
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
        if let Some(name) = workspace.filter(|n| *n != super::workspaces::DEFAULT) {
            self.store.set_login_target(&row.id, name).await?;
        }
        self.count_started(&user.id, provider);
        let sandbox = match self
            .create_admitted(user, SandboxKind::Browser, sandbox_id, permit)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // Nothing was made: the login ends here, with the reason.
                let failure =
                    state::Failure::new(state::Stage::Sandbox, format!("none was made: {e}"));
                self.apply(&row.id, &Event::Fail(failure)).await;
                return Err(e);
            }
        };
        self.store
            .set_login_fields(&row.id, Some(&sandbox.id), None)
            .await?;
        row.browser_sandbox_id = Some(sandbox.id);
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

    /// `DELETE /logins/{id}`: cancel one whose credentials are not stored yet.
    pub async fn cancel_login(
        self: &Arc<Self>,
        user: &UserRow,
        id: &str,
    ) -> Result<LoginRow, AppError> {
        let row = self.login_of(user, id).await?;
        if row.state.is_final() {
            return Ok(row);
        }
        let event = Event::Cancel {
            reason: "cancelled by the user".into(),
        };
        match advance(&self.store, id, &event).await {
            Ok(done) => {
                tracing::info!(login = %id, from = %done.from, "login cancelled");
                self.run_side_effects(&done).await;
                Ok(done.row)
            }
            Err(AdvanceError::Refused(r)) if r.from.is_final() => self.login_of(user, id).await,
            Err(AdvanceError::Refused(r)) => Err(AppError::Conflict(format!(
                "{r}: its credentials are already stored"
            ))),
            Err(AdvanceError::Store(e)) => Err(e.into()),
            Err(e) => Err(AppError::Internal(e.to_string())),
        }
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
        let at = self.agent_at(&sb).await?;
        self.guest
            .login_input(
                at.addr,
                &at.token,
                id,
                &LoginInput {
                    text: code.to_owned(),
                },
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

    async fn agent_at(&self, sb: &crate::store::SandboxRow) -> Result<AgentAt, AppError> {
        Ok(AgentAt {
            addr: self.ready_endpoints(sb).await?.agent,
            token: sb.agent_token.clone(),
        })
    }

    /// After a restart: carry on with logins that were under way, and finish
    /// tearing down after those that ended.
    pub(crate) async fn recover_logins(self: &Arc<Self>) {
        let _ = self.login_metrics();
        let _ = self.providers();
        match self.store.logins_in(&LoginState::LIVE).await {
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
                        for effect in resume(row.state) {
                            let _ = self.run_effect(&row.id, effect).await;
                        }
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
            self.apply(&row.id, &expiry(&row)).await;
        }
    }

    /// Advance a login and run what follows: the side effects here, the
    /// work (a step of the login) in its driving task. Nothing when the
    /// machine refuses (another writer moved the login first).
    async fn apply(self: &Arc<Self>, id: &str, event: &Event) -> Option<Advanced> {
        match advance(&self.store, id, event).await {
            Ok(done) => {
                self.run_side_effects(&done).await;
                if done.effects.iter().any(is_work) {
                    self.spawn_driver(id);
                }
                Some(done)
            }
            Err(AdvanceError::Refused(r)) => {
                tracing::debug!(login = %id, error = %r, "event refused");
                None
            }
            Err(e) => {
                tracing::warn!(login = %id, error = %e, event = event.name(), "could not advance the login");
                None
            }
        }
    }

    async fn run_side_effects(self: &Arc<Self>, done: &Advanced) {
        for effect in done.effects.iter().filter(|e| !is_work(e)) {
            let _ = self.run_effect(&done.row.id, effect.clone()).await;
        }
        if let Some(reason) = done
            .row
            .reason
            .as_deref()
            .filter(|_| done.row.state == LoginState::Failed)
        {
            tracing::warn!(login = %done.row.id, reason, "login failed");
        }
    }

    pub(crate) fn spawn_driver(self: &Arc<Self>, id: &str) {
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
            // Among replicas: this one drives it (the leader hands it to
            // itself if this replica goes away; cluster::duties).
            if app.cfg.cluster {
                if let Err(e) = app.store.set_login_driver(&id, &app.replica_id).await {
                    tracing::warn!(login = %id, error = %e, "could not record who drives the login");
                }
            }
            app.drive(&id).await;
            app.logins.progress.forget(&id);
            app.logins
                .driving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// The login's task: run the effect its state names, feed the event it
    /// ends in to the machine, run what the machine says next; stop when
    /// nothing follows or another writer moved the login.
    async fn drive(self: &Arc<Self>, id: &str) {
        let poll = self.timing().poll;
        let row = loop {
            match self.store.login(id).await {
                Ok(Some(r)) => break r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(login = %id, error = %e, "reading the login failed");
                    tokio::time::sleep(poll).await;
                }
            }
        };
        if row.state.is_final() {
            return;
        }
        let mut queue: VecDeque<Effect> = resume(row.state).into();
        while let Some(effect) = queue.pop_front() {
            let done = match self.run_effect(id, effect).await {
                Next::Nothing => continue,
                Next::Stop => return,
                Next::Advanced(done) => done,
                Next::Event(event) => match self.advance_retrying(id, &event).await {
                    Some(done) => done,
                    None => return,
                },
            };
            self.run_side_effects(&done).await;
            queue.extend(done.effects.into_iter().filter(is_work));
        }
    }

    /// Run one effect: its handler's outcome (a failure becomes `Fail`).
    async fn run_effect(self: &Arc<Self>, id: &str, effect: Effect) -> Next {
        let row = match self.store.login(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return Next::Stop,
            Err(e) => {
                let failure = state::Failure::new(state::Stage::Internal, e.to_string());
                return Next::Event(Event::Fail(failure));
            }
        };
        let outcome = match effect {
            Effect::Start => self.start_step(&row).await,
            Effect::Watch => self.watch_step(&row).await,
            Effect::Capture => self.capture_step(&row).await,
            Effect::Deliver => self.deliver_step(&row).await,
            Effect::Finish => {
                self.end_browser(&row).await;
                Ok(Next::Event(Event::Finished))
            }
            Effect::DestroyBrowser => {
                self.end_browser(&row).await;
                Ok(Next::Nothing)
            }
            Effect::CountCompleted => {
                let end = row.finished_at.unwrap_or_else(now_ms);
                let secs = (end - row.created_at) as f64 / 1000.0;
                self.count_completed(&row.owner_id, &row.provider, secs);
                tracing::info!(login = %row.id, seconds = secs, "login completed");
                Ok(Next::Nothing)
            }
            Effect::CountEnded(label) => {
                self.count_failed(&row.owner_id, &row.provider, label);
                Ok(Next::Nothing)
            }
        };
        outcome.unwrap_or_else(|failure| Next::Event(Event::Fail(failure)))
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
}

/// A step of the login (run by its task), not a side effect of a transition.
fn is_work(e: &Effect) -> bool {
    matches!(
        e,
        Effect::Start | Effect::Watch | Effect::Capture | Effect::Deliver | Effect::Finish
    )
}

fn expiry(row: &LoginRow) -> Event {
    let secs = (row.expires_at - row.created_at) / 1000;
    Event::Expire {
        reason: format!("not signed in within {secs} s"),
    }
}
