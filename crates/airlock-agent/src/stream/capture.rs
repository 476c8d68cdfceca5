//! `airlock-agent capture`: the program the agent runs, as the desktop user,
//! for as long as one viewer watches.
//!
//! The main thread grabs the screen when it changes ([`super::grab`], at most
//! `--fps` times a second), encodes ([`super::encoder`]) and writes a
//! [`StreamInfo`] and then the frames to standard output ([`super::wire`]); it
//! rebuilds the pipeline when the display's size changes, so every size starts
//! with its own description and a keyframe. A thread reads [`Control`] lines
//! from standard input: keyframe requests go to the encoder, the rest to the
//! injector ([`super::input`]) on a thread of its own, so slow input never
//! holds frames back. Standard input closing ends the program, with every key
//! and button it pressed released.

use super::encoder::{self, Encoder, EncoderError, Settings};
use super::grab::{GrabError, Grabber};
use super::input::{Injector, SPARE_HOLD};
use super::wire;
use airlock_proto::stream::{
    encode_clipboard, Control, CursorImage, StreamInfo, VideoFrame, DEFAULT_FPS,
};
use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use x11rb::connection::Connection;
use x11rb::protocol::randr::{self, ConnectionExt as _};
use x11rb::protocol::xproto::ConnectionExt as _;

/// x264's target rate: a desktop of text and windows stays sharp at
/// 1280×800 well below it; a video playing in Chromium takes it all.
pub const DEFAULT_BITRATE_KBIT: u32 = 4000;
pub const MAX_FPS: u32 = 60;
/// How often the display's size is compared with the pipeline's.
const SIZE_POLL: Duration = Duration::from_millis(250);
/// Longest wait for X events before the loop looks at its signals again.
const PULL_WAIT: Duration = Duration::from_millis(20);
/// A frame this often even when the screen does not change.
const REFRESH: Duration = Duration::from_secs(1);
/// Frames sent at the full rate after the last change ([`Pacer`]).
const TRAIL: u32 = 6;
/// Longest wait for x264 to return the frame just pushed.
const ENCODE_WAIT: Duration = Duration::from_millis(500);
/// Grabs in a row that may fail (a display shrinking under the grab) before
/// the capture gives up.
const MAX_FAILED_GRABS: u32 = 20;

pub const USAGE: &str = "usage: airlock-agent capture [--fps N] [--check]\n\n\
  Captures $DISPLAY (default :0) as H.264 onto standard output (length-prefixed\n\
  stream descriptions and frames) and injects the control messages read from\n\
  standard input, one JSON object per line. --check only makes the GStreamer\n\
  elements and reports whether they are all there.\n";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub display: String,
    pub fps: u32,
    pub bitrate_kbit: u32,
    pub check: bool,
}

impl Options {
    /// `args` follow `capture`; `display` is `$DISPLAY`.
    pub fn parse(args: &[&str], display: Option<String>) -> Result<Options, String> {
        let mut o = Options {
            display: display
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| ":0".into()),
            fps: DEFAULT_FPS,
            bitrate_kbit: DEFAULT_BITRATE_KBIT,
            check: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "--check" => o.check = true,
                "--fps" => {
                    o.fps = it
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|f| (1..=MAX_FPS).contains(f))
                        .ok_or(format!("--fps takes a number from 1 to {MAX_FPS}"))?;
                }
                other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
            }
        }
        Ok(o)
    }
}

/// What the capture loop produces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Info(StreamInfo),
    Frame(VideoFrame),
    Cursor(CursorImage),
    /// New text on the guest's clipboard.
    Clipboard(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("connecting to the X display {display}")]
    Display {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("the X connection failed")]
    X(#[from] x11rb::errors::ConnectionError),
    #[error("asking the X server for the display's size")]
    Size(#[from] x11rb::errors::ReplyError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error(transparent)]
    Grab(#[from] GrabError),
    #[error("writing to the agent")]
    Write(#[source] std::io::Error),
}

/// Set by the input side, read by the capture loop.
#[derive(Debug, Default)]
pub struct Signals {
    pub keyframe: AtomicBool,
    /// The target bitrate the control plane last asked for (kbit/s); 0
    /// until it asks, and the encoder keeps `--bitrate` (`Control::Bitrate`).
    pub bitrate_kbit: std::sync::atomic::AtomicU32,
    pub stop: AtomicBool,
    /// New text on the guest's clipboard, to go out with the next frame.
    pub clipboard: std::sync::Mutex<Option<String>>,
}

/// Captures until `signals.stop` is set or `emit` fails.
pub fn capture(
    opts: &Options,
    signals: &Signals,
    emit: &mut dyn FnMut(Output) -> std::io::Result<()>,
) -> Result<(), CaptureError> {
    let (conn, screen) =
        x11rb::connect(Some(&opts.display)).map_err(|source| CaptureError::Display {
            display: opts.display.clone(),
            source,
        })?;
    let root = conn.setup().roots[screen].root;
    // RandR reports a resize at once; polling the size finds it without RandR too.
    let randr = conn
        .randr_query_version(1, 2)
        .ok()
        .and_then(|c| c.reply().ok())
        .is_some();
    if randr {
        conn.randr_select_input(root, randr::NotifyMask::SCREEN_CHANGE)?;
        conn.flush()?;
    }
    let cursors = super::cursor::watch(&conn, root);
    conn.flush()?;
    let size = || -> Result<(u32, u32), CaptureError> {
        let g = conn.get_geometry(root)?.reply()?;
        Ok(Settings::even(g.width.into(), g.height.into()))
    };
    let interval = Duration::from_secs(1) / opts.fps.clamp(1, MAX_FPS);
    loop {
        let (width, height) = size()?;
        // A new pipeline (after a resize) keeps the last target asked for.
        let asked = signals.bitrate_kbit.load(Ordering::Relaxed);
        let mut bitrate = if asked == 0 { opts.bitrate_kbit } else { asked };
        let mut enc = Encoder::start(&Settings {
            width,
            height,
            fps: opts.fps,
            bitrate_kbit: bitrate,
        })?;
        // Screens are far below 65536 pixels a side; X sizes are 16-bit.
        let mut grabber = Grabber::new(&conn, screen, width as u16, height as u16)?;
        tracing::info!(width, height, fps = opts.fps, "capturing");
        emit(Output::Info(StreamInfo {
            codec: "h264".into(),
            width,
            height,
            fps: opts.fps,
        }))
        .map_err(CaptureError::Write)?;
        if let Some(c) = cursors.then(|| super::cursor::current(&conn)).flatten() {
            emit(Output::Cursor(c)).map_err(CaptureError::Write)?;
        }
        // A new pipeline starts with a keyframe anyway.
        signals.keyframe.store(false, Ordering::Relaxed);
        let mut pacer = Pacer::new(interval);
        let mut measured = Instant::now();
        let mut failed_grabs = 0;
        let mut look_now = false;
        loop {
            if signals.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if signals.keyframe.swap(false, Ordering::Relaxed) {
                enc.force_keyframe();
                pacer.changed();
            }
            let asked = signals.bitrate_kbit.load(Ordering::Relaxed);
            if asked != 0 && asked != bitrate {
                enc.set_bitrate(asked);
                bitrate = asked;
            }
            let mut look = std::mem::take(&mut look_now) || measured.elapsed() >= SIZE_POLL;
            let mut pointer = false;
            while let Some(event) = conn.poll_for_event()? {
                if grabber.is_damage(&event) {
                    pacer.changed();
                } else if super::cursor::is_change(&event) {
                    pointer = true;
                } else {
                    look = true;
                }
            }
            if let Some(c) = pointer.then(|| super::cursor::current(&conn)).flatten() {
                emit(Output::Cursor(c)).map_err(CaptureError::Write)?;
            }
            let copied = signals
                .clipboard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(text) = copied {
                emit(Output::Clipboard(text)).map_err(CaptureError::Write)?;
            }
            if look {
                measured = Instant::now();
                let now = size()?;
                if now != (width, height) {
                    tracing::info!(
                        from = %format!("{width}x{height}"),
                        to = %format!("{}x{}", now.0, now.1),
                        "the display was resized"
                    );
                    break;
                }
            }
            // A frame that took longer than ENCODE_WAIT is sent now.
            while let Some(frame) = enc.next_frame(Duration::ZERO)? {
                emit(Output::Frame(frame)).map_err(CaptureError::Write)?;
            }
            match pacer.next(Instant::now()) {
                Step::Grab => {}
                Step::Wait(wait) => {
                    wait_for_events(&conn, wait.min(PULL_WAIT));
                    continue;
                }
            }
            match grabber.grab() {
                Ok(pixels) => {
                    failed_grabs = 0;
                    enc.push(pixels)?;
                }
                // Most likely the display shrank under the grab: the size
                // is looked at next, and the pipeline rebuilt.
                Err(e) if failed_grabs < MAX_FAILED_GRABS => {
                    failed_grabs += 1;
                    tracing::debug!(error = %crate::chain(&e), "grab failed");
                    look_now = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // x264 gives one access unit per frame, without delay: out as
            // soon as it is done. One later than ENCODE_WAIT goes out at the
            // top of the loop.
            if let Some(frame) = enc.next_frame(ENCODE_WAIT)? {
                emit(Output::Frame(frame)).map_err(CaptureError::Write)?;
            }
        }
    }
}

/// What the capture loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Grab,
    /// Nothing to send for at most this long (new damage may come sooner).
    Wait(Duration),
}

/// When to grab: as soon as the screen changed, but not sooner than one
/// frame interval after the last grab; then [`TRAIL`] more frames at the full
/// rate; and once a [`REFRESH`] when nothing changes, so a viewer's picture and
/// statistics never go stale. A refresh does not hold back the change that
/// follows it: it is one frame a second, and waiting for it would delay a
/// change by up to an interval about once in every `1 s / interval` changes.
///
/// The trailing frames cost little (nothing changed: x264 sends a few bytes)
/// and do two things: they sharpen what the first frame after a big change
/// had to leave coarse at the target bitrate, and they keep packets coming
/// right after a change, so a viewer that lost the change's last packet
/// notices the gap at once and asks for it again, instead of at the next
/// refresh.
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    last: Option<Instant>,
    dirty: bool,
    /// Frames still to send at the full rate after the last change.
    trail: u32,
    /// The last grab was a refresh (nothing had changed).
    refreshed: bool,
}

impl Pacer {
    fn new(interval: Duration) -> Self {
        Pacer {
            interval,
            last: None,
            dirty: true,
            trail: 0,
            refreshed: false,
        }
    }

    fn changed(&mut self) {
        self.dirty = true;
    }

    /// Decides at `now`; a `Grab` counts as done.
    fn next(&mut self, now: Instant) -> Step {
        let due = match self.last {
            None => now,
            Some(_) if self.dirty && self.refreshed => now,
            Some(last) if self.dirty || self.trail > 0 => last + self.interval,
            Some(last) => last + REFRESH,
        };
        if now < due {
            return Step::Wait(due - now);
        }
        self.refreshed = !self.dirty && self.trail == 0;
        self.trail = if self.dirty {
            TRAIL
        } else {
            self.trail.saturating_sub(1)
        };
        self.last = Some(now);
        self.dirty = false;
        Step::Grab
    }
}

/// Blocks until the X connection has something to read or `wait` passed.
#[allow(unsafe_code)]
fn wait_for_events(conn: &x11rb::rust_connection::RustConnection, wait: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: conn.stream().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}

/// What the input thread is told.
#[derive(Debug)]
enum InputMsg {
    Control(Control),
    Stop,
}

fn run_input(mut injector: Injector, rx: mpsc::Receiver<InputMsg>, display: &str) {
    loop {
        match rx.recv_timeout(SPARE_HOLD / 2) {
            Ok(InputMsg::Control(Control::Resize { width, height })) => {
                match super::display::fit(display, width, height) {
                    Ok((w, h)) => {
                        tracing::info!(width = w, height = h, "display fitted to the viewer")
                    }
                    Err(e) => tracing::warn!(error = %crate::chain(&e), "display not resized"),
                }
            }
            Ok(InputMsg::Control(c)) => {
                if let Err(e) = injector.apply(&c) {
                    tracing::warn!(error = %crate::chain(&e), "input not injected");
                }
            }
            Ok(InputMsg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = injector.tidy(false) {
                    tracing::warn!(error = %crate::chain(&e), "spare keycodes not restored");
                }
            }
        }
    }
    if let Err(e) = injector.release_all() {
        tracing::warn!(error = %crate::chain(&e), "keys and buttons not released");
    }
}

/// Reads control lines until standard input closes, then stops everything.
/// Clipboard text goes to the clipboard thread, the rest of the input to the
/// injector.
fn read_controls(
    signals: Arc<Signals>,
    tx: mpsc::Sender<InputMsg>,
    clipboard: mpsc::Sender<String>,
) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        match Control::parse(&line) {
            Ok(Control::Keyframe) => signals.keyframe.store(true, Ordering::Relaxed),
            Ok(Control::Bitrate { kbit }) => signals.bitrate_kbit.store(kbit, Ordering::Relaxed),
            Ok(Control::Clipboard { text }) => {
                let _ = clipboard.send(text);
            }
            Ok(c) => {
                if tx.send(InputMsg::Control(c)).is_err() {
                    break;
                }
            }
            // The message itself may hold typed text: only its length is logged.
            Err(_) => tracing::warn!(bytes = line.len(), "ignoring a bad control message"),
        }
    }
    signals.stop.store(true, Ordering::Relaxed);
    let _ = tx.send(InputMsg::Stop);
}

/// `airlock-agent capture …`.
pub fn main(args: &[&str]) -> Result<(), String> {
    let opts = Options::parse(args, std::env::var("DISPLAY").ok())?;
    if opts.check {
        let found = encoder::check().map_err(|e| crate::chain(&e))?;
        println!("capture: OK, {found}");
        return Ok(());
    }
    let injector = Injector::connect(&opts.display).map_err(|e| crate::chain(&e))?;
    let signals = Arc::new(Signals::default());
    let (tx, rx) = mpsc::channel();
    let display = opts.display.clone();
    let input = std::thread::spawn(move || run_input(injector, rx, &display));
    let (clip_tx, clip_rx) = mpsc::channel();
    {
        let (signals, display) = (signals.clone(), opts.display.clone());
        // Not joined: it ends with the process. A display without XFixes
        // streams without a clipboard.
        std::thread::spawn(move || {
            let out = |text| {
                *signals.clipboard.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
            };
            if let Err(e) = super::clipboard::run(&display, clip_rx, &out, &signals.stop) {
                tracing::warn!(error = %crate::chain(&e), "no clipboard for this stream");
            }
        });
    }
    {
        let (signals, tx) = (signals.clone(), tx.clone());
        // Not joined: it sits in a read until the agent closes the pipe.
        std::thread::spawn(move || read_controls(signals, tx, clip_tx));
    }
    // Standard output unbuffered by line: frames are binary.
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("standard output: {e}"))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, std::fs::File::from(stdout));
    let result = capture(&opts, &signals, &mut |o| {
        match o {
            Output::Info(info) => wire::write_info(&mut out, &info)?,
            Output::Frame(frame) => wire::write_frame(&mut out, &frame)?,
            Output::Cursor(cursor) => wire::write(&mut out, &cursor.encode())?,
            Output::Clipboard(text) => wire::write(&mut out, &encode_clipboard(&text))?,
        }
        out.flush()
    });
    let _ = tx.send(InputMsg::Stop);
    let _ = input.join();
    match result {
        Ok(()) => {
            tracing::info!("capture stopped: the agent closed the stream");
            Ok(())
        }
        Err(e) => Err(crate::chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_grabs_on_change_at_most_once_an_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(16));
        assert_eq!(p.next(t0), Step::Grab, "the first frame at once");
        // Then the trailing frames, one an interval.
        let mut t = t0;
        for i in 0..TRAIL {
            assert_eq!(p.next(t + ms(5)), Step::Wait(ms(11)), "trail {i}: too soon");
            t += ms(16);
            assert_eq!(p.next(t), Step::Grab, "trail {i}");
        }
        assert_eq!(p.next(t + ms(5)), Step::Wait(REFRESH - ms(5)), "idle");
        p.changed();
        assert_eq!(
            p.next(t + ms(5)),
            Step::Wait(ms(11)),
            "too soon after the last"
        );
        assert_eq!(p.next(t + ms(16)), Step::Grab);
        p.changed();
        assert_eq!(
            p.next(t + ms(100)),
            Step::Grab,
            "a change during the trail: at once"
        );
        let t = t + ms(100);
        for _ in 0..TRAIL {
            assert!(matches!(p.next(t + ms(1)), Step::Wait(_)));
        }
        let mut t = t;
        for _ in 0..TRAIL {
            t += ms(16);
            assert_eq!(p.next(t), Step::Grab, "the trail starts over");
        }
        assert_eq!(
            p.next(t + REFRESH),
            Step::Grab,
            "a refresh when nothing changes"
        );
        p.changed();
        assert_eq!(
            p.next(t + REFRESH + ms(1)),
            Step::Grab,
            "a refresh does not hold a change back"
        );
        p.changed();
        assert_eq!(
            p.next(t + REFRESH + ms(2)),
            Step::Wait(ms(15)),
            "but that change's grab does"
        );
    }

    #[test]
    fn options() {
        let o = Options::parse(&[], None).expect("defaults");
        assert_eq!(o.display, ":0");
        assert_eq!(o.fps, DEFAULT_FPS);
        assert!(!o.check);
        let o = Options::parse(&["--fps", "15", "--check"], Some(":7".into())).expect("parse");
        assert_eq!((o.display.as_str(), o.fps, o.check), (":7", 15, true));
        for bad in [
            &["--fps"][..],
            &["--fps", "0"],
            &["--fps", "61"],
            &["--fps", "x"],
            &["--what"],
        ] {
            assert!(Options::parse(bad, None).is_err(), "{bad:?}");
        }
    }
}
