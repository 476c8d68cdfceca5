//! The sandbox lifecycle as a pure state machine. No I/O here: the app persists
//! each new state before it performs the side effect that the state names.
//!
//! ```text
//!  provisioning ──Provisioned──▶ booting ──Ready──▶ ready
//!       │                          │                  │
//!       └───────────┬──────────────┴──────────────────┘
//!                   │ StopRequested                    any live state
//!                   ▼                                   ──Fail(reason)──▶ failed
//!               stopping ──Released──▶ stopped          failed ──StopRequested──▶ stopping
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Provisioning,
    Booting,
    Ready,
    Stopping,
    Stopped,
    Failed,
}

impl SandboxState {
    pub const ALL: [SandboxState; 6] = [
        SandboxState::Provisioning,
        SandboxState::Booting,
        SandboxState::Ready,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Provisioning => "provisioning",
            SandboxState::Booting => "booting",
            SandboxState::Ready => "ready",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Holds (or may hold) host resources.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            SandboxState::Provisioning
                | SandboxState::Booting
                | SandboxState::Ready
                | SandboxState::Stopping
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Private resources exist; the guest is being booted.
    Provisioned,
    /// Agent healthy, VNC accepting, first frame not blank.
    Ready,
    StopRequested,
    /// Every host resource is released.
    Released,
    Fail(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a sandbox that is {from} cannot take {event}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: &'static str,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Provisioned => "provisioned",
            Event::Ready => "ready",
            Event::StopRequested => "a stop request",
            Event::Released => "released",
            Event::Fail(_) => "a failure",
        }
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The next state, or why the event does not apply.
pub fn transition(from: SandboxState, event: &Event) -> Result<SandboxState, InvalidTransition> {
    use SandboxState::*;
    let next = match (from, event) {
        (Provisioning, Event::Provisioned) => Booting,
        (Booting, Event::Ready) => Ready,
        (Provisioning | Booting | Ready | Failed, Event::StopRequested) => Stopping,
        (Stopping, Event::Released) => Stopped,
        (Provisioning | Booting | Ready | Stopping, Event::Fail(_)) => Failed,
        _ => {
            return Err(InvalidTransition {
                from: from.as_str(),
                event: event.name(),
            })
        }
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Provisioned),
            Just(Event::Ready),
            Just(Event::StopRequested),
            Just(Event::Released),
            ".{0,8}".prop_map(Event::Fail),
        ]
    }

    #[test]
    fn happy_path() {
        let mut s = SandboxState::Provisioning;
        for e in [
            Event::Provisioned,
            Event::Ready,
            Event::StopRequested,
            Event::Released,
        ] {
            s = transition(s, &e).expect("valid");
        }
        assert_eq!(s, SandboxState::Stopped);
    }

    #[test]
    fn names_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
        }
    }

    proptest! {
        /// Whatever happens, stopped is final, and nothing reaches ready
        /// without passing through booting.
        #[test]
        fn invariants_hold(events in proptest::collection::vec(event(), 0..40)) {
            let mut s = SandboxState::Provisioning;
            for e in &events {
                let before = s;
                match transition(s, e) {
                    Ok(next) => {
                        prop_assert_ne!(before, SandboxState::Stopped);
                        if next == SandboxState::Ready { prop_assert_eq!(before, SandboxState::Booting); }
                        if next == SandboxState::Stopped { prop_assert_eq!(before, SandboxState::Stopping); }
                        s = next;
                    }
                    Err(_) => prop_assert_eq!(s, before),
                }
            }
        }

        /// Any state that is not final can always be stopped or failed, so a
        /// sandbox can never get stuck holding resources.
        #[test]
        fn live_states_can_always_be_ended(idx in 0usize..6) {
            let s = SandboxState::ALL[idx];
            if s.is_live() {
                prop_assert!(transition(s, &Event::Fail("x".into())).is_ok());
            }
        }
    }
}
