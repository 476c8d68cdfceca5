//! One data dir, one control plane: `airlock up` holds an exclusive lock
//! (`flock`) on `<data_dir>/airlock.lock` for as long as it runs, and writes
//! into it its pid and which vault keys it holds. Commands that change what a
//! running server keeps in memory (`airlock vault rotate`) find the server
//! there, signal it (SIGHUP: reload the keyring) and read back that it did.
//!
//! The lock is the kernel's: it goes with the process, however that ends, so
//! a stale file never blocks a start.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOCK_FILE: &str = "airlock.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another airlock control plane{} already runs on the data dir {}; \
         one data dir takes one server (stop it first, or give this one its own --data-dir)",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .dir.display()
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("could not open or lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the running server wrote into the lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    /// The key that seals new records in the server's memory.
    pub vault_current: Option<String>,
    /// Every key the server holds, sorted, comma-separated.
    pub vault_keys: Option<String>,
}

impl Holder {
    fn parse(text: &str) -> Self {
        let mut h = Holder::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", v)) => h.pid = v.trim().parse().ok(),
                Some(("vault_current", v)) => h.vault_current = Some(v.trim().to_owned()),
                Some(("vault_keys", v)) => h.vault_keys = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        h
    }
}

/// The exclusive lock on a data dir; released when dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
}

/// Whether a server holds a data dir.
#[derive(Debug)]
pub enum Probe {
    /// Nobody did: the lock is now ours, until dropped.
    Free(DataDirLock),
    /// A server runs on it.
    Held(Holder),
}

fn open(dir: &Path) -> Result<(File, PathBuf), LockError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
    Ok((file, path))
}

fn read_holder(mut file: &File) -> Holder {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut text);
    Holder::parse(&text)
}

/// Take the data dir's lock, or say who holds it.
pub fn probe(dir: &Path) -> Result<Probe, LockError> {
    let (file, path) = open(dir)?;
    match file.try_lock() {
        Ok(()) => {
            // What is there was written by a process that has ended (its lock
            // went with it); its pid may be another process's by now, and
            // `vault rotate` must not signal that one.
            file.set_len(0).map_err(|source| LockError::Io {
                path: path.clone(),
                source,
            })?;
            Ok(Probe::Free(DataDirLock { file, path }))
        }
        Err(TryLockError::WouldBlock) => Ok(Probe::Held(read_holder(&file))),
        Err(TryLockError::Error(source)) => Err(LockError::Io { path, source }),
    }
}

/// What the server running on `dir` last wrote, if one runs.
pub fn holder(dir: &Path) -> Result<Option<Holder>, LockError> {
    Ok(match probe(dir)? {
        Probe::Free(_) => None,
        Probe::Held(h) => Some(h),
    })
}

impl DataDirLock {
    /// Take the lock for a server; refuses when another one holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        match probe(dir)? {
            Probe::Free(lock) => Ok(lock),
            Probe::Held(h) => Err(LockError::Held {
                dir: dir.to_owned(),
                pid: h.pid,
            }),
        }
    }

    /// Write this process's pid and the vault keys it now holds.
    pub fn record(&self, vault: &crate::vault::Vault) -> Result<(), LockError> {
        let text = format!(
            "pid={}\nvault_current={}\nvault_keys={}\n",
            std::process::id(),
            vault.current_key_id(),
            vault.key_ids().join(",")
        );
        let io = |source| LockError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = &self.file;
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

/// Ask the server with `pid` to reload its keyring (SIGHUP).
pub fn signal_reload(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) sends a signal to a process id; no memory is involved.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Wait until the server on `dir` reports exactly these keys, current first.
/// False when it did not within `within` (or stopped running).
pub async fn wait_for_keys(dir: &Path, current: &str, keys: &[String], within: Duration) -> bool {
    let want = keys.join(",");
    let deadline = Instant::now() + within;
    loop {
        match holder(dir) {
            Ok(Some(h))
                if h.vault_current.as_deref() == Some(current)
                    && h.vault_keys.as_deref() == Some(want.as_str()) =>
            {
                return true
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return false,
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_holder_does_not_show_the_last_runs_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(LOCK_FILE),
            "pid=4242\nvault_current=k1\nvault_keys=k1\n",
        )
        .expect("stale");
        let _lock = DataDirLock::acquire(dir.path()).expect("acquire");
        // Between taking the lock and `record`, a rotate sees no pid to signal.
        let h = holder(dir.path()).expect("probe").expect("held");
        assert_eq!(h, Holder::default());
    }

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(dir.path()).expect("first");
        first
            .record(&crate::vault::Vault::ephemeral())
            .expect("record");
        let err = DataDirLock::acquire(dir.path()).expect_err("second");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("one data dir"),
            "{msg}"
        );
        let h = holder(dir.path()).expect("probe").expect("held");
        assert_eq!(h.vault_current.as_deref(), Some("k1"));
        assert_eq!(h.vault_keys.as_deref(), Some("k1"));
        drop(first);
        assert!(holder(dir.path()).expect("probe").is_none());
        DataDirLock::acquire(dir.path()).expect("free again");
        let mode = std::fs::metadata(dir.path().join(LOCK_FILE))
            .expect("meta")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
