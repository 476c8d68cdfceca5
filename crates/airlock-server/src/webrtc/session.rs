//! One viewer's peer connection: signalling over the viewer's WebSocket, an
//! ICE-lite `str0m::Rtc` fed by the shared endpoint, video from the sandbox's
//! hub, and input from the data channel to the guest.
//!
//! Signalling messages (JSON text, one per WebSocket message):
//!
//! ```text
//! viewer → server  {"type":"offer","sdp":…}            once, first
//!                  {"type":"sample","input_to_photon_ms":…}   measured latency
//!   (clipboard text for the guest comes on the input data channel, input.rs)
//! server → viewer  {"type":"answer","sdp":…}
//!                  {"type":"info","width":…,"height":…}  display size
//!                  {"type":"stats","rtt_ms":…,"frames":…,"bytes":…}  every second
//!                  {"type":"cursor","width":…,"height":…,"xhot":…,"yhot":…,"rgba":…}
//!                      the guest's pointer picture (RGBA in base64) when it changes
//!                  {"type":"clipboard","text":…}   text copied in the guest
//!                  {"type":"clipboard_error","message":…}   the viewer's text was refused
//! ```
//! The session ends when either side closes the WebSocket, ICE disconnects,
//! or the guest's link ends; the close code says which (docs/ui.md).

use super::copies::Copies;
use super::endpoint::{Endpoint, Packet};
use super::hub::{Frame, Hub, HubState};
use super::input::{self, ClipboardParts, Incoming, InputOrder};
use super::StreamMetrics;
use crate::relay::gate::{ended as gate_ended, ViewGate};
use crate::relay::ws::close;
use airlock_proto::stream::Control;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Extension;
use str0m::{Event, IceConnectionState, IceCreds, Input, Output, Rtc};
use tokio::sync::broadcast;

/// A viewer that sent no offer by then is closed.
const OFFER_DEADLINE: Duration = Duration::from_secs(10);
/// ICE and DTLS must be done by then.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Most already-due timeouts one [`drain`] hands back to str0m before it lets
/// the runtime's timer take over (a bound, should str0m keep asking).
const MAX_DUE_TIMEOUTS: u32 = 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum FromViewer {
    Offer { sdp: String },
    Sample { input_to_photon_ms: f64 },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToViewer {
    Answer {
        sdp: String,
    },
    Info {
        width: u32,
        height: u32,
    },
    Stats {
        rtt_ms: Option<f64>,
        frames: u64,
        bytes: u64,
    },
    Cursor {
        width: u16,
        height: u16,
        xhot: u16,
        yhot: u16,
        /// Straight RGBA, rows top to bottom, in base64.
        rgba: String,
    },
    Clipboard {
        text: String,
    },
    ClipboardError {
        message: String,
    },
}

impl ToViewer {
    fn cursor(c: &airlock_proto::stream::CursorImage) -> Self {
        use base64::Engine as _;
        ToViewer::Cursor {
            width: c.width,
            height: c.height,
            xhot: c.xhot,
            yhot: c.yhot,
            rgba: base64::engine::general_purpose::STANDARD.encode(&c.rgba),
        }
    }
}

async fn send_json(socket: &mut WebSocket, msg: &ToViewer) -> bool {
    let text = serde_json::to_string(msg).unwrap_or_default();
    socket.send(Message::Text(text.into())).await.is_ok()
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) -> u16 {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
    code
}

/// Close code for a malformed offer or signalling message.
pub const BAD_SIGNAL: u16 = 4400;
/// Close code when ICE did not connect or disconnected.
pub const ICE_FAILED: u16 = 4504;

/// A new `Rtc` for one viewer: ICE-lite, H.264 only, zero playout delay;
/// with `bwe`, str0m estimates the viewer's bandwidth (bitrate.rs).
fn new_rtc(creds: IceCreds, bwe: bool) -> Rtc {
    let mut cfg = Rtc::builder()
        .set_ice_lite(true)
        .set_local_ice_credentials(creds)
        .clear_codecs()
        .enable_h264(true)
        .set_stats_interval(Some(STATS_EVERY))
        .set_send_buffer_video(2000);
    if bwe {
        cfg = cfg.enable_bwe(Some(str0m::bwe::Bitrate::kbps(u64::from(
            super::bitrate::MAX_KBIT,
        ))));
    }
    cfg.extension_map().set(12, Extension::PlayoutDelay);
    cfg.build(Instant::now())
}

/// Constrained baseline with packetization mode 1 is what the guest encodes;
/// any H.264 payload type decodes it, that one says so exactly.
fn pick_pt(rtc: &mut Rtc, mid: Mid) -> Option<Pt> {
    let writer = rtc.writer(mid)?;
    writer
        .payload_params()
        .filter(|p| p.spec().codec == Codec::H264)
        .max_by_key(|p| {
            let f = p.spec().format;
            (
                f.packetization_mode == Some(1),
                f.profile_level_id == Some(0x42e01f),
            )
        })
        .map(|p| p.pt())
}

#[derive(Debug)]
struct Sending {
    mid: Option<Mid>,
    pt: Option<Pt>,
    connected: bool,
    /// Frames are skipped until a keyframe after joining or falling behind.
    need_keyframe: bool,
    frames: u64,
    bytes: u64,
    rtt: Option<Duration>,
    /// Second copies of video packets (copies.rs).
    copies: Copies,
    /// The `input` channel: what arrives on it is the reliable copy.
    reliable_input: Option<ChannelId>,
    input: InputOrder,
    /// Parts of the viewer's clipboard text so far.
    clipboard: ClipboardParts,
    /// An error for the viewer, sent after the drain.
    notice: Option<String>,
    /// A shared viewer's gate (relay::gate); `None` for the owner.
    gate: Option<Arc<ViewGate>>,
    /// This viewer among the hub's, for its bitrate target.
    viewer: u64,
    /// Bandwidth estimates to the guest's bitrate (bitrate.rs).
    bitrate: super::bitrate::Controller,
}

/// Numbers viewers for the hub's bitrate targets.
static VIEWERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Run one viewer to its end; returns the close code sent.
pub async fn serve(
    socket: WebSocket,
    endpoint: Arc<Endpoint>,
    hub: Arc<Hub>,
    metrics: Arc<StreamMetrics>,
    stopping: broadcast::Receiver<String>,
) -> u16 {
    serve_gated(socket, endpoint, hub, metrics, stopping, None).await
}

/// [`serve`] for a shared viewer when `gate` is given: its input reaches the
/// guest only as [`input::shared_may_send`] says, it gets no clipboard text
/// without input, and it closes when the gate says so.
pub async fn serve_gated(
    mut socket: WebSocket,
    endpoint: Arc<Endpoint>,
    hub: Arc<Hub>,
    metrics: Arc<StreamMetrics>,
    mut stopping: broadcast::Receiver<String>,
    gate: Option<Arc<ViewGate>>,
) -> u16 {
    let offer = match tokio::time::timeout(OFFER_DEADLINE, read_offer(&mut socket)).await {
        Ok(Ok(offer)) => offer,
        Ok(Err(reason)) => return close_with(&mut socket, BAD_SIGNAL, &reason).await,
        Err(_) => return close_with(&mut socket, BAD_SIGNAL, "no offer within 10 s").await,
    };
    let creds = IceCreds::new();
    let (_route, mut packets) = endpoint.register(&creds.ufrag);
    let mut rtc = new_rtc(creds, endpoint.adaptive_bitrate());
    for c in endpoint.candidates() {
        rtc.add_local_candidate(c);
    }
    let answer = match rtc.sdp_api().accept_offer(offer) {
        Ok(a) => a,
        Err(e) => {
            return close_with(
                &mut socket,
                BAD_SIGNAL,
                &format!("the offer was refused: {e}"),
            )
            .await
        }
    };
    if !send_json(
        &mut socket,
        &ToViewer::Answer {
            sdp: answer.to_sdp_string(),
        },
    )
    .await
    {
        return close::NORMAL;
    }
    metrics.session_started();
    let viewer_id = VIEWERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let code = run(
        viewer_id,
        &mut socket,
        &endpoint,
        &hub,
        &metrics,
        &mut rtc,
        &mut packets,
        &mut stopping,
        gate,
    )
    .await;
    rtc.disconnect();
    hub.want_bitrate(viewer_id, None);
    metrics.session_ended();
    code
}

async fn read_offer(socket: &mut WebSocket) -> Result<SdpOffer, String> {
    loop {
        match socket.recv().await {
            Some(Ok(Message::Text(t))) => {
                return match serde_json::from_str::<FromViewer>(&t) {
                    Ok(FromViewer::Offer { sdp }) => SdpOffer::from_sdp_string(&sdp)
                        .map_err(|e| format!("the offer is not valid SDP: {e}")),
                    Ok(_) => Err("the first message must be the offer".into()),
                    Err(e) => Err(format!("not a signalling message: {e}")),
                };
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(_)) => return Err("signalling messages are JSON text".into()),
            Some(Err(e)) => return Err(format!("the viewer's socket failed: {e}")),
            None => return Err("the viewer left".into()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    viewer: u64,
    socket: &mut WebSocket,
    endpoint: &Endpoint,
    hub: &Hub,
    metrics: &StreamMetrics,
    rtc: &mut Rtc,
    packets: &mut tokio::sync::mpsc::Receiver<Packet>,
    stopping: &mut broadcast::Receiver<String>,
    gate: Option<Arc<ViewGate>>,
) -> u16 {
    let mut frames = hub.subscribe();
    let mut hub_state = hub.state();
    let mut cursor = hub.cursor();
    // The picture the guest has now goes out first, then each change.
    cursor.mark_changed();
    let mut clipboard = hub.clipboard();
    let mut sending = Sending {
        mid: None,
        pt: None,
        connected: false,
        need_keyframe: true,
        frames: 0,
        bytes: 0,
        rtt: None,
        copies: Copies::new(endpoint.copies_kbps()),
        reliable_input: None,
        input: InputOrder::default(),
        clipboard: ClipboardParts::default(),
        notice: None,
        gate: gate.clone(),
        viewer,
        bitrate: super::bitrate::Controller::default(),
    };
    let started = Instant::now();
    let mut sent_info = None;
    let mut stats_tick = tokio::time::interval(STATS_EVERY);
    loop {
        // Drain everything the last mutation produced.
        let deadline = match drain(rtc, endpoint, hub, metrics, &mut sending) {
            Ok(d) => d,
            Err(code) => {
                return close_with(socket, code, "the connection to the viewer failed").await
            }
        };
        if let Some(message) = sending.notice.take() {
            if !send_json(socket, &ToViewer::ClipboardError { message }).await {
                return close::NORMAL;
            }
        }
        if !sending.connected && started.elapsed() > CONNECT_DEADLINE {
            return close_with(socket, ICE_FAILED, "the media connection did not come up").await;
        }
        if let Some(info) = hub.info() {
            if sent_info.as_ref() != Some(&(info.width, info.height)) {
                sent_info = Some((info.width, info.height));
                let msg = ToViewer::Info {
                    width: info.width,
                    height: info.height,
                };
                if !send_json(socket, &msg).await {
                    return close::NORMAL;
                }
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            p = packets.recv() => {
                let Some(p) = p else { return close_with(socket, close::RELAY_ERROR, "the media endpoint stopped").await };
                let Ok(contents) = p.data.as_slice().try_into() else { continue };
                let input = Input::Receive(p.at, Receive {
                    proto: p.proto,
                    source: p.source,
                    destination: p.destination,
                    contents,
                });
                if rtc.accepts(&input) {
                    let _ = rtc.handle_input(input);
                }
            }
            f = frames.recv() => match f {
                Ok(frame) => {
                    if write_frame(rtc, &mut sending, &frame) {
                        metrics.frame_sent(frame.data.len());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(sandbox = %hub.sandbox_id, skipped = n, "viewer fell behind; waiting for a keyframe");
                    sending.need_keyframe = true;
                    hub.control(Control::Keyframe);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return close_with(socket, close::GUEST_UNREACHABLE, "the sandbox's video stopped").await;
                }
            },
            Ok(()) = cursor.changed() => {
                let msg = cursor.borrow_and_update().as_deref().map(ToViewer::cursor);
                if let Some(msg) = msg {
                    if !send_json(socket, &msg).await {
                        return close::NORMAL;
                    }
                }
            }
            Ok(()) = clipboard.changed() => {
                let text = clipboard.borrow_and_update().as_deref().map(str::to_owned);
                let text = text.filter(|_| gate.as_ref().is_none_or(|g| g.input_allowed()));
                if let Some(text) = text {
                    if !send_json(socket, &ToViewer::Clipboard { text }).await {
                        return close::NORMAL;
                    }
                }
            }
            changed = hub_state.changed() => {
                let ended = match &*hub_state.borrow() {
                    HubState::Ended(reason) => Some(reason.clone()),
                    _ => None,
                };
                if changed.is_err() || ended.is_some() {
                    let reason = ended.unwrap_or_else(|| "the sandbox's video stopped".into());
                    return close_with(socket, close::GUEST_UNREACHABLE, &reason).await;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<FromViewer>(&t) {
                    Ok(FromViewer::Sample { input_to_photon_ms }) => metrics.input_to_photon("webrtc", input_to_photon_ms),
                    Ok(FromViewer::Offer { .. }) => {
                        return close_with(socket, BAD_SIGNAL, "renegotiation is not supported; reconnect").await;
                    }
                    Err(e) => return close_with(socket, BAD_SIGNAL, &format!("not a signalling message: {e}")).await,
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return close::NORMAL,
                Some(Ok(_)) => {}
            },
            why = gate_ended(gate.as_deref()) => {
                return close_with(socket, close::GONE, &why).await;
            }
            id = stopping.recv() => {
                if matches!(id.as_deref(), Ok(id) if id == hub.sandbox_id) {
                    return close_with(socket, close::GONE, "the sandbox is stopping").await;
                }
            }
            _ = stats_tick.tick() => {
                let msg = ToViewer::Stats {
                    rtt_ms: sending.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    frames: sending.frames,
                    bytes: sending.bytes,
                };
                if !send_json(socket, &msg).await {
                    return close::NORMAL;
                }
            }
            _ = tokio::time::sleep(wait) => {
                let _ = rtc.handle_input(Input::Timeout(Instant::now()));
            }
        }
    }
}

/// Poll until str0m has nothing more to say; returns its next deadline, or
/// the close code when the peer connection is over.
///
/// A deadline that is already due is handled here and now: str0m (without
/// congestion control) asks for a timeout between every two RTP packets it
/// sends, with a deadline in the past, and the runtime's timer would round
/// each of those up to its next millisecond tick — a frame of n packets would
/// leave over n − 1 ticks.
fn drain(
    rtc: &mut Rtc,
    endpoint: &Endpoint,
    hub: &Hub,
    metrics: &StreamMetrics,
    sending: &mut Sending,
) -> Result<Instant, u16> {
    let mut due = 0;
    loop {
        let out = match rtc.poll_output() {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(sandbox = %hub.sandbox_id, error = %e, "WebRTC session failed");
                return Err(close::RELAY_ERROR);
            }
        };
        match out {
            Output::Timeout(t) => {
                let now = Instant::now();
                if t > now || due == MAX_DUE_TIMEOUTS {
                    return Ok(t);
                }
                due += 1;
                let _ = rtc.handle_input(Input::Timeout(now));
            }
            Output::Transmit(t) => {
                endpoint.send(t.proto, t.destination, &t.contents);
                if t.proto == Protocol::Udp
                    && sending.copies.second_copy(Instant::now(), &t.contents)
                {
                    endpoint.send(t.proto, t.destination, &t.contents);
                    metrics.copy_sent(t.contents.len());
                }
            }
            Output::Event(e) => match e {
                Event::Connected => {
                    tracing::info!(sandbox = %hub.sandbox_id, "WebRTC viewer connected");
                    sending.connected = true;
                    sending.need_keyframe = true;
                    hub.control(Control::Keyframe);
                    // Probe up to what the encoder's top target needs (only
                    // with the estimator on; a no-op otherwise).
                    let top = f64::from(super::bitrate::MAX_KBIT) / super::bitrate::HEADROOM;
                    rtc.bwe()
                        .set_desired_bitrate(str0m::bwe::Bitrate::kbps(top as u64));
                }
                Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    return Err(ICE_FAILED);
                }
                Event::MediaAdded(m) if m.kind == MediaKind::Video => {
                    if matches!(m.direction, Direction::SendOnly | Direction::SendRecv) {
                        sending.mid = Some(m.mid);
                        sending.pt = pick_pt(rtc, m.mid);
                    }
                }
                Event::KeyframeRequest(_) => {
                    sending.need_keyframe = true;
                    hub.control(Control::Keyframe);
                }
                Event::ChannelOpen(id, label) if label == input::RELIABLE => {
                    sending.reliable_input = Some(id);
                }
                Event::ChannelData(d) => match std::str::from_utf8(&d.data)
                    .map_err(|e| e.to_string())
                    .and_then(input::parse)
                {
                    Ok((seq, incoming)) => {
                        let reliable = sending.reliable_input == Some(d.id);
                        let allowed = sending
                            .gate
                            .as_ref()
                            .is_none_or(|g| input::shared_may_send(&incoming, g.input_allowed()));
                        if sending.input.admit(seq, reliable) && allowed {
                            match incoming {
                                Incoming::Input(c) => {
                                    metrics.input_applied(reliable);
                                    hub.control(c);
                                }
                                Incoming::Clipboard(part) => match sending.clipboard.push(part) {
                                    Ok(Some(text)) => hub.control(Control::Clipboard { text }),
                                    Ok(None) => {}
                                    Err(e) => sending.notice = Some(e),
                                },
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(sandbox = %hub.sandbox_id, error = %e, "viewer input refused")
                    }
                },
                Event::EgressBitrateEstimate(
                    str0m::bwe::BweKind::Twcc { estimate, .. }
                    | str0m::bwe::BweKind::Remb { estimate, .. },
                ) => {
                    if let Some(kbit) = sending.bitrate.update(estimate.as_u64(), Instant::now()) {
                        tracing::debug!(sandbox = %hub.sandbox_id, kbit, "viewer's bitrate target");
                        hub.want_bitrate(sending.viewer, Some(kbit));
                    }
                }
                Event::PeerStats(s) => {
                    sending.rtt = s.rtt;
                    if let Some(rtt) = s.rtt {
                        metrics.rtt(rtt);
                    }
                }
                Event::Closed => return Err(close::NORMAL),
                _ => {}
            },
        }
    }
}

/// Hand one frame to str0m; whether it was sent.
fn write_frame(rtc: &mut Rtc, sending: &mut Sending, frame: &Frame) -> bool {
    let (Some(mid), Some(pt)) = (sending.mid, sending.pt) else {
        return false;
    };
    if !sending.connected {
        return false;
    }
    if sending.need_keyframe && !frame.keyframe {
        return false;
    }
    sending.need_keyframe = false;
    let Some(writer) = rtc.writer(mid) else {
        return false;
    };
    let rtp_time = MediaTime::from_90khz(frame.pts_us.wrapping_mul(9) / 100);
    let zero = MediaTime::from_millis(0);
    match writer
        .playout_delay(zero, zero)
        .write(pt, Instant::now(), rtp_time, frame.data.clone())
    {
        Ok(()) => {
            sending.frames += 1;
            sending.bytes += frame.data.len() as u64;
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "a frame was not sent");
            false
        }
    }
}
