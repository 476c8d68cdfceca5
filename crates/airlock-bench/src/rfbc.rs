//! The RFB client side the key-press benchmark needs: VncAuth over any
//! [`Wire`], ClientInit, raw 32-bit pixels, small incremental update requests
//! and key events.

use airlock_server::relay::rfb::Wire;
use anyhow::{bail, Context, Result};

/// VncAuth (or None) as a client, over any wire; ends before ClientInit.
pub async fn vnc_auth<W: Wire>(w: &mut W, password: &str) -> Result<()> {
    let mut version = [0u8; 12];
    w.read_exact(&mut version).await.context("RFB version")?;
    anyhow::ensure!(version.starts_with(b"RFB 003."), "not RFB: {version:?}");
    w.write_all(b"RFB 003.008\n").await?;
    let mut n = [0u8; 1];
    w.read_exact(&mut n).await?;
    anyhow::ensure!(n[0] > 0, "the VNC server refused the connection");
    let mut types = vec![0u8; usize::from(n[0])];
    w.read_exact(&mut types).await?;
    if types.contains(&2) {
        w.write_all(&[2]).await?;
        let mut challenge = [0u8; 16];
        w.read_exact(&mut challenge).await?;
        w.write_all(&airlock_proto::vncauth::challenge_response(
            password, &challenge,
        ))
        .await?;
    } else if types.contains(&1) {
        w.write_all(&[1]).await?;
    } else {
        bail!("no usable security type in {types:?}");
    }
    let mut result = [0u8; 4];
    w.read_exact(&mut result).await?;
    anyhow::ensure!(result == [0; 4], "VNC authentication failed");
    Ok(())
}

/// A connected, initialised RFB session.
#[derive(Debug)]
pub struct Session<W> {
    pub wire: W,
    pub width: u16,
    pub height: u16,
}

/// One rectangle's worth of pixels: 0x00RRGGBB per pixel.
#[derive(Debug)]
pub struct Rect {
    pub x: u16,
    pub y: u16,
    pub w: u16,
    pub h: u16,
    pub pixels: Vec<u32>,
}

impl Rect {
    pub fn pixel(&self, x: u16, y: u16) -> Option<u32> {
        if x < self.x || y < self.y || x >= self.x + self.w || y >= self.y + self.h {
            return None;
        }
        let i = usize::from(y - self.y) * usize::from(self.w) + usize::from(x - self.x);
        self.pixels.get(i).copied()
    }
}

async fn u8_<W: Wire>(w: &mut W) -> Result<u8> {
    let mut b = [0u8; 1];
    w.read_exact(&mut b).await?;
    Ok(b[0])
}

async fn u16_<W: Wire>(w: &mut W) -> Result<u16> {
    let mut b = [0u8; 2];
    w.read_exact(&mut b).await?;
    Ok(u16::from_be_bytes(b))
}

async fn u32_<W: Wire>(w: &mut W) -> Result<u32> {
    let mut b = [0u8; 4];
    w.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

impl<W: Wire> Session<W> {
    /// ClientInit (shared), then 32 bpp little-endian true colour, raw only.
    pub async fn init(mut wire: W) -> Result<Self> {
        wire.write_all(&[1]).await?;
        let width = u16_(&mut wire).await?;
        let height = u16_(&mut wire).await?;
        let mut format = [0u8; 16];
        wire.read_exact(&mut format).await?;
        let name_len = u32_(&mut wire).await? as usize;
        let mut name = vec![0u8; name_len.min(4096)];
        wire.read_exact(&mut name).await?;
        let mut msg: Vec<u8> = vec![
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ];
        msg.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0, 0]);
        wire.write_all(&msg).await?;
        Ok(Session {
            wire,
            width,
            height,
        })
    }

    pub fn update_request(incremental: bool, x: u16, y: u16, w: u16, h: u16) -> Vec<u8> {
        let mut m = vec![3, u8::from(incremental)];
        for v in [x, y, w, h] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m
    }

    pub fn key(down: bool, keysym: u32) -> Vec<u8> {
        let mut m = vec![4, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        m
    }

    pub fn pointer(buttons: u8, x: u16, y: u16) -> Vec<u8> {
        let mut m = vec![5, buttons];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        m
    }

    pub async fn send(&mut self, msg: &[u8]) -> Result<()> {
        self.wire.write_all(msg).await?;
        Ok(())
    }

    /// Read server messages until one FramebufferUpdate arrives; its raw rectangles.
    pub async fn read_update(&mut self) -> Result<Vec<Rect>> {
        loop {
            match u8_(&mut self.wire).await? {
                0 => {
                    u8_(&mut self.wire).await?;
                    let n = u16_(&mut self.wire).await?;
                    let mut rects = Vec::new();
                    for _ in 0..n {
                        let x = u16_(&mut self.wire).await?;
                        let y = u16_(&mut self.wire).await?;
                        let w = u16_(&mut self.wire).await?;
                        let h = u16_(&mut self.wire).await?;
                        let enc = u32_(&mut self.wire).await? as i32;
                        if enc != 0 {
                            // A pseudo-encoding we did not ask for carries no pixels we can skip safely.
                            if enc < 0 {
                                continue;
                            }
                            bail!("unexpected encoding {enc}");
                        }
                        let mut raw = vec![0u8; usize::from(w) * usize::from(h) * 4];
                        self.wire.read_exact(&mut raw).await?;
                        let pixels = raw
                            .chunks_exact(4)
                            .map(|p| u32::from_le_bytes([p[0], p[1], p[2], 0]))
                            .collect();
                        rects.push(Rect { x, y, w, h, pixels });
                    }
                    return Ok(rects);
                }
                1 => {
                    u8_(&mut self.wire).await?;
                    u16_(&mut self.wire).await?;
                    let n = u16_(&mut self.wire).await?;
                    let mut skip = vec![0u8; usize::from(n) * 6];
                    self.wire.read_exact(&mut skip).await?;
                }
                2 => {}
                3 => {
                    let mut pad = [0u8; 3];
                    self.wire.read_exact(&mut pad).await?;
                    let len = u32_(&mut self.wire).await? as usize;
                    let mut text = vec![0u8; len.min(1 << 20)];
                    self.wire.read_exact(&mut text).await?;
                }
                other => bail!("unexpected RFB message type {other}"),
            }
        }
    }
}

/// Brightness 0..=765 of a 0x00RRGGBB pixel.
pub fn brightness(px: u32) -> u32 {
    (px >> 16 & 0xff) + (px >> 8 & 0xff) + (px & 0xff)
}
