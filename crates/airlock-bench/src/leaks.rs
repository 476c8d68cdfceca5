//! What sandboxes left behind on this host: the leak checker of the churn
//! bench and of the chaos tests (which include this file as a module).
//!
//! A [`Scope`] names what to look for: a control plane's data directory, its
//! address pool and its store, plus any sandbox ids and host uid ranges the
//! caller saw while the sandboxes lived. Everything found is reported; an
//! empty list means nothing leaked. The checker only reads: it never removes
//! anything, and it never looks at what other control planes on the host own
//! (their ids, directories and pools are not in the scope).
//!
//! What is looked for, and how each is named (the nspawn driver and
//! `airlock_drivers::net`):
//!
//! | resource | found by |
//! |---|---|
//! | host link `al<id12>` (veth or TAP) | `/sys/class/net` |
//! | network namespace `airlock-<id12>` | `/run/netns` |
//! | nftables chains, counters, map entries of `al<id12>` | `nft list table inet airlock` |
//! | a host address, an nftables rule or a listening socket inside the pool | `ip -o -4 addr`, the same table, `/proc/net/tcp` |
//! | cgroups `airlock/<id>` (every hierarchy) and the processes in them | `/sys/fs/cgroup` |
//! | processes: `airlock-<id>` (nspawn's machine, the VMM's name) or the data dir in argv, or a uid of a sandbox's range | `/proc` |
//! | mounts under the data dir | `/proc/self/mounts` |
//! | loop devices backed by a file under the data dir | `/sys/block/loop*/loop/backing_file` |
//! | host uid ranges held for directories under the data dir | the userns registry |
//! | per-sandbox directories (`sandboxes/<id>`, `qemu/<id>`) | the data dir |
//! | store rows in a live state, leases still held | the store (`sandboxes` table) |

use airlock_drivers::net::link::LinkNames;
use airlock_drivers::net::pool::AddressPool;
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Host uids per sandbox user namespace (`airlock_drivers::userns::RANGE`).
const UID_RANGE: u32 = airlock_drivers::userns::RANGE;

/// The states in which a sandbox may still hold host resources.
const LIVE_STATES: [&str; 4] = ["provisioning", "booting", "ready", "stopping"];

/// What to look for.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The control plane's data directory.
    pub data_dir: PathBuf,
    /// Its address pool (`A.B.C.D/N`).
    pub pool: String,
    /// Its store; `None`: the SQLite file in the data dir, when there is one.
    pub database_url: Option<String>,
    /// Sandbox ids the caller knows of, besides those the store and the data
    /// dir still name.
    pub ids: BTreeSet<String>,
    /// First host uids of the sandboxes' user namespaces (each 65,536 wide),
    /// noted while they lived: their processes are found by uid afterwards.
    pub uid_bases: BTreeSet<u32>,
    /// Processes not to report (the control plane itself, whose argv may
    /// name the data dir).
    pub ignore_pids: BTreeSet<u32>,
}

/// One thing left behind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leak {
    /// `link`, `netns`, `nftables`, `address`, `listener`, `cgroup`, `process`, `mount`,
    /// `loop`, `uid range`, `directory`, `store row`, `lease`.
    pub kind: &'static str,
    pub what: String,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.what)
    }
}

impl Scope {
    pub fn new(data_dir: impl Into<PathBuf>, pool: &str) -> Scope {
        Scope {
            data_dir: data_dir.into(),
            pool: pool.to_owned(),
            database_url: None,
            ids: BTreeSet::new(),
            uid_bases: BTreeSet::new(),
            ignore_pids: BTreeSet::new(),
        }
    }

    /// Note a sandbox: its id, and its uid range while its record still
    /// exists (call it while the sandbox runs).
    pub fn remember(&mut self, id: &str) {
        self.ids.insert(id.to_owned());
        if let Some(base) = uid_base(&self.data_dir, id) {
            self.uid_bases.insert(base);
        }
    }

    fn database_url(&self) -> Option<String> {
        if let Some(url) = &self.database_url {
            return Some(url.clone());
        }
        let file = self.data_dir.join("airlock.db");
        file.exists()
            .then(|| format!("sqlite://{}?mode=ro", file.display()))
    }
}

/// The first host uid of a running sandbox's user namespace, from the nspawn
/// driver's record of it.
pub fn uid_base(data_dir: &Path, id: &str) -> Option<u32> {
    let text =
        std::fs::read_to_string(data_dir.join("sandboxes").join(id).join("sandbox.json")).ok()?;
    let record: serde_json::Value = serde_json::from_str(&text).ok()?;
    u32::try_from(record["uid_base"].as_u64()?).ok()
}

/// Everything the scope's sandboxes left behind, sorted.
pub async fn check(scope: &Scope) -> Vec<Leak> {
    let mut out = Vec::new();
    let mut ids = scope.ids.clone();
    match store_rows(scope).await {
        Ok(rows) => {
            for row in rows {
                if LIVE_STATES.contains(&row.state.as_str()) {
                    out.push(Leak {
                        kind: "store row",
                        what: format!("sandbox {} is still {}", row.id, row.state),
                    });
                }
                if let Some(index) = row.lease {
                    let addr = AddressPool::parse(&scope.pool)
                        .ok()
                        .and_then(|p| p.lease(index))
                        .map(|l| format!(" ({}/{})", l.host, l.prefix_len))
                        .unwrap_or_default();
                    out.push(Leak {
                        kind: "lease",
                        what: format!(
                            "pool block {index}{addr} held by sandbox {} ({})",
                            row.id, row.state
                        ),
                    });
                }
                ids.insert(row.id);
            }
        }
        Err(e) => out.push(Leak {
            kind: "store row",
            what: format!("the store could not be read: {e}"),
        }),
    }
    ids.extend(dir_names(&scope.data_dir.join("sandboxes")));
    out.extend(check_host(scope, &ids));
    out.sort();
    out.dedup();
    out
}

/// Check until nothing is left or `within` has passed (teardown runs in the
/// background after a sandbox is reported stopped or failed); the last
/// findings.
pub async fn settle(scope: &Scope, within: Duration) -> Vec<Leak> {
    let deadline = Instant::now() + within;
    loop {
        let found = check(scope).await;
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Debug)]
struct Row {
    id: String,
    state: String,
    lease: Option<u32>,
}

/// Every sandbox row that is live or holds a lease, plus the ids of all
/// others (their host resources are checked too).
async fn store_rows(scope: &Scope) -> Result<Vec<Row>, String> {
    use sqlx::Row as _;
    let Some(url) = scope.database_url() else {
        return Ok(Vec::new());
    };
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .map_err(|e| format!("opening it: {e}"))?;
    let rows = sqlx::query("SELECT id, state, lease_index FROM sandboxes")
        .fetch_all(&pool)
        .await
        .map_err(|e| format!("listing sandboxes: {e}"));
    pool.close().await;
    let mut out = Vec::new();
    for row in rows? {
        let lease: Option<i64> = row.try_get("lease_index").map_err(|e| e.to_string())?;
        out.push(Row {
            id: row.try_get("id").map_err(|e| e.to_string())?,
            state: row.try_get("state").map_err(|e| e.to_string())?,
            lease: lease.and_then(|l| u32::try_from(l).ok()),
        });
    }
    Ok(out)
}

/// What the host holds for one sandbox: its link, namespace, nftables
/// entries, cgroups, processes and directories (not the store, not the pool).
/// While it runs this is its footprint; once it is stopped or failed and torn
/// down, anything here leaked.
// The bench checks whole scopes; the chaos tests also check one sandbox.
#[allow(dead_code)]
pub fn of_sandbox(scope: &Scope, id: &str) -> Vec<Leak> {
    let mut out = Vec::new();
    sandbox_leaks(scope, id, &HostView::read(), &mut out);
    out
}

/// The host tables read once per check.
struct HostView {
    nft: String,
    processes: Vec<Process>,
}

impl HostView {
    fn read() -> HostView {
        HostView {
            nft: run("nft", &["list", "table", "inet", "airlock"]),
            processes: processes(),
        }
    }
}

fn sandbox_leaks(scope: &Scope, id: &str, host: &HostView, out: &mut Vec<Leak>) {
    let mut leak = |kind: &'static str, what: String| out.push(Leak { kind, what });
    let names = LinkNames::for_sandbox(id);
    if Path::new("/sys/class/net").join(&names.host_if).exists() {
        leak("link", format!("{} (sandbox {id})", names.host_if));
    }
    if Path::new(&names.netns_path()).exists() {
        leak("netns", format!("{} (sandbox {id})", names.netns));
    }
    let in_table: Vec<&str> = host
        .nft
        .lines()
        .map(str::trim)
        .filter(|l| contains_word(l, &names.host_if))
        .collect();
    if !in_table.is_empty() {
        leak(
            "nftables",
            format!(
                "{} lines name {} (sandbox {id}), e.g. {:?}",
                in_table.len(),
                names.host_if,
                in_table[0]
            ),
        );
    }
    for dir in cgroup_dirs(id) {
        let pids = cgroup_pids(&dir);
        leak(
            "cgroup",
            format!("{} ({} processes)", dir.display(), pids.len()),
        );
        for pid in pids {
            if let Some(p) = host.processes.iter().find(|p| p.pid == pid) {
                leak("process", format!("{p} in the cgroup of sandbox {id}"));
            }
        }
    }
    let machine = format!("airlock-{id}");
    for p in &host.processes {
        if p.args.iter().any(|a| contains_word(a, &machine)) {
            leak("process", format!("{p} names {machine}"));
        }
    }
    for sub in ["sandboxes", "qemu", "firecracker"] {
        let dir = scope.data_dir.join(sub).join(id);
        if dir.exists() {
            leak("directory", dir.display().to_string());
        }
    }
}

/// Every process in a sandbox's cgroups, with its command name (`comm`).
// Used by the chaos tests (which pick processes to kill), not the bench.
#[allow(dead_code)]
pub fn sandbox_processes(id: &str) -> Vec<(u32, String)> {
    let mut pids: Vec<u32> = cgroup_dirs(id)
        .iter()
        .flat_map(|d| cgroup_pids(d))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim().to_owned()))
        })
        .collect()
}

/// What the host still holds for `ids` and for the scope's data dir and pool.
pub fn check_host(scope: &Scope, ids: &BTreeSet<String>) -> Vec<Leak> {
    let host = HostView::read();
    let mut out = Vec::new();
    for id in ids {
        sandbox_leaks(scope, id, &host, &mut out);
    }
    let mut leak = |kind: &'static str, what: String| out.push(Leak { kind, what });
    let pool = AddressPool::parse(&scope.pool).ok();
    let in_pool = |addr: Ipv4Addr| {
        pool.is_some_and(|p| {
            let (net, len) = p.network();
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(addr) & mask == u32::from(net)
        })
    };
    let data_dir = scope.data_dir.display().to_string();

    for p in &host.processes {
        // The control plane itself (`airlock up --data-dir …`) is no leak.
        let control_plane = p
            .args
            .first()
            .is_some_and(|a| a.rsplit('/').next() == Some("airlock"));
        if scope.ignore_pids.contains(&p.pid) || p.pid == std::process::id() || control_plane {
            continue;
        }
        if p.args.iter().any(|a| a.contains(&data_dir)) {
            leak("process", format!("{p} names the data dir"));
        }
        if let Some(base) = scope
            .uid_bases
            .iter()
            .find(|b| p.uid >= **b && p.uid - **b < UID_RANGE)
        {
            leak(
                "process",
                format!("{p} runs as uid {} of the range at {base}", p.uid),
            );
        }
    }

    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        if let Some(point) = line.split_whitespace().nth(1) {
            let point = unescape_mount(point);
            if under(&point, &data_dir) {
                leak("mount", point);
            }
        }
    }
    for name in dir_names(Path::new("/sys/block")) {
        let backing = Path::new("/sys/block")
            .join(&name)
            .join("loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(&backing) {
            let file = file.trim();
            if under(file, &data_dir) {
                leak("loop", format!("/dev/{name} backed by {file}"));
            }
        }
    }
    let registry = Path::new(airlock_drivers::userns::DEFAULT_REGISTRY);
    for name in dir_names(registry) {
        if let Ok(holder) = std::fs::read_to_string(registry.join(&name)) {
            if under(&holder, &data_dir) {
                leak("uid range", format!("{name} held for {holder}"));
            }
        }
    }

    let addrs = run("ip", &["-o", "-4", "addr", "show"]);
    for line in addrs.lines() {
        let mut words = line.split_whitespace();
        let ifname = words.nth(1).unwrap_or("");
        if let Some(cidr) = words.skip_while(|w| *w != "inet").nth(1) {
            let addr = cidr.split('/').next().and_then(|a| a.parse().ok());
            if addr.is_some_and(in_pool) {
                leak("address", format!("{cidr} on {ifname}"));
            }
        }
    }
    for (addr, port) in tcp_listeners() {
        if in_pool(addr) {
            leak(
                "listener",
                format!("TCP {addr}:{port} (a forwarder on a pool address)"),
            );
        }
    }
    for line in host.nft.lines().map(str::trim) {
        let pooled = line
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter_map(|w| w.parse::<Ipv4Addr>().ok())
            .any(in_pool);
        if pooled {
            leak("nftables", format!("rule for the pool: {line:?}"));
        }
    }
    out
}

/// The host's listening TCP sockets (IPv4), from `/proc/net/tcp`: the
/// control plane's per-sandbox forwarders listen on the gateway address.
fn tcp_listeners() -> Vec<(Ipv4Addr, u16)> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines().skip(1).filter_map(parse_listener).collect()
}

/// One line of `/proc/net/tcp` if it is a listener: `sl local rem st …`,
/// the address as the kernel's 32-bit word in hex, the port in hex.
fn parse_listener(line: &str) -> Option<(Ipv4Addr, u16)> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if state != "0A" {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let word = u32::from_str_radix(ip, 16).ok()?;
    Some((
        Ipv4Addr::from(word.to_le_bytes()),
        u16::from_str_radix(port, 16).ok()?,
    ))
}

/// A process, as reported.
#[derive(Debug, Clone)]
struct Process {
    pid: u32,
    uid: u32,
    args: Vec<String>,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("?");
        write!(f, "pid {} ({name})", self.pid)
    }
}

fn processes() -> Vec<Process> {
    let mut out = Vec::new();
    for name in dir_names(Path::new("/proc")) {
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        let base = Path::new("/proc").join(&name);
        let Ok(cmdline) = std::fs::read(base.join("cmdline")) else {
            continue;
        };
        let uid = std::fs::read_to_string(base.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push(Process { pid, uid, args });
    }
    out
}

/// The sandbox's cgroups that still exist, in every hierarchy (the nspawn
/// driver's `airlock/<id>`, and a systemd machine scope should one be made).
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![root.to_path_buf()];
    hierarchies.extend(dir_names(root).into_iter().map(|h| root.join(h)));
    let scope = format!("machine-airlock\\x2d{id}.scope");
    let mut out = Vec::new();
    for h in hierarchies {
        for dir in [
            h.join("airlock").join(id),
            h.join("machine.slice").join(&scope),
        ] {
            if dir.is_dir() {
                out.push(dir);
            }
        }
    }
    out
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in dir_names(dir) {
        let path = dir.join(sub);
        if path.is_dir() {
            out.extend(cgroup_pids(&path));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The command's stdout, empty when it fails (no table yet, say).
fn run(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether `path` is `dir` or below it.
fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    !dir.is_empty()
        && path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `needle` in `hay` not followed or preceded by more of a name
/// (`al0123` must not match `al01234`).
fn contains_word(hay: &str, needle: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-';
    hay.match_indices(needle).any(|(at, _)| {
        let before = hay[..at].chars().next_back();
        let after = hay[at + needle.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_whole() {
        assert!(contains_word("chain al0123456789ab_in {", "al0123456789ab"));
        assert!(contains_word("\"al0123456789ab\" : jump", "al0123456789ab"));
        assert!(!contains_word("al0123456789abc", "al0123456789ab"));
        assert!(!contains_word("xal0123", "al0123"));
        assert!(contains_word("--machine=airlock-abc", "airlock-abc"));
        assert!(!contains_word("--machine=airlock-abcd", "airlock-abc"));
    }

    #[test]
    fn paths_under_a_dir() {
        assert!(under("/var/tmp/x/sandboxes/a/merged", "/var/tmp/x"));
        assert!(under("/var/tmp/x", "/var/tmp/x/"));
        assert!(!under("/var/tmp/xy/sandboxes", "/var/tmp/x"));
        assert!(!under("/anything", ""));
    }

    #[test]
    fn listeners_are_read_from_proc_net_tcp() {
        let line = "   3: 0DC8F50A:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0";
        assert_eq!(
            parse_listener(line),
            Some((Ipv4Addr::new(10, 245, 200, 13), 3128))
        );
        let established = line.replace(" 0A ", " 01 ");
        assert_eq!(parse_listener(&established), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mount(r"/a\\b"), r"/a\\b");
    }

    /// A directory nothing ever used leaks nothing; one holding a sandbox's
    /// directory, mount point and uid range is reported for each.
    #[tokio::test]
    async fn reports_what_it_finds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let scope = Scope::new(tmp.path(), "10.245.250.0/24");
        assert_eq!(check(&scope).await, Vec::new());
        let dir = tmp.path().join("sandboxes/abc123");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("sandbox.json"), r#"{"uid_base": 1879048192}"#).expect("write");
        assert_eq!(uid_base(tmp.path(), "abc123"), Some(0x7000_0000));
        let found = check(&scope).await;
        assert_eq!(
            found,
            vec![Leak {
                kind: "directory",
                what: dir.display().to_string()
            }]
        );
    }
}
