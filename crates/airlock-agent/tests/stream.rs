//! The guest side of the video link against a real display: a TigerVNC Xvnc
//! started for each test (no network listener, local socket only), the
//! capture pipeline and XTest injection in-process, and the agent's
//! `/v1/stream` route over a loopback WebSocket with the built agent as its
//! capture child.

use airlock_agent::exec::{ExecConfig, RunAs};
use airlock_agent::login::{LoginConfig, Logins};
use airlock_agent::server::{self, AgentState};
use airlock_agent::stream::capture::{self, Options, Output, Signals};
use airlock_agent::stream::encoder::{self, nal_types};
use airlock_agent::stream::input::{Injector, Keymap};
use airlock_agent::stream::route::{CaptureCommand, Streams};
use airlock_proto::stream::{Control, CursorImage, StreamInfo, VideoFrame, STREAM_PATH};
use futures::{SinkExt, StreamExt};
use gstreamer::prelude::ClockExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use x11rb::connection::Connection;
use x11rb::protocol::randr::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{
    ConnectionExt as _, CreateGCAux, CreateWindowAux, EventMask, InputFocus, KeyButMask, Rectangle,
    WindowClass,
};
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;

/// A private Xvnc: no RFB listener, no TCP, killed (it alone) on drop, and
/// gone after two minutes whatever happens.
struct Xvnc {
    child: Child,
    display: String,
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Xvnc {
    fn start(width: u16, height: u16) -> Xvnc {
        // Display numbers spread by process id, so tests in parallel processes
        // rarely try the same one; a taken one makes Xvnc exit and the next is tried.
        let base = 200 + (std::process::id() % 500) * 8;
        for n in base..base + 64 {
            if std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists() {
                continue;
            }
            let child = match Command::new("Xvnc")
                .arg(format!(":{n}"))
                .args(["-geometry", &format!("{width}x{height}"), "-depth", "24"])
                .args([
                    "-SecurityTypes",
                    "None",
                    "-rfbport",
                    "-1",
                    "-nolisten",
                    "tcp",
                ])
                // A test process that dies without unwinding (Xlib exits on
                // an X error) cannot kill it: it then quits by itself.
                .args(["-MaxIdleTime", "120"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(e) => panic!(
                    "cannot start Xvnc ({e}): install the Debian package tigervnc-standalone-server"
                ),
            };
            let mut x = Xvnc {
                child,
                display: format!(":{n}"),
            };
            if x.wait_ready(n) {
                return x;
            }
        }
        panic!("no free X display number from {base} on");
    }

    /// Ready once its lock file names this very process and it takes clients.
    fn wait_ready(&mut self, n: u32) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        let pid = self.child.id().to_string();
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let ours = std::fs::read_to_string(format!("/tmp/.X{n}-lock"))
                .map(|s| s.trim() == pid)
                .unwrap_or(false);
            if ours && x11rb::connect(Some(&self.display)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }

    fn connect(&self) -> (RustConnection, u32) {
        let (conn, screen) = x11rb::connect(Some(&self.display)).expect("connect to Xvnc");
        let root = conn.setup().roots[screen].root;
        (conn, root)
    }
}

/// Fails with the package to install when a GStreamer element is missing.
fn need_gstreamer() {
    if let Err(e) = encoder::check() {
        panic!(
            "{}: install the packages in scripts/host-packages.txt",
            airlock_agent::chain(&e)
        );
    }
}

/// Resizes the screen with RandR 1.0, as `xrandr -s` does.
fn resize(conn: &RustConnection, root: u32, width: u16, height: u16) {
    // Without the version handshake the server answers in RandR 1.0's shorter form.
    conn.randr_query_version(1, 6)
        .expect("request")
        .reply()
        .expect("RandR version");
    let info = conn
        .randr_get_screen_info(root)
        .expect("request")
        .reply()
        .expect("screen info");
    let id = info
        .sizes
        .iter()
        .position(|s| s.width == width && s.height == height)
        .unwrap_or_else(|| panic!("Xvnc offers no {width}x{height} mode"));
    let r = conn
        .randr_set_screen_config(
            root,
            x11rb::CURRENT_TIME,
            info.config_timestamp,
            id as u16,
            randr::Rotation::ROTATE0,
            0,
        )
        .expect("request")
        .reply()
        .expect("set screen config");
    assert_eq!(r.status, randr::SetConfig::SUCCESS);
}

/// Runs the capture loop on a thread; its outputs arrive on the channel.
struct Running {
    signals: Arc<Signals>,
    rx: mpsc::Receiver<(Instant, Output)>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Running {
    fn start(display: &str, fps: u32) -> Running {
        let opts = Options::parse(&["--fps", &fps.to_string()], Some(display.to_owned()))
            .expect("options");
        let signals = Arc::new(Signals::default());
        let (tx, rx) = mpsc::channel();
        let s = signals.clone();
        let thread = std::thread::spawn(move || {
            capture::capture(&opts, &s, &mut |o| {
                tx.send((Instant::now(), o))
                    .map_err(|_| std::io::Error::other("test ended"))
            })
            .map_err(|e| airlock_agent::chain(&e))
        });
        Running {
            signals,
            rx,
            thread: Some(thread),
        }
    }

    fn next(&self, within: Duration) -> Output {
        self.rx
            .recv_timeout(within)
            .map(|(_, o)| o)
            .unwrap_or_else(|_| panic!("no capture output within {within:?}"))
    }

    /// Frames up to and including the next keyframe; panics after `within`.
    fn until_keyframe(&self, within: Duration) -> (usize, VideoFrame) {
        let until = Instant::now() + within;
        let mut deltas = 0;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left) {
                Output::Frame(f) if f.keyframe => return (deltas, f),
                Output::Frame(_) => deltas += 1,
                Output::Info(i) => panic!("unexpected stream description {i:?}"),
                Output::Cursor(_) | Output::Clipboard(_) => {}
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.signals.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn assert_idr_with_headers(f: &VideoFrame) {
    let types = nal_types(&f.data);
    for want in [7, 8, 5] {
        assert!(types.contains(&want), "NAL types {types:?} lack {want}");
    }
    let at = |t| types.iter().position(|x| *x == t);
    assert!(
        at(7) < at(5) && at(8) < at(5),
        "SPS/PPS after the IDR: {types:?}"
    );
}

#[test]
fn capture_streams_keyframes_and_follows_resizes() {
    need_gstreamer();
    let x = Xvnc::start(640, 480);
    let run = Running::start(&x.display, 30);

    let Output::Info(info) = run.next(Duration::from_secs(10)) else {
        panic!("the first output is not a stream description");
    };
    assert_eq!(
        info,
        StreamInfo {
            codec: "h264".into(),
            width: 640,
            height: 480,
            fps: 30
        }
    );
    // Then the pointer's picture (Xvnc's root window has X's default one).
    let Output::Cursor(cursor) = run.next(Duration::from_secs(5)) else {
        panic!("no pointer picture after the stream description");
    };
    assert!(cursor.width > 0 && cursor.height > 0, "{cursor:?}");
    assert!(
        cursor.rgba.chunks(4).any(|p| p[3] == 255),
        "the pointer picture has no opaque pixel"
    );
    let (deltas, first) = run.until_keyframe(Duration::from_secs(5));
    assert_eq!(deltas, 0, "the stream does not start with a keyframe");
    assert_idr_with_headers(&first);

    let clock = gstreamer::SystemClock::obtain();
    let mut last_pts = first.pts_us;
    let mut take = |within: Duration, mut each: Box<dyn FnMut(&VideoFrame) + '_>| {
        let started = Instant::now();
        let mut frames = 0;
        while started.elapsed() < within {
            match run.rx.recv_timeout(Duration::from_millis(50)) {
                Ok((_, Output::Frame(f))) => {
                    assert!(!f.keyframe, "a keyframe nobody asked for");
                    assert!(f.pts_us > last_pts, "timestamps go back");
                    last_pts = f.pts_us;
                    each(&f);
                    frames += 1;
                }
                Ok((_, Output::Info(i))) => panic!("unexpected {i:?}"),
                Ok((_, Output::Cursor(_) | Output::Clipboard(_))) | Err(_) => {}
            }
        }
        frames
    };
    // An idle desktop sends only the once-a-second refresh (after the
    // trailing frames of the first).
    take(Duration::from_millis(500), Box::new(|_| {}));
    let idle = take(Duration::from_millis(2500), Box::new(|_| {}));
    assert!(
        (1..=4).contains(&idle),
        "{idle} frames in 2.5 s of an idle screen (want the 1 s refresh only)"
    );

    // A screen that changes all the time streams at the frame rate, each
    // frame stamped with its grab time on the pipeline's clock.
    let painter = Painter::start(&x.display);
    let mut latencies = Vec::new();
    let busy = take(
        Duration::from_secs(2),
        Box::new(|f: &VideoFrame| {
            latencies.push(clock.time().useconds().saturating_sub(f.pts_us));
        }),
    );
    drop(painter);
    assert!(
        (40..=64).contains(&busy),
        "{busy} frames in 2 s of a changing screen at 30 fps"
    );
    latencies.sort_unstable();
    let median = latencies[latencies.len() / 2];
    eprintln!(
        "idle: {idle} frames in 2.5 s; busy: {busy} in 2 s, grab to output: median {median} µs"
    );
    assert!(
        median < 500_000,
        "frames come out {median} µs after capture"
    );

    // One change after a quiet spell is sent at once, not at the next tick.
    take(Duration::from_millis(300), Box::new(|_| {}));
    let (conn, root) = x.connect();
    let changed = Instant::now();
    paint(&conn, root, 0x00ff_0000);
    let mut first_after = None;
    take(
        Duration::from_millis(500),
        Box::new(|_| {
            first_after.get_or_insert(changed.elapsed());
        }),
    );
    let first_after = first_after.expect("no frame after a change");
    eprintln!("change to frame out: {} ms", first_after.as_millis());
    assert!(first_after < Duration::from_millis(250), "{first_after:?}");

    // A keyframe request is answered within a few frames.
    run.signals.keyframe.store(true, Ordering::Relaxed);
    let asked = Instant::now();
    let (deltas, kf) = run.until_keyframe(Duration::from_secs(3));
    assert_idr_with_headers(&kf);
    eprintln!(
        "keyframe {} ms after the request, {deltas} frames between",
        asked.elapsed().as_millis()
    );
    assert!(
        deltas <= 10,
        "{deltas} frames before the requested keyframe"
    );

    // A resize starts over: a new description, then a keyframe first.
    resize(&conn, root, 800, 600);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match run.next(left) {
            Output::Info(i) => {
                assert_eq!((i.width, i.height), (800, 600));
                break;
            }
            Output::Frame(f) => assert!(f.pts_us > last_pts),
            Output::Cursor(_) | Output::Clipboard(_) => {}
        }
    }
    let (deltas, kf) = run.until_keyframe(Duration::from_secs(5));
    assert_eq!(deltas, 0, "a resized stream does not start with a keyframe");
    assert_idr_with_headers(&kf);
    assert!(kf.pts_us > last_pts, "timestamps go back across the resize");

    // Shrinking while a frame of the old size is being grabbed makes the X
    // server refuse the grab (BadMatch): the capture must live through a few
    // of those, and come back at the new size.
    for _ in 0..4 {
        resize(&conn, root, 640, 480);
        std::thread::sleep(Duration::from_millis(150));
        resize(&conn, root, 800, 600);
        std::thread::sleep(Duration::from_millis(150));
    }
    resize(&conn, root, 640, 480);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if let Output::Info(i) = run.next(left) {
            if (i.width, i.height) == (640, 480) {
                break;
            }
        }
    }
    let (deltas, _) = run.until_keyframe(Duration::from_secs(5));
    assert_eq!(deltas, 0);
    assert!(
        !run.thread.as_ref().is_some_and(|t| t.is_finished()),
        "the capture loop ended"
    );
}

/// Fills the root window with one colour.
fn paint(conn: &RustConnection, root: u32, rgb: u32) {
    let gc = conn.generate_id().expect("id");
    conn.create_gc(gc, root, &CreateGCAux::new().foreground(rgb))
        .expect("gc");
    conn.poly_fill_rectangle(
        root,
        gc,
        &[Rectangle {
            x: 0,
            y: 0,
            width: 4096,
            height: 4096,
        }],
    )
    .expect("fill");
    conn.free_gc(gc).expect("free gc");
    conn.flush().expect("flush");
}

/// Repaints the root window in a new colour every 5 ms until dropped.
struct Painter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Painter {
    fn start(display: &str) -> Painter {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (conn, screen) = x11rb::connect(Some(display)).expect("connect to Xvnc");
        let root = conn.setup().roots[screen].root;
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rgb = 0u32;
            while !s.load(Ordering::Relaxed) {
                rgb = (rgb + 0x0001_0305) & 0x00ff_ffff;
                paint(&conn, root, rgb);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Painter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Painter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A window with the focus that records its key presses as keysyms, read
/// through the mapping at the time (Shift picks the second column).
struct KeyWatcher {
    conn: RustConnection,
}

impl KeyWatcher {
    fn new(x: &Xvnc) -> KeyWatcher {
        let (conn, root) = x.connect();
        let win = conn.generate_id().expect("id");
        conn.create_window(
            0,
            win,
            root,
            0,
            0,
            200,
            200,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new().event_mask(EventMask::KEY_PRESS),
        )
        .expect("create");
        conn.map_window(win).expect("map");
        conn.set_input_focus(InputFocus::POINTER_ROOT, win, x11rb::CURRENT_TIME)
            .expect("focus");
        conn.get_input_focus()
            .expect("request")
            .reply()
            .expect("sync");
        KeyWatcher { conn }
    }

    fn typed(&self, count: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while out.len() < count && Instant::now() < until {
            match self.conn.poll_for_event().expect("event") {
                Some(Event::KeyPress(e)) => {
                    let map = Keymap::fetch(&self.conn).expect("mapping");
                    let row = usize::from(e.detail - map.min) * usize::from(map.per);
                    let shift = u16::from(e.state) & u16::from(KeyButMask::SHIFT) != 0;
                    let (a, b) = (map.syms[row], map.syms[row + 1]);
                    let sym = if shift && b != 0 { b } else { a };
                    // Shift itself and other modifiers are not characters.
                    if !(0xffe1..=0xffee).contains(&sym) {
                        out.push(sym);
                    }
                }
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        out
    }
}

fn keys_down(conn: &RustConnection) -> Vec<u8> {
    let keys = conn
        .query_keymap()
        .expect("request")
        .reply()
        .expect("keymap")
        .keys;
    (0..=255u8)
        .filter(|kc| keys[usize::from(*kc / 8)] & (1 << (kc % 8)) != 0)
        .collect()
}

#[test]
fn input_reaches_the_display() {
    let x = Xvnc::start(640, 480);
    let (conn, root) = x.connect();
    let mut inj = Injector::connect(&x.display).expect("injector");
    let before = Keymap::fetch(&conn).expect("mapping");

    // Pointer: motion, then button 1 down and up.
    inj.apply(&Control::Pointer {
        x: 100,
        y: 50,
        buttons: 0,
    })
    .expect("pointer");
    let p = conn
        .query_pointer(root)
        .expect("request")
        .reply()
        .expect("pointer");
    assert_eq!((p.root_x, p.root_y), (100, 50));
    inj.apply(&Control::Pointer {
        x: 120,
        y: 60,
        buttons: 0b101,
    })
    .expect("press");
    let p = conn
        .query_pointer(root)
        .expect("request")
        .reply()
        .expect("pointer");
    assert_eq!((p.root_x, p.root_y), (120, 60));
    let mask = u16::from(p.mask);
    assert!(
        mask & u16::from(KeyButMask::BUTTON1) != 0,
        "button 1 not down"
    );
    assert!(
        mask & u16::from(KeyButMask::BUTTON3) != 0,
        "button 3 not down"
    );
    inj.apply(&Control::Pointer {
        x: 120,
        y: 60,
        buttons: 0b001,
    })
    .expect("release right");
    let p = conn
        .query_pointer(root)
        .expect("request")
        .reply()
        .expect("pointer");
    assert!(u16::from(p.mask) & u16::from(KeyButMask::BUTTON3) == 0);
    inj.apply(&Control::Wheel { dx: -1, dy: 2 }).expect("wheel");

    // A key by keysym, down and up.
    let a = before.find(0x61).expect("'a' is mapped").0;
    inj.apply(&Control::Key {
        keysym: 0x61,
        down: true,
    })
    .expect("key down");
    assert!(keys_down(&conn).contains(&a), "'a' not down");
    inj.apply(&Control::Key {
        keysym: 0x61,
        down: false,
    })
    .expect("key up");
    assert!(!keys_down(&conn).contains(&a), "'a' still down");

    // A keysym the mapping lacks goes on a spare keycode while held.
    let euro = 0x0100_20ac;
    assert!(before.find(euro).is_none());
    inj.apply(&Control::Key {
        keysym: euro,
        down: true,
    })
    .expect("euro down");
    let during = Keymap::fetch(&conn).expect("mapping");
    let (spare, _) = during.find(euro).expect("euro mapped while held");
    assert!(keys_down(&conn).contains(&spare));
    inj.apply(&Control::Key {
        keysym: euro,
        down: false,
    })
    .expect("euro up");
    assert!(!keys_down(&conn).contains(&spare));

    // Text: plain, shifted and unmapped characters, read back as typed.
    let watcher = KeyWatcher::new(&x);
    inj.apply(&Control::Text {
        text: "aB!\u{20ac}ж\n".into(),
    })
    .expect("text");
    assert_eq!(
        watcher.typed(6),
        vec![0x61, 0x42, 0x21, euro, 0x0100_0436, 0xff0d]
    );
    assert!(
        keys_down(&conn).is_empty(),
        "keys left down: {:?}",
        keys_down(&conn)
    );

    // Keys on the Shift level, sent without Shift (as a program typing, or
    // another layout, sends them), come out as sent; with the viewer's own
    // Shift held they come out the same.
    for (keysym, shift) in [(0x3e, false), (0x41, false), (0x3e, true)] {
        if shift {
            inj.apply(&Control::Key {
                keysym: 0xffe1,
                down: true,
            })
            .expect("shift");
        }
        for down in [true, false] {
            inj.apply(&Control::Key { keysym, down }).expect("key");
        }
        if shift {
            inj.apply(&Control::Key {
                keysym: 0xffe1,
                down: false,
            })
            .expect("shift up");
        }
        assert_eq!(watcher.typed(1), vec![keysym], "shift held: {shift}");
    }
    assert!(keys_down(&conn).is_empty());

    // Everything held is let go, and the mapping is as it was.
    inj.apply(&Control::Pointer {
        x: 1,
        y: 1,
        buttons: 0b001,
    })
    .expect("press");
    inj.apply(&Control::Key {
        keysym: 0x62,
        down: true,
    })
    .expect("b down");
    inj.release_all().expect("release");
    let p = conn
        .query_pointer(root)
        .expect("request")
        .reply()
        .expect("pointer");
    assert!(u16::from(p.mask) & u16::from(KeyButMask::BUTTON1) == 0);
    assert!(keys_down(&conn).is_empty());
    assert_eq!(Keymap::fetch(&conn).expect("mapping"), before);
}

#[test]
fn spare_keycodes_are_given_back_when_idle() {
    let x = Xvnc::start(320, 240);
    let (conn, _) = x.connect();
    let mut inj = Injector::connect(&x.display).expect("injector");
    let before = Keymap::fetch(&conn).expect("mapping");
    inj.apply(&Control::Text {
        text: "ü€".into()
    })
    .expect("text");
    inj.tidy(false).expect("tidy");
    assert!(Keymap::fetch(&conn)
        .expect("mapping")
        .find(0x0100_20ac)
        .is_some());
    std::thread::sleep(airlock_agent::stream::input::SPARE_HOLD + Duration::from_millis(100));
    inj.tidy(false).expect("tidy");
    assert_eq!(Keymap::fetch(&conn).expect("mapping"), before);
}

// ---- the route ----

const TOKEN: &str = "tok-stream-0123456789";

struct Agent {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn agent(argv: Vec<String>, display: &str) -> Agent {
    let home = std::env::temp_dir();
    let env = vec![
        ("DISPLAY".to_owned(), display.to_owned()),
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("HOME".to_owned(), home.display().to_string()),
    ];
    let state = Arc::new(AgentState {
        token: TOKEN.into(),
        sandbox_id: "sb-stream".into(),
        image_build_id: "test".into(),
        started: Instant::now(),
        exec: ExecConfig {
            run_as: RunAs::Current,
            home: home.clone(),
            base_env: env.clone(),
        },
        logins: Arc::new(Logins::new(LoginConfig::guest(
            RunAs::Current,
            home.clone(),
            vec![],
            "127.0.0.1".into(),
        ))),
        processes: Arc::new(airlock_agent::process::Processes::new(ExecConfig {
            run_as: RunAs::Current,
            home: home.clone(),
            base_env: env.clone(),
        })),
        streams: Arc::new(Streams::new(CaptureCommand {
            argv,
            run_as: RunAs::Current,
            env,
            cwd: home,
        })),
        session: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Agent {
        addr,
        stop: Some(tx),
    }
}

fn capture_argv() -> Vec<String> {
    vec![env!("CARGO_BIN_EXE_airlock-agent").into(), "capture".into()]
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(agent: &Agent, query: &str, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://{}{STREAM_PATH}{query}", agent.addr)
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

fn refused_with(r: Result<Ws, tungstenite::Error>) -> u16 {
    match r {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("refused, but not with an HTTP status: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

async fn next_msg(ws: &mut Ws) -> Message {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(other) => panic!("the stream ended: {other:?}"),
        Err(_) => panic!("no message within 10 s"),
    }
}

/// The next video frame; pointer pictures on the way are checked and passed.
async fn next_frame(ws: &mut Ws) -> VideoFrame {
    loop {
        match next_msg(ws).await {
            Message::Binary(b) if CursorImage::is_cursor(&b) => {
                CursorImage::decode(&b).expect("a pointer picture");
            }
            Message::Binary(b) => return VideoFrame::decode(&b).expect("a video frame"),
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

async fn next_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match next_msg(ws).await {
            Message::Close(Some(f)) => return (f.code.into(), f.reason.to_string()),
            Message::Close(None) => return (1005, String::new()),
            _ => {}
        }
    }
}

/// Processes whose parent is this test and whose program is the agent.
fn capture_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1).unwrap_or("");
        if ppid == me && comm.ends_with("(airlock-agent") && !rest.starts_with('Z') {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_streams_and_takes_input() {
    need_gstreamer();
    let x = Xvnc::start(640, 480);
    let agent = agent(capture_argv(), &x.display).await;

    assert_eq!(refused_with(open(&agent, "", None).await), 401);
    assert_eq!(refused_with(open(&agent, "", Some("wrong")).await), 401);
    assert_eq!(refused_with(open(&agent, "?fps=0", Some(TOKEN)).await), 400);
    assert_eq!(
        refused_with(open(&agent, "?fps=61", Some(TOKEN)).await),
        400
    );
    assert_eq!(
        refused_with(open(&agent, "?rate=5", Some(TOKEN)).await),
        400
    );

    let mut ws = open(&agent, "?fps=20", Some(TOKEN)).await.expect("upgrade");
    match next_msg(&mut ws).await {
        Message::Text(t) => {
            let info: StreamInfo = serde_json::from_str(&t).expect("stream info");
            assert_eq!(
                info,
                StreamInfo {
                    codec: "h264".into(),
                    width: 640,
                    height: 480,
                    fps: 20
                }
            );
        }
        other => panic!("the first message is not the stream info: {other:?}"),
    }
    let first = next_frame(&mut ws).await;
    assert!(first.keyframe);
    assert_idr_with_headers(&first);
    for _ in 0..5 {
        assert!(!next_frame(&mut ws).await.keyframe);
    }

    // Garbage is ignored; a keyframe request is answered.
    ws.send(Message::text("{\"type\":\"rm -rf\"}"))
        .await
        .expect("send");
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    ws.send(Message::text(Control::Keyframe.to_json()))
        .await
        .expect("send");
    let mut n = 0;
    while !next_frame(&mut ws).await.keyframe {
        n += 1;
        assert!(n < 40, "no keyframe after the request");
    }

    // Input goes through the child into the display.
    let (conn, root) = x.connect();
    ws.send(Message::text(
        Control::Pointer {
            x: 33,
            y: 44,
            buttons: 0,
        }
        .to_json(),
    ))
    .await
    .expect("send");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let p = conn
            .query_pointer(root)
            .expect("request")
            .reply()
            .expect("pointer");
        if (p.root_x, p.root_y) == (33, 44) {
            break;
        }
        assert!(Instant::now() < until, "the pointer did not move");
        let _ = next_frame(&mut ws).await;
    }
    assert_eq!(capture_children().len(), 1);

    // A second viewer replaces the first.
    let mut ws2 = open(&agent, "", Some(TOKEN)).await.expect("upgrade");
    assert_eq!(
        next_close(&mut ws).await,
        (1000, "replaced by a newer stream".to_owned())
    );
    match next_msg(&mut ws2).await {
        Message::Text(t) => assert!(
            t.contains(&format!("\"fps\":{}", airlock_proto::stream::DEFAULT_FPS)),
            "{t}"
        ),
        other => panic!("expected the stream info, got {other:?}"),
    }
    assert!(next_frame(&mut ws2).await.keyframe);
    assert_eq!(capture_children().len(), 1, "two capture programs at once");

    // Closing the socket ends the child.
    ws2.close(None).await.expect("close");
    drop(ws2);
    let until = Instant::now() + Duration::from_secs(5);
    while !capture_children().is_empty() {
        assert!(
            Instant::now() < until,
            "the capture program outlived its stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dead_capture_program_closes_the_socket_with_its_reason() {
    // The real program on a display that does not exist.
    let agent_a = agent(capture_argv(), ":4999").await;
    let mut ws = open(&agent_a, "", Some(TOKEN)).await.expect("upgrade");
    let (code, reason) = next_close(&mut ws).await;
    assert_eq!(code, 1011);
    assert!(
        reason.starts_with("capture stopped: connecting to the X display :4999"),
        "{reason}"
    );

    // A program that says why in its own words and exits.
    let agent_b = agent(
        vec![
            "sh".into(),
            "-c".into(),
            "echo 'first line' >&2; echo 'ERROR airlock_agent: no display for you' >&2; exit 3"
                .into(),
            "sh".into(),
        ],
        ":4999",
    )
    .await;
    let mut ws = open(&agent_b, "", Some(TOKEN)).await.expect("upgrade");
    assert_eq!(
        next_close(&mut ws).await,
        (1011, "capture stopped: no display for you".to_owned())
    );

    // Silent, with a status only.
    let agent_c = agent(
        vec!["sh".into(), "-c".into(), "exit 4".into(), "sh".into()],
        ":4999",
    )
    .await;
    let mut ws = open(&agent_c, "", Some(TOKEN)).await.expect("upgrade");
    let (code, reason) = next_close(&mut ws).await;
    assert_eq!(code, 1011);
    assert_eq!(reason, "capture stopped: exited with exit status: 4");
}

/// `airlock-agent clipboard …` on the test's display.
fn clipboard_cmd(display: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock-agent"));
    c.arg("clipboard")
        .args(args)
        .env("DISPLAY", display)
        .env("NO_COLOR", "1");
    c
}

fn clipboard_get(display: &str) -> String {
    let out = clipboard_cmd(display, &["get"])
        .output()
        .expect("clipboard get runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The next clipboard message of the stream (frames and pointers passed by).
async fn next_clipboard(ws: &mut Ws) -> String {
    loop {
        if let Message::Binary(b) = next_msg(ws).await {
            if airlock_proto::stream::is_clipboard(&b) {
                return airlock_proto::stream::decode_clipboard(&b).expect("clipboard text");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_carries_the_clipboard_both_ways() {
    need_gstreamer();
    let x = Xvnc::start(320, 240);
    // Text that is on the clipboard before the stream starts goes out first.
    let mut before = clipboard_cmd(&x.display, &["set", "--hold", "30"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("clipboard set");
    {
        use std::io::Write;
        let mut stdin = before.stdin.take().expect("stdin");
        stdin
            .write_all("copied before €".as_bytes())
            .expect("write");
    }
    let until = Instant::now() + Duration::from_secs(5);
    while clipboard_get(&x.display) != "copied before €" {
        assert!(Instant::now() < until, "clipboard set did not take");
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent = agent(capture_argv(), &x.display).await;
    let mut ws = open(&agent, "?fps=10", Some(TOKEN)).await.expect("upgrade");
    assert_eq!(next_clipboard(&mut ws).await, "copied before €");

    // The viewer's text: on CLIPBOARD for any program that asks, and the
    // program that held it before sees it lost and ends.
    let secret = format!("pässwörd-{}\nline two", std::process::id());
    ws.send(Message::text(
        Control::Clipboard {
            text: secret.clone(),
        }
        .to_json(),
    ))
    .await
    .expect("send");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if clipboard_get(&x.display) == secret {
            break;
        }
        assert!(
            Instant::now() < until,
            "the viewer's text never reached the clipboard"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = Instant::now() + Duration::from_secs(5);
    while before.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < until,
            "the old owner was not told it lost the clipboard"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Text copied in the guest goes to the viewer (large, but within the bound).
    let big: String = "0123456789abcdef".repeat(40 * 1024);
    let mut copier = clipboard_cmd(&x.display, &["set", "--hold", "30"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("clipboard set");
    {
        use std::io::Write;
        let mut stdin = copier.stdin.take().expect("stdin");
        stdin.write_all(big.as_bytes()).expect("write");
    }
    assert_eq!(next_clipboard(&mut ws).await.len(), big.len());

    // Over the bound: refused by `set`, with a clear message.
    let out = {
        let mut c = clipboard_cmd(&x.display, &["set", "--hold", "1"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("clipboard set");
        {
            use std::io::Write;
            let mut stdin = c.stdin.take().expect("stdin");
            let _ = stdin.write_all(&vec![b'x'; airlock_proto::stream::MAX_CLIPBOARD_BYTES + 10]);
        }
        c.wait_with_output().expect("wait")
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than"), "{err}");
    let _ = copier.kill();
    let _ = copier.wait();
    drop(ws);
}

/// The next stream description (frames, pointers and clipboard passed by).
async fn next_info(ws: &mut Ws) -> StreamInfo {
    loop {
        if let Message::Text(t) = next_msg(ws).await {
            return serde_json::from_str(&t).expect("stream info");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_fits_the_display_to_the_viewer() {
    need_gstreamer();
    let x = Xvnc::start(640, 480);
    let agent = agent(capture_argv(), &x.display).await;
    let mut ws = open(&agent, "?fps=10", Some(TOKEN)).await.expect("upgrade");
    assert_eq!(next_info(&mut ws).await.width, 640);
    // A size Xvnc does not list (a new mode), odd: rounded down to even.
    for (asked, got) in [((1001, 701), (1000, 700)), ((800, 600), (800, 600))] {
        ws.send(Message::text(
            Control::Resize {
                width: asked.0,
                height: asked.1,
            }
            .to_json(),
        ))
        .await
        .expect("send");
        let info = next_info(&mut ws).await;
        assert_eq!((info.width, info.height), got, "asked for {asked:?}");
        let first = next_frame(&mut ws).await;
        assert!(first.keyframe, "a new size starts with a keyframe");
        let (conn, root) = x.connect();
        let g = conn
            .get_geometry(root)
            .expect("request")
            .reply()
            .expect("geometry");
        assert_eq!((u32::from(g.width), u32::from(g.height)), got);
    }
    // Out of bounds: refused by the route, the display stays.
    ws.send(Message::text(
        r#"{"type":"resize","width":100,"height":100}"#,
    ))
    .await
    .expect("send");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (conn, root) = x.connect();
    let g = conn
        .get_geometry(root)
        .expect("request")
        .reply()
        .expect("geometry");
    assert_eq!((g.width, g.height), (800, 600));
    drop(ws);
}
