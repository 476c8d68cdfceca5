//! Byte pipes the benchmarks speak RFB over: a WebSocket carrying binary
//! messages (what a browser does through the relay or websockify) and plain TCP.

use airlock_server::relay::rfb::Wire;
use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client; reads are reassembled from whatever message sizes the
/// far side chose.
#[derive(Debug)]
pub struct WsClient {
    socket: Socket,
    pending: Vec<u8>,
    start: usize,
    /// The close frame, if the server sent one.
    pub close: Option<(u16, String)>,
}

impl WsClient {
    /// Connect offering subprotocol `binary`, as noVNC does.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut req = url.into_client_request().context("viewer URL")?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "binary".parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(req)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        if let Ok(tcp) = match socket.get_ref() {
            tokio_tungstenite::MaybeTlsStream::Plain(s) => Ok(s),
            _ => Err(()),
        } {
            let _ = tcp.set_nodelay(true);
        }
        Ok(WsClient {
            socket,
            pending: Vec::new(),
            start: 0,
            close: None,
        })
    }

    /// The next binary payload as it arrived (for counting bulk bytes).
    pub async fn next_chunk(&mut self) -> std::io::Result<usize> {
        if self.start < self.pending.len() {
            let n = self.pending.len() - self.start;
            self.pending.clear();
            self.start = 0;
            return Ok(n);
        }
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Binary(b))) => return Ok(b.len()),
                Some(Ok(Message::Close(frame))) => {
                    self.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

impl Wire for WsClient {
    async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        while self.pending.len() - self.start < buf.len() {
            match self.socket.next().await {
                Some(Ok(Message::Binary(b))) => {
                    if self.start == self.pending.len() {
                        self.pending.clear();
                        self.start = 0;
                    }
                    self.pending.extend_from_slice(&b);
                }
                Some(Ok(Message::Close(frame))) => {
                    self.close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        }
        buf.copy_from_slice(&self.pending[self.start..self.start + buf.len()]);
        self.start += buf.len();
        if self.start == self.pending.len() {
            self.pending.clear();
            self.start = 0;
        }
        Ok(())
    }

    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.socket
            .send(Message::Binary(buf.to_vec().into()))
            .await
            .map_err(std::io::Error::other)
    }
}

/// The browser's half of the relay's greeting: security type None only.
pub async fn greet_none<W: Wire>(w: &mut W) -> Result<()> {
    let mut version = [0u8; 12];
    w.read_exact(&mut version).await.context("RFB version")?;
    anyhow::ensure!(version.starts_with(b"RFB 003."), "not RFB: {version:?}");
    w.write_all(b"RFB 003.008\n").await?;
    let mut types = [0u8; 2];
    w.read_exact(&mut types).await.context("security types")?;
    anyhow::ensure!(types == [1, 1], "expected only None, got {types:?}");
    w.write_all(&[1]).await?;
    let mut result = [0u8; 4];
    w.read_exact(&mut result).await.context("security result")?;
    anyhow::ensure!(result == [0; 4], "security result {result:?}");
    Ok(())
}
