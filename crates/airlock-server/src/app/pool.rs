//! Warm pools: per kind, a few sandboxes booted ahead of need and owned by
//! the reserved user [`OWNER`], so a create takes one that is already
//! painted instead of waiting for a boot.
//!
//! ```text
//!  refiller (every `refill_every`, and at once after a claim or a miss)
//!    census of the pool's rows ──► plan(): drain stale/old/extra members,
//!    start ≤ `parallel` new ones (one at a time while a user's sandbox starts)
//!    └─► admit(OWNER, Ask::Pool) ──► create ──► … booting ──Pooled──▶ pooled
//!
//!  create(user, browser) ──► admit(user) ──► claim: pooled ──Claimed──▶ ready
//!    (owner, state and image in one compare-and-set: one winner per member)
//!    ──► forwarder rebound to the user's upstream ──► agent gets the session
//!    ──► `ready`, from_pool: true
//!    any step fails ──► that member fails (torn down), goes back to the
//!    pool's name, and the user gets a cold create (from_pool: false)
//! ```
//!
//! Members hold a lease and memory like any sandbox, so they count toward
//! the host's room (and a refill leaves one sandbox's reserve on top of the
//! usual margin for users); they belong to no user, so no list or quota
//! shows them. A member is handed out at most once: nothing in the state
//! machine leads back to `pooled`. The image is fixed for a control plane's
//! life; members of another build (left by a run before an image change)
//! are never claimed (the claim checks the build) and are drained.
//!
//! Workspaces stay cold-only: their home is a per-user volume the driver
//! mounts at create, and attaching it to a running container (or a VM) is
//! not done safely yet, see docs/architecture.md.

use super::admission::Ask;
use super::state::{self, AdvanceError, Event, SandboxState};
use super::{App, AppError};
use crate::store::{now_ms, SandboxRow, UserRow};
use airlock_proto::agent::Session;
use airlock_proto::metadata::SandboxKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The id of the user that owns pool members (made by a migration).
pub const OWNER: &str = "pool";

/// Why a member was drained, as its row records it.
pub const STALE_IMAGE: &str = "pool: its image is no longer the current one";
pub const TOO_OLD: &str = "pool: it waited longer than the pool's max_age";
pub const SHRUNK: &str = "pool: the pool is smaller now";

/// The pools' settings, already validated (`[pool]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Browser sandboxes kept booted; 0 turns the pool off.
    pub browser: u32,
    /// A member older than this is drained and replaced.
    pub max_age: Duration,
    /// How often the refiller looks (it also runs after every claim).
    pub refill_every: Duration,
    /// Members booting at once, at most.
    pub parallel: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            browser: 0,
            max_age: Duration::from_secs(30 * 60),
            refill_every: Duration::from_secs(2),
            parallel: 2,
        }
    }
}

impl PoolSettings {
    /// Members wanted of `kind`. Workspaces are cold-only.
    pub fn target(&self, kind: SandboxKind) -> u32 {
        match kind {
            SandboxKind::Browser => self.browser,
            SandboxKind::Workspace => 0,
        }
    }
}

/// A pooled member as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub age: Duration,
    /// It runs the current image.
    pub current: bool,
}

/// What a pool of one kind holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    pub target: u32,
    /// Members in `pooled`, oldest first.
    pub pooled: Vec<Member>,
    /// Members still provisioning or booting.
    pub starting: u32,
    /// Users' sandboxes still provisioning or booting.
    pub users_starting: u32,
}

/// The refiller's decision for one round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Members to stop, with the reason.
    pub drain: Vec<(String, &'static str)>,
    /// New members to start.
    pub start: u32,
}

/// Pure: which members go and how many new ones start. Stale and old
/// members always go; beyond the target, the oldest go. New members start
/// up to the target, at most `parallel` booting at once, and at most one
/// while a user's sandbox is starting: a refill keeps the pool coming back
/// under load without multiplying the boots a user's create competes with.
pub fn plan(census: &Census, max_age: Duration, parallel: u32) -> Plan {
    let mut drain = Vec::new();
    let mut keep = Vec::new();
    for m in &census.pooled {
        if !m.current {
            drain.push((m.id.clone(), STALE_IMAGE));
        } else if m.age > max_age {
            drain.push((m.id.clone(), TOO_OLD));
        } else {
            keep.push(m);
        }
    }
    let target = census.target as usize;
    if keep.len() > target {
        // Oldest first: they would age out first anyway.
        for m in &keep[..keep.len() - target] {
            drain.push((m.id.clone(), SHRUNK));
        }
        keep.drain(..keep.len() - target);
    }
    let have = keep.len() as u32 + census.starting;
    let slots = if census.users_starting > 0 {
        1
    } else {
        parallel
    };
    let start = census
        .target
        .saturating_sub(have)
        .min(slots.saturating_sub(census.starting));
    Plan { drain, start }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

fn kind(kind: SandboxKind) -> KindLabel {
    KindLabel {
        kind: kind.as_str().to_owned(),
    }
}

/// The pool's metrics (`airlock_pool_*`).
#[derive(Debug, Clone)]
struct PoolMetrics {
    size: Family<KindLabel, Gauge>,
    hits: Family<KindLabel, Counter>,
    misses: Family<KindLabel, Counter>,
    claim_failures: Family<KindLabel, Counter>,
    refill_failures: Family<KindLabel, Counter>,
    claim_seconds: Histogram,
}

impl PoolMetrics {
    fn new(metrics: &crate::metrics::Metrics) -> Self {
        let m = PoolMetrics {
            size: Family::default(),
            hits: Family::default(),
            misses: Family::default(),
            claim_failures: Family::default(),
            refill_failures: Family::default(),
            claim_seconds: Histogram::new([0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0]),
        };
        metrics.register(
            "pool_size",
            "Pool members ready to hand out, by kind",
            m.size.clone(),
        );
        metrics.register(
            "pool_hits",
            "Creates served from a pool, by kind",
            m.hits.clone(),
        );
        metrics.register(
            "pool_misses",
            "Creates that found their pool empty, by kind",
            m.misses.clone(),
        );
        metrics.register(
            "pool_claim_failures",
            "Claims that failed half-way (the member was destroyed, a cold create followed), by kind",
            m.claim_failures.clone(),
        );
        metrics.register(
            "pool_refill_failures",
            "Refills refused or failed, by kind",
            m.refill_failures.clone(),
        );
        metrics.register(
            "pool_claim_seconds",
            "Time from a create's claim to its sandbox handed over ready",
            m.claim_seconds.clone(),
        );
        m
    }
}

/// The pools' settings, metrics and the refiller's wake-up.
#[derive(Debug)]
pub struct Pools {
    pub settings: PoolSettings,
    kick: tokio::sync::Notify,
    metrics: PoolMetrics,
}

impl Pools {
    pub fn new(settings: PoolSettings, metrics: &crate::metrics::Metrics) -> Self {
        Pools {
            settings,
            kick: tokio::sync::Notify::new(),
            metrics: PoolMetrics::new(metrics),
        }
    }

    /// Whether creates of `kind` look in a pool first.
    pub fn serves(&self, kind: SandboxKind) -> bool {
        self.settings.target(kind) > 0
    }

    /// Wake the refiller now.
    fn kick(&self) {
        self.kick.notify_one();
    }
}

/// What a create got.
#[derive(Debug, Clone)]
pub struct Created {
    pub row: SandboxRow,
    /// Handed out from a warm pool (already ready).
    pub from_pool: bool,
}

/// A claim's outcome.
#[derive(Debug)]
pub(crate) enum Claim {
    /// Handed over, ready.
    Hit(SandboxRow),
    /// No member was free.
    Empty,
    /// A member was taken but could not be handed over; it is destroyed.
    Broken(String),
}

/// One kind's pool, as a status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    #[schema(value_type = String, example = "browser")]
    pub kind: SandboxKind,
    pub target: u32,
    /// Ready to hand out.
    pub ready: u32,
    /// Booting.
    pub starting: u32,
    /// Of another image build, waiting to be drained.
    pub stale: u32,
}

impl App {
    /// Start the refiller. It runs with every pool off too: members a run
    /// with a pool left behind are drained then.
    pub fn start_pools(self: &Arc<Self>) {
        let app = self.clone();
        self.spawn(async move {
            loop {
                if app.leading().await {
                    app.refill_pools_once().await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(app.cfg.pool.refill_every) => {}
                    _ = app.pools.kick.notified() => {}
                }
            }
        });
    }

    /// The pool's live rows of `kind`.
    async fn pool_rows(&self, kind: SandboxKind) -> Result<Vec<SandboxRow>, AppError> {
        let mut rows = self.store.live_sandboxes().await?;
        rows.retain(|r| r.owner_id == OWNER && r.kind == kind);
        Ok(rows)
    }

    /// Each pool's members, for `airlock doctor`/status.
    pub async fn pool_status(&self) -> Result<Vec<PoolStatus>, AppError> {
        let mut out = Vec::new();
        for k in [SandboxKind::Browser] {
            let rows = self.pool_rows(k).await?;
            let current = |r: &&SandboxRow| r.image_build_id == self.image.build_id;
            let pooled = rows.iter().filter(|r| r.state == SandboxState::Pooled);
            out.push(PoolStatus {
                kind: k,
                target: self.cfg.pool.target(k),
                ready: pooled.clone().filter(current).count() as u32,
                starting: rows
                    .iter()
                    .filter(|r| {
                        matches!(r.state, SandboxState::Provisioning | SandboxState::Booting)
                    })
                    .count() as u32,
                stale: pooled.filter(|r| !current(r)).count() as u32,
            });
        }
        Ok(out)
    }

    /// The session sandbox `id`'s agent holds (`None`: never claimed from a
    /// pool); the sandbox must be ready.
    pub async fn guest_session(&self, id: &str) -> Result<Option<Session>, AppError> {
        let row = self
            .store
            .sandbox(id)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("sandbox {id:?}")))?;
        let endpoints = self.ready_endpoints(&row).await?;
        self.guest
            .session(endpoints.agent, &row.agent_token)
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))
    }

    /// One round of the refiller over every kind.
    pub async fn refill_pools_once(self: &Arc<Self>) {
        for k in [SandboxKind::Browser, SandboxKind::Workspace] {
            if let Err(e) = self.refill(k).await {
                tracing::warn!(kind = k.as_str(), error = %e, "pool refill failed");
                self.pools
                    .metrics
                    .refill_failures
                    .get_or_create(&kind(k))
                    .inc();
            }
        }
    }

    async fn census(&self, k: SandboxKind) -> Result<Census, AppError> {
        let now = now_ms();
        let live = self.store.live_sandboxes().await?;
        let starting =
            |r: &SandboxRow| matches!(r.state, SandboxState::Provisioning | SandboxState::Booting);
        let mut pooled: Vec<&SandboxRow> = live
            .iter()
            .filter(|r| r.owner_id == OWNER && r.kind == k && r.state == SandboxState::Pooled)
            .collect();
        pooled.sort_by_key(|r| r.created_at);
        Ok(Census {
            target: self.cfg.pool.target(k),
            pooled: pooled
                .into_iter()
                .map(|r| Member {
                    id: r.id.clone(),
                    age: Duration::from_millis(u64::try_from(now - r.created_at).unwrap_or(0)),
                    current: r.image_build_id == self.image.build_id,
                })
                .collect(),
            starting: live
                .iter()
                .filter(|r| r.owner_id == OWNER && r.kind == k && starting(r))
                .count() as u32,
            users_starting: live
                .iter()
                .filter(|r| r.owner_id != OWNER && starting(r))
                .count() as u32,
        })
    }

    async fn refill(self: &Arc<Self>, k: SandboxKind) -> Result<(), AppError> {
        let census = self.census(k).await?;
        let plan = plan(&census, self.cfg.pool.max_age, self.cfg.pool.parallel);
        let size = census.pooled.len().saturating_sub(plan.drain.len());
        self.pools
            .metrics
            .size
            .get_or_create(&kind(k))
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        for (id, why) in plan.drain {
            // Only while still pooled: a member claimed meanwhile is the user's.
            let stop = Event::StopRequested(Some(why.to_owned()));
            match state::advance_if(&self.store, &id, SandboxState::Pooled, &stop).await {
                Ok(moved) => {
                    tracing::info!(sandbox = %id, reason = why, "pool member drained");
                    self.perform(&id, moved.effects, false).await;
                }
                Err(AdvanceError::Store(e)) => return Err(e.into()),
                Err(_) => {}
            }
        }
        if plan.start == 0 {
            return Ok(());
        }
        let owner = self
            .store
            .user_by_id(OWNER)
            .await?
            .ok_or_else(|| AppError::Internal("the pool's owner row is missing".into()))?;
        for _ in 0..plan.start {
            let id = super::sandboxes::new_id();
            let permit = self.admission.admit(OWNER, Ask::Pool, &id).await?;
            let row = self.create_admitted(&owner, k, id, permit).await?;
            tracing::info!(sandbox = %row.id, kind = k.as_str(), "pool member starting");
        }
        Ok(())
    }

    /// Take a pooled member of `kind` for `user` and hand it over. The
    /// caller holds the user's admission, so counting and claiming are one
    /// step for that user.
    pub(crate) async fn claim(self: &Arc<Self>, user: &UserRow, k: SandboxKind) -> Claim {
        let started = Instant::now();
        let label = kind(k);
        let won = match self.claim_one(user, k).await {
            Ok(Some(id)) => id,
            Ok(None) => {
                self.pools.metrics.misses.get_or_create(&label).inc();
                self.pools.kick();
                return Claim::Empty;
            }
            Err(e) => {
                self.pools.metrics.misses.get_or_create(&label).inc();
                return Claim::Broken(format!("the pool could not be read: {e}"));
            }
        };
        self.pools.kick();
        match self.hand_over(user, &won).await {
            Ok(row) => {
                let took = started.elapsed();
                self.pools.metrics.hits.get_or_create(&label).inc();
                self.pools.metrics.claim_seconds.observe(took.as_secs_f64());
                tracing::info!(sandbox = %won, user = %user.name, took_ms = took.as_millis() as u64, "handed out from the pool");
                Claim::Hit(row)
            }
            Err(why) => {
                self.pools
                    .metrics
                    .claim_failures
                    .get_or_create(&label)
                    .inc();
                tracing::warn!(sandbox = %won, reason = %why, "a pool member could not be handed over; it is destroyed");
                self.fail(&won, "claim", &format!("could not be handed over: {why}"))
                    .await;
                // Failed (or stopping), so never claimable again: out of the user's sight.
                if let Err(e) = self.store.disown_sandbox(&won, &user.id, OWNER).await {
                    tracing::error!(sandbox = %won, error = %e, "could not give a broken member back to the pool");
                }
                Claim::Broken(why)
            }
        }
    }

    /// The compare-and-set: the oldest member that is still fresh, or the
    /// next one when another claim won it.
    async fn claim_one(&self, user: &UserRow, k: SandboxKind) -> Result<Option<String>, AppError> {
        let max_age = i64::try_from(self.cfg.pool.max_age.as_millis()).unwrap_or(i64::MAX);
        let oldest = now_ms().saturating_sub(max_age);
        let mut rows = self.pool_rows(k).await?;
        rows.retain(|r| {
            r.state == SandboxState::Pooled
                && r.image_build_id == self.image.build_id
                && r.created_at >= oldest
        });
        rows.sort_by_key(|r| r.created_at);
        for row in rows {
            match state::claim(&self.store, &row.id, OWNER, &user.id, &self.image.build_id).await {
                Ok(Some(_)) => return Ok(Some(row.id)),
                Ok(None) => continue,
                Err(AdvanceError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(AppError::Internal(e.to_string())),
            }
        }
        Ok(None)
    }

    /// A claimed member becomes its user's: the forwarder goes to the user's
    /// upstream, the agent learns its session. Under the sandbox's lock, so
    /// no teardown runs in between.
    async fn hand_over(self: &Arc<Self>, user: &UserRow, id: &str) -> Result<SandboxRow, String> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let row = match self.store.sandbox(id).await {
            Ok(Some(row)) if row.state == SandboxState::Ready && row.owner_id == user.id => row,
            Ok(_) => return Err("it stopped while being handed over".into()),
            Err(e) => return Err(e.to_string()),
        };
        let lease = self.lease(&row).map_err(|e| e.to_string())?;
        // The user's upstream, resolved now (an account port assigned).
        self.egress_for(&row, &lease)
            .await
            .map_err(|e| e.to_string())?;
        self.forwarders
            .rebind(self, &row, &lease)
            .await
            .map_err(|e| format!("egress: {e}"))?;
        let session = Session {
            sandbox_id: row.id.clone(),
            user_id: user.id.clone(),
            user_name: user.name.clone(),
            claimed_at_ms: row.created_at,
        };
        let at = self.endpoints(&row).await.map_err(|e| e.to_string())?;
        self.guest
            .hand_session(at.agent, &row.agent_token, &session)
            .await
            .map_err(|e| format!("the agent did not take the session: {e}"))?;
        // A supervisor may have failed it meanwhile.
        match self.store.sandbox(id).await {
            Ok(Some(now)) if now.state == SandboxState::Ready => Ok(now),
            Ok(_) => Err("it stopped while being handed over".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
