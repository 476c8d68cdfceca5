//! The RFB messages a shared viewer may send the guest. The owner's viewers
//! are relayed as they are; a shared viewer's bytes pass through
//! [`ClientFilter`], which reads them message by message (RFB 3.8, section
//! 7.5, and the extensions noVNC speaks) and keeps:
//!
//! | message                                  | read-only | input granted |
//! |------------------------------------------|-----------|---------------|
//! | ClientInit (forced to shared)            | kept      | kept          |
//! | SetPixelFormat, SetEncodings,            | kept      | kept          |
//! | FramebufferUpdateRequest,                |           |               |
//! | EnableContinuousUpdates, ClientFence     |           |               |
//! | KeyEvent, PointerEvent, ClientCutText,   | dropped   | kept          |
//! | QEMU extended key event                  |           |               |
//! | SetDesktopSize, xvp (reboot, shutdown)   | dropped   | dropped       |
//!
//! Anything else ends the connection: a message the filter cannot measure
//! would leave it unable to find the next one.

/// Why a shared viewer's stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("RFB client message type {0} is not allowed on a shared view")]
    Unknown(u8),
    #[error("a ClientFence of {0} bytes is longer than 64")]
    Fence(u8),
    #[error("clipboard text of {0} bytes is too large")]
    CutText(u64),
}

/// The longest clipboard text a shared viewer with input may send.
const MAX_CUT_TEXT: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Needed to view: always kept.
    View,
    /// Keys, pointer, clipboard: kept only with input granted.
    Input,
    /// Changes the owner's desktop: never from a shared viewer.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// At least this many bytes are needed to tell the length.
    More(usize),
    /// A message of this many bytes.
    Whole(usize, Kind),
    /// A header of this many bytes and a body that may be large (streamed).
    Streamed(usize, u64, Kind),
}

fn u16_at(b: &[u8], i: usize) -> usize {
    usize::from(u16::from_be_bytes([b[i], b[i + 1]]))
}

/// How long the message at the start of `head` is, from as much of it as
/// there is.
fn measure(head: &[u8], started: bool) -> Result<Measure, FilterError> {
    use Measure::{More, Streamed, Whole};
    if !started {
        return Ok(if head.is_empty() {
            More(1)
        } else {
            Whole(1, Kind::View)
        });
    }
    let Some(&kind) = head.first() else {
        return Ok(More(1));
    };
    let at_least = |n: usize, then: &dyn Fn() -> Result<Measure, FilterError>| {
        if head.len() < n {
            Ok(More(n))
        } else {
            then()
        }
    };
    match kind {
        0 => Ok(Whole(20, Kind::View)),
        2 => at_least(4, &|| Ok(Whole(4 + 4 * u16_at(head, 2), Kind::View))),
        3 => Ok(Whole(10, Kind::View)),
        4 => Ok(Whole(8, Kind::Input)),
        5 => Ok(Whole(6, Kind::Input)),
        6 => at_least(8, &|| {
            let len = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            // A negative length is the extended clipboard's: its size is |len|.
            let len = u64::from(len.unsigned_abs());
            if len > MAX_CUT_TEXT {
                return Err(FilterError::CutText(len));
            }
            Ok(Streamed(8, len, Kind::Input))
        }),
        150 => Ok(Whole(10, Kind::View)),
        248 => at_least(9, &|| match head[8] {
            n @ 0..=64 => Ok(Whole(9 + usize::from(n), Kind::View)),
            n => Err(FilterError::Fence(n)),
        }),
        250 => Ok(Whole(4, Kind::Never)),
        251 => at_least(8, &|| Ok(Whole(8 + 16 * usize::from(head[6]), Kind::Never))),
        255 => at_least(2, &|| match head[1] {
            0 => Ok(Whole(12, Kind::Input)),
            _ => Err(FilterError::Unknown(255)),
        }),
        other => Err(FilterError::Unknown(other)),
    }
}

/// One shared viewer's client-to-server stream, after the security greeting
/// (from ClientInit on). Messages may arrive split across WebSocket messages
/// or several in one; the filter keeps its place between calls.
#[derive(Debug, Default)]
pub struct ClientFilter {
    started: bool,
    /// The start of a message not yet whole.
    pending: Vec<u8>,
    /// The rest of a streamed body: bytes left, and whether they are kept.
    body: Option<(u64, bool)>,
}

impl ClientFilter {
    pub fn new() -> ClientFilter {
        ClientFilter::default()
    }

    /// Append to `out` what of `data` may reach the guest; `input` says
    /// whether the owner granted input now. An error ends the connection.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        input: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), FilterError> {
        loop {
            if let Some((left, keep)) = self.body.as_mut() {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                if *keep {
                    out.extend_from_slice(&data[..n]);
                }
                *left -= n as u64;
                data = &data[n..];
                if *left > 0 {
                    return Ok(());
                }
                self.body = None;
            }
            let need = match measure(&self.pending, self.started)? {
                Measure::Whole(n, kind) if self.pending.len() >= n => {
                    if !self.started {
                        self.started = true;
                        // ClientInit: always shared, so a guest never drops the
                        // owner's viewer for this one.
                        out.push(1);
                    } else if allowed(kind, input) {
                        out.extend_from_slice(&self.pending);
                    }
                    self.pending.clear();
                    continue;
                }
                Measure::Streamed(n, len, kind) if self.pending.len() >= n => {
                    let keep = allowed(kind, input);
                    if keep {
                        out.extend_from_slice(&self.pending);
                    }
                    self.pending.clear();
                    if len > 0 {
                        self.body = Some((len, keep));
                    }
                    continue;
                }
                Measure::More(n) | Measure::Whole(n, _) | Measure::Streamed(n, _, _) => n,
            };
            if data.is_empty() {
                return Ok(());
            }
            let take = need.saturating_sub(self.pending.len()).clamp(1, data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }
}

fn allowed(kind: Kind, input: bool) -> bool {
    match kind {
        Kind::View => true,
        Kind::Input => input,
        Kind::Never => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixel_format() -> Vec<u8> {
        let mut m = vec![0u8; 20];
        m[4] = 32;
        m
    }
    fn encodings(list: &[i32]) -> Vec<u8> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(list.len() as u16).to_be_bytes());
        for e in list {
            m.extend_from_slice(&e.to_be_bytes());
        }
        m
    }
    fn update_request() -> Vec<u8> {
        vec![3, 1, 0, 0, 0, 0, 4, 0, 3, 0]
    }
    fn key(keysym: u32) -> Vec<u8> {
        let mut m = vec![4, 1, 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        m
    }
    fn pointer() -> Vec<u8> {
        vec![5, 1, 0, 10, 0, 20]
    }
    fn cut(text: &[u8]) -> Vec<u8> {
        let mut m = vec![6, 0, 0, 0];
        m.extend_from_slice(&(text.len() as u32).to_be_bytes());
        m.extend_from_slice(text);
        m
    }
    fn desktop_size() -> Vec<u8> {
        let mut m = vec![251, 0, 5, 0, 3, 0, 1, 0];
        m.extend_from_slice(&[0u8; 16]);
        m
    }
    fn fence() -> Vec<u8> {
        vec![248, 0, 0, 0, 0, 0, 0, 1, 3, 7, 7, 7]
    }
    fn qemu_key() -> Vec<u8> {
        vec![255, 0, 0, 1, 0, 0, 0, 65, 0, 0, 0, 30]
    }

    /// The whole stream in chunks of `size`.
    fn run(stream: &[u8], size: usize, input: bool) -> Result<Vec<u8>, FilterError> {
        let mut f = ClientFilter::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(size) {
            f.feed(chunk, input, &mut out)?;
        }
        Ok(out)
    }

    fn session() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let view: Vec<Vec<u8>> = vec![
            pixel_format(),
            encodings(&[0, 1, -223, -308]),
            update_request(),
            fence(),
            vec![150, 1, 0, 0, 0, 0, 4, 0, 3, 0],
        ];
        let input: Vec<Vec<u8>> = vec![key(0x61), pointer(), cut(b"secret"), qemu_key()];
        let mut all = vec![0u8]; // ClientInit, not shared
        let mut read_only = vec![1u8];
        let mut with_input = vec![1u8];
        for (i, v) in view.iter().enumerate() {
            all.extend_from_slice(v);
            read_only.extend_from_slice(v);
            with_input.extend_from_slice(v);
            if let Some(inp) = input.get(i) {
                all.extend_from_slice(inp);
                with_input.extend_from_slice(inp);
            }
            all.extend_from_slice(&desktop_size());
            all.extend_from_slice(&[250, 0, 1, 2]);
        }
        (all, read_only, with_input)
    }

    #[test]
    fn read_only_keeps_what_viewing_needs_and_drops_input_in_any_chunking() {
        let (all, read_only, with_input) = session();
        for size in [1, 2, 3, 7, 64, all.len()] {
            assert_eq!(
                run(&all, size, false).expect("ok"),
                read_only,
                "chunks of {size}"
            );
            assert_eq!(
                run(&all, size, true).expect("ok"),
                with_input,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn input_can_be_switched_between_messages() {
        let mut f = ClientFilter::new();
        let mut out = Vec::new();
        f.feed(&[1], false, &mut out).expect("init");
        f.feed(&key(0x61), false, &mut out).expect("key");
        assert_eq!(out, [1]);
        f.feed(&key(0x62), true, &mut out).expect("key");
        assert_eq!(out[1..], key(0x62)[..]);
    }

    #[test]
    fn a_long_dropped_clipboard_is_skipped_without_being_held() {
        let text = vec![b'x'; 1 << 20];
        let mut stream = vec![1u8];
        stream.extend(cut(&text));
        stream.extend(update_request());
        let mut f = ClientFilter::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(4096) {
            f.feed(chunk, false, &mut out).expect("ok");
            assert!(f.pending.len() < 300, "nothing large is buffered");
        }
        let mut want = vec![1u8];
        want.extend(update_request());
        assert_eq!(out, want);
        // The extended clipboard's negative length is a size too.
        let mut ext = vec![1u8, 6, 0, 0, 0];
        ext.extend_from_slice(&(-4i32).to_be_bytes());
        ext.extend_from_slice(&[0, 0, 0, 1]);
        ext.extend(update_request());
        assert_eq!(run(&ext, 3, false).expect("ok"), want);
    }

    #[test]
    fn unknown_or_malformed_messages_end_the_stream() {
        assert_eq!(run(&[1, 77], 1, true), Err(FilterError::Unknown(77)));
        assert_eq!(
            run(&[1, 255, 1, 0, 0], 5, true),
            Err(FilterError::Unknown(255))
        );
        let mut fence = vec![1u8, 248, 0, 0, 0, 0, 0, 0, 0, 65];
        fence.extend([0u8; 65]);
        assert_eq!(run(&fence, 4, false), Err(FilterError::Fence(65)));
        let mut huge = vec![1u8, 6, 0, 0, 0];
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(run(&huge, 9, true), Err(FilterError::CutText(_))));
    }
}
