//! Egress: every byte a sandbox sends leaves through its user's upstream proxy.
//!
//! Which upstream a user has, in order: an explicit one set for that user;
//! else the provider account's host with the user's own port from the
//! account's range (assigned on first need, kept across restarts); else none.
//! A sandbox of a user without an upstream still boots and still has its
//! forward proxy, which answers every request with a `502` saying so; the
//! firewall lets nothing else out.
//!
//! The functions that take a [`Store`] and a [`Vault`] are what both the API
//! and the `airlock egress` command use (the command works on the database
//! directly, like `airlock user add`). A running control plane picks up a
//! change within [`CACHE_TTL`]; through the API at once.

use super::{App, AppError};
use crate::egress::{self, ProxyConfig, Resolve, Stats, Upstream};
use crate::store::{now_ms, AccountRow, SandboxRow, Store, UpstreamRow, UserRow};
use crate::vault::{Aad, Vault};
use airlock_drivers::Lease;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How long a running listener trusts a resolved upstream before asking the
/// store again (changes made with the CLI reach running sandboxes this late).
pub const CACHE_TTL: Duration = Duration::from_secs(2);
const SETTING_ECHO_URL: &str = "echo_url";
const SETTING_TIMEOUT: &str = "upstream_timeout_s";
const DEFAULT_TIMEOUT_S: u64 = 10;
const ACCOUNT_PURPOSE: &str = "egress-account";
const UPSTREAM_PURPOSE: &str = "egress-upstream";

/// What the provider account's password is bound to.
pub(crate) fn account_aad() -> Aad {
    Aad::new("", ACCOUNT_PURPOSE, crate::store::EGRESS_ACCOUNT_ID)
}

/// What a user's explicit upstream password is bound to.
pub(crate) fn upstream_aad(user_id: &str) -> Aad {
    Aad::new(user_id, UPSTREAM_PURPOSE, "explicit")
}

// ---- views (API bodies and answers; the CLI prints them too) ----

/// The provider account, as an admin sets it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountInput {
    /// Host name or address of the provider's gateway.
    pub host: String,
    pub username: String,
    #[schema(value_type = String)]
    pub password: SecretString,
    /// Each user gets one port of `port_min..=port_max`, and so its own exit IP.
    pub port_min: u16,
    pub port_max: u16,
}

/// The provider account, credentials masked.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountView {
    pub host: String,
    pub username: String,
    /// `http://USER:***@HOST:{port_min-port_max}`
    pub masked: String,
    pub port_min: u16,
    pub port_max: u16,
    /// Ports given to users so far.
    pub ports_assigned: u64,
}

/// A user's explicit upstream, as an admin sets it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpstreamInput {
    /// `http://USER:PASS@HOST:PORT`
    #[schema(value_type = String)]
    pub url: SecretString,
}

/// Where a user's sandboxes send their traffic.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserEgressView {
    pub user: String,
    /// `explicit` (set for this user), `account` (the provider account with the
    /// user's port) or `none`.
    pub source: String,
    /// Masked: `http://USER:***@HOST:PORT`.
    pub upstream: Option<String>,
    /// The user's port in the account's range, when it has one.
    pub account_port: Option<u16>,
}

/// Settings of the egress subsystem.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressSettings {
    /// Fetched through a user's upstream to learn its exit IP; it answers with
    /// the caller's address as text. `null`: no exit-IP check.
    pub echo_url: Option<String>,
    /// Seconds to wait for the upstream to accept and to answer (1–120).
    pub upstream_timeout_s: Option<u64>,
}

/// One sandbox's egress, as `GET /sandboxes/{id}/egress` reports it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SandboxEgress {
    pub sandbox_id: String,
    /// The forward proxy the guest uses: `http://GATEWAY:3128`.
    pub proxy: String,
    /// `explicit`, `account` or `none`.
    pub source: String,
    /// Masked: `http://USER:***@HOST:PORT`.
    pub upstream: Option<String>,
    /// `ok`, `failing`, `unknown` (nothing went out yet) or `not_configured`.
    pub status: String,
    /// The upstream's latest failure, with its answer.
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_ok_at: Option<String>,
    /// Bytes from the sandbox through its proxy, since the listener started.
    pub bytes_out: u64,
    /// Bytes to the sandbox through its proxy, since the listener started.
    pub bytes_in: u64,
    pub connections: u64,
    /// Packets the firewall dropped, by kind.
    pub blocked: Option<BlockedView>,
    /// The address the echo URL saw through this user's upstream.
    pub exit_ip: Option<String>,
    pub exit_ip_error: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BlockedView {
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
    pub other: u64,
    /// tcp + udp + icmp + other.
    pub total: u64,
    /// IPv6 neighbour discovery and the like; it never leaves the link.
    pub link_local: u64,
    /// Packets from elsewhere that would have been forwarded to the guest.
    pub inbound: u64,
}

// ---- validation ----

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

fn check_account(a: &AccountInput) -> Result<(), AppError> {
    if !valid_host(&a.host) {
        return Err(AppError::BadInput(
            "host must be a host name or address (letters, digits, '.', '-', ':')".into(),
        ));
    }
    if a.username.is_empty() || a.username.contains(':') || a.username.len() > 256 {
        return Err(AppError::BadInput(
            "username must be 1–256 characters without ':'".into(),
        ));
    }
    if a.password.expose_secret().is_empty() {
        return Err(AppError::BadInput("password must not be empty".into()));
    }
    if a.port_min == 0 || a.port_min > a.port_max {
        return Err(AppError::BadInput(
            "port_min and port_max must form a range 1 ≤ port_min ≤ port_max ≤ 65535".into(),
        ));
    }
    Ok(())
}

fn masked_account(a: &AccountRow) -> String {
    format!(
        "http://{}:***@{}:{{{}-{}}}",
        a.username, a.host, a.port_min, a.port_max
    )
}

// ---- what the CLI and the API share ----

async fn user_named(store: &Store, name: &str) -> Result<UserRow, AppError> {
    store
        .user_by_name(name)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("user {name:?}")))
}

pub async fn set_account(
    store: &Store,
    vault: &Vault,
    input: &AccountInput,
) -> Result<AccountView, AppError> {
    check_account(input)?;
    let row = AccountRow {
        host: input.host.clone(),
        username: input.username.clone(),
        password_sealed: vault.seal(input.password.expose_secret().as_bytes(), &account_aad()),
        port_min: input.port_min,
        port_max: input.port_max,
        updated_at: now_ms(),
    };
    store.set_egress_account(&row).await?;
    account(store)
        .await?
        .ok_or_else(|| AppError::Internal("the account vanished".into()))
}

pub async fn account(store: &Store) -> Result<Option<AccountView>, AppError> {
    let Some(a) = store.egress_account().await? else {
        return Ok(None);
    };
    Ok(Some(AccountView {
        masked: masked_account(&a),
        ports_assigned: store.egress_ports_assigned().await?,
        host: a.host,
        username: a.username,
        port_min: a.port_min,
        port_max: a.port_max,
    }))
}

pub async fn clear_account(store: &Store) -> Result<bool, AppError> {
    Ok(store.delete_egress_account().await?)
}

pub async fn set_user_upstream(
    store: &Store,
    vault: &Vault,
    name: &str,
    url: &SecretString,
) -> Result<UserEgressView, AppError> {
    let user = user_named(store, name).await?;
    let up = Upstream::parse(url.expose_secret()).map_err(|e| AppError::BadInput(e.to_string()))?;
    let row = UpstreamRow {
        user_id: user.id.clone(),
        host: up.host.clone(),
        port: up.port,
        username: up.username.clone(),
        password_sealed: vault.seal(
            up.password().expose_secret().as_bytes(),
            &upstream_aad(&user.id),
        ),
        updated_at: now_ms(),
    };
    store.set_egress_upstream(&row).await?;
    user_egress(store, name).await
}

pub async fn clear_user_upstream(store: &Store, name: &str) -> Result<bool, AppError> {
    let user = user_named(store, name).await?;
    Ok(store.delete_egress_upstream(&user.id).await?)
}

/// Where a user's traffic goes (no port is assigned by looking).
pub async fn user_egress(store: &Store, name: &str) -> Result<UserEgressView, AppError> {
    let user = user_named(store, name).await?;
    let port = store.egress_user_port(&user.id).await?;
    if let Some(u) = store.egress_upstream(&user.id).await? {
        return Ok(UserEgressView {
            user: user.name,
            source: "explicit".into(),
            upstream: Some(format!("http://{}:***@{}:{}", u.username, u.host, u.port)),
            account_port: port,
        });
    }
    if let Some(a) = store.egress_account().await? {
        return Ok(UserEgressView {
            user: user.name,
            source: "account".into(),
            upstream: Some(match port {
                Some(p) => format!("http://{}:***@{}:{p}", a.username, a.host),
                None => format!("{} (port assigned at first use)", masked_account(&a)),
            }),
            account_port: port,
        });
    }
    Ok(UserEgressView {
        user: user.name,
        source: "none".into(),
        upstream: None,
        account_port: None,
    })
}

pub async fn settings(store: &Store) -> Result<EgressSettings, AppError> {
    let timeout = store
        .egress_setting(SETTING_TIMEOUT)
        .await?
        .and_then(|v| v.parse().ok());
    Ok(EgressSettings {
        echo_url: store.egress_setting(SETTING_ECHO_URL).await?,
        upstream_timeout_s: Some(timeout.unwrap_or(DEFAULT_TIMEOUT_S)),
    })
}

/// Replace the settings; a field left out (or `null`) goes back to its default.
pub async fn set_settings(store: &Store, s: &EgressSettings) -> Result<EgressSettings, AppError> {
    if let Some(url) = &s.echo_url {
        let parsed = url::Url::parse(url)
            .map_err(|_| AppError::BadInput("echo_url must be an http:// URL".into()))?;
        if parsed.scheme() != "http" || parsed.host_str().is_none() {
            return Err(AppError::BadInput("echo_url must be an http:// URL".into()));
        }
    }
    if let Some(t) = s.upstream_timeout_s {
        if !(1..=120).contains(&t) {
            return Err(AppError::BadInput(
                "upstream_timeout_s must be between 1 and 120".into(),
            ));
        }
    }
    store
        .set_egress_setting(SETTING_ECHO_URL, s.echo_url.as_deref())
        .await?;
    let timeout = s.upstream_timeout_s.map(|t| t.to_string());
    store
        .set_egress_setting(SETTING_TIMEOUT, timeout.as_deref())
        .await?;
    settings(store).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Explicit,
    Account,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Explicit => "explicit",
            Source::Account => "account",
        }
    }
}

/// The user's upstream with its password, assigning an account port if needed.
async fn resolve(
    store: &Store,
    vault: &Vault,
    user_id: &str,
) -> Result<Option<(Arc<Upstream>, Source)>, AppError> {
    let open = |sealed: &str, aad: &Aad| -> Result<SecretString, AppError> {
        let plain = vault
            .open(sealed, aad)
            .map_err(|e| AppError::Internal(format!("the upstream password does not open: {e}")))?;
        let text = String::from_utf8(plain.expose_secret().clone())
            .map_err(|_| AppError::Internal("the upstream password is not UTF-8".into()))?;
        Ok(SecretString::from(text))
    };
    if let Some(u) = store.egress_upstream(user_id).await? {
        let password = open(&u.password_sealed, &upstream_aad(user_id))?;
        let up = Upstream::new(u.host, u.port, u.username, password);
        return Ok(Some((Arc::new(up), Source::Explicit)));
    }
    let Some(a) = store.egress_account().await? else {
        return Ok(None);
    };
    let Some(port) = store
        .assign_egress_port(user_id, a.port_min, a.port_max)
        .await?
    else {
        return Err(AppError::NoCapacity(format!(
            "every port of the provider account's range {}–{} is taken",
            a.port_min, a.port_max
        )));
    };
    let password = open(&a.password_sealed, &account_aad())?;
    let up = Upstream::new(a.host, port, a.username, password);
    Ok(Some((Arc::new(up), Source::Account)))
}

// ---- running state ----

type AttachedMap = Arc<Mutex<HashMap<String, Attached>>>;

/// One egress counter over all sandboxes: what the running listeners have
/// counted plus what the ended ones had, so it never goes down. `/metrics`
/// names no sandbox (its id is a capability-like name; the owner sees its
/// own figures in `GET /sandboxes/{id}/egress`).
/// Clones share their state (the map and the counter are shared handles).
#[derive(Debug, Clone)]
struct Total {
    attached: AttachedMap,
    retired: Counter,
    pick: fn(&Stats) -> &Counter,
}

impl Total {
    fn new(attached: &AttachedMap, pick: fn(&Stats) -> &Counter) -> Self {
        Total {
            attached: attached.clone(),
            retired: Counter::default(),
            pick,
        }
    }
    fn retire(&self, stats: &Stats) {
        self.retired.inc_by((self.pick)(stats).get());
    }
}

impl EncodeMetric for Total {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let live: u64 = self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|a| (self.pick)(&a.stats).get())
            .sum();
        encoder.encode_counter::<NoLabelSet, _, u64>(&(self.retired.get() + live), None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

#[derive(Debug)]
struct EgressMetrics {
    bytes_out: Total,
    bytes_in: Total,
    connections: Total,
    failures: Total,
    refused: Family<egress::RefusedLabel, Counter>,
    listeners: Gauge,
}

impl EgressMetrics {
    fn new(attached: &AttachedMap) -> Self {
        EgressMetrics {
            bytes_out: Total::new(attached, |s| &s.bytes_out),
            bytes_in: Total::new(attached, |s| &s.bytes_in),
            connections: Total::new(attached, |s| &s.connections),
            failures: Total::new(attached, |s| &s.upstream_failures),
            refused: Family::default(),
            listeners: Gauge::default(),
        }
    }
    /// Keep what an ended listener counted (call while it leaves the map).
    fn retire(&self, stats: &Stats) {
        for t in [
            &self.bytes_out,
            &self.bytes_in,
            &self.connections,
            &self.failures,
        ] {
            t.retire(stats);
        }
    }
}

#[derive(Debug)]
struct Attached {
    task: tokio::task::JoinHandle<()>,
    stats: Arc<Stats>,
    /// Whose upstream the listener uses (a pool's claim changes it).
    user_id: Arc<Mutex<String>>,
}

type Cached = Result<Option<(Arc<Upstream>, Source)>, String>;

/// Per-sandbox forward proxies and the upstream settings they use.
#[derive(Debug, Default)]
pub struct EgressState {
    attached: AttachedMap,
    cache: Mutex<HashMap<String, (Instant, Cached)>>,
    metrics: OnceLock<EgressMetrics>,
}

impl Drop for EgressState {
    /// The listeners go with the app: a control plane started again in the
    /// same process (tests, or an embedding) must be able to bind them anew.
    fn drop(&mut self) {
        self.abort_all();
    }
}

impl EgressState {
    fn abort_all(&self) {
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        for (_, a) in attached.drain() {
            a.task.abort();
        }
    }
}

impl App {
    /// Stop every sandbox's forward proxy (the control plane is stopping).
    pub(crate) fn egress_stop_all(&self) {
        self.egress.abort_all();
    }
}

impl EgressState {
    fn forget_cache(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A listener's way to its user's upstream, through the app.
#[derive(Debug)]
struct UserResolver {
    app: Weak<App>,
    user_id: Arc<Mutex<String>>,
}

#[async_trait::async_trait]
impl Resolve for UserResolver {
    async fn upstream(&self) -> Result<Arc<Upstream>, String> {
        let Some(app) = self.app.upgrade() else {
            return Err("the control plane is shutting down".into());
        };
        let user_id = self
            .user_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match app
            .cached_upstream(&user_id)
            .await
            .map_err(|e| crate::app::sandboxes::chain(&e))?
        {
            Ok(Some((up, _))) => Ok(up),
            Ok(None) => Err(
                "no upstream proxy is configured for this sandbox's user, so nothing leaves it \
                 (an admin sets one with `airlock egress user NAME URL` or `airlock egress account set`)"
                    .into(),
            ),
            Err(why) => Err(why),
        }
    }
}

use crate::app::rfc3339;

impl App {
    fn egress_metrics(&self) -> &EgressMetrics {
        self.egress.metrics.get_or_init(|| {
            let m = EgressMetrics::new(&self.egress.attached);
            self.metrics.register(
                "egress_bytes_out",
                "Bytes from sandboxes through their forward proxies",
                m.bytes_out.clone(),
            );
            self.metrics.register(
                "egress_bytes_in",
                "Bytes to sandboxes through their forward proxies",
                m.bytes_in.clone(),
            );
            self.metrics.register(
                "egress_connections",
                "Client connections to sandboxes' forward proxies",
                m.connections.clone(),
            );
            self.metrics.register(
                "egress_upstream_failures",
                "Upstream failures seen by sandboxes' forward proxies",
                m.failures.clone(),
            );
            self.metrics.register(
                "egress_refused",
                "Requests the forward proxies refused for their destination (this host, its sandbox network, loopback, link-local), by reason",
                m.refused.clone(),
            );
            self.metrics.register(
                "egress_listeners",
                "Forward proxy listeners running",
                m.listeners.clone(),
            );
            m
        })
    }

    /// The user's upstream (or why there is none), cached for a while. A
    /// database that cannot answer is no fact about the user: it is the
    /// outer error, never cached, so the caller may try again.
    async fn cached_upstream(&self, user_id: &str) -> Result<Cached, crate::store::StoreError> {
        // A pool member belongs to nobody yet: no upstream (and no account
        // port) until a claim rebinds its forwarder to its user's.
        if user_id == super::pool::OWNER {
            return Ok(Ok(None));
        }
        {
            let cache = self.egress.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, hit)) = cache.get(user_id) {
                if at.elapsed() < CACHE_TTL {
                    return Ok(hit.clone());
                }
            }
        }
        let fresh = {
            let vault = self.vault.read().await;
            match resolve(&self.store, &vault, user_id).await {
                Err(AppError::Store(e)) => return Err(e),
                other => other.map_err(|e| e.to_string()),
            }
        };
        self.egress
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user_id.to_owned(), (Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    async fn proxy_config(&self, lease: &Lease) -> ProxyConfig {
        let timeout = settings(&self.store)
            .await
            .ok()
            .and_then(|s| s.upstream_timeout_s)
            .unwrap_or(DEFAULT_TIMEOUT_S);
        ProxyConfig {
            allowed_peer: Some(lease.guest.into()),
            connect_timeout: Duration::from_secs(timeout),
            response_timeout: Duration::from_secs(timeout),
            guard: {
                let (base, len) = self.pool.network();
                egress::Guard::default()
                    .with_pool(base, len)
                    .allowing(&self.cfg.egress_allow)
            },
            ..ProxyConfig::default()
        }
    }

    /// The egress settings injected into a new sandbox's metadata, and the
    /// gateway port its firewall lets through. Every sandbox gets its proxy;
    /// without an upstream the proxy refuses, and nothing else gets out.
    pub(crate) async fn egress_for(
        &self,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<Option<(airlock_proto::metadata::Egress, u16)>, AppError> {
        // Assign the user's account port now, so a full range fails the
        // sandbox with a reason instead of failing every request later.
        if let Err(e) = self.cached_upstream(&row.owner_id).await? {
            return Err(AppError::NoCapacity(e));
        }
        Ok(Some((
            airlock_proto::metadata::Egress {
                proxy_url: format!("http://{}:{}", lease.host, egress::PROXY_PORT),
                no_proxy: egress::NO_PROXY.into(),
            },
            egress::PROXY_PORT,
        )))
    }

    /// After the driver made the sandbox's link: start its forward proxy on
    /// the gateway address. Called again for sandboxes re-adopted at start.
    pub(crate) async fn egress_attach(
        self: &Arc<Self>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        let addr = SocketAddr::from((lease.host, egress::PROXY_PORT));
        let listener = bind(addr).await.map_err(|e| {
            AppError::Internal(format!("could not start the forward proxy on {addr}: {e}"))
        })?;
        let m = self.egress_metrics();
        let stats = Arc::new(Stats::default().with_refused(m.refused.clone()));
        let user_id = Arc::new(Mutex::new(row.owner_id.clone()));
        let resolver = Arc::new(UserResolver {
            app: Arc::downgrade(self),
            user_id: user_id.clone(),
        });
        let cfg = self.proxy_config(lease).await;
        let task = tokio::spawn(egress::serve(listener, cfg, resolver, stats.clone()));
        let old = {
            let mut attached = self
                .egress
                .attached
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let old = attached.insert(
                row.id.clone(),
                Attached {
                    task,
                    stats,
                    user_id,
                },
            );
            if let Some(old) = &old {
                m.retire(&old.stats);
            }
            old
        };
        match old {
            Some(old) => old.task.abort(),
            None => {
                m.listeners.inc();
            }
        }
        tracing::info!(sandbox = %row.id, %addr, "egress proxy listening");
        Ok(())
    }

    /// A pool's claim: the running forward proxy of `row` now uses its
    /// (new) owner's upstream, from its next request on. The listener stays
    /// (binding a second one on the same address would fail); one that is
    /// not running is started.
    pub(crate) async fn egress_rebind(
        self: &Arc<Self>,
        row: &SandboxRow,
        lease: &Lease,
    ) -> Result<(), AppError> {
        let swapped = {
            let attached = self
                .egress
                .attached
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            attached.get(&row.id).map(|a| {
                *a.user_id.lock().unwrap_or_else(|p| p.into_inner()) = row.owner_id.clone();
            })
        };
        match swapped {
            Some(()) => Ok(()),
            None => self.egress_attach(row, lease).await,
        }
    }

    /// On teardown: stop the sandbox's forward proxy and its connections.
    pub(crate) async fn egress_detach(&self, id: &str) {
        let m = self.egress_metrics();
        let gone = {
            let mut attached = self
                .egress
                .attached
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let gone = attached.remove(id);
            if let Some(a) = &gone {
                m.retire(&a.stats);
            }
            gone
        };
        if let Some(a) = gone {
            a.task.abort();
            m.listeners.dec();
        }
    }

    // ---- API ----

    /// Admin actions need a user with the admin flag (`airlock user add NAME
    /// --admin`); the token-less `local` user is not one by being local.
    pub fn is_egress_admin(&self, user: &UserRow) -> bool {
        user.admin && !user.disabled
    }

    pub async fn set_egress_account(&self, input: &AccountInput) -> Result<AccountView, AppError> {
        let view = {
            let vault = self.vault.read().await;
            set_account(&self.store, &vault, input).await?
        };
        self.egress.forget_cache();
        Ok(view)
    }

    pub async fn clear_egress_account(&self) -> Result<bool, AppError> {
        let done = clear_account(&self.store).await?;
        self.egress.forget_cache();
        Ok(done)
    }

    pub async fn set_user_egress(
        &self,
        name: &str,
        url: &SecretString,
    ) -> Result<UserEgressView, AppError> {
        let view = {
            let vault = self.vault.read().await;
            set_user_upstream(&self.store, &vault, name, url).await?
        };
        self.egress.forget_cache();
        Ok(view)
    }

    pub async fn clear_user_egress(&self, name: &str) -> Result<bool, AppError> {
        let done = clear_user_upstream(&self.store, name).await?;
        self.egress.forget_cache();
        Ok(done)
    }

    /// What a sandbox's egress is doing now; checks the exit IP when an echo
    /// URL is set.
    pub async fn sandbox_egress(
        &self,
        user: &UserRow,
        id: &str,
    ) -> Result<SandboxEgress, AppError> {
        let row = self.sandbox_of(user, id).await?;
        let gateway = row
            .lease_index
            .and_then(|i| self.pool.lease(i))
            .map(|l| format!("http://{}:{}", l.host, egress::PROXY_PORT));
        let resolved = {
            let vault = self.vault.read().await;
            resolve(&self.store, &vault, &row.owner_id).await
        };
        let stats = self
            .egress
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|a| a.stats.clone());
        let blocked = match self.node.blocked_packets(id).await {
            Ok(b) => b.map(|b| BlockedView {
                total: b.outbound(),
                tcp: b.tcp,
                udp: b.udp,
                icmp: b.icmp,
                other: b.other,
                link_local: b.link_local,
                inbound: b.inbound,
            }),
            Err(e) => {
                tracing::warn!(sandbox = id, error = %e, "could not read the firewall counters");
                None
            }
        };
        let mut health = stats.as_ref().map(|s| s.health()).unwrap_or_default();
        let (source, upstream, mut exit_ip, mut exit_ip_error) = match &resolved {
            Ok(Some((up, source))) => (source.as_str(), Some(up.masked()), None, None),
            Ok(None) => ("none", None, None, None),
            Err(e) => ("none", None, None, Some(e.to_string())),
        };
        if let Ok(Some((up, _))) = &resolved {
            match settings(&self.store).await?.echo_url {
                Some(echo) => match exit_ip_via(up, &echo).await {
                    Ok(ip) => {
                        exit_ip = Some(ip);
                        health.last_ok_ms = Some(now_ms());
                    }
                    Err(why) => {
                        health.last_error = Some((now_ms(), why.clone()));
                        exit_ip_error = Some(why);
                    }
                },
                None => exit_ip_error = Some("no echo URL is configured".into()),
            }
        }
        let status = if upstream.is_none() {
            "not_configured"
        } else if health.failing() {
            "failing"
        } else if health.last_ok_ms.is_some() {
            "ok"
        } else {
            "unknown"
        };
        Ok(SandboxEgress {
            sandbox_id: row.id,
            proxy: gateway.unwrap_or_default(),
            source: source.into(),
            upstream,
            status: status.into(),
            last_error_at: health.last_error.as_ref().map(|(at, _)| rfc3339(*at)),
            last_error: health.last_error.map(|(_, m)| m),
            last_ok_at: health.last_ok_ms.map(rfc3339),
            bytes_out: stats.as_ref().map_or(0, |s| s.bytes_out.get()),
            bytes_in: stats.as_ref().map_or(0, |s| s.bytes_in.get()),
            connections: stats.as_ref().map_or(0, |s| s.connections.get()),
            blocked,
            exit_ip,
            exit_ip_error,
        })
    }
}

/// Bind the gateway address, giving the link and any old listener a moment.
async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..30 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            // The link was just made, or a previous listener is still going away.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse
                ) =>
            {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

/// Fetch the echo URL through the upstream; its body is the exit address.
async fn exit_ip_via(up: &Upstream, echo: &str) -> Result<String, String> {
    let proxy = reqwest::Proxy::all(format!("http://{}", up.authority()))
        .map_err(|e| format!("bad upstream address: {e}"))?
        .basic_auth(&up.username, up.password().expose_secret());
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("could not build the echo client: {e}"))?;
    let resp = client.get(echo).send().await.map_err(|e| {
        format!(
            "the exit-IP check through {} failed: {}",
            up.masked(),
            super::sandboxes::chain(&e)
        )
    })?;
    let status = resp.status();
    if !status.is_success() {
        let hint = if status.as_u16() == 407 {
            " (it refused the credentials)"
        } else {
            ""
        };
        return Err(format!(
            "the upstream proxy {} answered {status} to the exit-IP check{hint}",
            up.masked()
        ));
    }
    let body = resp.text().await.map_err(|e| e.to_string())?;
    let ip = body.trim();
    if ip.is_empty() || ip.len() > 64 {
        return Err("the echo URL did not answer with an address".into());
    }
    Ok(ip.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database that cannot answer while a user's upstream is looked up is
    /// the caller's to retry: nothing is cached for the user (a cached
    /// failure failed the next sandbox of that user after the database was
    /// back), and a create's request says the store failed, not "no room".
    #[tokio::test]
    async fn a_database_outage_is_not_remembered_as_the_users_upstream() {
        let w = crate::app::lifecycle_tests::World::new().await;
        w.store.close_for_test().await;
        let got = w.app.cached_upstream(&w.user.id).await;
        assert!(matches!(&got, Err(e) if e.is_unavailable()), "{got:?}");
        let cache = w.app.egress.cache.lock().expect("lock");
        assert!(!cache.contains_key(&w.user.id), "the outage was cached");
    }

    #[tokio::test]
    async fn egress_totals_sum_every_sandbox_never_go_down_and_name_none() {
        let attached: AttachedMap = Arc::default();
        let m = EgressMetrics::new(&attached);
        let metrics = crate::metrics::Metrics::new();
        metrics.register("egress_bytes_out", "test", m.bytes_out.clone());
        let listen = |n: u64| {
            let stats = Arc::new(Stats::default());
            stats.bytes_out.inc_by(n);
            Attached {
                task: tokio::spawn(async {}),
                stats,
                user_id: Arc::default(),
            }
        };
        attached
            .lock()
            .expect("lock")
            .insert("sandbox-a".into(), listen(5));
        attached
            .lock()
            .expect("lock")
            .insert("sandbox-b".into(), listen(7));
        let text = metrics.render(&[]);
        assert!(
            text.contains("airlock_egress_bytes_out_total 12\n"),
            "{text}"
        );
        assert!(
            !text.contains("sandbox-a") && !text.contains("sandbox=\""),
            "{text}"
        );
        let gone = attached
            .lock()
            .expect("lock")
            .remove("sandbox-a")
            .expect("a");
        m.retire(&gone.stats);
        assert!(metrics
            .render(&[])
            .contains("airlock_egress_bytes_out_total 12\n"));
    }

    fn input(min: u16, max: u16) -> AccountInput {
        AccountInput {
            host: "127.0.0.1".into(),
            username: "acct".into(),
            password: SecretString::from("hunter2-canary"),
            port_min: min,
            port_max: max,
        }
    }

    #[tokio::test]
    async fn account_users_get_their_own_port_and_secrets_are_sealed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.expect("open");
        let vault = Vault::ephemeral();
        let a = store.insert_user("ida", "alice", None).await.expect("user");
        let b = store.insert_user("idb", "bob", None).await.expect("user");
        assert!(resolve(&store, &vault, &a.id)
            .await
            .expect("none")
            .is_none());
        let view = set_account(&store, &vault, &input(20001, 20002))
            .await
            .expect("set");
        assert_eq!(view.masked, "http://acct:***@127.0.0.1:{20001-20002}");
        let (ua, sa) = resolve(&store, &vault, &a.id)
            .await
            .expect("a")
            .expect("some");
        let (ub, _) = resolve(&store, &vault, &b.id)
            .await
            .expect("b")
            .expect("some");
        assert_eq!((ua.port, ub.port, sa), (20001, 20002, Source::Account));
        assert_eq!(ua.password().expose_secret(), "hunter2-canary");
        // Nothing in the database holds the password in plaintext.
        let sealed = store.egress_account().await.expect("row").expect("some");
        assert!(!sealed.password_sealed.contains("hunter2"));

        let url = SecretString::from("http://own:pw-canary@127.0.0.1:3999");
        let v = set_user_upstream(&store, &vault, "alice", &url)
            .await
            .expect("explicit");
        assert_eq!(v.upstream.as_deref(), Some("http://own:***@127.0.0.1:3999"));
        let (ua, sa) = resolve(&store, &vault, &a.id)
            .await
            .expect("a")
            .expect("some");
        assert_eq!((ua.port, sa), (3999, Source::Explicit));
        // A full range fails with a reason.
        let c = store.insert_user("idc", "carol", None).await.expect("user");
        let err = resolve(&store, &vault, &c.id).await.expect_err("full");
        assert!(err.to_string().contains("20001–20002"), "{err}");
    }

    #[test]
    fn bad_accounts_are_refused_with_the_field() {
        let err = check_account(&input(5, 4)).expect_err("range");
        assert!(err.to_string().contains("port_min"));
        let mut bad = input(1, 2);
        bad.host = "a b".into();
        assert!(check_account(&bad)
            .expect_err("host")
            .to_string()
            .starts_with("host"));
    }
}
