//! Many hosts over fakes: the real router, placement, duties and store
//! (SQLite in a temporary directory), with `FakeNode`s as the nodes.

use super::placement::Need;
use super::router::{Cluster, ClusterForwarders, ClusterProbe, Connector, Member};
use crate::app::agent::fake::FakeGuest;
use crate::app::state::SandboxState;
use crate::app::{App, AppConfig, Seams};
use crate::node::fake::{tests_support, FakeNode};
use crate::node::{EgressBinding, Node, NodeEgress, NodeError};
use crate::store::{now_ms, NodeRow, SandboxRow, Store};
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::ImageRef;
use airlock_proto::metadata::SandboxKind;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A node's forward proxies: which sandboxes have one.
#[derive(Debug, Default)]
struct FakeEgress(Mutex<Vec<String>>);

#[async_trait]
impl NodeEgress for FakeEgress {
    async fn attach(&self, b: &EgressBinding) -> Result<(), NodeError> {
        self.0.lock().expect("ok").push(b.sandbox_id.clone());
        Ok(())
    }
    async fn rebind(&self, b: &EgressBinding) -> Result<(), NodeError> {
        self.attach(b).await
    }
    async fn detach(&self, id: &str) -> Result<(), NodeError> {
        self.0.lock().expect("ok").retain(|s| s != id);
        Ok(())
    }
}

struct Nodes {
    fakes: HashMap<String, (Arc<FakeNode>, Arc<FakeEgress>)>,
}

impl Nodes {
    fn new(names: &[&str]) -> Self {
        Nodes {
            fakes: names
                .iter()
                .map(|n| (n.to_string(), (Arc::new(FakeNode::new()), Arc::default())))
                .collect(),
        }
    }

    fn connector(&self) -> Connector {
        let fakes = self.fakes.clone();
        Arc::new(move |row: &NodeRow| {
            let (node, egress) = fakes.get(&row.name).expect("a known node").clone();
            Member { node, egress }
        })
    }

    fn node(&self, name: &str) -> &Arc<FakeNode> {
        &self.fakes[name].0
    }
}

fn registered(name: &str, lease_ms: i64) -> NodeRow {
    let now = now_ms();
    NodeRow {
        name: name.into(),
        address: "127.0.0.1:1".into(),
        backend: "fake".into(),
        image_build_id: "build-1".into(),
        cpus: 2,
        memory_total: 64 << 30,
        memory_free: 32 << 30,
        disk_free: 100 << 30,
        running: 0,
        started_at: now,
        heartbeat_at: now,
        lease_expires_at: now + lease_ms,
        draining: false,
    }
}

fn need() -> Need {
    Need {
        image_build_id: String::new(),
        memory: 512 << 20,
        min_free_memory: 768 << 20,
        min_free_disk: 2 << 30,
    }
}

async fn store(dir: &std::path::Path) -> Store {
    Store::open(&format!("sqlite://{}/airlock.db", dir.display()))
        .await
        .expect("store")
}

async fn insert(store: &Store, id: &str, index: u32) {
    let now = now_ms();
    store
        .insert_sandbox(&SandboxRow {
            id: id.into(),
            owner_id: "pool".into(),
            kind: SandboxKind::Browser,
            state: SandboxState::Provisioning,
            failure_reason: None,
            image_build_id: "build-1".into(),
            lease_index: Some(index),
            agent_token: "t".into(),
            vnc_password: "p".into(),
            display_width: 1280,
            display_height: 800,
            created_at: now,
            updated_at: now,
            ready_at: None,
            last_heartbeat_at: None,
            last_activity_at: now,
        })
        .await
        .expect("insert");
}

/// New sandboxes spread over equal nodes in turn; every later call for a
/// sandbox goes to the node it was placed on, and the row says which.
#[tokio::test]
async fn sandboxes_spread_over_nodes_and_calls_follow_them() {
    let tmp = tempfile::tempdir().expect("ok");
    let store = store(tmp.path()).await;
    let nodes = Nodes::new(&["a", "b", "c"]);
    for n in ["a", "b", "c"] {
        store.upsert_node(&registered(n, 10_000)).await.expect("ok");
    }
    let cluster = Cluster::new(store.clone(), nodes.connector(), need());
    for i in 0..6u32 {
        let id = format!("sb{i}");
        insert(&store, &id, i).await;
        let mut req = tests_support::create_request(&id, i);
        req.image.build_id = "build-1".into();
        cluster.create(&req).await.expect("create");
        cluster.start(&id).await.expect("start");
    }
    for n in ["a", "b", "c"] {
        assert_eq!(nodes.node(n).ids().len(), 2, "node {n}");
        for id in nodes.node(n).ids() {
            assert_eq!(store.node_of(&id).await.expect("ok").as_deref(), Some(n));
            assert!(cluster.inspect(&id).await.expect("ok").running);
        }
    }
    // A repeated create lands where the first one did.
    let on = store.node_of("sb0").await.expect("ok").expect("ok");
    let mut again = tests_support::create_request("sb0", 0);
    again.image.build_id = "build-1".into();
    cluster.create(&again).await.expect("repeat");
    assert_eq!(
        nodes.node(&on).ids().iter().filter(|i| *i == "sb0").count(),
        1
    );
    assert_eq!(cluster.list().await.expect("ok").len(), 6);
    cluster.destroy("sb0").await.expect("destroy");
    assert!(nodes.node(&on).instance("sb0").is_none());
    // Never placed: nothing to destroy anywhere.
    cluster
        .destroy("never")
        .await
        .expect("destroy of an unplaced one");
}

/// A node whose lease ran out is not asked (and not placed on): the error
/// names it; one whose image differs is not placed on either.
#[tokio::test]
async fn a_lost_node_is_named_and_skipped() {
    let tmp = tempfile::tempdir().expect("ok");
    let store = store(tmp.path()).await;
    let nodes = Nodes::new(&["a", "b"]);
    store
        .upsert_node(&registered("a", 10_000))
        .await
        .expect("ok");
    let mut old = registered("b", 10_000);
    old.image_build_id = "build-0".into();
    store.upsert_node(&old).await.expect("ok");
    let cluster = Cluster::new(store.clone(), nodes.connector(), need());
    insert(&store, "x", 1).await;
    let mut req = tests_support::create_request("x", 1);
    req.image.build_id = "build-1".into();
    cluster.create(&req).await.expect("create");
    assert_eq!(nodes.node("a").ids(), ["x"]);
    store.upsert_node(&registered("a", -1)).await.expect("ok");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = cluster
        .liveness("x")
        .await
        .expect_err("a lost node answered");
    assert!(err.to_string().contains("node a is lost"), "{err}");
    insert(&store, "y", 2).await;
    let mut req = tests_support::create_request("y", 2);
    req.image.build_id = "build-1".into();
    let err = cluster
        .create(&req)
        .await
        .expect_err("placed on a lost node");
    assert!(
        err.to_string()
            .contains("no node that is up has image build-1"),
        "{err}"
    );
    assert!(nodes.node("b").ids().is_empty());
}

/// Through the real app: a sandbox placed on a node becomes ready there;
/// when the node stops renewing its lease, the leader's next round fails
/// the sandbox naming the node, and the capacity probe sees no room.
#[tokio::test]
async fn the_leader_fails_the_sandboxes_of_a_lost_node() {
    let tmp = tempfile::tempdir().expect("ok");
    let store = store(tmp.path()).await;
    let nodes = Nodes::new(&["a"]);
    store
        .upsert_node(&registered("a", 60_000))
        .await
        .expect("ok");
    let cluster = Cluster::new(store.clone(), nodes.connector(), need());
    cluster.nodes().await.expect("ok");
    let mut cfg = AppConfig::new(tmp.path().to_path_buf());
    cfg.cluster = true;
    cfg.boot_timeout = Duration::from_secs(5);
    let seams = Seams {
        node: cluster.clone(),
        guest: Arc::new(FakeGuest::new(nodes.node("a").clone())),
        forwarders: Arc::new(ClusterForwarders(cluster.clone())),
        probe: Arc::new(ClusterProbe(cluster.clone())),
    };
    let app = App::with_seams(
        cfg,
        store.clone(),
        seams,
        ImageRef {
            build_id: "build-1".into(),
            layers: vec![],
        },
        AddressPool::parse("10.247.0.0/24").expect("ok"),
        crate::vault::Vault::load(tmp.path()).expect("ok"),
    );
    let user = app.ensure_local_user().await.expect("ok");
    let row = app
        .create_sandbox(&user, SandboxKind::Browser)
        .await
        .expect("create");
    let ready = settle(&store, &row.id, SandboxState::Ready).await;
    assert_eq!(
        store.node_of(&ready.id).await.expect("ok").as_deref(),
        Some("a")
    );
    assert_eq!(
        *nodes.fakes["a"].1 .0.lock().expect("ok"),
        vec![row.id.clone()]
    );
    assert!(app.leading().await, "the only process leads");

    store.upsert_node(&registered("a", -1)).await.expect("ok");
    app.cluster_once().await;
    let failed = settle(&store, &row.id, SandboxState::Failed).await;
    let why = failed.failure_reason.unwrap_or_default();
    assert!(
        why.starts_with("node lost: a stopped renewing its lease"),
        "{why}"
    );
    // The registry as this replica last read it still had the node up, and
    // the (fake) node answered: its teardown went through.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(nodes.node("a").instance(&row.id).is_none());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cluster.nodes().await.expect("ok");
    let refused = app.create_sandbox(&user, SandboxKind::Browser).await;
    assert!(refused.is_err(), "admitted with no node up");
}

async fn settle(store: &Store, id: &str, want: SandboxState) -> SandboxRow {
    for _ in 0..200 {
        let row = store.sandbox(id).await.expect("ok").expect("ok");
        if row.state == want {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("sandbox {id} never became {want}");
}
