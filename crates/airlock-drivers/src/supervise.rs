//! What the three drivers share of a sandbox's life around its supervisor
//! process (systemd-nspawn, QEMU, Firecracker): starting it and holding it
//! by identity, finding it again after a control-plane restart, liveness,
//! waiting for the guest's agent, stopping (ask, grace, then kill), inspect,
//! list, and create-then-roll-back.
//!
//! The supervisor is held as a [`Process`] (a pidfd on the real host) from
//! the moment it is spawned. Its pid file (`<root>/<id>/<pidfile>`) records
//! `pid start-time`, so a restarted control plane holds the same process
//! again and never a later owner of a reused pid. A pid file with no start
//! time (written by an older release) is matched by a marker in the
//! process's command line instead.

use crate::host::{Cmd, Host, Process};
use crate::{files, DriverError, Endpoints, InstanceInfo, Liveness};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a supervisor may take to exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Supervisor {
    /// The process as a reason names it ("systemd-nspawn", "qemu").
    what: &'static str,
    root: PathBuf,
    pidfile: &'static str,
    /// A string on the supervisor's command line that names the sandbox.
    marker: fn(&str) -> String,
    host: Arc<dyn Host>,
    held: Mutex<HashMap<String, Arc<Process>>>,
}

/// What a pid file says.
fn read_pidfile(path: &Path) -> Option<(u32, Option<u64>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut words = text.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    Some((pid, words.next().and_then(|w| w.parse().ok())))
}

impl Supervisor {
    pub fn new(
        what: &'static str,
        root: PathBuf,
        pidfile: &'static str,
        marker: fn(&str) -> String,
        host: Arc<dyn Host>,
    ) -> Self {
        Supervisor {
            what,
            root,
            pidfile,
            marker,
            host,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub fn what(&self) -> &'static str {
        self.what
    }

    pub fn pidfile(&self, id: &str) -> PathBuf {
        self.root.join(id).join(self.pidfile)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        // The map holds no invariant a panic elsewhere could break.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start the supervisor of `id`, hold it, and record it in its pid file.
    pub async fn spawn(
        &self,
        id: &str,
        cmd: &Cmd,
        log: &Path,
    ) -> Result<Arc<Process>, DriverError> {
        let process =
            self.host
                .spawn_detached(cmd, log)
                .await
                .map_err(|source| DriverError::Host {
                    context: format!("start {}", self.what),
                    source,
                })?;
        let process = Arc::new(process);
        let path = self.pidfile(id);
        if let Err(e) = std::fs::write(&path, format!("{} {}\n", process.pid, process.started)) {
            let _ = self.host.signal_process(&process, libc::SIGKILL);
            return Err(files::io_err(format!("write {}", path.display()))(e));
        }
        self.held().insert(id.to_owned(), process.clone());
        Ok(process)
    }

    /// The supervisor of `id` while it runs: the one held, or after a
    /// restart the one its pid file names.
    pub fn find(&self, id: &str) -> Option<Arc<Process>> {
        let held = self.held().get(id).cloned();
        if let Some(p) = held {
            if !self.host.has_exited(&p) {
                return Some(p);
            }
            self.held().remove(id);
            return None;
        }
        let (pid, started) = read_pidfile(&self.pidfile(id))?;
        if started.is_none() {
            let marker = (self.marker)(id);
            if !self.host.cmdline(pid)?.contains(&marker) {
                return None;
            }
        }
        let process = Arc::new(self.host.hold(pid, started)?);
        self.held().insert(id.to_owned(), process.clone());
        Some(process)
    }

    pub fn pid(&self, id: &str) -> Option<u32> {
        self.find(id).map(|p| p.pid)
    }

    /// Whether the supervisor of a started sandbox runs. Cheap: a poll of a
    /// pidfd (a few reads of /proc the first time after a restart).
    pub fn liveness(&self, id: &str) -> Liveness {
        if self.find(id).is_some() {
            return Liveness::Alive;
        }
        Liveness::Dead(match read_pidfile(&self.pidfile(id)) {
            Some((pid, _)) => format!("{} (pid {pid}) exited", self.what),
            None => format!("{} is not running (it was never started)", self.what),
        })
    }

    /// Stop holding `id`'s supervisor (it is gone, or the sandbox is).
    pub fn forget(&self, id: &str) {
        self.held().remove(id);
    }

    pub async fn wait_exit(&self, process: &Process, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.host.has_exited(process) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.host.has_exited(process)
    }

    /// SIGKILL the supervisor and wait for it to go.
    pub async fn kill(&self, id: &str, process: &Process) -> Result<(), DriverError> {
        let _ = self.host.signal_process(process, libc::SIGKILL);
        if self.wait_exit(process, KILL_WAIT).await {
            self.forget(id);
            Ok(())
        } else {
            Err(DriverError::Transient(format!(
                "{} (pid {}) did not exit after SIGKILL",
                self.what, process.pid
            )))
        }
    }

    /// Ask the guest to power off (`ask` says whether the request got
    /// through), give it `grace`, then kill the supervisor. Nothing running
    /// is success.
    pub async fn stop<F>(
        &self,
        id: &str,
        grace: Duration,
        ask: impl FnOnce(Arc<Process>) -> F,
    ) -> Result<(), DriverError>
    where
        F: Future<Output = bool>,
    {
        let Some(process) = self.find(id) else {
            self.forget(id);
            return Ok(());
        };
        if ask(process.clone()).await && self.wait_exit(&process, grace).await {
            self.forget(id);
            return Ok(());
        }
        self.kill(id, &process).await
    }

    /// Poll until the guest's agent port accepts a connection; the
    /// supervisor exiting meanwhile fails at once with `tail` (what the
    /// guest printed last).
    pub async fn wait_ready(
        &self,
        id: &str,
        endpoints: Endpoints,
        timeout: Duration,
        tail: impl Fn() -> String,
    ) -> Result<Endpoints, DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.find(id).is_none() {
                return Err(DriverError::GuestExited(tail()));
            }
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(endpoints.agent),
            )
            .await;
            if let Ok(Ok(_)) = attempt {
                return Ok(endpoints);
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn info(&self, id: &str) -> InstanceInfo {
        let pid = self.pid(id);
        InstanceInfo {
            id: id.to_owned(),
            running: pid.is_some(),
            pid,
        }
    }

    /// Every sandbox with a directory under the root, running or not.
    pub fn list(&self) -> Result<Vec<InstanceInfo>, DriverError> {
        Ok(files::sandbox_ids(&self.root)?
            .iter()
            .map(|id| self.info(id))
            .collect())
    }
}

/// Run a create's steps; if one fails, undo whatever was made (`undo` is a
/// driver's idempotent destroy) and return the step's error.
pub async fn or_roll_back(
    id: &str,
    steps: impl Future<Output = Result<(), DriverError>>,
    undo: impl Future<Output = Result<(), DriverError>>,
) -> Result<(), DriverError> {
    let Err(e) = steps.await else {
        return Ok(());
    };
    if let Err(undo_err) = undo.await {
        tracing::warn!(sandbox = id, error = %undo_err, "roll-back of a failed create left something behind");
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;

    fn supervisor(root: &Path, host: Arc<FakeHost>) -> Supervisor {
        Supervisor::new(
            "vmm",
            root.to_path_buf(),
            "vmm.pid",
            |id| format!("--id {id} "),
            host,
        )
    }

    #[tokio::test]
    async fn a_killed_supervisor_is_dead_by_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("s1")).expect("dir");
        let host = Arc::new(FakeHost::default());
        let s = supervisor(tmp.path(), host.clone());
        assert!(matches!(s.liveness("s1"), Liveness::Dead(why) if why.contains("never started")));
        let p = s
            .spawn(
                "s1",
                &Cmd::new("vmm").args(["--id", "s1", "x"]),
                &tmp.path().join("log"),
            )
            .await
            .expect("spawn");
        assert_eq!(s.liveness("s1"), Liveness::Alive);
        host.signal(p.pid, libc::SIGKILL).expect("kill");
        assert_eq!(
            s.liveness("s1"),
            Liveness::Dead(format!("vmm (pid {}) exited", p.pid))
        );
    }

    /// After a restart the supervisor is found again from its pid file, and
    /// a pid now owned by another process (a later start time) is not it.
    #[tokio::test]
    async fn a_restart_refinds_the_supervisor_but_not_a_reused_pid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("s1")).expect("dir");
        let host = Arc::new(FakeHost::default());
        let pid = supervisor(tmp.path(), host.clone())
            .spawn(
                "s1",
                &Cmd::new("vmm").args(["--id", "s1", "x"]),
                &tmp.path().join("log"),
            )
            .await
            .expect("spawn")
            .pid;
        let restarted = supervisor(tmp.path(), host.clone());
        assert_eq!(restarted.pid("s1"), Some(pid));
        assert_eq!(restarted.liveness("s1"), Liveness::Alive);
        let again = supervisor(tmp.path(), host.clone());
        host.reuse_pid(pid);
        assert_eq!(again.pid("s1"), None);
        assert!(matches!(again.liveness("s1"), Liveness::Dead(_)));
        // The one that held it before sees the change too.
        assert!(matches!(restarted.liveness("s1"), Liveness::Dead(_)));
    }

    /// A pid file of an older release (pid only) is trusted only while the
    /// command line names the sandbox.
    #[tokio::test]
    async fn an_old_pid_file_is_matched_by_command_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("s1")).expect("dir");
        let host = Arc::new(FakeHost::default());
        host.alive
            .lock()
            .expect("lock")
            .insert(77, "vmm --id s10 x".into());
        std::fs::write(tmp.path().join("s1/vmm.pid"), "77").expect("w");
        let s = supervisor(tmp.path(), host.clone());
        assert_eq!(s.pid("s1"), None);
        host.alive
            .lock()
            .expect("lock")
            .insert(77, "vmm --id s1 x".into());
        assert_eq!(s.pid("s1"), Some(77));
    }

    #[tokio::test]
    async fn stop_asks_then_kills() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("s1")).expect("dir");
        let host = Arc::new(FakeHost::default());
        let s = supervisor(tmp.path(), host.clone());
        let p = s
            .spawn(
                "s1",
                &Cmd::new("vmm").args(["--id", "s1", "x"]),
                &tmp.path().join("log"),
            )
            .await
            .expect("spawn");
        let started = Instant::now();
        s.stop("s1", Duration::from_millis(100), |_| async { true })
            .await
            .expect("stop");
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "grace given"
        );
        assert_eq!(
            host.signals.lock().expect("lock").as_slice(),
            &[(p.pid, libc::SIGKILL)]
        );
        assert_eq!(s.pid("s1"), None);
        s.stop("s1", Duration::from_secs(5), |_| async { true })
            .await
            .expect("stopping a stopped one is fine");
    }

    #[tokio::test]
    async fn a_failed_step_is_rolled_back_and_its_error_kept() {
        let undone = std::sync::atomic::AtomicBool::new(false);
        let err = or_roll_back(
            "s1",
            async { Err(DriverError::Other("step 3".into())) },
            async {
                undone.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(DriverError::Other("undo".into()))
            },
        )
        .await
        .expect_err("fails");
        assert_eq!(err.to_string(), "step 3");
        assert!(undone.load(std::sync::atomic::Ordering::SeqCst));
        or_roll_back("s1", async { Ok(()) }, async {
            panic!("no undo after success")
        })
        .await
        .expect("ok");
    }
}
