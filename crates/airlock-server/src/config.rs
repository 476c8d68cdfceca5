//! Configuration: embedded defaults, then an optional TOML file, then the
//! command line and environment (applied by the binary). Validated once, with
//! errors that name the file and the field.

use crate::app::AppConfig;
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::Limits;
use airlock_proto::metadata::Display;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Nspawn,
    Qemu,
    Firecracker,
}

impl std::str::FromStr for DriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nspawn" => Ok(DriverKind::Nspawn),
            "qemu" => Ok(DriverKind::Qemu),
            "firecracker" => Ok(DriverKind::Firecracker),
            other => Err(format!(
                "unknown driver {other:?} (expected nspawn, qemu or firecracker)"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Where golden image layers live; `<data_dir>/images` when unset.
    pub image_dir: Option<PathBuf>,
    pub driver: DriverKind,
    /// `sqlite://…` or `postgres://…`; `<data_dir>/airlock.db` when unset.
    pub database_url: Option<String>,
    /// Sandbox addresses: one /30 per sandbox.
    pub address_pool: String,
    pub display_width: u32,
    pub display_height: u32,
    pub boot_timeout_s: u64,
    pub idle_ttl_s: u64,
    pub history_ttl_s: u64,
    pub memory_mb: Option<u64>,
    pub max_pids: Option<u64>,
    /// New sandboxes are refused (503) while the host has less memory
    /// available than this.
    pub min_free_memory_mb: u64,
    /// New sandboxes are refused (507) while the disk holding `data_dir` has
    /// less free space than this.
    pub min_free_disk_mb: u64,
    /// A login the user has not completed by then expires.
    pub login_timeout_s: u64,
    /// Extra provider definitions (`*.toml`), added to those of the image.
    pub providers_dir: Option<PathBuf>,
    /// The WebRTC path of the viewer; when off, viewers use noVNC only.
    pub webrtc: bool,
    /// UDP port WebRTC media uses, on the listen address (0: any free port).
    pub webrtc_udp_port: u16,
    /// TCP port of ICE-TCP, for networks that drop UDP (0: any free port).
    pub webrtc_tcp_port: u16,
    /// The address browsers are told to send media to; the listen address
    /// when unset. Needed when listening on 0.0.0.0 or behind NAT.
    pub webrtc_address: Option<std::net::IpAddr>,
    /// Frames per second the guest captures for WebRTC viewers (1–60): more
    /// is lower latency for more guest CPU (docs/performance.md).
    pub webrtc_fps: u32,
    /// Second copies of video packets against packet loss, at most this many
    /// kbit/s per viewer (0: none). They go to the frames after a quiet
    /// spell first — a key press, a click (docs/webrtc.md, "Packet loss").
    pub webrtc_copies_kbps: u32,
    /// Set the guest's encoder bitrate from each viewer's bandwidth estimate
    /// (the lowest viewer's wins) instead of the fixed 4 Mbit/s. Off until
    /// measured on a shaped link (docs/webrtc.md, "Adaptive bitrate").
    pub webrtc_adaptive_bitrate: bool,
    /// The `firecracker` binary (default: `firecracker` on the PATH).
    pub firecracker_bin: Option<PathBuf>,
    /// When set, the firecracker driver starts every VM under this `jailer`:
    /// a chroot, the uid/gid below, a cgroup and a network namespace per VM.
    pub jailer_bin: Option<PathBuf>,
    pub jailer_uid: u32,
    pub jailer_gid: u32,
    pub jailer_chroot_base: PathBuf,
    // ---- guard: who is calling, and from where (http/guard.rs) ----
    /// Host names (and `name:port`) this server answers to besides loopback
    /// and its own listen address; any other `Host` gets 421. No scheme.
    pub public_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) besides the server's own whose pages
    /// may open viewer sockets and change state.
    pub allowed_origins: Vec<String>,
    /// Let a loopback caller without a token in as the user `local` (only
    /// while `listen` is a loopback address, and only for a request that
    /// names no proxy). Unset: on only while `public_hosts` is empty, since
    /// a proxy on this host that adds no `X-Forwarded-For` makes every
    /// caller look local. `true` keeps it on even then (unsafe behind such a
    /// proxy); `false` turns it off.
    pub local_user: Option<bool>,

    // --- isolation and resource limits (nspawn driver) ---
    /// CPU time per sandbox, in CPUs (1.0: one whole CPU); unset: no limit.
    pub cpu_max: Option<f64>,
    /// Bytes per second a sandbox may read, and as many write, on the disk
    /// that holds data_dir; unset: no limit.
    pub io_max: Option<u64>,
    /// nspawn: every guest in a user namespace of its own (idmapped image
    /// layers; Linux 5.12+). Off only for hosts without idmapped mounts.
    pub user_namespaces: bool,
    /// Size of a sandbox's writable layer in MiB (a filesystem of its own: a
    /// guest that fills it gets ENOSPC); 0: no limit.
    pub disk_mb: u64,
    /// Size of a workspace's home volume in MiB, likewise; 0: no limit.
    pub home_disk_mb: u64,

    // ---- ICE-TCP limits (issue 15: the surfaces hostile bytes reach) ----
    /// ICE-TCP connections open at once, from everyone; more are closed at accept.
    pub webrtc_tcp_max_connections: usize,
    /// ICE-TCP connections open at once from one address.
    pub webrtc_tcp_max_per_ip: usize,
    /// An ICE-TCP connection whose first frame (a check for one of our
    /// peers) has not arrived within this is closed.
    pub webrtc_tcp_first_frame_ms: u64,
    /// An ICE-TCP connection without a frame for this long is closed.
    pub webrtc_tcp_idle_s: u64,

    /// Host names the egress forwarder passes on without its check, though
    /// they may lead to this host or its network (an intranet service, a test
    /// server the upstream proxy knows): `"name"`, or `".domain"` for every
    /// name under it. Addresses cannot be listed.
    pub egress_allow: Vec<String>,

    // ---- quotas and capacity reservation (issue 15, part 3: quota) ----
    /// Per-user caps (`[quota]`).
    pub quota: QuotaConfig,

    // ---- warm pools (app/pool.rs) ----
    /// Booted sandboxes kept ready to hand out (`[pool]`).
    pub pool: PoolConfig,

    // ---- many hosts (docs/cluster.md) ----
    /// `[cluster]`: sandboxes on `airlock node` processes.
    pub cluster: ClusterConfig,
    /// `[node]`: this process as `airlock node`.
    pub node: NodeConfig,

    // ---- screen recording (docs/recording.md) ----
    /// `[recording]`: server-side recordings of sandbox screens.
    pub recording: crate::recording::RecordingConfig,
}

/// `[cluster]` in the config file (both roles).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `airlock up` runs sandboxes on the registered nodes, not in process.
    pub enabled: bool,
    /// The secret replicas present to nodes (a file of one line, 0600).
    pub token_file: Option<PathBuf>,
}

/// `[node]` in the config file (`airlock node`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique in the cluster; default: the host name.
    pub name: Option<String>,
    /// The node API (replicas only; never public).
    pub listen: SocketAddr,
    /// Where replicas reach `listen`, when that differs (NAT, 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// How often the node renews its lease, in ms.
    pub heartbeat_ms: u64,
    /// A node silent this long is lost, in ms.
    pub lease_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 4100)),
            advertise: None,
            heartbeat_ms: 2_000,
            lease_ms: 10_000,
        }
    }
}

impl Config {
    /// The cluster token, read from `[cluster] token_file`.
    pub fn cluster_token(&self) -> Result<String, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            field: "cluster.token_file",
            message,
        };
        let path = self
            .cluster
            .token_file
            .as_ref()
            .ok_or_else(|| invalid("is required for a cluster".into()))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let token = text.trim().to_owned();
        if token.len() < 32 {
            return Err(invalid(format!(
                "{} must hold a secret of at least 32 characters",
                path.display()
            )));
        }
        Ok(token)
    }

    /// Checks of the many-hosts settings: a cluster needs PostgreSQL.
    fn validate_cluster(&self, node_role: bool) -> Result<(), ConfigError> {
        if !(self.cluster.enabled || node_role) {
            return Ok(());
        }
        let url = self.database_url();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                field: "database_url",
                message: "a cluster (`[cluster] enabled` or `airlock node`) needs PostgreSQL, which every replica and node share".into(),
            });
        }
        if self.node.heartbeat_ms == 0 || self.node.lease_ms < 2 * self.node.heartbeat_ms {
            return Err(ConfigError::Invalid {
                field: "node.lease_ms",
                message: "must be at least twice node.heartbeat_ms (and heartbeat_ms above 0)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Validate for `airlock node`.
    pub fn validate_node(&self) -> Result<(), ConfigError> {
        self.validate()?;
        self.validate_cluster(true)
    }
}

/// Warm pools (`[pool]` in the config file). See `app::pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Browser sandboxes kept booted and never used; 0 turns the pool off.
    pub browser: u32,
    /// Workspaces are cold-only (their home volume is mounted at create);
    /// anything but 0 is refused with the reason.
    pub workspace: u32,
    /// A member older than this many seconds is replaced.
    pub max_age_s: u64,
    /// How often the refiller looks, in seconds (it also runs after each claim).
    pub refill_every_s: u64,
    /// Members booting at once, at most.
    pub refill_parallel: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            browser: 0,
            workspace: 0,
            max_age_s: 30 * 60,
            refill_every_s: 2,
            refill_parallel: 2,
        }
    }
}

/// Per-user caps and the memory a starting sandbox holds (`[quota]` in the
/// config file). See `app::admission`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Live sandboxes (not stopped, not failed) per user, a login's browser
    /// sandbox included.
    pub max_sandboxes: u32,
    /// Logins under way (not finished) per user.
    pub max_logins: u32,
    /// Sandbox and login creates per user in any 60 seconds.
    pub creates_per_minute: u32,
    /// Memory held for each sandbox from its admission until it is ready, in
    /// MiB (never more than `memory_mb`): the host's available memory less
    /// what starting sandboxes hold must stay above `min_free_memory_mb`.
    pub reserve_mb: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            max_sandboxes: 8,
            max_logins: 3,
            creates_per_minute: 30,
            // An idle desktop holds about 225 MiB, one with a second Chromium
            // window about 400 MiB (docs/performance.md).
            reserve_mb: 512,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            data_dir: PathBuf::from("/var/lib/airlock"),
            image_dir: None,
            driver: DriverKind::Nspawn,
            database_url: None,
            address_pool: "10.231.0.0/16".into(),
            display_width: 1280,
            display_height: 800,
            boot_timeout_s: 90,
            idle_ttl_s: 2 * 3600,
            history_ttl_s: 24 * 3600,
            memory_mb: Some(2048),
            max_pids: Some(4096),
            min_free_memory_mb: 768,
            min_free_disk_mb: 2048,
            login_timeout_s: 15 * 60,
            providers_dir: None,
            webrtc: true,
            webrtc_udp_port: 4001,
            webrtc_tcp_port: 4001,
            webrtc_address: None,
            webrtc_fps: airlock_proto::stream::DEFAULT_FPS,
            webrtc_copies_kbps: 1000,
            webrtc_adaptive_bitrate: false,
            firecracker_bin: None,
            jailer_bin: None,
            jailer_uid: 64_000,
            jailer_gid: 64_000,
            jailer_chroot_base: PathBuf::from("/srv/jailer"),
            // ---- guard ----
            public_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            local_user: None,

            // ---- quotas and capacity reservation (quota) ----
            quota: QuotaConfig::default(),
            pool: PoolConfig::default(),
            cluster: ClusterConfig::default(),
            node: NodeConfig::default(),
            recording: crate::recording::RecordingConfig::default(),
            egress_allow: Vec::new(),
            cpu_max: None,
            io_max: None,
            user_namespaces: true,
            disk_mb: 8192,
            home_disk_mb: 16384,
            // ---- ICE-TCP limits ----
            webrtc_tcp_max_connections: 1024,
            webrtc_tcp_max_per_ip: 32,
            webrtc_tcp_first_frame_ms: 5000,
            webrtc_tcp_idle_s: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn image_dir(&self) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("airlock.db").display()))
    }

    pub fn pool(&self) -> Result<AddressPool, ConfigError> {
        AddressPool::parse(&self.address_pool).map_err(|e| ConfigError::Invalid {
            field: "address_pool",
            message: e.to_string(),
        })
    }

    /// Check every field once; the first problem is reported by field name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pool()?;
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_owned(),
            })
        };
        if !(320..=7680).contains(&self.display_width) {
            return invalid("display_width", "must be between 320 and 7680");
        }
        if !(240..=4320).contains(&self.display_height) {
            return invalid("display_height", "must be between 240 and 4320");
        }
        if self.boot_timeout_s == 0 || self.boot_timeout_s > 3600 {
            return invalid("boot_timeout_s", "must be between 1 and 3600");
        }
        if self.idle_ttl_s == 0 {
            return invalid("idle_ttl_s", "must be at least 1");
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return invalid(
                    "database_url",
                    "must start with sqlite:, postgres:// or postgresql://",
                );
            }
        }
        if self.memory_mb == Some(0) {
            return invalid("memory_mb", "must be at least 1");
        }
        if !self.data_dir.is_absolute() {
            return invalid("data_dir", "must be an absolute path");
        }
        if self.jailer_bin.is_some() {
            if self.jailer_uid == 0 || self.jailer_gid == 0 {
                return invalid(
                    "jailer_uid",
                    "jailed VMs must not run as root (uid or gid 0)",
                );
            }
            if !self.jailer_chroot_base.is_absolute() {
                return invalid("jailer_chroot_base", "must be an absolute path");
            }
        }
        if let Err(e) = self.recording.validate() {
            return invalid("recording", &e);
        }
        if !(1..=60).contains(&self.webrtc_fps) {
            return invalid("webrtc_fps", "must be between 1 and 60");
        }
        if self.webrtc_copies_kbps > 100_000 {
            return invalid("webrtc_copies_kbps", "must be at most 100000 (100 Mbit/s)");
        }
        if self.webrtc {
            if let Some(ip) = self.webrtc_address {
                if ip.is_unspecified() || ip.is_multicast() {
                    return invalid("webrtc_address", "must be an address browsers can reach");
                }
            } else if self.listen.ip().is_unspecified() {
                return invalid(
                    "webrtc_address",
                    "must be set when listen is a wildcard address: it is the address browsers send media to",
                );
            }
        }
        // ---- guard ----
        for host in &self.public_hosts {
            if let Err(why) = crate::http::guard::HostName::parse_setting(host) {
                return Err(ConfigError::Invalid {
                    field: "public_hosts",
                    message: format!("{host:?}: {why}"),
                });
            }
        }
        for origin in &self.allowed_origins {
            if let Err(why) = crate::http::guard::parse_origin_setting(origin) {
                return Err(ConfigError::Invalid {
                    field: "allowed_origins",
                    message: format!("{origin:?}: {why}"),
                });
            }
        }

        // ---- quotas and capacity reservation (quota) ----
        let q = &self.quota;
        if !(1..=10_000).contains(&q.max_sandboxes) {
            return invalid("quota.max_sandboxes", "must be between 1 and 10000");
        }
        if !(1..=10_000).contains(&q.max_logins) {
            return invalid("quota.max_logins", "must be between 1 and 10000");
        }
        if !(1..=100_000).contains(&q.creates_per_minute) {
            return invalid("quota.creates_per_minute", "must be between 1 and 100000");
        }
        if !(1..=1 << 20).contains(&q.reserve_mb) {
            return invalid("quota.reserve_mb", "must be between 1 and 1048576 (1 TiB)");
        }
        // ---- warm pools ----
        let p = &self.pool;
        if p.browser > 1000 {
            return invalid("pool.browser", "must be between 0 and 1000");
        }
        if p.workspace != 0 {
            return invalid(
                "pool.workspace",
                "must be 0: workspaces are cold-only (their persistent home is mounted when \
                 the sandbox is made, and is not attached to a running one)",
            );
        }
        if !(60..=7 * 24 * 3600).contains(&p.max_age_s) {
            return invalid("pool.max_age_s", "must be between 60 and 604800 (a week)");
        }
        if !(1..=3600).contains(&p.refill_every_s) {
            return invalid("pool.refill_every_s", "must be between 1 and 3600");
        }
        if !(1..=64).contains(&p.refill_parallel) {
            return invalid("pool.refill_parallel", "must be between 1 and 64");
        }
        // --- isolation and resource limits ---
        if let Some(cpus) = self.cpu_max {
            if !(0.01..=1024.0).contains(&cpus) {
                return invalid("cpu_max", "must be between 0.01 and 1024 (CPUs)");
            }
        }
        if self.io_max.is_some_and(|b| b < 1 << 20) {
            return invalid("io_max", "must be at least 1048576 (1 MiB/s)");
        }
        for (field, mb) in [
            ("disk_mb", self.disk_mb),
            ("home_disk_mb", self.home_disk_mb),
        ] {
            if mb != 0 && !(64..=16 << 20).contains(&mb) {
                return invalid(
                    field,
                    "must be 0 (no limit) or between 64 and 16777216 (MiB)",
                );
            }
        }
        for name in &self.egress_allow {
            let bare = name.strip_prefix('.').unwrap_or(name);
            let is_name = !bare.is_empty()
                && bare.parse::<std::net::IpAddr>().is_err()
                && !bare.starts_with('[')
                && bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
            if !is_name {
                return Err(ConfigError::Invalid {
                    field: "egress_allow",
                    message: format!(
                        "{name:?}: must be a host name (or .domain), without scheme, port or address"
                    ),
                });
            }
        }
        // ---- ICE-TCP limits ----
        if self.webrtc_tcp_max_connections == 0 {
            return invalid("webrtc_tcp_max_connections", "must be at least 1");
        }
        if !(1..=self.webrtc_tcp_max_connections).contains(&self.webrtc_tcp_max_per_ip) {
            return invalid(
                "webrtc_tcp_max_per_ip",
                "must be between 1 and webrtc_tcp_max_connections",
            );
        }
        if !(100..=60_000).contains(&self.webrtc_tcp_first_frame_ms) {
            return invalid("webrtc_tcp_first_frame_ms", "must be between 100 and 60000");
        }
        if !(5..=3600).contains(&self.webrtc_tcp_idle_s) {
            return invalid("webrtc_tcp_idle_s", "must be between 5 and 3600");
        }
        self.validate_cluster(false)
    }

    /// Where the WebRTC sockets listen and what address they advertise;
    /// `None` when WebRTC is off.
    pub fn webrtc_endpoint(&self) -> Option<crate::webrtc::EndpointConfig> {
        self.webrtc.then(|| crate::webrtc::EndpointConfig {
            bind: self.listen.ip(),
            udp_port: self.webrtc_udp_port,
            tcp_port: self.webrtc_tcp_port,
            advertise: self.webrtc_address.unwrap_or(self.listen.ip()),
            copies_kbps: self.webrtc_copies_kbps,
            adaptive_bitrate: self.webrtc_adaptive_bitrate,
            tcp_limits: crate::webrtc::TcpLimits {
                max_connections: self.webrtc_tcp_max_connections,
                max_per_ip: self.webrtc_tcp_max_per_ip,
                first_frame: Duration::from_millis(self.webrtc_tcp_first_frame_ms),
                idle: Duration::from_secs(self.webrtc_tcp_idle_s),
            },
        })
    }

    /// Who gets in without a token, and why, said when `airlock up` starts.
    pub fn local_access(&self) -> String {
        let tokens = "`airlock user add NAME` prints a token";
        if !self.listen.ip().is_loopback() {
            return format!(
                "Every call needs an API token: {} is not a loopback address, so the \
                 token-less user `local` is off; {tokens}.",
                self.listen.ip()
            );
        }
        let who = "a connection from this host's loopback that names no proxy \
                   (no Forwarded/X-Forwarded-For/X-Real-IP/Via) acts as the user `local`: \
                   that is every local account and any ssh tunnel to this port";
        match self.local_user {
            Some(false) => format!("Every call needs an API token (local_user = false); {tokens}."),
            Some(true) if !self.public_hosts.is_empty() => format!(
                "Without a token, {who} (local_user = true). UNSAFE behind a proxy on this \
                 host that adds no X-Forwarded-For: every caller through it is `local`. \
                 Remove local_user to require tokens while public_hosts is set."
            ),
            Some(true) => format!(
                "Without a token, {who} (local_user = true). Set local_user = false to \
                 require tokens ({tokens})."
            ),
            None if !self.public_hosts.is_empty() => format!(
                "Every call needs an API token: public_hosts is set, so a proxy may stand in \
                 front and the token-less user `local` is off (local_user = true turns it \
                 back on); {tokens}."
            ),
            None => format!(
                "Without a token, {who}. It turns off once public_hosts is set; \
                 local_user = false turns it off now ({tokens})."
            ),
        }
    }

    pub fn app_config(&self) -> AppConfig {
        let mut app = AppConfig::new(self.data_dir.clone());
        app.loopback_only = self.listen.ip().is_loopback();
        app.display = Display {
            width: self.display_width,
            height: self.display_height,
        };
        app.limits = Limits {
            memory_bytes: self.memory_mb.map(|m| m << 20),
            max_pids: self.max_pids,
            cpu_millis: self.cpu_max.map(|c| (c * 1000.0).round() as u32),
            io_bps: self.io_max,
            disk_bytes: (self.disk_mb > 0).then_some(self.disk_mb << 20),
            home_disk_bytes: (self.home_disk_mb > 0).then_some(self.home_disk_mb << 20),
        };
        app.boot_timeout = Duration::from_secs(self.boot_timeout_s);
        app.idle_ttl = Duration::from_secs(self.idle_ttl_s);
        app.history_ttl = Duration::from_secs(self.history_ttl_s);
        app.min_free_memory = self.min_free_memory_mb << 20;
        app.min_free_disk = self.min_free_disk_mb << 20;
        app.login_timeout = Duration::from_secs(self.login_timeout_s);
        app.providers_dir = self.providers_dir.clone();
        app.webrtc_fps = self.webrtc_fps;
        app.egress_allow = self.egress_allow.clone();
        // ---- guard ----
        app.listen = self.listen;
        app.public_hosts = self.public_hosts.clone();
        app.allowed_origins = self.allowed_origins.clone();
        app.local_user = self.local_user;

        // ---- quotas and capacity reservation (quota) ----
        app.quota = crate::app::admission::Quotas {
            max_sandboxes: self.quota.max_sandboxes,
            max_logins: self.quota.max_logins,
            creates_per_minute: self.quota.creates_per_minute,
        };
        app.pool = crate::app::pool::PoolSettings {
            browser: self.pool.browser,
            max_age: Duration::from_secs(self.pool.max_age_s),
            refill_every: Duration::from_secs(self.pool.refill_every_s),
            parallel: self.pool.refill_parallel,
        };
        app.cluster = self.cluster.enabled;
        app.recording = self.recording.clone();
        let reserve = self.quota.reserve_mb << 20;
        app.reserve_memory = app.limits.memory_bytes.map_or(reserve, |m| m.min(reserve));
        app
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/airlock.example.toml");
        let cfg = Config::from_file(&path).expect("example parses");
        cfg.validate().expect("example is valid");
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = toml::from_str::<Config>("listne = \"127.0.0.1:1\"").expect_err("typo");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cfg = Config {
            address_pool: "10.0.0.1/16".into(),
            ..Config::default()
        };
        let err = cfg.validate().expect_err("host bits");
        assert!(err.to_string().starts_with("address_pool:"), "{err}");
        let cfg = Config {
            display_width: 10,
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .expect_err("tiny")
            .to_string()
            .starts_with("display_width:"));
        let cfg = Config {
            webrtc_copies_kbps: 1_000_000,
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .expect_err("a gigabit of copies")
            .to_string()
            .starts_with("webrtc_copies_kbps:"));
    }

    #[test]
    fn guard_settings_are_checked_by_field() {
        let ok = Config {
            public_hosts: vec!["airlock.example.com".into(), "10.1.2.3:4000".into()],
            allowed_origins: vec!["https://dash.example.com".into()],
            ..Config::default()
        };
        ok.validate().expect("valid");
        let url_as_host = Config {
            public_hosts: vec!["https://airlock.example.com".into()],
            ..Config::default()
        };
        let err = url_as_host.validate().expect_err("scheme");
        assert!(err.to_string().starts_with("public_hosts:"), "{err}");
        assert!(err.to_string().contains("without a scheme"), "{err}");
        let host_as_origin = Config {
            allowed_origins: vec!["dash.example.com".into()],
            ..Config::default()
        };
        let err = host_as_origin.validate().expect_err("no scheme");
        assert!(err.to_string().starts_with("allowed_origins:"), "{err}");
        let with_path = Config {
            allowed_origins: vec!["https://dash.example.com/app".into()],
            ..Config::default()
        };
        assert!(with_path.validate().is_err());
        assert_eq!(Config::default().local_user, None);
        assert!(Config::default()
            .local_access()
            .starts_with("Without a token"));
        let off = Config {
            local_user: Some(false),
            ..Config::default()
        };
        assert!(off
            .local_access()
            .starts_with("Every call needs an API token"));
    }

    #[test]
    fn the_local_user_is_automatic_until_public_hosts_is_set() {
        let public = |local_user| Config {
            public_hosts: vec!["airlock.example.com".into()],
            local_user,
            ..Config::default()
        };
        let auto = public(None);
        assert!(!auto.app_config().local_user_on());
        let said = auto.local_access();
        assert!(said.starts_with("Every call needs an API token"), "{said}");
        assert!(said.contains("public_hosts is set"), "{said}");
        let forced = public(Some(true));
        assert!(forced.app_config().local_user_on());
        assert!(
            forced.local_access().contains("UNSAFE"),
            "{}",
            forced.local_access()
        );
        assert!(!public(Some(false)).app_config().local_user_on());
        assert!(Config::default().app_config().local_user_on());
        let wide = Config {
            listen: "0.0.0.0:4000".parse().expect("addr"),
            local_user: Some(true),
            webrtc: false,
            ..Config::default()
        };
        assert!(!wide.app_config().local_user_on());
        assert!(wide.local_access().contains("not a loopback address"));
    }

    #[test]
    fn pool_table_is_checked_and_its_fields_named() {
        let cfg: Config = toml::from_str("[pool]\nbrowser = 4\nmax_age_s = 600\n").expect("parses");
        cfg.validate().expect("valid");
        let app = cfg.app_config();
        assert_eq!(app.pool.browser, 4);
        assert_eq!(app.pool.max_age, Duration::from_secs(600));
        assert_eq!(app.pool.parallel, 2, "unset fields keep their default");
        let err = toml::from_str::<Config>("[pool]\nbrowsers = 2\n").expect_err("typo");
        assert!(err.to_string().contains("browsers"), "{err}");
        let cfg: Config = toml::from_str("[pool]\nworkspace = 1\n").expect("parses");
        let err = cfg.validate().expect_err("workspaces are cold-only");
        assert!(err.to_string().starts_with("pool.workspace:"), "{err}");
        assert!(err.to_string().contains("cold-only"), "{err}");
        let cfg: Config = toml::from_str("[pool]\nmax_age_s = 1\n").expect("parses");
        let err = cfg.validate().expect_err("too short");
        assert!(err.to_string().starts_with("pool.max_age_s:"), "{err}");
    }

    #[test]
    fn quota_table_is_checked_and_its_fields_named() {
        let cfg: Config =
            toml::from_str("memory_mb = 256\n[quota]\nmax_sandboxes = 2\ncreates_per_minute = 5\n")
                .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.quota.max_sandboxes, 2);
        assert_eq!(cfg.quota.max_logins, 3, "unset fields keep their default");
        let app = cfg.app_config();
        assert_eq!(app.quota.creates_per_minute, 5);
        assert_eq!(app.reserve_memory, 256 << 20, "never more than the limit");
        let err = toml::from_str::<Config>("[quota]\nmax_sandbox = 2\n").expect_err("typo");
        assert!(err.to_string().contains("max_sandbox"), "{err}");
        let cfg = Config {
            quota: QuotaConfig {
                max_logins: 0,
                ..QuotaConfig::default()
            },
            ..Config::default()
        };
        let err = cfg.validate().expect_err("zero logins");
        assert!(err.to_string().starts_with("quota.max_logins:"), "{err}");
    }

    #[test]
    fn webrtc_needs_an_address_browsers_can_reach() {
        let wildcard = Config {
            listen: "0.0.0.0:4000".parse().expect("addr"),
            ..Config::default()
        };
        let err = wildcard.validate().expect_err("no address to advertise");
        assert!(err.to_string().starts_with("webrtc_address:"), "{err}");
        let advertised = Config {
            webrtc_address: Some("192.0.2.1".parse().expect("ip")),
            ..wildcard.clone()
        };
        advertised.validate().expect("valid");
        let e = advertised.webrtc_endpoint().expect("on");
        assert_eq!(e.advertise.to_string(), "192.0.2.1");
        assert!(e.bind.is_unspecified());
        let off = Config {
            webrtc: false,
            ..wildcard
        };
        off.validate().expect("webrtc off needs no address");
        assert!(off.webrtc_endpoint().is_none());
    }
}
