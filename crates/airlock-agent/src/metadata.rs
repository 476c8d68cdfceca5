//! Where the agent finds the per-sandbox metadata document: each driver injects
//! it the way its platform does best, and the agent tries the places in order:
//! the nspawn driver's read-only file, QEMU's fw_cfg blob, Firecracker's MMDS.
//!
//! MMDS is spoken in its version 2 (session) form: `PUT /latest/api/token`
//! for a token, then `GET /airlock/metadata` with it. The guest's address and
//! route are already up (the kernel's `ip=`), so no setup is needed first.

use airlock_proto::metadata::{Metadata, FW_CFG_METADATA_NAME, NSPAWN_METADATA_PATH};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Firecracker's MMDS address (its default) and where the driver puts the document.
pub const MMDS_ADDR: &str = "169.254.169.254:80";
pub const MMDS_PATH: &str = "/airlock/metadata";

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
    /// A QEMU fw_cfg file, read over the device's I/O ports (see `fw_cfg`).
    FwCfg(String),
    /// Firecracker's metadata service (MMDS v2) at `addr`, document at `path`.
    Mmds { addr: SocketAddr, path: String },
}

impl MetadataSource {
    /// The places a guest is tried in, most likely first.
    pub fn default_order() -> Vec<MetadataSource> {
        vec![
            MetadataSource::NspawnFile(PathBuf::from(NSPAWN_METADATA_PATH)),
            MetadataSource::FwCfg(FW_CFG_METADATA_NAME.into()),
            MetadataSource::Mmds {
                addr: MMDS_ADDR
                    .parse()
                    .unwrap_or(SocketAddr::from(([169, 254, 169, 254], 80))),
                path: MMDS_PATH.into(),
            },
        ]
    }

    fn path(&self) -> PathBuf {
        match self {
            MetadataSource::NspawnFile(p) => p.clone(),
            MetadataSource::FwCfg(name) => PathBuf::from(format!("fw_cfg:{name}")),
            MetadataSource::Mmds { addr, path } => PathBuf::from(format!("http://{addr}{path}")),
        }
    }

    /// `Ok(None)` when this source is absent on this guest.
    pub fn read(&self) -> Result<Option<Metadata>, MetadataError> {
        let path = self.path();
        let path = path.as_path();
        let read = match self {
            MetadataSource::Mmds { addr, path } => mmds::fetch(*addr, path),
            MetadataSource::FwCfg(name) => crate::fw_cfg::read_file(name, MAX_METADATA_BYTES),
            MetadataSource::NspawnFile(_) => read_capped(path),
        };
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(MetadataError::TooLarge {
                    path: path.to_path_buf(),
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

/// MMDS version 2 over plain HTTP/1.1 (no client library: two requests).
mod mmds {
    use super::MAX_METADATA_BYTES;
    use std::io::{Error, ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// The document's bytes; `NotFound` when there is no MMDS (nothing
    /// answers at the address) or it holds no document at `path`.
    pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
        let token = request(
            addr,
            "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
             X-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\n\r\n",
        )?;
        let token = String::from_utf8(token).map_err(|_| Error::other("MMDS token is not text"))?;
        request(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nAccept: application/json\r\n\
                 X-metadata-token: {}\r\n\r\n",
                token.trim()
            ),
        )
    }

    fn request(addr: SocketAddr, head: &str) -> std::io::Result<Vec<u8>> {
        let absent = |e: Error| match e.kind() {
            ErrorKind::ConnectionRefused
            | ErrorKind::TimedOut
            | ErrorKind::WouldBlock
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::AddrNotAvailable => Error::from(ErrorKind::NotFound),
            _ => e,
        };
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(absent)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.write_all(head.as_bytes())?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            if let Some(reply) = parse(&raw)? {
                return reply;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return parse(&raw)?.unwrap_or_else(|| Err(Error::other("MMDS closed early")));
            }
            raw.extend_from_slice(&buf[..n]);
            if raw.len() as u64 > MAX_METADATA_BYTES + 8192 {
                return Err(Error::from(ErrorKind::FileTooLarge));
            }
        }
    }

    /// A complete answer's body (or its failure), `None` while incomplete.
    #[allow(clippy::type_complexity)]
    pub(super) fn parse(raw: &[u8]) -> std::io::Result<Option<std::io::Result<Vec<u8>>>> {
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::other("MMDS answered without a status line"))?;
        let length: usize = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let body = &raw[end + 4..];
        if body.len() < length {
            return Ok(None);
        }
        let body = body[..length].to_vec();
        Ok(Some(match status {
            200 => Ok(body),
            404 => Err(Error::from(ErrorKind::NotFound)),
            other => Err(Error::other(format!(
                "MMDS answered {other}: {}",
                String::from_utf8_lossy(&body).trim()
            ))),
        }))
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
        let present = dir.path().join("metadata.json");
        std::fs::write(&present, serde_json::to_vec(&sample()).expect("json")).expect("write");
        let sources = vec![
            MetadataSource::NspawnFile(dir.path().join("absent.json")),
            // Not announced on this host's command line: absent, ports untouched.
            MetadataSource::FwCfg(FW_CFG_METADATA_NAME.into()),
            MetadataSource::NspawnFile(present),
        ];
        assert_eq!(load(&sources).expect("load"), sample());
    }

    /// A stand-in MMDS on loopback that insists on the v2 token.
    fn fake_mmds(document: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).expect("read");
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply = if req.starts_with("PUT /latest/api/token ") {
                    let token = "tok-123";
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{token}",
                        token.len()
                    )
                    .into_bytes()
                } else if req.contains("X-metadata-token: tok-123\r\n") {
                    let mut r = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", document.len()).into_bytes();
                    r.extend_from_slice(&document);
                    r
                } else {
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec()
                };
                s.write_all(&reply).expect("write");
                seen.push(req);
            }
            seen
        });
        (addr, handle)
    }

    #[test]
    fn mmds_v2_is_read_with_a_session_token() {
        let doc = serde_json::to_vec(&sample()).expect("json");
        let (addr, server) = fake_mmds(doc);
        let sources = vec![
            MetadataSource::NspawnFile("/nonexistent/metadata.json".into()),
            MetadataSource::Mmds {
                addr,
                path: MMDS_PATH.into(),
            },
        ];
        assert_eq!(load(&sources).expect("load"), sample());
        let seen = server.join().expect("server");
        assert!(
            seen[0].contains("X-metadata-token-ttl-seconds: 60"),
            "{seen:?}"
        );
        assert!(
            seen[1].starts_with("GET /airlock/metadata HTTP/1.1"),
            "{seen:?}"
        );
    }

    #[test]
    fn no_mmds_is_absent_not_an_error() {
        // Bind and drop: nothing listens on this loopback port now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let src = [MetadataSource::Mmds {
            addr,
            path: MMDS_PATH.into(),
        }];
        let err = load(&src).expect_err("absent");
        assert!(matches!(err, MetadataError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("/airlock/metadata"), "{err}");
    }

    #[test]
    fn mmds_answers_are_parsed_whole() {
        assert!(
            mmds::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
                .expect("ok")
                .is_none()
        );
        let done = mmds::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab")
            .expect("ok")
            .expect("complete")
            .expect("200");
        assert_eq!(done, b"ab");
        let missing = mmds::parse(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(
            missing.expect_err("404").kind(),
            std::io::ErrorKind::NotFound
        );
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
