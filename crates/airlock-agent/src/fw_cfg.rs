//! QEMU's fw_cfg device read from user space over its x86 I/O ports.
//!
//! The kernel's `qemu_fw_cfg` driver finds the device through ACPI, and the
//! microvm guests run without ACPI (see docs/vm.md), so the agent speaks the
//! device's port protocol itself: write a 16-bit selector to port 0x510, read
//! the item's bytes one at a time from port 0x511. Item 0x19 is the directory
//! of named files.
//!
//! Port I/O on a machine without the device would poke at real hardware, so
//! the agent only tries it when the VMM said so on the kernel command line
//! (`airlock.fw_cfg=ioport`, added by the QEMU driver), and then checks the
//! device's "QEMU" signature before anything else.

use airlock_proto::metadata::FW_CFG_CMDLINE_FLAG;
use std::io::{Error, ErrorKind};

const SIGNATURE: u16 = 0x0000;
const FILE_DIR: u16 = 0x0019;
const DIR_ENTRY_LEN: usize = 64;
const NAME_LEN: usize = 56;

/// One entry of the fw_cfg file directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub size: u32,
    pub select: u16,
    pub name: String,
}

/// Parses the file directory item: a big-endian count, then 64-byte entries
/// (size u32 BE, selector u16 BE, reserved u16, NUL-padded name).
pub fn parse_dir(bytes: &[u8]) -> Result<Vec<DirEntry>, Error> {
    let count = bytes
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| Error::other("fw_cfg directory is shorter than its count"))?;
    let body = &bytes[4..];
    if body.len() < count.saturating_mul(DIR_ENTRY_LEN) {
        return Err(Error::other(format!(
            "fw_cfg directory names {count} entries but holds {} bytes",
            body.len()
        )));
    }
    Ok(body
        .chunks_exact(DIR_ENTRY_LEN)
        .take(count)
        .map(|e| {
            let name = &e[8..8 + NAME_LEN];
            let end = name.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
            DirEntry {
                size: u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
                select: u16::from_be_bytes([e[4], e[5]]),
                name: String::from_utf8_lossy(&name[..end]).into_owned(),
            }
        })
        .collect())
}

/// Whether the kernel command line `cmdline` announces a port fw_cfg.
pub fn announced(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == FW_CFG_CMDLINE_FLAG)
}

/// The bytes of the named fw_cfg file. `NotFound` when this guest was not
/// started with the flag, has no fw_cfg device, or has no file by that name;
/// `FileTooLarge` when the file is over `max` bytes.
pub fn read_file(name: &str, max: u64) -> Result<Vec<u8>, Error> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !announced(&cmdline) {
        return Err(Error::from(ErrorKind::NotFound));
    }
    let mut port = port::Port::open()?;
    if port.read(SIGNATURE, 4) != b"QEMU" {
        return Err(Error::new(
            ErrorKind::NotFound,
            "no fw_cfg device answers at port 0x510",
        ));
    }
    let count = port.read(FILE_DIR, 4);
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count > 4096 {
        return Err(Error::other(format!(
            "fw_cfg directory claims {count} entries"
        )));
    }
    let dir = port.read(FILE_DIR, 4 + count * DIR_ENTRY_LEN);
    let entry = parse_dir(&dir)?
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no fw_cfg file {name}")))?;
    if u64::from(entry.size) > max {
        return Err(Error::from(ErrorKind::FileTooLarge));
    }
    Ok(port.read(entry.select, entry.size as usize))
}

#[cfg(target_arch = "x86_64")]
mod port {
    use std::io::Error;

    const SELECTOR: u16 = 0x510;
    const DATA: u16 = 0x511;

    /// Access to the two fw_cfg ports for this process (needs CAP_SYS_RAWIO).
    pub struct Port(());

    impl Port {
        #[allow(unsafe_code)]
        pub fn open() -> Result<Port, Error> {
            // SAFETY: ioperm only changes this thread's I/O permission bitmap.
            let rc = unsafe { libc::ioperm(u64::from(SELECTOR), 2, 1) };
            if rc != 0 {
                return Err(Error::last_os_error());
            }
            Ok(Port(()))
        }

        /// Selects `key` and reads `len` bytes from its start.
        #[allow(unsafe_code)]
        pub fn read(&mut self, key: u16, len: usize) -> Vec<u8> {
            // SAFETY: the ports were granted to this thread by `open`, and the
            // caller checked (command line, then signature) that they belong
            // to QEMU's fw_cfg device, which has no side effects on reads.
            unsafe {
                core::arch::asm!("out dx, ax", in("dx") SELECTOR, in("ax") key,
                    options(nomem, nostack, preserves_flags));
                (0..len)
                    .map(|_| {
                        let b: u8;
                        core::arch::asm!("in al, dx", out("al") b, in("dx") DATA,
                            options(nomem, nostack, preserves_flags));
                        b
                    })
                    .collect()
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod port {
    use std::io::{Error, ErrorKind};

    pub struct Port(());

    impl Port {
        pub fn open() -> Result<Port, Error> {
            Err(Error::new(
                ErrorKind::NotFound,
                "fw_cfg over I/O ports exists on x86 only",
            ))
        }

        pub fn read(&mut self, _key: u16, _len: usize) -> Vec<u8> {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u32, select: u16, name: &str) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&select.to_be_bytes());
        e.extend_from_slice(&[0, 0]);
        let mut n = [0u8; NAME_LEN];
        n[..name.len()].copy_from_slice(name.as_bytes());
        e.extend_from_slice(&n);
        e
    }

    #[test]
    fn the_directory_is_parsed() {
        let mut dir = 2u32.to_be_bytes().to_vec();
        dir.extend(entry(1234, 0x20, "etc/boot-fail-wait"));
        dir.extend(entry(311, 0x2a, "opt/airlock/metadata"));
        let parsed = parse_dir(&dir).expect("parse");
        assert_eq!(
            parsed[1],
            DirEntry {
                size: 311,
                select: 0x2a,
                name: "opt/airlock/metadata".into()
            }
        );
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn a_short_directory_is_an_error() {
        let mut dir = 3u32.to_be_bytes().to_vec();
        dir.extend(entry(1, 0x20, "a"));
        assert!(parse_dir(&dir).is_err());
        assert!(parse_dir(&[0, 0]).is_err());
    }

    #[test]
    fn only_the_drivers_flag_enables_port_access() {
        assert!(announced("console=ttyS0 airlock.fw_cfg=ioport ip=1"));
        assert!(!announced("console=ttyS0 airlock.fw_cfg=ioportx"));
        assert!(!announced(""));
    }
}
