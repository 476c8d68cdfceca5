//! Credential files between the home directory and the control plane:
//! capture reads what the CLI wrote, delivery writes what the control plane
//! hands over. The home belongs to the sandbox user and the agent is root, so
//! every path is walked from a directory descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): a symlink or a directory swapped
//! half-way never takes a read, a write or a `chown` outside the home.

use super::{io, LoginError};
use crate::exec::RunAs;
use airlock_proto::login::{safe_relative, FileBlob, FileSet, ProviderDef};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

/// Largest credential file taken or written.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Write delivered files under the home, each 0600 and owned by the
/// sandbox user, atomically (temp file, then rename).
pub fn deliver(home: &Path, run_as: &RunAs, set: FileSet) -> Result<(), LoginError> {
    if set.files.is_empty() {
        return Err(LoginError::BadRequest("files: at least one".into()));
    }
    let mut decoded = Vec::new();
    for f in &set.files {
        if !safe_relative(&f.path) {
            return Err(LoginError::BadRequest(format!(
                "path {:?} must be relative to home, without '..'",
                f.path
            )));
        }
        let bytes = B64
            .decode(&f.contents_b64)
            .map_err(|_| LoginError::BadRequest(format!("{}: not base64", f.path)))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(LoginError::BadRequest(format!("{}: too large", f.path)));
        }
        decoded.push((f.path.clone(), bytes));
    }
    for (rel, bytes) in decoded {
        write_home_file(home, run_as, &rel, &bytes)?;
    }
    Ok(())
}

/// Every step goes from a directory descriptor, never through a path
/// the user could change half-way: the home belongs to the user, the
/// agent is root, and a directory swapped for a symlink must not take a
/// `chown` or a file outside the home.
fn write_home_file(home: &Path, run_as: &RunAs, rel: &str, bytes: &[u8]) -> Result<(), LoginError> {
    let owner = match run_as {
        RunAs::User { uid, gid, .. } => Some((
            rustix::fs::Uid::from_raw(*uid),
            rustix::fs::Gid::from_raw(*gid),
        )),
        RunAs::Current => None,
    };
    let parts: Vec<&str> = rel.split('/').collect();
    let (name, dirs) = parts
        .split_last()
        .ok_or_else(|| LoginError::BadRequest(format!("path {rel:?} names no file")))?;
    let mut dir = open_home(home)?;
    let mut walked = home.to_owned();
    for part in dirs {
        walked.push(part);
        let at = walked.display().to_string();
        dir = match open_beneath(&dir, part, OFlags::DIRECTORY | OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(0o700))
                    .map_err(|e| errno(format!("creating {at}"), e))?;
                let fd = open_beneath(&dir, part, OFlags::DIRECTORY | OFlags::RDONLY)
                    .map_err(|e| not_a_dir(&at, e))?;
                if let Some((uid, gid)) = owner {
                    rustix::fs::fchown(&fd, Some(uid), Some(gid))
                        .map_err(|e| errno(format!("handing {at} to the user"), e))?;
                }
                fd
            }
            Err(e) => return Err(not_a_dir(&at, e)),
        };
    }
    let target = walked.join(name).display().to_string();
    if let Ok(st) = rustix::fs::statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW) {
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if kind != rustix::fs::FileType::RegularFile {
            return Err(LoginError::Conflict(format!(
                "{target} is not a regular file"
            )));
        }
    }
    let tmp = format!(".{name}.airlock-{}", std::process::id());
    let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
    let fd = rustix::fs::openat2(
        &dir,
        tmp.as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
    )
    .map_err(|e| errno(format!("creating a file beside {target}"), e))?;
    let mut out = std::fs::File::from(fd);
    out.write_all(bytes)
        .and_then(|()| out.sync_all())
        .map_err(io(format!("writing {target}")))?;
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(&out, Some(uid), Some(gid))
            .map_err(|e| errno("handing the credential file to the user".into(), e))?;
    }
    drop(out);
    rustix::fs::renameat(&dir, tmp.as_str(), &dir, *name)
        .map_err(|e| errno(format!("replacing {target}"), e))?;
    Ok(())
}

/// The home directory itself, refused if it is a symlink.
pub(super) fn open_home(home: &Path) -> Result<OwnedFd, LoginError> {
    rustix::fs::open(
        home,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno(format!("opening {}", home.display()), e))
}

/// `rel` under `dir`, through no symlink and never above `dir`.
fn open_beneath(dir: &OwnedFd, rel: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
}

fn errno(what: String, e: Errno) -> LoginError {
    LoginError::Io {
        what,
        source: e.into(),
    }
}

fn not_a_dir(at: &str, e: Errno) -> LoginError {
    match e {
        Errno::LOOP | Errno::NOTDIR | Errno::XDEV => LoginError::Conflict(format!(
            "{at} is not a directory (a symlink is not followed)"
        )),
        e => errno(format!("opening {at}"), e),
    }
}

/// A credential file the CLI wrote under the home: opened through no symlink
/// (a link to `/etc/shadow` must not be captured by a root agent), not a
/// FIFO or device (non-blocking open, then checked), at most [`MAX_FILE_BYTES`].
pub fn read_limited(home: &Path, rel: &str) -> Result<Vec<u8>, LoginError> {
    let path = home.join(rel);
    let shown = path.display().to_string();
    let dir = open_home(home)?;
    let fd = open_beneath(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
    )
    .map_err(|e| errno(format!("reading {shown}"), e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| errno(format!("reading {shown}"), e))?;
    let regular =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
    if !regular || st.st_size < 0 || st.st_size as u64 > MAX_FILE_BYTES {
        return Err(LoginError::Conflict(format!(
            "{shown} is not a credential file"
        )));
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut buf)
        .map_err(io(format!("reading {shown}")))?;
    Ok(buf)
}

/// Every credential file of `def` the CLI wrote, once each is present and valid.
pub fn all_valid(home: &Path, def: &ProviderDef) -> bool {
    def.credentials
        .iter()
        .all(|c| match read_limited(home, &c.path) {
            Ok(bytes) => valid(&bytes, &c.json_keys),
            Err(_) => false,
        })
}

/// The credential files of `def`, read as [`read_limited`] does.
pub fn capture(home: &Path, def: &ProviderDef) -> Result<FileSet, LoginError> {
    let mut files = Vec::new();
    for c in &def.credentials {
        let bytes = read_limited(home, &c.path)?;
        files.push(FileBlob {
            path: c.path.clone(),
            contents_b64: B64.encode(&bytes),
        });
    }
    Ok(FileSet { files })
}

/// A credential file counts when it is non-empty and, if keys are named, JSON
/// with every one of them present and not null.
pub fn valid(bytes: &[u8], keys: &[String]) -> bool {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return false;
    }
    if keys.is_empty() {
        return true;
    }
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return false;
    };
    keys.iter().all(|k| {
        let mut cur = &doc;
        for part in k.split('.') {
            match cur.get(part) {
                Some(v) => cur = v,
                None => return false,
            }
        }
        !cur.is_null()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// A home to deliver into, as some user.
    struct Target {
        home: PathBuf,
        run_as: RunAs,
    }

    impl Target {
        fn deliver(&self, set: FileSet) -> Result<(), LoginError> {
            deliver(&self.home, &self.run_as, set)
        }
    }

    #[test]
    fn validity_of_credential_files() {
        let keys = vec!["tokens.access".to_owned()];
        assert!(valid(br#"{"tokens":{"access":"x"}}"#, &keys));
        assert!(!valid(br#"{"tokens":{"access":null}}"#, &keys));
        assert!(!valid(br#"{"tokens":{}}"#, &keys));
        assert!(!valid(b"{\"tokens\":", &keys));
        assert!(!valid(b"  ", &[]));
        assert!(valid(b"token", &[]));
    }

    #[test]
    fn delivery_writes_0600_files_and_refuses_escapes() {
        let home = tempfile::tempdir().expect("tmp");
        let logins = Target {
            home: home.path().to_owned(),
            run_as: RunAs::Current,
        };
        let set = |path: &str| FileSet {
            files: vec![FileBlob {
                path: path.into(),
                contents_b64: B64.encode(b"{}"),
            }],
        };
        logins.deliver(set(".codex/auth.json")).expect("deliver");
        let p = home.path().join(".codex/auth.json");
        assert_eq!(std::fs::read(&p).expect("read"), b"{}");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Replacing works.
        logins.deliver(set(".codex/auth.json")).expect("again");
        for bad in ["../x", "/etc/passwd", "a/../../b"] {
            assert!(matches!(
                logins.deliver(set(bad)),
                Err(LoginError::BadRequest(_))
            ));
        }
        std::os::unix::fs::symlink("/tmp", home.path().join("link")).expect("symlink");
        assert!(logins.deliver(set("link/x")).is_err());
    }

    fn one_file(path: &str) -> FileSet {
        FileSet {
            files: vec![FileBlob {
                path: path.into(),
                contents_b64: B64.encode(b"{\"token\":\"t\"}"),
            }],
        }
    }

    /// Everything under `dir` (itself included) with its owner.
    fn owners(dir: &Path) -> Vec<(PathBuf, u32)> {
        use std::os::unix::fs::MetadataExt;
        let mut out = vec![(
            dir.to_owned(),
            std::fs::symlink_metadata(dir).expect("meta").uid(),
        )];
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(owners(&p));
            } else {
                out.push((
                    p.clone(),
                    std::fs::symlink_metadata(&p).expect("meta").uid(),
                ));
            }
        }
        out
    }

    /// The workspace user when we are root (as the agent is), else ourselves.
    fn workspace_user() -> RunAs {
        if rustix::process::geteuid().is_root() {
            RunAs::User {
                uid: 1000,
                gid: 1000,
                groups: Vec::new(),
            }
        } else {
            RunAs::Current
        }
    }

    /// The user swaps a directory of its home for a symlink to a directory
    /// outside (here a stand-in for `/etc`) while credentials are delivered:
    /// nothing is created in it and nothing in it changes owner.
    #[test]
    fn delivery_never_follows_a_swapped_directory() {
        let root = tempfile::tempdir().expect("tmp");
        let home = root.path().join("home");
        let outside = root.path().join("etc");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::create_dir_all(outside.join("keep")).expect("outside");
        let before = owners(&outside);
        let logins = Target {
            home: home.clone(),
            run_as: workspace_user(),
        };

        // Standing still: a symlink where a directory should be is refused.
        std::os::unix::fs::symlink(&outside, home.join(".claude")).expect("symlink");
        let err = logins
            .deliver(one_file(".claude/.credentials.json"))
            .expect_err("through a symlink");
        assert!(matches!(err, LoginError::Conflict(_)), "{err:?}");
        assert!(
            logins.deliver(one_file(".claude")).is_err(),
            "onto a symlink"
        );

        // Racing: `.config` is a real directory one moment, a link the next
        // (swapped atomically, as any program of the user's can).
        std::fs::create_dir(home.join(".config")).expect("real");
        std::os::unix::fs::symlink(&outside, home.join("link")).expect("link");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (home, stop) = (home.clone(), stop.clone());
            std::thread::spawn(move || {
                let dir = open_home(&home).expect("home");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = rustix::fs::renameat_with(
                        &dir,
                        ".config",
                        &dir,
                        "link",
                        rustix::fs::RenameFlags::EXCHANGE,
                    );
                }
            })
        };
        let mut delivered = 0;
        for _ in 0..2000 {
            if logins
                .deliver(one_file(".config/gcloud/sub/creds.json"))
                .is_ok()
            {
                delivered += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().expect("swapper");
        assert_eq!(
            owners(&outside),
            before,
            "the directory outside the home changed ({delivered} deliveries went through)"
        );
    }

    /// Capture reads what the CLI wrote, but no link out of its directory
    /// (a root agent would hand over any file), and no FIFO (it would block).
    #[test]
    fn capture_follows_no_link() {
        let root = tempfile::tempdir().expect("tmp");
        let home = root.path().join("home");
        std::fs::create_dir_all(home.join(".codex")).expect("dirs");
        std::fs::create_dir_all(home.join(".gemini")).expect("dirs");
        std::fs::write(root.path().join("shadow"), b"{\"secret\":1}").expect("secret");
        std::fs::write(home.join(".codex/auth.json"), b"{}").expect("file");
        assert_eq!(
            read_limited(&home, ".codex/auth.json").expect("read"),
            b"{}"
        );
        std::os::unix::fs::symlink(root.path().join("shadow"), home.join(".codex/link.json"))
            .expect("symlink");
        assert!(read_limited(&home, ".codex/link.json").is_err());
        std::os::unix::fs::symlink(root.path(), home.join(".claude")).expect("symlink");
        assert!(read_limited(&home, ".claude/shadow").is_err());
        assert!(read_limited(&home, "../shadow").is_err());
        let fifo = home.join(".gemini/oauth_creds.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("fifo");
        assert!(read_limited(&home, ".gemini/oauth_creds.json").is_err());
    }
}
