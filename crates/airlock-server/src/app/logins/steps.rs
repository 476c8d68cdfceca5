//! The effect handlers: one per step of a login, each under its own
//! deadline, each ending in the event it observed (or a [`Failure`] naming
//! the step). They read the store and call the agent and the vault; the only
//! state they write goes through `advance`.

use super::progress::LoginStep;
use super::state::{Event, Failure, LoginState, SealedRecord, Stage};
use super::{aad, advance, expiry, AdvanceError, Advanced, AgentAt, Timing};
use crate::app::agent::AgentError;
use crate::app::state::SandboxState;
use crate::app::{App, AppError};
use crate::store::{now_ms, LoginRow, SandboxRow, UserRow};
use airlock_proto::agent::ExecRequest;
use airlock_proto::login::{AgentLoginPhase, AgentStep, FileSet, LoginStart, LoginStatus};
use airlock_proto::metadata::SandboxKind;
use secrecy::{ExposeSecret, SecretBox};
use std::sync::Arc;
use tokio::time::Instant;

/// What a handler ends in.
pub(super) enum Next {
    /// Nothing follows (a side effect).
    Nothing,
    /// Feed this to the machine.
    Event(Event),
    /// The handler advanced the login itself (it had to hold a lock across
    /// the write).
    Advanced(Advanced),
    /// Another writer moved the login: its task stops.
    Stop,
}

type Step = Result<Next, Failure>;

fn internal(e: impl std::fmt::Display) -> Failure {
    Failure::new(Stage::Internal, e.to_string())
}

/// Counts how long the agent has not answered, against `Timing::agent`.
struct Patience {
    since: Option<Instant>,
    limit: std::time::Duration,
}

impl Patience {
    fn new(t: &Timing) -> Self {
        Patience {
            since: None,
            limit: t.agent,
        }
    }

    fn answered(&mut self) {
        self.since = None;
    }

    /// A miss; a failure once they have lasted too long.
    fn missed(&mut self, e: &AgentError) -> Result<(), Failure> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.limit {
            return Err(Failure::new(
                Stage::Agent,
                format!(
                    "no answer for {:?}: {}",
                    self.limit,
                    crate::app::sandboxes::chain(e)
                ),
            ));
        }
        Ok(())
    }
}

fn unreachable(e: &AgentError) -> bool {
    matches!(
        e,
        AgentError::Unreachable(_) | AgentError::Decode(_) | AgentError::Down(_)
    )
}

/// Where a status leads, for a login in `starting` or `awaiting_user`.
fn from_status(state: LoginState, status: &LoginStatus) -> Option<Event> {
    match status.phase {
        AgentLoginPhase::Failed => Some(Event::Fail(Failure::new(
            // The agent gave up waiting for a URL that passes the rule;
            // else the command ended.
            if status.step == Some(AgentStep::Url) {
                Stage::Url
            } else {
                Stage::CliExited
            },
            status
                .error
                .clone()
                .unwrap_or_else(|| "it ended without credentials".into()),
        ))),
        AgentLoginPhase::Captured => Some(Event::Captured {
            url: status.login_url.clone(),
        }),
        AgentLoginPhase::AwaitingUser | AgentLoginPhase::Running => match &status.login_url {
            Some(url) if state == LoginState::Starting => {
                Some(Event::UrlCaptured { url: url.clone() })
            }
            _ => None,
        },
    }
}

impl App {
    /// The row again, if it is still in `state` (else another writer moved it).
    async fn still(&self, id: &str, state: LoginState) -> Result<Option<LoginRow>, Failure> {
        Ok(self
            .store
            .login(id)
            .await
            .map_err(internal)?
            .filter(|r| r.state == state))
    }

    async fn owner(&self, row: &LoginRow) -> Result<UserRow, Failure> {
        self.store
            .user_by_id(&row.owner_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| internal("the login's owner is gone"))
    }

    async fn at(&self, sb: &SandboxRow, stage: Stage) -> Result<AgentAt, Failure> {
        self.agent_at(sb)
            .await
            .map_err(|e| Failure::new(stage, e.to_string()))
    }

    /// `starting`: the browser sandbox ready, the login command started, its
    /// URL (or at once its credentials) seen.
    pub(super) async fn start_step(self: &Arc<Self>, row: &LoginRow) -> Step {
        let t = self.timing();
        let Some(def) = self.providers().get(&row.provider).cloned() else {
            return Err(internal(format!(
                "provider {:?} is no longer defined",
                row.provider
            )));
        };
        self.mark(&row.id, LoginStep::Sandbox);
        let sb = match self.ready_browser(row, &t).await? {
            Ok(sb) => sb,
            Err(next) => return Ok(next),
        };
        self.mark(&row.id, LoginStep::Agent);
        let at = self.at(&sb, Stage::Sandbox).await?;
        let start = LoginStart {
            login_id: row.id.clone(),
            provider: def,
        };
        let mut patience = Patience::new(&t);
        let started = Instant::now();
        let mut status = loop {
            match self.guest.login_start(at.addr, &at.token, &start).await {
                Ok(s) => break s,
                Err(e) if unreachable(&e) => patience.missed(&e)?,
                Err(AgentError::Status { status, message }) if status >= 500 => {
                    if started.elapsed() >= t.cli_start {
                        return Err(Failure::new(
                            Stage::CliStart,
                            format!("refused for {:?}: {status} {message}", t.cli_start),
                        ));
                    }
                }
                Err(e) => return Err(Failure::new(Stage::CliStart, e.to_string())),
            }
            tokio::time::sleep(t.poll).await;
        };
        patience.answered();
        // Each step's deadline runs from when the login entered it.
        let mut entered: Option<(AgentStep, Instant)> = None;
        loop {
            let Some(row) = self.still(&row.id, LoginState::Starting).await? else {
                return Ok(Next::Stop);
            };
            if row.expires_at <= now_ms() {
                return Ok(Next::Event(expiry(&row)));
            }
            if let Some(event) = from_status(row.state, &status) {
                return Ok(Next::Event(event));
            }
            self.note_awaiting_code(&row, &status).await;
            let step = status.step.unwrap_or(AgentStep::Url);
            if entered.is_none_or(|(s, _)| s != step) {
                entered = Some((step, Instant::now()));
                self.mark(&row.id, step.into());
            }
            let since = match entered {
                Some((_, at)) if step != AgentStep::CliStart => at,
                _ => started,
            };
            if let Some(failure) = overdue(step, since, &t, &status) {
                return Err(failure);
            }
            tokio::time::sleep(t.poll).await;
            status = loop {
                match self.guest.login_status(at.addr, &at.token, &row.id).await {
                    Ok(s) => {
                        patience.answered();
                        break s;
                    }
                    Err(e) if unreachable(&e) => patience.missed(&e)?,
                    Err(e) => return Err(Failure::new(Stage::Agent, e.to_string())),
                }
                tokio::time::sleep(t.poll).await;
            };
        }
    }

    /// The login entered `step` now (for `GET /logins/{id}` and the bench).
    fn mark(&self, id: &str, step: LoginStep) {
        self.logins.progress.enter(id, step, now_ms());
    }

    /// The login's browser sandbox once ready, made if the row has none
    /// (interrupted between the row and its sandbox); `Err(next)` when the
    /// login moved meanwhile or expired.
    async fn ready_browser(
        self: &Arc<Self>,
        row: &LoginRow,
        t: &Timing,
    ) -> Result<Result<SandboxRow, Next>, Failure> {
        let by = Instant::now() + t.sandbox;
        loop {
            let Some(row) = self.still(&row.id, row.state).await? else {
                return Ok(Err(Next::Stop));
            };
            if row.expires_at <= now_ms() {
                return Ok(Err(Next::Event(expiry(&row))));
            }
            let Some(sid) = row.browser_sandbox_id.clone() else {
                let owner = self.owner(&row).await?;
                let sb = self
                    .create_sandbox_for(&owner, SandboxKind::Browser)
                    .await
                    .map_err(|e| Failure::new(Stage::Sandbox, format!("none was made: {e}")))?;
                self.store
                    .set_login_fields(&row.id, Some(&sb.id), None)
                    .await
                    .map_err(internal)?;
                continue;
            };
            let sb = self
                .store
                .sandbox(&sid)
                .await
                .map_err(internal)?
                .ok_or_else(|| Failure::new(Stage::Sandbox, "it is gone"))?;
            match sb.state {
                SandboxState::Ready => return Ok(Ok(sb)),
                SandboxState::Provisioning | SandboxState::Booting => {}
                other => return Err(sandbox_ended(&sb, other)),
            }
            if Instant::now() >= by {
                return Err(Failure::new(
                    Stage::Sandbox,
                    format!("not ready within {:?}", t.sandbox),
                ));
            }
            tokio::time::sleep(t.poll).await;
        }
    }

    async fn note_awaiting_code(&self, row: &LoginRow, status: &LoginStatus) {
        if status.awaiting_code != row.awaiting_code {
            if let Err(e) = self
                .store
                .set_login_fields(&row.id, None, Some(status.awaiting_code))
                .await
            {
                tracing::warn!(login = %row.id, error = %e, "could not note the code prompt");
            }
        }
    }

    /// `awaiting_user`: watch the agent until the credentials are there, the
    /// command ends, or the login expires.
    pub(super) async fn watch_step(self: &Arc<Self>, row: &LoginRow) -> Step {
        let t = self.timing();
        let mut patience = Patience::new(&t);
        loop {
            let Some(row) = self.still(&row.id, LoginState::AwaitingUser).await? else {
                return Ok(Next::Stop);
            };
            if row.expires_at <= now_ms() {
                return Ok(Next::Event(expiry(&row)));
            }
            let sb = self.browser_of(&row).await.map_err(|e| match e {
                AppError::NotFound(_) => Failure::new(Stage::Sandbox, "it is gone"),
                e => internal(e),
            })?;
            if sb.state != SandboxState::Ready {
                return Err(sandbox_ended(&sb, sb.state));
            }
            let at = self.at(&sb, Stage::Sandbox).await?;
            match self.guest.login_status(at.addr, &at.token, &row.id).await {
                Ok(status) => {
                    patience.answered();
                    if let Some(event) = from_status(row.state, &status) {
                        return Ok(Next::Event(event));
                    }
                    self.note_awaiting_code(&row, &status).await;
                }
                Err(AgentError::Status { status: 404, .. }) => {
                    return Err(Failure::new(
                        Stage::Agent,
                        "it no longer runs this login (it restarted)",
                    ))
                }
                Err(e) if unreachable(&e) => patience.missed(&e)?,
                Err(e) => return Err(Failure::new(Stage::Agent, e.to_string())),
            }
            tokio::time::sleep(t.poll).await;
        }
    }

    /// `captured`: fetch the credentials, seal them, and store them with the
    /// state `stored` in one transaction.
    pub(super) async fn capture_step(self: &Arc<Self>, row: &LoginRow) -> Step {
        let t = self.timing();
        let sb = self.browser_of(row).await.map_err(|e| match e {
            AppError::NotFound(_) => Failure::new(Stage::Sandbox, "it is gone"),
            e => internal(e),
        })?;
        let at = self.at(&sb, Stage::Capture).await?;
        let by = Instant::now() + t.capture;
        let files: FileSet = loop {
            match self
                .guest
                .login_credentials(at.addr, &at.token, &row.id)
                .await
            {
                Ok(files) => break files,
                Err(e) if unreachable(&e) && Instant::now() < by => {}
                Err(e) => {
                    return Err(Failure::new(
                        Stage::Capture,
                        format!("fetching them: {}", crate::app::sandboxes::chain(&e)),
                    ))
                }
            }
            tokio::time::sleep(t.poll).await;
        };
        if files.files.is_empty() {
            return Err(Failure::new(Stage::Capture, "the agent sent no files"));
        }
        let plain = SecretBox::new(Box::new(serde_json::to_vec(&files).map_err(internal)?));
        drop(files);
        // The keyring stays read-locked until the record is stored: a reload
        // (vault rotate) waits, so it never misses a record sealed under a
        // key it is about to retire.
        let vault = self.vault.read().await;
        let record = SealedRecord {
            sealed: vault.seal(
                plain.expose_secret(),
                &aad(&row.owner_id, &row.provider, &row.id),
            ),
            key_id: vault.current_key_id().to_owned(),
        };
        drop(plain);
        let done = self.advance_retrying(&row.id, &Event::Stored(record)).await;
        drop(vault);
        Ok(match done {
            Some(done) => {
                tracing::info!(login = %row.id, "credentials sealed and stored");
                self.credentials_captured(&row.owner_id, &row.provider, &row.id)
                    .await;
                Next::Advanced(done)
            }
            None => Next::Stop,
        })
    }

    /// Advance, retrying failures of the store (not refusals); `None` when
    /// refused or the store stays down (the row still says where the login
    /// is, and the next start resumes it).
    pub(super) async fn advance_retrying(&self, id: &str, event: &Event) -> Option<Advanced> {
        let poll = self.timing().poll;
        let mut tries = 0;
        loop {
            match advance(&self.store, id, event).await {
                Ok(done) => return Some(done),
                Err(AdvanceError::Refused(r)) => {
                    tracing::debug!(login = %id, error = %r, "event refused");
                    return None;
                }
                Err(AdvanceError::NotFound(_)) => return None,
                Err(e) if tries < 10 => {
                    tries += 1;
                    tracing::warn!(login = %id, error = %e, "advancing the login failed; retrying");
                    tokio::time::sleep(poll * tries).await;
                }
                Err(e) => {
                    tracing::error!(login = %id, error = %e, event = event.name(), "could not advance the login");
                    return None;
                }
            }
        }
    }

    /// `stored`: open the record, write its files into the user's workspace
    /// (made if there is none), and check the CLI there where it has a way
    /// to say it is signed in.
    pub(super) async fn deliver_step(self: &Arc<Self>, row: &LoginRow) -> Step {
        let t = self.timing();
        let by = Instant::now() + t.delivery;
        let owner = self.owner(row).await?;
        let cred = self
            .store
            .credential(&row.owner_id, &row.provider)
            .await
            .map_err(internal)?
            .filter(|c| c.login_id == row.id)
            .ok_or_else(|| internal("the stored credentials are missing"))?;
        let name = self
            .store
            .login_target(&row.id)
            .await
            .map_err(internal)?
            .unwrap_or_else(|| crate::app::workspaces::DEFAULT.to_owned());
        let ws = self.ready_workspace(&owner, &name, &t, by).await?;
        let at = self.at(&ws, Stage::Delivery).await?;
        let generation = self.before_delivery(&cred, &name).await.map_err(internal)?;
        {
            let plain = self
                .vault
                .read()
                .await
                .open(
                    &cred.sealed,
                    &aad(&cred.owner_id, &cred.provider, &cred.login_id),
                )
                .map_err(|e| internal(format!("opening the stored credentials: {e}")))?;
            let files: FileSet = serde_json::from_slice(plain.expose_secret())
                .map_err(|_| internal("the stored credentials are unreadable"))?;
            loop {
                match self
                    .guest
                    .deliver_credentials(at.addr, &at.token, &files)
                    .await
                {
                    Ok(()) => break,
                    Err(e) if unreachable(&e) && Instant::now() < by => {}
                    Err(e) => {
                        return Err(Failure::new(
                            Stage::Delivery,
                            format!("writing into the workspace: {e}"),
                        ))
                    }
                }
                tokio::time::sleep(t.poll).await;
            }
        }
        if !self
            .after_delivery(&ws, &cred, generation)
            .await
            .map_err(internal)?
        {
            return Err(Failure::new(
                Stage::Delivery,
                "the credentials were revoked while they were delivered",
            ));
        }
        if let Some(check) = self
            .providers()
            .get(&row.provider)
            .and_then(|p| p.check.clone())
        {
            let out = self
                .guest
                .exec(
                    at.addr,
                    &at.token,
                    &ExecRequest {
                        argv: check.clone(),
                        env: Default::default(),
                        timeout_s: Some(60),
                    },
                )
                .await
                .map_err(|e| {
                    Failure::new(Stage::Delivery, format!("checking in the workspace: {e}"))
                })?;
            if out.exit_code != Some(0) {
                let said: String = format!("{} {}", out.stdout, out.stderr)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(300)
                    .collect();
                return Err(Failure::new(
                    Stage::Delivery,
                    format!(
                        "`{}` in the workspace does not report itself signed in (exit {:?}): {said}",
                        check.join(" "),
                        out.exit_code
                    ),
                ));
            }
        }
        self.credentials_delivered(&row.owner_id, &row.provider, &row.id, &ws.id)
            .await;
        tracing::info!(login = %row.id, workspace = %ws.id, "credentials delivered");
        Ok(Next::Event(Event::Delivered { workspace: ws.id }))
    }

    /// The user's live workspace `name`, created if there is none, once ready.
    async fn ready_workspace(
        self: &Arc<Self>,
        owner: &UserRow,
        name: &str,
        t: &Timing,
        by: Instant,
    ) -> Result<SandboxRow, Failure> {
        loop {
            let live = self
                .live_workspace(&owner.id, name)
                .await
                .map_err(internal)?;
            match live {
                Some(r) if r.state == SandboxState::Ready => return Ok(r),
                Some(_) => {}
                None => match self.create_workspace(owner, Some(name), true).await {
                    Ok(_) | Err(AppError::Conflict(_)) => {}
                    Err(e) => {
                        return Err(Failure::new(
                            Stage::Delivery,
                            format!("no workspace sandbox: {e}"),
                        ))
                    }
                },
            }
            if Instant::now() >= by {
                return Err(Failure::new(
                    Stage::Delivery,
                    "the workspace sandbox did not become ready in time",
                ));
            }
            tokio::time::sleep(t.poll).await;
        }
    }
}

/// The failure of a login command that stayed in `step` (entered at
/// `since`) past its deadline, naming the step and what the agent saw.
fn overdue(step: AgentStep, since: Instant, t: &Timing, status: &LoginStatus) -> Option<Failure> {
    let (stage, limit, what) = match step {
        AgentStep::CliStart => (Stage::CliStart, t.cli_start, "it drew nothing"),
        AgentStep::Prompts => (Stage::Prompts, t.prompts, "not every prompt was answered"),
        AgentStep::Url => (
            Stage::Url,
            t.url,
            "it handed over no URL that passes the provider's rule",
        ),
    };
    if since.elapsed() < limit {
        return None;
    }
    let seen = status
        .seen
        .as_deref()
        .map(|s| format!("; seen: {s}"))
        .unwrap_or_default();
    Some(Failure::new(
        stage,
        format!("{what} within {limit:?}{seen}"),
    ))
}

fn sandbox_ended(sb: &SandboxRow, state: SandboxState) -> Failure {
    Failure::new(
        Stage::Sandbox,
        format!(
            "it is {state}{}",
            sb.failure_reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    )
}
