//! The nspawn driver: the golden image booted with its own systemd under
//! `systemd-nspawn`, on a per-sandbox overlay (the image is never copied or
//! written), in its own network namespace, with the metadata bound read-only.
//!
//! Each guest runs in a user namespace of its own: guest uid `k` is host uid
//! `base + k`, with a 65,536-id range per sandbox from [`crate::userns`]. The
//! image's layers are shared by every sandbox and never chowned: each one is
//! bound into the sandbox as an idmapped mount (the guest sees the image's
//! root-owned files as its own root's), and the overlay stacks on those. The
//! writable layer and a workspace's home belong on disk to the sandbox's range.
//!
//! On-disk state per sandbox, under `<root>/<id>/`, is what `list` and `destroy`
//! work from, so a restarted control plane can re-adopt or clean up:
//!
//! ```text
//! sandbox.json   what was created (image layers, lease, home volume, uid range)
//! meta/          metadata.json, bound at /run/airlock/meta (guest root only)
//! lower/<n>/     idmapped binds of the image layers (user namespace only)
//! rw/            the overlay's writable layer (upper/, work/), thrown away on
//!                destroy; with a disk limit, an ext4 filesystem of that size
//!                in rw.img (sparse: it takes host disk only as it is written)
//! merged/        the overlay mount the guest boots from
//! nspawn.pid     pid of the systemd-nspawn process once started
//! console.log    what the guest printed
//! ```

use crate::files::{chain, io_err, write_private};
use crate::host::{Cmd, Host, HostError, Process};
use crate::net::firewall;
use crate::net::link::{self, LinkNames};
use crate::supervise::{self, Supervisor};
use crate::userns::{self, UidRanges};
use crate::{
    Driver, DriverError, Endpoints, ImageRef, InstanceInfo, Lease, Limits, Liveness, SandboxSpec,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    /// First host uid of the guest's user namespace; `None`: no user
    /// namespace (a record from before they were used, or turned off).
    #[serde(default)]
    uid_base: Option<u32>,
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
    /// Run each guest in a user namespace of its own (see the module doc).
    pub private_users: bool,
    /// The host-wide registry of uid ranges ([`crate::userns`]).
    pub userns_registry: PathBuf,
    /// No process of the guest can gain privileges through exec (setuid
    /// binaries, file capabilities).
    pub no_new_privileges: bool,
    /// Host-wide inotify limits raised to at least (instances, watches) before
    /// a guest starts; `None` leaves the host's as they are (unit tests).
    /// Why: the kernel charges every inotify instance made in a user
    /// namespace to the uid that made the namespace (root) as well, against
    /// the host's `fs.inotify.max_user_instances` (128 by default): with a
    /// user namespace per guest, all guests share that one budget.
    pub inotify_floor: Option<(u64, u64)>,
}

impl NspawnConfig {
    pub fn new(root: PathBuf) -> Self {
        NspawnConfig {
            root,
            nspawn_bin: "systemd-nspawn".into(),
            guest_uid: 1000,
            stop_grace: Duration::from_secs(3),
            cgroup_root: Cgroups::detect(),
            private_users: true,
            userns_registry: PathBuf::from(userns::DEFAULT_REGISTRY),
            no_new_privileges: true,
            inotify_floor: Some((8192, 1 << 20)),
        }
    }
}

#[derive(Debug)]
pub struct NspawnDriver {
    cfg: NspawnConfig,
    host: Arc<dyn Host>,
    /// Each sandbox's systemd-nspawn.
    nspawn: Supervisor,
    /// Each sandbox's payload leader: the guest's init, nspawn's child in
    /// the guest's pid namespace (killing it ends every process there).
    leaders: Mutex<HashMap<String, Arc<Process>>>,
}

fn host_err(context: impl Into<String>) -> impl FnOnce(HostError) -> DriverError {
    let context = context.into();
    move |source| DriverError::Host { context, source }
}

impl NspawnDriver {
    pub fn new(cfg: NspawnConfig, host: Arc<dyn Host>) -> Self {
        NspawnDriver {
            nspawn: Supervisor::new(
                "systemd-nspawn",
                cfg.root.clone(),
                "nspawn.pid",
                |id| format!("--machine={}", Self::machine_name(id)),
                host.clone(),
            ),
            leaders: Mutex::new(HashMap::new()),
            cfg,
            host,
        }
    }

    fn leaders(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        // The map holds no invariant a panic elsewhere could break.
        self.leaders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest's init, held once seen: the child of nspawn that is in
    /// another pid namespace (nspawn's short-lived helper children are not).
    /// `None` before the guest has started, or once nspawn is gone.
    fn leader(&self, id: &str) -> Option<Arc<Process>> {
        let held = self.leaders().get(id).cloned();
        if held.is_some() {
            return held;
        }
        let nspawn = self.nspawn.find(id)?;
        let own = self.host.pid_namespace(nspawn.pid)?;
        let leader = self.host.children(nspawn.pid).into_iter().find_map(|pid| {
            let held = self.host.hold(pid, None)?;
            let ns = self.host.pid_namespace(pid)?;
            (ns != own).then_some(held)
        })?;
        let leader = Arc::new(leader);
        self.leaders().insert(id.to_owned(), leader.clone());
        Some(leader)
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
            format!("--bind-ro={}:/run/airlock/meta", dir.join("meta").display()),
            "--console=passive".to_owned(),
        ]);
        if record.uid_base.is_none() {
            cmd = cmd.arg(format!("--network-namespace-path={}", names.netns_path()));
        }
        if let Some(base) = record.uid_base {
            // The ownership is already right: layers are idmapped, the
            // writable layer and home belong to the range.
            cmd = cmd.args([
                format!("--private-users={base}:{}", userns::RANGE),
                "--private-users-ownership=off".to_owned(),
                // nspawn makes the metadata's mount point as the host's root,
                // which the guest's root does not own: the agent could not
                // write its session files beside it. A tmpfs of the guest's
                // (nspawn maps its owner) takes /run/airlock instead.
                "--tmpfs=/run/airlock:mode=0755".to_owned(),
            ]);
        }
        if self.cfg.no_new_privileges {
            cmd = cmd.arg("--no-new-privileges=yes");
        }
        if let Some(home) = &record.home_volume {
            cmd = cmd.arg(format!("--bind={}:/home/airlock", home.display()));
        }
        if record.uid_base.is_some() {
            // nspawn (252) joins --network-namespace-path from inside the new
            // user namespace, which may not enter a namespace the host's owns
            // (EPERM). So nspawn starts in the sandbox's network namespace
            // and the guest shares it. The guest's root has no say over it
            // either way: it belongs to the host's user namespace, and the
            // host configured its addresses and route.
            cmd = Cmd::new("nsenter")
                .arg(format!("--net={}", names.netns_path()))
                .arg(cmd.program)
                .args(cmd.args);
        }
        cmd
    }

    async fn mount_overlay(
        &self,
        dir: &Path,
        layers: &[PathBuf],
        uid_base: Option<u32>,
    ) -> Result<(), DriverError> {
        let mut lower: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
        if let Some(base) = uid_base {
            lower.clear();
            for (n, layer) in layers.iter().enumerate() {
                let at = dir.join("lower").join(n.to_string());
                std::fs::create_dir_all(&at).map_err(io_err(format!("create {}", at.display())))?;
                if !is_mounted(&at.display().to_string()) {
                    self.host
                        .idmapped_bind(layer, &at, base, userns::RANGE)
                        .map_err(host_err(
                            "map an image layer into the sandbox's user namespace \
                             (needs Linux 5.12+ and a filesystem with idmapped mounts)",
                        ))?;
                }
                lower.push(at.display().to_string());
            }
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            dir.join("rw/upper").display(),
            dir.join("rw/work").display()
        );
        let merged = dir.join("merged").display().to_string();
        self.host
            .run(&Cmd::new("mount").args(["-t", "overlay", "overlay", "-o", &options, &merged]))
            .await
            .map_err(host_err("mount the sandbox's overlay"))?;
        Ok(())
    }

    /// A filesystem of `bytes` in a sparse file, mounted at `at`. Made once:
    /// an existing image is mounted as it is. A throwaway layer goes without
    /// a journal (a crash throws it away anyway).
    async fn size_limited(
        &self,
        image: &Path,
        at: &Path,
        bytes: u64,
        journal: bool,
        root_owner: u32,
    ) -> Result<(), DriverError> {
        let img = image.display().to_string();
        let fresh = !image.exists();
        if fresh {
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(image)
                .and_then(|f| f.set_len(bytes));
            if let Err(e) = made {
                let _ = std::fs::remove_file(image);
                return Err(io_err(format!("create {img}"))(e));
            }
            let mut mkfs = Cmd::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]);
            mkfs = mkfs.args([
                "-E".to_owned(),
                format!(
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={root_owner}:{root_owner}"
                ),
            ]);
            if !journal {
                mkfs = mkfs.args(["-O", "^has_journal"]);
            }
            if let Err(e) = self.host.run(&mkfs.arg(&img)).await {
                let _ = std::fs::remove_file(image);
                return Err(host_err(format!("make a filesystem in {img}"))(e));
            }
        }
        let at_s = at.display().to_string();
        if !is_mounted(&at_s) {
            // discard: space the guest frees goes back to the host.
            self.host
                .run(&Cmd::new("mount").args(["-o", "loop,discard,nodev,nosuid", &img, &at_s]))
                .await
                .map_err(host_err(format!("mount {img}")))?;
            if fresh {
                // Nothing of the host's in the guest's tree.
                let _ = std::fs::remove_dir(at.join("lost+found"));
            }
        }
        Ok(())
    }

    /// A workspace's home on a filesystem of its own (`home.img` beside it),
    /// mounted while the workspace lives. A home that was a plain directory
    /// is copied in once.
    async fn size_limited_home(
        &self,
        home: &Path,
        bytes: u64,
        owner: u32,
    ) -> Result<(), DriverError> {
        let image = home.with_extension("img");
        let home_s = home.display().to_string();
        if is_mounted(&home_s) {
            return Ok(());
        }
        let had_files = std::fs::read_dir(home).is_ok_and(|mut d| d.next().is_some());
        if !image.exists() && had_files {
            let staging = home.with_extension("migrating");
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging)
                .map_err(io_err(format!("create {}", staging.display())))?;
            self.size_limited(&image, &staging, bytes, true, owner)
                .await?;
            let staging_s = staging.display().to_string();
            let copied = self
                .host
                .run(&Cmd::new("cp").args([
                    "-a".to_owned(),
                    format!("{home_s}/."),
                    format!("{staging_s}/"),
                ]))
                .await;
            let _ = self.host.run(&Cmd::new("umount").arg(&staging_s)).await;
            if let Err(e) = copied {
                let _ = std::fs::remove_file(&image);
                return Err(host_err(format!("copy {home_s} into its own filesystem"))(
                    e,
                ));
            }
            let _ = std::fs::remove_dir(&staging);
            std::fs::remove_dir_all(home).map_err(io_err(format!("empty {home_s}")))?;
        }
        std::fs::create_dir_all(home).map_err(io_err(format!("create {home_s}")))?;
        // The mount point, hidden while mounted, says which uid range the
        // home belongs to when it is not (see `home_range`); nobody reads it.
        std::os::unix::fs::chown(home, Some(owner), Some(owner))
            .map_err(io_err(format!("chown {home_s}")))?;
        set_mode(home, 0o700)?;
        let fresh = !image.exists();
        self.size_limited(&image, home, bytes, true, owner).await?;
        if fresh {
            set_mode(home, 0o750)?;
        }
        Ok(())
    }

    /// The overlay first, then what lies under it.
    fn mount_points(&self, dir: &Path) -> Vec<String> {
        let mut points = vec![dir.join("merged"), dir.join("rw")];
        if let Ok(entries) = std::fs::read_dir(dir.join("lower")) {
            points.extend(entries.flatten().map(|e| e.path()));
        }
        points.iter().map(|p| p.display().to_string()).collect()
    }

    async fn unmount_overlay(&self, dir: &Path) {
        for point in self.mount_points(dir) {
            self.unmount(&point).await;
        }
    }

    async fn unmount(&self, point: &str) {
        if !is_mounted(point) {
            return;
        }
        if self.host.run(&Cmd::new("umount").arg(point)).await.is_err() {
            // Busy because a process still holds it open: detach it now,
            // the kernel frees it when the last user goes.
            let _ = self.host.run(&Cmd::new("umount").args(["-l", point])).await;
        }
    }

    fn uid_ranges(&self) -> UidRanges {
        UidRanges::new(self.cfg.userns_registry.clone())
    }

    async fn create_steps(&self, spec: &SandboxSpec, record: &Record) -> Result<(), DriverError> {
        let dir = self.dir(&spec.id);
        for sub in ["rw", "merged", "meta"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io_err(format!("create {}", dir.join(sub).display())))?;
        }
        if let Some(bytes) = spec.limits.disk_bytes {
            self.size_limited(&dir.join("rw.img"), &dir.join("rw"), bytes, false, 0)
                .await
                .map_err(|e| limit_error("disk_mb", &chain(&e)))?;
        }
        for sub in ["rw/upper", "rw/work"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io_err(format!("create {}", dir.join(sub).display())))?;
        }
        // The upper layer's root becomes the guest's `/`.
        set_mode(&dir.join("rw/upper"), 0o755)?;
        if let Some(base) = record.uid_base {
            for sub in ["rw/upper", "meta"] {
                std::os::unix::fs::chown(dir.join(sub), Some(base), Some(base))
                    .map_err(io_err(format!("chown {}", dir.join(sub).display())))?;
            }
        }
        write_private(
            &dir.join("sandbox.json"),
            &serde_json::to_vec_pretty(record).unwrap_or_default(),
        )?;
        let metadata =
            serde_json::to_vec(&spec.metadata).map_err(|e| DriverError::Other(e.to_string()))?;
        write_private(&dir.join("meta").join("metadata.json"), &metadata)?;
        set_mode(&dir.join("meta"), 0o700)?;
        if let Some(base) = record.uid_base {
            // Readable by the guest's root only, as on a host without
            // user namespaces.
            let file = dir.join("meta").join("metadata.json");
            std::os::unix::fs::chown(&file, Some(base), Some(base))
                .map_err(io_err(format!("chown {}", file.display())))?;
        }
        if let Some(home) = &spec.home_volume {
            if let Some(bytes) = spec.limits.home_disk_bytes {
                let owner = record.uid_base.unwrap_or(0) + self.cfg.guest_uid;
                self.size_limited_home(home, bytes, owner)
                    .await
                    .map_err(|e| limit_error("home_disk_mb", &chain(&e)))?;
            }
            prepare_home(home, self.cfg.guest_uid, record.uid_base)?;
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
        self.mount_overlay(&dir, &spec.image.layers, record.uid_base)
            .await?;
        if let Some(root) = &self.cfg.cgroup_root {
            // The disk under the data dir (the image's layers, a home without a
            // filesystem of its own) and the loop devices of the sandbox's
            // own filesystems, which its writes go through.
            let mut devices = Vec::new();
            if spec.limits.io_bps.is_some() {
                devices.push(block_device_of(&self.cfg.root)?);
                let mut own = vec![dir.join("rw")];
                own.extend(spec.home_volume.clone());
                for path in own {
                    if is_mounted(&path.display().to_string()) {
                        devices.push(block_device_of(&path)?);
                    }
                }
                devices.sort_unstable();
                devices.dedup();
            }
            Cgroups::create(root, &spec.id, &spec.limits, &devices)?;
        }
        Ok(())
    }

    /// End every process in the sandbox's cgroups: at once through
    /// `cgroup.kill` where the host has cgroup v2 (the whole subtree,
    /// forks included), and SIGKILL to each process listed, until none is.
    async fn kill_cgroups(&self, id: &str) -> Result<(), DriverError> {
        let Some(root) = &self.cfg.cgroup_root else {
            return Ok(());
        };
        Cgroups::kill(root, id);
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
        let dir = self.dir(&spec.id);
        let uid_base = if self.cfg.private_users {
            // A workspace gets the range its home already belongs to, if free.
            let preferred = spec
                .home_volume
                .as_deref()
                .and_then(|h| home_range(h, self.cfg.guest_uid));
            Some(
                self.uid_ranges()
                    .allocate(&dir, preferred)
                    .map_err(io_err(format!(
                        "allocate a host uid range in {}",
                        self.cfg.userns_registry.display()
                    )))?,
            )
        } else {
            None
        };
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
            uid_base,
        };
        supervise::or_roll_back(
            &spec.id,
            self.create_steps(spec, &record),
            self.destroy(&spec.id),
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        let record = self.read_record(id)?;
        if self.nspawn.find(id).is_some() {
            return Ok(());
        }
        let dir = self.dir(id);
        if let (Some(_), Some((instances, watches))) = (record.uid_base, self.cfg.inotify_floor) {
            raise_sysctl("fs/inotify/max_user_instances", instances);
            raise_sysctl("fs/inotify/max_user_watches", watches);
        }
        let mut cmd = self.nspawn_cmd(id, &record);
        if let Some(root) = &self.cfg.cgroup_root {
            cmd = Cgroups::wrap(cmd, &Cgroups::procs_files(root, id));
        }
        self.leaders().remove(id);
        self.nspawn
            .spawn(id, &cmd, &dir.join("console.log"))
            .await?;
        Ok(())
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Endpoints, DriverError> {
        let record = self.read_record(id)?;
        self.nspawn
            .wait_ready(id, Endpoints::for_guest(record.guest_addr), timeout, || {
                self.console_tail(id)
            })
            .await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let leader = self.leader(id);
        // nspawn turns SIGTERM into a clean poweroff request to the guest's
        // systemd. A guest that ignores it (a unit holding its stop timeout)
        // loses nspawn, then its init: killing that ends its whole pid
        // namespace at once.
        let stopped = self
            .nspawn
            .stop(id, grace, |nspawn| async move {
                self.host.signal_process(&nspawn, libc::SIGTERM).is_ok()
            })
            .await;
        let held = self.leaders().remove(id);
        if let Some(leader) = held {
            let _ = self.host.signal_process(&leader, libc::SIGKILL);
        }
        drop(leader);
        stopped?;
        // Whatever is left in the sandbox's cgroups (a guest whose nspawn died
        // first, a process that escaped) goes too.
        self.kill_cgroups(id).await
    }

    async fn destroy(&self, id: &str) -> Result<(), DriverError> {
        let dir = self.dir(id);
        self.stop(id, self.cfg.stop_grace).await?;
        self.unmount_overlay(&dir).await;
        let record = self.read_record(id).ok();
        let uid_base = record.as_ref().and_then(|r| r.uid_base);
        // A home on a filesystem of its own is mounted only while its
        // workspace lives.
        if let Some(home) = record.as_ref().and_then(|r| r.home_volume.as_ref()) {
            self.unmount(&home.display().to_string()).await;
        }
        // Never delete through a mount: a layer still bound here is the image.
        if let Some(point) = self.mount_points(&dir).into_iter().find(|p| is_mounted(p)) {
            return Err(DriverError::Transient(format!(
                "{point} is still mounted; not removing {}",
                dir.display()
            )));
        }
        firewall::remove(self.host.as_ref(), &LinkNames::for_sandbox(id)).await;
        link::destroy(self.host.as_ref(), &LinkNames::for_sandbox(id)).await;
        if let Some(root) = &self.cfg.cgroup_root {
            Cgroups::remove(root, id);
        }
        let removed = match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
        };
        if removed.is_ok() {
            match uid_base {
                Some(base) => self.uid_ranges().release(base, &dir),
                // No record: a create interrupted after its range was taken.
                None => self.uid_ranges().release_all(&dir),
            }
        }
        removed
    }

    async fn inspect(&self, id: &str) -> Result<InstanceInfo, DriverError> {
        self.read_record(id)?;
        Ok(self.nspawn.info(id))
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>, DriverError> {
        self.nspawn.list()
    }

    /// Alive while systemd-nspawn and the guest's init both are. When nspawn
    /// dies, the guest runs on unsupervised: that is dead too, and
    /// `destroy` ends it through its cgroups.
    async fn liveness(&self, id: &str) -> Result<Liveness, DriverError> {
        self.read_record(id)?;
        if let dead @ Liveness::Dead(_) = self.nspawn.liveness(id) {
            return Ok(dead);
        }
        Ok(match self.leader(id) {
            Some(leader) if self.host.has_exited(&leader) => {
                Liveness::Dead(format!("the guest's init (pid {}) exited", leader.pid))
            }
            _ => Liveness::Alive,
        })
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

fn set_mode(path: &Path, mode: u32) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// A workspace's home: owned by the guest's desktop user as the guest sees
/// it, which on disk is `base + uid` under a user namespace (so no host user
/// can read it). A home left by a sandbox of another range (or by one without
/// a user namespace) is moved over to this one.
fn prepare_home(home: &Path, uid: u32, base: Option<u32>) -> Result<(), DriverError> {
    use std::os::unix::fs::MetadataExt;
    let owner = base.unwrap_or(0) + uid;
    if !home.exists() {
        std::fs::create_dir_all(home).map_err(io_err(format!("create {}", home.display())))?;
        std::os::unix::fs::chown(home, Some(owner), Some(owner))
            .map_err(io_err(format!("chown {}", home.display())))?;
        set_mode(home, 0o750)?;
        return Ok(());
    }
    let meta =
        std::fs::symlink_metadata(home).map_err(io_err(format!("stat {}", home.display())))?;
    if !meta.is_dir() {
        return Err(DriverError::Other(format!(
            "the home volume {} is not a directory",
            home.display()
        )));
    }
    if meta.uid() != owner {
        let from = home_range(home, uid).unwrap_or(0);
        let to = base.unwrap_or(0);
        let started = Instant::now();
        let changed = userns::shift_tree(home, from, to)
            .map_err(io_err(format!("move {} to uid range {to}", home.display())))?;
        tracing::info!(
            home = %home.display(), from, to, changed,
            took_ms = started.elapsed().as_millis() as u64,
            "home volume moved to the sandbox's uid range"
        );
    }
    Ok(())
}

/// The uid range a home volume belongs to, by its owner.
fn home_range(home: &Path, uid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::symlink_metadata(home).ok()?.uid();
    let base = owner.checked_sub(uid)?;
    (base == 0 || UidRanges::is_ours(base)).then_some(base)
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
    Cpu,
    Blkio,
    /// A pure v2 host: one hierarchy with every controller.
    Unified,
}

/// The CFS period the CPU limit is expressed over.
const CPU_PERIOD_US: u64 = 100_000;

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
            for (hierarchy, controller) in [
                ("memory", Controller::Memory),
                ("pids", Controller::Pids),
                ("cpu", Controller::Cpu),
                ("blkio", Controller::Blkio),
            ] {
                if root.join(hierarchy).join("cgroup.procs").exists() {
                    out.push((root.join(hierarchy).join("airlock").join(id), controller));
                }
            }
        } else {
            out.push((root.join("airlock").join(id), Controller::Unified));
        }
        out
    }

    /// The files and values that apply `limits`, per controller. `devices`
    /// are the block devices (major, minor) IO limits apply to.
    fn limit_writes(
        controller: Controller,
        limits: &Limits,
        devices: &[(u32, u32)],
    ) -> Vec<(&'static str, &'static str, String)> {
        let mut out = Vec::new();
        let cpu_quota = limits
            .cpu_millis
            .map(|m| (u64::from(m) * CPU_PERIOD_US / 1000).max(1000));
        let devs: Vec<String> = devices
            .iter()
            .map(|(major, minor)| format!("{major}:{minor}"))
            .collect();
        match controller {
            Controller::Memory => {
                if let Some(v) = limits.memory_bytes {
                    out.push(("memory_mb", "memory.limit_in_bytes", v.to_string()));
                }
            }
            Controller::Pids => {
                if let Some(v) = limits.max_pids {
                    out.push(("max_pids", "pids.max", v.to_string()));
                }
            }
            Controller::Cpu => {
                if let Some(quota) = cpu_quota {
                    out.push(("cpu_max", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                    out.push(("cpu_max", "cpu.cfs_quota_us", quota.to_string()));
                }
            }
            Controller::Blkio => {
                if let Some(bps) = limits.io_bps {
                    for dev in &devs {
                        for file in [
                            "blkio.throttle.read_bps_device",
                            "blkio.throttle.write_bps_device",
                        ] {
                            out.push(("io_max", file, format!("{dev} {bps}")));
                        }
                    }
                }
            }
            Controller::Unified => {
                if let Some(v) = limits.memory_bytes {
                    out.push(("memory_mb", "memory.max", v.to_string()));
                }
                if let Some(v) = limits.max_pids {
                    out.push(("max_pids", "pids.max", v.to_string()));
                }
                if let Some(quota) = cpu_quota {
                    out.push(("cpu_max", "cpu.max", format!("{quota} {CPU_PERIOD_US}")));
                }
                if let Some(bps) = limits.io_bps {
                    for dev in &devs {
                        out.push(("io_max", "io.max", format!("{dev} rbps={bps} wbps={bps}")));
                    }
                }
            }
            Controller::Placement => {}
        }
        out
    }

    /// Make the cgroups and apply the limits. Any limit that is set and cannot
    /// be applied is an error naming the setting: a sandbox never runs with
    /// less confinement than configured.
    fn create(
        root: &Path,
        id: &str,
        limits: &Limits,
        devices: &[(u32, u32)],
    ) -> Result<(), DriverError> {
        let dirs = Self::dirs(root, id);
        let wanted = |c: Controller| dirs.iter().any(|(_, d)| *d == c);
        if !wanted(Controller::Unified) {
            if limits.cpu_millis.is_some() && !wanted(Controller::Cpu) {
                return Err(limit_error(
                    "cpu_max",
                    "the host has no cpu cgroup hierarchy",
                ));
            }
            if limits.io_bps.is_some() && !wanted(Controller::Blkio) {
                return Err(limit_error(
                    "io_max",
                    "the host has no blkio cgroup hierarchy",
                ));
            }
        }
        for (dir, controller) in dirs {
            if controller == Controller::Unified {
                let parent = root.join("airlock");
                std::fs::create_dir_all(&parent)
                    .map_err(io_err(format!("create {}", parent.display())))?;
                // One controller per write: one the kernel refuses must not
                // keep the others off.
                for c in ["+memory", "+pids", "+cpu", "+io"] {
                    let _ = std::fs::write(root.join("cgroup.subtree_control"), c);
                    let _ = std::fs::write(parent.join("cgroup.subtree_control"), c);
                }
            }
            std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
            for (setting, file, value) in Self::limit_writes(controller, limits, devices) {
                let path = dir.join(file);
                if let Err(e) = std::fs::write(&path, &value) {
                    let why = if e.kind() == std::io::ErrorKind::NotFound {
                        format!(
                            "{} is missing: the controller is not enabled",
                            path.display()
                        )
                    } else {
                        format!("writing {value:?} to {}: {e}", path.display())
                    };
                    return Err(limit_error(setting, &why));
                }
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

    /// Kill every process of the sandbox's cgroups through `cgroup.kill`
    /// (cgroup v2, Linux 5.14+; a hybrid host has it in its unified
    /// hierarchy). A v1-only host has none: the caller's SIGKILL loop does it.
    fn kill(root: &Path, id: &str) {
        for (dir, _) in Self::dirs(root, id) {
            let file = dir.join("cgroup.kill");
            if file.exists() {
                if let Err(e) = std::fs::write(&file, "1") {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup.kill failed");
                }
            }
        }
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

/// Raise a host sysctl to at least `floor`; a failure is logged, not fatal
/// (the guest still boots, with fewer inotify instances to go round).
fn raise_sysctl(name: &str, floor: u64) {
    let path = Path::new("/proc/sys").join(name);
    let now: Option<u64> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if now.is_some_and(|n| n >= floor) {
        return;
    }
    match std::fs::write(&path, floor.to_string()) {
        Ok(()) => tracing::info!(sysctl = name, from = ?now, to = floor, "raised a host limit"),
        Err(e) => tracing::warn!(sysctl = name, error = %e, "could not raise a host limit"),
    }
}

fn limit_error(setting: &str, why: &str) -> DriverError {
    DriverError::Other(format!("the limit {setting} cannot be applied: {why}"))
}

/// The whole disk (major, minor) that holds `path`: IO limits apply to disks,
/// not to partitions.
fn block_device_of(path: &Path) -> Result<(u32, u32), DriverError> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)
        .map_err(io_err(format!("stat {}", path.display())))?
        .dev();
    let major = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32;
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return Err(limit_error(
            "io_max",
            &format!(
                "{} is not on a block device ({major}:{minor})",
                path.display()
            ),
        ));
    }
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev"))
            .map_err(io_err(format!("read the disk of {}", sys.display())))?;
        if let Some((ma, mi)) = parent.trim().split_once(':') {
            if let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) {
                return Ok((ma, mi));
            }
        }
    }
    Ok((major, minor))
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
        cfg.userns_registry = PathBuf::from(format!("{}-userns", root.display()));
        cfg.inotify_floor = None;
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
        assert!(cmds.iter().any(|c| c.contains(&format!(
            "lowerdir={0}/s1/lower/0:{0}/s1/lower/1,",
            tmp.path().display()
        ))));
        let nspawn = cmds
            .iter()
            .find(|c| c.contains("systemd-nspawn"))
            .expect("nspawn ran");
        assert!(nspawn.contains("--register=no") && nspawn.contains("--keep-unit"));
        assert!(nspawn.starts_with("nsenter --net=/run/netns/airlock-s1 systemd-nspawn"));
        d.destroy("s1").await.expect("destroy");
        assert!(!tmp.path().join("s1").exists());
        assert!(d.list().await.expect("list").is_empty());
        assert!(host
            .commands()
            .iter()
            .any(|c| c == "ip netns del airlock-s1"));
    }

    /// The guest runs in a user namespace of its own range: the image's layers
    /// are idmapped (never chowned), the writable layer, metadata and home
    /// belong to the range, and the range is given back on destroy.
    #[tokio::test]
    async fn guests_get_a_uid_range_of_their_own() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("sandboxes");
        let host = Arc::new(FakeHost::default());
        let d = driver(&root, host.clone());
        let mut ws = spec("w1");
        ws.kind = SandboxKind::Workspace;
        let home = tmp.path().join("volumes/alice/home");
        ws.home_volume = Some(home.clone());
        d.create(&ws).await.expect("create w1");
        d.create(&spec("b1")).await.expect("create b1");
        let (first, second) = (userns::FIRST_BASE, userns::FIRST_BASE + userns::RANGE);
        let cmds = host.commands();
        assert!(cmds.contains(&format!(
            "idmapped-bind /img/top {}/w1/lower/0 {first}:65536",
            root.display()
        )));
        assert!(cmds.contains(&format!(
            "idmapped-bind /img/base {}/b1/lower/1 {second}:65536",
            root.display()
        )));
        assert!(cmds.iter().any(|c| c.contains(&format!(
            "lowerdir={0}/w1/lower/0:{0}/w1/lower/1,",
            root.display()
        ))));
        let owner = |p: &Path| std::fs::metadata(p).expect("stat").uid();
        assert_eq!(owner(&root.join("w1/rw/upper")), first);
        assert_eq!(owner(&root.join("w1/meta/metadata.json")), first);
        assert_eq!(owner(&home), first + 1000);
        d.start("w1").await.expect("start");
        let nspawn = host
            .commands()
            .into_iter()
            .find(|c| c.contains("systemd-nspawn"))
            .expect("nspawn ran");
        assert!(nspawn.contains(&format!("--private-users={first}:65536")));
        assert!(nspawn.contains("--private-users-ownership=off"));
        assert!(nspawn.contains("--no-new-privileges=yes"));
        assert!(nspawn.contains(&format!("--bind={}:/home/airlock", home.display())));
        d.destroy("w1").await.expect("destroy");
        // The home stays its range's: the next workspace gets that range back
        // and the home needs no chown.
        d.create(&ws).await.expect("create w1 again");
        assert_eq!(owner(&home), first + 1000);
        d.destroy("w1").await.expect("destroy");
        // Taken by a browser meanwhile: the home moves to the new range.
        d.create(&spec("b2")).await.expect("b2 takes the range");
        std::fs::write(home.join("notes"), "x").expect("file");
        std::os::unix::fs::chown(home.join("notes"), Some(first + 1000), Some(first + 1000))
            .expect("chown");
        d.create(&ws).await.expect("create w1 a third time");
        let third = userns::FIRST_BASE + 2 * userns::RANGE;
        assert_eq!(owner(&home), third + 1000);
        assert_eq!(owner(&home.join("notes")), third + 1000);
        for id in ["w1", "b1", "b2"] {
            d.destroy(id).await.expect("destroy");
        }
        let left: Vec<_> = std::fs::read_dir(format!("{}-userns", root.display()))
            .expect("registry")
            .collect();
        assert!(left.is_empty(), "ranges left taken: {left:?}");
    }

    #[tokio::test]
    async fn without_user_namespaces_nothing_is_mapped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        let mut cfg = NspawnConfig::new(tmp.path().to_path_buf());
        cfg.cgroup_root = None;
        cfg.inotify_floor = None;
        cfg.private_users = false;
        let d = NspawnDriver::new(cfg, host.clone());
        d.create(&spec("s1")).await.expect("create");
        d.start("s1").await.expect("start");
        let cmds = host.commands();
        assert!(!cmds
            .iter()
            .any(|c| c.contains("idmapped") || c.contains("--private-users")));
        assert!(cmds
            .iter()
            .any(|c| c.contains("lowerdir=/img/top:/img/base")));
        d.destroy("s1").await.expect("destroy");
    }

    #[test]
    fn limits_become_cgroup_writes() {
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            max_pids: Some(100),
            cpu_millis: Some(1500),
            io_bps: Some(10 << 20),
            ..Limits::default()
        };
        let dev = &[(254, 0)][..];
        assert_eq!(
            Cgroups::limit_writes(Controller::Cpu, &limits, dev),
            [
                ("cpu_max", "cpu.cfs_period_us", "100000".to_owned()),
                ("cpu_max", "cpu.cfs_quota_us", "150000".to_owned()),
            ]
        );
        assert_eq!(
            Cgroups::limit_writes(Controller::Blkio, &limits, dev),
            [
                (
                    "io_max",
                    "blkio.throttle.read_bps_device",
                    "254:0 10485760".to_owned()
                ),
                (
                    "io_max",
                    "blkio.throttle.write_bps_device",
                    "254:0 10485760".to_owned()
                ),
            ]
        );
        let unified = Cgroups::limit_writes(Controller::Unified, &limits, dev);
        assert!(unified.contains(&("cpu_max", "cpu.max", "150000 100000".to_owned())));
        assert!(unified.contains(&(
            "io_max",
            "io.max",
            "254:0 rbps=10485760 wbps=10485760".to_owned()
        )));
        let none = Limits {
            cpu_millis: None,
            io_bps: None,
            ..limits
        };
        assert!(Cgroups::limit_writes(Controller::Cpu, &none, dev).is_empty());
        assert!(Cgroups::limit_writes(Controller::Blkio, &none, dev).is_empty());
    }

    /// A limit the host cannot apply fails the create and names the setting.
    #[test]
    fn a_limit_without_its_controller_fails_by_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        for h in ["systemd", "memory", "pids", "cpu"] {
            std::fs::create_dir_all(root.join(h)).expect("dir");
            std::fs::write(root.join(h).join("cgroup.procs"), "").expect("procs");
        }
        let limits = Limits {
            io_bps: Some(1 << 20),
            cpu_millis: Some(500),
            ..Limits::default()
        };
        let err = Cgroups::create(root, "s1", &limits, &[(8, 0)]).expect_err("no blkio");
        assert!(
            err.to_string()
                .contains("io_max cannot be applied: the host has no blkio"),
            "{err}"
        );
        let limits = Limits {
            io_bps: None,
            ..limits
        };
        Cgroups::create(root, "s1", &limits, &[]).expect("cpu applies");
        let quota =
            std::fs::read_to_string(root.join("cpu/airlock/s1/cpu.cfs_quota_us")).expect("quota");
        assert_eq!(quota, "50000");
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

    /// nspawn killed: the guest may run on, but the sandbox is dead, named
    /// by what died; destroy ends the orphaned guest by its init.
    #[tokio::test]
    async fn a_dead_nspawn_is_a_dead_sandbox_and_destroy_ends_its_guest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        let d = driver(tmp.path(), host.clone());
        d.create(&spec("s1")).await.expect("create");
        assert!(
            matches!(d.liveness("s1").await.expect("liveness"), Liveness::Dead(why) if why.contains("never started"))
        );
        d.start("s1").await.expect("start");
        let nspawn = d.nspawn.pid("s1").expect("nspawn");
        assert_eq!(d.liveness("s1").await.expect("liveness"), Liveness::Alive);
        host.add_child(nspawn, 4242, "/usr/lib/systemd/systemd");
        assert_eq!(d.liveness("s1").await.expect("liveness"), Liveness::Alive);
        host.signal(nspawn, libc::SIGKILL).expect("kill");
        assert_eq!(
            d.liveness("s1").await.expect("liveness"),
            Liveness::Dead(format!("systemd-nspawn (pid {nspawn}) exited"))
        );
        assert!(!d.inspect("s1").await.expect("inspect").running);
        d.destroy("s1").await.expect("destroy");
        assert!(
            host.cmdline(4242).is_none(),
            "the orphaned guest's init is killed"
        );
        assert!(matches!(
            d.liveness("s1").await,
            Err(DriverError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_dead_guest_init_is_a_dead_sandbox() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        let d = driver(tmp.path(), host.clone());
        d.create(&spec("s1")).await.expect("create");
        d.start("s1").await.expect("start");
        let nspawn = d.nspawn.pid("s1").expect("nspawn");
        host.add_child(nspawn, 4243, "/usr/lib/systemd/systemd");
        assert_eq!(d.liveness("s1").await.expect("liveness"), Liveness::Alive);
        host.signal(4243, libc::SIGKILL).expect("kill");
        assert_eq!(
            d.liveness("s1").await.expect("liveness"),
            Liveness::Dead("the guest's init (pid 4243) exited".into())
        );
        d.destroy("s1").await.expect("destroy");
    }

    /// A restarted control plane finds nspawn again from its pid file; a
    /// reused pid is not taken for it.
    #[tokio::test]
    async fn after_a_restart_nspawn_is_refound_but_not_a_reused_pid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        driver(tmp.path(), host.clone())
            .create(&spec("s1"))
            .await
            .expect("create");
        let first = driver(tmp.path(), host.clone());
        first.start("s1").await.expect("start");
        let pid = first.nspawn.pid("s1").expect("pid");
        let restarted = driver(tmp.path(), host.clone());
        assert_eq!(
            restarted.inspect("s1").await.expect("inspect").pid,
            Some(pid)
        );
        assert_eq!(restarted.liveness("s1").await.expect("l"), Liveness::Alive);
        host.reuse_pid(pid);
        let again = driver(tmp.path(), host.clone());
        assert!(matches!(
            again.liveness("s1").await.expect("l"),
            Liveness::Dead(_)
        ));
        assert!(matches!(
            restarted.liveness("s1").await.expect("l"),
            Liveness::Dead(_)
        ));
        again.destroy("s1").await.expect("destroy");
        assert!(
            !host
                .signals
                .lock()
                .expect("lock")
                .iter()
                .any(|(p, _)| *p == pid),
            "the pid's new owner is never signalled"
        );
    }

    #[tokio::test]
    async fn destroy_of_unknown_sandbox_is_ok() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = driver(tmp.path(), Arc::new(FakeHost::default()));
        d.destroy("nothing").await.expect("idempotent");
    }
}
