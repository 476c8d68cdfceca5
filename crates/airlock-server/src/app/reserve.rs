//! The disk reserve: 16 MiB held in the data directory while its disk has
//! room, given back as soon as the disk is full. A full disk refuses every
//! database write, the ones that free space included: a delete records
//! `stopping` before it tears anything down. With the reserve given back,
//! deletes go through; creates stay refused (507) by the free-disk floor
//! until there is room again, and then the reserve is taken back.
//!
//! Checked once per supervisor round.

use std::io::Write;
use std::path::Path;

/// The size of the reserve.
pub const RESERVE_BYTES: u64 = 16 << 20;

/// Its file, in the data directory.
const FILE: &str = "disk-reserve";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Keep,
    Release,
    Take,
}

/// What to do, given the bytes still free and whether the reserve is held.
/// Taken back only with four times its size free, so it does not flap.
pub fn decide(free: u64, held: bool) -> Step {
    if held && free < RESERVE_BYTES {
        Step::Release
    } else if !held && free >= 4 * RESERVE_BYTES {
        Step::Take
    } else {
        Step::Keep
    }
}

/// Apply [`decide`] to the data directory.
pub fn adjust(data_dir: &Path, free: u64) {
    let path = data_dir.join(FILE);
    let held = std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES);
    match decide(free, held) {
        Step::Keep => {}
        Step::Release => match std::fs::remove_file(&path) {
            Ok(()) => tracing::warn!(
                free_bytes = free,
                "the disk holding the data directory is full: gave back the 16 MiB reserve so deletes still work"
            ),
            Err(e) => tracing::warn!(error = %e, "could not give back the disk reserve"),
        },
        Step::Take => {
            let written = std::fs::File::create(&path).and_then(|mut f| {
                let chunk = vec![0u8; 1 << 20];
                for _ in 0..(RESERVE_BYTES >> 20) {
                    f.write_all(&chunk)?;
                }
                f.sync_all()
            });
            if let Err(e) = written {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(error = %e, "could not take the disk reserve");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_back_when_full_and_taken_again_only_with_room() {
        assert_eq!(decide(RESERVE_BYTES - 1, true), Step::Release);
        assert_eq!(decide(0, true), Step::Release);
        assert_eq!(decide(RESERVE_BYTES, true), Step::Keep);
        assert_eq!(decide(0, false), Step::Keep);
        assert_eq!(decide(2 * RESERVE_BYTES, false), Step::Keep, "no flapping");
        assert_eq!(decide(4 * RESERVE_BYTES, false), Step::Take);
    }

    #[test]
    fn the_file_is_made_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        adjust(dir.path(), 1 << 40);
        let len = std::fs::metadata(dir.path().join(FILE)).map(|m| m.len());
        assert_eq!(len.ok(), Some(RESERVE_BYTES));
        adjust(dir.path(), 0);
        assert!(!dir.path().join(FILE).exists());
    }
}
