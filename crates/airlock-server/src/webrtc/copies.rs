//! Second copies of video packets, against random packet loss.
//!
//! A lost RTP packet costs a viewer a NACK and a retransmission: one round
//! trip plus the wait until the gap shows, which on a 40 ms link with 0.5 %
//! loss was the whole p95 tail of input-to-photon (docs/performance.md). str0m
//! has no FEC, so each RTP packet is sent twice while a token bucket allows it;
//! the browser's SRTP replay check drops whichever copy comes second. The
//! bucket fills at `kbps` and holds a quarter second of it, so the frames that
//! follow a quiet spell (a key press, a click) are all protected while a busy
//! screen costs at most `kbps` more. No I/O: the session asks, then sends.

use std::time::Instant;

/// Smallest bucket, so one typical change fits whatever the rate.
const MIN_BURST: f64 = 16_384.0;

#[derive(Debug)]
pub struct Copies {
    /// Bytes a second.
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Copies {
    /// Up to `kbps` kilobits a second of copies; 0 sends none.
    pub fn new(kbps: u32) -> Self {
        let rate = f64::from(kbps) * 1000.0 / 8.0;
        let burst = if kbps == 0 {
            0.0
        } else {
            (rate / 4.0).max(MIN_BURST)
        };
        Copies {
            rate,
            burst,
            tokens: burst,
            at: None,
        }
    }

    /// Whether to send `packet` (as it goes on the wire) a second time.
    pub fn second_copy(&mut self, now: Instant, packet: &[u8]) -> bool {
        if self.burst == 0.0 || !is_rtp(packet) {
            return false;
        }
        if let Some(at) = self.at {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + secs * self.rate).min(self.burst);
        }
        self.at = Some(now);
        let len = packet.len() as f64;
        if self.tokens < len {
            return false;
        }
        self.tokens -= len;
        true
    }
}

/// RTP (not RTCP, STUN or DTLS) by its first two bytes (RFC 7983, RFC 5761):
/// version 2, and a second byte outside RTCP's packet types 192–223.
fn is_rtp(packet: &[u8]) -> bool {
    match packet {
        [b0, b1, ..] => b0 >> 6 == 2 && !(192..=223).contains(b1),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rtp(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x80;
        p[1] = 96 | 0x80; // marker bit set
        p
    }

    #[test]
    fn only_rtp_is_copied() {
        let mut c = Copies::new(1000);
        let now = Instant::now();
        assert!(c.second_copy(now, &rtp(1200)));
        let mut rtcp = rtp(100);
        rtcp[1] = 201; // receiver report
        assert!(!c.second_copy(now, &rtcp));
        assert!(!c.second_copy(now, &[0x16, 0xfe, 0xfd])); // DTLS
        assert!(!c.second_copy(now, &[0x00, 0x01, 0x00])); // STUN
        assert!(!c.second_copy(now, &[0x80]));
    }

    #[test]
    fn copies_stop_at_the_budget_and_come_back_with_time() {
        // 1 Mbit/s: a bucket of 31,250 bytes, refilled at 125,000 a second.
        let mut c = Copies::new(1000);
        let t0 = Instant::now();
        let sent = (0..100).filter(|_| c.second_copy(t0, &rtp(1000))).count();
        assert_eq!(sent, 31);
        assert!(!c.second_copy(t0, &rtp(1000)));
        assert!(c.second_copy(t0 + Duration::from_millis(10), &rtp(1000)));
        // A busy second costs at most the rate (plus the bucket).
        let mut copied = 0usize;
        for ms in 0..1000u64 {
            let t = t0 + Duration::from_millis(20 + ms);
            for _ in 0..5 {
                if c.second_copy(t, &rtp(1000)) {
                    copied += 1000;
                }
            }
        }
        assert!((120_000..=157_000).contains(&copied), "{copied}");
    }

    #[test]
    fn zero_sends_no_copies() {
        let mut c = Copies::new(0);
        assert!(!c.second_copy(Instant::now(), &rtp(100)));
    }
}
