//! An in-memory [`Node`] for the orchestration's unit tests: sandboxes are
//! entries in a map, and every step can be made to fail, to take time, or to
//! wait until the test lets it go. The guests it "runs" answer through
//! [`crate::app::agent::fake::FakeGuest`], which reads the same map, so a
//! guest that was never started (or was killed) does not answer either.

use super::{BlockedPackets, CreateSandbox, GuestEndpoints, Instance, Liveness, Node, NodeError};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// One kind of node call, to aim a failure, delay or hold at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Create,
    Start,
    WaitReady,
    Stop,
    Destroy,
    Inspect,
    List,
    Liveness,
}

/// What the guest's VNC server does when probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayState {
    /// Accepts the handshake and sends a desktop.
    Up,
    /// Accepts the handshake; the first frame is still blank.
    Blank,
    /// Refuses connections (Xvnc died).
    Down,
}

/// One sandbox as the fake node holds it.
#[derive(Debug, Clone)]
pub struct FakeInstance {
    pub req: CreateSandbox,
    pub running: bool,
    /// Set by [`FakeNode::kill`]: liveness answers `Dead` with this text.
    pub dead: Option<String>,
    pub agent_up: bool,
    pub display: DisplayState,
    /// What its firewall dropped (see [`FakeNode::set_blocked`]).
    pub blocked: BlockedPackets,
}

#[derive(Debug, Default)]
struct World {
    instances: BTreeMap<String, FakeInstance>,
    once: HashMap<Step, VecDeque<NodeError>>,
    always: HashMap<Step, NodeError>,
    delays: HashMap<Step, Duration>,
    calls: Vec<(Step, String)>,
}

/// The in-memory node. Share it (`Arc`) between an `App` and the test, and
/// between two `App`s to play a control plane restart.
#[derive(Debug)]
pub struct FakeNode {
    world: Mutex<World>,
    /// Steps on hold: calls wait until the step is released.
    held: watch::Sender<HashSet<Step>>,
    /// Bumped on every call, so a test can wait for one to arrive.
    seen: watch::Sender<u64>,
}

impl Default for FakeNode {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeNode {
    pub fn new() -> Self {
        FakeNode {
            world: Mutex::new(World::default()),
            held: watch::channel(HashSet::new()).0,
            seen: watch::channel(0).0,
        }
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- injection ----

    /// The next call of `step` fails with `err` (queued: several calls, several failures).
    pub fn fail_once(&self, step: Step, err: NodeError) {
        self.world().once.entry(step).or_default().push_back(err);
    }

    /// Every call of `step` fails with `err` until [`FakeNode::heal`].
    pub fn fail_always(&self, step: Step, err: NodeError) {
        self.world().always.insert(step, err);
    }

    /// Undo failures and delays of `step`.
    pub fn heal(&self, step: Step) {
        let mut w = self.world();
        w.once.remove(&step);
        w.always.remove(&step);
        w.delays.remove(&step);
    }

    /// Every call of `step` takes `d` first.
    pub fn delay(&self, step: Step, d: Duration) {
        self.world().delays.insert(step, d);
    }

    /// Calls of `step` wait until [`FakeNode::release`].
    pub fn hold(&self, step: Step) {
        self.held.send_modify(|h| {
            h.insert(step);
        });
    }

    pub fn release(&self, step: Step) {
        self.held.send_modify(|h| {
            h.remove(&step);
        });
    }

    /// The supervisor of `id` died (its payload may still answer): liveness
    /// says `Dead(what)` from now on.
    pub fn kill(&self, id: &str, what: &str) {
        if let Some(i) = self.world().instances.get_mut(id) {
            i.dead = Some(what.to_owned());
        }
    }

    /// The guest powered off by itself.
    pub fn halt(&self, id: &str) {
        if let Some(i) = self.world().instances.get_mut(id) {
            i.running = false;
            i.agent_up = false;
            i.display = DisplayState::Down;
        }
    }

    pub fn set_agent_up(&self, id: &str, up: bool) {
        if let Some(i) = self.world().instances.get_mut(id) {
            i.agent_up = up;
        }
    }

    pub fn set_blocked(&self, id: &str, blocked: BlockedPackets) {
        if let Some(i) = self.world().instances.get_mut(id) {
            i.blocked = blocked;
        }
    }

    pub fn set_display(&self, id: &str, display: DisplayState) {
        if let Some(i) = self.world().instances.get_mut(id) {
            i.display = display;
        }
    }

    /// A sandbox the node holds without the control plane knowing it (an orphan).
    pub fn plant(&self, req: CreateSandbox, running: bool) {
        let id = req.id.clone();
        self.world().instances.insert(
            id,
            FakeInstance {
                req,
                running,
                dead: None,
                agent_up: running,
                display: if running {
                    DisplayState::Up
                } else {
                    DisplayState::Down
                },
                blocked: BlockedPackets::default(),
            },
        );
    }

    // ---- observation ----

    pub fn instance(&self, id: &str) -> Option<FakeInstance> {
        self.world().instances.get(id).cloned()
    }

    /// Ids of every sandbox the node holds resources for.
    pub fn ids(&self) -> Vec<String> {
        self.world().instances.keys().cloned().collect()
    }

    /// Every call so far, in order: (step, sandbox id or "" for list).
    pub fn calls(&self) -> Vec<(Step, String)> {
        self.world().calls.clone()
    }

    pub fn count(&self, step: Step, id: &str) -> usize {
        self.world()
            .calls
            .iter()
            .filter(|(s, i)| *s == step && i == id)
            .count()
    }

    /// Wait until `step` has been called for `id` (any id when empty).
    pub async fn called(&self, step: Step, id: &str) {
        let mut rx = self.seen.subscribe();
        loop {
            let hit = self
                .world()
                .calls
                .iter()
                .any(|(s, i)| *s == step && (id.is_empty() || i == id));
            if hit {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The guest whose agent or display listens at `ip`, if any.
    pub fn guest_at(&self, ip: IpAddr) -> Option<FakeInstance> {
        self.world()
            .instances
            .values()
            .find(|i| IpAddr::V4(i.req.lease.guest) == ip)
            .cloned()
    }

    /// Record the call, then honour holds, delays and failures aimed at it.
    async fn enter(&self, step: Step, id: &str) -> Result<(), NodeError> {
        let delay = {
            let mut w = self.world();
            w.calls.push((step, id.to_owned()));
            w.delays.get(&step).copied()
        };
        self.seen.send_modify(|n| *n += 1);
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| !h.contains(&step)).await;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut w = self.world();
        if let Some(err) = w.once.get_mut(&step).and_then(|q| q.pop_front()) {
            return Err(err);
        }
        if let Some(err) = w.always.get(&step) {
            return Err(err.clone());
        }
        Ok(())
    }
}

#[async_trait]
impl Node for FakeNode {
    fn name(&self) -> String {
        "fake".into()
    }

    async fn create(&self, req: &CreateSandbox) -> Result<(), NodeError> {
        self.enter(Step::Create, &req.id).await?;
        self.world()
            .instances
            .entry(req.id.clone())
            .or_insert_with(|| FakeInstance {
                req: req.clone(),
                running: false,
                dead: None,
                agent_up: false,
                display: DisplayState::Down,
                blocked: BlockedPackets::default(),
            });
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), NodeError> {
        self.enter(Step::Start, id).await?;
        let mut w = self.world();
        let i = w
            .instances
            .get_mut(id)
            .ok_or_else(|| NodeError::NotFound(id.to_owned()))?;
        if !i.running && i.dead.is_none() {
            i.running = true;
            i.agent_up = true;
            i.display = DisplayState::Up;
        }
        Ok(())
    }

    async fn wait_ready(&self, id: &str, _timeout: Duration) -> Result<GuestEndpoints, NodeError> {
        self.enter(Step::WaitReady, id).await?;
        let w = self.world();
        let i = w
            .instances
            .get(id)
            .ok_or_else(|| NodeError::NotFound(id.to_owned()))?;
        if !i.running {
            return Err(NodeError::GuestExited(
                "the fake guest is not running".into(),
            ));
        }
        Ok(GuestEndpoints::at(i.req.lease.guest))
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), NodeError> {
        self.enter(Step::Stop, id).await?;
        self.halt(id);
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), NodeError> {
        self.enter(Step::Destroy, id).await?;
        self.world().instances.remove(id);
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Instance, NodeError> {
        self.enter(Step::Inspect, id).await?;
        let w = self.world();
        let i = w
            .instances
            .get(id)
            .ok_or_else(|| NodeError::NotFound(id.to_owned()))?;
        Ok(Instance {
            id: id.to_owned(),
            running: i.running && i.dead.is_none(),
        })
    }

    async fn list(&self) -> Result<Vec<Instance>, NodeError> {
        self.enter(Step::List, "").await?;
        Ok(self
            .world()
            .instances
            .values()
            .map(|i| Instance {
                id: i.req.id.clone(),
                running: i.running && i.dead.is_none(),
            })
            .collect())
    }

    async fn liveness(&self, id: &str) -> Result<Liveness, NodeError> {
        self.enter(Step::Liveness, id).await?;
        let w = self.world();
        let i = w
            .instances
            .get(id)
            .ok_or_else(|| NodeError::NotFound(id.to_owned()))?;
        Ok(match (&i.dead, i.running) {
            (Some(what), _) => Liveness::Dead(what.clone()),
            (None, false) => Liveness::Dead("the fake guest is not running".into()),
            (None, true) => Liveness::Alive,
        })
    }

    async fn blocked_packets(&self, id: &str) -> Result<Option<BlockedPackets>, NodeError> {
        Ok(self.world().instances.get(id).map(|i| i.blocked))
    }
}

/// Requests for tests of the seam itself.
pub mod tests_support {
    use super::super::{NodeImage, NodeLease};
    use super::CreateSandbox;
    use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};
    use std::net::Ipv4Addr;

    /// A create request for sandbox `id` on lease `index` of 10.247.0.0/16.
    pub fn create_request(id: &str, index: u32) -> CreateSandbox {
        let base = 4 * index;
        let host = Ipv4Addr::new(10, 247, (base >> 8) as u8, (base & 0xff) as u8 + 1);
        let guest = Ipv4Addr::new(10, 247, (base >> 8) as u8, (base & 0xff) as u8 + 2);
        CreateSandbox {
            id: id.to_owned(),
            kind: SandboxKind::Browser,
            image: NodeImage {
                build_id: "build-1".into(),
                layers: vec![],
            },
            lease: NodeLease {
                index,
                host,
                guest,
                prefix_len: 30,
            },
            metadata: Metadata {
                sandbox_id: id.to_owned(),
                kind: SandboxKind::Browser,
                agent_token: "token".into(),
                vnc_password: "pw".into(),
                display: Display::default(),
                network: Network {
                    address: guest.to_string(),
                    gateway: host.to_string(),
                    prefix_len: 30,
                },
                egress: None,
            },
            limits: airlock_drivers::Limits::default().into(),
            proxy_port: None,
            home_volume: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::create_request;
    use super::*;

    #[tokio::test]
    async fn a_fake_sandbox_lives_and_dies_as_told() {
        let node = FakeNode::new();
        let req = create_request("a", 0);
        node.create(&req).await.expect("create");
        node.create(&req).await.expect("create is idempotent");
        node.start("a").await.expect("start");
        let ends = node
            .wait_ready("a", Duration::from_secs(1))
            .await
            .expect("ready");
        assert_eq!(ends.agent.ip(), IpAddr::V4(req.lease.guest));
        assert_eq!(node.liveness("a").await.expect("live"), Liveness::Alive);
        node.kill("a", "systemd-nspawn (pid 1) exited");
        assert_eq!(
            node.liveness("a").await.expect("live"),
            Liveness::Dead("systemd-nspawn (pid 1) exited".into())
        );
        node.destroy("a").await.expect("destroy");
        node.destroy("a").await.expect("destroy is idempotent");
        assert!(node.ids().is_empty());
    }

    #[tokio::test]
    async fn failures_once_and_always() {
        let node = FakeNode::new();
        node.fail_once(Step::Create, NodeError::Transient("busy".into()));
        let req = create_request("b", 1);
        assert!(node.create(&req).await.is_err());
        node.create(&req).await.expect("second try");
        node.fail_always(Step::Destroy, NodeError::Failed("stuck".into()));
        assert!(node.destroy("b").await.is_err());
        assert!(node.destroy("b").await.is_err());
        node.heal(Step::Destroy);
        node.destroy("b").await.expect("healed");
        assert_eq!(node.count(Step::Destroy, "b"), 3);
    }

    #[tokio::test]
    async fn a_held_step_waits_for_its_release() {
        let node = std::sync::Arc::new(FakeNode::new());
        node.hold(Step::Create);
        let n = node.clone();
        let task = tokio::spawn(async move { n.create(&create_request("c", 2)).await });
        node.called(Step::Create, "c").await;
        assert!(node.ids().is_empty(), "held: not created yet");
        node.release(Step::Create);
        task.await.expect("join").expect("create");
        assert_eq!(node.ids(), vec!["c".to_owned()]);
    }
}
