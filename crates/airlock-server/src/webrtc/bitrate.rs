//! The encoder's target bitrate from the bandwidth a viewer's link can take
//! (str0m's `Event::EgressBitrateEstimate`): a pure function of the estimate
//! and what was last asked of the guest, so it is tested without a network.
//!
//! - The target is a share of the estimate ([`HEADROOM`]), leaving room for
//!   RTP/SRTP overhead, the copies sent against loss and the estimate's own
//!   noise, clamped to [`MIN_KBIT`]..=[`MAX_KBIT`].
//! - Hysteresis: the guest is asked again only when the new target differs
//!   from the last one asked by more than [`STEP`], and never more often than
//!   [`HOLD`], except that a fall past [`DROP`] goes at once (a link that
//!   collapses must not wait, one that recovers can).

use std::time::{Duration, Instant};

/// Lowest target: below it the desktop's text turns to mush.
pub const MIN_KBIT: u32 = 500;
/// Highest target: the fixed rate the guest encodes at when nobody asks.
pub const MAX_KBIT: u32 = 4000;
/// Share of the estimate the encoder may use.
pub const HEADROOM: f64 = 0.8;
/// Relative change below which nothing is asked.
pub const STEP: f64 = 0.15;
/// Least time between two requests going up.
pub const HOLD: Duration = Duration::from_secs(2);
/// A fall by more than this share is asked for at once.
pub const DROP: f64 = 0.3;

/// What the controller remembers between estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controller {
    /// The target last asked of the guest, kbit/s.
    pub asked: u32,
    /// When it was asked.
    pub at: Option<Instant>,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            asked: MAX_KBIT,
            at: None,
        }
    }
}

/// The target for an estimate of `estimate_bps`, clamped.
pub fn target(estimate_bps: u64) -> u32 {
    let kbit = (estimate_bps as f64 * HEADROOM / 1000.0).round();
    (kbit.clamp(f64::from(MIN_KBIT), f64::from(MAX_KBIT))) as u32
}

impl Controller {
    /// Take one estimate at `now`; returns the new target when the guest
    /// should be asked for it.
    pub fn update(&mut self, estimate_bps: u64, now: Instant) -> Option<u32> {
        let want = target(estimate_bps);
        let change = (f64::from(want) - f64::from(self.asked)) / f64::from(self.asked);
        if change.abs() <= STEP {
            return None;
        }
        let held = self.at.is_none_or(|at| now.duration_since(at) >= HOLD);
        if !held && change > -DROP {
            return None;
        }
        self.asked = want;
        self.at = Some(now);
        Some(want)
    }
}

/// Every viewer's target on one hub; the guest encodes once for all, so it
/// is asked for the lowest (a viewer on a thin link must not be flooded).
#[derive(Debug, Default)]
pub struct Targets {
    by_viewer: std::collections::HashMap<u64, u32>,
    asked: Option<u32>,
}

impl Targets {
    /// A viewer's new target (`None`: it left); returns what to ask the
    /// guest for when the lowest changed. When the last viewer with a
    /// target leaves, the guest keeps the last one (the encoder stops soon).
    pub fn set(&mut self, viewer: u64, kbit: Option<u32>) -> Option<u32> {
        match kbit {
            Some(k) => self.by_viewer.insert(viewer, k),
            None => self.by_viewer.remove(&viewer),
        };
        let lowest = self.by_viewer.values().min().copied()?;
        if self.asked == Some(lowest) {
            return None;
        }
        self.asked = Some(lowest);
        Some(lowest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_viewer_sets_the_guest() {
        let mut t = Targets::default();
        assert_eq!(t.set(1, Some(3000)), Some(3000));
        assert_eq!(t.set(2, Some(1000)), Some(1000));
        assert_eq!(t.set(1, Some(2500)), None, "viewer 2 is still lowest");
        assert_eq!(t.set(2, None), Some(2500), "the thin viewer left");
        assert_eq!(t.set(1, None), None);
    }

    #[test]
    fn targets_are_a_share_of_the_estimate_within_bounds() {
        assert_eq!(target(2_000_000), 1600);
        assert_eq!(target(100_000), MIN_KBIT);
        assert_eq!(target(50_000_000), MAX_KBIT);
        assert_eq!(target(0), MIN_KBIT);
    }

    #[test]
    fn small_changes_ask_nothing_and_rises_wait() {
        let t0 = Instant::now();
        let mut c = Controller::default();
        // 4.6 Mbit/s estimated: 3.68 of 4 is within the step.
        assert_eq!(c.update(4_600_000, t0), None);
        // The link falls to 2 Mbit/s: asked at once (a fall of 60 %).
        assert_eq!(c.update(2_000_000, t0), Some(1600));
        // It comes back at once: held for HOLD.
        assert_eq!(c.update(5_000_000, t0 + Duration::from_millis(500)), None);
        assert_eq!(c.update(5_000_000, t0 + HOLD), Some(MAX_KBIT));
        // A fall of 20 % within the hold waits; after it, goes.
        let t1 = t0 + HOLD + Duration::from_millis(100);
        assert_eq!(c.update(4_000_000, t1), None);
        assert_eq!(c.update(4_000_000, t0 + HOLD * 2), Some(3200));
        // Noise around the asked target asks nothing.
        for (i, bps) in [3_900_000, 4_100_000, 4_200_000, 3_800_000]
            .iter()
            .enumerate()
        {
            let at = t0 + HOLD * (3 + i as u32);
            assert_eq!(c.update(*bps, at), None, "{bps}");
        }
        assert_eq!(c.asked, 3200);
    }
}
