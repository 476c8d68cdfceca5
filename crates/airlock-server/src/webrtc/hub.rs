//! One video source per sandbox, shared by all its WebRTC viewers: the hub
//! holds the one link to the guest's encoder (`GET /v1/stream` on the agent)
//! and fans each encoded frame out to every viewer by reference. It closes the
//! link (and so stops the guest's encoder) shortly after its last viewer left.

use airlock_proto::stream::{
    decode_clipboard, is_clipboard, Control, CursorImage, StreamInfo, VideoFrame, MAX_FRAME_BYTES,
    STREAM_PATH,
};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// One encoded frame as every viewer receives it: the bytes are shared.
#[derive(Debug)]
pub struct Frame {
    pub pts_us: u64,
    pub keyframe: bool,
    pub data: Arc<[u8]>,
}

/// Frames a slow viewer may be behind before it skips to the next keyframe.
const FANOUT_DEPTH: usize = 8;
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a hub without viewers keeps the guest's encoder running.
const LINGER: Duration = Duration::from_secs(3);

/// Why a hub ended, for the viewers still holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubState {
    Starting,
    Streaming,
    Ended(String),
}

#[derive(Debug)]
pub struct Hub {
    pub sandbox_id: String,
    frames: broadcast::Sender<Arc<Frame>>,
    info: watch::Receiver<Option<StreamInfo>>,
    cursor: watch::Receiver<Option<Arc<CursorImage>>>,
    clipboard: watch::Receiver<Option<Arc<str>>>,
    state: watch::Receiver<HubState>,
    control: mpsc::Sender<Control>,
    /// Each viewer's bitrate target; the guest gets the lowest (bitrate.rs).
    bitrates: Mutex<super::bitrate::Targets>,
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Frame>> {
        self.frames.subscribe()
    }

    pub fn info(&self) -> Option<StreamInfo> {
        self.info.borrow().clone()
    }

    /// The guest's pointer picture, as it changes.
    pub fn cursor(&self) -> watch::Receiver<Option<Arc<CursorImage>>> {
        self.cursor.clone()
    }

    /// Text copied in the guest, as it changes. A new receiver has seen
    /// what was copied before it came: only new copies reach its viewer.
    pub fn clipboard(&self) -> watch::Receiver<Option<Arc<str>>> {
        let mut rx = self.clipboard.clone();
        rx.borrow_and_update();
        rx
    }

    pub fn state(&self) -> watch::Receiver<HubState> {
        self.state.clone()
    }

    /// Forward a viewer's input or a keyframe request; dropped when the link
    /// is busy (input is small, and a full queue means the guest is stuck).
    pub fn control(&self, c: Control) {
        let _ = self.control.try_send(c);
    }

    /// A viewer's bitrate target, `None` when it leaves; the guest is asked
    /// for the lowest of all viewers' when that changes.
    pub fn want_bitrate(&self, viewer: u64, kbit: Option<u32>) {
        let ask = self
            .bitrates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(viewer, kbit);
        if let Some(kbit) = ask {
            self.control(Control::Bitrate { kbit });
        }
    }

    /// How many viewers are attached right now.
    pub fn viewers(&self) -> usize {
        self.frames.receiver_count()
    }
}

/// The hubs of all sandboxes.
#[derive(Debug, Default)]
pub struct Hubs {
    map: Mutex<HashMap<String, Arc<Hub>>>,
}

/// Where and how to reach one guest's encoder.
#[derive(Debug, Clone)]
pub struct GuestStream {
    pub sandbox_id: String,
    pub agent: SocketAddr,
    pub token: String,
    /// Frames per second the guest captures and encodes.
    pub fps: u32,
}

impl Hubs {
    /// The sandbox's hub, started if there is none (or the last one ended).
    pub fn join(self: &Arc<Self>, guest: GuestStream) -> Arc<Hub> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hub) = map.get(&guest.sandbox_id) {
            if !matches!(*hub.state.borrow(), HubState::Ended(_)) {
                return hub.clone();
            }
        }
        let (frames, _) = broadcast::channel(FANOUT_DEPTH);
        let (info_tx, info) = watch::channel(None);
        let (cursor_tx, cursor) = watch::channel(None);
        let (clipboard_tx, clipboard) = watch::channel(None);
        let (state_tx, state) = watch::channel(HubState::Starting);
        let (control, control_rx) = mpsc::channel(256);
        let hub = Arc::new(Hub {
            sandbox_id: guest.sandbox_id.clone(),
            frames: frames.clone(),
            info,
            cursor,
            clipboard,
            state,
            control,
            bitrates: Mutex::default(),
        });
        map.insert(guest.sandbox_id.clone(), hub.clone());
        let hubs = Arc::downgrade(self);
        let me = Arc::downgrade(&hub);
        tokio::spawn(async move {
            let id = guest.sandbox_id.clone();
            let to_viewers = ToViewers {
                frames,
                info: info_tx,
                cursor: cursor_tx,
                clipboard: clipboard_tx,
            };
            let reason = run(guest, to_viewers, &state_tx, control_rx).await;
            tracing::info!(sandbox = %id, %reason, "video link to the guest closed");
            let _ = state_tx.send(HubState::Ended(reason));
            if let Some(hubs) = hubs.upgrade() {
                let mut map = hubs.map.lock().unwrap_or_else(|p| p.into_inner());
                if map
                    .get(&id)
                    .is_some_and(|h| std::ptr::eq(Arc::as_ptr(h), me.as_ptr()))
                {
                    map.remove(&id);
                }
            }
        });
        hub
    }

    /// Viewers attached to a sandbox's hub, `None` when it has no hub.
    pub fn viewers(&self, sandbox_id: &str) -> Option<usize> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(sandbox_id).map(|h| h.viewers())
    }

    /// Number of live hubs (tests, metrics).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the guest link hands to the viewers.
struct ToViewers {
    frames: broadcast::Sender<Arc<Frame>>,
    info: watch::Sender<Option<StreamInfo>>,
    cursor: watch::Sender<Option<Arc<CursorImage>>>,
    clipboard: watch::Sender<Option<Arc<str>>>,
}

/// Drive one guest link until it ends; returns why it ended.
async fn run(
    guest: GuestStream,
    to: ToViewers,
    state: &watch::Sender<HubState>,
    mut control: mpsc::Receiver<Control>,
) -> String {
    let ToViewers {
        frames,
        info,
        cursor,
        clipboard,
    } = to;
    let url = format!("ws://{}{STREAM_PATH}?fps={}", guest.agent, guest.fps);
    let mut req = match url.into_client_request() {
        Ok(r) => r,
        Err(e) => return format!("bad guest address: {e}"),
    };
    match format!("Bearer {}", guest.token).parse() {
        Ok(v) => {
            req.headers_mut().insert("Authorization", v);
        }
        Err(_) => return "the agent token is not a valid header".into(),
    }
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES + 64))
        .max_frame_size(Some(MAX_FRAME_BYTES + 64));
    let connect = tokio_tungstenite::connect_async_with_config(req, Some(config), true);
    let mut socket = match tokio::time::timeout(CONNECT_DEADLINE, connect).await {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => return format!("the guest's encoder refused the link: {e}"),
        Err(_) => return "the guest's encoder did not answer".into(),
    };
    let mut idle_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Binary(b))) if CursorImage::is_cursor(&b) => match CursorImage::decode(&b) {
                    Ok(c) => {
                        let _ = cursor.send(Some(Arc::new(c)));
                    }
                    Err(e) => return format!("the guest sent a bad cursor: {e}"),
                },
                Some(Ok(Message::Binary(b))) if is_clipboard(&b) => match decode_clipboard(&b) {
                    Ok(text) => {
                        let _ = clipboard.send(Some(text.into()));
                    }
                    Err(e) => return format!("the guest sent bad clipboard text: {e}"),
                },
                Some(Ok(Message::Binary(b))) => match VideoFrame::decode(&b) {
                    Ok(f) => {
                        let _ = frames.send(Arc::new(Frame {
                            pts_us: f.pts_us,
                            keyframe: f.keyframe,
                            data: f.data.into(),
                        }));
                    }
                    Err(e) => return format!("the guest sent a bad frame: {e}"),
                },
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<StreamInfo>(&t) {
                    Ok(i) => {
                        tracing::debug!(sandbox = %guest.sandbox_id, width = i.width, height = i.height, "guest stream info");
                        let _ = info.send(Some(i));
                        let _ = state.send(HubState::Streaming);
                    }
                    Err(e) => return format!("the guest sent bad stream info: {e}"),
                },
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(f) if !f.reason.is_empty() => format!("the guest closed the link: {}", f.reason),
                        _ => "the guest closed the link".into(),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("the link to the guest failed: {e}"),
                None => return "the guest closed the link".into(),
            },
            c = control.recv() => match c {
                Some(c) => {
                    if let Err(e) = socket.send(Message::Text(c.to_json().into())).await {
                        return format!("the link to the guest failed: {e}");
                    }
                }
                None => return "the hub was dropped".into(),
            },
            _ = tick.tick() => {
                if frames.receiver_count() == 0 {
                    let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= LINGER {
                        let _ = socket.close(None).await;
                        return "no viewers left".into();
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    }
}
