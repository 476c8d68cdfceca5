//! Processes in a sandbox: started through the agent's `POST /processes`,
//! watched and fed over `GET /processes/{pid}/io` (a WebSocket). The control
//! plane's `/api/v1/sandboxes/{id}/processes…` speaks the same messages.
//!
//! The `io` socket:
//! - out (agent → client): binary frames `[stream tag][bytes]` where the tag
//!   is [`TAG_STDOUT`] or [`TAG_STDERR`] (a PTY's output is all stdout); at
//!   the end one text frame, an [`IoEvent::Exit`], then a normal close. A
//!   client that attaches late first gets what is still in the backlog.
//! - in (client → agent): binary frames are stdin bytes; text frames are
//!   [`IoControl`] JSON (`resize`, `signal`, `eof`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const TAG_STDOUT: u8 = 1;
pub const TAG_STDERR: u8 = 2;

/// Output kept per process for clients that attach late or come back.
pub const BACKLOG_BYTES: usize = 1024 * 1024;
/// Processes running at once in one sandbox.
pub const MAX_RUNNING: usize = 32;
/// Finished processes remembered (oldest forgotten first).
pub const MAX_FINISHED: usize = 64;
/// The longest `timeout_s` (a day); without one a process runs until it ends or is killed.
pub const MAX_PROCESS_TIMEOUT_S: u64 = 24 * 3600;
/// Largest text control frame on the io socket.
pub const MAX_CONTROL_BYTES: usize = 4096;
/// The largest terminal side, in cells.
pub const MAX_PTY_SIDE: u16 = 1000;
/// Largest stdin frame on the io socket.
pub const MAX_STDIN_FRAME: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// `POST /processes`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute, or relative to the user's home; the home when omitted.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run on a terminal of this size (stdin, stdout and stderr are the terminal).
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Keep stdin open for the io socket (without a PTY; a PTY always takes input).
    #[serde(default)]
    pub stdin: bool,
    /// Seconds before the process group is killed, at most [`MAX_PROCESS_TIMEOUT_S`].
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

impl StartProcess {
    /// Whether this can be started at all: a program, clean strings, a sane
    /// terminal and timeout.
    pub fn check(&self) -> Result<(), String> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err("argv must name a program".into());
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err("argv must not contain NUL bytes".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(
                    "env names must be non-empty without '=' or NUL, values without NUL".into(),
                );
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.contains('\0') {
                return Err("cwd must be a non-empty path without NUL bytes".into());
            }
        }
        if let Some(p) = self.pty {
            if !(1..=MAX_PTY_SIDE).contains(&p.cols) || !(1..=MAX_PTY_SIDE).contains(&p.rows) {
                return Err(format!("pty cols and rows must be 1–{MAX_PTY_SIDE}"));
            }
        }
        match self.timeout_s {
            Some(0) => Err("timeout_s must be at least 1".into()),
            Some(s) if s > MAX_PROCESS_TIMEOUT_S => {
                Err(format!("timeout_s must be at most {MAX_PROCESS_TIMEOUT_S}"))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Running,
    Exited,
}

/// `GET /processes/{pid}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The process id inside the sandbox.
    pub pid: u32,
    pub argv: Vec<String>,
    pub state: ProcessState,
    /// Set once the process exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The timeout killed it.
    #[serde(default)]
    pub timed_out: bool,
    pub pty: Option<PtySize>,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Output bytes produced so far (also those no longer in the backlog).
    pub output_bytes: u64,
}

/// `GET /processes`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

/// Text frames a client sends on the io socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum IoControl {
    /// The terminal's new size (PTY processes only).
    Resize { cols: u16, rows: u16 },
    /// Send a signal to the process group: `INT`, `TERM`, `KILL`, `HUP`, `QUIT`, `USR1`, `USR2`, `WINCH`.
    Signal { signal: String },
    /// Close stdin.
    Eof,
}

/// Text frames the agent sends on the io socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum IoEvent {
    /// Output was lost between the backlog and this client (it came back too late).
    Skipped { bytes: u64 },
    /// The process ended; the socket closes after this.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

/// The signal number of a name from [`IoControl::Signal`], with or without `SIG`.
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    Some(match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "WINCH" => 28,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_parse_and_refuse() {
        let r: IoControl =
            serde_json::from_str(r#"{"type":"resize","cols":80,"rows":24}"#).expect("resize");
        assert_eq!(r, IoControl::Resize { cols: 80, rows: 24 });
        assert!(serde_json::from_str::<IoControl>(r#"{"type":"resize","cols":80}"#).is_err());
        assert!(serde_json::from_str::<IoControl>(r#"{"type":"explode"}"#).is_err());
        assert_eq!(signal_number("int"), Some(2));
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("SEGV"), None);
    }
}

/// Files: `PUT /files?path=P` (the body is the file) and `GET /files?path=P`
/// (a file's bytes, or a directory as a tar stream). Paths are relative to
/// the user's home or absolute inside it (or inside /tmp).
pub const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;
/// The largest directory download: the tar stream a directory makes (its
/// files, padded to 512-byte blocks, plus a header each). A larger one is
/// refused with 413 before anything is sent; one that grows past it while
/// it streams is cut off with an error.
pub const MAX_TAR_BYTES: u64 = 1024 * 1024 * 1024;

/// The answer to a `PUT /files`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    /// Where the file is, absolute.
    pub path: String,
    pub size: u64,
}
