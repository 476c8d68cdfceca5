//! Where the agent finds the per-sandbox metadata document: each driver injects
//! it the way its platform does best, and the agent tries the places in order.

use airlock_proto::metadata::{Metadata, NSPAWN_METADATA_PATH};
use std::path::{Path, PathBuf};

/// The document QEMU exposes through `-fw_cfg name=opt/airlock/metadata,file=…`.
pub const FW_CFG_METADATA_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/airlock/metadata/raw";

/// A metadata document bigger than this is refused rather than parsed.
const MAX_METADATA_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("no metadata document found (looked at {0})")]
    NotFound(String),
    #[error("reading metadata from {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata at {path} is larger than {MAX_METADATA_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("metadata at {path} is not a valid document")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("metadata at {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// One place a metadata document may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataSource {
    /// A read-only bind mount of a host file (systemd-nspawn).
    NspawnFile(PathBuf),
    /// A QEMU fw_cfg blob, which the kernel shows as a plain file.
    FwCfg(PathBuf),
    // Firecracker's MMDS v2 (token PUT, then GET on 169.254.169.254) comes next;
    // it needs an HTTP client and a route, so it is not tried yet.
}

impl MetadataSource {
    /// The places a guest is tried in, most likely first.
    pub fn default_order() -> Vec<MetadataSource> {
        vec![
            MetadataSource::NspawnFile(PathBuf::from(NSPAWN_METADATA_PATH)),
            MetadataSource::FwCfg(PathBuf::from(FW_CFG_METADATA_PATH)),
        ]
    }

    fn path(&self) -> &Path {
        match self {
            MetadataSource::NspawnFile(p) | MetadataSource::FwCfg(p) => p,
        }
    }

    /// `Ok(None)` when this source is absent on this guest.
    pub fn read(&self) -> Result<Option<Metadata>, MetadataError> {
        let path = self.path();
        let bytes = match read_capped(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(MetadataError::TooLarge {
                    path: path.to_owned(),
                })
            }
            Err(source) => {
                return Err(MetadataError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let meta: Metadata =
            serde_json::from_slice(&bytes).map_err(|source| MetadataError::Parse {
                path: path.to_owned(),
                source,
            })?;
        validate(&meta).map_err(|problem| MetadataError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        Ok(Some(meta))
    }
}

fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_METADATA_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return Err(std::io::Error::from(std::io::ErrorKind::FileTooLarge));
    }
    Ok(bytes)
}

/// Reads the first document found among `sources`.
pub fn load(sources: &[MetadataSource]) -> Result<Metadata, MetadataError> {
    for source in sources {
        if let Some(meta) = source.read()? {
            return Ok(meta);
        }
    }
    let looked: Vec<String> = sources
        .iter()
        .map(|s| s.path().display().to_string())
        .collect();
    Err(MetadataError::NotFound(looked.join(", ")))
}

/// Checks what the rest of the agent relies on, so later steps never write a
/// half-valid file. Values end up in environment files: no control characters.
fn validate(meta: &Metadata) -> Result<(), String> {
    if meta.agent_token.len() < 16 {
        return Err("agent_token is shorter than 16 bytes".into());
    }
    if meta.vnc_password.is_empty() {
        return Err("vnc_password is empty".into());
    }
    let d = meta.display;
    if !(320..=8192).contains(&d.width) || !(200..=8192).contains(&d.height) {
        return Err(format!("display {}x{} is out of range", d.width, d.height));
    }
    if meta.network.address.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "network.address {:?} is not an IP address",
            meta.network.address
        ));
    }
    let plain = |name: &str, v: &str| -> Result<(), String> {
        if v.chars()
            .any(|c| c.is_control() || c == '"' || c == '\'' || c == '\\' || c == '$' || c == '`')
        {
            Err(format!(
                "{name} contains characters not allowed in an environment value"
            ))
        } else {
            Ok(())
        }
    };
    plain("sandbox_id", &meta.sandbox_id)?;
    if let Some(egress) = &meta.egress {
        plain("egress.proxy_url", &egress.proxy_url)?;
        plain("egress.no_proxy", &egress.no_proxy)?;
        if !egress.proxy_url.starts_with("http://") {
            return Err("egress.proxy_url must start with http://".into());
        }
        if egress.proxy_url.contains('@') {
            return Err("egress.proxy_url must not carry credentials".into());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use airlock_proto::metadata::{Display, Egress, Network, SandboxKind};

    pub(crate) fn sample() -> Metadata {
        Metadata {
            sandbox_id: "sb-1".into(),
            kind: SandboxKind::Browser,
            agent_token: "0123456789abcdef0123".into(),
            vnc_password: "secretpw".into(),
            display: Display {
                width: 1280,
                height: 800,
            },
            network: Network {
                address: "10.231.0.2".into(),
                gateway: "10.231.0.1".into(),
                prefix_len: 30,
            },
            egress: Some(Egress {
                proxy_url: "http://10.231.0.1:3128".into(),
                no_proxy: "localhost,127.0.0.1".into(),
            }),
        }
    }

    #[test]
    fn first_present_source_wins_and_missing_ones_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let present = dir.path().join("fwcfg");
        std::fs::write(&present, serde_json::to_vec(&sample()).expect("json")).expect("write");
        let sources = vec![
            MetadataSource::NspawnFile(dir.path().join("absent.json")),
            MetadataSource::FwCfg(present),
        ];
        assert_eq!(load(&sources).expect("load"), sample());
    }

    #[test]
    fn nothing_found_names_every_place() {
        let err = load(&[MetadataSource::NspawnFile("/nonexistent/a".into())]).expect_err("absent");
        assert!(err.to_string().contains("/nonexistent/a"), "{err}");
    }

    #[test]
    fn bad_documents_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.json");
        let src = [MetadataSource::NspawnFile(path.clone())];
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(load(&src), Err(MetadataError::Parse { .. })));

        let mut m = sample();
        m.egress = Some(Egress {
            proxy_url: "http://u:p@h:1".into(),
            no_proxy: String::new(),
        });
        std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
        assert!(matches!(load(&src), Err(MetadataError::Invalid { .. })));

        let mut m = sample();
        m.sandbox_id = "a\nB=c".into();
        std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
        assert!(matches!(load(&src), Err(MetadataError::Invalid { .. })));

        std::fs::write(&path, vec![b' '; 70 * 1024]).expect("write");
        assert!(matches!(load(&src), Err(MetadataError::TooLarge { .. })));
    }
}
