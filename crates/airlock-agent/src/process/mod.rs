//! Processes that outlive a request: started by `POST /processes`, run as the
//! sandbox user in a session of their own (on a PTY when asked), and watched
//! over a WebSocket (`routes`). Their output goes into a bounded backlog that
//! every attached client reads from at its own pace, so a client that drops
//! and comes back catches up, and a slow one never holds the process up.
//!
//! ```text
//!  child ── stdout/stderr or PTY master ──▶ reader ──▶ Output (backlog, ≤ 1 MiB)
//!                                                         │ watch: "something new"
//!  client ◀── io socket ◀── read_since(offset) ◀──────────┘
//!  client ── stdin, resize, signal ──▶ Input / ioctl / kill(-pgid)
//! ```

pub mod files;
pub mod routes;

use crate::exec::ExecConfig;
use crate::privdrop::{drop_to, Session};
use airlock_proto::process::{
    IoEvent, ProcessInfo, ProcessState, PtySize, StartProcess, BACKLOG_BYTES, MAX_FINISHED,
    MAX_PTY_SIDE, MAX_RUNNING,
};
use axum::body::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// How long a new process's output waits, at a full backlog, for its first
/// client (who typically attaches right after starting it).
/// The most one read of a pipe or the terminal takes in.
const READ_CHUNK: usize = 32 * 1024;
/// Readers wait while a client is this far behind: one more read must not
/// push bytes it has not seen out of the backlog.
const ROOM: u64 = (BACKLOG_BYTES - READ_CHUNK) as u64;
const FIRST_CLIENT_GRACE: Duration = Duration::from_secs(5);
/// How long output may keep coming after the process itself exited (a
/// background child holding its pipes or terminal) before it counts as ended.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooMany(String),
    #[error("no process {0} here")]
    NotFound(u32),
    #[error("{0}")]
    Conflict(String),
    #[error("starting {program:?}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The table of one sandbox's processes.
#[derive(Debug)]
pub struct Processes {
    cfg: ExecConfig,
    table: Mutex<BTreeMap<u32, Arc<Proc>>>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub at_ms: u64,
}

impl Ended {
    pub fn event(&self) -> IoEvent {
        IoEvent::Exit {
            exit_code: self.exit_code,
            signal: self.signal,
            timed_out: self.timed_out,
        }
    }
}

#[derive(Debug)]
struct Chunk {
    /// Offset of the chunk's first byte in everything the process wrote.
    offset: u64,
    tag: u8,
    data: Bytes,
}

#[derive(Debug, Default)]
struct Output {
    chunks: VecDeque<Chunk>,
    /// Bytes held in `chunks`.
    kept: usize,
    /// Bytes written so far (the offset of the next one).
    total: u64,
    ended: Option<Ended>,
    /// Attached clients: id → the offset each has sent on. The readers wait
    /// while the slowest is a whole backlog behind (backpressure: a client
    /// that reads slowly slows the process, as a pipe would, rather than
    /// losing output); a process nobody watches never waits.
    clients: BTreeMap<u64, u64>,
    next_client: u64,
    /// A client attached once: until then (for [`FIRST_CLIENT_GRACE`]) the
    /// process waits for one rather than losing its first output.
    ever_attached: bool,
}

/// What a client has not seen yet, from its offset.
#[derive(Debug, Default)]
pub struct Since {
    pub chunks: Vec<(u8, Bytes)>,
    /// Bytes that left the backlog before the client read them.
    pub skipped: u64,
    /// The offset to ask from next time.
    pub next: u64,
    /// Set once the process ended and every byte of its output is in `chunks`
    /// or was read before.
    pub ended: Option<Ended>,
}

#[derive(Debug)]
enum Input {
    None,
    Pipe(tokio::process::ChildStdin),
    Pty(tokio::fs::File),
}

/// One process.
#[derive(Debug)]
pub struct Proc {
    pub pid: u32,
    argv: Vec<String>,
    /// Run by `/exec` for one request: not listed, not attachable.
    private: bool,
    started_at_ms: u64,
    started: std::time::Instant,
    pty: Mutex<Option<PtySize>>,
    /// The PTY's master side, for resizing.
    master: Option<std::fs::File>,
    output: Mutex<Output>,
    /// Bumped on every write into `output` and when the process ends.
    changed: watch::Sender<u64>,
    /// Notified when a client moved on or left (readers may have room again).
    drained: tokio::sync::Notify,
    input: tokio::sync::Mutex<Input>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Processes {
    pub fn new(cfg: ExecConfig) -> Processes {
        Processes {
            cfg,
            table: Mutex::default(),
        }
    }

    /// A listed process (one run by `/exec` belongs to its request alone).
    pub fn get(&self, pid: u32) -> Result<Arc<Proc>, ProcessError> {
        lock(&self.table)
            .get(&pid)
            .filter(|p| !p.private)
            .cloned()
            .ok_or(ProcessError::NotFound(pid))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        lock(&self.table)
            .values()
            .filter(|p| !p.private)
            .map(|p| p.info())
            .collect()
    }

    fn running(&self) -> usize {
        lock(&self.table)
            .values()
            .filter(|p| p.ended().is_none())
            .count()
    }

    /// Forgets private processes that ended, and the oldest finished
    /// processes beyond [`MAX_FINISHED`].
    fn prune(&self) {
        let mut table = lock(&self.table);
        table.retain(|_, p| !(p.private && p.ended().is_some()));
        let mut finished: Vec<(u64, u32)> = table
            .values()
            .filter_map(|p| p.ended().map(|e| (e.at_ms, p.pid)))
            .collect();
        if finished.len() <= MAX_FINISHED {
            return;
        }
        finished.sort_unstable();
        let excess = finished.len() - MAX_FINISHED;
        for (_, pid) in finished.into_iter().take(excess) {
            table.remove(&pid);
        }
    }

    fn cwd(&self, asked: Option<&str>) -> PathBuf {
        match asked {
            Some(p) => self.cfg.home.join(p), // an absolute `p` replaces the home
            None if self.cfg.home.is_dir() => self.cfg.home.clone(),
            None => PathBuf::from("/"),
        }
    }

    /// Starts `req` as the sandbox user and keeps it in the table.
    pub fn start(self: &Arc<Self>, req: StartProcess) -> Result<ProcessInfo, ProcessError> {
        self.spawn(req, false).map(|p| p.info())
    }

    /// Starts `req`; a `private` process is left out of [`list`](Self::list)
    /// and [`get`](Self::get) (its caller holds it) and forgotten once ended.
    pub fn spawn(
        self: &Arc<Self>,
        req: StartProcess,
        private: bool,
    ) -> Result<Arc<Proc>, ProcessError> {
        req.check().map_err(ProcessError::BadRequest)?;
        if self.running() >= MAX_RUNNING {
            return Err(ProcessError::TooMany(format!(
                "{MAX_RUNNING} processes are running in this sandbox already; \
                 wait for one or kill one"
            )));
        }
        let program = req.argv[0].clone();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&req.argv[1..])
            .env_clear()
            .envs(self.cfg.base_env.iter().map(|(k, v)| (k, v)));
        if req.pty.is_some() && !req.env.contains_key("TERM") {
            cmd.env("TERM", "xterm-256color");
        }
        cmd.envs(&req.env)
            .current_dir(self.cwd(req.cwd.as_deref()))
            .kill_on_drop(false);
        let spawn_err = |source| ProcessError::Spawn {
            program: program.clone(),
            source,
        };
        let (proc, mut child, readers) = match req.pty {
            Some(size) => {
                let (master, slave) =
                    crate::login::pty::open_pty(size.cols, size.rows).map_err(spawn_err)?;
                let clone = |fd: &OwnedFd| fd.try_clone().map_err(spawn_err);
                cmd.stdin(Stdio::from(clone(&slave)?))
                    .stdout(Stdio::from(clone(&slave)?))
                    .stderr(Stdio::from(slave));
                drop_to(cmd.as_std_mut(), &self.cfg.run_as, Session::NewWithTerminal);
                let child = cmd.spawn().map_err(spawn_err)?;
                // `cmd` holds copies of the slave: without dropping it the
                // reader would never see the terminal close.
                drop(cmd);
                let master = std::fs::File::from(master);
                let io = |f: &std::fs::File| f.try_clone().map_err(spawn_err);
                let (reader, writer, resizer) = (io(&master)?, io(&master)?, master);
                let proc = Arc::new(Proc::new(
                    &child,
                    req.argv,
                    private,
                    Some(size),
                    Some(resizer),
                    Input::Pty(tokio::fs::File::from_std(writer)),
                ));
                let done = read_pty(reader, proc.clone());
                (proc, child, vec![done])
            }
            None => {
                cmd.stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
                drop_to(cmd.as_std_mut(), &self.cfg.run_as, Session::New);
                let mut child = cmd.spawn().map_err(spawn_err)?;
                let input = child.stdin.take().map_or(Input::None, Input::Pipe);
                let proc = Arc::new(Proc::new(&child, req.argv, private, None, None, input));
                let mut readers = Vec::new();
                if let Some(out) = child.stdout.take() {
                    readers.push(read_pipe(out, airlock_proto::process::TAG_STDOUT, &proc));
                }
                if let Some(err) = child.stderr.take() {
                    readers.push(read_pipe(err, airlock_proto::process::TAG_STDERR, &proc));
                }
                (proc, child, readers)
            }
        };
        lock(&self.table).insert(proc.pid, proc.clone());
        let handle = proc.clone();
        let timeout = req.timeout_s.map(Duration::from_secs);
        let table = self.clone();
        tokio::spawn(async move {
            let mut timed_out = false;
            let status = match timeout {
                Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        timed_out = true;
                        proc.signal(libc::SIGKILL);
                        child.wait().await
                    }
                },
                None => child.wait().await,
            };
            let all_read = futures::future::join_all(readers);
            let _ = tokio::time::timeout(OUTPUT_GRACE, all_read).await;
            use std::os::unix::process::ExitStatusExt;
            let (exit_code, signal) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            proc.finish(Ended {
                exit_code,
                signal,
                timed_out,
                at_ms: now_ms(),
            });
            tracing::info!(
                pid = proc.pid,
                ?exit_code,
                ?signal,
                timed_out,
                "process ended"
            );
            table.prune();
        });
        Ok(handle)
    }
}

/// Reads one pipe into the backlog until it closes.
fn read_pipe<R: AsyncRead + Unpin + Send + 'static>(
    mut pipe: R,
    tag: u8,
    proc: &Arc<Proc>,
) -> tokio::task::JoinHandle<()> {
    let proc = proc.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            while !proc.has_room() {
                // Woken by a client's progress; the sleep is a safety net.
                let drained = proc.drained.notified();
                let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
            }
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => proc.push(tag, Bytes::copy_from_slice(&buf[..n])),
            }
        }
    })
}

/// Reads the PTY's master side on a thread of its own (reads block) until
/// every holder of the slave side closed it.
fn read_pty(mut master: std::fs::File, proc: Arc<Proc>) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            while !proc.has_room() {
                std::thread::sleep(Duration::from_millis(5));
            }
            match master.read(&mut buf) {
                Ok(0) | Err(_) => return, // EIO once the terminal closed
                Ok(n) => proc.push(
                    airlock_proto::process::TAG_STDOUT,
                    Bytes::copy_from_slice(&buf[..n]),
                ),
            }
        }
    })
}

impl Proc {
    fn new(
        child: &tokio::process::Child,
        argv: Vec<String>,
        private: bool,
        pty: Option<PtySize>,
        master: Option<std::fs::File>,
        input: Input,
    ) -> Proc {
        Proc {
            pid: child.id().unwrap_or(0),
            argv,
            private,
            started_at_ms: now_ms(),
            started: std::time::Instant::now(),
            pty: Mutex::new(pty),
            master,
            output: Mutex::default(),
            changed: watch::Sender::new(0),
            drained: tokio::sync::Notify::new(),
            input: tokio::sync::Mutex::new(input),
        }
    }

    pub fn ended(&self) -> Option<Ended> {
        lock(&self.output).ended
    }

    pub fn info(&self) -> ProcessInfo {
        let out = lock(&self.output);
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            state: if out.ended.is_some() {
                ProcessState::Exited
            } else {
                ProcessState::Running
            },
            exit_code: out.ended.and_then(|e| e.exit_code),
            signal: out.ended.and_then(|e| e.signal),
            timed_out: out.ended.is_some_and(|e| e.timed_out),
            pty: *lock(&self.pty),
            started_at_ms: self.started_at_ms,
            ended_at_ms: out.ended.map(|e| e.at_ms),
            output_bytes: out.total,
        }
    }

    /// Whether the readers may read more: no attached client is a whole
    /// backlog behind.
    fn has_room(&self) -> bool {
        let out = lock(&self.output);
        match out.clients.values().min() {
            Some(slowest) => out.total.saturating_sub(*slowest) <= ROOM,
            None if !out.ever_attached && self.started.elapsed() < FIRST_CLIENT_GRACE => {
                out.total <= ROOM
            }
            None => true,
        }
    }

    /// A client attaches, reading from `offset` (or the oldest byte held).
    pub fn join(&self, offset: u64) -> u64 {
        let mut out = lock(&self.output);
        let id = out.next_client;
        out.next_client += 1;
        let oldest = out.total - out.kept as u64;
        let from = offset.clamp(oldest, out.total);
        out.ever_attached = true;
        out.clients.insert(id, from);
        id
    }

    /// Client `id` has sent everything before `offset`.
    pub fn progress(&self, id: u64, offset: u64) {
        if let Some(at) = lock(&self.output).clients.get_mut(&id) {
            *at = offset;
        }
        self.drained.notify_waiters();
    }

    /// Client `id` left.
    pub fn leave(&self, id: u64) {
        lock(&self.output).clients.remove(&id);
        self.drained.notify_waiters();
    }

    /// Appends output, dropping the oldest beyond [`BACKLOG_BYTES`].
    fn push(&self, tag: u8, data: Bytes) {
        {
            let mut out = lock(&self.output);
            let offset = out.total;
            out.total += data.len() as u64;
            out.kept += data.len();
            out.chunks.push_back(Chunk { offset, tag, data });
            while out.kept > BACKLOG_BYTES {
                match out.chunks.pop_front() {
                    Some(c) => out.kept -= c.data.len(),
                    None => break,
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn finish(&self, ended: Ended) {
        lock(&self.output).ended = Some(ended);
        self.changed.send_modify(|n| *n += 1);
    }

    /// A receiver that wakes on every change after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Everything from byte `offset` on that is still held.
    pub fn read_since(&self, offset: u64) -> Since {
        let out = lock(&self.output);
        let mut since = Since::default();
        let mut at = offset.min(out.total);
        for c in &out.chunks {
            let end = c.offset + c.data.len() as u64;
            if end <= at {
                continue;
            }
            if c.offset > at {
                since.skipped += c.offset - at;
                at = c.offset;
            }
            let from = (at - c.offset) as usize;
            since.chunks.push((c.tag, c.data.slice(from..)));
            at = end;
        }
        if at < out.total {
            // Nothing held covers the rest (the backlog is empty).
            since.skipped += out.total - at;
            at = out.total;
        }
        since.next = at;
        since.ended = out.ended;
        since
    }

    /// Signals the whole process group, while the process runs.
    #[allow(unsafe_code)]
    pub fn signal(&self, signal: i32) -> bool {
        if self.ended().is_some() || self.pid == 0 {
            return false;
        }
        // SAFETY: kill(2) on the process's group (it leads a session of its
        // own, so its pid is the group id); no memory is involved.
        unsafe { libc::kill(-(self.pid as i32), signal) == 0 }
    }

    /// Writes to the process's stdin (or its terminal).
    pub async fn write_stdin(&self, bytes: &[u8]) -> Result<(), ProcessError> {
        let mut input = self.input.lock().await;
        let io = |source| ProcessError::Io {
            what: "writing to the process's input",
            source,
        };
        match &mut *input {
            Input::None => Err(ProcessError::Conflict(
                "this process takes no input (start it with stdin: true or a pty)".into(),
            )),
            Input::Pipe(p) => {
                p.write_all(bytes).await.map_err(io)?;
                p.flush().await.map_err(io)
            }
            Input::Pty(f) => {
                f.write_all(bytes).await.map_err(io)?;
                f.flush().await.map_err(io)
            }
        }
    }

    /// Closes stdin (a PTY gets end-of-file, Ctrl-D, instead).
    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        let is_pty = matches!(*self.input.lock().await, Input::Pty(_));
        if is_pty {
            return self.write_stdin(b"\x04").await;
        }
        *self.input.lock().await = Input::None;
        Ok(())
    }

    /// Sets the terminal's size; the foreground program gets SIGWINCH.
    #[allow(unsafe_code)]
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ProcessError> {
        let Some(master) = &self.master else {
            return Err(ProcessError::Conflict(
                "this process has no terminal to resize".into(),
            ));
        };
        if !(1..=MAX_PTY_SIDE).contains(&cols) || !(1..=MAX_PTY_SIDE).contains(&rows) {
            return Err(ProcessError::BadRequest(format!(
                "cols and rows must be 1–{MAX_PTY_SIDE}"
            )));
        }
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives
        // for the call; the descriptor is the PTY master we own.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(ProcessError::Io {
                what: "resizing the terminal",
                source: std::io::Error::last_os_error(),
            });
        }
        *lock(&self.pty) = Some(PtySize { cols, rows });
        Ok(())
    }

    /// Waits until the process ended, at most `patience`.
    pub async fn wait_ended(&self, patience: Duration) -> Option<Ended> {
        let mut rx = self.subscribe();
        let until = tokio::time::Instant::now() + patience;
        loop {
            if let Some(e) = self.ended() {
                return Some(e);
            }
            if tokio::time::timeout_at(until, rx.changed()).await.is_err() {
                return self.ended();
            }
        }
    }
}

#[cfg(test)]
mod tests;
