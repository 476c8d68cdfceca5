//! The QEMU driver: the same guest kernel and ext4 as Firecracker, on QEMU's
//! `microvm` machine (virtio-mmio devices from the kernel command line), with KVM where
//! it really runs a guest and TCG otherwise. The metadata document goes in
//! through fw_cfg (`opt/airlock/metadata`, root-only in the guest).
//!
//! Whether KVM works is probed once per driver: `/dev/kvm` can exist on a
//! host whose guests never make progress, so the probe boots the guest
//! kernel with no disk and waits for its panic (well under a second on
//! working KVM); a probe that hangs means TCG.
//!
//! On-disk state per sandbox, under `<root>/<id>/`:
//!
//! ```text
//! sandbox.json    what was created (build, lease, TAP, size)
//! metadata.json   the document fw_cfg serves (root-only)
//! rw.ext4         the VM's writable disk: sparse, thrown away on destroy
//! qmp.sock        QEMU's machine protocol socket (graceful stop)
//! vmm.pid         pid of the QEMU process once started
//! vmm.log         what QEMU printed
//! serial.log      the guest's serial console
//! ```

pub mod qmp;

use crate::host::{Cmd, Host};
use crate::net::firewall;
use crate::net::link::LinkNames;
use crate::net::tap;
use crate::supervise::{self, Supervisor};
use crate::vm::{self, CheckedRootfs, VmDir, VmImage, VmRecord};
use crate::{Driver, DriverError, Endpoints, InstanceInfo, Liveness, SandboxSpec};
use airlock_proto::metadata::{FW_CFG_CMDLINE_FLAG, FW_CFG_METADATA_NAME};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the KVM probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProbe {
    Works(Duration),
    NoDevice,
    /// `/dev/kvm` is there but the guest made no progress within the time.
    Hangs(Duration),
    /// QEMU refused to start with KVM (its words).
    Refused(String),
}

impl KvmProbe {
    pub fn accel(&self) -> Accel {
        match self {
            KvmProbe::Works(_) => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }
}

impl std::fmt::Display for KvmProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmProbe::Works(t) => write!(f, "KVM runs a guest (kernel reached its panic in {t:.1?})"),
            KvmProbe::NoDevice => write!(f, "no /dev/kvm"),
            KvmProbe::Hangs(t) => write!(
                f,
                "/dev/kvm exists but a guest made no progress in {t:?} (KVM is present but does not run guests)"
            ),
            KvmProbe::Refused(why) => write!(f, "QEMU could not use KVM: {why}"),
        }
    }
}

/// Boot `kernel` under KVM with no disk: a working KVM reaches the kernel's
/// "cannot mount root" panic and, with `panic=-1` and `-no-reboot`, QEMU exits.
pub async fn probe_kvm(qemu_bin: &str, kernel: &Path, within: Duration) -> KvmProbe {
    if !Path::new("/dev/kvm").exists() {
        return KvmProbe::NoDevice;
    }
    let started = Instant::now();
    let child = tokio::process::Command::new(qemu_bin)
        .args([
            "-M",
            "microvm,acpi=off,pit=on,pic=on,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-append",
            "console=ttyS0 panic=-1",
            "-kernel",
        ])
        .arg(kernel)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return KvmProbe::Refused(format!("{qemu_bin}: {e}")),
    };
    match tokio::time::timeout(within, child.wait_with_output()).await {
        Err(_) => KvmProbe::Hangs(within),
        Ok(Err(e)) => KvmProbe::Refused(e.to_string()),
        Ok(Ok(out)) => {
            let console = String::from_utf8_lossy(&out.stdout);
            if console.contains("Kernel panic") || console.contains("Linux version") {
                KvmProbe::Works(started.elapsed())
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                KvmProbe::Refused(err.trim().lines().last().unwrap_or("no output").to_owned())
            }
        }
    }
}

/// The host's TSC rate in kHz, from `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Where per-sandbox state lives (`<data_dir>/qemu`).
    pub root: PathBuf,
    pub qemu_bin: String,
    /// The current image's VM artefacts; `None` when built without `--vm`.
    pub image: Option<VmImage>,
    pub vcpus: u8,
    /// `None`: probe KVM once, fall back to TCG.
    pub accel: Option<Accel>,
    pub kvm_probe_timeout: Duration,
    pub stop_grace: Duration,
}

impl QemuConfig {
    pub fn new(root: PathBuf, image: Option<VmImage>) -> Self {
        QemuConfig {
            root,
            qemu_bin: "qemu-system-x86_64".into(),
            image,
            vcpus: 2,
            accel: None,
            kvm_probe_timeout: Duration::from_secs(15),
            stop_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
pub struct QemuDriver {
    cfg: QemuConfig,
    host: Arc<dyn Host>,
    /// The QEMU process of each sandbox. The guest lives in it: QEMU running
    /// is the guest's supervisor and its payload both alive.
    vmm: Supervisor,
    checked: CheckedRootfs,
    accel: tokio::sync::OnceCell<Accel>,
}

impl QemuDriver {
    pub fn new(cfg: QemuConfig, host: Arc<dyn Host>) -> Self {
        QemuDriver {
            vmm: Supervisor::new(
                "qemu",
                cfg.root.clone(),
                vm::PIDFILE,
                Self::marker,
                host.clone(),
            ),
            cfg,
            host,
            checked: CheckedRootfs::default(),
            accel: tokio::sync::OnceCell::new(),
        }
    }

    fn dir(&self, id: &str) -> VmDir {
        VmDir(self.cfg.root.join(id))
    }

    fn marker(id: &str) -> String {
        format!("-name airlock-{id} ")
    }

    fn qmp_socket(&self, id: &str) -> PathBuf {
        self.dir(id).path().join("qmp.sock")
    }

    fn image(&self) -> Result<&VmImage, DriverError> {
        self.cfg.image.as_ref().ok_or_else(|| {
            DriverError::Other(
                "the golden image has no VM artefacts; build them with `airlock image build --vm`"
                    .into(),
            )
        })
    }

    /// KVM if it really runs guests here, else TCG; decided once.
    pub async fn accel(&self) -> Result<Accel, DriverError> {
        if let Some(a) = self.cfg.accel {
            return Ok(a);
        }
        let kernel = self.image()?.bzimage.clone();
        let accel = self
            .accel
            .get_or_init(|| async {
                let probe =
                    probe_kvm(&self.cfg.qemu_bin, &kernel, self.cfg.kvm_probe_timeout).await;
                tracing::info!(%probe, "qemu: KVM probe");
                probe.accel()
            })
            .await;
        Ok(*accel)
    }

    /// QEMU's command line for one sandbox.
    pub fn command(&self, id: &str, record: &VmRecord, accel: Accel) -> Result<Cmd, DriverError> {
        let image = self.image()?;
        let dir = self.dir(id);
        let cpu = match accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        // Under TCG a second vCPU never comes up on `microvm` (the guest
        // hangs bringing up secondary CPUs), and the TSC cannot be calibrated
        // against an emulated PIT on a busy host: one vCPU, and the host's
        // TSC rate (what TCG's TSC runs at) given to the guest.
        let (vcpus, mut cmdline) = match accel {
            Accel::Kvm => (record.vcpus, vm::kernel_cmdline(&record.lease())),
            Accel::Tcg => (1, vm::kernel_cmdline(&record.lease())),
        };
        // Devices are found from the command line QEMU appends
        // (`virtio_mmio.device=`), not through ACPI: with this kernel the
        // microvm DSDT fails to load (AE_BAD_PARAMETER), so QEMU offers no
        // ACPI tables. The kernel's fw_cfg driver needs ACPI to find its
        // device, so the agent reads fw_cfg over its I/O ports, and only
        // where this flag says the device is there.
        // `reboot=t`: there is no keyboard controller to reset through.
        cmdline = cmdline.replace("reboot=k", "reboot=t");
        cmdline.push(' ');
        cmdline.push_str(FW_CFG_CMDLINE_FLAG);
        if accel == Accel::Tcg {
            cmdline.push_str(" tsc=reliable");
            if let Some(khz) = host_tsc_khz() {
                cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        Ok(Cmd::new(&self.cfg.qemu_bin).args([
            "-name".to_owned(),
            format!("airlock-{id}"),
            "-M".to_owned(),
            // PIT and PIC spelled out: without them the guest has no timer
            // interrupt before its local APIC timer is calibrated.
            "microvm,acpi=off,pit=on,pic=on,rtc=on".to_owned(),
            "-accel".to_owned(),
            accel.as_str().to_owned(),
            "-cpu".to_owned(),
            cpu.to_owned(),
            "-smp".to_owned(),
            vcpus.to_string(),
            "-m".to_owned(),
            format!("{}M", record.mem_mib),
            "-nodefaults".to_owned(),
            "-no-user-config".to_owned(),
            "-display".to_owned(),
            "none".to_owned(),
            // A guest that reboots (Ctrl-Alt-Del, `reboot=k`) ends QEMU.
            "-no-reboot".to_owned(),
            "-kernel".to_owned(),
            image.bzimage.display().to_string(),
            "-append".to_owned(),
            cmdline,
            "-drive".to_owned(),
            format!(
                "id=root,file={},format=raw,if=none,readonly=on",
                image.rootfs.display()
            ),
            "-device".to_owned(),
            "virtio-blk-device,drive=root".to_owned(),
            "-drive".to_owned(),
            format!(
                "id=rw,file={},format=raw,if=none,cache=unsafe,discard=unmap",
                dir.writable_disk().display()
            ),
            "-device".to_owned(),
            "virtio-blk-device,drive=rw".to_owned(),
            "-netdev".to_owned(),
            format!("tap,id=net0,ifname={},script=no,downscript=no", record.tap),
            "-device".to_owned(),
            format!(
                "virtio-net-device,netdev=net0,mac={}",
                tap::guest_mac(&record.lease())
            ),
            "-device".to_owned(),
            "virtio-rng-device".to_owned(),
            "-device".to_owned(),
            "virtio-keyboard-device".to_owned(),
            "-fw_cfg".to_owned(),
            format!(
                "name={FW_CFG_METADATA_NAME},file={}",
                dir.metadata().display()
            ),
            "-chardev".to_owned(),
            format!("file,id=serial0,path={}", dir.serial_log().display()),
            "-serial".to_owned(),
            "chardev:serial0".to_owned(),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", self.qmp_socket(id).display()),
        ]))
    }

    fn failure_tail(&self, id: &str) -> String {
        let dir = self.dir(id);
        let qemu = vm::log_tail(&dir.vmm_log(), 3);
        let serial = vm::log_tail(&dir.serial_log(), 5);
        match (qemu.is_empty(), serial.is_empty()) {
            (true, _) => format!("guest console: {serial}"),
            (false, true) => format!("qemu: {qemu}"),
            (false, false) => format!("qemu: {qemu}; guest console: {serial}"),
        }
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
        tap::create(self.host.as_ref(), &record.tap, &spec.lease)
            .await
            .map_err(|source| DriverError::Host {
                context: "create the VM's TAP device".into(),
                source,
            })?;
        firewall::install(
            self.host.as_ref(),
            &LinkNames::for_sandbox(&spec.id),
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

#[async_trait]
impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<(), DriverError> {
        self.image()?.check(&spec.image.build_id, &self.checked)?;
        let record = VmRecord {
            id: spec.id.clone(),
            kind: spec.kind.as_str().to_owned(),
            build_id: spec.image.build_id.clone(),
            lease_index: spec.lease.index,
            host_addr: spec.lease.host,
            guest_addr: spec.lease.guest,
            prefix_len: spec.lease.prefix_len,
            tap: tap::name(&spec.id),
            netns: None,
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
        let accel = self.accel().await?;
        let cmd = self.command(id, &record, accel)?;
        let _ = std::fs::remove_file(self.qmp_socket(id));
        self.vmm.spawn(id, &cmd, &self.dir(id).vmm_log()).await?;
        Ok(())
    }

    async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Endpoints, DriverError> {
        let record = VmRecord::read(self.dir(id).path(), id)?;
        self.vmm
            .wait_ready(id, Endpoints::for_guest(record.guest_addr), timeout, || {
                self.failure_tail(id)
            })
            .await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let qmp = self.qmp_socket(id);
        self.vmm
            .stop(id, grace, |_| async move {
                qmp::execute(&qmp, &qmp::ctrl_alt_del(), Duration::from_secs(2))
                    .await
                    .is_ok()
            })
            .await
    }

    async fn destroy(&self, id: &str) -> Result<(), DriverError> {
        self.stop(id, self.cfg.stop_grace).await?;
        firewall::remove(self.host.as_ref(), &LinkNames::for_sandbox(id)).await;
        tap::destroy(self.host.as_ref(), &tap::name(id)).await;
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
mod tests {
    use super::*;
    use crate::firecracker::tests::sandbox;
    use crate::host::FakeHost;

    fn driver(tmp: &Path, host: Arc<FakeHost>) -> QemuDriver {
        let k = tmp.join("bzImage");
        let r = tmp.join("root.ext4");
        std::fs::write(&k, b"kernel").expect("w");
        std::fs::write(&r, b"rootfs").expect("w");
        let image = VmImage {
            build_id: "b1".into(),
            vmlinux: k.clone(),
            bzimage: k.clone(),
            vmlinux_sha256: airlock_image::inputs::sha256_file(&k).expect("h"),
            bzimage_sha256: airlock_image::inputs::sha256_file(&k).expect("h"),
            rootfs: r.clone(),
            rootfs_sha256: airlock_image::inputs::sha256_file(&r).expect("h"),
            rootfs_size: 6,
        };
        let mut cfg = QemuConfig::new(tmp.join("qemu"), Some(image));
        cfg.accel = Some(Accel::Tcg);
        cfg.stop_grace = Duration::from_millis(100);
        QemuDriver::new(cfg, host)
    }

    #[tokio::test]
    async fn boots_with_both_disks_fw_cfg_and_its_tap_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        let d = driver(tmp.path(), host.clone());
        d.create(&sandbox("q1")).await.expect("create");
        d.start("q1").await.expect("start");
        let line = host
            .commands()
            .into_iter()
            .find(|c| c.starts_with("qemu-system-x86_64"))
            .expect("qemu ran");
        for part in [
            "-name airlock-q1 ",
            "-M microvm,acpi=off,pit=on,pic=on,rtc=on -accel tcg -cpu max -smp 1",
            "eth0:off airlock.fw_cfg=ioport tsc=reliable",
            "readonly=on",
            "rw.ext4,format=raw",
            "ifname=alq1,script=no",
            "-fw_cfg name=opt/airlock/metadata,file=",
            "ip=10.235.0.22::10.235.0.21:255.255.255.252::eth0:off",
            "-no-reboot",
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
        assert!(d.inspect("q1").await.expect("inspect").running);
        d.destroy("q1").await.expect("destroy");
        assert!(!tmp.path().join("qemu/q1").exists());
        assert!(host.commands().contains(&"ip link del alq1".to_owned()));
        assert!(d.list().await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn a_guest_that_dies_during_boot_fails_with_its_console() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let host = Arc::new(FakeHost::default());
        let d = driver(tmp.path(), host.clone());
        d.create(&sandbox("q2")).await.expect("create");
        d.start("q2").await.expect("start");
        std::fs::write(
            tmp.path().join("qemu/q2/serial.log"),
            "Kernel panic - not syncing: VFS: Unable to mount root fs\n",
        )
        .expect("w");
        let pid = d.vmm.pid("q2").expect("pid");
        assert_eq!(d.liveness("q2").await.expect("liveness"), Liveness::Alive);
        host.signal(pid, libc::SIGKILL).expect("kill");
        assert_eq!(
            d.liveness("q2").await.expect("liveness"),
            Liveness::Dead(format!("qemu (pid {pid}) exited"))
        );
        let started = Instant::now();
        let err = d
            .wait_ready("q2", Duration::from_secs(30))
            .await
            .expect_err("exited");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("Unable to mount root fs"), "{err}");
        d.destroy("q2").await.expect("destroy");
    }
}
