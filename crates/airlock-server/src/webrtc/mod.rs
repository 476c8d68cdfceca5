//! The viewer's fast path: the guest encodes its display as H.264, the control
//! plane carries it to browsers over WebRTC (str0m, ICE-lite), and input comes
//! back over a data channel. Guests stay on their private links: only the
//! control plane talks WebRTC. docs/webrtc.md describes the design.
//!
//! ```text
//!  guest encoder ──WS /v1/stream──▶ hub (one per sandbox) ──Arc<Frame>──▶ session per viewer
//!                                                                         │  str0m Rtc
//!  browser ◀──────── SRTP over the shared UDP socket / ICE-TCP ◀──────────┘ endpoint
//! ```

pub mod bitrate;
mod copies;
pub mod endpoint;
pub mod hub;
mod input;
pub mod session;

pub use endpoint::{Endpoint, EndpointConfig, TcpLimits};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: String,
}

/// Stream quality, per session and in total, for `/metrics`.
#[derive(Debug)]
pub struct StreamMetrics {
    sessions: Counter,
    active: Gauge,
    frames: Counter,
    bytes: Counter,
    copies: Counter,
    input: Family<ChannelLabel, Counter>,
    rtt: Histogram,
    input_to_photon: Family<PathLabel, Histogram>,
}

impl StreamMetrics {
    pub fn new(metrics: &crate::metrics::Metrics) -> Self {
        let m = StreamMetrics {
            sessions: Counter::default(),
            active: Gauge::default(),
            frames: Counter::default(),
            bytes: Counter::default(),
            copies: Counter::default(),
            input: Family::default(),
            rtt: Histogram::new([0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64]),
            input_to_photon: Family::new_with_constructor(|| {
                Histogram::new([
                    0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.11, 0.15, 0.2, 0.3, 0.5,
                ])
            }),
        };
        metrics.register(
            "webrtc_sessions",
            "WebRTC viewer sessions started",
            m.sessions.clone(),
        );
        metrics.register(
            "webrtc_sessions_active",
            "WebRTC viewer sessions open now",
            m.active.clone(),
        );
        metrics.register(
            "webrtc_frames_sent",
            "Video frames sent to WebRTC viewers (each viewer counts)",
            m.frames.clone(),
        );
        metrics.register(
            "webrtc_video_bytes_sent",
            "Encoded video bytes sent to WebRTC viewers, before RTP and SRTP",
            m.bytes.clone(),
        );
        metrics.register(
            "webrtc_copy_bytes_sent",
            "Bytes of second copies of video packets sent against packet loss",
            m.copies.clone(),
        );
        metrics.register(
            "webrtc_input_applied",
            "Viewer input messages applied, by the data channel whose copy came first",
            m.input.clone(),
        );
        metrics.register(
            "webrtc_rtt_seconds",
            "Round-trip time of WebRTC viewers (ICE/RTCP)",
            m.rtt.clone(),
        );
        metrics.register(
            "viewer_input_to_photon_seconds",
            "Input-to-photon latency samples reported by viewers, by path",
            m.input_to_photon.clone(),
        );
        m
    }

    fn session_started(&self) {
        self.sessions.inc();
        self.active.inc();
    }

    fn session_ended(&self) {
        self.active.dec();
    }

    fn frame_sent(&self, bytes: usize) {
        self.frames.inc();
        self.bytes.inc_by(bytes as u64);
    }

    fn copy_sent(&self, bytes: usize) {
        self.copies.inc_by(bytes as u64);
    }

    fn input_applied(&self, reliable: bool) {
        let channel = if reliable { "reliable" } else { "fast" };
        self.input
            .get_or_create(&ChannelLabel {
                channel: channel.to_owned(),
            })
            .inc();
    }

    fn rtt(&self, rtt: Duration) {
        self.rtt.observe(rtt.as_secs_f64());
    }

    /// Record one sample a viewer measured; nonsense is ignored.
    pub fn input_to_photon(&self, path: &str, ms: f64) {
        if ms.is_finite() && (0.0..60_000.0).contains(&ms) {
            self.input_to_photon
                .get_or_create(&PathLabel {
                    path: path.to_owned(),
                })
                .observe(ms / 1000.0);
        }
    }
}
