//! Many hosts on this one machine: three `airlock node` processes (each its
//! own data dir and node API port), two `airlock up` replicas and one real
//! PostgreSQL, all real binaries. Sandboxes spread over the nodes; a viewer
//! through one replica shows a desktop on another node; exec works through
//! the other replica; a node killed with SIGKILL has its sandboxes failed
//! "node lost" and new ones placed elsewhere; the node started again leaves
//! nothing behind; a replica killed in the middle of a create leaves
//! nothing half-made, and the create succeeds on the other replica.

mod common;

#[allow(dead_code)]
#[path = "common/child.rs"]
mod child;

#[allow(dead_code)]
#[path = "common/pg.rs"]
mod pg;

use airlock_server::store::Store;
use child::ChildPlane;
use common::unmet;
use pg::OwnPostgres;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The address pool every process of the cluster shares (leases are
/// cluster-wide, so nodes on one host never clash).
const POOL: &str = "10.249.0.0/24";

/// The cluster's settings, shared by every config.
fn cluster_lines(url: &str, token: &Path) -> String {
    format!(
        "database_url = \"{url}\"\nboot_timeout_s = 30\n\
         [cluster]\nenabled = true\ntoken_file = \"{}\"\n",
        token.display()
    )
}

/// `airlock node --config <file>` as a child process.
struct ChildNode {
    name: String,
    child: Option<Child>,
    config: PathBuf,
    data_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl ChildNode {
    fn start(name: &str, url: &str, token: &Path) -> ChildNode {
        let tmp = tempfile::Builder::new()
            .prefix("airlock-node-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let data_dir = tmp.path().join("data");
        let config = tmp.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\naddress_pool = \"{POOL}\"\nmin_free_disk_mb = 256\n\
                 database_url = \"{url}\"\n\
                 [cluster]\ntoken_file = \"{}\"\n\
                 [node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
                 heartbeat_ms = 1000\nlease_ms = 6000\n",
                data_dir.display(),
                token.display()
            ),
        )
        .expect("config");
        let mut node = ChildNode {
            name: name.to_owned(),
            child: None,
            config,
            data_dir,
            _tmp: tmp,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let mut child = Command::new(child::binary())
            .args(["node", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("airlock node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let name = self.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("airlock node {name}: {line}");
                if line.starts_with("airlock node ") && line.contains(" is up") {
                    let _ = tx.send(());
                }
            }
        });
        let started = Instant::now();
        loop {
            if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("airlock node {} exited with {status}", self.name);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "airlock node {} did not come up",
                self.name
            );
        }
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
        }
    }

    /// Sandboxes this node's driver still holds.
    fn held(&self) -> Vec<String> {
        let dir = self.data_dir.join("sandboxes");
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for ChildNode {
    /// Stop the node and destroy what it left, with the driver's own destroy.
    fn drop(&mut self) {
        self.kill9();
        child::destroy_leftovers(&self.config, &self.data_dir);
    }
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            base: format!("{base}/api/v1"),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({ "transport": e.to_string() })),
        }
    }

    async fn create(&self) -> String {
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/sandboxes", self.base))
                    .json(&json!({"kind": "browser"})),
            )
            .await;
        assert_eq!(status, 201, "create: {body}");
        body["id"].as_str().expect("id").to_owned()
    }

    async fn get(&self, id: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}/sandboxes/{id}", self.base)))
            .await
    }

    async fn wait_state(&self, id: &str, want: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.get(id).await;
            if status == 200 && body["state"] == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox {id} is not {want} after {within:?}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn delete(&self, id: &str) -> u16 {
        self.send(self.http.delete(format!("{}/sandboxes/{id}", self.base)))
            .await
            .0
    }
}

fn write_token(dir: &Path) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("cluster.token");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .expect("token file");
    std::io::Write::write_all(&mut f, b"a-cluster-token-of-the-test-0123456789abcdef\n")
        .expect("token");
    path
}

/// A replica whose keyring is `keyring` (every replica must share one), on
/// a fixed loopback port (a browser comes back to it after a restart).
fn replica(lines: &str, keyring: Option<&Path>, parent: &Path, name: &str) -> ChildPlane {
    let data = parent.join(name);
    std::fs::create_dir_all(&data).expect("data dir");
    if let Some(keys) = keyring {
        std::fs::copy(keys, data.join("vault.keys")).expect("keyring");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    ChildPlane::start_at(POOL, lines, Some(data), &format!("127.0.0.1:{port}"))
}

/// `airlock node drain|resume NAME` through a replica's config.
fn node_cli(plane: &ChildPlane, args: &[&str]) {
    let out = Command::new(child::binary())
        .arg("node")
        .args(args)
        .arg("--config")
        .arg(plane.config_path())
        .output()
        .expect("airlock node");
    assert!(
        out.status.success(),
        "airlock node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The browser viewer script, reporting each time it shows the desktop.
struct Watcher {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watcher {
    fn start(base: &str, id: &str, rounds: u32) -> Watcher {
        let mut child = tokio::process::Command::new("node")
            .arg(common::repo_root().join("tests/e2e/reconnect.mjs"))
            .args(["--url", base, "--sandbox", id, "--rounds"])
            .arg(rounds.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().expect("stdout");
        use tokio::io::AsyncBufReadExt;
        Watcher {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    async fn expect(&mut self, want: &str) {
        let line = tokio::time::timeout(Duration::from_secs(150), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the viewer did not say {want:?} in time"))
            .expect("read")
            .unwrap_or_else(|| panic!("the viewer script ended before {want:?}"));
        assert_eq!(line, want, "the viewer script");
    }

    async fn finish(mut self) {
        self.expect("ok").await;
        let status = self.child.wait().await.expect("wait");
        assert!(status.success(), "the viewer script: {status}");
    }
}

async fn node_of(store: &Store, id: &str) -> String {
    store
        .node_of(id)
        .await
        .expect("store")
        .unwrap_or_else(|| panic!("sandbox {id} was not placed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_two_replicas_one_postgres() {
    if unmet().is_some() || child::unmet().is_some() || common::browser_unmet().is_some() {
        return;
    }
    let (_pg, url) = OwnPostgres::start();
    let tmp = tempfile::Builder::new()
        .prefix("airlock-cluster-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let token = write_token(tmp.path());
    let mut nodes: Vec<ChildNode> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| ChildNode::start(n, &url, &token))
        .collect();
    let lines = cluster_lines(&url, &token);
    let mut a = replica(&lines, None, tmp.path(), "replica-a");
    let keyring = a.data_dir.join("vault.keys");
    let b = replica(&lines, Some(&keyring), tmp.path(), "replica-b");
    let (api_a, api_b) = (Api::new(&a.base), Api::new(&b.base));
    let store = Store::open(&url).await.expect("store");

    // The UI through replica A, with n1 and n2 drained: its desktop runs on
    // n3, and the browser types into it (tests/e2e/desktop.mjs).
    node_cli(&a, &["drain", "n1", "--no-wait"]);
    node_cli(&a, &["drain", "n2", "--no-wait"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let artifacts = common::repo_root().join("target/e2e/cluster");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let status = tokio::process::Command::new("node")
        .arg(common::repo_root().join("tests/e2e/desktop.mjs"))
        .args(["--url", &a.base, "--artifacts"])
        .arg(&artifacts)
        .status()
        .await
        .expect("node runs");
    assert!(
        status.success(),
        "the UI through replica A failed ({status})"
    );
    let (_, list) = api_a
        .send(api_a.http.get(format!("{}/sandboxes", api_a.base)))
        .await;
    let by_ui: Vec<String> = list["sandboxes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    assert!(!by_ui.is_empty(), "the UI made no sandbox");
    for id in &by_ui {
        assert_eq!(node_of(&store, id).await, "n3", "drained nodes took {id}");
    }

    for id in &by_ui {
        api_a
            .wait_state(id, "stopped", Duration::from_secs(60))
            .await;
    }
    node_cli(&a, &["resume", "n1"]);
    node_cli(&a, &["resume", "n2"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Six sandboxes, created through both replicas, spread over the nodes.
    let mut ids = Vec::new();
    for i in 0..6 {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        ids.push(api.create().await);
    }
    for id in &ids {
        api_b.wait_state(id, "ready", Duration::from_secs(90)).await;
    }
    let mut per_node = std::collections::BTreeMap::<String, Vec<String>>::new();
    for id in &ids {
        per_node
            .entry(node_of(&store, id).await)
            .or_default()
            .push(id.clone());
    }
    eprintln!("placement: {per_node:?}");
    assert_eq!(
        per_node.len(),
        3,
        "not spread over the three nodes: {per_node:?}"
    );
    for n in &nodes {
        let on = &per_node[&n.name];
        let mut held = n.held();
        held.sort();
        let mut want = on.clone();
        want.sort();
        assert_eq!(
            held, want,
            "node {} holds what the store placed on it",
            n.name
        );
    }

    // Exec through replica B on a sandbox replica A made, on another node.
    let made_by_a = &ids[0];
    let (status, out) = api_b
        .send(
            api_b
                .http
                .post(format!("{}/sandboxes/{made_by_a}/exec", api_b.base))
                .json(&json!({"argv": ["sh", "-c", "echo from-$(id -un)"]})),
        )
        .await;
    assert_eq!(status, 200, "exec: {out}");
    assert!(
        out["stdout"].as_str().unwrap_or("").contains("from-"),
        "exec output: {out}"
    );

    // The desktop of a sandbox on n3, read over the viewer of replica A
    // (RFB through the replica's tunnel to n3's node API).
    let on_n3 = per_node["n3"][0].clone();
    let frame = common::viewer::frame(&a.base, &on_n3)
        .await
        .expect("a frame of n3's desktop through replica A");
    assert!(frame.distinct_colours > 10, "a painted desktop: {frame:?}");

    // A viewer stays open while the node that runs its desktop and then
    // replica A (which serves it) restart: it comes back by itself each time,
    // and the sandbox was never lost.
    let watched = api_a.create().await;
    api_a
        .wait_state(&watched, "ready", Duration::from_secs(90))
        .await;
    let host = node_of(&store, &watched).await;
    let host = nodes.iter().position(|n| n.name == host).expect("a node");
    let mut viewer = Watcher::start(&a.base, &watched, 3);
    viewer.expect("connected 1").await;
    nodes[host].kill9();
    nodes[host].spawn();
    viewer.expect("connected 2").await;
    a.crash_and_restart();
    viewer.expect("connected 3").await;
    viewer.finish().await;
    let body = api_b.get(&watched).await.1;
    assert_eq!(body["state"], "ready", "lost in the restarts: {body}");
    let api_a = Api::new(&a.base);
    ids.push(watched);

    // n2 dies: its sandboxes fail "node lost" within 20 s, new ones go elsewhere.
    let lost: Vec<String> = per_node["n2"].clone();
    let killed = Instant::now();
    nodes[1].kill9();
    for id in &lost {
        let body = api_a
            .wait_state(id, "failed", Duration::from_secs(20))
            .await;
        let why = body["failure_reason"].as_str().unwrap_or_default();
        assert!(why.contains("node lost: n2"), "reason: {why}");
    }
    eprintln!("node loss noticed after {:?}", killed.elapsed());
    for _ in 0..2 {
        let id = api_a.create().await;
        api_a
            .wait_state(&id, "ready", Duration::from_secs(90))
            .await;
        let on = node_of(&store, &id).await;
        assert_ne!(on, "n2", "placed on a lost node");
        ids.push(id);
    }

    // n2 comes back: it destroys what the store no longer wants on it, and
    // the leader's teardown then gives the leases back.
    nodes[1].spawn();
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let mut released = true;
        for id in &lost {
            let row = store.sandbox(id).await.expect("store").expect("row");
            released &= row.lease_index.is_none();
        }
        if released && nodes[1].held().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n2 still holds {:?} (or leases are held)",
            nodes[1].held()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Replica A dies in the middle of a create: the client tries again on
    // B, which works; what A left half-made is failed by the leader and
    // nothing of it stays on any node.
    let half = api_a.create().await;
    a.kill9();
    let retried = api_b.create().await;
    api_b
        .wait_state(&retried, "ready", Duration::from_secs(90))
        .await;
    ids.push(retried);
    let body = api_b.get(&half).await.1;
    if body["state"] != "ready" {
        let body = api_b
            .wait_state(&half, "failed", Duration::from_secs(90))
            .await;
        eprintln!("the half-made sandbox: {body}");
    }
    ids.push(half);

    // Everything deleted through B: nothing stays on any node.
    for id in &ids {
        let status = api_b.delete(id).await;
        assert!(
            matches!(status, 200 | 202 | 204 | 409),
            "delete {id}: {status}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held: Vec<String> = nodes.iter().flat_map(ChildNode::held).collect();
        let mut leased = Vec::new();
        for id in &ids {
            if let Some(row) = store.sandbox(id).await.expect("store") {
                if row.lease_index.is_some() {
                    leased.push(id.clone());
                }
            }
        }
        if held.is_empty() && leased.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: held {held:?}, leases {leased:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(b);
}
