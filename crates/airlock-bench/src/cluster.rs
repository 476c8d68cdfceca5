//! Many hosts (docs/cluster.md), measured with the real binaries: three
//! `airlock node` processes, one `airlock up` replica and one PostgreSQL
//! (`scripts/pg-test-server`), against a single-host `airlock up` (SQLite,
//! the node in the process). Four figures:
//! - placement decision time (`cluster::placement::place`, in this process);
//! - create → ready through the replica vs the single host;
//! - many creates over the three nodes, a bounded number live at once;
//! - lease-expiry detection: a node killed with SIGKILL, until every one of
//!   its sandboxes reads `failed`.
//!
//! Every process is a child of this one; sandboxes are deleted through the
//! API, and what a node still holds at the end is destroyed with the driver.

use crate::stats::{ms, percentile, secs, Table};
use airlock_drivers::host::RealHost;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::Driver;
use airlock_server::cluster::placement::{self, Need};
use airlock_server::store::{now_ms, NodeRow, Store};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster's addresses (shared by its nodes: leases are cluster-wide).
const CLUSTER_POOL: &str = "10.254.40.0/24";
/// The single host's.
const SINGLE_POOL: &str = "10.254.41.0/24";
const NODES: [&str; 3] = ["bench-n1", "bench-n2", "bench-n3"];

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Placement decisions timed per node count and run.
    #[arg(long, default_value_t = 20_000)]
    pub decisions: usize,
    /// Runs of each figure.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Creates, one after another, per side for create → ready.
    #[arg(long, default_value_t = 10)]
    pub creates: usize,
    /// Creates over the three nodes for the spread figure.
    #[arg(long, default_value_t = 100)]
    pub many: usize,
    /// Sandboxes live at once during those (a wave is refilled as each one
    /// is deleted and reads `stopped`).
    #[arg(long, default_value_t = 10)]
    pub live: usize,
    /// Runs of the many-creates figure (each takes minutes here).
    #[arg(long, default_value_t = 2)]
    pub many_runs: usize,
    /// Nodes killed for the lease-expiry figure (one run each).
    #[arg(long, default_value_t = 3)]
    pub losses: usize,
    /// Only the placement figure (no processes, no root).
    #[arg(long)]
    pub placement_only: bool,
}

pub async fn run(opts: Options) -> Result<()> {
    placement_figure(&opts);
    if opts.placement_only {
        return Ok(());
    }
    let bin = binary()?;
    let tmp = tempfile::Builder::new()
        .prefix("airlock-bench-cluster-")
        .tempdir_in("/var/tmp")?;

    let mut single = Proc::up(&bin, tmp.path(), "single", SINGLE_POOL, "")?;
    let pg = Postgres::start()?;
    let token = write_token(tmp.path())?;
    let mut cluster = Cluster::start(&bin, tmp.path(), &pg.url, &token)?;
    let result = figures(&mut cluster, &mut single, &opts, &pg.url).await;
    single.stop();
    single.destroy_leftovers().await;
    cluster.stop().await;
    drop(pg);
    result
}

async fn figures(
    cluster: &mut Cluster,
    single: &mut Proc,
    opts: &Options,
    url: &str,
) -> Result<()> {
    let api = Api::new(&cluster.replica.url);
    let store = Store::open(url)
        .await
        .context("opening the cluster's store")?;
    wait_nodes_up(&store, NODES.len()).await?;

    // Both sides are up, idle while the other measures; rounds alternate.
    let single_api = Api::new(&single.url);
    let mut t = Table::new(
        &format!(
            "create → ready, {} creates one after another per side and run",
            opts.creates
        ),
        &[
            "run",
            "path",
            "API ready_at − created_at p50",
            "p90",
            "client POST → first ready poll p50",
            "p90",
        ],
    );
    for run in 1..=opts.runs {
        for (name, api) in [
            ("single host (`airlock up`, SQLite)", &single_api),
            ("replica → 3 nodes (PostgreSQL)", &api),
        ] {
            let s = create_to_ready(api, opts.creates).await?;
            let stamp: Vec<Duration> = s.iter().map(|x| x.stamp).collect();
            let client: Vec<Duration> = s.iter().map(|x| x.client).collect();
            t.row(&[
                run.to_string(),
                name.to_owned(),
                ms(percentile(&stamp, 50.0)),
                ms(percentile(&stamp, 90.0)),
                ms(percentile(&client, 50.0)),
                ms(percentile(&client, 90.0)),
            ]);
        }
    }
    t.print();
    // The rest is the cluster's alone.
    single.stop();

    let mut t = Table::new(
        &format!(
            "{} creates over 3 nodes, at most {} live at once",
            opts.many, opts.live
        ),
        &[
            "run",
            "wall",
            "per node",
            "failures",
            "create → ready p50",
            "p90",
        ],
    );
    let mut failures = 0;
    for run in 1..=opts.many_runs {
        let out = many_creates(&api, opts.many, opts.live).await;
        let spread: Vec<String> = out
            .per_node
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        t.row(&[
            run.to_string(),
            secs(out.wall),
            spread.join(", "),
            out.failures.len().to_string(),
            secs(percentile(&out.ready, 50.0)),
            secs(percentile(&out.ready, 90.0)),
        ]);
        for f in &out.failures {
            eprintln!("cluster: run {run}: {f}");
        }
        failures += out.failures.len();
    }
    if opts.many_runs > 0 {
        t.print();
    }

    let mut t = Table::new(
        "node killed with SIGKILL → all its sandboxes read `failed` (lease 10 s, heartbeat 2 s: the defaults)",
        &[
            "run",
            "node",
            "its sandboxes",
            "lease left at the kill",
            "kill → all failed",
        ],
    );
    for run in 0..opts.losses {
        let victim = run % NODES.len();
        let (n, left, took) = node_loss(cluster, &api, &store, victim).await?;
        t.row(&[
            (run + 1).to_string(),
            NODES[victim].to_owned(),
            n.to_string(),
            secs(left),
            secs(took),
        ]);
    }
    if opts.losses > 0 {
        t.print();
    }
    if failures > 0 {
        bail!("{failures} of the many creates failed");
    }
    Ok(())
}

// ---- placement ----

fn synthetic(n: usize) -> Vec<NodeRow> {
    (0..n)
        .map(|i| NodeRow {
            name: format!("node-{i:03}"),
            address: format!("10.0.{}.{}:7000", i / 250, i % 250),
            backend: "nspawn".into(),
            // One in ten holds an older image, one in twenty drains.
            image_build_id: if i % 10 == 9 { "old" } else { "img" }.into(),
            cpus: 16,
            memory_total: 64 << 30,
            memory_free: ((16 + (i * 7) % 40) as u64) << 30,
            disk_free: 500 << 30,
            running: (i % 13) as u32,
            started_at: 0,
            heartbeat_at: 0,
            lease_expires_at: i64::MAX,
            draining: i % 20 == 19,
        })
        .collect()
}

fn placement_figure(opts: &Options) {
    let need = Need {
        image_build_id: "img".into(),
        memory: 512 << 20,
        min_free_memory: 768 << 20,
        min_free_disk: 2 << 30,
    };
    let mut t = Table::new(
        &format!(
            "placement decision (`cluster::placement::place`), {} decisions per run",
            opts.decisions
        ),
        &["nodes", "run", "p50", "p99", "max"],
    );
    for count in [3usize, 100] {
        let nodes = synthetic(count);
        for run in 1..=opts.runs {
            let mut load: HashMap<String, u32> = HashMap::new();
            let mut samples = Vec::with_capacity(opts.decisions);
            for i in 0..opts.decisions {
                let t0 = Instant::now();
                let chosen = placement::place(&nodes, &load, &need, 1);
                samples.push(t0.elapsed());
                // Keep the load moving like a real run: placed, then gone.
                if let Ok(name) = chosen {
                    let l = load.entry(name).or_insert(0);
                    *l = if i % 50 == 49 { 0 } else { *l + 1 };
                }
            }
            let us = |d: Duration| format!("{:.2} µs", d.as_secs_f64() * 1e6);
            t.row(&[
                count.to_string(),
                run.to_string(),
                us(percentile(&samples, 50.0)),
                us(percentile(&samples, 99.0)),
                us(percentile(&samples, 100.0)),
            ]);
        }
    }
    t.print();
}

// ---- the API ----

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(url: &str) -> Api {
        Api {
            base: format!("{url}/api/v1"),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("an HTTP client"),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    async fn create(&self) -> Result<String> {
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/sandboxes", self.base))
                    .json(&json!({"kind": "browser"})),
            )
            .await?;
        if status != 201 {
            bail!("create: {status} {body}");
        }
        Ok(body["id"].as_str().context("an id")?.to_owned())
    }

    async fn get(&self, id: &str) -> Result<Value> {
        let (status, body) = self
            .send(self.http.get(format!("{}/sandboxes/{id}", self.base)))
            .await?;
        if status != 200 {
            bail!("get {id}: {status} {body}");
        }
        Ok(body)
    }

    /// Poll every `every` until `want`; `failed` when not wanted is an error.
    async fn wait(&self, id: &str, want: &str, every: Duration, within: Duration) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let body = self.get(id).await?;
            if body["state"] == want {
                return Ok(body);
            }
            if body["state"] == "failed" {
                bail!("{id} failed: {}", body["failure_reason"]);
            }
            if Instant::now() > deadline {
                bail!("{id} is {} after {within:?}, not {want}", body["state"]);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Delete and wait until it has let go of everything (`stopped`).
    async fn delete(&self, id: &str) -> Result<()> {
        let (status, body) = self
            .send(self.http.delete(format!("{}/sandboxes/{id}", self.base)))
            .await?;
        if !matches!(status, 202 | 404) {
            bail!("delete {id}: {status} {body}");
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let body = self.get(id).await?;
            if matches!(body["state"].as_str(), Some("stopped" | "failed")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{id} is still {} two minutes after its delete",
                    body["state"]
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn stamp(body: &Value, field: &str) -> Result<time::OffsetDateTime> {
    let s = body[field]
        .as_str()
        .with_context(|| format!("{field} in {body}"))?;
    Ok(time::OffsetDateTime::parse(
        s,
        &time::format_description::well_known::Rfc3339,
    )?)
}

/// One create → ready.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The API's own stamps: `ready_at` − `created_at`.
    stamp: Duration,
    /// This client: from sending the POST to the first poll (every 50 ms)
    /// that reads `ready`.
    client: Duration,
}

async fn create_to_ready(api: &Api, n: usize) -> Result<Vec<Sample>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let id = api.create().await?;
        let body = api
            .wait(
                &id,
                "ready",
                Duration::from_millis(50),
                Duration::from_secs(120),
            )
            .await?;
        let client = t0.elapsed();
        let took = stamp(&body, "ready_at")? - stamp(&body, "created_at")?;
        out.push(Sample {
            stamp: took.try_into().unwrap_or_default(),
            client,
        });
        api.delete(&id).await?;
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct Many {
    wall: Duration,
    per_node: BTreeMap<String, usize>,
    ready: Vec<Duration>,
    failures: Vec<String>,
}

async fn many_creates(api: &Api, total: usize, live: usize) -> Many {
    let gate = Arc::new(tokio::sync::Semaphore::new(live.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let api = Arc::new(Api {
        base: api.base.clone(),
        http: api.http.clone(),
    });
    for _ in 0..total {
        let permit = gate.clone().acquire_owned().await.expect("the gate");
        let api = api.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let one = async {
                let id = api.create().await?;
                let body = api
                    .wait(
                        &id,
                        "ready",
                        Duration::from_millis(100),
                        Duration::from_secs(180),
                    )
                    .await;
                let ready = t0.elapsed();
                // Deleted whatever happened, before the next one may start.
                let gone = api.delete(&id).await;
                let body = body?;
                gone?;
                let node = body["node"].as_str().unwrap_or("(none)").to_owned();
                anyhow::Ok((node, ready))
            };
            let r = one.await;
            drop(permit);
            r
        });
    }
    let mut out = Many::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((node, ready))) => {
                *out.per_node.entry(node).or_insert(0) += 1;
                out.ready.push(ready);
            }
            Ok(Err(e)) => out.failures.push(format!("{e:#}")),
            Err(e) => out.failures.push(e.to_string()),
        }
    }
    out.wall = started.elapsed();
    out
}

/// Kill node `victim` with a sandbox on it; returns how many of its
/// sandboxes there were, the lease it had left, and the time until all of
/// them read `failed`. Then the node is started again and cleans up.
async fn node_loss(
    cluster: &mut Cluster,
    api: &Api,
    store: &Store,
    victim: usize,
) -> Result<(usize, Duration, Duration)> {
    let name = NODES[victim];
    let mut made = Vec::new();
    let mut on_victim = Vec::new();
    // Placement fills equal nodes in turn: a few creates put one on each.
    for _ in 0..2 * NODES.len() {
        let id = api.create().await?;
        let body = api
            .wait(
                &id,
                "ready",
                Duration::from_millis(100),
                Duration::from_secs(120),
            )
            .await?;
        if body["node"] == name {
            on_victim.push(id.clone());
        }
        made.push(id);
        if !on_victim.is_empty() && made.len() >= NODES.len() {
            break;
        }
    }
    if on_victim.is_empty() {
        bail!("no sandbox was placed on {name}");
    }
    let row = store.node(name).await?.context("the victim's row")?;
    cluster.nodes[victim].kill9();
    let killed = Instant::now();
    let lease_left =
        Duration::from_millis(u64::try_from(row.lease_expires_at - now_ms()).unwrap_or(0));
    let mut pending = on_victim.clone();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for id in pending {
            let body = api.get(&id).await?;
            if body["state"] != "failed" {
                still.push(id);
            }
        }
        pending = still;
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("{pending:?} not failed a minute after {name} was killed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    eprintln!(
        "cluster: {name} lost: {} sandbox(es) failed after {took:?}",
        on_victim.len()
    );
    for id in made.iter().filter(|id| !on_victim.contains(id)) {
        api.delete(id).await?;
    }
    // Back again: it destroys what the store no longer wants on it.
    cluster.nodes[victim].spawn()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cluster.nodes[victim].held().is_empty() {
        if Instant::now() > deadline {
            bail!("{name} still holds {:?}", cluster.nodes[victim].held());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_nodes_up(store, NODES.len()).await?;
    Ok((on_victim.len(), lease_left, took))
}

async fn wait_nodes_up(store: &Store, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = now_ms();
        let up = store.nodes().await?.iter().filter(|r| r.alive(now)).count();
        if up >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {up} of {n} nodes are up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- processes ----

/// `airlock` beside this binary (`target/<profile>/`).
fn binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("the binary's directory")?
        .join("airlock");
    if !bin.exists() {
        bail!("{} is not built (`cargo build -p airlock`)", bin.display());
    }
    Ok(bin)
}

/// One `airlock up` or `airlock node` child, ended with SIGTERM on drop.
struct Proc {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    ready: String,
    child: Option<Child>,
    /// What its ready line said after `ready` (the URL of `airlock up`).
    url: String,
    data_dir: PathBuf,
}

impl Proc {
    fn up(bin: &Path, parent: &Path, name: &str, pool: &str, extra: &str) -> Result<Proc> {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("airlock.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\naddress_pool = \"{pool}\"\n\
                 webrtc_udp_port = 0\nwebrtc_tcp_port = 0\nmin_free_disk_mb = 256\n{extra}\n\
                 [quota]\nmax_sandboxes = 1000\ncreates_per_minute = 10000\n",
                dir.join("data").display()
            ),
        )?;
        let mut p = Proc {
            name: name.to_owned(),
            bin: bin.to_owned(),
            args: vec!["up".into(), "--config".into(), config.display().to_string()],
            ready: "airlock is up: ".into(),
            child: None,
            url: String::new(),
            data_dir: dir.join("data"),
        };
        p.spawn()?;
        p.url = p
            .url
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches('/')
            .to_owned();
        Ok(p)
    }

    fn node(bin: &Path, parent: &Path, name: &str, url: &str, token: &Path) -> Result<Proc> {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\naddress_pool = \"{CLUSTER_POOL}\"\nmin_free_disk_mb = 256\n\
                 database_url = \"{url}\"\n[cluster]\ntoken_file = \"{}\"\n\
                 [node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n",
                dir.join("data").display(),
                token.display()
            ),
        )?;
        let mut p = Proc {
            name: name.to_owned(),
            bin: bin.to_owned(),
            args: vec![
                "node".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            ready: format!("airlock node {name} is up"),
            child: None,
            url: String::new(),
            data_dir: dir.join("data"),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = self.ready.clone();
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix(&ready) {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let started = Instant::now();
        loop {
            if let Ok(rest) = rx.recv_timeout(Duration::from_millis(200)) {
                self.url = rest;
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{} exited with {status} before it was up", self.name);
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                bail!("{} did not come up within 120 s", self.name);
            }
        }
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful), then SIGKILL after 20 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Our own child, not reaped yet: its pid is still its own.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sandboxes its driver still holds (a node's, or the single host's).
    fn held(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.join("sandboxes"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Destroy, with the driver, whatever it still holds (after a failed run).
    async fn destroy_leftovers(&self) {
        if self.held().is_empty() {
            return;
        }
        let driver = NspawnDriver::new(
            NspawnConfig::new(self.data_dir.join("sandboxes")),
            Arc::new(RealHost),
        );
        for inst in driver.list().await.unwrap_or_default() {
            eprintln!("cluster: destroying {} left on {}", inst.id, self.name);
            let _ = driver.destroy(&inst.id).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Cluster {
    nodes: Vec<Proc>,
    replica: Proc,
}

impl Cluster {
    fn start(bin: &Path, parent: &Path, url: &str, token: &Path) -> Result<Cluster> {
        let mut nodes = Vec::new();
        for name in NODES {
            nodes.push(Proc::node(bin, parent, name, url, token)?);
        }
        let lines = format!(
            "database_url = \"{url}\"\n[cluster]\nenabled = true\ntoken_file = \"{}\"",
            token.display()
        );
        let replica = Proc::up(bin, parent, "replica", CLUSTER_POOL, &lines)?;
        Ok(Cluster { nodes, replica })
    }

    /// The replica first (nothing new is placed), then the nodes; what a
    /// node still holds is destroyed.
    async fn stop(&mut self) {
        self.replica.stop();
        for n in &mut self.nodes {
            n.stop();
            n.destroy_leftovers().await;
        }
    }
}

fn write_token(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("cluster.token");
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    let secret: String = (0..2).map(|_| format!("{:016x}", rand_u64())).collect();
    std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes())?;
    Ok(path)
}

/// A random u64 from the kernel (no extra dependency for one token).
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_le_bytes(b)
}

/// A PostgreSQL server of the bench's own (`scripts/pg-test-server`).
struct Postgres {
    dir: tempfile::TempDir,
    url: String,
}

impl Postgres {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server")
    }

    fn start() -> Result<Postgres> {
        // Apart from the bench's own directory, which its server may not enter.
        let dir = tempfile::Builder::new()
            .prefix("airlock-bench-pg-")
            .tempdir_in("/var/tmp")?;
        let out = Command::new(Self::script())
            .arg(dir.path())
            .output()
            .context("scripts/pg-test-server")?;
        if !out.status.success() {
            bail!(
                "PostgreSQL did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Postgres {
            dir,
            url: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("--stop")
            .arg(self.dir.path())
            .status();
    }
}
