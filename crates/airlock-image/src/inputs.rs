//! What goes into the golden image: the files of `image/` (embedded in this
//! crate at compile time, so the `airlock` binary carries its own recipe) and
//! the agent binary. Every input has a sha256; the manifest records them all so
//! a stale image can say which input changed.

use crate::ImageError;
use include_dir::{include_dir, Dir};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

static IMAGE_DIR: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/../../image");

/// Key of the agent binary in the inputs map.
pub const AGENT_INPUT: &str = "agent";
/// Prefix of the files copied verbatim into the image's `files` layer.
pub const ROOTFS_PREFIX: &str = "rootfs/";

/// One file of `image/`, path relative to it with `/` separators.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedFile {
    pub path: &'static str,
    pub contents: &'static [u8],
}

/// Every embedded file, sorted by path.
pub fn embedded_files() -> Vec<EmbeddedFile> {
    fn walk(dir: &'static Dir<'static>, out: &mut Vec<EmbeddedFile>) {
        for f in dir.files() {
            if let Some(path) = f.path().to_str() {
                out.push(EmbeddedFile {
                    path,
                    contents: f.contents(),
                });
            }
        }
        for d in dir.dirs() {
            walk(d, out);
        }
    }
    let mut out = Vec::new();
    walk(&IMAGE_DIR, &mut out);
    out.sort_by(|a, b| a.path.cmp(b.path));
    out
}

/// The embedded file at `path`, or an error naming it (a recipe file missing
/// from `image/` is a packaging mistake, not a user error).
pub fn embedded(path: &str) -> Result<&'static [u8], ImageError> {
    IMAGE_DIR
        .get_file(path)
        .map(|f| f.contents())
        .ok_or_else(|| ImageError::Recipe(format!("image/{path} is not embedded in this binary")))
}

pub fn embedded_str(path: &str) -> Result<&'static str, ImageError> {
    std::str::from_utf8(embedded(path)?)
        .map_err(|_| ImageError::Recipe(format!("image/{path} is not UTF-8")))
}

/// The mode a file of `image/rootfs/` gets in the image: programs in the
/// local bin directories are executable, everything else is plain data.
pub fn rootfs_mode(path_in_rootfs: &str) -> u32 {
    const EXEC_DIRS: [&str; 3] = ["usr/local/bin/", "usr/local/sbin/", "usr/local/libexec/"];
    if EXEC_DIRS.iter().any(|d| path_in_rootfs.starts_with(d)) {
        0o755
    } else {
        0o644
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A sha256 over a sequence of labelled fields, each length-prefixed so that no
/// two different sequences can produce the same byte stream.
#[derive(Debug, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new(domain: &str) -> Self {
        let mut h = Hasher(Sha256::new());
        h.field("domain", domain.as_bytes());
        h
    }
    pub fn field(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// Every input of the image and its sha256: each embedded file under its path
/// in `image/`, and the agent binary as [`AGENT_INPUT`]. This is what a
/// manifest must match for the image to be fresh.
pub fn expected_inputs(agent_bin: &Path) -> Result<BTreeMap<String, String>, ImageError> {
    let agent = sha256_file(agent_bin).map_err(|e| match e {
        ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ImageError::AgentMissing(agent_bin.to_owned())
        }
        other => other,
    })?;
    Ok(inputs_with_agent(&agent))
}

pub(crate) fn inputs_with_agent(agent_sha256: &str) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = embedded_files()
        .into_iter()
        .map(|f| (f.path.to_owned(), sha256_hex(f.contents)))
        .collect();
    map.insert(AGENT_INPUT.to_owned(), agent_sha256.to_owned());
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_files_are_embedded() {
        let paths: Vec<&str> = embedded_files().iter().map(|f| f.path).collect();
        for needed in [
            "packages.txt",
            "dpkg.cfg",
            "node-version",
            "systemd.txt",
            "hooks/base-customize.sh",
            "cli/package.json",
            "cli/package-lock.json",
            "rootfs/etc/systemd/system/airlock-xvnc.service",
            "rootfs/usr/local/bin/airlock-chromium",
        ] {
            assert!(paths.contains(&needed), "{needed} missing from {paths:?}");
        }
        assert!(
            !paths.iter().any(|p| p.contains("node_modules")),
            "node_modules must never be embedded"
        );
    }

    #[test]
    fn hasher_separates_fields() {
        let a = {
            let mut h = Hasher::new("t");
            h.field("x", b"ab").field("y", b"c");
            h.finish()
        };
        let b = {
            let mut h = Hasher::new("t");
            h.field("x", b"a").field("y", b"bc");
            h.finish()
        };
        let c = {
            let mut h = Hasher::new("u");
            h.field("x", b"ab").field("y", b"c");
            h.finish()
        };
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn inputs_cover_files_and_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("airlock-agent");
        std::fs::write(&agent, b"agent v1").expect("write");
        let inputs = expected_inputs(&agent).expect("inputs");
        assert_eq!(inputs[AGENT_INPUT], sha256_hex(b"agent v1"));
        assert_eq!(
            inputs["packages.txt"],
            sha256_hex(embedded("packages.txt").expect("embedded"))
        );
        let missing = expected_inputs(&dir.path().join("nope")).expect_err("missing agent");
        assert!(matches!(missing, ImageError::AgentMissing(_)), "{missing}");
    }

    #[test]
    fn modes_follow_the_directory() {
        assert_eq!(rootfs_mode("usr/local/bin/airlock-chromium"), 0o755);
        assert_eq!(rootfs_mode("etc/systemd/system/a.service"), 0o644);
    }
}
