//! The login lifecycle as a pure state machine, and the only judge of which
//! state follows which. No I/O here: [`super::advance`] writes what
//! [`transition`] decides (compare-and-set on the row), then the driver runs
//! the effects it returned. Each state is written before its side effect, so
//! a restart resumes from the row ([`resume`]).
//!
//! ```text
//! starting ──UrlCaptured──▶ awaiting_user ──Captured──▶ captured ──Stored──▶ stored
//!    │ └─────────────────────Captured──────────────────────▲                   │
//!    │                                                                   Delivered
//!    │                                                                        ▼
//!    │                                           completed ◀──Finished── delivered
//!    ├─ Expire (starting, awaiting_user) ──────────────────────────▶ expired
//!    ├─ Cancel (starting, awaiting_user, captured) ────────────────▶ cancelled
//!    ├─ OwnerRemoved (any live state) ─────────────────────────────▶ cancelled
//!    └─ Fail (any live state) ─────────────────────────────────────▶ failed
//! ```
//!
//! <!-- login-transitions: the test `the_table_is_the_machine` reads this -->
//! | from | event | to |
//! | --- | --- | --- |
//! | starting | UrlCaptured | awaiting_user |
//! | starting | Captured | captured |
//! | awaiting_user | Captured | captured |
//! | captured | Stored | stored |
//! | stored | Delivered | delivered |
//! | delivered | Finished | completed |
//! | starting | Expire | expired |
//! | awaiting_user | Expire | expired |
//! | starting | Cancel | cancelled |
//! | awaiting_user | Cancel | cancelled |
//! | captured | Cancel | cancelled |
//! | starting | OwnerRemoved | cancelled |
//! | awaiting_user | OwnerRemoved | cancelled |
//! | captured | OwnerRemoved | cancelled |
//! | stored | OwnerRemoved | cancelled |
//! | delivered | OwnerRemoved | cancelled |
//! | starting | Fail | failed |
//! | awaiting_user | Fail | failed |
//! | captured | Fail | failed |
//! | stored | Fail | failed |
//! | delivered | Fail | failed |
//! <!-- end login-transitions -->
//!
//! | state | the effect that follows it ([`resume`]) |
//! | --- | --- |
//! | starting | browser sandbox ready, login command started, its URL awaited |
//! | awaiting_user | the user signs in over the viewer; the agent is watched |
//! | captured | credentials fetched from the agent and sealed; `Stored` writes them with the state, in one transaction |
//! | stored | delivered into the workspace and checked there; `Delivered` marks the record with the state, in one transaction |
//! | delivered | browser sandbox destroyed, then `Finished` |
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

    /// The states a login is still under way in.
    pub const LIVE: [LoginState; 5] = [
        LoginState::Starting,
        LoginState::AwaitingUser,
        LoginState::Captured,
        LoginState::Stored,
        LoginState::Delivered,
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

/// The step of a login that failed: named in the reason and in the
/// `logins_failed` metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The browser sandbox could not be made or did not become ready.
    Sandbox,
    /// The sandbox's agent did not answer.
    Agent,
    /// The agent could not start the login command, or it drew nothing.
    CliStart,
    /// The login command's prompts were not all answered in time.
    Prompts,
    /// The login command ended without credentials.
    CliExited,
    /// The command handed over no sign-in URL that passes the provider's
    /// rule in time.
    Url,
    /// The credentials could not be fetched or sealed.
    Capture,
    /// The credentials could not be written into the workspace, or the CLI
    /// there does not report itself signed in.
    Delivery,
    /// Our own fault: the store, a vanished owner or provider definition.
    Internal,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Sandbox,
        Stage::Agent,
        Stage::CliStart,
        Stage::Prompts,
        Stage::CliExited,
        Stage::Url,
        Stage::Capture,
        Stage::Delivery,
        Stage::Internal,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Sandbox => "sandbox",
            Stage::Agent => "agent",
            Stage::CliStart => "cli_start",
            Stage::Prompts => "prompts",
            Stage::CliExited => "cli_exited",
            Stage::Url => "url",
            Stage::Capture => "capture",
            Stage::Delivery => "delivery",
            Stage::Internal => "internal",
        }
    }

    /// How the reason begins.
    fn what(self) -> &'static str {
        match self {
            Stage::Sandbox => "browser sandbox",
            Stage::Agent => "agent",
            Stage::CliStart => "starting the login command",
            Stage::Prompts => "the login command's prompts",
            Stage::CliExited => "login command",
            Stage::Url => "sign-in URL",
            Stage::Capture => "capturing the credentials",
            Stage::Delivery => "delivery",
            Stage::Internal => "internal",
        }
    }
}

/// Why a login failed: the step and what happened there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub stage: Stage,
    pub message: String,
}

impl Failure {
    pub fn new(stage: Stage, message: impl Into<String>) -> Self {
        Failure {
            stage,
            message: message.into(),
        }
    }

    /// The reason written on the row: the step first.
    pub fn reason(&self) -> String {
        format!("{}: {}", self.stage.what(), self.message)
    }
}

/// A sealed credential record as `Stored` carries it. The ciphertext is not
/// the secret, but it is not printed either.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub sealed: String,
    pub key_id: String,
}

impl std::fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRecord")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The command printed the provider's sign-in URL (now open in Chromium).
    UrlCaptured {
        url: String,
    },
    /// Every credential file is present (the user signed in).
    Captured {
        url: Option<String>,
    },
    /// The credentials are sealed; written with the state, in one transaction.
    Stored(SealedRecord),
    /// Written into this workspace sandbox and checked there.
    Delivered {
        workspace: String,
    },
    /// The browser sandbox is gone.
    Finished,
    Fail(Failure),
    Expire {
        reason: String,
    },
    /// The user cancelled.
    Cancel {
        reason: String,
    },
    /// The owner is being removed: its credentials go too, so even a login
    /// past `stored` ends.
    OwnerRemoved {
        reason: String,
    },
}

impl Event {
    /// The name in the diagram and the table above.
    pub fn name(&self) -> &'static str {
        match self {
            Event::UrlCaptured { .. } => "UrlCaptured",
            Event::Captured { .. } => "Captured",
            Event::Stored(_) => "Stored",
            Event::Delivered { .. } => "Delivered",
            Event::Finished => "Finished",
            Event::Fail(_) => "Fail",
            Event::Expire { .. } => "Expire",
            Event::Cancel { .. } => "Cancel",
            Event::OwnerRemoved { .. } => "OwnerRemoved",
        }
    }

    /// The reason a final state records.
    pub fn reason(&self) -> Option<String> {
        match self {
            Event::Fail(f) => Some(f.reason()),
            Event::Expire { reason }
            | Event::Cancel { reason }
            | Event::OwnerRemoved { reason } => Some(reason.clone()),
            _ => None,
        }
    }
}

/// What the driver does after a transition (or, after a restart, after
/// reading a row: [`resume`]). Each is run by one handler in `steps.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Browser sandbox ready, login command started, its URL awaited.
    Start,
    /// Watch the agent until the credentials are there.
    Watch,
    /// Fetch the credentials and seal them.
    Capture,
    /// Open the record, write it into the workspace, check it there.
    Deliver,
    /// Destroy the browser sandbox, then `Finished`.
    Finish,
    /// Destroy the browser sandbox (a login that ended without completing).
    DestroyBrowser,
    /// Count a completed login.
    CountCompleted,
    /// Count a login that ended otherwise, with the metric label.
    CountEnded(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a login that is {from} cannot take {event}")]
pub struct Refused {
    pub from: LoginState,
    pub event: &'static str,
}

/// The effects that follow a login being in `state`, in order.
pub fn resume(state: LoginState) -> Vec<Effect> {
    match state {
        LoginState::Starting => vec![Effect::Start],
        LoginState::AwaitingUser => vec![Effect::Watch],
        LoginState::Captured => vec![Effect::Capture],
        LoginState::Stored => vec![Effect::Deliver],
        LoginState::Delivered => vec![Effect::Finish],
        LoginState::Completed => vec![],
        LoginState::Failed | LoginState::Expired | LoginState::Cancelled => {
            vec![Effect::DestroyBrowser]
        }
    }
}

/// The next state and what to do then, or why the event does not apply.
pub fn transition(from: LoginState, event: &Event) -> Result<(LoginState, Vec<Effect>), Refused> {
    use LoginState::*;
    let next = match (from, event) {
        (Starting, Event::UrlCaptured { .. }) => AwaitingUser,
        (Starting | AwaitingUser, Event::Captured { .. }) => Captured,
        (Captured, Event::Stored(_)) => Stored,
        (Stored, Event::Delivered { .. }) => Delivered,
        (Delivered, Event::Finished) => Completed,
        (Starting | AwaitingUser, Event::Expire { .. }) => Expired,
        (Starting | AwaitingUser | Captured, Event::Cancel { .. }) => Cancelled,
        (Starting | AwaitingUser | Captured | Stored | Delivered, Event::OwnerRemoved { .. }) => {
            Cancelled
        }
        (Starting | AwaitingUser | Captured | Stored | Delivered, Event::Fail(_)) => Failed,
        _ => {
            return Err(Refused {
                from,
                event: event.name(),
            })
        }
    };
    // Counted first: the count is instant, the teardown after it is not.
    let mut effects = match (next, event) {
        (Completed, _) => vec![Effect::CountCompleted],
        (Failed, Event::Fail(f)) => vec![Effect::CountEnded(f.stage.label())],
        (Expired, _) => vec![Effect::CountEnded("expired")],
        (Cancelled, _) => vec![Effect::CountEnded("cancelled")],
        _ => vec![],
    };
    effects.extend(resume(next));
    Ok((next, effects))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sealed() -> SealedRecord {
        SealedRecord {
            sealed: "v1:k:x:y".into(),
            key_id: "k".into(),
        }
    }

    /// One of each event.
    fn every_event() -> Vec<Event> {
        vec![
            Event::UrlCaptured { url: "u".into() },
            Event::Captured { url: None },
            Event::Stored(sealed()),
            Event::Delivered {
                workspace: "w".into(),
            },
            Event::Finished,
            Event::Fail(Failure::new(Stage::Agent, "x")),
            Event::Expire { reason: "x".into() },
            Event::Cancel { reason: "x".into() },
            Event::OwnerRemoved { reason: "x".into() },
        ]
    }

    fn event() -> impl Strategy<Value = Event> {
        (0..every_event().len()).prop_map(|i| every_event()[i].clone())
    }

    /// The transition table of the module doc, as (from, event, to).
    pub(crate) fn documented(text: &str) -> Vec<(String, String, String)> {
        let start = text
            .find("<!-- login-transitions")
            .expect("the table's start marker");
        let end = text
            .find("<!-- end login-transitions -->")
            .expect("the table's end marker");
        text[start..end]
            .lines()
            .map(|l| l.trim_start_matches("//!").trim())
            .filter(|l| l.starts_with('|') && !l.contains("---") && !l.contains("| from |"))
            .map(|l| {
                let cells: Vec<String> = l
                    .trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect();
                assert_eq!(cells.len(), 3, "{l}");
                (cells[0].clone(), cells[1].clone(), cells[2].clone())
            })
            .collect()
    }

    /// Every (from, event, to) the machine allows.
    pub(crate) fn allowed() -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for from in LoginState::ALL {
            for e in every_event() {
                if let Ok((to, _)) = transition(from, &e) {
                    out.push((from.to_string(), e.name().to_owned(), to.to_string()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_table_is_the_machine() {
        let mut doc = documented(include_str!("state.rs"));
        doc.sort();
        assert_eq!(doc, allowed(), "the table in state.rs's module doc");
    }

    /// The first fenced diagram after `marker` in `text`, lines trimmed of
    /// the doc-comment prefix.
    fn diagram(text: &str, marker: &str) -> Vec<String> {
        let from = text.find(marker).expect("the diagram's heading");
        text[from..]
            .lines()
            .map(|l| match l.strip_prefix("//!") {
                Some(doc) => doc.strip_prefix(' ').unwrap_or(doc),
                None => l,
            })
            .map(|l| l.trim_end().to_owned())
            .skip_while(|l| !l.starts_with("```"))
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// docs/architecture.md shows the same machine: its transition table is
    /// the machine's, its diagram is this module's, and the diagram names
    /// every state and every event.
    #[test]
    fn the_docs_are_the_machine() {
        let docs = include_str!("../../../../../docs/architecture.md");
        let section = &docs[docs.find("## A login's life").expect("the login section")..];
        let mut table = documented(section);
        table.sort();
        assert_eq!(table, allowed(), "the table in docs/architecture.md");
        let ours = diagram(include_str!("state.rs"), "//! The login lifecycle");
        assert_eq!(diagram(section, "## A login's life"), ours);
        let drawn = ours.join("\n");
        for s in LoginState::ALL {
            assert!(drawn.contains(s.as_str()), "{s} is not drawn");
        }
        for e in every_event() {
            assert!(drawn.contains(e.name()), "{} is not drawn", e.name());
        }
    }

    #[test]
    fn happy_path() {
        let mut s = LoginState::Starting;
        let mut effects = Vec::new();
        for e in [
            Event::UrlCaptured { url: "u".into() },
            Event::Captured { url: None },
            Event::Stored(sealed()),
            Event::Delivered {
                workspace: "w".into(),
            },
            Event::Finished,
        ] {
            let (next, fx) = transition(s, &e).expect("valid");
            s = next;
            effects.extend(fx);
        }
        assert_eq!(s, LoginState::Completed);
        assert_eq!(
            effects,
            [
                Effect::Watch,
                Effect::Capture,
                Effect::Deliver,
                Effect::Finish,
                Effect::CountCompleted
            ]
        );
    }

    /// Every refused pair, named: what a caller gets instead of a write.
    #[test]
    fn refusals() {
        let mut refused = 0;
        for from in LoginState::ALL {
            for e in every_event() {
                if let Err(r) = transition(from, &e) {
                    refused += 1;
                    assert_eq!(r.from, from);
                    assert_eq!(
                        r.to_string(),
                        format!("a login that is {from} cannot take {}", e.name())
                    );
                }
            }
        }
        // 9 states × 9 events, 21 allowed.
        assert_eq!(refused, 81 - 21);
        for e in every_event() {
            for s in [
                LoginState::Completed,
                LoginState::Failed,
                LoginState::Expired,
                LoginState::Cancelled,
            ] {
                assert!(transition(s, &e).is_err(), "{s} took {}", e.name());
            }
        }
        for e in [
            Event::Expire { reason: "x".into() },
            Event::Cancel { reason: "x".into() },
        ] {
            assert!(transition(LoginState::Stored, &e).is_err());
            assert!(transition(LoginState::Delivered, &e).is_err());
        }
    }

    #[test]
    fn failures_name_their_step() {
        let (to, fx) = transition(
            LoginState::Starting,
            &Event::Fail(Failure::new(Stage::Url, "none within 60 s")),
        )
        .expect("fails");
        assert_eq!(to, LoginState::Failed);
        assert_eq!(fx, [Effect::CountEnded("url"), Effect::DestroyBrowser]);
        assert_eq!(
            Failure::new(Stage::Url, "none within 60 s").reason(),
            "sign-in URL: none within 60 s"
        );
        let labels: std::collections::HashSet<_> = Stage::ALL.iter().map(|s| s.label()).collect();
        assert_eq!(labels.len(), Stage::ALL.len());
    }

    #[test]
    fn names_round_trip() {
        for s in LoginState::ALL {
            assert_eq!(LoginState::parse(s.as_str()), Some(s));
        }
    }

    proptest! {
        /// Final states stay final; `completed` is reached only through every
        /// step; stored credentials are never cancelled or expired away, but
        /// by the removal of their owner.
        #[test]
        fn invariants_hold(events in proptest::collection::vec(event(), 0..40)) {
            let mut s = LoginState::Starting;
            let mut seen = vec![s];
            for e in &events {
                let before = s;
                match transition(s, e) {
                    Ok((next, _)) => {
                        prop_assert!(!before.is_final());
                        if next == LoginState::Expired
                            || (next == LoginState::Cancelled && !matches!(e, Event::OwnerRemoved { .. }))
                        {
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

        /// Every state that is not final can fail, so no login is stuck; every
        /// end but `completed` destroys the browser sandbox.
        #[test]
        fn live_states_can_always_end(idx in 0usize..9) {
            let s = LoginState::ALL[idx];
            let r = transition(s, &Event::Fail(Failure::new(Stage::Internal, "x")));
            prop_assert_eq!(r.is_ok(), !s.is_final());
            if let Ok((_, fx)) = r {
                prop_assert!(fx.contains(&Effect::DestroyBrowser));
            }
        }
    }
}
