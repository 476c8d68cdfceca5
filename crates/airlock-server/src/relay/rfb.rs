//! The client side of RFB 3.8 that the control plane needs: the security
//! handshake with a guest's VNC server, the relay's server-side greeting for the
//! browser, and one full framebuffer read to tell a desktop from a blank screen.

use airlock_proto::vncauth;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    #[error("VNC connection failed")]
    Io(#[from] std::io::Error),
    #[error("the VNC server speaks {0:?}, not RFB 3.x")]
    Version(String),
    #[error("the VNC server refused the connection: {0}")]
    Refused(String),
    #[error("the VNC server offers no security type the relay supports (offered {0:?})")]
    NoSecurityType(Vec<u8>),
    #[error("VNC authentication failed: {0}")]
    AuthFailed(String),
    #[error("unexpected RFB message type {0}")]
    Unexpected(u8),
    #[error("the VNC server's framebuffer is {0}x{1}, too large to read")]
    TooLarge(u16, u16),
    /// The guest sent something no honest VNC server sends; reading stops.
    #[error("the VNC server sent a malformed frame: {0}")]
    Malformed(String),
}

/// Bounds on what one frame read accepts from a guest, which may be hostile:
/// a text (desktop name, clipboard) longer than this is refused...
const MAX_TEXT: u32 = 1 << 20;
/// ...as are more than this many messages (bells, clipboard) before the frame...
const MAX_MESSAGES_BEFORE_FRAME: u32 = 16;
/// ...and colours past this many are not told apart (the desktop test needs
/// a hundred), so the count's memory stays small whatever the pixels are.
const MAX_COLOURS: usize = 4096;

const VERSION_38: &[u8; 12] = b"RFB 003.008\n";
const SECURITY_NONE: u8 = 1;
const SECURITY_VNC_AUTH: u8 = 2;

async fn read_reason<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, RfbError> {
    let len = s.read_u32().await? as usize;
    let mut buf = vec![0u8; len.min(4096)];
    s.read_exact(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Authenticate to a guest's VNC server, up to (not including) ClientInit.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: &str,
) -> Result<(), RfbError> {
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    if !version.starts_with(b"RFB 003.") {
        return Err(RfbError::Version(
            String::from_utf8_lossy(&version).trim().to_owned(),
        ));
    }
    s.write_all(VERSION_38).await?;
    let count = s.read_u8().await?;
    if count == 0 {
        return Err(RfbError::Refused(read_reason(s).await?));
    }
    let mut types = vec![0u8; usize::from(count)];
    s.read_exact(&mut types).await?;
    let chosen = if types.contains(&SECURITY_VNC_AUTH) {
        SECURITY_VNC_AUTH
    } else if types.contains(&SECURITY_NONE) {
        SECURITY_NONE
    } else {
        return Err(RfbError::NoSecurityType(types));
    };
    s.write_u8(chosen).await?;
    if chosen == SECURITY_VNC_AUTH {
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge).await?;
        s.write_all(&vncauth::challenge_response(password, &challenge))
            .await?;
    }
    if s.read_u32().await? != 0 {
        return Err(RfbError::AuthFailed(read_reason(s).await?));
    }
    Ok(())
}

/// A byte pipe the browser-side greeting can run over: a TCP-like stream in
/// tests, WebSocket messages in the relay.
pub trait Wire {
    fn read_exact(
        &mut self,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    fn write_all(
        &mut self,
        buf: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

/// [`Wire`] over any byte stream.
#[derive(Debug)]
pub struct IoWire<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Wire for IoWire<S> {
    async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        AsyncReadExt::read_exact(&mut self.0, buf).await.map(|_| ())
    }
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, buf).await?;
        self.0.flush().await
    }
}

/// Greet a browser as a VNC server that needs no authentication (the relay has
/// already authenticated to the guest). Handles RFB 3.3, 3.7 and 3.8 clients.
pub async fn serve_none_security<W: Wire>(w: &mut W) -> Result<(), RfbError> {
    w.write_all(VERSION_38).await?;
    let mut version = [0u8; 12];
    w.read_exact(&mut version).await?;
    match &version {
        b"RFB 003.003\n" => {
            w.write_all(&u32::from(SECURITY_NONE).to_be_bytes()).await?;
        }
        v if v.starts_with(b"RFB 003.") => {
            w.write_all(&[1, SECURITY_NONE]).await?;
            let mut choice = [0u8; 1];
            w.read_exact(&mut choice).await?;
            if choice[0] != SECURITY_NONE {
                let reason = b"only security type None is offered";
                let mut msg = 1u32.to_be_bytes().to_vec();
                msg.extend_from_slice(&(reason.len() as u32).to_be_bytes());
                msg.extend_from_slice(reason);
                w.write_all(&msg).await?;
                return Err(RfbError::NoSecurityType(vec![choice[0]]));
            }
            w.write_all(&0u32.to_be_bytes()).await?;
        }
        other => {
            return Err(RfbError::Version(
                String::from_utf8_lossy(other).trim().to_owned(),
            ))
        }
    }
    Ok(())
}

/// What one full framebuffer looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameStats {
    pub width: u16,
    pub height: u16,
    pub distinct_colours: usize,
    /// Share of pixels (0..=1000, per mille) taken by the most common colour.
    pub dominant_per_mille: u32,
}

impl FrameStats {
    /// A desktop with windows on it, not a blank or single-colour screen. A
    /// fresh Xvnc is one colour; a terminal alone is a few dozen shades; with
    /// Chromium's window painted there are hundreds (white still covers ~96%).
    pub fn looks_like_desktop(&self) -> bool {
        self.distinct_colours >= 100 && self.dominant_per_mille < 990
    }
}

async fn wire_u8<W: Wire>(w: &mut W) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    w.read_exact(&mut b).await?;
    Ok(b[0])
}

async fn wire_u16<W: Wire>(w: &mut W) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    w.read_exact(&mut b).await?;
    Ok(u16::from_be_bytes(b))
}

/// A length-prefixed text, read whole (so the stream stays in step) but
/// kept only up to 4 KiB; longer than [`MAX_TEXT`] is refused.
async fn wire_string<W: Wire>(w: &mut W, what: &str) -> Result<String, RfbError> {
    let mut len = [0u8; 4];
    w.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > MAX_TEXT {
        return Err(RfbError::Malformed(format!(
            "a {what} of {len} bytes (at most {MAX_TEXT})"
        )));
    }
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        w.read_exact(&mut chunk[..n]).await?;
        if kept.len() < chunk.len() {
            let room = chunk.len() - kept.len();
            kept.extend_from_slice(&chunk[..n.min(room)]);
        }
        left -= n;
    }
    Ok(String::from_utf8_lossy(&kept).into_owned())
}

/// After the security handshake: ClientInit, then one full, raw-encoded frame.
pub async fn read_frame<W: Wire>(s: &mut W) -> Result<FrameStats, RfbError> {
    s.write_all(&[1]).await?; // shared
    let width = wire_u16(s).await?;
    let height = wire_u16(s).await?;
    let mut server_format = [0u8; 16];
    s.read_exact(&mut server_format).await?;
    let _name = wire_string(s, "desktop name").await?;
    if u32::from(width) * u32::from(height) > 8192 * 8192 {
        return Err(RfbError::TooLarge(width, height));
    }
    // SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits each;
    // SetEncodings: raw only; FramebufferUpdateRequest: whole screen.
    let mut msg: Vec<u8> = vec![
        0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ];
    msg.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0, 0]);
    msg.extend_from_slice(&[3, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&width.to_be_bytes());
    msg.extend_from_slice(&height.to_be_bytes());
    s.write_all(&msg).await?;

    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    let mut pixels: u64 = 0;
    let screen = u64::from(width) * u64::from(height);
    let mut messages = 0;
    loop {
        messages += 1;
        if messages > MAX_MESSAGES_BEFORE_FRAME {
            return Err(RfbError::Malformed(format!(
                "more than {MAX_MESSAGES_BEFORE_FRAME} messages before the first frame"
            )));
        }
        match wire_u8(s).await? {
            0 => {
                wire_u8(s).await?;
                let rects = wire_u16(s).await?;
                for _ in 0..rects {
                    let mut header = [0u8; 12];
                    s.read_exact(&mut header).await?;
                    let x = u16::from_be_bytes([header[0], header[1]]);
                    let y = u16::from_be_bytes([header[2], header[3]]);
                    let w = u16::from_be_bytes([header[4], header[5]]);
                    let h = u16::from_be_bytes([header[6], header[7]]);
                    let encoding =
                        i32::from_be_bytes([header[8], header[9], header[10], header[11]]);
                    if encoding != 0 {
                        // Pseudo-encodings carry no pixels we asked for.
                        continue;
                    }
                    if u32::from(x) + u32::from(w) > u32::from(width)
                        || u32::from(y) + u32::from(h) > u32::from(height)
                    {
                        return Err(RfbError::Malformed(format!(
                            "a {w}x{h} rectangle at {x},{y} outside the {width}x{height} screen"
                        )));
                    }
                    pixels += u64::from(w) * u64::from(h);
                    if pixels > screen {
                        return Err(RfbError::Malformed(format!(
                            "more pixels than the {width}x{height} screen holds"
                        )));
                    }
                    let mut row = vec![0u8; usize::from(w) * 4];
                    for _ in 0..h {
                        s.read_exact(&mut row).await?;
                        for px in row.chunks_exact(4) {
                            let colour = u32::from_le_bytes([px[0], px[1], px[2], 0]);
                            if let Some(n) = counts.get_mut(&colour) {
                                *n += 1;
                            } else if counts.len() < MAX_COLOURS {
                                counts.insert(colour, 1);
                            }
                        }
                    }
                }
                break;
            }
            2 => {} // bell
            3 => {
                let mut pad = [0u8; 3];
                s.read_exact(&mut pad).await?;
                let _ = wire_string(s, "clipboard text").await?;
            }
            other => return Err(RfbError::Unexpected(other)),
        }
    }
    let dominant = counts.values().copied().max().unwrap_or(0);
    Ok(FrameStats {
        width,
        height,
        distinct_colours: counts.len(),
        dominant_per_mille: (u64::from(dominant) * 1000)
            .checked_div(pixels)
            .map_or(1000, |v| v as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny RFB server good enough to test the handshakes against.
    async fn fake_server(
        mut s: tokio::io::DuplexStream,
        password: &'static str,
    ) -> Result<(), RfbError> {
        s.write_all(VERSION_38).await?;
        let mut v = [0u8; 12];
        s.read_exact(&mut v).await?;
        s.write_all(&[1, SECURITY_VNC_AUTH]).await?;
        assert_eq!(s.read_u8().await?, SECURITY_VNC_AUTH);
        let challenge = [9u8; 16];
        s.write_all(&challenge).await?;
        let mut resp = [0u8; 16];
        s.read_exact(&mut resp).await?;
        if resp == vncauth::challenge_response(password, &challenge) {
            s.write_u32(0).await?;
        } else {
            s.write_u32(1).await?;
            s.write_u32(14).await?;
            s.write_all(b"wrong password").await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn vnc_auth_succeeds_with_the_right_password() {
        let (mut client, server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(fake_server(server, "s3cret"));
        client_handshake(&mut client, "s3cret")
            .await
            .expect("handshake");
        srv.await.expect("join").expect("server");
    }

    #[tokio::test]
    async fn vnc_auth_reports_the_servers_reason() {
        let (mut client, server) = tokio::io::duplex(1024);
        let srv = tokio::spawn(fake_server(server, "right"));
        let err = client_handshake(&mut client, "wrong")
            .await
            .expect_err("must fail");
        assert!(err.to_string().contains("wrong password"), "{err}");
        let _ = srv.await;
    }

    #[tokio::test]
    async fn browser_side_offers_none() {
        let (relay, mut browser) = tokio::io::duplex(1024);
        let srv = tokio::spawn(async move { serve_none_security(&mut IoWire(relay)).await });
        let mut v = [0u8; 12];
        browser.read_exact(&mut v).await.expect("version");
        assert_eq!(&v, VERSION_38);
        browser.write_all(VERSION_38).await.expect("write");
        let mut types = [0u8; 2];
        browser.read_exact(&mut types).await.expect("types");
        assert_eq!(types, [1, SECURITY_NONE]);
        browser.write_u8(SECURITY_NONE).await.expect("choose");
        assert_eq!(browser.read_u32().await.expect("result"), 0);
        srv.await.expect("join").expect("ok");
    }

    /// Plays a guest's VNC server after the handshake: ServerInit for a
    /// `w`x`h` screen, then whatever `then` writes.
    async fn frame_from(w: u16, h: u16, then: Vec<u8>) -> Result<FrameStats, RfbError> {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let guest = tokio::spawn(async move {
            let mut init = Vec::new();
            init.extend_from_slice(&w.to_be_bytes());
            init.extend_from_slice(&h.to_be_bytes());
            init.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
            init.extend_from_slice(&4u32.to_be_bytes());
            init.extend_from_slice(b"test");
            let _ = server.write_all(&init).await;
            let _ = server.write_all(&then).await;
            // Drain what the client sends, until it hangs up.
            let mut sink = [0u8; 256];
            while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_frame(&mut IoWire(client)),
        )
        .await
        .expect("read_frame must end (with a frame or an error), not wait");
        guest.abort();
        got
    }

    fn rect(x: u16, y: u16, w: u16, h: u16) -> Vec<u8> {
        let mut r = Vec::new();
        for v in [x, y, w, h] {
            r.extend_from_slice(&v.to_be_bytes());
        }
        r.extend_from_slice(&0i32.to_be_bytes());
        r
    }

    fn update(rects: &[(u16, u16, u16, u16)], pixel: impl Fn(usize) -> [u8; 4]) -> Vec<u8> {
        let mut m = vec![0, 0];
        m.extend_from_slice(&(rects.len() as u16).to_be_bytes());
        let mut i = 0;
        for &(x, y, w, h) in rects {
            m.extend(rect(x, y, w, h));
            for _ in 0..usize::from(w) * usize::from(h) {
                m.extend_from_slice(&pixel(i));
                i += 1;
            }
        }
        m
    }

    #[tokio::test]
    async fn a_frame_is_read_and_its_colours_counted() {
        let frame = update(&[(0, 0, 16, 16)], |i| [(i % 200) as u8, 0, 0, 0]);
        let stats = frame_from(16, 16, frame).await.expect("frame");
        assert_eq!(stats.distinct_colours, 200);
        assert!(stats.looks_like_desktop());
    }

    #[tokio::test]
    async fn a_hostile_guest_cannot_make_the_frame_read_unbounded() {
        // A rectangle reaching past the screen it declared.
        let err = frame_from(16, 16, update(&[(8, 0, 16, 16)], |_| [0; 4]))
            .await
            .expect_err("outside the screen");
        assert!(
            err.to_string().contains("outside the 16x16 screen"),
            "{err}"
        );
        // The same pixels sent again and again: more than one screen's worth.
        let err = frame_from(
            16,
            16,
            update(&[(0, 0, 16, 16), (0, 0, 16, 16)], |_| [0; 4]),
        )
        .await
        .expect_err("two screens' worth");
        assert!(err.to_string().contains("more pixels"), "{err}");
        // A clipboard text announced as 4 GiB.
        let mut cut = vec![3, 0, 0, 0];
        cut.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = frame_from(16, 16, cut).await.expect_err("huge text");
        assert!(err.to_string().contains("clipboard text"), "{err}");
        // Bells forever instead of a frame.
        let err = frame_from(16, 16, vec![2; 10_000])
            .await
            .expect_err("bell flood");
        assert!(err.to_string().contains("messages before"), "{err}");
        // Every pixel a new colour: counted up to the cap, still a desktop.
        let (w, h) = (1024u16, 64u16);
        let stats = frame_from(
            w,
            h,
            update(&[(0, 0, w, h)], |i| {
                let b = (i as u32).to_le_bytes();
                [b[0], b[1], b[2], 0]
            }),
        )
        .await
        .expect("many colours");
        assert_eq!(stats.distinct_colours, MAX_COLOURS);
    }

    #[tokio::test]
    async fn a_long_clipboard_text_is_skipped_whole() {
        // 10 KiB of clipboard before the frame: skipped, and the frame after
        // it still parses (the stream stays in step).
        let mut m = vec![3, 0, 0, 0];
        m.extend_from_slice(&10_240u32.to_be_bytes());
        m.extend(std::iter::repeat_n(b'x', 10_240));
        m.extend(update(&[(0, 0, 16, 16)], |i| [(i % 150) as u8, 1, 0, 0]));
        let stats = frame_from(16, 16, m).await.expect("frame after the text");
        assert_eq!(stats.distinct_colours, 150);
    }

    #[test]
    fn blank_frames_are_not_desktops() {
        let blank = FrameStats {
            width: 10,
            height: 10,
            distinct_colours: 1,
            dominant_per_mille: 1000,
        };
        assert!(!blank.looks_like_desktop());
        let desk = FrameStats {
            width: 10,
            height: 10,
            distinct_colours: 622,
            dominant_per_mille: 962,
        };
        assert!(
            desk.looks_like_desktop(),
            "a real desktop: xterm and a new Chromium tab"
        );
        let terminal_only = FrameStats {
            width: 10,
            height: 10,
            distinct_colours: 40,
            dominant_per_mille: 700,
        };
        assert!(!terminal_only.looks_like_desktop());
    }
}
