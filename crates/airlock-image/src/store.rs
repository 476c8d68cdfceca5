//! [`ImageStore`]: builds the image incrementally (a layer whose digest exists
//! is reused as is), records manifests, and names the current build.

use crate::host::{self, mkdirs};
use crate::inputs::{inputs_with_agent, sha256_file};
use crate::manifest::{LayerRecord, Manifest};
use crate::recipe::{self, layer_dir_name, BuildContext, HostSteps, LayerKind, Steps};
use crate::verify::VerifyReport;
use crate::vm::{short, Timings, VmArtefacts, VmBuilder};
use crate::{ImageError, Progress};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Overrides where images live (default `<data dir>/images`).
pub const IMAGE_DIR_ENV: &str = "AIRLOCK_IMAGE_DIR";
/// Overrides which agent binary is baked in (default: `airlock-agent` beside
/// the running executable).
pub const AGENT_BIN_ENV: &str = "AIRLOCK_AGENT_BIN";

const VERIFY_STAGE: &str = "verify";
const DEFAULT_VERIFY_ESTIMATE: Duration = Duration::from_secs(15);

/// `$AIRLOCK_IMAGE_DIR`, else `<data_dir>/images`.
pub fn image_dir(data_dir: &Path) -> PathBuf {
    match std::env::var_os(IMAGE_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => data_dir.join("images"),
    }
}

/// `$AIRLOCK_AGENT_BIN`, else `airlock-agent` in the running executable's directory.
pub fn default_agent_bin() -> Result<PathBuf, ImageError> {
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()
        .map_err(|e| ImageError::io("locating the running executable", e))?;
    Ok(exe.parent().unwrap_or(Path::new("/")).join("airlock-agent"))
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub agent_bin: PathBuf,
    /// Debian mirror URI; `None` asks `AIRLOCK_DEBIAN_MIRROR`, then the host's apt sources.
    pub mirror: Option<String>,
    /// Verify the image inside before recording it (on by default).
    pub verify: bool,
    /// Verify again even when this exact build was already recorded.
    pub force_verify: bool,
}

impl BuildOptions {
    pub fn new(agent_bin: PathBuf) -> Self {
        BuildOptions {
            agent_bin,
            mirror: None,
            verify: true,
            force_verify: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// An exclusive lock on the image directory for the length of a build.
#[derive(Debug)]
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    #[allow(unsafe_code)]
    fn take(path: &Path, progress: &dyn Progress) -> Result<Self, ImageError> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            progress.message("waiting for another image build to finish");
            // SAFETY: as above, now blocking.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(ImageError::io(
                    format!("locking {}", path.display()),
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(DirLock { _file: f })
    }
}

impl ImageStore {
    pub fn new(dir: PathBuf) -> Self {
        ImageStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the image directory has been made (by a build). A missing one
    /// is an empty store, not an error: every read treats it so.
    pub fn exists(&self) -> Result<bool, ImageError> {
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(true),
            Ok(_) => Err(ImageError::io(
                format!("{} is not a directory", self.dir.display()),
                std::io::Error::from(std::io::ErrorKind::NotADirectory),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io(format!("reading {}", self.dir.display()), e)),
        }
    }

    fn layers_dir(&self) -> PathBuf {
        self.dir.join("layers")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn manifest_path(&self, build_id: &str) -> PathBuf {
        self.dir.join("builds").join(build_id).join("manifest.json")
    }

    /// Builds (or reuses) every layer, verifies the result and makes it current.
    pub fn build(
        &self,
        opts: &BuildOptions,
        progress: &dyn Progress,
    ) -> Result<Manifest, ImageError> {
        self.build_with(&HostSteps, opts, progress)
    }

    pub(crate) fn build_with(
        &self,
        steps: &dyn Steps,
        opts: &BuildOptions,
        progress: &dyn Progress,
    ) -> Result<Manifest, ImageError> {
        let agent_sha = sha256_file(&opts.agent_bin).map_err(|e| match e {
            ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ImageError::AgentMissing(opts.agent_bin.clone())
            }
            other => other,
        })?;
        let inputs = inputs_with_agent(&agent_sha);
        let base = recipe::base_digest()?;
        let node = recipe::node_digest()?;
        let files = recipe::files_digest(&agent_sha)?;
        let build_id = recipe::build_id(&base, &node, &files);
        let meta = recipe::meta_digest(&build_id);

        for d in [self.dir.clone(), self.layers_dir(), self.tmp_dir()] {
            mkdirs(&d)?;
        }
        let _lock = DirLock::take(&self.dir.join(".lock"), progress)?;
        // Whatever is in tmp/ belongs to a build that died: nothing else runs now.
        self.clean_tmp()?;

        let previous = self.current().ok().flatten();
        let mut timings = previous
            .as_ref()
            .map(|p| p.timings.clone())
            .unwrap_or_default();
        let ctx = BuildContext {
            agent_bin: opts.agent_bin.clone(),
            mirror: opts.mirror.clone(),
            work_dir: self.tmp_dir().join("work"),
            build_id: build_id.clone(),
        };
        let mut layers = Vec::new();
        for (kind, digest) in [
            (LayerKind::Base, &base),
            (LayerKind::Node, &node),
            (LayerKind::Files, &files),
            (LayerKind::Meta, &meta),
        ] {
            layers.push(self.ensure_layer(
                steps,
                kind,
                digest,
                &ctx,
                previous.as_ref(),
                &mut timings,
                progress,
            )?);
        }

        if let Some(existing) = self.manifest(&build_id)? {
            if existing.inputs == inputs && (!opts.force_verify || !opts.verify) {
                progress.stage(VERIFY_STAGE, Some(Duration::ZERO));
                progress.done(VERIFY_STAGE, Duration::ZERO, true);
                self.set_current(&build_id)?;
                return Ok(existing);
            }
        }

        let mut manifest = Manifest {
            build_id: build_id.clone(),
            created_at: now_rfc3339(),
            layers,
            inputs,
            versions: BTreeMap::new(),
            timings: BTreeMap::new(),
            vm: None,
        };
        if opts.verify {
            let estimate = timings
                .get(VERIFY_STAGE)
                .map(|s| Duration::from_secs_f64(*s));
            progress.stage(
                VERIFY_STAGE,
                Some(estimate.unwrap_or(DEFAULT_VERIFY_ESTIMATE)),
            );
            let started = Instant::now();
            let report = steps.verify(
                &manifest.layer_dirs_top_first(),
                &build_id,
                &self.tmp_dir(),
                progress,
            )?;
            progress.done(VERIFY_STAGE, started.elapsed(), false);
            timings.insert(VERIFY_STAGE.into(), started.elapsed().as_secs_f64());
            if !report.ok() {
                return Err(ImageError::VerifyFailed {
                    build_id,
                    failures: report.failures(),
                });
            }
            manifest.versions = report.versions;
        }
        manifest.timings = timings;
        self.write_manifest(&manifest)?;
        self.set_current(&build_id)?;
        Ok(manifest)
    }

    #[allow(clippy::too_many_arguments)]
    fn ensure_layer(
        &self,
        steps: &dyn Steps,
        kind: LayerKind,
        digest: &str,
        ctx: &BuildContext,
        previous: Option<&Manifest>,
        timings: &mut BTreeMap<String, f64>,
        progress: &dyn Progress,
    ) -> Result<LayerRecord, ImageError> {
        let name = kind.name();
        let dir = self.layers_dir().join(layer_dir_name(kind, digest));
        let estimate = timings
            .get(name)
            .map(|s| Duration::from_secs_f64(*s))
            .unwrap_or(kind.default_estimate());
        let started = Instant::now();
        progress.stage(name, Some(estimate));
        if dir.is_dir() {
            let size = previous
                .and_then(|p| p.layers.iter().find(|l| l.digest == digest))
                .map(|l| l.size)
                .unwrap_or_else(|| host::tree_size(&dir));
            progress.done(name, started.elapsed(), true);
            return Ok(LayerRecord {
                name: name.into(),
                digest: digest.into(),
                dir,
                size,
            });
        }
        let need = previous
            .and_then(|p| p.layers.iter().find(|l| l.name == name))
            .map(|l| l.size + l.size / 4)
            .unwrap_or(kind.typical_size());
        host::ensure_space(&format!("the {name} layer"), &self.dir, need)?;
        let tmp = self.tmp_dir().join(layer_dir_name(kind, digest));
        host::remove_tree(&tmp)?;
        host::remove_tree(&ctx.work_dir)?;
        mkdirs(&tmp)?;
        mkdirs(&ctx.work_dir)?;
        steps.build_layer(kind, ctx, &tmp, progress)?;
        // The layer's root is `/` of the merged tree: it must look like one.
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| ImageError::io(format!("setting the mode of {}", tmp.display()), e))?;
        host::remove_tree(&ctx.work_dir)?;
        let size = host::tree_size(&tmp);
        std::fs::rename(&tmp, &dir)
            .map_err(|e| ImageError::io(format!("moving {} into place", tmp.display()), e))?;
        let took = started.elapsed();
        timings.insert(name.into(), took.as_secs_f64());
        progress.done(name, took, false);
        Ok(LayerRecord {
            name: name.into(),
            digest: digest.into(),
            dir,
            size,
        })
    }

    fn clean_tmp(&self) -> Result<(), ImageError> {
        let tmp = self.tmp_dir();
        let Ok(rd) = std::fs::read_dir(&tmp) else {
            return Ok(());
        };
        for e in rd.filter_map(Result::ok) {
            host::remove_path(&e.path())?;
        }
        Ok(())
    }

    /// The manifest of `build_id`, if that build was recorded here.
    pub fn manifest(&self, build_id: &str) -> Result<Option<Manifest>, ImageError> {
        let path = self.manifest_path(build_id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading {}", path.display()), e)),
        };
        let mut m: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ImageError::Manifest {
                path: path.clone(),
                source,
            })?;
        // Layer directories are found relative to this store, wherever it was
        // when the manifest was written.
        for l in &mut m.layers {
            let kind = LayerKind::ALL.into_iter().find(|k| k.name() == l.name);
            if let Some(kind) = kind {
                l.dir = self.layers_dir().join(layer_dir_name(kind, &l.digest));
            }
        }
        if let Some(vm) = &mut m.vm {
            let kernel = self.dir.join("kernels").join(short(&vm.kernel.digest));
            vm.kernel.vmlinux = kernel.join("vmlinux");
            vm.kernel.bzimage = kernel.join("bzImage");
            vm.kernel.config = kernel.join("config");
            vm.rootfs.path = self
                .dir
                .join("rootfs")
                .join(format!("{}.ext4", short(&vm.rootfs.digest)));
        }
        Ok(Some(m))
    }

    /// Adds the VM artefacts to `manifest`'s build (a guest kernel and the
    /// image as ext4), reusing cached ones, and records them in its manifest.
    pub fn build_vm(
        &self,
        manifest: &Manifest,
        progress: &dyn Progress,
    ) -> Result<Manifest, ImageError> {
        let _lock = DirLock::take(&self.dir.join(".lock"), progress)?;
        self.clean_tmp()?;
        let mut m = manifest.clone();
        let mut timings = m.timings.clone();
        let builder = VmBuilder {
            dir: &self.dir,
            progress,
        };
        let built = builder
            .ensure_kernel(&mut Timings(&mut timings))
            .and_then(|kernel| {
                Ok((
                    kernel,
                    builder.ensure_rootfs(&m, &mut Timings(&mut timings))?,
                ))
            });
        // A failed step's staging files (a half-made ext4 is gigabytes) go now,
        // not at the next build.
        self.clean_tmp()?;
        let (kernel, rootfs) = built?;
        m.vm = Some(VmArtefacts { kernel, rootfs });
        m.timings = timings;
        self.write_manifest(&m)?;
        Ok(m)
    }

    /// The build named by `current`, if any.
    pub fn current(&self) -> Result<Option<Manifest>, ImageError> {
        let path = self.dir.join("current");
        let id = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading {}", path.display()), e)),
        };
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ImageError::Recipe(format!(
                "{} does not hold a build id",
                path.display()
            )));
        }
        self.manifest(&id)
    }

    /// Runs the in-image checks of `manifest` again.
    pub fn verify(&self, manifest: &Manifest) -> Result<VerifyReport, ImageError> {
        self.verify_with(&HostSteps, manifest, &crate::NoProgress)
    }

    pub(crate) fn verify_with(
        &self,
        steps: &dyn Steps,
        manifest: &Manifest,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, ImageError> {
        for l in &manifest.layers {
            if !l.dir.is_dir() {
                return Err(ImageError::Recipe(format!(
                    "layer {} is missing at {}",
                    l.name,
                    l.dir.display()
                )));
            }
        }
        mkdirs(&self.tmp_dir())?;
        steps.verify(
            &manifest.layer_dirs_top_first(),
            &manifest.build_id,
            &self.tmp_dir(),
            progress,
        )
    }

    /// Removes every recorded build except the current one, `keep` (builds
    /// that running sandboxes still boot from) and any build whose layers a
    /// mounted overlay reads (a sandbox of another data dir), and every layer,
    /// ext4 and guest kernel none of the kept builds uses. The kernel that the installed
    /// kernel source would build, and its extracted source, stay: the next
    /// `build --vm` reuses them. Returns what was removed.
    pub fn prune(&self, keep: &[String]) -> Result<Vec<PathBuf>, ImageError> {
        // A directory no build has made yet holds nothing to prune; taking the
        // lock would create it (or fail on a missing parent).
        if !self.exists()? {
            return Ok(Vec::new());
        }
        let _lock = DirLock::take(&self.dir.join(".lock"), &crate::NoProgress)?;
        // The lock is ours: whatever is in tmp/ is left from a build that died.
        self.clean_tmp()?;
        let mut kept_ids: Vec<String> = keep.to_vec();
        if let Some(current) = self.current()? {
            kept_ids.push(current.build_id);
        }
        let mounted = host::overlay_lowerdirs();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("builds")) {
            for e in rd.filter_map(Result::ok) {
                let id = e.file_name().to_string_lossy().into_owned();
                let in_use = self
                    .manifest(&id)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.layers.iter().any(|l| mounted.contains(&l.dir)));
                if in_use && !kept_ids.contains(&id) {
                    kept_ids.push(id);
                }
            }
        }
        let kernels = self.dir.join("kernels");
        let kernel_src = self.dir.join("kernel-src");
        let mut kept = std::collections::BTreeSet::new();
        for id in &kept_ids {
            let Some(m) = self.manifest(id)? else {
                continue;
            };
            kept.extend(m.layers.into_iter().map(|l| l.dir));
            if let Some(vm) = m.vm {
                kept.insert(vm.rootfs.path);
                kept.extend(vm.kernel.vmlinux.parent().map(Path::to_path_buf));
                kept.insert(kernel_src.join(short(&vm.kernel.source_sha256)));
            }
        }
        if let Some(sha) = crate::vm::find_kernel_source()
            .ok()
            .and_then(|source| sha256_file(&source).ok())
        {
            kept.insert(kernel_src.join(short(&sha)));
            if let Ok(digest) = crate::vm::kernel_digest(&sha) {
                kept.insert(kernels.join(short(&digest)));
            }
        }
        let mut removed = Vec::new();
        let builds = self.dir.join("builds");
        let rootfs = self.dir.join("rootfs");
        for dir in [
            builds.clone(),
            self.layers_dir(),
            rootfs,
            kernels,
            kernel_src,
        ] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.filter_map(Result::ok) {
                let path = e.path();
                let keep_it = if dir == builds {
                    kept_ids.contains(&e.file_name().to_string_lossy().into_owned())
                } else {
                    kept.contains(&path)
                };
                if !keep_it {
                    host::remove_path(&path)?;
                    removed.push(path);
                }
            }
        }
        Ok(removed)
    }

    fn write_manifest(&self, m: &Manifest) -> Result<(), ImageError> {
        let path = self.manifest_path(&m.build_id);
        let mut text = serde_json::to_vec_pretty(m).map_err(|source| ImageError::Manifest {
            path: path.clone(),
            source,
        })?;
        text.push(b'\n');
        write_atomic(&path, &text)
    }

    fn set_current(&self, build_id: &str) -> Result<(), ImageError> {
        write_atomic(
            &self.dir.join("current"),
            format!("{build_id}\n").as_bytes(),
        )
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    if let Some(parent) = path.parent() {
        mkdirs(parent)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .map_err(|e| ImageError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| ImageError::io(format!("replacing {}", path.display()), e))
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::CheckResult;
    use crate::vm::{KernelRecord, RootfsRecord};
    use std::cell::RefCell;

    /// Steps that write a marker file and count what they were asked to do.
    #[derive(Default)]
    struct FakeSteps {
        built: RefCell<Vec<LayerKind>>,
        verified: RefCell<u32>,
        fail_verify: bool,
    }

    impl Steps for FakeSteps {
        fn build_layer(
            &self,
            kind: LayerKind,
            ctx: &BuildContext,
            dest: &Path,
            _: &dyn Progress,
        ) -> Result<(), ImageError> {
            self.built.borrow_mut().push(kind);
            host::write_file(&dest.join(kind.name()), ctx.build_id.as_bytes(), 0o644)
        }
        fn verify(
            &self,
            layers: &[PathBuf],
            build_id: &str,
            _: &Path,
            _: &dyn Progress,
        ) -> Result<VerifyReport, ImageError> {
            *self.verified.borrow_mut() += 1;
            assert_eq!(layers.len(), 4);
            assert!(layers[0]
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("meta-")));
            Ok(VerifyReport {
                build_id: build_id.into(),
                checks: vec![CheckResult {
                    name: "node".into(),
                    ok: !self.fail_verify,
                    detail: "v22.0.0".into(),
                }],
                versions: [("node".to_owned(), "v22.0.0".to_owned())].into(),
            })
        }
    }

    struct Recorder(RefCell<Vec<(String, bool)>>);
    impl Progress for Recorder {
        fn stage(&self, _: &str, estimate: Option<Duration>) {
            assert!(estimate.is_some());
        }
        fn message(&self, _: &str) {}
        fn done(&self, name: &str, _: Duration, cached: bool) {
            self.0.borrow_mut().push((name.into(), cached));
        }
    }

    fn setup() -> (tempfile::TempDir, ImageStore, BuildOptions) {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("airlock-agent");
        std::fs::write(&agent, b"agent v1").expect("write");
        let store = ImageStore::new(dir.path().join("images"));
        (dir, store, BuildOptions::new(agent))
    }

    #[test]
    fn first_build_makes_every_layer_then_everything_is_reused() {
        let (_d, store, opts) = setup();
        let steps = FakeSteps::default();
        let m1 = store
            .build_with(&steps, &opts, &crate::NoProgress)
            .expect("build");
        assert_eq!(*steps.built.borrow(), LayerKind::ALL.to_vec());
        assert_eq!(*steps.verified.borrow(), 1);
        assert_eq!(m1.versions["node"], "v22.0.0");
        assert_eq!(m1.layers.len(), 4);
        assert!(m1.timings.contains_key("base") && m1.timings.contains_key("verify"));
        assert_eq!(store.current().expect("current"), Some(m1.clone()));

        let steps2 = FakeSteps::default();
        let rec = Recorder(RefCell::new(vec![]));
        let m2 = store.build_with(&steps2, &opts, &rec).expect("rebuild");
        assert!(steps2.built.borrow().is_empty());
        assert_eq!(*steps2.verified.borrow(), 0);
        assert_eq!(m2, m1);
        assert!(
            rec.0.borrow().iter().all(|(_, cached)| *cached),
            "{:?}",
            rec.0.borrow()
        );
    }

    #[test]
    fn a_new_agent_rebuilds_only_files_and_meta() {
        let (_d, store, opts) = setup();
        let m1 = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build");
        std::fs::write(&opts.agent_bin, b"agent v2").expect("write");
        let steps = FakeSteps::default();
        let m2 = store
            .build_with(&steps, &opts, &crate::NoProgress)
            .expect("rebuild");
        assert_eq!(
            *steps.built.borrow(),
            vec![LayerKind::Files, LayerKind::Meta]
        );
        assert_ne!(m1.build_id, m2.build_id);
        assert_eq!(m1.layers[0].dir, m2.layers[0].dir);
        assert_ne!(m1.layers[2].dir, m2.layers[2].dir);
        let stale = m1
            .check_fresh(&crate::expected_inputs(&opts.agent_bin).expect("inputs"))
            .expect_err("stale");
        assert_eq!(stale.changed, vec!["agent"]);
        assert_eq!(
            m2.check_fresh(&crate::expected_inputs(&opts.agent_bin).expect("inputs")),
            Ok(())
        );
        // Measured times are carried to the next build's estimates.
        assert_eq!(m2.timings.get("base"), m1.timings.get("base"));
    }

    #[test]
    fn failed_verification_records_nothing_and_leftovers_are_cleaned() {
        let (_d, store, opts) = setup();
        let steps = FakeSteps {
            fail_verify: true,
            ..Default::default()
        };
        let err = store
            .build_with(&steps, &opts, &crate::NoProgress)
            .expect_err("verify fails");
        assert!(matches!(err, ImageError::VerifyFailed { .. }), "{err}");
        assert_eq!(store.current().expect("current"), None);
        // A half-built layer from a crashed build is removed, never reused;
        // so is a half-made ext4 (a file, not a tree).
        std::fs::create_dir_all(store.tmp_dir().join("base-0000000000000000/etc")).expect("mkdir");
        std::fs::write(store.tmp_dir().join("rootfs.ext4"), b"half").expect("write");
        let steps = FakeSteps::default();
        store
            .build_with(&steps, &opts, &crate::NoProgress)
            .expect("build");
        assert!(!store.tmp_dir().join("base-0000000000000000").exists());
        assert!(!store.tmp_dir().join("rootfs.ext4").exists());
        assert_eq!(
            *steps.built.borrow(),
            Vec::<LayerKind>::new(),
            "layers from the failed run are complete"
        );
    }

    #[test]
    fn manifests_are_found_relative_to_the_store() {
        let (d, store, opts) = setup();
        let m = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build");
        let moved = d.path().join("moved");
        std::fs::rename(store.dir(), &moved).expect("move");
        let again = ImageStore::new(moved.clone())
            .current()
            .expect("current")
            .expect("some");
        assert_eq!(again.build_id, m.build_id);
        assert!(again
            .layers
            .iter()
            .all(|l| l.dir.starts_with(&moved) && l.dir.is_dir()));
    }

    #[test]
    fn a_directory_not_made_yet_is_an_empty_store() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("never/made/images");
        let store = ImageStore::new(dir.clone());
        assert!(!store.exists().expect("exists"));
        assert!(store.current().expect("current").is_none());
        assert!(store.manifest("0123abcd").expect("manifest").is_none());
        assert!(store.prune(&[]).expect("prune").is_empty());
        assert!(
            !dir.exists(),
            "reading a store must not create its directory"
        );
        std::fs::create_dir_all(d.path().join("never/made")).expect("mkdir");
        std::fs::write(&dir, b"not a directory").expect("write");
        let err = store
            .prune(&[])
            .expect_err("a file where the directory should be");
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }

    #[test]
    fn prune_keeps_current_and_named_builds_only() {
        let (_d, store, opts) = setup();
        let old = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build 1");
        std::fs::write(&opts.agent_bin, b"agent v2").expect("write");
        let mid = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build 2");
        std::fs::write(&opts.agent_bin, b"agent v3").expect("write");
        let new = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build 3");

        let removed = store
            .prune(std::slice::from_ref(&old.build_id))
            .expect("prune");
        // mid's own files and meta layers and its manifest go; base and node are shared.
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(store.manifest(&mid.build_id).expect("read").is_none());
        for m in [&old, &new] {
            assert!(m.layers.iter().all(|l| l.dir.is_dir()));
            assert!(store.manifest(&m.build_id).expect("read").is_some());
        }
        assert!(!mid.layers[2].dir.exists());
        assert_eq!(
            store.current().expect("current").map(|m| m.build_id),
            Some(new.build_id)
        );
    }

    #[test]
    fn prune_removes_ext4s_and_kernels_no_kept_build_uses() {
        let (_d, store, opts) = setup();
        let m = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build");
        let file = |p: &Path| {
            mkdirs(p.parent().expect("parent")).expect("mkdirs");
            std::fs::write(p, b"x").expect("write");
        };
        let kernel = |digest: &str| KernelRecord {
            digest: digest.into(),
            source: "linux-source-6.1.tar.xz".into(),
            source_sha256: "5".repeat(64),
            vmlinux: PathBuf::new(),
            vmlinux_sha256: String::new(),
            bzimage: PathBuf::new(),
            bzimage_sha256: String::new(),
            config: PathBuf::new(),
        };
        let mut with_vm = m.clone();
        with_vm.vm = Some(VmArtefacts {
            kernel: kernel(&"a".repeat(64)),
            rootfs: RootfsRecord {
                digest: "b".repeat(64),
                path: PathBuf::new(),
                sha256: String::new(),
                size: 1,
            },
        });
        store.write_manifest(&with_vm).expect("manifest");
        let used_kernel = store.dir().join("kernels").join("a".repeat(16));
        let used_src = store.dir().join("kernel-src").join("5".repeat(16));
        let used_ext4 = store.dir().join(format!("rootfs/{}.ext4", "b".repeat(16)));
        let stale_kernel = store.dir().join("kernels").join("c".repeat(16));
        let stale_src = store.dir().join("kernel-src").join("6".repeat(16));
        let stale_ext4 = store.dir().join(format!("rootfs/{}.ext4", "d".repeat(16)));
        for f in [&used_kernel, &stale_kernel, &used_src, &stale_src] {
            file(&f.join("vmlinux"));
        }
        file(&used_ext4);
        file(&stale_ext4);

        let removed = store.prune(&[]).expect("prune");
        for stale in [&stale_kernel, &stale_src, &stale_ext4] {
            assert!(!stale.exists(), "{} kept", stale.display());
            assert!(removed.contains(stale), "{removed:?}");
        }
        // On a host with a kernel source installed, its own cache is kept too,
        // which these made-up digests are not.
        assert_eq!(removed.len(), 3, "{removed:?}");
        for used in [&used_kernel, &used_src, &used_ext4] {
            assert!(used.exists(), "{} removed", used.display());
        }
        assert!(m.layers.iter().all(|l| l.dir.is_dir()));
    }

    /// `mount -t fstype -o options fstype target` (root only).
    fn mount(fstype: &str, options: &str, target: &Path) {
        let status = std::process::Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(target)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mounting {fstype} on {}",
            target.display()
        );
    }

    #[test]
    fn a_full_disk_is_refused_before_a_layer_is_built() {
        if !host::is_root() {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        }
        let (d, _, opts) = setup();
        let small = d.path().join("small");
        mkdirs(&small).expect("mkdir");
        mount("tmpfs", "size=8m", &small);
        let store = ImageStore::new(small.join("images"));
        let steps = FakeSteps::default();
        let err = store.build_with(&steps, &opts, &crate::NoProgress);
        let _ = host::unmount(&small);
        let err = err.expect_err("no room for a base layer");
        assert!(matches!(err, ImageError::NoSpace { .. }), "{err}");
        assert!(err.to_string().contains("the base layer"), "{err}");
        assert!(steps.built.borrow().is_empty(), "nothing was started");
    }

    #[test]
    fn prune_keeps_a_build_whose_layers_a_mounted_overlay_reads() {
        if !host::is_root() {
            eprintln!("skipped: mounting an overlay needs root");
            return;
        }
        let (d, store, opts) = setup();
        let old = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build 1");
        std::fs::write(&opts.agent_bin, b"agent v2").expect("write");
        store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect("build 2");
        // A sandbox this store does not know of boots from the old build.
        let overlay =
            crate::verify::Mounted::new(&old.layer_dirs_top_first(), &d.path().join("ov"))
                .expect("mount");
        let removed = store.prune(&[]);
        drop(overlay);
        let removed = removed.expect("prune");
        assert!(removed.is_empty(), "{removed:?}");
        assert!(store.manifest(&old.build_id).expect("read").is_some());
        assert!(old.layers.iter().all(|l| l.dir.is_dir()));
        // Unmounted, it goes.
        let removed = store.prune(&[]).expect("prune");
        assert!(store.manifest(&old.build_id).expect("read").is_none());
        assert_eq!(removed.len(), 3, "{removed:?}");
    }

    #[test]
    fn missing_agent_is_named() {
        let (d, store, _) = setup();
        let opts = BuildOptions::new(d.path().join("nope"));
        let err = store
            .build_with(&FakeSteps::default(), &opts, &crate::NoProgress)
            .expect_err("no agent");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn image_dir_prefers_the_environment() {
        // Only checks the fallback: changing the process environment in a
        // threaded test run would race with other tests.
        if std::env::var_os(IMAGE_DIR_ENV).is_none() {
            assert_eq!(image_dir(Path::new("/data")), PathBuf::from("/data/images"));
        }
    }
}
