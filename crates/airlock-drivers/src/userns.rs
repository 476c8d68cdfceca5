//! Host uid ranges for sandboxes' user namespaces. Each sandbox gets 65,536
//! host uids of its own (guest uid `k` is host uid `base + k`), so no guest
//! process runs as a host user that owns anything, and no two sandboxes share
//! an id.
//!
//! A range is taken by creating its lock file with `O_EXCL` in a directory all
//! airlock servers on the host share (a tmpfs, so a reboot frees everything,
//! as it ends every sandbox). The file names the sandbox directory that holds
//! it; a lock whose directory is gone is stale and is taken over. The ranges
//! start above systemd-nspawn's own `pick` range (which ends at 0x6FFF0000),
//! so sandboxes started by hand never collide with ours.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Ids per sandbox: the whole 16-bit range a distribution's tools expect.
pub const RANGE: u32 = 0x1_0000;
/// The first base handed out.
pub const FIRST_BASE: u32 = 0x7000_0000;
/// One past the last base: `0xFFFFFFFF` is the invalid uid and stays clear.
const END: u32 = 0xFFFE_0000;

/// Where the host's lock files live.
pub const DEFAULT_REGISTRY: &str = "/run/airlock/userns";

#[derive(Debug, Clone)]
pub struct UidRanges {
    dir: PathBuf,
}

impl UidRanges {
    pub fn new(dir: PathBuf) -> Self {
        UidRanges { dir }
    }

    fn lock(&self, base: u32) -> PathBuf {
        self.dir.join(base.to_string())
    }

    /// Whether `base` is one this allocator hands out.
    pub fn is_ours(base: u32) -> bool {
        (FIRST_BASE..END).contains(&base) && base.is_multiple_of(RANGE)
    }

    /// Take a free range for `owner` (a sandbox directory), `preferred` first
    /// when it is free (a workspace gets the range its home is owned by back,
    /// so the home needs no chown).
    pub fn allocate(&self, owner: &Path, preferred: Option<u32>) -> std::io::Result<u32> {
        std::fs::create_dir_all(&self.dir)?;
        let preferred = preferred.filter(|b| Self::is_ours(*b));
        let all = (FIRST_BASE..END).step_by(RANGE as usize);
        for base in preferred.into_iter().chain(all) {
            if self.try_take(base, owner)? {
                return Ok(base);
            }
        }
        Err(std::io::Error::other("every host uid range is in use"))
    }

    fn try_take(&self, base: u32, owner: &Path) -> std::io::Result<bool> {
        let path = self.lock(base);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(owner.as_os_str().as_encoded_bytes())?;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    if holder == owner.to_string_lossy() {
                        return Ok(true);
                    }
                    // A holder that never wrote its name is mid-allocation:
                    // leave it be. One whose directory is gone crashed.
                    if holder.is_empty() || Path::new(&holder).exists() {
                        return Ok(false);
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Give `base` back, if `owner` holds it.
    pub fn release(&self, base: u32, owner: &Path) {
        let path = self.lock(base);
        if std::fs::read_to_string(&path).is_ok_and(|h| h == owner.to_string_lossy()) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Give back every range `owner` holds, for a sandbox whose record does
    /// not say which (its creator died between allocating and writing it).
    pub fn release_all(&self, owner: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for base in entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|base| Self::is_ours(*base))
        {
            self.release(base, owner);
        }
    }
}

/// Move every file of a tree whose owner (or group) is in the range at `from`
/// to the same offset in the range at `to`; other ids are left alone. Links
/// are changed, never followed.
pub fn shift_tree(root: &Path, from: u32, to: u32) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let shift = |id: u32| {
        if (from..from.saturating_add(RANGE)).contains(&id) {
            Some(id - from + to)
        } else {
            None
        }
    };
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        let (uid, gid) = (shift(meta.uid()), shift(meta.gid()));
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid)?;
            changed += 1;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_exclusive_and_come_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ranges = UidRanges::new(tmp.path().join("reg"));
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).expect("a");
        std::fs::create_dir_all(&b).expect("b");
        let ra = ranges.allocate(&a, None).expect("a");
        let rb = ranges.allocate(&b, None).expect("b");
        assert_eq!(ra, FIRST_BASE);
        assert_eq!(rb, FIRST_BASE + RANGE);
        // Asking again for the same owner is idempotent.
        assert_eq!(ranges.allocate(&a, Some(ra)).expect("again"), ra);
        // Someone else's range is not handed out even when preferred.
        assert_ne!(ranges.allocate(&b, Some(ra)).expect("b2"), ra);
        // Release by someone else does nothing; by the holder frees it.
        ranges.release(ra, &b);
        assert!(tmp.path().join("reg").join(ra.to_string()).exists());
        ranges.release(ra, &a);
        assert_eq!(ranges.allocate(&b, Some(ra)).expect("b3"), ra);
    }

    #[test]
    fn every_range_of_an_owner_is_given_back_without_knowing_which() {
        let tmp = tempfile::tempdir().expect("tmp");
        let ranges = UidRanges::new(tmp.path().join("reg"));
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).expect("a");
        std::fs::create_dir_all(&b).expect("b");
        let of_a = ranges.allocate(&a, None).expect("a");
        let of_b = ranges.allocate(&b, None).expect("b");
        ranges.release_all(&a);
        assert!(!tmp.path().join("reg").join(of_a.to_string()).exists());
        assert!(
            tmp.path().join("reg").join(of_b.to_string()).exists(),
            "another owner's range stays"
        );
        assert_ne!(of_a, of_b);
        assert_eq!(
            ranges.allocate(&tmp.path().join("c"), None).expect("c"),
            of_a
        );
    }

    #[test]
    fn a_stale_lock_is_taken_over() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ranges = UidRanges::new(tmp.path().join("reg"));
        std::fs::create_dir_all(tmp.path().join("reg")).expect("reg");
        std::fs::write(
            tmp.path().join("reg").join(FIRST_BASE.to_string()),
            tmp.path().join("gone").to_string_lossy().as_bytes(),
        )
        .expect("stale");
        let live = tmp.path().join("live");
        std::fs::create_dir_all(&live).expect("live");
        assert_eq!(ranges.allocate(&live, None).expect("take"), FIRST_BASE);
    }

    #[test]
    fn a_preferred_base_outside_our_ranges_is_ignored() {
        assert!(!UidRanges::is_ours(1000));
        assert!(!UidRanges::is_ours(FIRST_BASE + 1));
        assert!(UidRanges::is_ours(FIRST_BASE + 7 * RANGE));
    }

    #[test]
    fn shifting_moves_only_ids_of_the_old_range() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("home");
        std::fs::create_dir_all(root.join("sub")).expect("dirs");
        std::fs::write(root.join("sub/f"), "x").expect("file");
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).expect("link");
        let from = FIRST_BASE;
        let to = FIRST_BASE + 3 * RANGE;
        for p in ["", "sub", "sub/f", "link"] {
            std::os::unix::fs::lchown(root.join(p), Some(from + 1000), Some(from + 1000))
                .expect("chown");
        }
        let passwd_owner = std::fs::metadata("/etc/passwd").expect("passwd").uid();
        let changed = shift_tree(&root, from, to).expect("shift");
        assert_eq!(changed, 4);
        for p in ["", "sub", "sub/f", "link"] {
            let m = std::fs::symlink_metadata(root.join(p)).expect("meta");
            assert_eq!((m.uid(), m.gid()), (to + 1000, to + 1000), "{p}");
        }
        // The link was changed, not followed.
        assert_eq!(
            std::fs::metadata("/etc/passwd").expect("passwd").uid(),
            passwd_owner
        );
    }
}
