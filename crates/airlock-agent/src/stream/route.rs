//! `GET /v1/stream`: one viewer's video link, served by a `capture` child that
//! runs as the desktop user for as long as the WebSocket is open.
//!
//! ```text
//!  WebSocket ── text: Control ──▶ parse + check ── line ──▶ capture's stdin
//!  WebSocket ◀── writer ◀── bounded queue ◀── pump ◀── capture's stdout
//!                 (text: StreamInfo, binary: VideoFrame)
//! ```
//!
//! One stream at a time: a new connection ends the current one (its socket
//! closes with 1000 "replaced by a newer stream") and waits until its child is
//! gone. When the viewer cannot keep up the pump drops frames up to the next
//! keyframe, and asks for one, rather than queueing without bound. When the
//! child dies the socket closes with 1011 and the child's last error line.

use super::capture::MAX_FPS;
use super::wire::{self, Message as Piped};
use crate::exec::{GroupKiller, RunAs};
use crate::server::{error, AgentState};
use airlock_proto::stream::{Control, ControlError, DEFAULT_FPS, STREAM_PATH};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{
    close_code, rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket,
    WebSocketUpgrade,
};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

/// Frames waiting for the socket: about 70 ms at 60 fps; beyond that the
/// viewer is behind and frames are dropped.
const FRAME_QUEUE: usize = 4;
/// Control lines waiting for the child.
const CONTROL_QUEUE: usize = 256;
/// Largest message the control plane may send: a full
/// [`Control::Clipboard`] with every byte escaped.
const MAX_CONTROL_BYTES: usize = airlock_proto::stream::MAX_CONTROL_JSON_BYTES;
/// How long a child has to release its keys and quit after its input closes.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// At most one keyframe request per this while frames are being dropped.
const KEYFRAME_RETRY: Duration = Duration::from_millis(500);
/// WebSocket close reasons are at most 123 bytes.
const MAX_REASON: usize = 123;

/// How the capture child is started.
#[derive(Debug, Clone)]
pub struct CaptureCommand {
    /// Program and leading arguments; `--fps N` is appended. In the guest:
    /// the agent's own executable and `capture`.
    pub argv: Vec<String>,
    pub run_as: RunAs,
    /// The whole environment (DISPLAY, HOME, …).
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// The one stream slot of an agent.
#[derive(Debug)]
pub struct Streams {
    cmd: CaptureCommand,
    /// The newest session's id and the sender that tells it to end.
    current: Mutex<Option<(u64, oneshot::Sender<()>)>>,
    /// Held by the session whose child runs.
    slot: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

impl Streams {
    pub fn new(cmd: CaptureCommand) -> Self {
        Streams {
            cmd,
            current: Mutex::new(None),
            slot: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Makes a new session the current one, telling the previous one to end.
    fn claim(&self) -> (u64, oneshot::Receiver<()>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, old)) = cur.replace((id, tx)) {
            let _ = old.send(());
        }
        (id, rx)
    }

    fn release(&self, id: u64) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(&*cur, Some((i, _)) if *i == id) {
            *cur = None;
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    fps: Option<u32>,
}

pub fn routes() -> Router<Arc<AgentState>> {
    Router::new().route(STREAM_PATH, get(handler))
}

async fn handler(
    State(state): State<Arc<AgentState>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(r) => return error(StatusCode::BAD_REQUEST, r.body_text()),
    };
    let fps = q.fps.unwrap_or(DEFAULT_FPS);
    if !(1..=MAX_FPS).contains(&fps) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("fps must be from 1 to {MAX_FPS}"),
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return error(r.status(), r.body_text()),
    };
    let streams = state.streams.clone();
    ws.max_message_size(MAX_CONTROL_BYTES)
        .max_frame_size(MAX_CONTROL_BYTES)
        .on_upgrade(move |socket| session(streams, socket, fps))
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    Replaced,
    ViewerLeft,
    /// The child's output ended (it exited) or broke the pipe's format.
    ChildEnded(Option<wire::WireError>),
}

async fn close_now(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

async fn session(streams: Arc<Streams>, socket: WebSocket, fps: u32) {
    let (id, mut replaced) = streams.claim();
    let slot = tokio::select! {
        g = streams.slot.lock() => g,
        _ = &mut replaced => {
            close_now(socket, close_code::NORMAL, "replaced by a newer stream").await;
            return;
        }
    };
    run(&streams.cmd, socket, fps, &mut replaced).await;
    drop(slot);
    streams.release(id);
}

fn spawn(cmd: &CaptureCommand, fps: u32) -> std::io::Result<Child> {
    let (program, args) = cmd.argv.split_first().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no capture command")
    })?;
    let mut c = Command::new(program);
    c.args(args)
        .args(["--fps", &fps.to_string()])
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        // Its log lines come back here, and one may become a close reason.
        .env("NO_COLOR", "1")
        .current_dir(if cmd.cwd.is_dir() {
            cmd.cwd.clone()
        } else {
            PathBuf::from("/")
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::privdrop::drop_to(
        c.as_std_mut(),
        &cmd.run_as,
        crate::privdrop::Session::Inherit,
    );
    c.spawn()
}

#[derive(Debug, Default)]
struct Counts {
    frames: AtomicU64,
    dropped: AtomicU64,
    bytes: AtomicU64,
}

/// Moves the child's messages into the queue, dropping frames up to the next
/// keyframe when the queue is full.
async fn pump<R: AsyncRead + Unpin>(
    stdout: R,
    out: mpsc::Sender<Message>,
    controls: mpsc::Sender<String>,
    counts: Arc<Counts>,
) -> Option<wire::WireError> {
    let mut r = BufReader::with_capacity(256 * 1024, stdout);
    let mut dropping = false;
    let mut asked: Option<Instant> = None;
    loop {
        let msg = match wire::read(&mut r).await {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(e) => return Some(e),
        };
        match msg {
            Piped::Info(info) => {
                tracing::info!(
                    width = info.width,
                    height = info.height,
                    fps = info.fps,
                    "stream size"
                );
                let text = serde_json::to_string(&info).unwrap_or_default();
                // Never dropped: the viewer cannot decode without it.
                if out.send(Message::Text(text.into())).await.is_err() {
                    return None;
                }
            }
            Piped::Frame { keyframe, bytes } => {
                if dropping && !keyframe {
                    counts.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let len = bytes.len() as u64;
                match out.try_send(Message::Binary(bytes.into())) {
                    Ok(()) => {
                        counts.frames.fetch_add(1, Ordering::Relaxed);
                        counts.bytes.fetch_add(len, Ordering::Relaxed);
                        if dropping {
                            dropping = false;
                            tracing::debug!("the viewer caught up");
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        counts.dropped.fetch_add(1, Ordering::Relaxed);
                        if !dropping {
                            tracing::debug!("the viewer is behind: dropping frames");
                        }
                        dropping = true;
                        // The frames up to the next keyframe are useless to
                        // the viewer: ask for that keyframe now.
                        if asked.is_none_or(|t| t.elapsed() >= KEYFRAME_RETRY) {
                            asked = Some(Instant::now());
                            let _ = controls.try_send(Control::Keyframe.to_json());
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return None,
                }
            }
            // Never dropped: the viewer would keep a stale pointer, or miss
            // what was copied.
            Piped::Cursor(bytes) | Piped::Clipboard(bytes) => {
                if out.send(Message::Binary(bytes.into())).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// Sends queued messages until told to close (or the socket fails); the
/// close goes out after everything queued before it (with no frame of its
/// own it still completes a close handshake the viewer started).
async fn writer(
    mut tx: futures::stream::SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Message>,
    mut close: oneshot::Receiver<Option<CloseFrame>>,
) {
    let mut source_open = true;
    loop {
        tokio::select! {
            biased;
            m = out.recv(), if source_open => match m {
                Some(m) => {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                None => source_open = false,
            },
            frame = &mut close => {
                if let Ok(Some(frame)) = frame {
                    let _ = tx.send(Message::Close(Some(frame))).await;
                }
                let _ = tx.close().await;
                return;
            }
        }
    }
}

async fn feed(mut stdin: ChildStdin, mut lines: mpsc::Receiver<String>) {
    while let Some(mut line) = lines.recv().await {
        line.push('\n');
        if stdin.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The text of a log line without colours, and without the level and target
/// a tracing line starts with.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() {
            out.push(c);
        }
    }
    let t = out.trim();
    for level in ["ERROR ", "WARN ", "INFO ", "DEBUG ", "TRACE "] {
        if let Some(rest) = t.strip_prefix(level) {
            if let Some((_, msg)) = rest.split_once(": ") {
                return msg.trim().to_owned();
            }
        }
    }
    t.to_owned()
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn log_stderr(stderr: ChildStderr, last: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = clean(cut(&line, 2000));
        if line.is_empty() {
            continue;
        }
        tracing::info!(line = %line, "capture");
        *last.lock().unwrap_or_else(|p| p.into_inner()) = line;
    }
}

/// Checks one control message from the viewer and passes it to the child.
fn forward(controls: &mpsc::Sender<String>, text: &str) {
    match Control::parse(text) {
        Ok(c) => {
            if controls.try_send(c.to_json()).is_err() {
                tracing::warn!("the capture program is not reading its input: a control dropped");
            }
        }
        // Only the kind of error: the message may hold typed text.
        Err(e) => {
            let why = match e {
                ControlError::Json(_) => "not a control message".to_owned(),
                other => other.to_string(),
            };
            tracing::warn!(bytes = text.len(), error = %why, "ignoring a control message");
        }
    }
}

async fn run(
    cmd: &CaptureCommand,
    socket: WebSocket,
    fps: u32,
    replaced: &mut oneshot::Receiver<()>,
) {
    let started = Instant::now();
    let mut child = match spawn(cmd, fps) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the capture program did not start");
            let reason = format!("capture could not start: {e}");
            close_now(socket, close_code::ERROR, cut(&reason, MAX_REASON)).await;
            return;
        }
    };
    let pid = child.id();
    let mut killer = GroupKiller {
        pgid: pid.map(|p| p as i32),
    };
    tracing::info!(fps, pid, "stream started");
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        close_now(
            socket,
            close_code::ERROR,
            "capture could not start: no pipes",
        )
        .await;
        return;
    };
    let last_line = Arc::new(Mutex::new(String::new()));
    let mut stderr_task = tokio::spawn(log_stderr(stderr, last_line.clone()));
    let (ctl_tx, ctl_rx) = mpsc::channel::<String>(CONTROL_QUEUE);
    let stdin_task = tokio::spawn(feed(stdin, ctl_rx));
    let counts = Arc::new(Counts::default());
    let (out_tx, out_rx) = mpsc::channel(FRAME_QUEUE);
    let mut pump_task = tokio::spawn(pump(stdout, out_tx, ctl_tx.clone(), counts.clone()));
    let (ws_tx, mut ws_rx) = socket.split();
    let (close_tx, close_rx) = oneshot::channel();
    let mut writer_task = tokio::spawn(writer(ws_tx, out_rx, close_rx));

    let end = loop {
        tokio::select! {
            _ = &mut *replaced => break End::Replaced,
            r = &mut pump_task => break End::ChildEnded(r.ok().flatten()),
            _ = &mut writer_task => break End::ViewerLeft,
            m = ws_rx.next() => match m {
                Some(Ok(Message::Text(t))) => forward(&ctl_tx, t.as_str()),
                Some(Ok(Message::Binary(_))) => {
                    tracing::debug!("ignoring a binary message from the viewer");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break End::ViewerLeft,
            },
        }
    };

    // Closing the child's input tells it to release what it holds and quit.
    drop(ctl_tx);
    stdin_task.abort();
    let status = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(s)) => {
            killer.pgid = None;
            Some(s)
        }
        _ => {
            killer.kill();
            child.wait().await.ok()
        }
    };
    pump_task.abort();
    let frame = match &end {
        End::Replaced => Some(CloseFrame {
            code: close_code::NORMAL,
            reason: "replaced by a newer stream".into(),
        }),
        End::ViewerLeft => None,
        End::ChildEnded(broken) => {
            // Its last words may still be in the pipe.
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut stderr_task).await;
            let last = last_line.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let why = match (broken, last.is_empty(), status) {
                (Some(e), _, _) => crate::chain(e),
                (None, false, _) => last,
                (None, true, Some(s)) => format!("exited with {s}"),
                (None, true, None) => "exited".to_owned(),
            };
            let reason = format!("capture stopped: {why}");
            Some(CloseFrame {
                code: close_code::ERROR,
                reason: cut(&reason, MAX_REASON).into(),
            })
        }
    };
    let _ = close_tx.send(frame);
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer_task).await;
    writer_task.abort();
    stderr_task.abort();
    tracing::info!(
        end = ?end,
        status = ?status,
        seconds = started.elapsed().as_secs(),
        frames = counts.frames.load(Ordering::Relaxed),
        dropped = counts.dropped.load(Ordering::Relaxed),
        bytes = counts.bytes.load(Ordering::Relaxed),
        "stream ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_become_reasons() {
        assert_eq!(
            clean("\u{1b}[2m\u{1b}[31mERROR\u{1b}[0m airlock_agent: connecting to the X display :9: refused"),
            "connecting to the X display :9: refused"
        );
        assert_eq!(clean("  plain words \r"), "plain words");
        assert_eq!(clean("INFO without a target"), "INFO without a target");
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }

    fn frame(keyframe: bool, n: u8) -> Vec<u8> {
        airlock_proto::stream::VideoFrame {
            pts_us: u64::from(n),
            keyframe,
            data: vec![0, 0, 1, if keyframe { 0x65 } else { 0x41 }, n],
        }
        .encode()
    }

    fn piped(frames: &[(bool, u8)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, n) in frames {
            wire::write(&mut out, &frame(*k, *n)).expect("write");
        }
        out
    }

    /// The pts of each frame waiting in the queue.
    fn drain(rx: &mut mpsc::Receiver<Message>) -> Vec<u8> {
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Message::Binary(b) = m {
                got.push(b[8]);
            }
        }
        got
    }

    #[tokio::test]
    async fn a_slow_viewer_loses_whole_groups_of_frames_not_single_ones() {
        let (mut w, r) = tokio::io::duplex(1 << 16);
        let (out_tx, mut out_rx) = mpsc::channel(FRAME_QUEUE);
        let (ctl_tx, mut ctl_rx) = mpsc::channel(8);
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(pump(r, out_tx, ctl_tx, counts.clone()));
        let settle = || tokio::time::sleep(Duration::from_millis(50));

        // The viewer reads nothing: the queue fills, the rest is dropped and
        // a keyframe is asked for, once.
        let mut info = Vec::new();
        wire::write_info(
            &mut info,
            &airlock_proto::stream::StreamInfo {
                codec: "h264".into(),
                width: 2,
                height: 2,
                fps: 30,
            },
        )
        .expect("write");
        w.write_all(&info).await.expect("write");
        w.write_all(&piped(&[
            (true, 1),
            (false, 2),
            (false, 3),
            (false, 4),
            (false, 5),
        ]))
        .await
        .expect("write");
        settle().await;
        assert!(matches!(out_rx.try_recv(), Ok(Message::Text(_))));
        assert_eq!(drain(&mut out_rx), vec![1, 2, 3]);
        assert_eq!(ctl_rx.try_recv().ok(), Some(Control::Keyframe.to_json()));
        assert!(ctl_rx.try_recv().is_err());

        // Caught up, it still gets no frame that refers to a dropped one:
        // nothing until the next keyframe.
        w.write_all(&piped(&[(false, 6), (false, 7), (true, 8), (false, 9)]))
            .await
            .expect("write");
        settle().await;
        assert_eq!(drain(&mut out_rx), vec![8, 9]);
        assert_eq!(counts.dropped.load(Ordering::Relaxed), 4);
        assert_eq!(counts.frames.load(Ordering::Relaxed), 5);

        drop(w);
        assert!(task.await.expect("pump").is_none());
    }

    #[test]
    fn a_new_stream_ends_the_current_one() {
        let s = Streams::new(CaptureCommand {
            argv: vec![],
            run_as: RunAs::Current,
            env: vec![],
            cwd: PathBuf::from("/"),
        });
        let (a, mut ra) = s.claim();
        assert!(ra.try_recv().is_err());
        let (b, mut rb) = s.claim();
        assert_ne!(a, b);
        assert_eq!(ra.try_recv(), Ok(()));
        // The old session leaving does not clear the new one.
        s.release(a);
        assert!(rb.try_recv().is_err());
        s.release(b);
        assert!(rb
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
    }
}
