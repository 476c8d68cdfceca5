//! The login command's terminal: a PTY whose slave side is the command's
//! stdin, stdout, stderr and controlling terminal, and a thread that reads
//! the master side until the command's side closes, then reaps the command.

use super::screen::{Drawn, Screen};
use crate::exec::RunAs;
use crate::privdrop::{drop_to, Session};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// A command running under a PTY.
#[derive(Debug)]
pub(super) struct Pty {
    /// The master side, for typing.
    master: Mutex<std::fs::File>,
    /// The command's process id, which is also its session and group id.
    pub(super) pgid: i32,
    /// What the reader thread saw.
    pub(super) output: Arc<Output>,
}

impl Pty {
    /// Starts `cmd` in a new session on a new `cols`×`rows` PTY, as `run_as`.
    pub(super) fn spawn(
        mut cmd: std::process::Command,
        cols: u16,
        rows: u16,
        run_as: RunAs,
    ) -> std::io::Result<Pty> {
        let (master, slave) = open_pty(cols, rows)?;
        cmd.stdin(std::process::Stdio::from(slave.try_clone()?))
            .stdout(std::process::Stdio::from(slave.try_clone()?))
            .stderr(std::process::Stdio::from(slave));
        drop_to(&mut cmd, &run_as, Session::NewWithTerminal);
        let child = cmd.spawn()?;
        // `cmd` holds the slave's copies until it is dropped: drop it, so the
        // reader sees EIO once the command's side is closed.
        drop(cmd);
        let pgid = child.id() as i32;
        let master = std::fs::File::from(master);
        let reader = master.try_clone()?;
        let output = Arc::new(Output::new(rows, cols));
        spawn_reader(reader, child, output.clone());
        Ok(Pty {
            master: Mutex::new(master),
            pgid,
            output,
        })
    }

    /// Types `bytes` into the command's terminal.
    pub(super) fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut m = self.master.lock().unwrap_or_else(|p| p.into_inner());
        m.write_all(bytes)?;
        m.flush()
    }

    /// Kills the command's whole process group.
    #[allow(unsafe_code)]
    pub(super) fn kill(&self) {
        // SAFETY: kill(2) on a process group id; no memory is involved.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
    }
}

/// Output of a running login, handed from its blocking reader thread to the
/// watcher: the screen the output draws, and how the command ended once it has.
#[derive(Debug)]
pub(super) struct Output {
    inner: Mutex<OutputInner>,
}

#[derive(Debug)]
struct OutputInner {
    screen: Screen,
    /// Bumped by every read that fed the screen.
    fed: u64,
    exited: Option<String>,
}

impl Output {
    fn new(rows: u16, cols: u16) -> Output {
        Output {
            inner: Mutex::new(OutputInner {
                screen: Screen::new(rows, cols),
                fed: 0,
                exited: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutputInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many reads fed the screen so far.
    pub(super) fn fed(&self) -> u64 {
        self.lock().fed
    }

    /// The screen if output came since `seen` (which is moved on), and how
    /// the command ended if it has: both read at one moment, so the screen
    /// returned with the exit holds the command's last words.
    pub(super) fn take(&self, seen: &mut u64) -> (Option<Drawn>, Option<String>) {
        let inner = self.lock();
        let drawn = (inner.fed != *seen).then(|| inner.screen.drawn());
        *seen = inner.fed;
        (drawn, inner.exited.clone())
    }
}

/// Reads the PTY until the command's side closes, then reaps the command.
fn spawn_reader(mut master: std::fs::File, mut child: std::process::Child, shared: Arc<Output>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break, // EIO once every holder of the slave closed it
                Ok(n) => {
                    let mut inner = shared.lock();
                    inner.screen.feed(&buf[..n]);
                    inner.fed += 1;
                }
            }
        }
        let status = match child.wait() {
            Ok(s) => match s.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed".to_owned(),
            },
            Err(_) => "ended".to_owned(),
        };
        shared.lock().exited = Some(status);
    });
}

#[allow(unsafe_code)]
pub(crate) fn open_pty(cols: u16, rows: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the ints we pass; the name
    // buffer is null (allowed) and the termios pointer is null (defaults).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // The master must not leak into the command.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(m.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok((m, s))
}
