//! Keeping the CLIs signed in after a login delivered their credentials:
//! expiry read from the files where the provider definition says, a health
//! status per user and provider, the CLI's own refreshes captured back into
//! the vault, revocation, and the audit trail of all of it.
//!
//! A periodic check ([`App::run_credential_checks`]) looks at every stored
//! record. In each ready workspace the record was delivered to (a user has
//! several, by name: `workspaces.rs`) it reads the provider's files
//! (through the agent, as the sandbox user):
//!
//! ```text
//!  files absent, record delivered ──▶ delivered again from the vault   (delivered)
//!  files older than the vault's   ──▶ the vault's newer copy delivered (delivered)
//!  files differ from the vault's  ──▶ sealed as the record's new value (recaptured)
//!  then: refresh token emptied    ──▶ refresh_failed
//!        check command fails      ──▶ refresh_failed (expired) | revoked (not expired)
//!        expiry passed / near     ──▶ expired / expiring, else healthy
//! ```
//!
//! The worst status over those workspaces is the record's. Without one
//! running, only the vault's copy is judged (its expiry).
//! A status entered `expired`, `refresh_failed` or `revoked` is audited
//! once, on entering it. Revocation deletes the record and removes the
//! files from the workspace now, or at the next check of a ready workspace
//! when none is running; a workspace not running when it was revoked loses
//! the files when it next runs. Every write about one user's credentials
//! happens under that user's lock (one process's), and every delivery
//! checks the store's revocation generation after writing, so neither a
//! check nor a delivery in another process brings back files a revocation
//! just removed. No secret leaves this module: events, statuses and
//! details name providers, times and ids only.

use super::{App, AppError};
use crate::app::state::SandboxState;
use crate::store::{now_ms, AuditRow, CredentialRow, HealthRow, SandboxRow, UserRow};
use airlock_proto::agent::ExecRequest;
use airlock_proto::login::{CredentialFile, ExpiryFormat, FileSet, ProviderDef};
use airlock_proto::metadata::SandboxKind;
use base64::Engine;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

#[cfg(test)]
mod tests;

/// What the health check found, in the API as snake case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// Expires within [`CredentialsState::expiring_within`].
    Expiring,
    Expired,
    /// The CLI could not renew its tokens.
    RefreshFailed,
    /// The CLI says it is not signed in though its token had not expired.
    Revoked,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Expiring => "expiring",
            Health::Expired => "expired",
            Health::RefreshFailed => "refresh_failed",
            Health::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Health::Healthy,
            Health::Expiring,
            Health::Expired,
            Health::RefreshFailed,
            Health::Revoked,
        ]
        .into_iter()
        .find(|h| h.as_str() == s)
    }

    /// Statuses whose entry is an audit event of its own.
    fn audited(self) -> Option<AuditKind> {
        match self {
            Health::Expired => Some(AuditKind::Expired),
            Health::RefreshFailed => Some(AuditKind::RefreshFailed),
            Health::Revoked => Some(AuditKind::Revoked),
            _ => None,
        }
    }
}

/// One kind of audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A login sealed and stored the credentials.
    Captured,
    /// Written into a workspace.
    Delivered,
    /// The CLI refreshed its files in the workspace; the new ones were
    /// sealed as the record's new version.
    Recaptured,
    Expired,
    RefreshFailed,
    /// Revoked by the user (`DELETE /credentials/{provider}`), or found
    /// refused by the CLI's check.
    Revoked,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Captured => "captured",
            AuditKind::Delivered => "delivered",
            AuditKind::Recaptured => "recaptured",
            AuditKind::Expired => "expired",
            AuditKind::RefreshFailed => "refresh_failed",
            AuditKind::Revoked => "revoked",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    provider: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug)]
struct CredentialMetrics {
    records: Family<StatusLabel, Gauge>,
    events: Family<KindLabel, Counter>,
}

#[derive(Debug)]
pub struct CredentialsState {
    metrics: OnceLock<CredentialMetrics>,
    /// One lock per user: revocation and checks of that user's records.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    every: RwLock<Duration>,
    expiring_within: RwLock<Duration>,
}

impl Default for CredentialsState {
    fn default() -> Self {
        CredentialsState {
            metrics: OnceLock::new(),
            locks: Mutex::default(),
            every: RwLock::new(Duration::from_secs(300)),
            expiring_within: RwLock::new(Duration::from_secs(30 * 60)),
        }
    }
}

impl CredentialsState {
    /// How often the check runs (default 5 min).
    pub fn set_every(&self, every: Duration) {
        *self.every.write().unwrap_or_else(|p| p.into_inner()) = every;
    }

    /// A record expiring sooner than this is `expiring` (default 30 min).
    pub fn set_expiring_within(&self, within: Duration) {
        *self
            .expiring_within
            .write()
            .unwrap_or_else(|p| p.into_inner()) = within;
    }

    fn every(&self) -> Duration {
        *self.every.read().unwrap_or_else(|p| p.into_inner())
    }

    fn expiring_within_ms(&self) -> i64 {
        let d = *self
            .expiring_within
            .read()
            .unwrap_or_else(|p| p.into_inner());
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    fn lock_for(&self, owner: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(owner.to_owned()).or_default().clone()
    }
}

/// A record with what the last check found (none yet: `health` unset).
#[derive(Debug, Clone)]
pub struct CredentialView {
    pub record: CredentialRow,
    pub health: Option<HealthRow>,
    /// The status now: a stored `healthy`/`expiring` judged again against
    /// the clock, so a record in no running workspace still ages.
    pub status: Option<Health>,
    /// Whether the CLI can renew its access by itself (unknown: `None`).
    pub refreshable: Option<bool>,
    /// The names of the workspaces it was delivered to.
    pub workspaces: Vec<String>,
}

impl CredentialView {
    /// The status calls for a new login.
    pub fn sign_in_again(&self) -> bool {
        match self.status {
            Some(Health::RefreshFailed | Health::Revoked) => true,
            Some(Health::Expired) => self.refreshable != Some(true),
            _ => false,
        }
    }
}

fn check_provider_name(provider: &str) -> Result<(), AppError> {
    let ok = !provider.is_empty()
        && provider.len() <= 32
        && provider
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AppError::BadInput(
            "provider: lowercase letters, digits and '-', at most 32".into(),
        ))
    }
}

/// How bad a status is, to report the worst over several workspaces.
fn severity(h: Health) -> u8 {
    match h {
        Health::Healthy => 0,
        Health::Expiring => 1,
        Health::Expired => 2,
        Health::RefreshFailed => 3,
        Health::Revoked => 4,
    }
}

/// The value at a dotted key of a JSON document.
fn at_key<'a>(doc: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(doc, |v, part| v.get(part))
}

/// When a credential file says it expires (ms since the epoch); `None`
/// when the definition names no expiry, or the file does not hold one
/// that reads as its format says.
pub fn expiry_of(def: &CredentialFile, contents: &[u8]) -> Option<i64> {
    let (key, format) = (def.expiry_key.as_deref()?, def.expiry_format?);
    let doc: serde_json::Value = serde_json::from_slice(contents).ok()?;
    let v = at_key(&doc, key)?;
    let number = || {
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
    };
    match format {
        ExpiryFormat::UnixMs => number(),
        ExpiryFormat::UnixS => number()?.checked_mul(1000),
        ExpiryFormat::Rfc3339 => {
            let t = time::OffsetDateTime::parse(
                v.as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
        }
        ExpiryFormat::JwtExp => {
            let payload = v.as_str()?.split('.').nth(1)?;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .ok()?;
            let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            claims.get("exp")?.as_i64()?.checked_mul(1000)
        }
    }
}

/// Whether the file still holds a refresh token (`None`: the definition
/// names no refresh key, or the file is not JSON).
pub fn refreshable(def: &CredentialFile, contents: &[u8]) -> Option<bool> {
    let key = def.refresh_key.as_deref()?;
    let doc: serde_json::Value = serde_json::from_slice(contents).ok()?;
    Some(
        at_key(&doc, key)
            .and_then(|v| v.as_str())
            .is_some_and(|s| !s.is_empty()),
    )
}

/// What a set of files says, over every file of the definition: the
/// earliest expiry, and whether all that name a refresh key still hold one.
fn read_set(def: &ProviderDef, set: &FileSet) -> (Option<i64>, Option<bool>) {
    let mut expiry: Option<i64> = None;
    let mut refresh: Option<bool> = None;
    for file in &def.credentials {
        let Some(blob) = set.files.iter().find(|b| b.path == file.path) else {
            continue;
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&blob.contents_b64) else {
            continue;
        };
        if let Some(e) = expiry_of(file, &bytes) {
            expiry = Some(expiry.map_or(e, |x| x.min(e)));
        }
        if let Some(r) = refreshable(file, &bytes) {
            refresh = Some(refresh.unwrap_or(true) && r);
        }
    }
    (expiry, refresh)
}

/// Every file of the definition is there, and has its JSON keys.
fn complete(def: &ProviderDef, set: &FileSet) -> bool {
    def.credentials.iter().all(|file| {
        let Some(blob) = set.files.iter().find(|b| b.path == file.path) else {
            return false;
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&blob.contents_b64) else {
            return false;
        };
        if bytes.is_empty() {
            return false;
        }
        if file.json_keys.is_empty() {
            return true;
        }
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|doc| file.json_keys.iter().all(|k| at_key(&doc, k).is_some()))
    })
}

/// The files of `set` for the definition's paths, in its order.
fn same_files(def: &ProviderDef, a: &FileSet, b: &FileSet) -> bool {
    def.credentials.iter().all(|file| {
        let find = |s: &FileSet| {
            s.files
                .iter()
                .find(|f| f.path == file.path)
                .map(|f| f.contents_b64.clone())
        };
        find(a) == find(b)
    })
}

/// The status from what was read: the pure decision of the check.
pub fn judge(
    now: i64,
    expiring_within_ms: i64,
    expires_at: Option<i64>,
    refresh: Option<bool>,
    check_ok: Option<bool>,
) -> (Health, Option<String>) {
    let expired = expires_at.is_some_and(|e| e <= now);
    if refresh == Some(false) {
        return (
            Health::RefreshFailed,
            Some("the CLI emptied its refresh token (its refresh was refused)".into()),
        );
    }
    if check_ok == Some(false) {
        return if expired {
            (
                Health::RefreshFailed,
                Some("the token expired and the CLI's check fails: it could not renew it".into()),
            )
        } else {
            (
                Health::Revoked,
                Some("the CLI's check does not report it signed in".into()),
            )
        };
    }
    match expires_at {
        Some(_) if expired => (Health::Expired, None),
        Some(e) if e <= now.saturating_add(expiring_within_ms) => (Health::Expiring, None),
        _ => (Health::Healthy, None),
    }
}

/// What the user's files in a workspace told the check.
struct Seen {
    status: Health,
    detail: Option<String>,
    expires_at: Option<i64>,
    version: i64,
    workspace: Option<String>,
}

/// What a user's record for `provider`, captured by `login_id`, is sealed
/// with (see docs/logins.md); for importing a record as a login would have
/// stored it.
pub fn record_aad(owner_id: &str, provider: &str, login_id: &str) -> crate::vault::Aad {
    super::logins::aad(owner_id, provider, login_id)
}

/// An event id that sorts in the order this process made them: the audit
/// pages by time, then id, and a capture and its delivery often share a
/// millisecond.
fn new_id() -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{seq:08x}{}", hex::encode(rand::random::<[u8; 4]>()))
}

impl App {
    fn credential_metrics(&self) -> &CredentialMetrics {
        self.credentials.metrics.get_or_init(|| {
            let m = CredentialMetrics {
                records: Family::default(),
                events: Family::default(),
            };
            self.metrics.register(
                "credentials",
                "Stored credential records, by provider and health status",
                m.records.clone(),
            );
            self.metrics.register(
                "credential_events",
                "Credential audit events recorded, by kind",
                m.events.clone(),
            );
            m
        })
    }

    /// Write an audit event; a failure to write is logged (the work it
    /// records is done either way).
    pub async fn audit(
        &self,
        owner_id: &str,
        kind: AuditKind,
        provider: &str,
        workspace: Option<&str>,
        login_id: Option<&str>,
        detail: Option<String>,
    ) {
        let row = AuditRow {
            id: new_id(),
            owner_id: owner_id.to_owned(),
            at: now_ms(),
            kind: kind.as_str().to_owned(),
            provider: provider.to_owned(),
            workspace_sandbox_id: workspace.map(str::to_owned),
            login_id: login_id.map(str::to_owned),
            detail,
        };
        self.credential_metrics()
            .events
            .get_or_create(&KindLabel {
                kind: kind.as_str().to_owned(),
            })
            .inc();
        if let Err(e) = self.store.insert_audit(&row).await {
            tracing::error!(user = %owner_id, provider, kind = kind.as_str(), error = %e, "could not write the audit event");
        }
    }

    /// A login stored its record (called by the login's capture step):
    /// audited, its expiry read, a revocation still pending for the
    /// provider dropped (the new files must stay).
    pub async fn credentials_captured(&self, owner_id: &str, provider: &str, login_id: &str) {
        let lock = self.credentials.lock_for(owner_id);
        let _held = lock.lock().await;
        if let Err(e) = self.store.clear_revocation(owner_id, provider).await {
            tracing::warn!(user = %owner_id, provider, error = %e, "could not clear a revocation");
        }
        let expires_at = match self.vault_files(owner_id, provider).await {
            Ok(Some((cred, files))) if cred.login_id == login_id => self
                .providers()
                .get(provider)
                .and_then(|def| read_set(def, &files).0),
            _ => None,
        };
        let now = now_ms();
        let (status, detail) = judge(
            now,
            self.credentials.expiring_within_ms(),
            expires_at,
            None,
            None,
        );
        let health = HealthRow {
            owner_id: owner_id.to_owned(),
            provider: provider.to_owned(),
            status: status.as_str().to_owned(),
            expires_at,
            checked_at: now,
            workspace_sandbox_id: None,
            detail,
            version: 1,
        };
        if let Err(e) = self.store.put_health(&health).await {
            tracing::warn!(user = %owner_id, provider, error = %e, "could not write the credentials' health");
        }
        self.audit(
            owner_id,
            AuditKind::Captured,
            provider,
            None,
            Some(login_id),
            None,
        )
        .await;
    }

    /// A login delivered its record into a workspace (called by the
    /// login's delivery step).
    pub async fn credentials_delivered(
        &self,
        owner_id: &str,
        provider: &str,
        login_id: &str,
        workspace: &str,
    ) {
        match self.workspace_name_of(workspace).await {
            Ok(name) => {
                if let Err(e) = self
                    .store
                    .place_credentials(owner_id, provider, &name)
                    .await
                {
                    tracing::warn!(user = %owner_id, provider, error = %e, "could not note where the credentials were delivered");
                }
            }
            Err(e) => {
                tracing::warn!(user = %owner_id, provider, error = %e, "could not read a workspace's name")
            }
        }
        self.audit(
            owner_id,
            AuditKind::Delivered,
            provider,
            Some(workspace),
            Some(login_id),
            None,
        )
        .await;
    }

    /// The first half of a delivery of `cred` into workspace `name`: the
    /// revocation generation it must still find after writing, and the
    /// note that the files belong there (so a revocation from now on
    /// sweeps that workspace too). Pair with [`Self::after_delivery`].
    pub(crate) async fn before_delivery(
        &self,
        cred: &CredentialRow,
        name: &str,
    ) -> Result<i64, AppError> {
        let generation = self
            .store
            .credential_generation(&cred.owner_id, &cred.provider)
            .await?;
        self.store
            .place_credentials(&cred.owner_id, &cred.provider, name)
            .await?;
        Ok(generation)
    }

    /// The second half: the files are written. If the record was revoked
    /// (or replaced by another login's) since [`Self::before_delivery`],
    /// the files come back out and this answers false. This, not the
    /// per-process lock, is what keeps a delivery racing a revocation in
    /// another process from writing revoked files back: the revocation
    /// bumps the generation in the transaction that deletes the record,
    /// before it sweeps, so either its sweep runs after the write, or this
    /// check sees the bump.
    pub(crate) async fn after_delivery(
        &self,
        ws: &SandboxRow,
        cred: &CredentialRow,
        generation: i64,
    ) -> Result<bool, AppError> {
        let now = self
            .store
            .credential_generation(&cred.owner_id, &cred.provider)
            .await?;
        let still = self
            .store
            .credential(&cred.owner_id, &cred.provider)
            .await?
            .is_some_and(|c| c.login_id == cred.login_id);
        if now == generation && still {
            return Ok(true);
        }
        tracing::info!(user = %cred.owner_id, provider = %cred.provider, sandbox = %ws.id, "revoked while delivering: the files come back out");
        if !self.remove_files(ws, &cred.provider).await {
            // The placement stays `revoking`; the next check removes them.
            tracing::warn!(sandbox = %ws.id, provider = %cred.provider, "could not take back the files of a revoked delivery");
        }
        Ok(false)
    }

    /// Write `files` (the record `cred`'s) into workspace `ws` named
    /// `name`, guarded against a concurrent revocation. False when the
    /// record was revoked meanwhile (nothing stays written).
    async fn deliver_guarded(
        &self,
        ws: &SandboxRow,
        name: &str,
        cred: &CredentialRow,
        files: &FileSet,
    ) -> Result<bool, AppError> {
        let generation = self.before_delivery(cred, name).await?;
        let at = self.ready_endpoints(ws).await?.agent;
        self.guest
            .deliver_credentials(at, &ws.agent_token, files)
            .await
            .map_err(|e| AppError::Unavailable(format!("writing into the workspace: {e}")))?;
        self.after_delivery(ws, cred, generation).await
    }

    /// `POST /credentials/{provider}/deliver`: the stored record written
    /// into the caller's workspace `workspace` (default `default`), which
    /// must be ready. Answers the sandbox it went to.
    pub async fn deliver_to(
        &self,
        user: &UserRow,
        provider: &str,
        workspace: Option<&str>,
    ) -> Result<SandboxRow, AppError> {
        check_provider_name(provider)?;
        let name = workspace.unwrap_or(super::workspaces::DEFAULT);
        super::workspaces::check_name(name)?;
        let lock = self.credentials.lock_for(&user.id);
        let _held = lock.lock().await;
        let Some((cred, files)) = self.vault_files(&user.id, provider).await? else {
            return Err(AppError::NotFound(format!("credentials for {provider:?}")));
        };
        let ws = self
            .live_workspace(&user.id, name)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("workspace {name:?}")))?;
        if ws.state != SandboxState::Ready {
            return Err(AppError::Conflict(format!(
                "workspace {name:?} is {}, not ready",
                ws.state
            )));
        }
        if !self.deliver_guarded(&ws, name, &cred, &files).await? {
            return Err(AppError::Conflict(format!(
                "the credentials for {provider:?} were revoked meanwhile"
            )));
        }
        tracing::info!(user = %user.name, provider, workspace = name, sandbox = %ws.id, "credentials delivered on request");
        self.audit(
            &user.id,
            AuditKind::Delivered,
            provider,
            Some(&ws.id),
            Some(&cred.login_id),
            Some(format!("delivered on request to workspace {name}")),
        )
        .await;
        Ok(ws)
    }

    /// The caller's records with their health.
    pub async fn credentials_view(&self, user: &UserRow) -> Result<Vec<CredentialView>, AppError> {
        let records = self.store.credentials_of(&user.id).await?;
        let mut health: HashMap<String, HealthRow> = self
            .store
            .health_of(&user.id)
            .await?
            .into_iter()
            .map(|h| (h.provider.clone(), h))
            .collect();
        let placements = self.store.placements_of(&user.id).await?;
        let now = now_ms();
        let within = self.credentials.expiring_within_ms();
        Ok(records
            .into_iter()
            .map(|record| {
                let health = health.remove(&record.provider);
                let status = health.as_ref().and_then(|h| {
                    let stored = Health::parse(&h.status)?;
                    Some(match stored {
                        Health::Healthy | Health::Expiring => {
                            judge(now, within, h.expires_at, None, None).0
                        }
                        other => other,
                    })
                });
                let refreshable = self.providers().get(&record.provider).and_then(|def| {
                    def.credentials
                        .iter()
                        .any(|c| c.refresh_key.is_some())
                        .then(|| status != Some(Health::RefreshFailed))
                });
                let workspaces = placements
                    .iter()
                    .filter(|p| p.provider == record.provider && p.state == "placed")
                    .map(|p| p.workspace.clone())
                    .collect();
                CredentialView {
                    record,
                    health,
                    status,
                    refreshable,
                    workspaces,
                }
            })
            .collect())
    }

    /// `DELETE /credentials/{provider}`: the record and its health gone,
    /// the files removed from the user's ready workspaces (or at the next
    /// check of one). True when there was a record; a second call finds
    /// none and changes nothing.
    pub async fn revoke_credentials(
        &self,
        user: &UserRow,
        provider: &str,
    ) -> Result<bool, AppError> {
        check_provider_name(provider)?;
        let lock = self.credentials.lock_for(&user.id);
        let _held = lock.lock().await;
        let login_id = self
            .store
            .credential(&user.id, provider)
            .await?
            .map(|c| c.login_id);
        if !self.store.revoke_credential(&user.id, provider).await? {
            return Ok(false);
        }
        // Every workspace the files went to: the ready ones now, the others
        // when they next run (the check sweeps `revoking` placements).
        self.store.revoke_placements(&user.id, provider).await?;
        let mut removed_from = Vec::new();
        let mut all_removed = true;
        for (ws, name) in self.ready_named_workspaces(&user.id).await? {
            if self.remove_files(&ws, provider).await {
                self.store.drop_placement(&user.id, provider, &name).await?;
                removed_from.push(ws.id.clone());
            } else {
                all_removed = false;
            }
        }
        if !removed_from.is_empty() && all_removed {
            self.store.clear_revocation(&user.id, provider).await?;
        }
        tracing::info!(user = %user.name, provider, workspaces = ?removed_from, "credentials revoked");
        self.audit(
            &user.id,
            AuditKind::Revoked,
            provider,
            removed_from.first().map(String::as_str),
            login_id.as_deref(),
            Some(if removed_from.is_empty() {
                "revoked by the user; the files go from the workspace when it next runs".into()
            } else {
                format!(
                    "revoked by the user; the files were removed from {} workspace(s)",
                    removed_from.len()
                )
            }),
        )
        .await;
        Ok(true)
    }

    /// `GET /audit`: the caller's events, newest first; `before` is the
    /// `next` of the previous page.
    pub async fn audit_page(
        &self,
        user: &UserRow,
        before: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<AuditRow>, Option<String>), AppError> {
        let limit = limit.unwrap_or(50);
        if !(1..=200).contains(&limit) {
            return Err(AppError::BadInput("limit: 1 to 200".into()));
        }
        let cursor = match before {
            None => None,
            Some(c) => {
                let parsed = c.split_once('-').and_then(|(at, id)| {
                    let ok_id = id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
                    Some((at.parse::<i64>().ok()?, id)).filter(|_| ok_id)
                });
                Some(parsed.ok_or_else(|| {
                    AppError::BadInput("before: the `next` of a previous page".into())
                })?)
            }
        };
        let rows = self.store.audit_of(&user.id, cursor, limit).await?;
        let next = (rows.len() == limit as usize)
            .then(|| rows.last().map(|r| format!("{}-{}", r.at, r.id)))
            .flatten();
        Ok((rows, next))
    }

    /// The periodic check, until `shutdown`.
    pub async fn run_credential_checks(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.credentials.every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => if self.leading().await { self.check_credentials_once().await },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One round over every stored record and pending revocation.
    pub async fn check_credentials_once(self: &Arc<Self>) {
        let records = match self.store.all_credentials().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "credential check: could not list the records");
                return;
            }
        };
        let mut owners: Vec<String> = records.iter().map(|r| r.owner_id.clone()).collect();
        if let Ok(live) = self.store.live_sandboxes().await {
            owners.extend(
                live.into_iter()
                    .filter(|s| s.kind == SandboxKind::Workspace)
                    .map(|s| s.owner_id),
            );
        }
        owners.sort();
        owners.dedup();
        for owner in owners {
            if let Err(e) = self.check_owner(&owner).await {
                tracing::warn!(user = %owner, error = %e, "credential check failed");
            }
        }
        self.count_records().await;
    }

    async fn check_owner(&self, owner: &str) -> Result<(), AppError> {
        let lock = self.credentials.lock_for(owner);
        let _held = lock.lock().await;
        let workspaces = self.ready_named_workspaces(owner).await?;
        let records = self.store.credentials_of(owner).await?;
        let has_record = |provider: &str| records.iter().any(|r| r.provider == provider);
        let mut placements = self.store.placements_of(owner).await?;
        // Files placed for a record that is gone (a delivery that lost a
        // race with a revocation) are revoked files too.
        let orphans: Vec<String> = placements
            .iter()
            .filter(|p| p.state == "placed" && !has_record(&p.provider))
            .map(|p| p.provider.clone())
            .collect();
        for provider in &orphans {
            self.store.revoke_placements(owner, provider).await?;
        }
        if !orphans.is_empty() {
            placements = self.store.placements_of(owner).await?;
        }
        // Revoked files go from every ready workspace they were placed in.
        for (ws, name) in &workspaces {
            for p in placements
                .iter()
                .filter(|p| p.workspace == *name && p.state == "revoking")
            {
                if self.remove_files(ws, &p.provider).await {
                    self.store.drop_placement(owner, &p.provider, name).await?;
                }
            }
        }
        // Revocations noted before placements were kept: from every ready
        // workspace.
        if !workspaces.is_empty() {
            for provider in self.store.revocations_of(owner).await? {
                let mut all = true;
                for (ws, _) in &workspaces {
                    all &= self.remove_files(ws, &provider).await;
                }
                if all {
                    self.store.clear_revocation(owner, &provider).await?;
                }
            }
        }
        for cred in records.iter() {
            let Some(def) = self.providers().get(&cred.provider).cloned() else {
                continue;
            };
            let before = self.store.health(owner, &cred.provider).await?;
            // The ready workspaces the files were delivered to; a record
            // delivered with no note of where (stored before workspaces had
            // names) went to `default`.
            let unplaced = cred.delivered_at.is_some()
                && !placements.iter().any(|p| p.provider == cred.provider);
            let targets: Vec<&(SandboxRow, String)> = workspaces
                .iter()
                .filter(|(_, name)| {
                    (unplaced && name == super::workspaces::DEFAULT)
                        || placements.iter().any(|p| {
                            p.provider == cred.provider
                                && p.workspace == *name
                                && p.state == "placed"
                        })
                })
                .collect();
            let seen = if targets.is_empty() {
                self.check_in_vault(&def, cred, before.as_ref()).await
            } else {
                let mut worst: Option<Seen> = None;
                for (ws, name) in targets {
                    // A re-capture in one workspace changes the record the
                    // next one is compared with.
                    let Some(now) = self
                        .store
                        .credential(owner, &cred.provider)
                        .await?
                        .filter(|c| c.login_id == cred.login_id)
                    else {
                        break;
                    };
                    let last = self.store.health(owner, &cred.provider).await?;
                    let Some(s) = self
                        .check_in_workspace(ws, name, &def, &now, last.as_ref())
                        .await
                    else {
                        continue;
                    };
                    worst = Some(match worst {
                        Some(w) if severity(w.status) >= severity(s.status) => Seen {
                            version: w.version.max(s.version),
                            ..w
                        },
                        Some(w) => Seen {
                            version: w.version.max(s.version),
                            ..s
                        },
                        None => s,
                    });
                }
                worst
            };
            let Some(seen) = seen else { continue };
            let entered = before
                .as_ref()
                .is_none_or(|b| b.status != seen.status.as_str());
            if entered {
                if let Some(kind) = seen.status.audited() {
                    self.audit(
                        owner,
                        kind,
                        &cred.provider,
                        seen.workspace.as_deref(),
                        Some(&cred.login_id),
                        seen.detail.clone(),
                    )
                    .await;
                }
            }
            let health = HealthRow {
                owner_id: owner.to_owned(),
                provider: cred.provider.clone(),
                status: seen.status.as_str().to_owned(),
                expires_at: seen.expires_at,
                checked_at: now_ms(),
                workspace_sandbox_id: seen.workspace,
                detail: seen.detail,
                version: seen.version,
            };
            // Only while the record is still there (a login may have
            // replaced it; it writes its own health then).
            if self
                .store
                .credential(owner, &cred.provider)
                .await?
                .is_some_and(|c| c.login_id == cred.login_id)
            {
                self.store.put_health(&health).await?;
            }
        }
        Ok(())
    }

    /// No workspace runs: judge the vault's copy against the clock.
    async fn check_in_vault(
        &self,
        def: &ProviderDef,
        cred: &CredentialRow,
        before: Option<&HealthRow>,
    ) -> Option<Seen> {
        let files = self.open_record(cred).await?;
        let (expires_at, _) = read_set(def, &files);
        // A failure the last check in a workspace found stands until a
        // workspace shows otherwise.
        if let Some(b) = before.filter(|b| {
            matches!(
                Health::parse(&b.status),
                Some(Health::RefreshFailed | Health::Revoked)
            )
        }) {
            return Some(Seen {
                status: Health::parse(&b.status)?,
                detail: b.detail.clone(),
                expires_at,
                version: b.version,
                workspace: b.workspace_sandbox_id.clone(),
            });
        }
        let (status, detail) = judge(
            now_ms(),
            self.credentials.expiring_within_ms(),
            expires_at,
            None,
            None,
        );
        Some(Seen {
            status,
            detail,
            expires_at,
            version: before.map_or(1, |b| b.version),
            workspace: None,
        })
    }

    /// A workspace runs: compare its files with the vault's, deliver or
    /// re-capture, run the provider's check, judge.
    async fn check_in_workspace(
        &self,
        ws: &SandboxRow,
        name: &str,
        def: &ProviderDef,
        cred: &CredentialRow,
        before: Option<&HealthRow>,
    ) -> Option<Seen> {
        let vault_files = self.open_record(cred).await?;
        let at = self.ready_endpoints(ws).await.ok()?.agent;
        let paths: Vec<String> = def.credentials.iter().map(|c| c.path.clone()).collect();
        let there = match self
            .guest
            .read_home_files(at, &ws.agent_token, &paths)
            .await
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(sandbox = %ws.id, provider = %def.name, error = %e, "credential check: could not read the workspace's files");
                return self.check_in_vault(def, cred, before).await;
            }
        };
        let mut version = before.map_or(1, |b| b.version);
        let current = if there.files.is_empty() {
            // Not delivered yet: its login is still delivering.
            cred.delivered_at?;
            match self.deliver_guarded(ws, name, cred, &vault_files).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    tracing::warn!(sandbox = %ws.id, provider = %def.name, error = %e, "credential check: could not deliver again");
                    return None;
                }
            }
            self.audit(
                &cred.owner_id,
                AuditKind::Delivered,
                &cred.provider,
                Some(&ws.id),
                Some(&cred.login_id),
                Some("the files were missing from the workspace".into()),
            )
            .await;
            vault_files
        } else if !same_files(def, &there, &vault_files) {
            let (expiry, refresh) = read_set(def, &there);
            let (vault_expiry, _) = read_set(def, &vault_files);
            let older = matches!((expiry, vault_expiry), (Some(t), Some(v)) if t < v);
            if older && refresh != Some(false) {
                // Another workspace's refresh is in the vault already: this
                // one gets it too, instead of its older files going back in.
                match self.deliver_guarded(ws, name, cred, &vault_files).await {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => {
                        tracing::warn!(sandbox = %ws.id, provider = %def.name, error = %e, "credential check: could not deliver the newer version");
                        return None;
                    }
                }
                self.audit(
                    &cred.owner_id,
                    AuditKind::Delivered,
                    &cred.provider,
                    Some(&ws.id),
                    Some(&cred.login_id),
                    Some(format!("the newer version {version} from the vault")),
                )
                .await;
                vault_files
            } else {
                if complete(def, &there)
                    && refresh != Some(false)
                    && self
                        .recapture(cred, &there, version + 1, expiry, &ws.id)
                        .await
                {
                    version += 1;
                }
                there
            }
        } else {
            vault_files
        };
        let (expires_at, refresh) = read_set(def, &current);
        let check_ok = match &def.check {
            Some(argv) => {
                let req = ExecRequest {
                    argv: argv.clone(),
                    env: Default::default(),
                    timeout_s: Some(60),
                };
                match self.guest.exec(at, &ws.agent_token, &req).await {
                    Ok(out) if out.timed_out => None,
                    Ok(out) => Some(out.exit_code == Some(0)),
                    Err(_) => None,
                }
            }
            None => None,
        };
        let (status, detail) = judge(
            now_ms(),
            self.credentials.expiring_within_ms(),
            expires_at,
            refresh,
            check_ok,
        );
        Some(Seen {
            status,
            detail,
            expires_at,
            version,
            workspace: Some(ws.id.clone()),
        })
    }

    /// Seal the workspace's files as the record's new value (the old one is
    /// overwritten in the same row), if the record is still the one read.
    async fn recapture(
        &self,
        cred: &CredentialRow,
        files: &FileSet,
        version: i64,
        expires_at: Option<i64>,
        workspace: &str,
    ) -> bool {
        let Ok(plain) = serde_json::to_vec(files).map(|v| secrecy::SecretBox::new(Box::new(v)))
        else {
            return false;
        };
        let vault = self.vault.read().await;
        let sealed = vault.seal(
            plain.expose_secret(),
            &super::logins::aad(&cred.owner_id, &cred.provider, &cred.login_id),
        );
        let (status, detail) = judge(
            now_ms(),
            self.credentials.expiring_within_ms(),
            expires_at,
            None,
            None,
        );
        let health = HealthRow {
            owner_id: cred.owner_id.clone(),
            provider: cred.provider.clone(),
            status: status.as_str().to_owned(),
            expires_at,
            checked_at: now_ms(),
            workspace_sandbox_id: Some(workspace.to_owned()),
            detail,
            version,
        };
        let done = self
            .store
            .recapture_credential(&cred.sealed, &sealed, vault.current_key_id(), &health)
            .await;
        drop(vault);
        match done {
            Ok(true) => {
                tracing::info!(user = %cred.owner_id, provider = %cred.provider, version, "credentials re-captured from the workspace");
                self.audit(
                    &cred.owner_id,
                    AuditKind::Recaptured,
                    &cred.provider,
                    Some(workspace),
                    Some(&cred.login_id),
                    Some(format!("version {version}")),
                )
                .await;
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(user = %cred.owner_id, provider = %cred.provider, error = %e, "could not store the re-captured credentials");
                false
            }
        }
    }

    /// The record's files, opened (secret; dropped by the caller).
    async fn open_record(&self, cred: &CredentialRow) -> Option<FileSet> {
        let plain = self
            .vault
            .read()
            .await
            .open(
                &cred.sealed,
                &super::logins::aad(&cred.owner_id, &cred.provider, &cred.login_id),
            )
            .map_err(|e| {
                tracing::warn!(user = %cred.owner_id, provider = %cred.provider, error = %e, "credential check: the record does not open");
            })
            .ok()?;
        serde_json::from_slice(plain.expose_secret()).ok()
    }

    async fn vault_files(
        &self,
        owner: &str,
        provider: &str,
    ) -> Result<Option<(CredentialRow, FileSet)>, AppError> {
        let Some(cred) = self.store.credential(owner, provider).await? else {
            return Ok(None);
        };
        Ok(self.open_record(&cred).await.map(|f| (cred, f)))
    }

    /// Remove a provider's files from a workspace; true when done.
    async fn remove_files(&self, ws: &SandboxRow, provider: &str) -> bool {
        let Some(def) = self.providers().get(provider) else {
            // No definition, no paths: nothing we could remove.
            return true;
        };
        let paths: Vec<String> = def.credentials.iter().map(|c| c.path.clone()).collect();
        let Ok(at) = self.ready_endpoints(ws).await else {
            return false;
        };
        match self
            .guest
            .remove_home_files(at.agent, &ws.agent_token, &paths)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(sandbox = %ws.id, provider, error = %e, "could not remove the revoked files");
                false
            }
        }
    }

    async fn count_records(&self) {
        let Ok(counts) = self.store.health_counts().await else {
            return;
        };
        let m = self.credential_metrics();
        m.records.clear();
        for (provider, status, n) in counts {
            m.records
                .get_or_create(&StatusLabel { provider, status })
                .set(n);
        }
    }
}
