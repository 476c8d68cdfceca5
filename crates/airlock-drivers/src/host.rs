//! Host operations the drivers need (run a command, start a detached process,
//! signal it, look at /proc), behind [`Host`] so driver logic can run against
//! [`FakeHost`] in unit tests and against the real host in integration tests.

use async_trait::async_trait;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A process held by identity rather than by a bare pid, which the kernel
/// reuses: on the real host a pidfd, opened before the pid could be freed
/// (at spawn) or checked against the process's start time (after a restart).
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    /// When it started, in clock ticks after boot (`/proc/<pid>/stat`, field
    /// 22): with the pid, what names the process across control-plane restarts.
    pub started: u64,
    fd: Option<OwnedFd>,
}

impl Process {
    /// A process of a fake host, known by its pid and start time alone.
    pub fn fake(pid: u32, started: u64) -> Self {
        Process {
            pid,
            started,
            fd: None,
        }
    }
}

/// A command line, kept as data so it can be logged, compared and faked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
}

impl Cmd {
    pub fn new(program: &str) -> Self {
        Cmd {
            program: program.to_owned(),
            args: Vec::new(),
        }
    }
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.program)?;
        for arg in &self.args {
            write!(f, " {arg}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not run `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl HostError {
    /// The command's stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            HostError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

#[async_trait]
pub trait Host: Send + Sync + std::fmt::Debug + 'static {
    /// Run to completion; non-zero exit is an error carrying stderr.
    async fn run(&self, cmd: &Cmd) -> Result<String, HostError>;
    /// Start a process in its own process group that outlives the caller, with
    /// stdout and stderr appended to `log`. Returns it held (see [`Process`]).
    async fn spawn_detached(&self, cmd: &Cmd, log: &Path) -> Result<Process, HostError>;
    fn signal(&self, pid: u32, signal: i32) -> Result<(), HostError>;
    /// Hold the process `pid`, if it is alive and, when `started` is given,
    /// it is the one that started then (not a later owner of a reused pid).
    fn hold(&self, pid: u32, started: Option<u64>) -> Option<Process>;
    /// Whether a held process has exited. Never blocks.
    fn has_exited(&self, process: &Process) -> bool;
    /// Signal a held process; one that has exited is not signalled (its pid
    /// may be someone else's by now).
    fn signal_process(&self, process: &Process, signal: i32) -> Result<(), HostError>;
    /// The pid namespace a process is in (the inode of `/proc/<pid>/ns/pid`).
    fn pid_namespace(&self, pid: u32) -> Option<u64>;
    /// Give a file to another owner.
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), HostError>;
    /// The process's command line (NUL-separated arguments joined by spaces;
    /// empty while it is in the middle of exec), or `None` if there is no such
    /// process (or it is a zombie).
    fn cmdline(&self, pid: u32) -> Option<String>;
    /// Direct children of a process.
    fn children(&self, pid: u32) -> Vec<u32>;
    /// Bind `src` onto `dst`, read-only, as an idmapped mount: through it, a file that
    /// belongs to uid (and gid) `k` on disk shows as `base + k`, for `k` below
    /// `count`. How a user namespace sees a shared read-only tree as its own
    /// without one byte of it being copied or chowned.
    fn idmapped_bind(
        &self,
        src: &Path,
        dst: &Path,
        base: u32,
        count: u32,
    ) -> Result<(), HostError> {
        let _ = (base, count);
        Err(HostError::Io {
            what: format!("idmapped bind of {} on {}", src.display(), dst.display()),
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        })
    }
}

/// The real host.
#[derive(Debug, Default)]
pub struct RealHost;

#[async_trait]
impl Host for RealHost {
    async fn run(&self, cmd: &Cmd) -> Result<String, HostError> {
        let output = tokio::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| HostError::Spawn {
                cmd: cmd.to_string(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(HostError::Failed {
                cmd: cmd.to_string(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    async fn spawn_detached(&self, cmd: &Cmd, log: &Path) -> Result<Process, HostError> {
        use std::os::unix::process::CommandExt;
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| HostError::Io {
                    what: format!("open {}", log.display()),
                    source,
                })
        };
        let (stdout, stderr) = (open_log()?, open_log()?);
        let child = std::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group: a Ctrl-C or kill of the control plane's
            // group must not take running sandboxes down with it.
            .process_group(0)
            .spawn()
            .map_err(|source| HostError::Spawn {
                cmd: cmd.to_string(),
                source,
            })?;
        let pid = child.id();
        // Held before the reaper below can free the pid: until it is reaped,
        // the pid is this child's, even if it has exited already.
        let process = pidfd(pid).map(|fd| Process {
            pid,
            started: start_time(pid).unwrap_or(0),
            fd: Some(fd),
        });
        // Reap it when it exits so it never lingers as a zombie while we live.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        // `spawn` returns once exec has begun, but the new program's command
        // line reads empty until exec has finished: a caller that checks the
        // process by its command line right away would think it gone. Return
        // once it shows (or the process is gone), within a bound.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.cmdline(pid).is_some_and(|c| c.is_empty())
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        process.map_err(|source| HostError::Io {
            what: format!("open a pidfd for {} (pid {pid})", cmd.program),
            source,
        })
    }

    fn hold(&self, pid: u32, started: Option<u64>) -> Option<Process> {
        // The pidfd first, then the start time: if the process at `pid` at
        // the second step started when expected, it was there all along,
        // so the pidfd is of it.
        let fd = pidfd(pid).ok()?;
        let now = start_time(pid)?;
        if started.is_some_and(|s| s != now) {
            return None;
        }
        let process = Process {
            pid,
            started: now,
            fd: Some(fd),
        };
        (!self.has_exited(&process)).then_some(process)
    }

    fn has_exited(&self, process: &Process) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        match &process.fd {
            // A pidfd polls readable once its process has exited.
            Some(fd) => {
                let mut fds = [PollFd::new(fd, PollFlags::IN)];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                match poll(&mut fds, Some(&zero)) {
                    Ok(n) => n > 0,
                    Err(_) => start_time(process.pid) != Some(process.started),
                }
            }
            None => start_time(process.pid) != Some(process.started),
        }
    }

    fn signal_process(&self, process: &Process, signal: i32) -> Result<(), HostError> {
        let io = |source| HostError::Io {
            what: format!("signal {signal} to pid {}", process.pid),
            source,
        };
        match (&process.fd, rustix::process::Signal::from_named_raw(signal)) {
            (Some(fd), Some(sig)) => match rustix::process::pidfd_send_signal(fd, sig) {
                Ok(()) => Ok(()),
                // Gone already: nothing to signal.
                Err(rustix::io::Errno::SRCH) => Ok(()),
                Err(e) => Err(io(e.into())),
            },
            _ if self.has_exited(process) => Ok(()),
            _ => self.signal(process.pid, signal),
        }
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), HostError> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| HostError::Io {
            what: format!("chown {uid}:{gid} {}", path.display()),
            source,
        })
    }

    fn pid_namespace(&self, pid: u32) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}/ns/pid"))
            .ok()
            .map(|m| m.ino())
    }

    fn signal(&self, pid: u32, signal: i32) -> Result<(), HostError> {
        let pid = i32::try_from(pid).map_err(|_| HostError::Io {
            what: format!("pid {pid} out of range"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: kill(2) takes two integers and touches none of our memory.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(HostError::Io {
                what: format!("kill({pid}, {signal})"),
                source: std::io::Error::last_os_error(),
            })
        }
    }

    fn cmdline(&self, pid: u32) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 3 (after the parenthesised comm) is the state; Z is a zombie.
        let state = status.rsplit_once(')')?.1.split_whitespace().next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        // Mid-exec the command line can be unreadable or empty for a moment:
        // the process is alive all the same.
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let parts: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        Some(parts.join(" "))
    }

    fn children(&self, pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for task in tasks.flatten() {
            let path: PathBuf = task.path().join("children");
            if let Ok(text) = std::fs::read_to_string(path) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|s| s.parse::<u32>().ok()),
                );
            }
        }
        out
    }

    fn idmapped_bind(
        &self,
        src: &Path,
        dst: &Path,
        base: u32,
        count: u32,
    ) -> Result<(), HostError> {
        idmap::bind(src, dst, base, count).map_err(|source| HostError::Io {
            what: format!(
                "idmapped bind of {} on {} (ids from {base})",
                src.display(),
                dst.display()
            ),
            source,
        })
    }
}

fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// When process `pid` started (clock ticks after boot), or `None` if there
/// is no such process or it is a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised comm (which may hold spaces): field 3 is the
    // state, field 22 the start time.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Idmapped mounts (Linux 5.12+): the mapping comes from a user namespace,
/// which needs a process to live in it for a moment.
mod idmap {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    use std::path::Path;

    // From <linux/mount.h>; not every libc release names them.
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;

    /// `struct mount_attr` (version 0, 32 bytes).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }

    fn c_path(path: &Path) -> std::io::Result<CString> {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    }

    /// A user namespace mapping ids `0..count` to `base..base+count`.
    fn user_namespace(base: u32, count: u32) -> std::io::Result<OwnedFd> {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: unshare(2) between fork and exec touches no memory of ours
        // and allocates nothing.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd.spawn()?;
        let map = format!("0 {base} {count}\n");
        let result = (|| {
            let proc = format!("/proc/{}", child.id());
            std::fs::write(format!("{proc}/uid_map"), &map)?;
            std::fs::write(format!("{proc}/gid_map"), &map)?;
            let ns = std::fs::File::open(format!("{proc}/ns/user"))?;
            Ok(OwnedFd::from(ns))
        })();
        let _ = child.kill();
        let _ = child.wait();
        result
    }

    pub(super) fn bind(src: &Path, dst: &Path, base: u32, count: u32) -> std::io::Result<()> {
        let userns = user_namespace(base, count)?;
        let (src, dst) = (c_path(src)?, c_path(dst)?);
        // SAFETY: the three calls get valid NUL-terminated paths, a struct of
        // the size passed, and descriptors we own; none keeps a pointer.
        #[allow(unsafe_code)]
        unsafe {
            let fd = libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let tree = OwnedFd::from_raw_fd(fd as i32);
            let attr = MountAttr {
                attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
                attr_clr: 0,
                propagation: 0,
                userns_fd: userns.as_raw_fd() as u64,
            };
            let empty = c"";
            if libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// A recording fake: commands succeed (unless told to fail) and are kept in order.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub ran: Mutex<Vec<Cmd>>,
    /// A command whose display string contains one of these fails.
    pub fail_when: Mutex<Vec<String>>,
    pub signals: Mutex<Vec<(u32, i32)>>,
    pub alive: Mutex<std::collections::BTreeMap<u32, String>>,
    /// Start times of the processes in `alive` (0 when not set).
    pub started: Mutex<std::collections::BTreeMap<u32, u64>>,
    /// Children of a process, each in a pid namespace of its own.
    pub kids: Mutex<std::collections::BTreeMap<u32, Vec<u32>>>,
    next_pid: Mutex<u32>,
}

impl FakeHost {
    pub fn commands(&self) -> Vec<String> {
        self.ran
            .lock()
            .map(|r| r.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }
    pub fn fail_on(&self, needle: &str) {
        if let Ok(mut f) = self.fail_when.lock() {
            f.push(needle.to_owned());
        }
    }
    /// Pretend process `pid` ended and another started with the same pid:
    /// same command line, a later start time.
    pub fn reuse_pid(&self, pid: u32) {
        if let Ok(mut started) = self.started.lock() {
            *started.entry(pid).or_default() += 1_000;
        }
    }
    /// A child of `parent`, alive, in a pid namespace of its own.
    pub fn add_child(&self, parent: u32, pid: u32, cmdline: &str) {
        if let Ok(mut alive) = self.alive.lock() {
            alive.insert(pid, cmdline.to_owned());
        }
        if let Ok(mut kids) = self.kids.lock() {
            kids.entry(parent).or_default().push(pid);
        }
    }
    fn start_of(&self, pid: u32) -> u64 {
        self.started
            .lock()
            .map(|s| s.get(&pid).copied().unwrap_or(0))
            .unwrap_or(0)
    }
    fn check(&self, cmd: &Cmd) -> Result<(), HostError> {
        if let Ok(mut ran) = self.ran.lock() {
            ran.push(cmd.clone());
        }
        let line = cmd.to_string();
        let fails = self
            .fail_when
            .lock()
            .map(|f| f.iter().any(|n| line.contains(n)))
            .unwrap_or(false);
        if fails {
            return Err(HostError::Failed {
                cmd: line,
                status: "exit status: 1".into(),
                stderr: "fake failure".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Host for FakeHost {
    async fn run(&self, cmd: &Cmd) -> Result<String, HostError> {
        self.check(cmd).map(|()| String::new())
    }
    async fn spawn_detached(&self, cmd: &Cmd, _log: &Path) -> Result<Process, HostError> {
        self.check(cmd)?;
        let mut next = self.next_pid.lock().map_err(|_| HostError::Io {
            what: "fake pid lock".into(),
            source: std::io::Error::other("poisoned"),
        })?;
        *next += 1;
        let pid = 10_000 + *next;
        if let Ok(mut alive) = self.alive.lock() {
            alive.insert(pid, cmd.to_string());
        }
        Ok(Process::fake(pid, self.start_of(pid)))
    }
    fn signal(&self, pid: u32, signal: i32) -> Result<(), HostError> {
        if let Ok(mut s) = self.signals.lock() {
            s.push((pid, signal));
        }
        if signal == libc::SIGKILL || signal == libc::SIGTERM {
            if let Ok(mut alive) = self.alive.lock() {
                alive.remove(&pid);
            }
        }
        Ok(())
    }
    fn cmdline(&self, pid: u32) -> Option<String> {
        self.alive.lock().ok()?.get(&pid).cloned()
    }
    fn children(&self, pid: u32) -> Vec<u32> {
        self.kids
            .lock()
            .map(|k| k.get(&pid).cloned().unwrap_or_default())
            .unwrap_or_default()
    }
    fn hold(&self, pid: u32, started: Option<u64>) -> Option<Process> {
        self.cmdline(pid)?;
        let now = self.start_of(pid);
        if started.is_some_and(|s| s != now) {
            return None;
        }
        Some(Process::fake(pid, now))
    }
    fn has_exited(&self, process: &Process) -> bool {
        self.cmdline(process.pid).is_none() || self.start_of(process.pid) != process.started
    }
    fn signal_process(&self, process: &Process, signal: i32) -> Result<(), HostError> {
        if self.has_exited(process) {
            return Ok(());
        }
        self.signal(process.pid, signal)
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), HostError> {
        self.check(&Cmd::new("chown").args([format!("{uid}:{gid}"), path.display().to_string()]))
    }
    fn pid_namespace(&self, pid: u32) -> Option<u64> {
        self.cmdline(pid)?;
        let is_child = self
            .kids
            .lock()
            .map(|k| k.values().any(|v| v.contains(&pid)))
            .unwrap_or(false);
        Some(if is_child { u64::from(pid) } else { 1 })
    }
    fn idmapped_bind(
        &self,
        src: &Path,
        dst: &Path,
        base: u32,
        count: u32,
    ) -> Result<(), HostError> {
        let cmd = Cmd::new("idmapped-bind").args([
            src.display().to_string(),
            dst.display().to_string(),
            format!("{base}:{count}"),
        ]);
        self.check(&cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detached process is found by its command line the moment
    /// `spawn_detached` returns (the VM drivers check it right away).
    #[tokio::test]
    async fn a_spawned_process_shows_its_command_line_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = RealHost;
        let mut pids = Vec::new();
        for i in 0..40 {
            let marker = format!("{}", 3000 + i);
            let pid = host
                .spawn_detached(
                    &Cmd::new("sleep").args([marker.clone()]),
                    &dir.path().join("log"),
                )
                .await
                .expect("spawn")
                .pid;
            pids.push(pid);
            let cmdline = host.cmdline(pid).expect("alive");
            assert!(cmdline.contains(&marker), "pid {pid}: {cmdline:?}");
        }
        for pid in pids {
            let _ = host.signal(pid, libc::SIGKILL);
        }
    }

    /// A process is held by pidfd: its exit shows at once, its pid held
    /// again with the right start time is it, with another is not.
    #[tokio::test]
    async fn a_held_process_is_known_by_its_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = RealHost;
        let p = host
            .spawn_detached(&Cmd::new("sleep").arg("300"), &dir.path().join("log"))
            .await
            .expect("spawn");
        assert!(p.started > 0);
        assert!(!host.has_exited(&p));
        let again = host.hold(p.pid, Some(p.started)).expect("same process");
        assert!(
            host.hold(p.pid, Some(p.started + 1)).is_none(),
            "not a reused pid"
        );
        host.signal_process(&p, libc::SIGKILL).expect("kill");
        let started = std::time::Instant::now();
        while !host.has_exited(&again) {
            assert!(started.elapsed() < std::time::Duration::from_secs(2));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(host.hold(p.pid, Some(p.started)).is_none());
        host.signal_process(&p, libc::SIGKILL)
            .expect("an exited one is not signalled");
    }
}
