//! A user's volumes: `<data_dir>/volumes/<user id>/` holds what its workspace
//! sandboxes keep between boots (the `home` directory with the CLIs'
//! signed-in credentials, or a filesystem image of it). When the user is
//! removed, the whole directory goes with it.
//!
//! Removal never follows a symbolic link (a link is removed, not what it
//! names) and never deletes through a mount: while anything is mounted at or
//! under the directory it is left alone, and the reaper tries again on its
//! next round.

use super::{App, AppError};
use std::io;
use std::path::{Component, Path, PathBuf};

/// `<data_dir>/volumes`.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("volumes")
}

/// What became of a user's volume directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeRemoval {
    Removed,
    /// There was none.
    Absent,
    /// Something is mounted here, so nothing was deleted.
    Mounted(PathBuf),
}

/// Remove `<data_dir>/volumes/<user_id>`, unless something is mounted in it.
pub fn remove_user_volumes(data_dir: &Path, user_id: &str) -> io::Result<VolumeRemoval> {
    let mut parts = Path::new(user_id).components();
    let (Some(Component::Normal(_)), None) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{user_id:?} is not a user id"),
        ));
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    remove_unless_mounted(&root(data_dir).join(user_id), &mounts)
}

fn remove_unless_mounted(dir: &Path, mountinfo: &str) -> io::Result<VolumeRemoval> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VolumeRemoval::Absent),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        // A link (or a file) in place of the directory: the entry goes, what
        // it names stays.
        std::fs::remove_file(dir)?;
        return Ok(VolumeRemoval::Removed);
    }
    let real = dir.canonicalize()?;
    if let Some(at) = mount_points(mountinfo).find(|m| m.starts_with(&real)) {
        return Ok(VolumeRemoval::Mounted(at));
    }
    // Does not follow links inside: it removes the links themselves.
    std::fs::remove_dir_all(dir)?;
    Ok(VolumeRemoval::Removed)
}

/// The mount points `/proc/self/mountinfo` lists (its fifth field, with the
/// kernel's octal escapes for space, tab, newline and backslash undone).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let mut out = Vec::with_capacity(field.len());
            let bytes = field.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let octal = bytes.get(i + 1..i + 4).and_then(|d| {
                    std::str::from_utf8(d)
                        .ok()
                        .and_then(|d| u8::from_str_radix(d, 8).ok())
                });
                match (bytes[i], octal) {
                    (b'\\', Some(b)) => {
                        out.push(b);
                        i += 4;
                    }
                    (b, _) => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
        })
}

impl App {
    /// Remove the volume directories of users that no longer exist: those
    /// whose removal found something mounted there (or failed) are retried
    /// here, on every reaper round.
    pub async fn remove_orphan_volumes(&self) -> Result<(), AppError> {
        let root = root(&self.cfg.data_dir);
        // Listed before the users are read: a user added meanwhile has no
        // volume in this listing yet.
        let names: Vec<String> = match std::fs::read_dir(&root) {
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(AppError::Internal(format!("{}: {e}", root.display()))),
        };
        if names.is_empty() {
            return Ok(());
        }
        let users: std::collections::HashSet<String> = self
            .store
            .users()
            .await?
            .into_iter()
            .map(|u| u.id)
            .collect();
        for name in names.into_iter().filter(|n| !users.contains(n)) {
            log_outcome(&name, remove_user_volumes(&self.cfg.data_dir, &name));
        }
        Ok(())
    }
}

/// Say what happened to a removed user's volumes.
pub(crate) fn log_outcome(user_id: &str, outcome: io::Result<VolumeRemoval>) {
    match outcome {
        Ok(VolumeRemoval::Removed) => {
            tracing::info!(user_id, "a removed user's volumes were deleted")
        }
        Ok(VolumeRemoval::Absent) => {}
        Ok(VolumeRemoval::Mounted(at)) => tracing::warn!(
            user_id,
            mount = %at.display(),
            "a removed user's volumes are still mounted; they are deleted once unmounted"
        ),
        Err(e) => {
            tracing::error!(user_id, error = %e, "could not delete a removed user's volumes")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_deletes_the_directory_but_not_what_links_in_it_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(outside.join("keep"), "x").expect("keep");
        let home = root(tmp.path()).join("u1").join("home");
        std::fs::create_dir_all(home.join(".claude")).expect("home");
        std::fs::write(home.join(".claude/.credentials.json"), "secret").expect("creds");
        std::os::unix::fs::symlink(&outside, home.join("link")).expect("link");
        std::fs::write(root(tmp.path()).join("u1/home.img"), "img").expect("img");
        assert_eq!(
            remove_user_volumes(tmp.path(), "u1").expect("remove"),
            VolumeRemoval::Removed
        );
        assert!(!root(tmp.path()).join("u1").exists());
        assert!(outside.join("keep").exists());
        assert_eq!(
            remove_user_volumes(tmp.path(), "u1").expect("again"),
            VolumeRemoval::Absent
        );
        // A link in place of the user's directory: the link goes, its target stays.
        std::os::unix::fs::symlink(&outside, root(tmp.path()).join("u2")).expect("link");
        assert_eq!(
            remove_user_volumes(tmp.path(), "u2").expect("remove"),
            VolumeRemoval::Removed
        );
        assert!(outside.join("keep").exists());
        for bad in ["", "..", "a/b", "/etc"] {
            assert!(remove_user_volumes(tmp.path(), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nothing_is_deleted_through_a_mount() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = root(tmp.path()).join("u 1");
        std::fs::create_dir_all(dir.join("home")).expect("home");
        let real = dir.canonicalize().expect("real");
        let escaped = real
            .join("home")
            .display()
            .to_string()
            .replace(' ', "\\040");
        let mountinfo = format!(
            "22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n\
             90 22 7:0 / {escaped} rw,nosuid shared:50 - ext4 /dev/loop0 rw\n"
        );
        assert_eq!(
            remove_unless_mounted(&dir, &mountinfo).expect("checked"),
            VolumeRemoval::Mounted(real.join("home"))
        );
        assert!(dir.join("home").exists());
        // A mount beside it (a prefix of the name, not a parent) does not count.
        let beside = format!("90 22 7:0 / {}x rw - ext4 /dev/loop0 rw\n", real.display())
            .replace("u 1x", "u\\0401x");
        assert_eq!(
            remove_unless_mounted(&dir, &beside).expect("removed"),
            VolumeRemoval::Removed
        );
    }
}
