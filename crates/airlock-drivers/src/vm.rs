//! What the VM drivers (QEMU and Firecracker) share: the image's VM artefacts
//! and their check before boot, the per-VM writable disk, the guest kernel
//! command line, and the on-disk record a VM sandbox is re-adopted from.
//!
//! Both VMMs boot the same two disks: the image's ext4, attached read-only and
//! shared by every VM of a build, and a sparse ext4 of the VM's own. The
//! guest's first process (`/usr/local/sbin/airlock-vm-init`, in the image)
//! puts an overlay of the second over the first and hands over to systemd, so
//! the image is never copied and never written.

use crate::files::{chain, write_private};
use crate::host::{Cmd, Host, HostError};
use crate::{DriverError, Lease};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The guest's first process: overlays the VM's writable disk on the shared
/// read-only root, then execs systemd.
pub const VM_INIT: &str = "/usr/local/sbin/airlock-vm-init";
/// File-system label of the per-VM writable disk (the guest finds it by label).
pub const WRITABLE_LABEL: &str = "airlock-rw";
/// The VMM's pid file in a sandbox's directory (see [`crate::supervise`]).
pub const PIDFILE: &str = "vmm.pid";
/// Size of the sparse writable disk: what a guest may write before it is full.
pub const WRITABLE_DISK_BYTES: u64 = 8 << 30;

/// The golden image's VM artefacts, as its manifest records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmImage {
    pub build_id: String,
    /// Uncompressed ELF kernel (Firecracker; QEMU through PVH).
    pub vmlinux: PathBuf,
    /// Compressed kernel with the x86 boot protocol (QEMU `-kernel`).
    pub bzimage: PathBuf,
    pub vmlinux_sha256: String,
    pub bzimage_sha256: String,
    /// The image as one ext4 file system, attached read-only.
    pub rootfs: PathBuf,
    pub rootfs_sha256: String,
    pub rootfs_size: u64,
}

impl VmImage {
    /// The VM artefacts a build's manifest records; `None` for a build made
    /// without `--vm`.
    pub fn of(manifest: &airlock_image::Manifest) -> Option<VmImage> {
        let vm = manifest.vm.as_ref()?;
        Some(VmImage {
            build_id: manifest.build_id.clone(),
            vmlinux: vm.kernel.vmlinux.clone(),
            bzimage: vm.kernel.bzimage.clone(),
            vmlinux_sha256: vm.kernel.vmlinux_sha256.clone(),
            bzimage_sha256: vm.kernel.bzimage_sha256.clone(),
            rootfs: vm.rootfs.path.clone(),
            rootfs_sha256: vm.rootfs.sha256.clone(),
            rootfs_size: vm.rootfs.size,
        })
    }
}

/// Which (path, size, mtime) of a root file system was already hashed and
/// matched: hashing gigabytes before every boot would cost seconds each time.
#[derive(Debug, Default)]
pub struct CheckedRootfs(Mutex<Option<(PathBuf, u64, SystemTime)>>);

impl VmImage {
    /// Refuse to boot artefacts that do not match the manifest: a kernel is
    /// hashed every time (a few MiB); the root file system when its size or
    /// modification time differs from the last time it matched.
    pub fn check(&self, build_id: &str, checked: &CheckedRootfs) -> Result<(), DriverError> {
        if self.build_id != build_id {
            return Err(DriverError::Other(format!(
                "the VM artefacts are of image build {}, the sandbox wants {build_id} \
                 (run `airlock image build --vm`)",
                self.build_id
            )));
        }
        for (what, path, want) in [
            ("kernel", &self.vmlinux, &self.vmlinux_sha256),
            ("kernel", &self.bzimage, &self.bzimage_sha256),
        ] {
            let got = sha256(path)?;
            if &got != want {
                return Err(mismatch(what, path, want, &got));
            }
        }
        let meta = std::fs::metadata(&self.rootfs).map_err(|e| DriverError::Host {
            context: format!("the image's root file system {}", self.rootfs.display()),
            source: HostError::Io {
                what: format!("stat {}", self.rootfs.display()),
                source: e,
            },
        })?;
        if meta.len() != self.rootfs_size {
            return Err(DriverError::Other(format!(
                "root file system {} is {} bytes, the manifest says {}: refusing to boot it",
                self.rootfs.display(),
                meta.len(),
                self.rootfs_size
            )));
        }
        let key = (
            self.rootfs.clone(),
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let mut last = checked
            .0
            .lock()
            .map_err(|_| DriverError::Other("rootfs check lock poisoned".into()))?;
        if last.as_ref() != Some(&key) {
            let got = sha256(&self.rootfs)?;
            if got != self.rootfs_sha256 {
                return Err(mismatch(
                    "root file system",
                    &self.rootfs,
                    &self.rootfs_sha256,
                    &got,
                ));
            }
            *last = Some(key);
        }
        Ok(())
    }
}

fn mismatch(what: &str, path: &Path, want: &str, got: &str) -> DriverError {
    DriverError::Other(format!(
        "{what} {} does not match the manifest (sha256 {}…, expected {}…): refusing to boot it",
        path.display(),
        &got[..12.min(got.len())],
        &want[..12.min(want.len())]
    ))
}

fn sha256(path: &Path) -> Result<String, DriverError> {
    airlock_image::inputs::sha256_file(path)
        .map_err(|e| DriverError::Other(format!("hash {}: {}", path.display(), chain(&e))))
}

/// The dotted netmask of a prefix length (the kernel's `ip=` wants it so).
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    })
}

/// The guest kernel's command line. The address comes from the kernel's own
/// `ip=` configuration, before init: the same lease the metadata document
/// carries, and the shared image needs no network unit that nspawn would not
/// want. `reboot=k panic=1`: a guest that reboots or panics ends its VMM,
/// which the driver sees as the guest exiting.
pub fn kernel_cmdline(lease: &Lease) -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 root=/dev/vda ro rootfstype=ext4 init={VM_INIT} \
         ip={guest}::{gw}:{mask}::eth0:off",
        guest = lease.guest,
        gw = lease.host,
        mask = netmask(lease.prefix_len),
    )
}

/// Make the VM's writable disk: a sparse file with an empty ext4 on it, so it
/// costs a few MiB until the guest writes. A failure (a full disk) removes
/// the file again.
pub async fn create_writable_disk(
    host: &dyn Host,
    path: &Path,
    bytes: u64,
) -> Result<(), DriverError> {
    let io = |what: String| {
        move |source| DriverError::Host {
            context: "create the VM's writable disk".into(),
            source: HostError::Io { what, source },
        }
    };
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .map_err(io(format!("create {}", path.display())))?;
    file.set_len(bytes)
        .map_err(io(format!("size {}", path.display())))?;
    drop(file);
    let mkfs = Cmd::new("mke2fs").args([
        "-q",
        "-F",
        "-t",
        "ext4",
        // Thrown away with the VM: no journal, no reserved blocks, and the
        // inode tables are initialised lazily by the guest.
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,nodiscard",
        "-L",
        WRITABLE_LABEL,
        &path.display().to_string(),
    ]);
    if let Err(source) = host.run(&mkfs).await {
        let _ = std::fs::remove_file(path);
        return Err(DriverError::Host {
            context: "create the VM's writable disk".into(),
            source,
        });
    }
    Ok(())
}

/// What a VM driver records about a sandbox it created (`sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub id: String,
    pub kind: String,
    pub build_id: String,
    pub lease_index: u32,
    pub host_addr: Ipv4Addr,
    pub guest_addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The TAP as the VMM opens it (inside `netns` when there is one).
    pub tap: String,
    /// The VM's own network namespace (a jailed Firecracker), joined to the
    /// host by a veth pair; `None`: the TAP is in the host's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
}

impl VmRecord {
    pub fn lease(&self) -> Lease {
        Lease {
            index: self.lease_index,
            host: self.host_addr,
            guest: self.guest_addr,
            prefix_len: self.prefix_len,
        }
    }

    pub fn read(dir: &Path, id: &str) -> Result<VmRecord, DriverError> {
        let path = dir.join("sandbox.json");
        let text =
            std::fs::read_to_string(&path).map_err(|_| DriverError::NotFound(id.to_owned()))?;
        serde_json::from_str(&text)
            .map_err(|e| DriverError::Other(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, dir: &Path) -> Result<(), DriverError> {
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| DriverError::Other(e.to_string()))?;
        write_private(&dir.join("sandbox.json"), &bytes)
    }
}

/// Memory for a VM from the sandbox's limit (MiB), 2 GiB when unlimited.
pub fn mem_mib(limit: Option<u64>) -> u64 {
    limit.map(|b| (b >> 20).max(256)).unwrap_or(2048)
}

/// The last `lines` non-empty lines of a log, joined with ` | `.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let tail: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(lines)
        .collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Paths of one VM sandbox's state directory.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn writable_disk(&self) -> PathBuf {
        self.0.join("rw.ext4")
    }
    pub fn metadata(&self) -> PathBuf {
        self.0.join("metadata.json")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.0.join(PIDFILE)
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.0.join("serial.log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;

    #[test]
    fn cmdline_carries_the_lease_and_the_init() {
        let lease = Lease {
            index: 0,
            host: Ipv4Addr::new(10, 235, 0, 1),
            guest: Ipv4Addr::new(10, 235, 0, 2),
            prefix_len: 30,
        };
        let line = kernel_cmdline(&lease);
        assert!(line.contains("ip=10.235.0.2::10.235.0.1:255.255.255.252::eth0:off"));
        assert!(line.contains("init=/usr/local/sbin/airlock-vm-init"));
        assert!(line.contains("root=/dev/vda ro"));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
    }

    #[tokio::test]
    async fn writable_disk_is_sparse_and_removed_when_mkfs_fails() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let disk = tmp.path().join("rw.ext4");
        let host = FakeHost::default();
        create_writable_disk(&host, &disk, 1 << 30)
            .await
            .expect("create");
        let meta = std::fs::metadata(&disk).expect("exists");
        assert_eq!(meta.len(), 1 << 30);
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) < 64, "sparse");
        assert!(host.commands()[0].starts_with("mke2fs -q -F -t ext4"));
        std::fs::remove_file(&disk).expect("rm");
        let host = FakeHost::default();
        host.fail_on("mke2fs");
        create_writable_disk(&host, &disk, 1 << 30)
            .await
            .expect_err("mkfs fails");
        assert!(!disk.exists(), "nothing left behind");
    }

    #[test]
    fn artefacts_that_do_not_match_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let k = tmp.path().join("vmlinux");
        let r = tmp.path().join("root.ext4");
        std::fs::write(&k, b"kernel").expect("w");
        std::fs::write(&r, b"rootfs").expect("w");
        let good = VmImage {
            build_id: "b1".into(),
            vmlinux: k.clone(),
            bzimage: k.clone(),
            vmlinux_sha256: airlock_image::inputs::sha256_file(&k).expect("h"),
            bzimage_sha256: airlock_image::inputs::sha256_file(&k).expect("h"),
            rootfs: r.clone(),
            rootfs_sha256: airlock_image::inputs::sha256_file(&r).expect("h"),
            rootfs_size: 6,
        };
        let checked = CheckedRootfs::default();
        good.check("b1", &checked).expect("matches");
        let err = good.check("b2", &checked).expect_err("other build");
        assert!(err.to_string().contains("image build b1"), "{err}");
        std::fs::write(&k, b"KERNEL").expect("w");
        let err = good.check("b1", &checked).expect_err("kernel changed");
        assert!(
            err.to_string().contains("does not match the manifest"),
            "{err}"
        );
        std::fs::write(&k, b"kernel").expect("w");
        std::fs::write(&r, b"rootfs-grown").expect("w");
        let err = good.check("b1", &checked).expect_err("rootfs changed");
        assert!(err.to_string().contains("bytes"), "{err}");
        std::fs::write(&r, b"ROOTFS").expect("w");
        let fresh = CheckedRootfs::default();
        let err = good
            .check("b1", &fresh)
            .expect_err("same size, other bytes");
        assert!(err.to_string().contains("root file system"), "{err}");
    }
}
