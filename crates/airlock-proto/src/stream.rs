//! The video link between a guest and the control plane (the WebRTC path).
//!
//! The control plane opens `GET` [`STREAM_PATH`] on the agent (bearer token, as
//! every agent call) and upgrades it to a WebSocket. While it is open the guest
//! captures its display, encodes H.264 for low latency, and sends:
//!
//! * one **text** message [`StreamInfo`] first, and again whenever the
//!   display's size changes;
//! * one **binary** message per encoded frame: [`VideoFrame::encode`]'s layout
//!   (a 13-byte header, then the access unit in Annex-B form);
//! * one **binary** message [`CursorImage::encode`] at the start and whenever
//!   the pointer's picture changes (the video carries no pointer: the viewer
//!   draws it, so it moves without latency);
//! * one **binary** message [`encode_clipboard`] whenever the guest's clipboard
//!   (the X `CLIPBOARD` selection) takes new text.
//!
//! The control plane sends **text** messages, each one [`Control`] as JSON:
//! keyframe requests and the viewer's input, which the guest injects with XTest.
//! Closing the socket stops capture and encoding in the guest.

use serde::{Deserialize, Serialize};

/// Agent route of the stream WebSocket.
pub const STREAM_PATH: &str = "/v1/stream";

/// The capture rate the guest aims for.
pub const DEFAULT_FPS: u32 = 60;

/// Largest encoded frame either side accepts (a keyframe of a 4K desktop fits).
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Sent by the guest before the first frame and whenever the display resizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Always `"h264"` today (constrained baseline, Annex-B, no B-frames).
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// One encoded access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoFrame {
    /// Capture time in microseconds on the guest's monotonic clock; only
    /// differences matter (they become RTP timestamps).
    pub pts_us: u64,
    pub keyframe: bool,
    /// H.264 access unit, Annex-B (start codes), SPS/PPS in front of keyframes.
    pub data: Vec<u8>,
}

const FRAME_MAGIC: u8 = b'V';
const HEADER_LEN: usize = 1 + 8 + 1 + 3;

/// Why a binary message is not a [`VideoFrame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a video message is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("a video message starts with {0:#04x}, not the video marker")]
    Magic(u8),
    #[error("a video frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
}

impl VideoFrame {
    /// `'V'`, pts (u64 big-endian), flags (bit 0: keyframe), 3 reserved zero
    /// bytes, then the access unit.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.data.len());
        out.push(FRAME_MAGIC);
        out.extend_from_slice(&self.pts_us.to_be_bytes());
        out.push(u8::from(self.keyframe));
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.data);
        out
    }

    pub fn decode(msg: &[u8]) -> Result<Self, FrameError> {
        if msg.len() < HEADER_LEN {
            return Err(FrameError::Short(msg.len()));
        }
        if msg[0] != FRAME_MAGIC {
            return Err(FrameError::Magic(msg[0]));
        }
        let data = &msg[HEADER_LEN..];
        if data.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(data.len()));
        }
        let mut pts = [0u8; 8];
        pts.copy_from_slice(&msg[1..9]);
        Ok(Self {
            pts_us: u64::from_be_bytes(pts),
            keyframe: msg[9] & 1 == 1,
            data: data.to_vec(),
        })
    }
}

const CURSOR_MAGIC: u8 = b'C';
const CURSOR_HEADER_LEN: usize = 1 + 4 * 2;

/// Largest cursor side either side accepts (browsers show up to 128 px).
pub const MAX_CURSOR_SIDE: u16 = 128;

/// The pointer's picture: `width * height` pixels of RGBA (straight alpha,
/// rows top to bottom) and the hot spot within it. A cursor of no pixels is
/// a hidden pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorImage {
    pub width: u16,
    pub height: u16,
    pub xhot: u16,
    pub yhot: u16,
    pub rgba: Vec<u8>,
}

/// Why a binary message is not a [`CursorImage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("a cursor message is {0} bytes, not its header and pixels")]
    Length(usize),
    #[error("a cursor message starts with {0:#04x}, not the cursor marker")]
    Magic(u8),
    #[error("a cursor of {0}x{1} pixels is larger than {MAX_CURSOR_SIDE} a side")]
    TooLarge(u16, u16),
    #[error("a cursor's hot spot ({0}, {1}) is outside it")]
    HotSpot(u16, u16),
}

impl CursorImage {
    /// `'C'`, width, height, x and y of the hot spot (u16 big-endian each),
    /// then the RGBA pixels.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CURSOR_HEADER_LEN + self.rgba.len());
        out.push(CURSOR_MAGIC);
        for v in [self.width, self.height, self.xhot, self.yhot] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.rgba);
        out
    }

    pub fn decode(msg: &[u8]) -> Result<Self, CursorError> {
        if msg.len() < CURSOR_HEADER_LEN {
            return Err(CursorError::Length(msg.len()));
        }
        if msg[0] != CURSOR_MAGIC {
            return Err(CursorError::Magic(msg[0]));
        }
        let at = |i: usize| u16::from_be_bytes([msg[1 + 2 * i], msg[2 + 2 * i]]);
        let (width, height, xhot, yhot) = (at(0), at(1), at(2), at(3));
        if width > MAX_CURSOR_SIDE || height > MAX_CURSOR_SIDE {
            return Err(CursorError::TooLarge(width, height));
        }
        let pixels = &msg[CURSOR_HEADER_LEN..];
        if pixels.len() != usize::from(width) * usize::from(height) * 4 {
            return Err(CursorError::Length(msg.len()));
        }
        if !pixels.is_empty() && (xhot >= width || yhot >= height) {
            return Err(CursorError::HotSpot(xhot, yhot));
        }
        Ok(CursorImage {
            width,
            height,
            xhot,
            yhot,
            rgba: pixels.to_vec(),
        })
    }

    /// Whether a binary message is a cursor (else a video frame).
    pub fn is_cursor(msg: &[u8]) -> bool {
        msg.first() == Some(&CURSOR_MAGIC)
    }
}

const CLIPBOARD_MAGIC: u8 = b'T';

/// Largest clipboard text either way, in UTF-8 bytes: passwords, one-time
/// codes and pages of text fit; a file does not belong on the clipboard.
pub const MAX_CLIPBOARD_BYTES: usize = 1024 * 1024;

/// Largest [`Control`] as JSON: a [`Control::Clipboard`] of the largest text
/// with every byte escaped (`\u0001` is six bytes for one).
pub const MAX_CONTROL_JSON_BYTES: usize = 6 * MAX_CLIPBOARD_BYTES + 1024;

/// Why a binary message is not clipboard text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClipboardError {
    #[error("a clipboard message does not start with the clipboard marker")]
    Magic,
    #[error("clipboard text of {0} bytes is larger than {MAX_CLIPBOARD_BYTES}")]
    TooLarge(usize),
    #[error("clipboard text is not UTF-8")]
    NotUtf8,
}

/// The guest's clipboard text: `'T'`, then the text in UTF-8.
pub fn encode_clipboard(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + text.len());
    out.push(CLIPBOARD_MAGIC);
    out.extend_from_slice(text.as_bytes());
    out
}

pub fn decode_clipboard(msg: &[u8]) -> Result<String, ClipboardError> {
    if msg.first() != Some(&CLIPBOARD_MAGIC) {
        return Err(ClipboardError::Magic);
    }
    let text = &msg[1..];
    if text.len() > MAX_CLIPBOARD_BYTES {
        return Err(ClipboardError::TooLarge(text.len()));
    }
    String::from_utf8(text.to_vec()).map_err(|_| ClipboardError::NotUtf8)
}

/// Whether a binary message is clipboard text.
pub fn is_clipboard(msg: &[u8]) -> bool {
    msg.first() == Some(&CLIPBOARD_MAGIC)
}

/// What the control plane sends the guest. Pointer coordinates are display
/// pixels; the viewer scales them before sending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Send a keyframe as soon as possible (a viewer joined or lost packets).
    Keyframe,
    /// Move the pointer; `buttons` is the mask of pressed buttons after the
    /// move (bit 0 left, bit 1 middle, bit 2 right), as in RFB.
    Pointer { x: u32, y: u32, buttons: u8 },
    /// Scroll by whole notches: positive `dy` is down, positive `dx` right.
    Wheel { dx: i32, dy: i32 },
    /// Press or release one key, named by its X keysym.
    Key { keysym: u32, down: bool },
    /// Type text as a sequence of key presses (keysyms of its characters).
    Text { text: String },
    /// Put text on the guest's clipboard (`CLIPBOARD` and `PRIMARY`), at most
    /// [`MAX_CLIPBOARD_BYTES`].
    Clipboard { text: String },
    /// Make the display this size (the viewer's window), within
    /// [`MIN_DISPLAY`] and [`MAX_DISPLAY`]; odd sizes are rounded down to even.
    Resize { width: u32, height: u32 },
    /// Encode at this target bitrate from now on, in kbit/s, within
    /// [`BITRATE_KBIT`]: the control plane's adaptive bitrate (viewers may
    /// not send it).
    Bitrate { kbit: u32 },
}

/// Target bitrates the guest's encoder may be asked for, kbit/s.
pub const BITRATE_KBIT: std::ops::RangeInclusive<u32> = 100..=20_000;

/// Smallest display a viewer may ask for: the desktop's two windows side by
/// side stay usable.
pub const MIN_DISPLAY: (u32, u32) = (640, 480);
/// Largest display a viewer may ask for (4K UHD): beyond it a frame costs the
/// guest's cores more than a stream can carry.
pub const MAX_DISPLAY: (u32, u32) = (3840, 2160);

/// Longest text one [`Control::Text`] may carry.
pub const MAX_TEXT_CHARS: usize = 4096;

/// Why a control message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("not a control message: {0}")]
    Json(String),
    #[error("text input longer than {MAX_TEXT_CHARS} characters")]
    TextTooLong,
    #[error("pointer buttons {0:#04x} name a button other than left, middle or right")]
    Buttons(u8),
    #[error("a wheel step of {0} notches is out of range")]
    Wheel(i32),
    #[error("clipboard text of {0} bytes is larger than {MAX_CLIPBOARD_BYTES}")]
    ClipboardTooLarge(usize),
    #[error("a display of {0}x{1} is outside 640x480 to 3840x2160 (MIN_DISPLAY, MAX_DISPLAY)")]
    Size(u32, u32),
    #[error("a bitrate of {0} kbit/s is outside 100 to 20000 (BITRATE_KBIT)")]
    Bitrate(u32),
}

impl Control {
    /// Parse and check one message (the control plane checks what a browser
    /// sent before forwarding it; the guest checks again).
    pub fn parse(text: &str) -> Result<Self, ControlError> {
        let c: Control =
            serde_json::from_str(text).map_err(|e| ControlError::Json(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<(), ControlError> {
        match self {
            Control::Text { text } if text.chars().count() > MAX_TEXT_CHARS => {
                Err(ControlError::TextTooLong)
            }
            Control::Resize { width, height }
                if !(MIN_DISPLAY.0..=MAX_DISPLAY.0).contains(width)
                    || !(MIN_DISPLAY.1..=MAX_DISPLAY.1).contains(height) =>
            {
                Err(ControlError::Size(*width, *height))
            }
            Control::Bitrate { kbit } if !BITRATE_KBIT.contains(kbit) => {
                Err(ControlError::Bitrate(*kbit))
            }
            Control::Clipboard { text } if text.len() > MAX_CLIPBOARD_BYTES => {
                Err(ControlError::ClipboardTooLarge(text.len()))
            }
            Control::Pointer { buttons, .. } if buttons & !0b111 != 0 => {
                Err(ControlError::Buttons(*buttons))
            }
            // `unsigned_abs`: `i32::MIN.abs()` wraps to itself in a release
            // build and would pass a signed comparison.
            Control::Wheel { dx, dy } if dx.unsigned_abs() > 100 || dy.unsigned_abs() > 100 => {
                Err(ControlError::Wheel(if dx.unsigned_abs() > 100 {
                    *dx
                } else {
                    *dy
                }))
            }
            _ => Ok(()),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitrates_round_trip_within_bounds() {
        let c = Control::parse(r#"{"type":"bitrate","kbit":1500}"#).expect("parses");
        assert_eq!(c, Control::Bitrate { kbit: 1500 });
        assert_eq!(Control::parse(&c.to_json()).expect("again"), c);
        for bad in [0, 99, 20_001, u32::MAX] {
            let text = Control::Bitrate { kbit: bad }.to_json();
            assert!(
                matches!(Control::parse(&text), Err(ControlError::Bitrate(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn frames_round_trip() {
        let f = VideoFrame {
            pts_us: 0x0102_0304_0506_0708,
            keyframe: true,
            data: vec![0, 0, 0, 1, 0x67, 1, 2],
        };
        let bytes = f.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 7);
        assert_eq!(VideoFrame::decode(&bytes), Ok(f));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(VideoFrame::decode(b"V123"), Err(FrameError::Short(4)));
        let mut bytes = VideoFrame {
            pts_us: 1,
            keyframe: false,
            data: vec![1],
        }
        .encode();
        bytes[0] = b'X';
        assert_eq!(VideoFrame::decode(&bytes), Err(FrameError::Magic(b'X')));
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = CursorImage {
            width: 2,
            height: 3,
            xhot: 1,
            yhot: 2,
            rgba: (0..24).collect(),
        };
        let bytes = c.encode();
        assert!(CursorImage::is_cursor(&bytes));
        assert!(!CursorImage::is_cursor(b"V"));
        assert_eq!(CursorImage::decode(&bytes), Ok(c.clone()));
        assert_eq!(
            CursorImage::decode(&bytes[..bytes.len() - 1]),
            Err(CursorError::Length(bytes.len() - 1))
        );
        let hot = CursorImage {
            xhot: 2,
            ..c.clone()
        };
        assert_eq!(
            CursorImage::decode(&hot.encode()),
            Err(CursorError::HotSpot(2, 2))
        );
        let big = CursorImage {
            width: 129,
            height: 1,
            xhot: 0,
            yhot: 0,
            rgba: vec![0; 129 * 4],
        };
        assert_eq!(
            CursorImage::decode(&big.encode()),
            Err(CursorError::TooLarge(129, 1))
        );
        let hidden = CursorImage {
            width: 0,
            height: 0,
            xhot: 0,
            yhot: 0,
            rgba: vec![],
        };
        assert_eq!(CursorImage::decode(&hidden.encode()), Ok(hidden));
        assert_eq!(CursorImage::decode(b"C1"), Err(CursorError::Length(2)));
    }

    #[test]
    fn clipboard_text_round_trips_within_its_bound() {
        let msg = encode_clipboard("pässwörd €");
        assert!(is_clipboard(&msg));
        assert!(!is_clipboard(b"V"));
        assert_eq!(decode_clipboard(&msg).as_deref(), Ok("pässwörd €"));
        assert_eq!(decode_clipboard(b"T\xff"), Err(ClipboardError::NotUtf8));
        assert_eq!(decode_clipboard(b"X"), Err(ClipboardError::Magic));
        let big = "a".repeat(MAX_CLIPBOARD_BYTES + 1);
        assert_eq!(
            decode_clipboard(&encode_clipboard(&big)),
            Err(ClipboardError::TooLarge(MAX_CLIPBOARD_BYTES + 1))
        );
        assert_eq!(
            Control::Clipboard { text: big }.check(),
            Err(ControlError::ClipboardTooLarge(MAX_CLIPBOARD_BYTES + 1))
        );
        assert_eq!(
            Control::parse(r#"{"type":"resize","width":1000,"height":700}"#),
            Ok(Control::Resize {
                width: 1000,
                height: 700
            })
        );
        for (w, h) in [(639, 700), (1000, 479), (3841, 700), (1000, 2161)] {
            assert_eq!(
                Control::Resize {
                    width: w,
                    height: h
                }
                .check(),
                Err(ControlError::Size(w, h))
            );
        }
        let full = "\u{1}".repeat(MAX_CLIPBOARD_BYTES);
        let json = Control::Clipboard { text: full }.to_json();
        assert!(json.len() <= MAX_CONTROL_JSON_BYTES, "{}", json.len());
        assert!(Control::parse(&json).is_ok());
    }

    #[test]
    fn controls_parse_and_check() {
        assert_eq!(
            Control::parse(r#"{"type":"key","keysym":65293,"down":true}"#),
            Ok(Control::Key {
                keysym: 0xff0d,
                down: true
            })
        );
        assert_eq!(
            Control::parse(r#"{"type":"keyframe"}"#),
            Ok(Control::Keyframe)
        );
        let c = Control::Pointer {
            x: 3,
            y: 4,
            buttons: 1,
        };
        assert_eq!(Control::parse(&c.to_json()), Ok(c));
        assert!(matches!(
            Control::parse(r#"{"type":"pointer","x":1,"y":1,"buttons":8}"#),
            Err(ControlError::Buttons(8))
        ));
        assert!(matches!(
            Control::parse(r#"{"type":"key","keysym":1,"down":true,"extra":1}"#),
            Err(ControlError::Json(_))
        ));
        assert!(matches!(
            Control::parse(r#"{"type":"rm -rf"}"#),
            Err(ControlError::Json(_))
        ));
        let long = "x".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(
            Control::Text { text: long }.check(),
            Err(ControlError::TextTooLong)
        );
        assert!(matches!(
            Control::parse(r#"{"type":"wheel","dx":0,"dy":1000}"#),
            Err(ControlError::Wheel(1000))
        ));
        // i32::MIN has no positive twin: its abs() wrapped and passed.
        let min = format!(r#"{{"type":"wheel","dx":{},"dy":0}}"#, i32::MIN);
        assert!(matches!(
            Control::parse(&min),
            Err(ControlError::Wheel(i32::MIN))
        ));
        let min = format!(r#"{{"type":"wheel","dx":0,"dy":{}}}"#, i32::MIN);
        assert!(matches!(
            Control::parse(&min),
            Err(ControlError::Wheel(i32::MIN))
        ));
    }
}
