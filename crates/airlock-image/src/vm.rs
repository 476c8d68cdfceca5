//! The image's VM artefacts (`airlock image build --vm`): the golden image as
//! one ext4 file system, and a guest kernel built from Debian's
//! `linux-source` package with airlock's own microVM configuration
//! (`image/kernel/microvm.config`). Both are cached by digest and recorded in
//! the build's manifest.
//!
//! ```text
//! <image dir>/
//!   kernels/<digest16>/{vmlinux,bzImage,config}   complete if present
//!   kernel-src/<source16>/linux-source-*/         kept for incremental rebuilds
//!   rootfs/<digest16>.ext4                         read-only, complete if present
//! ```
//!
//! The kernel's digest covers the configuration fragment, the source tarball's
//! sha256 and this recipe's version; the ext4's covers the build id (itself a
//! digest of every layer) and this recipe's version. The ext4 is made by
//! `mke2fs -d` from a read-only overlay of the layers: no loop device, and as
//! root the tree's owners are kept as they are.

use crate::host::{self, mkdirs, run_ok};
use crate::inputs::{embedded_str, sha256_file, Hasher};
use crate::manifest::Manifest;
use crate::{ImageError, Progress};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bumped when how the kernel is built changes (not what it is built from).
const KERNEL_RECIPE: &str = "kernel-v1";
/// Bumped when how the ext4 is made changes.
const ROOTFS_RECIPE: &str = "rootfs-v1";
/// The microVM configuration, applied on top of `allnoconfig`.
pub const KERNEL_CONFIG_INPUT: &str = "kernel/microvm.config";
/// Where Debian's `linux-source-X.Y` package puts its tarball.
const SOURCE_DIR: &str = "/usr/src";

const KERNEL_STAGE: &str = "vm-kernel";
/// The extracted source (about 1.6 GiB) and the objects of our small config.
const KERNEL_BUILD_SPACE: u64 = 3 << 30;
const ROOTFS_STAGE: &str = "vm-rootfs";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmArtefacts {
    pub kernel: KernelRecord,
    pub rootfs: RootfsRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelRecord {
    /// Cache key: sha256 of the config fragment, the source tarball and the recipe.
    pub digest: String,
    /// The tarball it was built from, e.g. `linux-source-6.1.tar.xz`.
    pub source: String,
    pub source_sha256: String,
    pub vmlinux: PathBuf,
    pub vmlinux_sha256: String,
    pub bzimage: PathBuf,
    pub bzimage_sha256: String,
    /// The full `.config` the kernel was built with.
    pub config: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RootfsRecord {
    pub digest: String,
    pub path: PathBuf,
    pub sha256: String,
    /// Bytes of the file (the file system's size).
    pub size: u64,
}

/// The newest `linux-source-*.tar.xz` Debian installed.
pub fn find_kernel_source() -> Result<PathBuf, ImageError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(SOURCE_DIR)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| version_key(p));
    found.pop().ok_or_else(|| {
        ImageError::Recipe(format!(
            "no kernel source in {SOURCE_DIR}: install Debian's linux-source package \
             (see scripts/host-packages.txt)"
        ))
    })
}

/// `linux-source-6.10.tar.xz` sorts after `linux-source-6.9.tar.xz`.
fn version_key(p: &Path) -> Vec<u32> {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("linux-source-"))
        .and_then(|n| n.strip_suffix(".tar.xz"))
        .map(|v| v.split('.').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// The configuration lines the kernel must end up with (comments dropped).
pub fn required_config_lines() -> Result<Vec<String>, ImageError> {
    Ok(embedded_str(KERNEL_CONFIG_INPUT)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

pub fn kernel_digest(source_sha256: &str) -> Result<String, ImageError> {
    let mut h = Hasher::new(KERNEL_RECIPE);
    h.field("config", embedded_str(KERNEL_CONFIG_INPUT)?.as_bytes())
        .field("source", source_sha256.as_bytes());
    Ok(h.finish())
}

/// How cached artefacts are named: the first 16 hex digits of their digest
/// (`kernels/<short>/`, `kernel-src/<short of the tarball>/`,
/// `rootfs/<short>.ext4`). Pruning finds them by the same names.
pub(crate) fn short(digest: &str) -> &str {
    &digest[..16.min(digest.len())]
}

pub fn rootfs_digest(build_id: &str) -> String {
    let mut h = Hasher::new(ROOTFS_RECIPE);
    h.field("build", build_id.as_bytes());
    h.finish()
}

/// Size for the ext4: the layers' bytes with room for metadata and small
/// files' block rounding, in MiB.
fn rootfs_mib(content_bytes: u64) -> u64 {
    let mib = content_bytes.div_ceil(1 << 20);
    mib + mib / 4 + 256
}

pub(crate) struct VmBuilder<'a> {
    pub dir: &'a Path,
    pub progress: &'a dyn Progress,
}

impl VmBuilder<'_> {
    fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub fn ensure_kernel(&self, timings: &mut Timings) -> Result<KernelRecord, ImageError> {
        let source = find_kernel_source()?;
        let source_sha256 = sha256_file(&source)?;
        let digest = kernel_digest(&source_sha256)?;
        let out = self.dir.join("kernels").join(short(&digest));
        let started = Instant::now();
        self.progress
            .stage(KERNEL_STAGE, timings.estimate(KERNEL_STAGE, 900));
        if !out.join("vmlinux").is_file() {
            host::ensure_space("building the guest kernel", self.dir, KERNEL_BUILD_SPACE)?;
            self.build_kernel(&source, &source_sha256, &out)?;
            timings.record(KERNEL_STAGE, started.elapsed());
            self.progress.done(KERNEL_STAGE, started.elapsed(), false);
        } else {
            self.progress.done(KERNEL_STAGE, started.elapsed(), true);
        }
        Ok(KernelRecord {
            digest,
            source: source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            source_sha256,
            vmlinux_sha256: sha256_file(&out.join("vmlinux"))?,
            bzimage_sha256: sha256_file(&out.join("bzImage"))?,
            vmlinux: out.join("vmlinux"),
            bzimage: out.join("bzImage"),
            config: out.join("config"),
        })
    }

    fn build_kernel(
        &self,
        source: &Path,
        source_sha256: &str,
        out: &Path,
    ) -> Result<(), ImageError> {
        // The extracted tree is kept, keyed by the tarball: a change of the
        // configuration then rebuilds only what it touches.
        let src_root = self.dir.join("kernel-src").join(short(source_sha256));
        let marker = src_root.join(".extracted");
        if !marker.exists() {
            host::remove_tree(&src_root)?;
            mkdirs(&src_root)?;
            self.progress.message("extracting the kernel source");
            let mut tar = Command::new("tar");
            tar.arg("-xJf").arg(source).arg("-C").arg(&src_root);
            run_ok(
                tar,
                "extracting the kernel source",
                self.progress,
                Duration::from_secs(900),
            )?;
            std::fs::write(&marker, b"")
                .map_err(|e| ImageError::io(format!("writing {}", marker.display()), e))?;
        }
        let tree = std::fs::read_dir(&src_root)
            .map_err(|e| ImageError::io(format!("reading {}", src_root.display()), e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.join("Makefile").is_file())
            .ok_or_else(|| {
                ImageError::Recipe(format!("no kernel tree under {}", src_root.display()))
            })?;
        // In a directory of its own: whatever is in tmp/ is removed as a tree.
        let scratch = self.tmp().join("kernel-config");
        mkdirs(&scratch)?;
        let fragment = scratch.join("microvm.config");
        std::fs::write(&fragment, embedded_str(KERNEL_CONFIG_INPUT)?)
            .map_err(|e| ImageError::io(format!("writing {}", fragment.display()), e))?;
        let make = |targets: &[&str]| {
            let mut cmd = Command::new("nice");
            cmd.args(["-n", "19", "make", "ARCH=x86_64"])
                .arg(format!("-j{}", parallelism()))
                .args(targets)
                .current_dir(&tree)
                // Reproducible version strings.
                .env("KBUILD_BUILD_USER", "airlock")
                .env("KBUILD_BUILD_HOST", "airlock")
                .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
                .env("KCONFIG_ALLCONFIG", &fragment);
            cmd
        };
        run_ok(
            make(&["allnoconfig"]),
            "configuring the guest kernel",
            self.progress,
            Duration::from_secs(300),
        )?;
        let config = std::fs::read_to_string(tree.join(".config"))
            .map_err(|e| ImageError::io("reading the kernel's .config", e))?;
        let missing = missing_config(&config, &required_config_lines()?);
        if !missing.is_empty() {
            return Err(ImageError::Recipe(format!(
                "{KERNEL_CONFIG_INPUT}: these did not survive the kernel's configuration \
                 (a dependency is missing): {}",
                missing.join(", ")
            )));
        }
        self.progress
            .message("building the guest kernel (about 10 minutes on 2 cores)");
        run_ok(
            make(&["vmlinux", "bzImage"]),
            "building the guest kernel",
            self.progress,
            Duration::from_secs(3 * 3600),
        )?;
        let staging = self.tmp().join("kernel-out");
        host::remove_tree(&staging)?;
        mkdirs(&staging)?;
        for (from, to) in [
            ("vmlinux", "vmlinux"),
            ("arch/x86/boot/bzImage", "bzImage"),
            (".config", "config"),
        ] {
            std::fs::copy(tree.join(from), staging.join(to))
                .map_err(|e| ImageError::io(format!("copying the kernel's {from}"), e))?;
            set_read_only(&staging.join(to))?;
        }
        if let Some(parent) = out.parent() {
            mkdirs(parent)?;
        }
        host::remove_tree(out)?;
        std::fs::rename(&staging, out)
            .map_err(|e| ImageError::io(format!("moving the kernel to {}", out.display()), e))
    }

    pub fn ensure_rootfs(
        &self,
        manifest: &Manifest,
        timings: &mut Timings,
    ) -> Result<RootfsRecord, ImageError> {
        let digest = rootfs_digest(&manifest.build_id);
        let path = self
            .dir
            .join("rootfs")
            .join(format!("{}.ext4", short(&digest)));
        let started = Instant::now();
        self.progress
            .stage(ROOTFS_STAGE, timings.estimate(ROOTFS_STAGE, 30));
        let cached = path.is_file();
        if !cached {
            self.build_rootfs(manifest, &path)?;
            timings.record(ROOTFS_STAGE, started.elapsed());
        }
        let size = std::fs::metadata(&path)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?
            .len();
        let previous = manifest.vm.as_ref().map(|v| &v.rootfs);
        // Hashing gigabytes again for a file this build made and recorded is
        // wasted time; `verify --vm` hashes it in full.
        let sha256 = match previous {
            Some(p) if p.path == path && p.size == size && cached => p.sha256.clone(),
            _ => sha256_file(&path)?,
        };
        self.progress.done(ROOTFS_STAGE, started.elapsed(), cached);
        Ok(RootfsRecord {
            digest,
            path,
            sha256,
            size,
        })
    }

    fn build_rootfs(&self, manifest: &Manifest, path: &Path) -> Result<(), ImageError> {
        if !host::is_root() {
            return Err(ImageError::NotRoot);
        }
        let merged = self.tmp().join("rootfs-merged");
        host::remove_tree(&merged)?;
        mkdirs(&merged)?;
        // Lower layers only: a read-only overlay, nothing to write to.
        let mut mount = Command::new("mount");
        mount
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", manifest.overlay_lowerdir()))
            .arg(&merged);
        run_ok(
            mount,
            "mounting the layers",
            self.progress,
            Duration::from_secs(60),
        )?;
        let result = (|| {
            let content: u64 = manifest.layers.iter().map(|l| l.size).sum();
            host::ensure_space(
                "making the ext4 root file system",
                self.dir,
                rootfs_mib(content) << 20,
            )?;
            let staging = self.tmp().join("rootfs.ext4");
            let _ = std::fs::remove_file(&staging);
            let mut mkfs = Command::new("mke2fs");
            mkfs.args(["-q", "-F", "-t", "ext4"])
                // Never mounted writable by anyone: no journal, no reserve.
                .args(["-O", "^has_journal", "-m", "0", "-i", "8192"])
                .args(["-L", "airlock-root", "-E", "root_owner=0:0"])
                .arg("-d")
                .arg(&merged)
                .arg(&staging)
                .arg(format!("{}M", rootfs_mib(content)));
            run_ok(
                mkfs,
                "making the ext4 root file system",
                self.progress,
                Duration::from_secs(1800),
            )?;
            set_read_only(&staging)?;
            if let Some(parent) = path.parent() {
                mkdirs(parent)?;
            }
            std::fs::rename(&staging, path)
                .map_err(|e| ImageError::io(format!("moving the ext4 to {}", path.display()), e))
        })();
        host::unmount(&merged)?;
        let _ = std::fs::remove_dir(&merged);
        result
    }
}

fn parallelism() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
}

fn set_read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| ImageError::io(format!("setting the mode of {}", path.display()), e))
}

/// Lines of `required` that `config` does not contain exactly.
pub fn missing_config(config: &str, required: &[String]) -> Vec<String> {
    let have: std::collections::BTreeSet<&str> = config.lines().map(str::trim).collect();
    required
        .iter()
        .filter(|l| !have.contains(l.as_str()))
        .cloned()
        .collect()
}

/// Stage durations carried from build to build (the progress estimates).
pub(crate) struct Timings<'a>(pub &'a mut std::collections::BTreeMap<String, f64>);

impl Timings<'_> {
    fn estimate(&self, stage: &str, default_s: u64) -> Option<Duration> {
        Some(
            self.0
                .get(stage)
                .map(|s| Duration::from_secs_f64(*s))
                .unwrap_or(Duration::from_secs(default_s)),
        )
    }
    fn record(&mut self, stage: &str, took: Duration) {
        self.0.insert(stage.to_owned(), took.as_secs_f64());
    }
}

/// One check of `verify --vm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> VmCheck {
    VmCheck {
        name: name.to_owned(),
        ok,
        detail: detail.into(),
    }
}

fn hash_check(name: &str, path: &Path, want: &str) -> VmCheck {
    match sha256_file(path) {
        Ok(got) if got == want => check(name, true, format!("{} sha256 matches", path.display())),
        Ok(got) => check(
            name,
            false,
            format!(
                "{} has sha256 {}…, the manifest says {}…",
                path.display(),
                &got[..12],
                &want[..12.min(want.len())]
            ),
        ),
        Err(e) => check(name, false, e.to_string()),
    }
}

/// Checks both artefacts against the manifest: digests, the kernel's
/// configuration, the file system's consistency (`e2fsck -fn`) and that the
/// ext4 is this build (its `/etc/airlock/image.json`, read with `debugfs`).
pub fn verify(manifest: &Manifest) -> Result<Vec<VmCheck>, ImageError> {
    let Some(vm) = &manifest.vm else {
        return Err(ImageError::Recipe(format!(
            "image {} has no VM artefacts; build them with `airlock image build --vm`",
            manifest.build_id
        )));
    };
    let mut checks = vec![
        hash_check(
            "kernel vmlinux",
            &vm.kernel.vmlinux,
            &vm.kernel.vmlinux_sha256,
        ),
        hash_check(
            "kernel bzImage",
            &vm.kernel.bzimage,
            &vm.kernel.bzimage_sha256,
        ),
    ];
    let required = required_config_lines()?;
    checks.push(match std::fs::read_to_string(&vm.kernel.config) {
        Ok(config) => {
            let missing = missing_config(&config, &required);
            check(
                "kernel config",
                missing.is_empty(),
                if missing.is_empty() {
                    format!(
                        "all {} lines of {KERNEL_CONFIG_INPUT} present",
                        required.len()
                    )
                } else {
                    format!("missing: {}", missing.join(", "))
                },
            )
        }
        Err(e) => check(
            "kernel config",
            false,
            format!("{}: {e}", vm.kernel.config.display()),
        ),
    });
    let want_digest = rootfs_digest(&manifest.build_id);
    checks.push(check(
        "rootfs digest",
        vm.rootfs.digest == want_digest,
        format!("recorded for build {}", manifest.build_id),
    ));
    let size = std::fs::metadata(&vm.rootfs.path).map(|m| m.len()).ok();
    checks.push(check(
        "rootfs size",
        size == Some(vm.rootfs.size),
        format!("{:?} bytes, manifest {}", size, vm.rootfs.size),
    ));
    checks.push(hash_check(
        "rootfs sha256",
        &vm.rootfs.path,
        &vm.rootfs.sha256,
    ));
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&vm.rootfs.path)
        .output();
    checks.push(match fsck {
        Ok(o) => check(
            "rootfs e2fsck",
            o.status.success(),
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned(),
        ),
        Err(e) => check("rootfs e2fsck", false, format!("e2fsck: {e}")),
    });
    let inside = Command::new("debugfs")
        .arg("-R")
        .arg("cat /etc/airlock/image.json")
        .arg(&vm.rootfs.path)
        .output();
    checks.push(match inside {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let ok = text.contains(&manifest.build_id);
            check("rootfs build id", ok, text.trim().to_owned())
        }
        Err(e) => check("rootfs build id", false, format!("debugfs: {e}")),
    });
    let init = Command::new("debugfs")
        .arg("-R")
        .arg("stat /usr/local/sbin/airlock-vm-init")
        .arg(&vm.rootfs.path)
        .output();
    checks.push(match init {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            check(
                "rootfs vm init",
                text.contains("Mode:  0755") || text.contains("Mode:  0755 "),
                "/usr/local/sbin/airlock-vm-init is executable",
            )
        }
        Err(e) => check("rootfs vm init", false, format!("debugfs: {e}")),
    });
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_fragment_is_embedded_and_names_what_the_vmms_need() {
        let lines = required_config_lines().expect("embedded");
        for needed in [
            "CONFIG_VIRTIO_MMIO=y",
            "CONFIG_VIRTIO_BLK=y",
            "CONFIG_VIRTIO_NET=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_EXT4_FS=y",
            "CONFIG_ACPI=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            "CONFIG_X86_IOPL_IOPERM=y",
            "CONFIG_OVERLAY_FS=y",
        ] {
            assert!(lines.iter().any(|l| l == needed), "{needed}");
        }
    }

    #[test]
    fn digests_follow_their_inputs() {
        let a = kernel_digest("aa").expect("digest");
        assert_ne!(a, kernel_digest("bb").expect("digest"));
        assert_ne!(rootfs_digest("b1"), rootfs_digest("b2"));
    }

    #[test]
    fn missing_config_lines_are_named() {
        let req = vec!["CONFIG_A=y".to_owned(), "CONFIG_B=y".to_owned()];
        assert_eq!(
            missing_config("CONFIG_A=y\n# CONFIG_B is not set\n", &req),
            ["CONFIG_B=y"]
        );
    }

    #[test]
    fn newest_source_wins_and_sizes_have_room() {
        let mut v = [
            PathBuf::from("/usr/src/linux-source-6.10.tar.xz"),
            PathBuf::from("/usr/src/linux-source-6.9.tar.xz"),
        ];
        v.sort_by_key(|p| version_key(p));
        assert!(v[1].ends_with("linux-source-6.10.tar.xz"));
        assert_eq!(rootfs_mib(0), 256);
        assert_eq!(rootfs_mib(4 << 30), 4096 + 1024 + 256);
    }
}
