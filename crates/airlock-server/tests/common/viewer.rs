//! A test viewer: RFB over the relay's WebSocket, as a browser would speak it.

use airlock_server::relay::rfb::{self, FrameStats, Wire};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct WsViewer {
    pub socket: Socket,
    pending: Vec<u8>,
    pub close: Option<(u16, String)>,
}

impl Wire for WsViewer {
    async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        while self.pending.len() < buf.len() {
            match self.socket.next().await {
                Some(Ok(Message::Binary(b))) => self.pending.extend_from_slice(&b),
                Some(Ok(Message::Close(frame))) => {
                    self.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        }
        buf.copy_from_slice(&self.pending[..buf.len()]);
        self.pending.drain(..buf.len());
        Ok(())
    }
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.socket
            .send(Message::Binary(buf.to_vec().into()))
            .await
            .map_err(std::io::Error::other)
    }
}

/// Open the viewer socket; returns the socket and the subprotocol the server chose.
pub async fn connect(
    base: &str,
    id: &str,
    token: Option<&str>,
) -> Result<(WsViewer, Option<String>), String> {
    let url = format!(
        "{}/api/v1/sandboxes/{id}/vnc",
        base.replace("http://", "ws://")
    );
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "binary".parse().map_err(|_| "header")?,
    );
    if let Some(t) = token {
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {t}").parse().map_err(|_| "header")?,
        );
    }
    let (socket, resp) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| e.to_string())?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((
        WsViewer {
            socket,
            pending: Vec::new(),
            close: None,
        },
        proto,
    ))
}

/// The browser's side of the greeting: expect security type None only.
pub async fn greet(v: &mut WsViewer) -> Result<(), String> {
    let mut version = [0u8; 12];
    v.read_exact(&mut version)
        .await
        .map_err(|e| format!("version: {e} (close: {:?})", v.close))?;
    assert_eq!(&version, b"RFB 003.008\n");
    v.write_all(b"RFB 003.008\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut types = [0u8; 2];
    v.read_exact(&mut types).await.map_err(|e| e.to_string())?;
    assert_eq!(types, [1, 1], "the relay offers exactly one type: None");
    v.write_all(&[1]).await.map_err(|e| e.to_string())?;
    let mut result = [0u8; 4];
    v.read_exact(&mut result).await.map_err(|e| e.to_string())?;
    assert_eq!(result, [0, 0, 0, 0]);
    Ok(())
}

/// Connect through the relay and read one full frame.
pub async fn frame(base: &str, id: &str) -> Result<FrameStats, String> {
    let (mut v, proto) = connect(base, id, None).await?;
    assert_eq!(
        proto.as_deref(),
        Some("binary"),
        "the relay echoes the binary subprotocol"
    );
    greet(&mut v).await?;
    rfb::read_frame(&mut v)
        .await
        .map_err(|e| format!("{e} (close: {:?})", v.close))
}

/// Read until the server closes; the close code and reason.
pub async fn close_code(v: &mut WsViewer) -> Option<(u16, String)> {
    while let Some(msg) = v.socket.next().await {
        if let Ok(Message::Close(frame)) = msg {
            return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
        }
    }
    v.close.clone()
}
