//! The manifest of one build: which layers, which inputs (with digests), which
//! versions the verification saw, and how long each stage took (the next
//! build's progress estimates).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// First 16 hex digits of a sha256 over the base, node and files layer digests.
    pub build_id: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Bottom layer first.
    pub layers: Vec<LayerRecord>,
    /// Input name (a path under `image/`, or `agent`) → sha256.
    pub inputs: BTreeMap<String, String>,
    /// Program → version string, as `verify` read them inside the image.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// Stage → seconds it took when it last really ran (not when reused).
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
    /// The guest kernel and ext4 (`airlock image build --vm`); absent from
    /// manifests of builds without them, so those read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<crate::vm::VmArtefacts>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    pub name: String,
    /// Full sha256 of the layer's inputs.
    pub digest: String,
    /// The layer's directory: a plain tree, usable as an overlayfs lower layer.
    pub dir: PathBuf,
    /// Bytes of file content in the layer.
    pub size: u64,
}

/// A manifest that does not match the inputs the running binary expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleImage {
    pub build_id: String,
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl std::fmt::Display for StaleImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "golden image {} is stale:", self.build_id)?;
        let mut sep = " ";
        for (what, names) in [
            ("changed", &self.changed),
            ("new", &self.added),
            ("gone", &self.removed),
        ] {
            if !names.is_empty() {
                write!(f, "{sep}{what}: {}", names.join(", "))?;
                sep = "; ";
            }
        }
        write!(f, " (rebuild it with `airlock image build`)")
    }
}

impl std::error::Error for StaleImage {}

impl Manifest {
    /// `Ok` when every input matches `expected`; otherwise names each input that
    /// changed, appeared or disappeared.
    pub fn check_fresh(&self, expected: &BTreeMap<String, String>) -> Result<(), StaleImage> {
        let mut stale = StaleImage {
            build_id: self.build_id.clone(),
            changed: vec![],
            added: vec![],
            removed: vec![],
        };
        for (name, digest) in expected {
            match self.inputs.get(name) {
                Some(d) if d == digest => {}
                Some(_) => stale.changed.push(name.clone()),
                None => stale.added.push(name.clone()),
            }
        }
        stale.removed = self
            .inputs
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .cloned()
            .collect();
        if stale.changed.is_empty() && stale.added.is_empty() && stale.removed.is_empty() {
            Ok(())
        } else {
            Err(stale)
        }
    }

    /// The layer directories as overlayfs `lowerdir` wants them: uppermost first.
    pub fn layer_dirs_top_first(&self) -> Vec<PathBuf> {
        self.layers.iter().rev().map(|l| l.dir.clone()).collect()
    }

    /// The `lowerdir=` value for an overlay mount of this image.
    pub fn overlay_lowerdir(&self) -> String {
        let dirs: Vec<String> = self
            .layer_dirs_top_first()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        dirs.join(":")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            build_id: "0123456789abcdef".into(),
            created_at: "2025-01-01T00:00:00Z".into(),
            layers: ["base", "node", "files", "meta"]
                .iter()
                .map(|n| LayerRecord {
                    name: (*n).into(),
                    digest: format!("{n}-digest"),
                    dir: PathBuf::from(format!("/img/layers/{n}")),
                    size: 1,
                })
                .collect(),
            inputs: [
                ("agent", "a1"),
                ("packages.txt", "p1"),
                ("rootfs/x.service", "x1"),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
            versions: [("node".to_owned(), "v22.23.3".to_owned())].into(),
            timings: [("base".to_owned(), 52.5)].into(),
            vm: None,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let text = serde_json::to_string_pretty(&m).expect("serialize");
        assert_eq!(serde_json::from_str::<Manifest>(&text).expect("parse"), m);
    }

    #[test]
    fn fresh_when_inputs_match() {
        let m = sample();
        assert_eq!(m.check_fresh(&m.inputs), Ok(()));
    }

    #[test]
    fn stale_names_each_changed_added_and_removed_input() {
        let m = sample();
        let mut expected = m.inputs.clone();
        expected.insert("agent".into(), "a2".into());
        expected.insert("rootfs/new.service".into(), "n1".into());
        expected.remove("rootfs/x.service");
        let stale = m.check_fresh(&expected).expect_err("stale");
        assert_eq!(stale.changed, vec!["agent"]);
        assert_eq!(stale.added, vec!["rootfs/new.service"]);
        assert_eq!(stale.removed, vec!["rootfs/x.service"]);
        let text = stale.to_string();
        assert!(text.contains("changed: agent"), "{text}");
        assert!(text.contains("new: rootfs/new.service"), "{text}");
        assert!(text.contains("gone: rootfs/x.service"), "{text}");
        assert!(text.contains("0123456789abcdef"), "{text}");
    }

    #[test]
    fn layers_come_out_top_first() {
        let m = sample();
        assert_eq!(
            m.layer_dirs_top_first()[0],
            PathBuf::from("/img/layers/meta")
        );
        assert_eq!(
            m.overlay_lowerdir(),
            "/img/layers/meta:/img/layers/files:/img/layers/node:/img/layers/base"
        );
    }
}
