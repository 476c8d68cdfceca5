//! The Firecracker driver: the golden image's ext4 and guest kernel booted as
//! a microVM, configured entirely through Firecracker's API socket, with the
//! sandbox's metadata served by MMDS (version 2, session tokens).
//!
//! On-disk state per sandbox, under `<root>/<id>/` (what `list` and `destroy`
//! work from, so a restarted control plane re-adopts or cleans up):
//!
//! ```text
//! sandbox.json    what was created (build, lease, TAP, namespace, size)
//! metadata.json   the document MMDS serves (root-only)
//! rw.ext4         the VM's writable disk: sparse, thrown away on destroy
//! api.sock        Firecracker's API socket (not jailed)
//! vsock.sock      host end of the VM's vsock
//! vmm.pid         pid of the Firecracker process once started
//! vmm.log         what Firecracker and the guest's serial console printed
//! ```
//!
//! Under the jailer the VM's files are hard links inside
//! `<chroot base>/firecracker/<id>/root/`, removed with the sandbox, and the
//! VM has a network namespace of its own (`/run/netns/airlock-<id>`, given to
//! the jailer as `--netns`): its TAP is inside it, bridged there to a veth pair
//! whose host end (`al<id>`) carries the gateway address and the firewall
//! rules, as an nspawn sandbox's does (`net::link::create_for_vm`). Without the
//! jailer the TAP itself is `al<id>`, in the host's namespace.
//!
//! Life of one VM, every step an API call except the first and the last:
//!
//! ```text
//! spawn firecracker ─▶ machine-config ─▶ boot-source ─▶ drives/root (ro)
//!   ─▶ drives/rw ─▶ network-interfaces/eth0 ─▶ vsock ─▶ mmds/config (V2)
//!   ─▶ mmds ─▶ actions InstanceStart ─▶ … ─▶ actions SendCtrlAltDel
//!   ─▶ bounded wait ─▶ SIGKILL ─▶ remove rules, TAP (veth, namespace), disk,
//!      socket, chroot
//! ```

pub mod api;
pub mod pool;

use crate::host::{Cmd, Host, Process};
use crate::net::firewall;
use crate::net::link::{self, LinkNames};
use crate::net::tap;
use crate::supervise::{self, Supervisor};
use crate::vm::{self, CheckedRootfs, VmDir, VmImage, VmRecord};
use crate::{Driver, DriverError, Endpoints, InstanceInfo, Liveness, SandboxSpec};
use api::{
    ActionType, ApiClient, ApiError, ApiRequest, BootSource, Drive, MachineConfiguration,
    MemoryBackend, MemoryBackendType, MmdsConfig, MmdsVersion, NetworkInterface, NetworkOverride,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType, VmState, Vsock,
};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The guest's network interface as Firecracker and MMDS name it.
pub const IFACE_ID: &str = "eth0";
/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Where inside a jail Firecracker's API socket is (the jailer's default).
const JAILED_SOCKET: &str = "run/firecracker.socket";

/// Run Firecracker under its jailer: chroot, an unprivileged uid/gid, a
/// cgroup and a network namespace per VM.
#[derive(Debug, Clone)]
pub struct JailerConfig {
    pub jailer_bin: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub cgroup_version: u8,
}

#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// Where per-sandbox state lives (`<data_dir>/firecracker`).
    pub root: PathBuf,
    pub firecracker_bin: PathBuf,
    pub jailer: Option<JailerConfig>,
    /// The current image's VM artefacts; `None` when the image was built
    /// without `--vm` (every create then says so).
    pub image: Option<VmImage>,
    pub vcpus: u8,
    /// How long `stop` waits for the guest to power off after Ctrl-Alt-Del.
    pub stop_grace: Duration,
    /// How long Firecracker may take to open its API socket.
    pub socket_timeout: Duration,
}

impl FirecrackerConfig {
    pub fn new(root: PathBuf, image: Option<VmImage>) -> Self {
        FirecrackerConfig {
            root,
            firecracker_bin: PathBuf::from("firecracker"),
            jailer: None,
            image,
            vcpus: 2,
            stop_grace: Duration::from_secs(5),
            socket_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
pub struct FirecrackerDriver {
    cfg: FirecrackerConfig,
    host: Arc<dyn Host>,
    api: Arc<dyn ApiClient>,
    /// The Firecracker process of each sandbox (the jailer execs it, so the
    /// pid is the same). The guest lives in it: Firecracker running is the
    /// guest's supervisor and its payload both alive.
    vmm: Supervisor,
    checked: CheckedRootfs,
}

fn api_err(e: ApiError) -> DriverError {
    // The message carries Firecracker's fault text verbatim.
    DriverError::Other(e.to_string())
}

impl FirecrackerDriver {
    pub fn new(cfg: FirecrackerConfig, host: Arc<dyn Host>, api: Arc<dyn ApiClient>) -> Self {
        FirecrackerDriver {
            vmm: Supervisor::new(
                "firecracker",
                cfg.root.clone(),
                vm::PIDFILE,
                Self::marker,
                host.clone(),
            ),
            cfg,
            host,
            api,
            checked: CheckedRootfs::default(),
        }
    }

    fn dir(&self, id: &str) -> VmDir {
        VmDir(self.cfg.root.join(id))
    }

    /// `--id` is on Firecracker's command line whether jailed or not, and
    /// never last (the trailing space keeps `vm1` from matching `vm10`).
    fn marker(id: &str) -> String {
        format!("--id {id} ")
    }

    fn jail_root(&self, id: &str) -> Option<PathBuf> {
        self.cfg.jailer.as_ref().map(|j| {
            let exec = self
                .cfg
                .firecracker_bin
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "firecracker".into());
            j.chroot_base.join(exec).join(id).join("root")
        })
    }

    fn socket(&self, id: &str) -> PathBuf {
        match self.jail_root(id) {
            Some(root) => root.join(JAILED_SOCKET),
            None => self.dir(id).path().join("api.sock"),
        }
    }

    fn image(&self) -> Result<&VmImage, DriverError> {
        self.cfg.image.as_ref().ok_or_else(|| {
            DriverError::Other(
                "the golden image has no VM artefacts; build them with `airlock image build --vm`"
                    .into(),
            )
        })
    }

    /// The paths Firecracker is given: host paths, or paths inside the jail
    /// (where the files are hard-linked first).
    fn guest_paths(&self, id: &str) -> Result<GuestPaths, DriverError> {
        let image = self.image()?;
        let dir = self.dir(id);
        let host = GuestPaths {
            kernel: image.vmlinux.display().to_string(),
            rootfs: image.rootfs.display().to_string(),
            writable: dir.writable_disk().display().to_string(),
            vsock: dir.path().join("vsock.sock").display().to_string(),
        };
        let Some(jail) = self.jail_root(id) else {
            return Ok(host);
        };
        std::fs::create_dir_all(jail.join("run"))
            .map_err(crate::files::io_err(format!("create {}", jail.display())))?;
        for (src, name) in [
            (&host.kernel, "vmlinux"),
            (&host.rootfs, "rootfs.ext4"),
            (&host.writable, "rw.ext4"),
        ] {
            let dest = jail.join(name);
            if !dest.exists() {
                // A hard link, never a copy: the image and the data dir must
                // share a file system when the jailer is used.
                std::fs::hard_link(src, &dest).map_err(crate::files::io_err(format!(
                    "link {src} into the jail at {}",
                    dest.display()
                )))?;
            }
        }
        // The jailed Firecracker opens the VM's own disk for writing as the
        // jail's uid (the image's files it only reads).
        if let Some(j) = &self.cfg.jailer {
            self.host
                .chown(Path::new(&host.writable), j.uid, j.gid)
                .map_err(|source| DriverError::Host {
                    context: "give the VM's writable disk to the jail's uid".into(),
                    source,
                })?;
        }
        Ok(GuestPaths {
            kernel: "/vmlinux".into(),
            rootfs: "/rootfs.ext4".into(),
            writable: "/rw.ext4".into(),
            vsock: "/run/vsock.sock".into(),
        })
    }

    fn spawn_cmd(&self, id: &str, record: &VmRecord) -> Cmd {
        let fc = self.cfg.firecracker_bin.display().to_string();
        match &self.cfg.jailer {
            None => Cmd::new(&fc).args([
                "--id".to_owned(),
                id.to_owned(),
                "--api-sock".to_owned(),
                self.socket(id).display().to_string(),
            ]),
            Some(j) => {
                let mut cmd = Cmd::new(&j.jailer_bin.display().to_string()).args([
                    "--id".to_owned(),
                    id.to_owned(),
                    "--exec-file".to_owned(),
                    fc,
                    "--uid".to_owned(),
                    j.uid.to_string(),
                    "--gid".to_owned(),
                    j.gid.to_string(),
                    "--chroot-base-dir".to_owned(),
                    j.chroot_base.display().to_string(),
                    "--cgroup-version".to_owned(),
                    j.cgroup_version.to_string(),
                ]);
                if j.cgroup_version == 2 {
                    cmd = cmd.args([
                        "--cgroup".to_owned(),
                        format!("memory.max={}", (record.mem_mib + 256) << 20),
                    ]);
                }
                // The jailer joins it before it execs Firecracker, which then
                // finds the VM's TAP there by name.
                if let Some(ns) = &record.netns {
                    cmd = cmd.args(["--netns".to_owned(), format!("/run/netns/{ns}")]);
                }
                cmd
            }
        }
    }

    /// The configuration calls, in the order Firecracker needs them (MMDS
    /// config names an interface that must already exist).
    pub fn boot_requests(
        record: &VmRecord,
        paths: &GuestPaths,
        metadata: &serde_json::Value,
    ) -> Vec<ApiRequest> {
        vec![
            ApiRequest::machine_config(&MachineConfiguration {
                vcpu_count: record.vcpus,
                mem_size_mib: record.mem_mib,
                smt: false,
                track_dirty_pages: false,
            }),
            ApiRequest::boot_source(&BootSource {
                kernel_image_path: paths.kernel.clone(),
                boot_args: vm::kernel_cmdline(&record.lease()),
            }),
            ApiRequest::drive(&Drive {
                drive_id: "root".into(),
                path_on_host: paths.rootfs.clone(),
                is_root_device: true,
                is_read_only: true,
                cache_type: None,
            }),
            ApiRequest::drive(&Drive {
                drive_id: "rw".into(),
                path_on_host: paths.writable.clone(),
                is_root_device: false,
                is_read_only: false,
                // Thrown away with the VM: flushes buy nothing.
                cache_type: Some(api::CacheType::Unsafe),
            }),
            ApiRequest::network_interface(&NetworkInterface {
                iface_id: IFACE_ID.into(),
                host_dev_name: record.tap.clone(),
                guest_mac: tap::guest_mac(&record.lease()),
            }),
            ApiRequest::vsock(&Vsock {
                guest_cid: 3 + record.lease_index,
                uds_path: paths.vsock.clone(),
            }),
            ApiRequest::mmds_config(&MmdsConfig {
                version: MmdsVersion::V2,
                network_interfaces: vec![IFACE_ID.into()],
                ipv4_address: None,
            }),
            ApiRequest::mmds_put(&api::mmds_contents(metadata)),
            ApiRequest::action(ActionType::InstanceStart),
        ]
    }

    async fn wait_socket(&self, id: &str, vmm: &Process) -> Result<(), DriverError> {
        let socket = self.socket(id);
        let deadline = Instant::now() + self.cfg.socket_timeout;
        loop {
            if socket.exists() {
                return Ok(());
            }
            if self.host.has_exited(vmm) {
                return Err(DriverError::GuestExited(format!(
                    "firecracker exited before opening its API socket: {}",
                    vm::log_tail(&self.dir(id).vmm_log(), 5)
                )));
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout(self.cfg.socket_timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn spawn(&self, id: &str, record: &VmRecord) -> Result<Arc<Process>, DriverError> {
        let _ = std::fs::remove_file(self.socket(id));
        let vmm = self
            .vmm
            .spawn(id, &self.spawn_cmd(id, record), &self.dir(id).vmm_log())
            .await?;
        if let Err(e) = self.wait_socket(id, &vmm).await {
            let _ = self.vmm.kill(id, &vmm).await;
            return Err(e);
        }
        Ok(vmm)
    }

    /// Pause the running VM and write a full snapshot of it: the pool's
    /// template. Every VM restored from it boots nothing: it resumes.
    pub async fn snapshot_create(
        &self,
        id: &str,
        snapshot: &Path,
        memory: &Path,
    ) -> Result<(), DriverError> {
        let socket = self.socket(id);
        for request in [
            ApiRequest::vm_state(VmState::Paused),
            ApiRequest::snapshot_create(&SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: snapshot.display().to_string(),
                mem_file_path: memory.display().to_string(),
            }),
        ] {
            self.api.call(&socket, &request).await.map_err(api_err)?;
        }
        Ok(())
    }

    /// Start a fresh Firecracker for sandbox `id` (already created) from a
    /// snapshot, on the sandbox's own TAP, with its own metadata, paused when
    /// `resume` is false (a pool member waiting to be claimed).
    pub async fn restore(
        &self,
        id: &str,
        snapshot: &Path,
        memory: &Path,
        resume: bool,
    ) -> Result<(), DriverError> {
        let record = VmRecord::read(self.dir(id).path(), id)?;
        let metadata = self.read_metadata(id)?;
        let vmm = self.spawn(id, &record).await?;
        let socket = self.socket(id);
        let mut requests = vec![
            ApiRequest::snapshot_load(&SnapshotLoadParams {
                snapshot_path: snapshot.display().to_string(),
                mem_backend: MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: memory.display().to_string(),
                },
                resume_vm: false,
                network_overrides: vec![NetworkOverride {
                    iface_id: IFACE_ID.into(),
                    host_dev_name: record.tap.clone(),
                }],
                vsock_override: None,
            }),
            ApiRequest::mmds_put(&api::mmds_contents(&metadata)),
        ];
        if resume {
            requests.push(ApiRequest::vm_state(VmState::Resumed));
        }
        for request in requests {
            if let Err(e) = self.api.call(&socket, &request).await {
                let _ = self.vmm.kill(id, &vmm).await;
                return Err(api_err(e));
            }
        }
        Ok(())
    }

    fn read_metadata(&self, id: &str) -> Result<serde_json::Value, DriverError> {
        let path = self.dir(id).metadata();
        let text = std::fs::read_to_string(&path)
            .map_err(crate::files::io_err(format!("read {}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| DriverError::Other(format!("{}: {e}", path.display())))
    }

    async fn create_steps(&self, spec: &SandboxSpec, record: &VmRecord) -> Result<(), DriverError> {
        let dir = self.dir(&spec.id);
        std::fs::create_dir_all(dir.path()).map_err(crate::files::io_err(format!(
            "create {}",
            dir.path().display()
        )))?;
        record.write(dir.path())?;
        let metadata =
            serde_json::to_vec(&spec.metadata).map_err(|e| DriverError::Other(e.to_string()))?;
        crate::files::write_private(&dir.metadata(), &metadata)?;
        vm::create_writable_disk(
            self.host.as_ref(),
            &dir.writable_disk(),
            vm::WRITABLE_DISK_BYTES,
        )
        .await?;
        net_create(self.host.as_ref(), record, spec, self.cfg.jailer.as_ref()).await?;
        firewall::install(
            self.host.as_ref(),
            &link_names(&spec.id),
            &spec.lease,
            spec.proxy_port,
        )
        .await
        .map_err(|source| DriverError::Host {
            context: "install the sandbox's firewall rules".into(),
            source,
        })?;
        Ok(())
    }
}

/// Paths as Firecracker sees them (inside the jail, when jailed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPaths {
    pub kernel: String,
    pub rootfs: String,
    pub writable: String,
    pub vsock: String,
}

/// The firewall hook matches on the host end of the link: the TAP of an
/// unjailed VM, the host end of the veth pair of a jailed one.
fn link_names(id: &str) -> LinkNames {
    LinkNames::for_sandbox(id)
}

/// The VM's link: a TAP in the host's namespace, or (jailed) a namespace of
/// its own with the TAP inside, joined to the host by a veth pair.
async fn net_create(
    host: &dyn Host,
    record: &VmRecord,
    spec: &SandboxSpec,
    jailer: Option<&JailerConfig>,
) -> Result<(), DriverError> {
    // A jailed Firecracker opens the TAP as its own uid.
    let owner = jailer.map(|j| (j.uid, j.gid));
    let (made, context) = match &record.netns {
        None => (
            tap::create_owned(host, &record.tap, &spec.lease, owner).await,
            "create the VM's TAP device",
        ),
        Some(_) => (
            link::create_for_vm(host, &link_names(&spec.id), &spec.lease, owner).await,
            "create the VM's network namespace, veth pair and TAP",
        ),
    };
    made.map_err(|source| DriverError::Host {
        context: context.into(),
        source,
    })
}

#[async_trait]
impl Driver for FirecrackerDriver {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<(), DriverError> {
        // Refused before anything is made: artefacts that do not match the manifest.
        self.image()?.check(&spec.image.build_id, &self.checked)?;
        // A Unix socket's address holds 107 bytes of path: a longer one
        // (a deep chroot base or data dir) could never be connected to.
        let socket = self.socket(&spec.id);
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(DriverError::Other(format!(
                "Firecracker's API socket would be {} ({len} bytes, a Unix socket path \
                 holds at most {MAX_SOCKET_PATH}): use a shorter jailer chroot base or data dir",
                socket.display()
            )));
        }
        let jailed = self.cfg.jailer.is_some();
        let record = VmRecord {
            id: spec.id.clone(),
            kind: spec.kind.as_str().to_owned(),
            build_id: spec.image.build_id.clone(),
            lease_index: spec.lease.index,
            host_addr: spec.lease.host,
            guest_addr: spec.lease.guest,
            prefix_len: spec.lease.prefix_len,
            tap: if jailed {
                link::VM_TAP.into()
            } else {
                tap::name(&spec.id)
            },
            netns: jailed.then(|| link_names(&spec.id).netns),
            mem_mib: vm::mem_mib(spec.limits.memory_bytes),
            vcpus: self.cfg.vcpus,
        };
        supervise::or_roll_back(
            &spec.id,
            self.create_steps(spec, &record),
            self.destroy(&spec.id),
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        let record = VmRecord::read(self.dir(id).path(), id)?;
        if self.vmm.find(id).is_some() {
            return Ok(());
        }
        let paths = self.guest_paths(id)?;
        let metadata = self.read_metadata(id)?;
        let vmm = self.spawn(id, &record).await?;
        let socket = self.socket(id);
        for request in Self::boot_requests(&record, &paths, &metadata) {
            if let Err(e) = self.api.call(&socket, &request).await {
                let _ = self.vmm.kill(id, &vmm).await;
                return Err(api_err(e));
            }
        }
        Ok(())
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Endpoints, DriverError> {
        let record = VmRecord::read(self.dir(id).path(), id)?;
        self.vmm
            .wait_ready(id, Endpoints::for_guest(record.guest_addr), timeout, || {
                vm::log_tail(&self.dir(id).vmm_log(), 5)
            })
            .await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        // Ctrl-Alt-Del makes the guest's systemd reboot, and `reboot=k` on a
        // VMM that cannot reboot ends the process: a clean poweroff.
        let socket = self.socket(id);
        self.vmm
            .stop(id, grace, |_| async move {
                self.api
                    .call(&socket, &ApiRequest::action(ActionType::SendCtrlAltDel))
                    .await
                    .is_ok()
            })
            .await
    }

    async fn destroy(&self, id: &str) -> Result<(), DriverError> {
        self.stop(id, self.cfg.stop_grace).await?;
        let names = link_names(id);
        firewall::remove(self.host.as_ref(), &names).await;
        // A sandbox half made has no record yet: the configuration says what
        // it would have had. A record says so too when the configuration has
        // changed since (a jailed VM re-adopted by an unjailed driver).
        let own_netns = self.cfg.jailer.is_some()
            || VmRecord::read(self.dir(id).path(), id).is_ok_and(|r| r.netns.is_some());
        if own_netns {
            link::destroy_for_vm(self.host.as_ref(), &names).await;
        } else {
            tap::destroy(self.host.as_ref(), &names.host_if).await;
        }
        if let Some(jail) = self.jail_root(id) {
            if let Some(parent) = jail.parent() {
                crate::files::remove_dir(parent)?;
            }
        }
        crate::files::remove_dir(self.dir(id).path())
    }

    async fn inspect(&self, id: &str) -> Result<InstanceInfo, DriverError> {
        VmRecord::read(self.dir(id).path(), id)?;
        Ok(self.vmm.info(id))
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>, DriverError> {
        self.vmm.list()
    }

    async fn liveness(&self, id: &str) -> Result<Liveness, DriverError> {
        VmRecord::read(self.dir(id).path(), id)?;
        Ok(self.vmm.liveness(id))
    }
}

#[cfg(test)]
pub(crate) mod tests;
