//! Small host operations the builder and verifier share: running a program with
//! its output forwarded to the progress, mounts, and careful directory removal.

use crate::{ImageError, Progress};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lines of output kept to explain a failure.
const TAIL_LINES: usize = 30;

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false)
}

/// The captured outcome of [`run`].
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub status: String,
    /// Every stdout line (stderr is only forwarded and kept in `tail`).
    pub stdout: String,
    pub tail: String,
}

/// Runs `cmd` with umask 022 (layers must be world-readable whatever the
/// caller's umask), forwarding every output line to `progress` and killing it
/// after `timeout`.
pub fn run(
    mut cmd: Command,
    doing: &str,
    progress: &dyn Progress,
    timeout: Duration,
) -> Result<Output, ImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut wrapped = Command::new("/bin/sh");
    wrapped
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    cmd = wrapped;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ImageError::Spawn {
        program: program.clone(),
        doing: doing.to_owned(),
        source,
    })?;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((true, line));
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send((false, line));
            }
        }));
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut stdout = String::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((is_stdout, line)) => {
                if is_stdout {
                    stdout.push_str(&line);
                    stdout.push('\n');
                }
                if !line.trim().is_empty() {
                    progress.message(line.trim());
                }
                tail.push_back(line);
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let status = child
        .wait()
        .map_err(|e| ImageError::io(format!("waiting for {program}"), e))?;
    if !timed_out {
        for r in readers {
            let _ = r.join();
        }
    }
    let tail: Vec<String> = tail.into_iter().collect();
    Ok(Output {
        success: status.success() && !timed_out,
        status: if timed_out {
            format!("timed out after {timeout:?}")
        } else {
            status.to_string()
        },
        stdout,
        tail: tail.join("\n"),
    })
}

/// [`run`], with a failure turned into an error.
pub fn run_ok(
    cmd: Command,
    doing: &str,
    progress: &dyn Progress,
    timeout: Duration,
) -> Result<Output, ImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = run(cmd, doing, progress, timeout)?;
    if !out.success {
        return Err(ImageError::Command {
            program,
            doing: doing.to_owned(),
            status: out.status,
            tail: out.tail,
        });
    }
    Ok(out)
}

/// Creates `dir` and its missing parents with mode 0755, whatever the umask:
/// in an overlay, an upper layer's directory attributes hide the lower ones'.
pub fn mkdirs(dir: &Path) -> Result<(), ImageError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    for d in missing.iter().rev() {
        std::fs::create_dir(d)
            .map_err(|e| ImageError::io(format!("creating {}", d.display()), e))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ImageError::io(format!("setting the mode of {}", d.display()), e))?;
    }
    Ok(())
}

pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), ImageError> {
    if let Some(parent) = path.parent() {
        mkdirs(parent)?;
    }
    std::fs::write(path, data)
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(format!("setting the mode of {}", path.display()), e))
}

pub fn symlink(target: &str, link: &Path) -> Result<(), ImageError> {
    if let Some(parent) = link.parent() {
        mkdirs(parent)?;
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| ImageError::io(format!("linking {} to {target}", link.display()), e))
}

/// Mount points at or below `path`, deepest first (from /proc/self/mountinfo).
pub fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|m| m.starts_with(path))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Every lower directory of every overlay mounted in this mount namespace:
/// layers that a running sandbox may be reading, whoever mounted it.
pub fn overlay_lowerdirs() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| parse_overlay_lowerdirs(&info))
        .unwrap_or_default()
}

fn parse_overlay_lowerdirs(info: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for line in info.lines() {
        // `… mountpoint options [optional fields] - fstype source superoptions`
        let Some((_, tail)) = line.split_once(" - ") else {
            continue;
        };
        let mut fields = tail.split(' ');
        if fields.next() != Some("overlay") {
            continue;
        }
        let Some(options) = fields.nth(1) else {
            continue;
        };
        for option in options.split(',') {
            if let Some(list) = option.strip_prefix("lowerdir=") {
                dirs.extend(
                    list.split(':')
                        .map(|d| PathBuf::from(unescape_mountinfo(d))),
                );
            } else if let Some(one) = option.strip_prefix("lowerdir+=") {
                dirs.push(PathBuf::from(unescape_mountinfo(one)));
            }
        }
    }
    dirs
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn unmount(path: &Path) -> Result<(), ImageError> {
    let out = Command::new("umount")
        .arg(path)
        .output()
        .map_err(|source| ImageError::Spawn {
            program: "umount".into(),
            doing: format!("unmounting {}", path.display()),
            source,
        })?;
    if !out.status.success() {
        // Busy (a process still inside): detach it now, the kernel finishes later.
        let lazy = Command::new("umount").arg("-l").arg(path).status();
        if !matches!(lazy, Ok(s) if s.success()) {
            return Err(ImageError::Command {
                program: "umount".into(),
                doing: format!("unmounting {}", path.display()),
                status: out.status.to_string(),
                tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

/// Removes a tree the builder made, after unmounting anything left mounted in it
/// (a crashed mmdebstrap's /proc, a crashed verify's overlay): never descends
/// into a mount.
pub fn remove_tree(path: &Path) -> Result<(), ImageError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    for m in mounts_below(path) {
        unmount(&m)?;
    }
    if let Some(m) = mounts_below(path).first() {
        return Err(ImageError::Recipe(format!(
            "{} is still mounted; not removing {}",
            m.display(),
            path.display()
        )));
    }
    std::fs::remove_dir_all(path)
        .map_err(|e| ImageError::io(format!("removing {}", path.display()), e))
}

/// Bytes an unprivileged writer may still use on the file system holding
/// `path`, or `None` when the file system cannot be asked.
#[allow(unsafe_code)]
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by the call.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses to start `what` when the file system holding `dir` has less than
/// `need` bytes free: failing before a long step beats an `ENOSPC` half-way
/// through it (and the half-written output it leaves). Unknown free space is
/// not a reason to refuse.
pub fn ensure_space(what: &str, dir: &Path, need: u64) -> Result<(), ImageError> {
    check_space(what, dir, need, free_bytes(dir))
}

fn check_space(what: &str, dir: &Path, need: u64, free: Option<u64>) -> Result<(), ImageError> {
    match free {
        Some(free) if free < need => Err(ImageError::NoSpace {
            what: what.into(),
            dir: dir.to_path_buf(),
            need_mib: need.div_ceil(1 << 20),
            free_mib: free >> 20,
        }),
        _ => Ok(()),
    }
}

/// Removes a file or a tree (see [`remove_tree`]); absent is fine.
pub fn remove_path(path: &Path) -> Result<(), ImageError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(path)
            .map_err(|e| ImageError::io(format!("removing {}", path.display()), e)),
        _ => remove_tree(path),
    }
}

/// Bytes of regular-file content under `path` (symlinks not followed).
pub fn tree_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(Result::ok).map(|e| e.path()));
            }
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_lower_directories_are_read_from_mountinfo() {
        let info = "\
22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
98 1 0:52 / /srv/sb/1/merged rw,relatime shared:40 - overlay overlay rw,lowerdir=/img/layers/meta-1:/img/layers/base-1,upperdir=/srv/sb/1/upper,workdir=/srv/sb/1/work
99 1 0:53 / /srv/sb/2/merged rw - overlay overlay rw,lowerdir+=/img/a\\040b,lowerdir+=/img/c,upperdir=/u,workdir=/w
100 1 8:1 / /data rw - ext4 /dev/vda rw,lowerdir=/not/overlay
";
        assert_eq!(
            parse_overlay_lowerdirs(info),
            [
                "/img/layers/meta-1",
                "/img/layers/base-1",
                "/img/a b",
                "/img/c"
            ]
            .map(PathBuf::from)
            .to_vec()
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn too_little_space_is_refused_with_both_figures() {
        let dir = Path::new("/images");
        let err = check_space("the ext4", dir, 3 << 30, Some(512 << 20)).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("the ext4") && text.contains("3072 MiB"),
            "{text}"
        );
        assert!(
            text.contains("512 MiB are free") && text.contains("/images"),
            "{text}"
        );
        assert!(text.contains("airlock image prune"), "{text}");
        assert!(check_space("x", dir, 1 << 20, Some(1 << 20)).is_ok());
        assert!(
            check_space("x", dir, u64::MAX, None).is_ok(),
            "unknown is not a refusal"
        );
        let here = free_bytes(Path::new("/")).expect("statvfs /");
        assert!(here > 0);
        assert!(ensure_space("x", Path::new("/"), u64::MAX).is_err());
    }

    #[test]
    fn remove_path_takes_files_trees_and_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f.ext4");
        std::fs::write(&file, b"x").expect("write");
        mkdirs(&dir.path().join("t/u")).expect("mkdirs");
        remove_path(&file).expect("file");
        remove_path(&dir.path().join("t")).expect("tree");
        remove_path(&dir.path().join("absent")).expect("absent");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn mkdirs_sets_0755_and_sizes_add_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b/c");
        mkdirs(&deep).expect("mkdirs");
        assert_eq!(
            std::fs::metadata(dir.path().join("a"))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        write_file(&deep.join("f"), b"12345", 0o600).expect("write");
        symlink("/nonexistent", &deep.join("l")).expect("symlink");
        assert_eq!(tree_size(dir.path()), 5);
        remove_tree(&dir.path().join("a")).expect("remove");
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn run_forwards_output_and_reports_failure() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo out; echo err >&2; umask; exit 4");
        let out = run(cmd, "testing", &crate::NoProgress, Duration::from_secs(10)).expect("run");
        assert!(!out.success);
        assert_eq!(out.stdout, "out\n0022\n");
        assert!(out.tail.contains("err"));
        let mut slow = Command::new("sleep");
        slow.arg("30");
        let out = run(
            slow,
            "sleeping",
            &crate::NoProgress,
            Duration::from_millis(300),
        )
        .expect("run");
        assert!(out.status.contains("timed out"));
    }
}
