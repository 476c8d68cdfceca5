//! Input from the viewer, sent twice against packet loss.
//!
//! Every input message is numbered and goes on two data channels: `input`,
//! reliable and ordered (SCTP retransmits a lost message, after a timeout of
//! hundreds of milliseconds when nothing follows it), and `input-fast`,
//! unordered with no retransmission. Whichever copy arrives first is applied;
//! the other is dropped by its number. The order of the guest's input is the
//! reliable channel's: a fast copy is applied only when it is exactly the next
//! message, so a key release can never overtake its press.
//!
//! ```text
//! {"seq":17,"input":{"type":"key","keysym":65,"down":true}}
//! ```
//!
//! Text for the guest's clipboard (up to [`MAX_CLIPBOARD_BYTES`]) is larger
//! than a data-channel message may be, so the viewer sends it in numbered
//! parts on the reliable channel only, the last with `"more":false`; the
//! session puts them together ([`ClipboardParts`]) and hands the guest one
//! [`Control::Clipboard`]. Being numbered like the keys, the text is on the
//! guest's clipboard before the Ctrl+V that follows it is pressed.
//!
//! ```text
//! {"seq":18,"clipboard":{"text":"first part…","more":true}}
//! {"seq":19,"clipboard":{"text":"…last part","more":false}}
//! ```

use airlock_proto::stream::{Control, MAX_CLIPBOARD_BYTES};
use serde::Deserialize;

/// Label of the reliable, ordered channel (web/webrtc.js opens both).
pub const RELIABLE: &str = "input";

/// Largest part of clipboard text in one message (the viewer sends 4096
/// characters at most, up to 16 KiB of UTF-8).
pub const MAX_CLIPBOARD_PART_BYTES: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sequenced {
    seq: u64,
    #[serde(default)]
    input: Option<Control>,
    #[serde(default)]
    clipboard: Option<ClipboardPart>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipboardPart {
    pub text: String,
    pub more: bool,
}

/// What one numbered message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Input(Control),
    Clipboard(ClipboardPart),
}

/// One numbered input message, checked.
pub fn parse(text: &str) -> Result<(u64, Incoming), String> {
    let s: Sequenced =
        serde_json::from_str(text).map_err(|e| format!("not an input message: {e}"))?;
    match (s.input, s.clipboard) {
        (Some(c), None) => {
            c.check().map_err(|e| e.to_string())?;
            // Whole clipboard texts come in parts, never as one control.
            if matches!(c, Control::Clipboard { .. }) {
                return Err("clipboard text comes in parts".into());
            }
            // The encoder's bitrate is the control plane's to set.
            if matches!(c, Control::Bitrate { .. }) {
                return Err("a viewer may not set the bitrate".into());
            }
            Ok((s.seq, Incoming::Input(c)))
        }
        (None, Some(part)) if part.text.len() > MAX_CLIPBOARD_PART_BYTES => Err(format!(
            "a clipboard part of {} bytes is larger than {MAX_CLIPBOARD_PART_BYTES}",
            part.text.len()
        )),
        (None, Some(part)) => Ok((s.seq, Incoming::Clipboard(part))),
        _ => Err("an input message carries one of input or clipboard".into()),
    }
}

/// Puts the parts of one clipboard text together, within
/// [`MAX_CLIPBOARD_BYTES`]. No I/O.
#[derive(Debug, Default)]
pub struct ClipboardParts {
    text: String,
    /// The text went over the bound: its remaining parts are dropped.
    over: bool,
}

impl ClipboardParts {
    /// The whole text once its last part is in; an error (once, at the
    /// last part) when it is larger than the bound.
    pub fn push(&mut self, part: ClipboardPart) -> Result<Option<String>, String> {
        if !self.over && self.text.len() + part.text.len() > MAX_CLIPBOARD_BYTES {
            self.over = true;
            self.text = String::new();
        }
        if !self.over {
            self.text.push_str(&part.text);
        }
        if part.more {
            return Ok(None);
        }
        if std::mem::take(&mut self.over) {
            return Err(format!(
                "the clipboard text is larger than {} MiB; it was not sent",
                MAX_CLIPBOARD_BYTES >> 20
            ));
        }
        Ok(Some(std::mem::take(&mut self.text)))
    }
}

/// Whether a shared viewer's message reaches the guest (`input`: the owner
/// granted input now). Keys, pointer, wheel, typed text and clipboard text
/// only with input; a resize of the owner's desktop never. No I/O.
pub fn shared_may_send(incoming: &Incoming, input: bool) -> bool {
    match incoming {
        Incoming::Input(Control::Keyframe) => true,
        Incoming::Input(Control::Resize { .. }) => false,
        Incoming::Input(_) | Incoming::Clipboard(_) => input,
    }
}

/// Which copies of the numbered input to apply. No I/O.
#[derive(Debug, Default)]
pub struct InputOrder {
    /// The number of the last message applied (numbers start at 1).
    last: u64,
}

impl InputOrder {
    /// Whether the message numbered `seq` that came on the reliable channel
    /// (or on the fast one) is to be applied now.
    pub fn admit(&mut self, seq: u64, reliable: bool) -> bool {
        let next = self.last.saturating_add(1);
        let take = if reliable { seq >= next } else { seq == next };
        if take {
            self.last = seq;
        }
        take
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_viewer_sends_input_only_when_granted_and_never_resizes() {
        let key = Incoming::Input(Control::Key {
            keysym: 65,
            down: true,
        });
        let pointer = Incoming::Input(Control::Pointer {
            x: 1,
            y: 2,
            buttons: 1,
        });
        let text = Incoming::Input(Control::Text { text: "x".into() });
        let clip = Incoming::Clipboard(ClipboardPart {
            text: "x".into(),
            more: false,
        });
        let resize = Incoming::Input(Control::Resize {
            width: 800,
            height: 600,
        });
        for m in [&key, &pointer, &text, &clip] {
            assert!(!shared_may_send(m, false), "{m:?}");
            assert!(shared_may_send(m, true), "{m:?}");
        }
        assert!(!shared_may_send(&resize, true));
        assert!(shared_may_send(&Incoming::Input(Control::Keyframe), false));
    }

    #[test]
    fn a_viewer_cannot_set_the_bitrate() {
        let err = parse(r#"{"seq":1,"input":{"type":"bitrate","kbit":1000}}"#)
            .expect_err("the control plane's to set");
        assert!(err.contains("bitrate"), "{err}");
    }

    #[test]
    fn numbered_input_is_parsed_and_checked() {
        let (seq, c) =
            parse(r#"{"seq":3,"input":{"type":"key","keysym":65,"down":true}}"#).expect("valid");
        assert_eq!(seq, 3);
        assert_eq!(
            c,
            Incoming::Input(Control::Key {
                keysym: 65,
                down: true
            })
        );
        assert_eq!(
            parse(r#"{"seq":4,"clipboard":{"text":"pw","more":false}}"#),
            Ok((
                4,
                Incoming::Clipboard(ClipboardPart {
                    text: "pw".into(),
                    more: false
                })
            ))
        );
        // Neither, both, a whole clipboard control, an oversized part.
        assert!(parse(r#"{"seq":1}"#).is_err());
        assert!(parse(
            r#"{"seq":1,"input":{"type":"keyframe"},"clipboard":{"text":"","more":false}}"#
        )
        .is_err());
        assert!(parse(r#"{"seq":1,"input":{"type":"clipboard","text":"x"}}"#).is_err());
        let big = format!(
            r#"{{"seq":1,"clipboard":{{"text":"{}","more":true}}}}"#,
            "x".repeat(MAX_CLIPBOARD_PART_BYTES + 1)
        );
        assert!(parse(&big).is_err());
        // Bare controls, unknown fields and bad values are refused.
        assert!(parse(r#"{"type":"key","keysym":65,"down":true}"#).is_err());
        assert!(parse(r#"{"seq":1,"input":{"type":"keyframe"},"x":1}"#).is_err());
        let err = parse(r#"{"seq":1,"input":{"type":"wheel","dx":0,"dy":500}}"#)
            .expect_err("out of range");
        assert!(err.contains("500"), "{err}");
    }

    #[test]
    fn clipboard_parts_come_together_within_the_bound() {
        let part = |text: &str, more| ClipboardPart {
            text: text.into(),
            more,
        };
        let mut p = ClipboardParts::default();
        assert_eq!(p.push(part("one ", true)), Ok(None));
        assert_eq!(p.push(part("two", false)), Ok(Some("one two".into())));
        assert_eq!(p.push(part("again", false)), Ok(Some("again".into())));
        // Over the bound: refused once, at its end; the next text is whole.
        let chunk = "x".repeat(MAX_CLIPBOARD_PART_BYTES);
        for _ in 0..MAX_CLIPBOARD_BYTES / MAX_CLIPBOARD_PART_BYTES {
            assert_eq!(p.push(part(&chunk, true)), Ok(None));
        }
        assert_eq!(p.push(part("y", true)), Ok(None));
        assert!(p.push(part("z", false)).is_err());
        assert_eq!(p.push(part("after", false)), Ok(Some("after".into())));
        // Exactly the bound is fine.
        for _ in 0..MAX_CLIPBOARD_BYTES / MAX_CLIPBOARD_PART_BYTES {
            assert_eq!(p.push(part(&chunk, true)), Ok(None));
        }
        let whole = p.push(part("", false)).expect("fits").expect("whole");
        assert_eq!(whole.len(), MAX_CLIPBOARD_BYTES);
    }

    #[test]
    fn the_first_copy_wins_and_the_second_is_dropped() {
        let mut o = InputOrder::default();
        assert!(o.admit(1, false));
        assert!(!o.admit(1, true));
        assert!(o.admit(2, true));
        assert!(!o.admit(2, false));
    }

    #[test]
    fn a_fast_copy_never_overtakes_a_message_still_missing() {
        let mut o = InputOrder::default();
        assert!(o.admit(1, true));
        // 2 was lost on the fast channel; 3's fast copy must wait for the
        // reliable channel, which brings 2 and then 3.
        assert!(!o.admit(3, false));
        assert!(o.admit(2, true));
        assert!(o.admit(3, true));
        assert!(!o.admit(3, false));
    }

    #[test]
    fn applied_messages_stay_in_order_whatever_the_copies_do() {
        // Every interleaving of the two channels of a short run: the reliable
        // one in order and complete, the fast one any subset in any order.
        let n = 5u64;
        for lost in 0..(1u32 << n) {
            for rotate in 0..n as usize {
                let mut fast: Vec<u64> = (1..=n).filter(|s| lost & (1 << (s - 1)) == 0).collect();
                let len = fast.len().max(1);
                fast.rotate_left(rotate % len);
                for split in 0..=fast.len() {
                    let arrivals = fast[..split]
                        .iter()
                        .map(|&s| (s, false))
                        .chain((1..=n).map(|s| (s, true)))
                        .chain(fast[split..].iter().map(|&s| (s, false)));
                    let mut o = InputOrder::default();
                    let applied: Vec<u64> = arrivals
                        .filter(|&(seq, reliable)| o.admit(seq, reliable))
                        .map(|(seq, _)| seq)
                        .collect();
                    assert_eq!(
                        applied,
                        (1..=n).collect::<Vec<_>>(),
                        "lost {lost:b} rotate {rotate} split {split}"
                    );
                }
            }
        }
    }
}
