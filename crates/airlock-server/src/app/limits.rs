//! The host's kernel limits that cap how many sandboxes fit, besides memory
//! and disk (admission): tasks, open files, inotify, keys. `airlock doctor`
//! reports each with the room it leaves; a create that would cross a
//! host-wide one whose use can be read (tasks, open files) is refused with
//! its name, instead of a guest that dies while booting.
//!
//! Per-user limits (inotify instances and watches, keys) count per host uid:
//! with user namespaces (`user_namespaces = true`, the default) every
//! sandbox runs as its own uid range, so they cap one sandbox, not the host.
//! Without them every sandbox's systemd runs as host root, and
//! `fs.inotify.max_user_instances` (128 by default) stopped the 30th desktop.

/// What one idle browser sandbox holds, measured on this project's image
/// (docs/performance.md, "Density"), rounded up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub tasks: u64,
    pub files: u64,
    pub inotify_instances: u64,
    pub inotify_watches: u64,
}

impl Cost {
    pub const IDLE_BROWSER: Cost = Cost {
        tasks: 160,
        files: 700,
        inotify_instances: 10,
        inotify_watches: 40,
    };
}

/// One limit as read from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The sysctl, as `sysctl` names it.
    pub name: &'static str,
    pub limit: u64,
    /// What is in use host-wide, when the kernel says (per-user limits: no).
    pub used: Option<u64>,
    /// What one sandbox takes of it.
    pub per_sandbox: u64,
    /// Counted per host uid (so per sandbox under user namespaces).
    pub per_user: bool,
}

impl Reading {
    /// Sandboxes that still fit under this limit (host-wide ones), or fit at
    /// all (per-user ones).
    pub fn room(&self) -> u64 {
        let free = self.limit.saturating_sub(self.used.unwrap_or(0));
        free / self.per_sandbox.max(1)
    }
}

fn sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Tasks (threads) alive on the host: the fourth field of `/proc/loadavg`
/// is `running/total`.
fn tasks_in_use(loadavg: &str) -> Option<u64> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// `/proc/sys/fs/file-nr`: allocated, free, max.
fn files_in_use(file_nr: &str) -> Option<u64> {
    let mut f = file_nr.split_whitespace();
    let allocated: u64 = f.next()?.parse().ok()?;
    let free: u64 = f.next()?.parse().ok()?;
    Some(allocated.saturating_sub(free))
}

/// This host's limits, each with what one sandbox takes (`cost`).
pub fn read(cost: &Cost) -> Vec<Reading> {
    let tasks = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| tasks_in_use(&l));
    let files = std::fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()
        .and_then(|l| files_in_use(&l));
    let mut out = Vec::new();
    let mut add = |name, path: &str, used, per_sandbox, per_user| {
        if let Some(limit) = sysctl(path) {
            out.push(Reading {
                name,
                limit,
                used,
                per_sandbox,
                per_user,
            });
        }
    };
    add(
        "kernel.threads-max",
        "/proc/sys/kernel/threads-max",
        tasks,
        cost.tasks,
        false,
    );
    add(
        "kernel.pid_max",
        "/proc/sys/kernel/pid_max",
        tasks,
        cost.tasks,
        false,
    );
    add(
        "fs.file-max",
        "/proc/sys/fs/file-max",
        files,
        cost.files,
        false,
    );
    add(
        "fs.inotify.max_user_instances",
        "/proc/sys/fs/inotify/max_user_instances",
        None,
        cost.inotify_instances,
        true,
    );
    add(
        "fs.inotify.max_user_watches",
        "/proc/sys/fs/inotify/max_user_watches",
        None,
        cost.inotify_watches,
        true,
    );
    add(
        "kernel.keys.maxkeys",
        "/proc/sys/kernel/keys/maxkeys",
        None,
        1,
        true,
    );
    out
}

/// Why one more sandbox would cross a host-wide limit, naming it; `None`
/// when every limit whose use is known has room.
pub fn crossing(readings: &[Reading]) -> Option<String> {
    readings
        .iter()
        .find(|r| !r.per_user && r.used.is_some() && r.room() == 0)
        .map(|r| {
            format!(
                "the host is at its {} limit ({} of {} in use; a sandbox needs about {}): \
                 raise it (sysctl -w {}=…) or delete sandboxes",
                r.name,
                r.used.unwrap_or(0),
                r.limit,
                r.per_sandbox,
                r.name
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(name: &'static str, limit: u64, used: Option<u64>, per_user: bool) -> Reading {
        Reading {
            name,
            limit,
            used,
            per_sandbox: 100,
            per_user,
        }
    }

    #[test]
    fn kernel_counters_are_parsed() {
        assert_eq!(tasks_in_use("0.52 0.58 0.59 3/1234 5678\n"), Some(1234));
        assert_eq!(tasks_in_use("garbage"), None);
        assert_eq!(files_in_use("9824\t0\t9223372036854775807\n"), Some(9824));
        assert_eq!(files_in_use("100 40 1000"), Some(60));
    }

    #[test]
    fn a_create_past_a_host_wide_limit_is_refused_by_name() {
        let ok = [
            reading("kernel.threads-max", 1000, Some(800), false),
            // Per-user: never refuses (its use is not known host-wide).
            reading("fs.inotify.max_user_instances", 10, None, true),
        ];
        assert_eq!(crossing(&ok), None);
        assert_eq!(ok[0].room(), 2);
        let full = [reading("kernel.threads-max", 1000, Some(950), false)];
        let why = crossing(&full).expect("refused");
        assert!(why.contains("kernel.threads-max"), "{why}");
        assert!(why.contains("950 of 1000"), "{why}");
    }

    #[test]
    fn this_hosts_limits_are_read() {
        let r = read(&Cost::IDLE_BROWSER);
        assert!(r.iter().any(|r| r.name == "kernel.pid_max" && r.limit > 0));
        assert!(r
            .iter()
            .any(|r| r.name == "fs.file-max" && r.used.is_some()));
    }
}
