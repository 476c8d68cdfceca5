//! The warm pool: pre-booted, paused VMs per image build, so that a sandbox
//! starts by resuming a VM instead of booting one. Pure bookkeeping (no I/O):
//! the caller performs the actions it returns and reports back.
//!
//! ```text
//!   template: cold boot ─▶ agent ready ─▶ PATCH /vm Paused ─▶ snapshot/create (Full)
//!
//!   member:   (planned) ─Restore─▶ restoring ─restored─▶ paused ─claim─▶ handed out
//!                                       │                   │
//!                                       └─failed─▶ gone     └─new build─▶ Discard
//! ```
//!
//! A member is restored with `snapshot/load` on its own TAP
//! (`network_overrides`) and its own jail (the snapshot names its disks by
//! path; inside per-VM jails the same path is a different file). Claiming
//! writes the sandbox's metadata to MMDS and resumes it.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Restoring,
    Paused,
}

/// What the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolAction {
    /// Restore a new member with this id from the build's snapshot.
    Restore { member: String, build_id: String },
    /// Kill and remove this member (it belongs to an old build).
    Discard { member: String },
}

#[derive(Debug, Clone)]
pub struct WarmPool {
    build_id: String,
    target: usize,
    members: BTreeMap<String, (String, MemberState)>,
    next: u64,
}

impl WarmPool {
    pub fn new(build_id: &str, target: usize) -> Self {
        WarmPool {
            build_id: build_id.to_owned(),
            target,
            members: BTreeMap::new(),
            next: 0,
        }
    }

    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    /// Members of the current build, restoring or paused.
    fn live(&self) -> usize {
        self.members
            .values()
            .filter(|(b, _)| *b == self.build_id)
            .count()
    }

    pub fn paused(&self) -> usize {
        self.members
            .values()
            .filter(|(b, s)| *b == self.build_id && *s == MemberState::Paused)
            .count()
    }

    /// Restores to bring the pool up to its target, discards of members of
    /// other builds. Planned restores are counted at once, so calling `plan`
    /// twice never over-fills.
    pub fn plan(&mut self) -> Vec<PoolAction> {
        let mut actions: Vec<PoolAction> = self
            .members
            .iter()
            .filter(|(_, (b, _))| *b != self.build_id)
            .map(|(m, _)| PoolAction::Discard { member: m.clone() })
            .collect();
        self.members.retain(|_, (b, _)| *b == self.build_id);
        while self.live() < self.target {
            self.next += 1;
            let member = format!("pool-{}-{}", &self.build_id, self.next);
            self.members.insert(
                member.clone(),
                (self.build_id.clone(), MemberState::Restoring),
            );
            actions.push(PoolAction::Restore {
                member,
                build_id: self.build_id.clone(),
            });
        }
        actions
    }

    pub fn restored(&mut self, member: &str) {
        if let Some((_, state)) = self.members.get_mut(member) {
            *state = MemberState::Paused;
        }
    }

    /// A restore failed: forget the member (the next `plan` replaces it).
    pub fn failed(&mut self, member: &str) {
        self.members.remove(member);
    }

    /// Hand out a paused member of the current build, if there is one; the
    /// caller falls back to a cold boot otherwise.
    pub fn claim(&mut self) -> Option<String> {
        let member = self
            .members
            .iter()
            .find(|(_, (b, s))| *b == self.build_id && *s == MemberState::Paused)
            .map(|(m, _)| m.clone())?;
        self.members.remove(&member);
        Some(member)
    }

    /// A new image build: its members replace the old ones on the next `plan`.
    pub fn retarget(&mut self, build_id: &str) {
        self.build_id = build_id.to_owned();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fills_claims_and_refills() {
        let mut pool = WarmPool::new("b1", 2);
        let actions = pool.plan();
        assert_eq!(actions.len(), 2);
        assert!(pool.plan().is_empty(), "planned restores count");
        assert_eq!(pool.claim(), None, "nothing is paused yet");
        for a in &actions {
            if let PoolAction::Restore { member, .. } = a {
                pool.restored(member);
            }
        }
        assert_eq!(pool.paused(), 2);
        assert!(pool.claim().is_some());
        assert_eq!(pool.plan().len(), 1);
    }

    #[test]
    fn a_new_build_discards_the_old_members() {
        let mut pool = WarmPool::new("b1", 1);
        let first = pool.plan();
        let PoolAction::Restore { member, .. } = &first[0] else {
            panic!("expected a restore");
        };
        pool.restored(member);
        pool.retarget("b2");
        assert_eq!(pool.claim(), None, "old build's VMs are never handed out");
        let actions = pool.plan();
        assert!(actions.contains(&PoolAction::Discard {
            member: member.clone()
        }));
        assert!(actions
            .iter()
            .any(|a| matches!(a, PoolAction::Restore { build_id, .. } if build_id == "b2")));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Plan,
        RestoreOk(usize),
        RestoreFail(usize),
        Claim,
        Retarget(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Plan),
            (0usize..8).prop_map(Op::RestoreOk),
            (0usize..8).prop_map(Op::RestoreFail),
            Just(Op::Claim),
            (0u8..3).prop_map(Op::Retarget),
        ]
    }

    proptest! {
        #[test]
        fn never_overfills_and_never_hands_out_a_stale_or_unready_vm(
            target in 0usize..5,
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut pool = WarmPool::new("b0", target);
            let mut restoring: Vec<(String, String)> = Vec::new();
            let mut ready: std::collections::BTreeMap<String, String> = Default::default();
            for op in ops {
                match op {
                    Op::Plan => {
                        for a in pool.plan() {
                            match a {
                                PoolAction::Restore { member, build_id } => restoring.push((member, build_id)),
                                PoolAction::Discard { member } => { ready.remove(&member); restoring.retain(|(m, _)| *m != member); }
                            }
                        }
                        prop_assert!(pool.live() <= target);
                    }
                    Op::RestoreOk(i) if i < restoring.len() => {
                        let (m, b) = restoring.remove(i);
                        pool.restored(&m);
                        ready.insert(m, b);
                    }
                    Op::RestoreFail(i) if i < restoring.len() => {
                        let (m, _) = restoring.remove(i);
                        pool.failed(&m);
                    }
                    Op::Claim => {
                        if let Some(m) = pool.claim() {
                            let b = ready.remove(&m);
                            prop_assert_eq!(b.as_deref(), Some(pool.build_id()));
                        }
                    }
                    Op::Retarget(n) => pool.retarget(&format!("b{n}")),
                    _ => {}
                }
            }
        }
    }
}
