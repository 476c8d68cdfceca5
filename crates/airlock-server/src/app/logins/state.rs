//! The login lifecycle as a pure state machine. No I/O here: the app writes
//! each new state to the store before it performs the side effect the state
//! names, so a restart resumes from the row.
//!
//! ```text
//!  starting ──UrlCaptured──▶ awaiting_user ──Captured──▶ captured ──Stored──▶ stored
//!     │  └──────────────Captured─────────────────────────▲                      │
//!     │                                                                 Delivered
//!     │ Fail / Expire / Cancel (before stored)                                   ▼
//!     ▼                                                  completed ◀──Finished── delivered
//!  failed | expired | cancelled                  (any live state ──Fail──▶ failed)
//! ```
//!
//! | state | side effect that follows it |
//! | --- | --- |
//! | starting | browser sandbox made and booted, login command started in it |
//! | awaiting_user | the user signs in over the viewer; the agent is polled |
//! | captured | credentials fetched from the agent, sealed, stored (with `stored`, in one transaction) |
//! | stored | delivered into the workspace, checked there |
//! | delivered | browser sandbox destroyed |
//! | failed, expired, cancelled | browser sandbox destroyed |

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoginState {
    Starting,
    AwaitingUser,
    Captured,
    Stored,
    Delivered,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl LoginState {
    pub const ALL: [LoginState; 9] = [
        LoginState::Starting,
        LoginState::AwaitingUser,
        LoginState::Captured,
        LoginState::Stored,
        LoginState::Delivered,
        LoginState::Completed,
        LoginState::Failed,
        LoginState::Expired,
        LoginState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginState::Starting => "starting",
            LoginState::AwaitingUser => "awaiting_user",
            LoginState::Captured => "captured",
            LoginState::Stored => "stored",
            LoginState::Delivered => "delivered",
            LoginState::Completed => "completed",
            LoginState::Failed => "failed",
            LoginState::Expired => "expired",
            LoginState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Nothing happens to a login in a final state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            LoginState::Completed
                | LoginState::Failed
                | LoginState::Expired
                | LoginState::Cancelled
        )
    }

    /// Still waiting on the user: may expire or be cancelled.
    pub fn is_waiting(self) -> bool {
        matches!(self, LoginState::Starting | LoginState::AwaitingUser)
    }
}

impl std::fmt::Display for LoginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    UrlCaptured,
    Captured,
    Stored,
    Delivered,
    /// The browser sandbox is gone.
    Finished,
    Fail(String),
    Expire,
    Cancel,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::UrlCaptured => "a captured URL",
            Event::Captured => "captured credentials",
            Event::Stored => "stored",
            Event::Delivered => "delivered",
            Event::Finished => "finished",
            Event::Fail(_) => "a failure",
            Event::Expire => "expiry",
            Event::Cancel => "a cancel",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a login that is {from} cannot take {event}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: &'static str,
}

pub fn transition(from: LoginState, event: &Event) -> Result<LoginState, InvalidTransition> {
    use LoginState::*;
    let next = match (from, event) {
        (Starting, Event::UrlCaptured) => AwaitingUser,
        (Starting | AwaitingUser, Event::Captured) => Captured,
        (Captured, Event::Stored) => Stored,
        (Stored, Event::Delivered) => Delivered,
        (Delivered, Event::Finished) => Completed,
        (Starting | AwaitingUser | Captured | Stored | Delivered, Event::Fail(_)) => Failed,
        (Starting | AwaitingUser, Event::Expire) => Expired,
        (Starting | AwaitingUser | Captured, Event::Cancel) => Cancelled,
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
            Just(Event::UrlCaptured),
            Just(Event::Captured),
            Just(Event::Stored),
            Just(Event::Delivered),
            Just(Event::Finished),
            ".{0,8}".prop_map(Event::Fail),
            Just(Event::Expire),
            Just(Event::Cancel),
        ]
    }

    #[test]
    fn happy_path() {
        let mut s = LoginState::Starting;
        for e in [
            Event::UrlCaptured,
            Event::Captured,
            Event::Stored,
            Event::Delivered,
            Event::Finished,
        ] {
            s = transition(s, &e).expect("valid");
        }
        assert_eq!(s, LoginState::Completed);
    }

    #[test]
    fn names_round_trip() {
        for s in LoginState::ALL {
            assert_eq!(LoginState::parse(s.as_str()), Some(s));
        }
    }

    proptest! {
        /// Final states stay final; `completed` is reached only through every
        /// step; stored credentials are never "cancelled" or "expired" away.
        #[test]
        fn invariants_hold(events in proptest::collection::vec(event(), 0..40)) {
            let mut s = LoginState::Starting;
            let mut seen = vec![s];
            for e in &events {
                let before = s;
                match transition(s, e) {
                    Ok(next) => {
                        prop_assert!(!before.is_final());
                        if matches!(next, LoginState::Expired | LoginState::Cancelled) {
                            prop_assert!(!seen.contains(&LoginState::Stored));
                        }
                        s = next;
                        seen.push(s);
                    }
                    Err(_) => prop_assert_eq!(s, before),
                }
            }
            if s == LoginState::Completed {
                for must in [LoginState::Captured, LoginState::Stored, LoginState::Delivered] {
                    prop_assert!(seen.contains(&must));
                }
            }
        }

        /// Every state that is not final can fail, so no login is stuck.
        #[test]
        fn live_states_can_always_end(idx in 0usize..9) {
            let s = LoginState::ALL[idx];
            prop_assert_eq!(transition(s, &Event::Fail("x".into())).is_ok(), !s.is_final());
        }
    }
}
