//! Joins a browser's WebSocket to a guest's VNC server. Bounded both ways: the
//! relay reads from one side only when the other side has taken the previous
//! chunk, and a viewer that cannot keep up is closed on purpose (4408) instead
//! of being buffered without end. RFB goes in binary messages; the viewer page
//! may add text messages of its own ([`ViewerReport`]), which never reach the
//! guest.

use super::gate::{ended as gate_ended, ViewGate};
use super::readonly::ClientFilter;
use super::rfb::{self, Wire};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

/// Close codes the viewer acts on (documented in docs/ui.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const NOT_FOUND: u16 = 4404;
    pub const TOO_SLOW: u16 = 4408;
    pub const NOT_READY: u16 = 4409;
    pub const GONE: u16 = 4410;
    /// The control plane is restarting: reconnect shortly.
    pub const RESTARTING: u16 = 1012;
    pub const GUEST_UNREACHABLE: u16 = 4502;
    /// The server does not offer WebRTC (the viewer uses noVNC).
    pub const NO_WEBRTC: u16 = 4503;
    pub const RELAY_ERROR: u16 = 1011;
}

const CHUNK: usize = 128 * 1024;
const PING_EVERY: Duration = Duration::from_secs(20);
const PONG_DEADLINE: Duration = Duration::from_secs(45);
/// How long one frame may wait for the viewer before it counts as too slow.
const SEND_DEADLINE: Duration = Duration::from_secs(10);
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// What a viewer page may say besides RFB, as a text message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ViewerReport {
    /// One input-to-photon estimate of the page (web/latency.js).
    Sample { input_to_photon_ms: f64 },
}

/// The longest text message read as a report (one is about 50 bytes).
const MAX_REPORT: usize = 1024;

/// Where one viewer's reports go.
pub type Reports = Box<dyn Fn(ViewerReport) + Send + Sync>;

impl ViewerReport {
    /// The report in a text message; `None` for anything else, which the
    /// relay ignores (a page's text is not logged, only its length), and for
    /// anything longer than a report can be, unread.
    pub fn parse(text: &str) -> Option<ViewerReport> {
        if text.len() > MAX_REPORT {
            tracing::debug!(
                bytes = text.len(),
                "ignoring a long text message from a viewer"
            );
            return None;
        }
        match serde_json::from_str(text) {
            Ok(r) => Some(r),
            Err(_) => {
                tracing::debug!(bytes = text.len(), "ignoring a viewer's text message");
                None
            }
        }
    }
}

/// What the relay was given for one viewer.
#[derive(Debug)]
pub struct Target {
    pub sandbox_id: String,
    pub vnc: SocketAddr,
    pub password: String,
}

/// Close the socket with a code and reason the viewer can show.
pub async fn close_with(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// The browser side of the greeting, over WebSocket messages.
struct WsWire<'a> {
    socket: &'a mut WebSocket,
    pending: BytesMut,
}

impl Wire for WsWire<'_> {
    async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        while self.pending.len() < buf.len() {
            match self.socket.recv().await {
                Some(Ok(Message::Binary(data))) => self.pending.extend_from_slice(&data),
                // A page's reports are not RFB; none is due before the greeting ends.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_))) => {}
                Some(Ok(_)) | None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        buf.copy_from_slice(&self.pending[..buf.len()]);
        self.pending.advance(buf.len());
        Ok(())
    }
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.socket
            .send(Message::Binary(buf.to_vec().into()))
            .await
            .map_err(std::io::Error::other)
    }
}

/// Run one viewer until either side ends. Returns the close code sent.
pub async fn relay(
    socket: WebSocket,
    target: Target,
    stopping: broadcast::Receiver<String>,
    reports: Reports,
) -> u16 {
    relay_gated(socket, target, stopping, reports, None).await
}

/// [`relay`] for a shared viewer when `gate` is given: its messages pass
/// [`ClientFilter`] and it closes when the gate says so.
pub async fn relay_gated(
    mut socket: WebSocket,
    target: Target,
    mut stopping: broadcast::Receiver<String>,
    reports: Reports,
    gate: Option<Arc<ViewGate>>,
) -> u16 {
    let connect = tokio::time::timeout(
        HANDSHAKE_DEADLINE,
        tokio::net::TcpStream::connect(target.vnc),
    )
    .await;
    let mut tcp = match connect {
        Ok(Ok(tcp)) => tcp,
        _ => {
            close_with(
                socket,
                close::GUEST_UNREACHABLE,
                "the sandbox's display is not answering",
            )
            .await;
            return close::GUEST_UNREACHABLE;
        }
    };
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(
        HANDSHAKE_DEADLINE,
        rfb::client_handshake(&mut tcp, &target.password),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(sandbox = %target.sandbox_id, error = %e, "VNC handshake with the guest failed");
            close_with(
                socket,
                close::GUEST_UNREACHABLE,
                "the sandbox's display refused the relay",
            )
            .await;
            return close::GUEST_UNREACHABLE;
        }
        Err(_) => {
            close_with(
                socket,
                close::GUEST_UNREACHABLE,
                "the sandbox's display did not answer in time",
            )
            .await;
            return close::GUEST_UNREACHABLE;
        }
    }
    let mut wire = WsWire {
        socket: &mut socket,
        pending: BytesMut::new(),
    };
    match tokio::time::timeout(HANDSHAKE_DEADLINE, rfb::serve_none_security(&mut wire)).await {
        Ok(Ok(())) => {}
        _ => {
            close_with(
                socket,
                close::NORMAL,
                "the viewer did not complete the RFB greeting",
            )
            .await;
            return close::NORMAL;
        }
    }
    let mut leftover = std::mem::take(&mut wire.pending).to_vec();
    let mut filter = gate.as_ref().map(|_| ClientFilter::new());
    if let (Some(f), Some(g)) = (filter.as_mut(), gate.as_ref()) {
        let mut kept = Vec::new();
        if f.feed(&leftover, g.input_allowed(), &mut kept).is_err() {
            close_with(
                socket,
                close::NORMAL,
                "a message not allowed on a shared view",
            )
            .await;
            return close::NORMAL;
        }
        leftover = kept;
    }
    if !leftover.is_empty() && tcp.write_all(&leftover).await.is_err() {
        close_with(
            socket,
            close::GUEST_UNREACHABLE,
            "the sandbox's display closed the connection",
        )
        .await;
        return close::GUEST_UNREACHABLE;
    }
    let shared = gate.zip(filter);
    pump(
        socket,
        tcp,
        &target.sandbox_id,
        &mut stopping,
        reports,
        shared,
    )
    .await
}

async fn pump(
    socket: WebSocket,
    tcp: tokio::net::TcpStream,
    id: &str,
    stopping: &mut broadcast::Receiver<String>,
    reports: Reports,
    mut shared: Option<(Arc<ViewGate>, ClientFilter)>,
) -> u16 {
    let gate = shared.as_ref().map(|(g, _)| g.clone());
    let (mut sink, mut stream) = socket.split();
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let last_pong = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));

    // Browser → guest. Ends when the browser goes away or the guest stops reading.
    let pong_seen = last_pong.clone();
    let sandbox = id.to_owned();
    let mut inbound = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(mut data) => {
                    if let Some((gate, filter)) = shared.as_mut() {
                        let mut kept = Vec::new();
                        if let Err(e) = filter.feed(&data, gate.input_allowed(), &mut kept) {
                            tracing::info!(sandbox = %sandbox, error = %e, "a shared viewer sent a refused message");
                            return;
                        }
                        data = kept.into();
                    }
                    let write =
                        tokio::time::timeout(SEND_DEADLINE, tcp_write.write_all(&data)).await;
                    if !matches!(write, Ok(Ok(()))) {
                        return;
                    }
                }
                Message::Pong(_) => {
                    if let Ok(mut t) = pong_seen.lock() {
                        *t = Instant::now();
                    }
                }
                Message::Text(text) => {
                    if let Some(report) = ViewerReport::parse(&text) {
                        reports(report);
                    }
                }
                Message::Close(_) => return,
                Message::Ping(_) => {}
            }
        }
    });

    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let ended_reason;
    let (code, reason): (u16, &str) = loop {
        tokio::select! {
            read = tcp_read.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => break (close::GUEST_UNREACHABLE, "the sandbox's display closed the connection"),
                Ok(_) => {
                    // Hand the bytes over without copying; the next read gets
                    // fresh room once this chunk's memory is spoken for.
                    let chunk = buf.split().freeze();
                    if buf.capacity() < CHUNK / 4 {
                        buf.reserve(CHUNK);
                    }
                    let send = tokio::time::timeout(SEND_DEADLINE, sink.send(Message::Binary(chunk))).await;
                    match send {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break (close::NORMAL, ""),
                        Err(_) => break (close::TOO_SLOW, "the viewer could not keep up and was dropped"),
                    }
                }
            },
            _ = ping.tick() => {
                let silent = last_pong.lock().map(|t| t.elapsed() > PONG_DEADLINE).unwrap_or(false);
                if silent {
                    break (close::TOO_SLOW, "the viewer stopped answering pings");
                }
                let send = tokio::time::timeout(SEND_DEADLINE, sink.send(Message::Ping(Vec::new().into()))).await;
                if !matches!(send, Ok(Ok(()))) {
                    break (close::TOO_SLOW, "the viewer could not keep up and was dropped");
                }
            },
            stopped = stopping.recv() => match stopped {
                Ok(stopped_id) if stopped_id == id => break (close::GONE, "the sandbox is stopping"),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break (close::RESTARTING, "the control plane is restarting"),
            },
            _ = &mut inbound => break (close::NORMAL, ""),
            why = gate_ended(gate.as_deref()) => {
                ended_reason = why;
                break (close::GONE, ended_reason.as_str());
            }
        }
    };
    inbound.abort();
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_reports_samples_and_anything_else_is_ignored() {
        assert_eq!(
            ViewerReport::parse(r#"{"type":"sample","input_to_photon_ms":17.5}"#),
            Some(ViewerReport::Sample {
                input_to_photon_ms: 17.5
            })
        );
        for other in [
            "",
            "RFB 003.008",
            r#"{"type":"sample"}"#,
            r#"{"type":"sample","input_to_photon_ms":"fast"}"#,
            r#"{"type":"offer","sdp":"v=0"}"#,
        ] {
            assert_eq!(ViewerReport::parse(other), None, "{other:?}");
        }
        let padded = format!(
            r#"{{"type":"sample","input_to_photon_ms":17.5,"pad":"{}"}}"#,
            "x".repeat(MAX_REPORT)
        );
        assert_eq!(
            ViewerReport::parse(&padded),
            None,
            "too long to be a report"
        );
    }
}
