//! Admission: whether a new sandbox or login may start. Two questions, asked
//! before anything is made:
//!
//! - the caller's quotas: live sandboxes, logins under way, and creates in
//!   the last minute (429 `quota_exceeded` / `rate_limited`, with a
//!   `Retry-After`);
//! - the host's room: free disk (507) and free memory (503), where the memory
//!   a starting sandbox will take is held in a ledger from its admission until
//!   it is ready, failed or gone. A guest allocates its memory while it boots,
//!   so without the ledger every create of a burst sees the same free memory
//!   and all of them pass.
//!
//! ```text
//!   admit(user, ask, id) ──► user lock ──► quotas ──► ledger lock: disk, memory,
//!        │                   (held by        │         hold `reserve` for id
//!        │                    the Permit)    └─► 429          └─► 507 / 503
//!        ▼
//!   Permit ── commit() ─► the create counts toward the rate; the hold stays
//!          │               until release(id) (ready, failed, or gone)
//!          └─ dropped ───► the hold is returned, nothing counted
//! ```
//!
//! A [`Permit`] keeps the user's lock until the caller has written its row
//! and committed, so counting and creating are one step: two parallel
//! creates at one below a cap cannot both pass. The lock is per process;
//! one `airlock up` serves a data dir.
//!
//! Who counts what:
//! - a login's browser sandbox is the user's: it counts toward
//!   `max_sandboxes`, and a login is refused when it has no room for it;
//! - sandboxes airlock makes on a user's behalf after admitting a login (the
//!   workspace its credentials go to, a browser sandbox made again after a
//!   restart) are not refused by the user's caps, since the user already
//!   waited through a sign-in; they count toward the host's room like any
//!   other;
//! - a login and its browser sandbox are one create toward
//!   `creates_per_minute`; refused requests count for nothing.

use super::AppError;
use crate::store::Store;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The window of `creates_per_minute`.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// What a refusal at a count cap suggests: nothing frees a place on a
/// schedule we know (the user deletes a sandbox), so a modest pause.
const CAP_RETRY: Duration = Duration::from_secs(30);

/// Per-user caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Quotas {
    /// Live sandboxes (not stopped, not failed), a login's browser sandbox included.
    pub max_sandboxes: u32,
    /// Logins under way (not finished).
    pub max_logins: u32,
    /// Sandbox and login creates in any 60 seconds.
    pub creates_per_minute: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_sandboxes: 8,
            max_logins: 3,
            creates_per_minute: 30,
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A count cap: live sandboxes or logins under way.
    QuotaExceeded,
    /// Too many creates in the last minute.
    RateLimited,
}

impl Refusal {
    /// The stable `error.code` of the API.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::QuotaExceeded => "quota_exceeded",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// What is being asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// `POST /sandboxes`.
    Sandbox,
    /// `POST /logins`: a login and its browser sandbox.
    Login,
    /// A sandbox airlock makes for an admitted login: host room only.
    OnBehalf,
    /// A warm pool's refill: host room only, and it leaves one more
    /// sandbox's reserve free, so a refill never takes a user's room.
    Pool,
}

/// Reads of the host's free memory and disk: the real ones, or a fake in tests.
pub trait HostProbe: Send + Sync + std::fmt::Debug {
    /// Bytes of memory the host can still give to new work, if known.
    fn memory_available(&self) -> Option<u64>;
    /// Bytes an unprivileged writer may still use on the file system holding
    /// `path`, if known.
    fn disk_available(&self, path: &Path) -> Option<u64>;
}

/// `MemAvailable` from `/proc/meminfo`, and `statvfs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcProbe;

impl HostProbe for ProcProbe {
    fn memory_available(&self) -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        meminfo_available(&meminfo)
    }

    fn disk_available(&self, path: &Path) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c` is a valid C string and `st` is written by statvfs
        // before it is read (only on success).
        #[allow(unsafe_code)]
        let st = unsafe {
            if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
                return None;
            }
            st.assume_init()
        };
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// A host whose free memory and disk the test sets.
#[derive(Debug, Default)]
pub struct FakeProbe {
    memory: Mutex<Option<u64>>,
    disk: Mutex<Option<u64>>,
}

impl FakeProbe {
    pub fn new(memory: Option<u64>, disk: Option<u64>) -> Self {
        FakeProbe {
            memory: Mutex::new(memory),
            disk: Mutex::new(disk),
        }
    }

    pub fn set_memory(&self, bytes: Option<u64>) {
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
    }

    pub fn set_disk(&self, bytes: Option<u64>) {
        *self.disk.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
    }
}

impl HostProbe for FakeProbe {
    fn memory_available(&self) -> Option<u64> {
        *self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disk_available(&self, _path: &Path) -> Option<u64> {
        *self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where "now" comes from for the rate window.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when the test moves it.
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock(Mutex::new(Instant::now()))
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What admission needs to know, already validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quotas: Quotas,
    /// Its file system holds writable layers and VM disks.
    pub data_dir: PathBuf,
    /// Memory that must stay available after every starting sandbox took
    /// what it holds.
    pub min_free_memory: u64,
    pub min_free_disk: u64,
    /// Memory each sandbox holds from admission until ready.
    pub reserve_memory: u64,
}

impl Settings {
    pub fn of(cfg: &super::AppConfig) -> Self {
        Settings {
            quotas: cfg.quota,
            data_dir: cfg.data_dir.clone(),
            min_free_memory: cfg.min_free_memory,
            min_free_disk: cfg.min_free_disk,
            reserve_memory: cfg.reserve_memory,
        }
    }
}

/// A user's admitted creates of the last minute, oldest first.
type Window = VecDeque<Instant>;

#[derive(Debug)]
pub struct Admission {
    settings: Settings,
    store: Store,
    probe: Arc<dyn HostProbe>,
    clock: Arc<dyn Clock>,
    /// One lock per user, held from the count to the row written.
    users: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Window>>>>,
    /// Memory held by sandboxes not yet ready, by sandbox id.
    held: Mutex<HashMap<String, u64>>,
}

/// An admitted create. Keep it until the row is written, then [`commit`];
/// dropped uncommitted, it returns the memory it held and counts nothing.
///
/// [`commit`]: Permit::commit
#[must_use = "an admission is void unless committed"]
#[derive(Debug)]
pub struct Permit<'a> {
    admission: &'a Admission,
    window: tokio::sync::OwnedMutexGuard<Window>,
    /// The user's lock among every process on the database (PostgreSQL),
    /// so replicas do not both admit past a cap; released with the permit.
    _shared: Option<crate::store::UserLock>,
    sandbox_id: String,
    counts: bool,
    committed: bool,
}

impl Permit<'_> {
    /// The row is written: the create counts toward the rate, and the memory
    /// stays held until [`Admission::release`].
    pub fn commit(mut self) {
        if self.counts {
            let now = self.admission.clock.now();
            self.window.push_back(now);
        }
        self.committed = true;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.admission.release(&self.sandbox_id);
        }
    }
}

/// The caller's quotas and use (`GET /api/v1/usage`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub limits: Quotas,
    pub used: Used,
    /// The host's room for new sandboxes; absent when it cannot be read.
    pub host: Option<HostRoom>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Used {
    /// Live sandboxes (not stopped, not failed).
    pub sandboxes: u64,
    /// Logins under way.
    pub logins: u64,
    /// Sandbox and login creates in the last 60 seconds.
    pub creates_last_minute: u64,
}

/// Free memory and disk as admission sees them, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HostRoom {
    pub memory_available_mb: Option<u64>,
    /// Held for sandboxes still starting.
    pub memory_held_mb: u64,
    pub min_free_memory_mb: u64,
    /// What each new sandbox holds until it is ready.
    pub reserve_mb: u64,
    pub disk_available_mb: Option<u64>,
    pub min_free_disk_mb: u64,
}

impl Admission {
    /// Bytes still free on the disk holding the data directory, if known.
    pub fn data_disk_available(&self) -> Option<u64> {
        self.probe.disk_available(&self.settings.data_dir)
    }

    pub fn new(
        settings: Settings,
        store: Store,
        probe: Arc<dyn HostProbe>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Admission {
            settings,
            store,
            probe,
            clock,
            users: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn quotas(&self) -> Quotas {
        self.settings.quotas
    }

    fn window_of(&self, user_id: &str) -> Arc<tokio::sync::Mutex<Window>> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.entry(user_id.to_owned()).or_default().clone()
    }

    /// Drop creates older than the window.
    fn prune(&self, window: &mut Window) {
        let now = self.clock.now();
        while window
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= RATE_WINDOW)
        {
            window.pop_front();
        }
    }

    /// Admit the create of sandbox `sandbox_id` for `user_id`, or say which
    /// limit refuses it. Nothing is counted until the permit is committed.
    pub async fn admit(
        &self,
        user_id: &str,
        ask: Ask,
        sandbox_id: &str,
    ) -> Result<Permit<'_>, AppError> {
        let mut window = self.window_of(user_id).lock_owned().await;
        let users = !matches!(ask, Ask::OnBehalf | Ask::Pool);
        let shared = if users {
            self.store.lock_user(user_id).await?
        } else {
            None
        };
        if users {
            self.prune(&mut window);
            self.check_quotas(user_id, ask, &window).await?;
        }
        let margin = if ask == Ask::Pool {
            self.settings.reserve_memory
        } else {
            0
        };
        self.hold(sandbox_id, margin)?;
        Ok(Permit {
            admission: self,
            window,
            _shared: shared,
            sandbox_id: sandbox_id.to_owned(),
            counts: users,
            committed: false,
        })
    }

    async fn check_quotas(&self, user_id: &str, ask: Ask, window: &Window) -> Result<(), AppError> {
        let q = self.settings.quotas;
        let sandboxes = self.store.count_live_sandboxes(user_id).await?;
        if sandboxes >= u64::from(q.max_sandboxes) {
            let why = if ask == Ask::Login {
                "a login needs a browser sandbox, and "
            } else {
                ""
            };
            return Err(AppError::Quota {
                kind: Refusal::QuotaExceeded,
                message: format!(
                    "{why}you have {}, the limit (quota.max_sandboxes) is {}; delete one first",
                    count(sandboxes, "live sandbox", "live sandboxes"),
                    q.max_sandboxes
                ),
                retry_after: CAP_RETRY,
            });
        }
        if ask == Ask::Login {
            let (logins, first_expiry) = self.store.live_logins(user_id).await?;
            if logins >= u64::from(q.max_logins) {
                // The earliest of them ends by itself then, at the latest.
                let retry_after = first_expiry
                    .map(|at| at.saturating_sub(crate::store::now_ms()))
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map_or(CAP_RETRY, Duration::from_millis);
                return Err(AppError::Quota {
                    kind: Refusal::QuotaExceeded,
                    message: format!(
                        "you have {} under way, the limit (quota.max_logins) is {}; \
                         finish or cancel one first",
                        count(logins, "login", "logins"),
                        q.max_logins
                    ),
                    retry_after,
                });
            }
        }
        if window.len() >= q.creates_per_minute as usize {
            let now = self.clock.now();
            let retry_after = window.front().map_or(RATE_WINDOW, |oldest| {
                RATE_WINDOW.saturating_sub(now.saturating_duration_since(*oldest))
            });
            return Err(AppError::Quota {
                kind: Refusal::RateLimited,
                message: format!(
                    "you made {} in the last minute, the limit (quota.creates_per_minute) is {}; \
                     try again in {} s",
                    count(window.len() as u64, "create", "creates"),
                    q.creates_per_minute,
                    whole_seconds(retry_after)
                ),
                retry_after,
            });
        }
        Ok(())
    }

    /// Refuse while the host lacks the disk (507) or the memory (503) for one
    /// more sandbox; otherwise hold that sandbox's memory.
    fn hold(&self, sandbox_id: &str, margin: u64) -> Result<(), AppError> {
        let s = &self.settings;
        if let Some(free) = self.probe.disk_available(&s.data_dir) {
            if free < s.min_free_disk {
                return Err(AppError::NoStorage(format!(
                    "the disk holding the data directory has {} MiB free, less than the {} MiB a new \
                     sandbox needs (min_free_disk_mb); delete sandboxes or old images (`airlock image prune`)",
                    free >> 20,
                    s.min_free_disk >> 20
                )));
            }
        }
        // The read and the hold under one lock: the next create sees this one.
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(available) = self.probe.memory_available() {
            let holding: u64 = held.values().sum();
            let needed = holding
                .saturating_add(s.reserve_memory)
                .saturating_add(s.min_free_memory)
                .saturating_add(margin);
            if available < needed {
                let starting = if holding > 0 {
                    format!(
                        ", {} MiB of it held for {} sandboxes still starting",
                        holding >> 20,
                        held.len()
                    )
                } else {
                    String::new()
                };
                return Err(AppError::NoCapacity(format!(
                    "the host has {} MiB of memory available{starting}; a new sandbox needs {} MiB \
                     on top of the {} MiB kept free (quota.reserve_mb, min_free_memory_mb); \
                     delete a sandbox or try later",
                    available >> 20,
                    s.reserve_memory >> 20,
                    s.min_free_memory >> 20
                )));
            }
        }
        held.insert(sandbox_id.to_owned(), s.reserve_memory);
        Ok(())
    }

    /// The sandbox is ready, failed or gone: its guest's memory shows in the
    /// host's figures now, or is back. Repeated calls are harmless.
    pub fn release(&self, sandbox_id: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.remove(sandbox_id);
    }

    /// Bytes held for sandboxes still starting.
    pub fn held_bytes(&self) -> u64 {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.values().sum()
    }

    pub async fn usage(&self, user_id: &str) -> Result<Usage, AppError> {
        let sandboxes = self.store.count_live_sandboxes(user_id).await?;
        let (logins, _) = self.store.live_logins(user_id).await?;
        let creates_last_minute = {
            let window = self.window_of(user_id);
            let mut window = window.lock().await;
            self.prune(&mut window);
            window.len() as u64
        };
        let s = &self.settings;
        let host = HostRoom {
            memory_available_mb: self.probe.memory_available().map(|b| b >> 20),
            memory_held_mb: self.held_bytes() >> 20,
            min_free_memory_mb: s.min_free_memory >> 20,
            reserve_mb: s.reserve_memory >> 20,
            disk_available_mb: self.probe.disk_available(&s.data_dir).map(|b| b >> 20),
            min_free_disk_mb: s.min_free_disk >> 20,
        };
        let known = host.memory_available_mb.is_some() || host.disk_available_mb.is_some();
        Ok(Usage {
            limits: s.quotas,
            used: Used {
                sandboxes,
                logins,
                creates_last_minute,
            },
            host: known.then_some(host),
        })
    }
}

/// "1 login", "2 logins".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Seconds for a `Retry-After`: rounded up, at least 1.
pub fn whole_seconds(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests;
