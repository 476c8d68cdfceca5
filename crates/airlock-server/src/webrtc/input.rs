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

use airlock_proto::stream::Control;
use serde::Deserialize;

/// Label of the reliable, ordered channel (web/webrtc.js opens both).
pub const RELIABLE: &str = "input";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sequenced {
    seq: u64,
    input: Control,
}

/// One numbered input message, checked.
pub fn parse(text: &str) -> Result<(u64, Control), String> {
    let s: Sequenced =
        serde_json::from_str(text).map_err(|e| format!("not an input message: {e}"))?;
    s.input.check().map_err(|e| e.to_string())?;
    Ok((s.seq, s.input))
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
    fn numbered_input_is_parsed_and_checked() {
        let (seq, c) =
            parse(r#"{"seq":3,"input":{"type":"key","keysym":65,"down":true}}"#).expect("valid");
        assert_eq!(seq, 3);
        assert_eq!(
            c,
            Control::Key {
                keysym: 65,
                down: true
            }
        );
        // Bare controls, unknown fields and bad values are refused.
        assert!(parse(r#"{"type":"key","keysym":65,"down":true}"#).is_err());
        assert!(parse(r#"{"seq":1,"input":{"type":"keyframe"},"x":1}"#).is_err());
        let err = parse(r#"{"seq":1,"input":{"type":"wheel","dx":0,"dy":500}}"#)
            .expect_err("out of range");
        assert!(err.contains("500"), "{err}");
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
