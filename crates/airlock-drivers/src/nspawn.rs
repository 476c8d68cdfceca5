//! The nspawn driver: the golden image booted with its own systemd under
//! `systemd-nspawn`, on a per-sandbox overlay (the image is never copied or
//! written), in its own network namespace, with the metadata bound read-only.
//!
//! On-disk state per sandbox, under `<root>/<id>/`, is what `list` and `destroy`
//! work from, so a restarted control plane can re-adopt or clean up:
//!
//! ```text
//! sandbox.json   what was created (image layers, lease, home volume)
//! meta/          metadata.json, bound at /run/airlock/meta (root-only)
//! upper/ work/   the overlay's writable layer, thrown away on destroy
//! merged/        the overlay mount the guest boots from
//! nspawn.pid     pid of the systemd-nspawn process once started
//! console.log    what the guest printed
//! ```

use crate::host::{Cmd, Host, HostError};
use crate::net::firewall;
use crate::net::link::{self, LinkNames};
use crate::{Driver, DriverError, Endpoints, ImageRef, InstanceInfo, Lease, Limits, SandboxSpec};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the driver records about a sandbox it created.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    kind: String,
    build_id: String,
    layers: Vec<PathBuf>,
    lease_index: u32,
    host_addr: Ipv4Addr,
    guest_addr: Ipv4Addr,
    prefix_len: u8,
    home_volume: Option<PathBuf>,
    memory_bytes: Option<u64>,
    max_pids: Option<u64>,
}

impl Record {
    fn lease(&self) -> Lease {
        Lease {
            index: self.lease_index,
            host: self.host_addr,
            guest: self.guest_addr,
            prefix_len: self.prefix_len,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NspawnConfig {
    /// Where per-sandbox state lives (`<data_dir>/sandboxes`).
    pub root: PathBuf,
    pub nspawn_bin: String,
    /// Uid and gid of the guest's desktop user, owner of a workspace home volume.
    pub guest_uid: u32,
    /// How long `destroy` waits for a clean poweroff before killing the guest.
    pub stop_grace: Duration,
    /// The cgroup filesystem; each sandbox gets its own cgroups below it.
    /// `None` only in unit tests against a fake host.
    pub cgroup_root: Option<PathBuf>,
}

impl NspawnConfig {
    pub fn new(root: PathBuf) -> Self {
        NspawnConfig {
            root,
            nspawn_bin: "systemd-nspawn".into(),
            guest_uid: 1000,
            stop_grace: Duration::from_secs(3),
            cgroup_root: Cgroups::detect(),
        }
    }
}

#[derive(Debug)]
pub struct NspawnDriver {
    cfg: NspawnConfig,
    host: Arc<dyn Host>,
}

fn host_err(context: impl Into<String>) -> impl FnOnce(HostError) -> DriverError {
    let context = context.into();
    move |source| DriverError::Host { context, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let what = what.into();
    move |source| DriverError::Host {
        context: what.clone(),
        source: HostError::Io { what, source },
    }
}

impl NspawnDriver {
    pub fn new(cfg: NspawnConfig, host: Arc<dyn Host>) -> Self {
        NspawnDriver { cfg, host }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join(id)
    }

    fn machine_name(id: &str) -> String {
        format!("airlock-{id}")
    }

    fn read_record(&self, id: &str) -> Result<Record, DriverError> {
        let path = self.dir(id).join("sandbox.json");
        let text =
            std::fs::read_to_string(&path).map_err(|_| DriverError::NotFound(id.to_owned()))?;
        serde_json::from_str(&text)
            .map_err(|e| DriverError::Other(format!("{}: {e}", path.display())))
    }

    /// The nspawn process, if it is still running for this sandbox.
    fn running_pid(&self, id: &str) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir(id).join("nspawn.pid")).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        let cmdline = self.host.cmdline(pid)?;
        let marker = format!("--machine={}", Self::machine_name(id));
        // An empty command line is a process in the middle of exec (our
        // wrapper shell becoming nspawn): still ours. The marker guards
        // against a reused pid after a restart.
        (cmdline.is_empty() || cmdline.contains(&marker)).then_some(pid)
    }

    fn nspawn_cmd(&self, id: &str, record: &Record) -> Cmd {
        let dir = self.dir(id);
        let names = LinkNames::for_sandbox(id);
        let mut cmd = Cmd::new(&self.cfg.nspawn_bin).args([
            "--quiet".to_owned(),
            "--boot".to_owned(),
            "--register=no".to_owned(),
            "--keep-unit".to_owned(),
            format!("--machine={}", Self::machine_name(id)),
            format!("--directory={}", dir.join("merged").display()),
            format!("--network-namespace-path={}", names.netns_path()),
            format!("--bind-ro={}:/run/airlock/meta", dir.join("meta").display()),
            "--console=passive".to_owned(),
        ]);
        if let Some(home) = &record.home_volume {
            cmd = cmd.arg(format!("--bind={}:/home/airlock", home.display()));
        }
        cmd
    }

    async fn mount_overlay(&self, dir: &Path, layers: &[PathBuf]) -> Result<(), DriverError> {
        let lower: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let merged = dir.join("merged").display().to_string();
        self.host
            .run(&Cmd::new("mount").args(["-t", "overlay", "overlay", "-o", &options, &merged]))
            .await
            .map_err(host_err("mount the sandbox's overlay"))?;
        Ok(())
    }

    async fn unmount_overlay(&self, dir: &Path) {
        let merged = dir.join("merged").display().to_string();
        if !is_mounted(&merged) {
            return;
        }
        if self
            .host
            .run(&Cmd::new("umount").arg(&merged))
            .await
            .is_err()
        {
            // Busy because a process still holds it open: detach it now, the
            // kernel frees it when the last user goes.
            let _ = self
                .host
                .run(&Cmd::new("umount").args(["-l", &merged]))
                .await;
        }
    }

    async fn create_steps(&self, spec: &SandboxSpec, record: &Record) -> Result<(), DriverError> {
        let dir = self.dir(&spec.id);
        for sub in ["upper", "work", "merged", "meta"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io_err(format!("create {}", dir.join(sub).display())))?;
        }
        // The upper layer's root becomes the guest's `/`.
        set_mode(&dir.join("upper"), 0o755)?;
        write_private(
            &dir.join("sandbox.json"),
            &serde_json::to_vec_pretty(record).unwrap_or_default(),
        )?;
        let metadata =
            serde_json::to_vec(&spec.metadata).map_err(|e| DriverError::Other(e.to_string()))?;
        write_private(&dir.join("meta").join("metadata.json"), &metadata)?;
        set_mode(&dir.join("meta"), 0o700)?;
        if let Some(home) = &spec.home_volume {
            prepare_home(home, self.cfg.guest_uid)?;
        }
        link::create(
            self.host.as_ref(),
            &LinkNames::for_sandbox(&spec.id),
            &spec.lease,
        )
        .await
        .map_err(host_err("create the sandbox's network link"))?;
        firewall::install(
            self.host.as_ref(),
            &LinkNames::for_sandbox(&spec.id),
            &spec.lease,
            spec.proxy_port,
        )
        .await
        .map_err(host_err("install the sandbox's firewall rules"))?;
        self.mount_overlay(&dir, &spec.image.layers).await?;
        if let Some(root) = &self.cfg.cgroup_root {
            Cgroups::create(root, &spec.id, &spec.limits).map_err(io_err(format!(
                "create the sandbox's cgroups under {}",
                root.display()
            )))?;
        }
        Ok(())
    }

    async fn wait_exit(&self, pid: u32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.host.cmdline(pid).is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.host.cmdline(pid).is_none()
    }

    async fn kill_cgroups(&self, id: &str) -> Result<(), DriverError> {
        let Some(root) = &self.cfg.cgroup_root else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = Cgroups::pids(root, id);
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Transient(format!(
                    "processes {pids:?} of sandbox {id} survived SIGKILL"
                )));
            }
            for pid in pids {
                let _ = self.host.signal(pid, libc::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn console_tail(&self, id: &str) -> String {
        let text = std::fs::read_to_string(self.dir(id).join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        if lines.is_empty() {
            return "it printed nothing".to_owned();
        }
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

#[async_trait]
impl Driver for NspawnDriver {
    fn name(&self) -> &'static str {
        "nspawn"
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<(), DriverError> {
        if spec.image.layers.is_empty() {
            return Err(DriverError::Other("the image has no layers".into()));
        }
        let record = Record {
            id: spec.id.clone(),
            kind: spec.kind.as_str().to_owned(),
            build_id: spec.image.build_id.clone(),
            layers: spec.image.layers.clone(),
            lease_index: spec.lease.index,
            host_addr: spec.lease.host,
            guest_addr: spec.lease.guest,
            prefix_len: spec.lease.prefix_len,
            home_volume: spec.home_volume.clone(),
            memory_bytes: spec.limits.memory_bytes,
            max_pids: spec.limits.max_pids,
        };
        if let Err(e) = self.create_steps(spec, &record).await {
            let _ = self.destroy(&spec.id).await;
            return Err(e);
        }
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        let record = self.read_record(id)?;
        if self.running_pid(id).is_some() {
            return Ok(());
        }
        let dir = self.dir(id);
        let mut cmd = self.nspawn_cmd(id, &record);
        if let Some(root) = &self.cfg.cgroup_root {
            cmd = Cgroups::wrap(cmd, &Cgroups::procs_files(root, id));
        }
        let pid = self
            .host
            .spawn_detached(&cmd, &dir.join("console.log"))
            .await
            .map_err(host_err("start systemd-nspawn"))?;
        std::fs::write(dir.join("nspawn.pid"), pid.to_string())
            .map_err(io_err("write nspawn.pid"))?;
        Ok(())
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Endpoints, DriverError> {
        let record = self.read_record(id)?;
        let endpoints = Endpoints::for_guest(record.guest_addr);
        let deadline = Instant::now() + timeout;
        loop {
            if self.running_pid(id).is_none() {
                return Err(DriverError::GuestExited(self.console_tail(id)));
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

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        if let Some(pid) = self.running_pid(id) {
            // nspawn turns SIGTERM into a clean poweroff request to the guest's systemd.
            let _ = self.host.signal(pid, libc::SIGTERM);
            if !self.wait_exit(pid, grace).await {
                // The guest ignored it (a unit holding its stop timeout): killing
                // the guest's init ends its whole PID namespace at once.
                for child in self.host.children(pid) {
                    let _ = self.host.signal(child, libc::SIGKILL);
                }
                let _ = self.host.signal(pid, libc::SIGKILL);
                if !self.wait_exit(pid, Duration::from_secs(5)).await {
                    return Err(DriverError::Transient(format!(
                        "systemd-nspawn (pid {pid}) did not exit after SIGKILL"
                    )));
                }
            }
        }
        // Whatever is left in the sandbox's cgroups (a guest whose nspawn died
        // first, a process that escaped) goes too.
        self.kill_cgroups(id).await
    }

    async fn destroy(&self, id: &str) -> Result<(), DriverError> {
        let dir = self.dir(id);
        self.stop(id, self.cfg.stop_grace).await?;
        self.unmount_overlay(&dir).await;
        firewall::remove(self.host.as_ref(), &LinkNames::for_sandbox(id)).await;
        link::destroy(self.host.as_ref(), &LinkNames::for_sandbox(id)).await;
        if let Some(root) = &self.cfg.cgroup_root {
            Cgroups::remove(root, id);
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
        }
    }

    async fn inspect(&self, id: &str) -> Result<InstanceInfo, DriverError> {
        self.read_record(id)?;
        let pid = self.running_pid(id);
        Ok(InstanceInfo {
            id: id.to_owned(),
            running: pid.is_some(),
            pid,
        })
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>, DriverError> {
        let entries = match std::fs::read_dir(&self.cfg.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("list {}", self.cfg.root.display()))(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let pid = self.running_pid(&id);
            out.push(InstanceInfo {
                id,
                running: pid.is_some(),
                pid,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

impl NspawnDriver {
    /// The image a sandbox was created from, as recorded at create time.
    pub fn image_of(&self, id: &str) -> Result<ImageRef, DriverError> {
        let record = self.read_record(id)?;
        Ok(ImageRef {
            build_id: record.build_id,
            layers: record.layers,
        })
    }

    /// The lease a sandbox holds, as recorded at create time.
    pub fn lease_of(&self, id: &str) -> Result<Lease, DriverError> {
        Ok(self.read_record(id)?.lease())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DriverError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("write {}", path.display())))?;
    file.write_all(bytes)
        .map_err(io_err(format!("write {}", path.display())))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

fn prepare_home(home: &Path, uid: u32) -> Result<(), DriverError> {
    if !home.exists() {
        std::fs::create_dir_all(home).map_err(io_err(format!("create {}", home.display())))?;
        std::os::unix::fs::chown(home, Some(uid), Some(uid))
            .map_err(io_err(format!("chown {}", home.display())))?;
        set_mode(home, 0o750)?;
    }
    Ok(())
}

fn is_mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

/// Each sandbox's own cgroups. Not optional: with `--keep-unit` and no systemd
/// on the host, nspawn puts the guest in the cgroup it was started from, so
/// without a cgroup of its own every guest would share one, and one guest's
/// systemd stopping a unit would signal the processes of all the others.
/// Memory and process limits are set on the same cgroups where the host allows.
#[derive(Debug)]
struct Cgroups;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    /// A hierarchy used only for placement (name=systemd, or v2 in hybrid mode).
    Placement,
    Memory,
    Pids,
    /// A pure v2 host: one hierarchy with memory and pids.
    Unified,
}

impl Cgroups {
    fn detect() -> Option<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        (root.join("systemd/cgroup.procs").exists() || root.join("cgroup.controllers").exists())
            .then(|| root.to_path_buf())
    }

    fn dirs(root: &Path, id: &str) -> Vec<(PathBuf, Controller)> {
        let mut out = Vec::new();
        if root.join("systemd/cgroup.procs").exists() {
            // cgroup v1 with systemd's named hierarchy (a hybrid host).
            out.push((root.join("systemd/airlock").join(id), Controller::Placement));
            if root.join("unified/cgroup.procs").exists() {
                out.push((root.join("unified/airlock").join(id), Controller::Placement));
            }
            if root.join("memory/cgroup.procs").exists() {
                out.push((root.join("memory/airlock").join(id), Controller::Memory));
            }
            if root.join("pids/cgroup.procs").exists() {
                out.push((root.join("pids/airlock").join(id), Controller::Pids));
            }
        } else {
            out.push((root.join("airlock").join(id), Controller::Unified));
        }
        out
    }

    /// Make the cgroups; placement failing is an error, limits failing a warning.
    fn create(root: &Path, id: &str, limits: &Limits) -> std::io::Result<()> {
        for (dir, controller) in Self::dirs(root, id) {
            if controller == Controller::Unified {
                let parent = root.join("airlock");
                std::fs::create_dir_all(&parent)?;
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids");
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids");
            }
            std::fs::create_dir_all(&dir)?;
            let limit = |file: &str, value: Option<u64>| {
                if let Some(v) = value {
                    if let Err(e) = std::fs::write(dir.join(file), v.to_string()) {
                        tracing::warn!(sandbox = id, file, error = %e, "limit not applied");
                    }
                }
            };
            match controller {
                Controller::Memory => limit("memory.limit_in_bytes", limits.memory_bytes),
                Controller::Pids => limit("pids.max", limits.max_pids),
                Controller::Unified => {
                    limit("memory.max", limits.memory_bytes);
                    limit("pids.max", limits.max_pids);
                }
                Controller::Placement => {}
            }
        }
        Ok(())
    }

    fn procs_files(root: &Path, id: &str) -> Vec<PathBuf> {
        Self::dirs(root, id)
            .into_iter()
            .map(|(d, _)| d.join("cgroup.procs"))
            .collect()
    }

    /// Join the cgroups before exec, so every process of the guest starts inside.
    fn wrap(cmd: Cmd, procs: &[PathBuf]) -> Cmd {
        let mut script = String::new();
        for p in procs {
            script.push_str(&format!("echo $$ > '{}' && ", p.display()));
        }
        script.push_str("exec \"$@\"");
        Cmd::new("/bin/sh")
            .args([
                "-c".to_owned(),
                script,
                "airlock-nspawn".to_owned(),
                cmd.program,
            ])
            .args(cmd.args)
    }

    /// Every process in the sandbox's cgroups, at any depth.
    fn pids(root: &Path, id: &str) -> Vec<u32> {
        fn walk(dir: &Path, out: &mut Vec<u32>) {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        walk(&entry.path(), out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (dir, _) in Self::dirs(root, id) {
            walk(&dir, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Remove the sandbox's cgroups, deepest first (the guest's systemd made
    /// a tree below them). Only empty cgroups can go, so this runs after stop.
    fn remove(root: &Path, id: &str) {
        for (dir, _) in Self::dirs(root, id) {
            remove_cgroup_tree(&dir);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;
    use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};

    fn spec(id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            kind: SandboxKind::Browser,
            image: ImageRef {
                build_id: "b1".into(),
                layers: vec!["/img/top".into(), "/img/base".into()],
            },
            lease: Lease {
                index: 3,
                host: Ipv4Addr::new(10, 1, 0, 13),
                guest: Ipv4Addr::new(10, 1, 0, 14),
                prefix_len: 30,
            },
            metadata: Metadata {
                sandbox_id: id.into(),
                kind: SandboxKind::Browser,
                agent_token: "tok".into(),
                vnc_password: "pw".into(),
                display: Display::default(),
                network: Network {
                    address: "10.1.0.14".into(),
                    gateway: "10.1.0.13".into(),
                    prefix_len: 30,
                },
                egress: None,
            },
            limits: Limits::default(),
            proxy_port: None,
            home_volume: None,
        }
    }

    fn driver(root: &Path, host: Arc<FakeHost>) -> NspawnDriver {
        let mut cfg = NspawnConfig::new(root.to_path_buf());
        cfg.cgroup_root = None;
        cfg.stop_grace = Duration::from_millis(100);
        NspawnDriver::new(cfg, host)
    }

    #[tokio::test]
    async fn create_start_destroy_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        let d = driver(tmp.path(), host.clone());
        d.create(&spec("s1")).await.expect("create");
        let meta =
            std::fs::read_to_string(tmp.path().join("s1/meta/metadata.json")).expect("metadata");
        assert!(meta.contains("\"sandbox_id\":\"s1\""));
        d.start("s1").await.expect("start");
        let info = d.inspect("s1").await.expect("inspect");
        assert!(info.running);
        let cmds = host.commands();
        assert!(cmds
            .iter()
            .any(|c| c.contains("lowerdir=/img/top:/img/base")));
        let nspawn = cmds
            .iter()
            .find(|c| c.starts_with("systemd-nspawn"))
            .expect("nspawn ran");
        assert!(nspawn.contains("--register=no") && nspawn.contains("--keep-unit"));
        assert!(nspawn.contains("--network-namespace-path=/run/netns/airlock-s1"));
        d.destroy("s1").await.expect("destroy");
        assert!(!tmp.path().join("s1").exists());
        assert!(d.list().await.expect("list").is_empty());
        assert!(host
            .commands()
            .iter()
            .any(|c| c == "ip netns del airlock-s1"));
    }

    #[tokio::test]
    async fn failed_create_rolls_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        host.fail_on("mount -t overlay");
        let d = driver(tmp.path(), host.clone());
        let err = d.create(&spec("s2")).await.expect_err("mount fails");
        assert!(err.to_string().contains("overlay"), "{err}");
        assert!(!tmp.path().join("s2").exists());
        assert!(host.commands().iter().any(|c| c == "ip link del als2"));
    }

    #[tokio::test]
    async fn destroy_of_unknown_sandbox_is_ok() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = driver(tmp.path(), Arc::new(FakeHost::default()));
        d.destroy("nothing").await.expect("idempotent");
    }
}
