//! The sandbox lifecycle as a pure state machine, and [`advance`], the one
//! place that writes a sandbox's state. [`transition`] does no I/O: it says
//! the next state and the effects the app must run once that state is
//! persisted. `advance` reads the row, asks the machine, and writes the new
//! state with a compare-and-set (retried when another writer won a race), so
//! a restart finds every state that an effect had begun under.
//!
//! ```text
//!  provisioning ──Provisioned──▶ booting ──Ready──▶ ready
//!  provisioning ──StopRequested──▶ stopping
//!  booting ──StopRequested──▶ stopping
//!  ready ──StopRequested──▶ stopping
//!  failed ──StopRequested──▶ stopping
//!  stopping ──Released──▶ stopped
//!  provisioning ──Fail──▶ failed
//!  booting ──Fail──▶ failed
//!  ready ──Fail──▶ failed
//!  booting ──Pooled──▶ pooled
//!  pooled ──Claimed──▶ ready
//!  pooled ──StopRequested──▶ stopping
//!  pooled ──Fail──▶ failed
//! ```
//!
//! A failure while `stopping` is refused: a sandbox deleted while booting
//! ends `stopped`, even though its guest halts before it was ready.
//!
//! `pooled` is a warm-pool member (app/pool.rs): booted and probed like a
//! ready sandbox, owned by the pool, never used. `Claimed` moves it to
//! `ready` together with its new owner in one compare-and-set ([`claim`]),
//! so a member is handed out at most once, and nothing leads back to
//! `pooled`.
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
    /// A warm-pool member: booted, owned by the pool, never used.
    Pooled,
}

impl SandboxState {
    pub const ALL: [SandboxState; 7] = [
        SandboxState::Provisioning,
        SandboxState::Booting,
        SandboxState::Ready,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Failed,
        SandboxState::Pooled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Provisioning => "provisioning",
            SandboxState::Booting => "booting",
            SandboxState::Ready => "ready",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
            SandboxState::Pooled => "pooled",
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
                | SandboxState::Pooled
        )
    }
}

/// What happens to a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Private resources exist on the node; the guest is being booted.
    Provisioned,
    /// Agent healthy, VNC accepting, first frame not blank.
    Ready,
    /// A delete, an idle reap or a user removal; the reason, if any, is kept.
    StopRequested(Option<String>),
    /// Every host resource is released.
    Released,
    /// Something went wrong; `label` for metrics, `reason` for the user.
    Fail { label: &'static str, reason: String },
    /// A warm-pool member passed the same readiness probes as `Ready`.
    Pooled,
    /// A pool member was bound to a user (only [`claim`] sends it).
    Claimed,
}

impl Event {
    /// The event's name as the diagram spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Provisioned => "Provisioned",
            Event::Ready => "Ready",
            Event::StopRequested(_) => "StopRequested",
            Event::Released => "Released",
            Event::Fail { .. } => "Fail",
            Event::Pooled => "Pooled",
            Event::Claimed => "Claimed",
        }
    }

    /// One of each kind, for tests that go over all of them.
    pub fn samples() -> [Event; 7] {
        [
            Event::Provisioned,
            Event::Ready,
            Event::StopRequested(None),
            Event::Released,
            Event::Fail {
                label: "test",
                reason: "x".into(),
            },
            Event::Pooled,
            Event::Claimed,
        ]
    }

    /// The reason recorded with the new state, if any.
    fn reason(&self) -> Option<&str> {
        match self {
            Event::StopRequested(why) => why.as_deref(),
            Event::Fail { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// What the app does once a new state is persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start the guest on its node and wait until it is ready.
    Boot,
    /// Count a sandbox that became ready.
    CountReady,
    /// Count a failure, by label.
    CountFailed(&'static str),
    /// Tell the sandbox's viewers it is going away.
    CloseViewers,
    /// Detach egress, destroy on the node, release the address; then
    /// `Released` if the sandbox is `stopping`.
    Teardown,
}

/// The machine's answer to an event that does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a sandbox that is {from} cannot take {event}")]
pub struct Refused {
    pub from: SandboxState,
    pub event: &'static str,
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The next state and the effects to run, or why the event does not apply.
pub fn transition(
    from: SandboxState,
    event: &Event,
) -> Result<(SandboxState, Vec<Effect>), Refused> {
    use SandboxState::*;
    let to_end = || vec![Effect::CloseViewers, Effect::Teardown];
    Ok(match (from, event) {
        (Provisioning, Event::Provisioned) => (Booting, vec![Effect::Boot]),
        (Booting, Event::Ready) => (Ready, vec![Effect::CountReady]),
        (Booting, Event::Pooled) => (Pooled, vec![]),
        (Pooled, Event::Claimed) => (Ready, vec![]),
        (Provisioning | Booting | Ready | Failed | Pooled, Event::StopRequested(_)) => {
            (Stopping, to_end())
        }
        (Stopping, Event::Released) => (Stopped, vec![]),
        (Provisioning | Booting | Ready | Pooled, Event::Fail { label, .. }) => {
            let mut effects = vec![Effect::CountFailed(label)];
            effects.extend(to_end());
            (Failed, effects)
        }
        _ => {
            return Err(Refused {
                from,
                event: event.name(),
            })
        }
    })
}

/// Proof that a state write comes from [`advance`]: only this module can
/// make one, and the store's state writes take it.
#[derive(Debug)]
pub struct StateWrite(());

/// Why [`advance`] did not move a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("storage failed")]
    Store(#[from] crate::store::StoreError),
}

/// A persisted transition and the effects the caller must now run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub from: SandboxState,
    pub to: SandboxState,
    pub effects: Vec<Effect>,
}

/// The one writer of sandbox states: read the row, ask the machine, and
/// compare-and-set in the store; when another writer moved the row in
/// between, ask again from the state it left.
pub async fn advance(
    store: &crate::store::Store,
    id: &str,
    event: &Event,
) -> Result<Moved, AdvanceError> {
    loop {
        let row = store
            .sandbox(id)
            .await?
            .ok_or_else(|| AdvanceError::NotFound(id.to_owned()))?;
        let (to, effects) = transition(row.state, event)?;
        if store
            .set_sandbox_state(&StateWrite(()), id, row.state, to, event.reason())
            .await?
        {
            return Ok(Moved {
                from: row.state,
                to,
                effects,
            });
        }
        // Each lost race means the row moved on; the machine has no cycles
        // without an event of ours, so this ends.
    }
}

/// [`advance`], but only while the sandbox is still in `expected`: a
/// sandbox that moved on meanwhile is refused, not moved from where it is
/// now (a pool drain must never stop a member a user just claimed).
pub async fn advance_if(
    store: &crate::store::Store,
    id: &str,
    expected: SandboxState,
    event: &Event,
) -> Result<Moved, AdvanceError> {
    let (to, effects) = transition(expected, event)?;
    if store
        .set_sandbox_state(&StateWrite(()), id, expected, to, event.reason())
        .await?
    {
        return Ok(Moved {
            from: expected,
            to,
            effects,
        });
    }
    let now = store
        .sandbox(id)
        .await?
        .ok_or_else(|| AdvanceError::NotFound(id.to_owned()))?;
    Err(AdvanceError::Refused(Refused {
        from: now.state,
        event: event.name(),
    }))
}

/// `Claimed`: move pool member `id` from `pooled` to `ready` and to its new
/// owner in one compare-and-set that also checks it still belongs to the
/// pool and runs `image_build_id`. `Ok(None)`: another claim, a drain or a
/// failure got there first (the caller tries another member).
pub async fn claim(
    store: &crate::store::Store,
    id: &str,
    pool_owner: &str,
    owner: &str,
    image_build_id: &str,
) -> Result<Option<Moved>, AdvanceError> {
    let (to, effects) = transition(SandboxState::Pooled, &Event::Claimed)?;
    let won = store
        .claim_sandbox(&StateWrite(()), id, pool_owner, owner, image_build_id)
        .await?;
    Ok(won.then_some(Moved {
        from: SandboxState::Pooled,
        to,
        effects,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Provisioned),
            Just(Event::Ready),
            proptest::option::of(".{0,8}").prop_map(Event::StopRequested),
            Just(Event::Released),
            ".{0,8}".prop_map(|reason| Event::Fail { label: "x", reason }),
            Just(Event::Pooled),
            Just(Event::Claimed),
        ]
    }

    #[test]
    fn happy_path() {
        let mut s = SandboxState::Provisioning;
        let mut effects = Vec::new();
        for e in [
            Event::Provisioned,
            Event::Ready,
            Event::StopRequested(None),
            Event::Released,
        ] {
            let (next, mut eff) = transition(s, &e).expect("valid");
            effects.append(&mut eff);
            s = next;
        }
        assert_eq!(s, SandboxState::Stopped);
        assert_eq!(
            effects,
            [
                Effect::Boot,
                Effect::CountReady,
                Effect::CloseViewers,
                Effect::Teardown
            ]
        );
    }

    #[test]
    fn names_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
        }
    }

    /// Every state against every event: the allowed edges, exactly, and the
    /// effects each one names. Anything else is refused with the state and
    /// event named.
    #[test]
    fn every_pair_is_decided() {
        use SandboxState::*;
        for s in SandboxState::ALL {
            for e in Event::samples() {
                let got = transition(s, &e);
                let want = match (s, e.name()) {
                    (Provisioning, "Provisioned") => Some(Booting),
                    (Booting, "Ready") => Some(Ready),
                    (Provisioning | Booting | Ready | Failed | Pooled, "StopRequested") => {
                        Some(Stopping)
                    }
                    (Stopping, "Released") => Some(Stopped),
                    (Provisioning | Booting | Ready | Pooled, "Fail") => Some(Failed),
                    (Booting, "Pooled") => Some(Pooled),
                    (Pooled, "Claimed") => Some(Ready),
                    _ => None,
                };
                match (got, want) {
                    (Ok((next, effects)), Some(w)) => {
                        assert_eq!(next, w, "{s} + {}", e.name());
                        // Every way into an end tears down.
                        if matches!(next, Stopping | Failed) {
                            assert!(effects.contains(&Effect::Teardown), "{s} + {}", e.name());
                        }
                    }
                    (Err(refused), None) => {
                        assert_eq!(refused.from, s);
                        assert!(refused.to_string().contains(s.as_str()));
                        assert!(refused.to_string().contains(e.name()));
                    }
                    (got, want) => panic!("{s} + {}: got {got:?}, want {want:?}", e.name()),
                }
            }
        }
    }

    /// The edges a diagram draws: `a ──Event──▶ b` (chains allowed).
    fn drawn_edges(text: &str) -> BTreeSet<(String, String, String)> {
        let mut edges = BTreeSet::new();
        for line in text.lines() {
            let line = line.trim_start_matches("//!");
            let words: Vec<&str> = line.split_whitespace().collect();
            for w in words.windows(3) {
                if let Some(event) = w[1].strip_prefix("──").and_then(|r| r.strip_suffix("──▶"))
                {
                    if SandboxState::parse(w[0]).is_some() && SandboxState::parse(w[2]).is_some() {
                        edges.insert((w[0].to_owned(), event.to_owned(), w[2].to_owned()));
                    }
                }
            }
        }
        edges
    }

    fn machine_edges() -> BTreeSet<(String, String, String)> {
        let mut edges = BTreeSet::new();
        for s in SandboxState::ALL {
            for e in Event::samples() {
                if let Ok((next, _)) = transition(s, &e) {
                    edges.insert((s.to_string(), e.name().to_owned(), next.to_string()));
                }
            }
        }
        edges
    }

    /// The module's diagram and the one in docs/architecture.md draw the
    /// machine as it is, no edge more or less.
    #[test]
    fn the_diagrams_match_the_machine() {
        let machine = machine_edges();
        assert_eq!(machine.len(), 14);
        let module = drawn_edges(include_str!("state.rs"));
        assert_eq!(module, machine, "the diagram at the top of app/state.rs");
        let doc = include_str!("../../../../docs/architecture.md");
        let section = doc
            .split("<!-- sandbox machine -->")
            .nth(1)
            .expect("docs/architecture.md marks the sandbox machine's diagram");
        assert_eq!(drawn_edges(section), machine, "docs/architecture.md");
    }

    proptest! {
        /// Whatever happens, stopped is final, and nothing reaches ready
        /// without passing through booting (itself, or as a pool member).
        #[test]
        fn invariants_hold(events in proptest::collection::vec(event(), 0..40)) {
            let mut s = SandboxState::Provisioning;
            for e in &events {
                let before = s;
                match transition(s, e) {
                    Ok((next, _)) => {
                        prop_assert_ne!(before, SandboxState::Stopped);
                        if next == SandboxState::Ready { prop_assert!(matches!(before, SandboxState::Booting | SandboxState::Pooled)); }
                        // Nothing goes back into a pool.
                        if next == SandboxState::Pooled { prop_assert_eq!(before, SandboxState::Booting); }
                        if next == SandboxState::Stopped { prop_assert_eq!(before, SandboxState::Stopping); }
                        s = next;
                    }
                    Err(_) => prop_assert_eq!(s, before),
                }
            }
        }

        /// Any state that holds resources can always reach an end, so a
        /// sandbox can never get stuck holding them.
        #[test]
        fn live_states_can_always_be_ended(idx in 0usize..7) {
            let s = SandboxState::ALL[idx];
            if s.is_live() {
                let ended = transition(s, &Event::Fail { label: "x", reason: "x".into() }).is_ok()
                    || transition(s, &Event::Released).is_ok();
                prop_assert!(ended);
            }
        }
    }
}
