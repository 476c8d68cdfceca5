//! `PUT`/`GET /files?path=…`: one file up or down, a directory down as a tar
//! stream, confined to the sandbox user's home and /tmp.
//!
//! Two fences. The path is checked first: no `..`, inside the home or /tmp,
//! and its directory, with every symlink resolved, still inside. Then the
//! file work runs on a thread of its own that has taken the user's
//! file-system identity (`setfsuid`, `setfsgid`, its groups; Linux keeps
//! these per thread and drops the root's file capabilities with them), so
//! the kernel checks every open as it would for the user, a new file belongs
//! to the user, and a symlink swapped in after the check leads nowhere the
//! user could not go anyway. The last component is opened with `O_NOFOLLOW`.

use crate::exec::RunAs;
use crate::server::{error, AgentState};
use airlock_proto::process::{FileInfo, MAX_FILE_BYTES, MAX_TAR_BYTES};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Chunks of a download in flight between the reading thread and the socket.
const DOWNLOAD_QUEUE: usize = 8;
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    fn io(path: &str, source: std::io::Error) -> FileError {
        match source.kind() {
            std::io::ErrorKind::NotFound => FileError::NotFound(format!("{path}: no such file")),
            std::io::ErrorKind::PermissionDenied => {
                FileError::Forbidden(format!("{path}: permission denied"))
            }
            _ if source.raw_os_error() == Some(libc::ELOOP) => {
                FileError::Forbidden(format!("{path}: is a symlink (not followed)"))
            }
            _ => FileError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }

    fn answer(&self) -> Response {
        let status = match self {
            FileError::Bad(_) => StatusCode::BAD_REQUEST,
            FileError::Forbidden(_) => StatusCode::FORBIDDEN,
            FileError::NotFound(_) => StatusCode::NOT_FOUND,
            FileError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            FileError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, crate::chain(self))
    }
}

/// Where files may be: the user's home and /tmp.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub home: PathBuf,
    pub tmp: PathBuf,
}

impl Confinement {
    fn roots(&self) -> [&Path; 2] {
        [&self.home, &self.tmp]
    }

    fn canonical_roots(&self) -> Vec<PathBuf> {
        self.roots()
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .collect()
    }

    /// The absolute path `asked` names, if it is allowed: its directory
    /// resolved (symlinks followed) and its last component as given.
    pub fn resolve(&self, asked: &str) -> Result<PathBuf, FileError> {
        if asked.is_empty() || asked.contains('\0') {
            return Err(FileError::Bad(format!(
                "{asked:?}: a path must be non-empty without NUL"
            )));
        }
        let p = Path::new(asked);
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(FileError::Forbidden(format!(
                "{asked}: '..' is not allowed in a path"
            )));
        }
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.home.join(p)
        };
        if !self.roots().iter().any(|r| full.starts_with(r)) {
            return Err(FileError::Forbidden(format!(
                "{asked}: outside the home directory ({}) and /tmp",
                self.home.display()
            )));
        }
        let roots = self.canonical_roots();
        // The home (or /tmp) itself: a directory to download.
        if let Some(root) = self.roots().iter().find(|r| full == **r) {
            return std::fs::canonicalize(root).map_err(|e| FileError::io(asked, e));
        }
        let (Some(parent), Some(name)) = (full.parent(), full.file_name()) else {
            return Err(FileError::Bad(format!("{asked}: names no file")));
        };
        let parent = std::fs::canonicalize(parent).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FileError::NotFound(format!(
                "{asked}: the directory {} does not exist",
                parent.display()
            )),
            _ => FileError::io(asked, e),
        })?;
        if !roots.iter().any(|r| parent.starts_with(r)) {
            return Err(FileError::Forbidden(format!(
                "{asked}: a symlink leads out of the home directory and /tmp"
            )));
        }
        Ok(parent.join(name))
    }

    /// A download target: like [`resolve`](Self::resolve), and a symlink at
    /// the end must stay inside too.
    fn resolve_existing(&self, asked: &str) -> Result<PathBuf, FileError> {
        let path = self.resolve(asked)?;
        let meta = std::fs::symlink_metadata(&path).map_err(|e| FileError::io(asked, e))?;
        if !meta.file_type().is_symlink() {
            return Ok(path);
        }
        let target = std::fs::canonicalize(&path).map_err(|e| FileError::io(asked, e))?;
        if !self.canonical_roots().iter().any(|r| target.starts_with(r)) {
            return Err(FileError::Forbidden(format!(
                "{asked}: a symlink leads out of the home directory and /tmp"
            )));
        }
        Ok(target)
    }
}

/// Runs `f` on a new thread with `run_as`'s file-system identity.
async fn as_user<T: Send + 'static>(
    run_as: &RunAs,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FileError> {
    let run_as = run_as.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        if let Err(e) = take_identity(&run_as) {
            drop(tx.send(Err(e)));
            return;
        }
        drop(tx.send(Ok(f())));
    });
    rx.await.unwrap_or_else(|_| {
        Err(FileError::Io {
            path: String::new(),
            source: std::io::Error::other("the file thread ended early"),
        })
    })
}

/// This thread (only) takes the user's groups and file-system ids.
#[allow(unsafe_code)]
fn take_identity(run_as: &RunAs) -> Result<(), FileError> {
    let RunAs::User { uid, gid, groups } = run_as else {
        return Ok(());
    };
    let fail = |what| FileError::Io {
        path: String::new(),
        source: std::io::Error::other(format!("{what}: {}", std::io::Error::last_os_error())),
    };
    // SAFETY: raw system calls that change this thread's credentials only
    // (the libc wrappers would change every thread's); the group list lives
    // for the call.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
            return Err(fail("setgroups"));
        }
        libc::syscall(libc::SYS_setfsgid, *gid);
        libc::syscall(libc::SYS_setfsuid, *uid);
        // setfsuid answers the previous id whatever happened: ask again.
        if libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 != *uid
            || libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 != *gid
        {
            return Err(fail("setfsuid"));
        }
    }
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    path: String,
}

#[allow(clippy::result_large_err)] // the error is the answer, as in every handler
fn path_of(q: Result<Query<FileQuery>, QueryRejection>) -> Result<String, Response> {
    q.map(|Query(q)| q.path).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("{} (?path= is required)", e.body_text()),
        )
    })
}

fn confinement(state: &AgentState) -> Confinement {
    Confinement {
        home: state.exec.home.clone(),
        tmp: PathBuf::from("/tmp"),
    }
}

/// An upload is written to a new file beside its target, as it arrives,
/// and renamed over the target once whole: a refused or broken upload leaves
/// nothing behind, and a reader never sees half a file.
async fn put(
    State(state): State<Arc<AgentState>>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FileInfo>, Response> {
    let asked = path_of(q)?;
    let path = confinement(&state)
        .resolve(&asked)
        .map_err(|e| e.answer())?;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_FILE_BYTES as u64) {
        return Err(too_large(&asked));
    }
    let run_as = state.exec.run_as.clone();
    let (shown, target) = (asked.clone(), path.clone());
    let (file, temp) = as_user(&run_as, move || open_beside(&target, &shown))
        .await
        .and_then(|r| r)
        .map_err(|e| e.answer())?;
    let written = match receive(file, body, &asked).await {
        Ok(n) => n,
        Err(refusal) => {
            let temp = temp.clone();
            let _ = as_user(&run_as, move || std::fs::remove_file(temp)).await;
            return Err(refusal);
        }
    };
    let (shown, from, to) = (asked.clone(), temp.clone(), path.clone());
    let renamed = as_user(&run_as, move || {
        std::fs::rename(&from, &to).map_err(|e| {
            let _ = std::fs::remove_file(&from);
            FileError::io(&shown, e)
        })
    })
    .await
    .and_then(|r| r);
    renamed.map_err(|e| e.answer())?;
    let info = FileInfo {
        path: path.display().to_string(),
        size: written,
    };
    tracing::info!(path = %info.path, size = info.size, "file written");
    Ok(Json(info))
}

fn too_large(asked: &str) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("{asked}: larger than {} MiB", MAX_FILE_BYTES >> 20),
    )
}

/// Opens a new file beside `target` (as the user), refusing a target that
/// is a symlink or a directory; an existing file's permissions carry over.
fn open_beside(target: &Path, asked: &str) -> Result<(std::fs::File, PathBuf), FileError> {
    let mode = match std::fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(FileError::Forbidden(format!(
                "{asked}: is a symlink (not followed)"
            )))
        }
        Ok(m) if m.is_dir() => {
            return Err(FileError::Bad(format!("{asked}: is a directory")));
        }
        // Permission bits only: never a set-id bit on a file written for a caller.
        Ok(m) => m.mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0o644,
        Err(e) => return Err(FileError::io(asked, e)),
    };
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(FileError::Bad(format!("{asked}: names no file")));
    };
    for attempt in 0u32.. {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let temp = dir.join(format!(
            ".{}.upload-{}-{nanos:x}",
            name.to_string_lossy(),
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
        {
            Ok(f) => {
                // The umask may have taken bits the old file had.
                let _ = f.set_permissions(std::fs::Permissions::from_mode(mode));
                return Ok((f, temp));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => continue,
            Err(e) => return Err(FileError::io(asked, e)),
        }
    }
    unreachable!("the loop returns")
}

/// Writes the body into `file` as it arrives, at most [`MAX_FILE_BYTES`].
async fn receive(file: std::fs::File, body: Body, asked: &str) -> Result<u64, Response> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::File::from_std(file);
    let mut frames = body.into_data_stream();
    let mut written = 0u64;
    let failed = |e: std::io::Error| FileError::io(asked, e).answer();
    while let Some(chunk) = frames.next().await {
        let chunk = chunk.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{asked}: the upload broke off: {e}"),
            )
        })?;
        written += chunk.len() as u64;
        if written > MAX_FILE_BYTES as u64 {
            return Err(too_large(asked));
        }
        file.write_all(&chunk).await.map_err(failed)?;
    }
    file.flush().await.map_err(failed)?;
    file.sync_all().await.map_err(failed)?;
    Ok(written)
}

async fn get_file(
    State(state): State<Arc<AgentState>>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, Response> {
    let asked = path_of(q)?;
    let path = confinement(&state)
        .resolve_existing(&asked)
        .map_err(|e| e.answer())?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(DOWNLOAD_QUEUE);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<bool, FileError>>();
    let shown = asked.clone();
    // The thread opens the file as the user and says whether it is a
    // directory before it streams; the answer's headers wait for that.
    let run_as = state.exec.run_as.clone();
    std::thread::spawn(move || {
        if let Err(e) = take_identity(&run_as) {
            drop(first_tx.send(Err(e)));
            return;
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| FileError::io(&shown, e));
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                drop(first_tx.send(Err(e)));
                return;
            }
        };
        let is_dir = file.metadata().map(|m| m.is_dir()).unwrap_or(false);
        if is_dir {
            if let Some(size) = tar::size_over(&path, MAX_TAR_BYTES) {
                drop(first_tx.send(Err(FileError::TooLarge(format!(
                    "{shown}: the directory makes a tar of more than {} MiB ({} MiB or more); \
                     download its parts",
                    MAX_TAR_BYTES >> 20,
                    size >> 20
                )))));
                return;
            }
        }
        drop(first_tx.send(Ok(is_dir)));
        let result = if is_dir {
            drop(file);
            let mut out = tar::Capped {
                inner: ChannelWriter { tx: &tx },
                left: MAX_TAR_BYTES,
            };
            tar::write_dir(&path, &mut out)
        } else {
            copy(file, &mut ChannelWriter { tx: &tx })
        };
        if let Err(e) = result {
            drop(tx.blocking_send(Err(e)));
        }
    });
    let is_dir = first_rx
        .await
        .map_err(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the file thread ended early",
            )
        })?
        .map_err(|e| e.answer())?;
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let content_type = if is_dir {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response())
}

fn copy(mut file: std::fs::File, out: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return out.flush();
        }
        out.write_all(&buf[..n])?;
    }
}

/// Writes go to the download's channel in chunks.
#[derive(Debug)]
struct ChannelWriter<'a> {
    tx: &'a mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Write for ChannelWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn routes() -> Router<Arc<AgentState>> {
    // The upload is read as a stream (not through a body extractor), so it
    // counts its own bytes against MAX_FILE_BYTES.
    Router::new().route("/files", get(get_file).put(put))
}

/// A directory as a POSIX tar stream (ustar, with GNU long names), written
/// as it is walked: regular files, directories and symlinks (not followed).
pub mod tar {
    use super::*;

    const BLOCK: usize = 512;

    /// The size of `root`'s tar, if it is more than `cap` (the walk stops
    /// there); `None` when it fits.
    pub fn size_over(root: &Path, cap: u64) -> Option<u64> {
        fn walk(dir: &Path, total: &mut u64, cap: u64) {
            // A header, and a long-name header for a long name.
            *total += 3 * BLOCK as u64;
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.filter_map(Result::ok) {
                if *total > cap {
                    return;
                }
                let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                    continue;
                };
                if meta.is_dir() {
                    walk(&entry.path(), total, cap);
                } else {
                    *total += 3 * BLOCK as u64 + meta.len().div_ceil(BLOCK as u64) * BLOCK as u64;
                }
            }
        }
        let mut total = 2 * BLOCK as u64;
        walk(root, &mut total, cap);
        (total > cap).then_some(total)
    }

    /// Passes at most `left` bytes on, then fails: a directory that grew
    /// past the cap while it streams is cut off.
    #[derive(Debug)]
    pub struct Capped<W> {
        pub inner: W,
        pub left: u64,
    }

    impl<W: Write> Write for Capped<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if buf.len() as u64 > self.left {
                return Err(std::io::Error::other(format!(
                    "the directory grew past {} MiB while it was sent",
                    MAX_TAR_BYTES >> 20
                )));
            }
            let n = self.inner.write(buf)?;
            self.left -= n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    pub fn write_dir(root: &Path, out: &mut impl Write) -> std::io::Result<()> {
        let base = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        walk(root, &base, out)?;
        out.write_all(&[0u8; BLOCK * 2])?;
        out.flush()
    }

    fn walk(dir: &Path, name: &str, out: &mut impl Write) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(dir)?;
        header(out, &format!("{name}/"), &meta, b'5', 0, "")?;
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let child = format!("{name}/{}", entry.file_name().to_string_lossy());
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // gone meanwhile
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                walk(&path, &child, out)?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                header(out, &child, &meta, b'2', 0, &target.to_string_lossy())?;
            } else if ft.is_file() {
                // Unreadable files (permissions) are left out, not fatal.
                let Ok(file) = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                else {
                    continue;
                };
                let size = meta.len();
                header(out, &child, &meta, b'0', size, "")?;
                let mut sent = 0u64;
                let mut limited = file.take(size);
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = limited.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                    sent += n as u64;
                }
                // A file that shrank while read is padded to its header's size.
                let mut left = size - sent;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    out.write_all(&vec![0u8; n])?;
                    left -= n as u64;
                }
                pad(out, size)?;
            }
        }
        Ok(())
    }

    fn pad(out: &mut impl Write, size: u64) -> std::io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            out.write_all(&vec![0u8; BLOCK - rem])?;
        }
        Ok(())
    }

    fn octal(field: &mut [u8], value: u64) {
        let digits = field.len() - 1;
        let s = format!("{value:0digits$o}");
        let bytes = s.as_bytes();
        let start = bytes.len().saturating_sub(digits);
        field[..digits].copy_from_slice(&bytes[start..]);
        field[digits] = 0;
    }

    fn raw_header(
        name: &[u8],
        mode: u32,
        meta_ids: (u32, u32, i64),
        kind: u8,
        size: u64,
        link: &[u8],
    ) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(mode & 0o7777));
        octal(&mut h[108..116], u64::from(meta_ids.0));
        octal(&mut h[116..124], u64::from(meta_ids.1));
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], meta_ids.2.max(0) as u64);
        h[148..156].copy_from_slice(b"        ");
        h[156] = kind;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }

    fn header(
        out: &mut impl Write,
        name: &str,
        meta: &std::fs::Metadata,
        kind: u8,
        size: u64,
        link: &str,
    ) -> std::io::Result<()> {
        let ids = (meta.uid(), meta.gid(), meta.mtime());
        for (long, flag) in [(link.as_bytes(), b'K'), (name.as_bytes(), b'L')] {
            if long.len() > 100 {
                let mut data = long.to_vec();
                data.push(0);
                let h = raw_header(
                    b"././@LongLink",
                    0o644,
                    (0, 0, 0),
                    flag,
                    data.len() as u64,
                    b"",
                );
                out.write_all(&h)?;
                out.write_all(&data)?;
                pad(out, data.len() as u64)?;
            }
        }
        out.write_all(&raw_header(
            name.as_bytes(),
            meta.mode(),
            ids,
            kind,
            size,
            link.as_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(dir: &Path) -> Confinement {
        let home = dir.join("home");
        std::fs::create_dir_all(home.join("sub")).expect("mkdir");
        Confinement {
            home,
            tmp: dir.join("tmp"),
        }
    }

    #[test]
    fn paths_are_confined_and_refusals_say_why() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = fence(dir.path());
        std::fs::create_dir_all(&c.tmp).expect("mkdir");
        std::os::unix::fs::symlink("/etc", c.home.join("out")).expect("symlink");
        std::os::unix::fs::symlink("/etc/passwd", c.home.join("pw")).expect("symlink");
        std::os::unix::fs::symlink(c.home.join("sub"), c.home.join("in")).expect("symlink");

        assert_eq!(
            c.resolve("a.txt").expect("ok"),
            std::fs::canonicalize(&c.home).expect("c").join("a.txt")
        );
        assert!(c.resolve("in/x").expect("ok").ends_with("sub/x"));
        assert!(c.resolve(&c.tmp.join("t").display().to_string()).is_ok());
        for (asked, why) in [
            ("../x", "'..'"),
            ("sub/../../x", "'..'"),
            ("/etc/passwd", "outside"),
            ("/root/x", "outside"),
            ("out/passwd", "symlink leads out"),
        ] {
            let err = c.resolve(asked).expect_err(asked);
            assert!(matches!(err, FileError::Forbidden(_)), "{asked}: {err}");
            let m = err.to_string();
            assert!(m.contains(asked) && m.contains(why), "{asked}: {m}");
        }
        let err = c.resolve_existing("pw").expect_err("leads out");
        assert!(err.to_string().contains("symlink leads out"), "{err}");
        assert!(matches!(c.resolve("nodir/x"), Err(FileError::NotFound(_))));
        assert!(matches!(c.resolve(""), Err(FileError::Bad(_))));
    }

    #[test]
    fn a_directory_over_the_cap_is_measured_before_it_is_sent() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        std::fs::write(root.join("a/big"), vec![1u8; 100_000]).expect("write");
        std::fs::write(root.join("small"), b"x").expect("write");
        let mut out = Vec::new();
        tar::write_dir(&root, &mut out).expect("tar");
        let real = out.len() as u64;
        // The estimate never says less than the real tar.
        assert_eq!(tar::size_over(&root, real * 2), None);
        let over = tar::size_over(&root, real - 1).expect("over");
        assert!(over >= real, "{over} < {real}");
        // While streaming, the cap cuts it off.
        let mut capped = tar::Capped {
            inner: Vec::new(),
            left: 50_000,
        };
        assert!(tar::write_dir(&root, &mut capped).is_err());
        assert!(capped.inner.len() <= 50_000);
    }

    #[test]
    fn a_directory_becomes_a_tar_that_tar_reads() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("tree");
        let long = "n".repeat(150);
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/b/file.txt"), b"hello tar\n").expect("write");
        std::fs::write(root.join(&long), vec![7u8; 1000]).expect("write");
        std::os::unix::fs::symlink("a/b/file.txt", root.join("link")).expect("symlink");
        let mut out = Vec::new();
        tar::write_dir(&root, &mut out).expect("tar");
        assert_eq!(out.len() % 512, 0);
        let tarball = dir.path().join("t.tar");
        std::fs::write(&tarball, &out).expect("write");
        let unpack = dir.path().join("unpack");
        std::fs::create_dir(&unpack).expect("mkdir");
        let status = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&unpack)
            .status()
            .expect("tar runs");
        assert!(status.success());
        assert_eq!(
            std::fs::read(unpack.join("tree/a/b/file.txt")).expect("read"),
            b"hello tar\n"
        );
        assert_eq!(
            std::fs::read(unpack.join("tree").join(&long))
                .expect("read")
                .len(),
            1000
        );
        assert_eq!(
            std::fs::read_link(unpack.join("tree/link")).expect("link"),
            Path::new("a/b/file.txt")
        );
    }
}
