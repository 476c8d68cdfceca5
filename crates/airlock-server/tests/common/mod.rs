//! Shared set-up for the integration tests: the real control plane on port 0,
//! with the real golden image and the driver its configuration names (the
//! real nspawn driver unless a test picks another).

#![allow(dead_code)]

pub mod viewer;

use airlock_drivers::ImageRef;
use airlock_server::config::Config;
use airlock_server::server::{self, Running};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Why these tests cannot run here, or `None` when they can. In CI a missing
/// prerequisite is a failure, not a skip.
pub fn unmet() -> Option<String> {
    let why = if !is_root() {
        Some("they need root (namespaces, mounts, links)".to_owned())
    } else if std::process::Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        Some("systemd-nspawn is not installed".to_owned())
    } else if image().is_none() {
        Some(
            "no golden image: set AIRLOCK_IMAGE_DIR to a built image (`airlock image build`)"
                .to_owned(),
        )
    } else {
        None
    };
    if let Some(why) = &why {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the sandbox tests, but {why}"
        );
        eprintln!("skipping: {why}");
    }
    why
}

/// Why the browser tests cannot run here (in CI: a failure, not a skip).
pub fn browser_unmet() -> Option<String> {
    if repo_root()
        .join("tests/e2e/node_modules/playwright-core")
        .exists()
    {
        return None;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the browser tests: run scripts/setup first"
    );
    eprintln!("skipping: tests/e2e has no node_modules (run `npm ci --prefix tests/e2e`)");
    Some("no node_modules".into())
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The current build's manifest in `$AIRLOCK_IMAGE_DIR`.
pub fn manifest() -> Option<airlock_image::Manifest> {
    let dir = std::env::var_os("AIRLOCK_IMAGE_DIR")?;
    airlock_image::ImageStore::new(PathBuf::from(dir))
        .current()
        .ok()?
}

/// Why a QEMU sandbox cannot run here (no VM artefacts, no QEMU), or `None`.
/// In CI that is a failure, not a skip.
pub fn qemu_unmet() -> Option<String> {
    let why = if manifest().is_none_or(|m| m.vm.is_none()) {
        "the golden image has no VM artefacts (`airlock image build --vm`)"
    } else if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        "qemu-system-x86_64 is not installed"
    } else {
        return None;
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the QEMU tests, but {why}"
    );
    eprintln!("skipping: {why}");
    Some(why.to_owned())
}

pub fn image() -> Option<ImageRef> {
    manifest().map(|m| ImageRef::of(&m))
}

pub struct Harness {
    pub running: Option<Running>,
    pub base: String,
    pub data_dir: PathBuf,
    pub cfg: Config,
    _tmp: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// A control plane with its own data dir and its own slice of addresses
/// (`pool` must differ between tests that may run at the same time).
pub async fn start(pool: &str) -> Harness {
    start_with(pool, |_| {}).await
}

/// Like [`start`], with the configuration adjusted first.
pub async fn start_with(pool: &str, adjust: impl FnOnce(&mut Config)) -> Harness {
    let tmp = tempfile::Builder::new()
        .prefix("airlock-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let cfg = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: tmp.path().to_path_buf(),
        address_pool: pool.to_owned(),
        // Tests run side by side: any free ports.
        webrtc_udp_port: 0,
        webrtc_tcp_port: 0,
        // A test sandbox writes a few MiB; the 2 GiB production floor would
        // refuse creates on a CI machine whose disk the build has mostly filled.
        // (The floor itself is checked by api.rs with an impossible value.)
        min_free_disk_mb: 256,
        ..Config::default()
    };
    let mut cfg = cfg;
    adjust(&mut cfg);
    let running = launch(&cfg).await;
    let base = format!("http://{}", running.addr);
    Harness {
        running: Some(running),
        base,
        data_dir: cfg.data_dir.clone(),
        cfg,
        _tmp: tmp,
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
    }
}

impl Harness {
    /// A control plane started some other way (tests that need no image).
    pub fn adopt(running: Running, base: String, cfg: Config, tmp: tempfile::TempDir) -> Harness {
        Harness {
            running: Some(running),
            base,
            data_dir: cfg.data_dir.clone(),
            cfg,
            _tmp: tmp,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        }
    }
}

pub async fn launch(cfg: &Config) -> Running {
    let manifest = manifest().expect("image");
    let driver = server::driver_for(cfg, &manifest).expect("driver");
    server::start(cfg, ImageRef::of(&manifest), driver)
        .await
        .expect("server starts")
}

impl Harness {
    /// Stop serving and start a fresh control plane on the same data dir, as
    /// after a crash (sandboxes keep running in between).
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        let mut cfg = self.cfg.clone();
        cfg.listen = "127.0.0.1:0".parse().expect("addr");
        let running = launch(&cfg).await;
        self.base = format!("http://{}", running.addr);
        self.running = Some(running);
    }

    /// The token of a new admin user: admin actions (the egress account,
    /// other users' upstreams, egress settings) need one; `local` is no admin.
    pub async fn admin_token(&self) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let app = &self.running.as_ref().expect("running").app;
        let (_, token) = app
            .add_admin(&format!("test-admin-{n}"))
            .await
            .expect("admin user");
        token
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// One API call as the user of `token` (the token-less local user when
    /// `None`): the status and the JSON body (`null` when there is none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, None, Some(body))
            .await
    }

    /// The body of `GET path` as text, whatever its status.
    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: reading the body: {e}"))
    }

    /// The `/metrics` page as text.
    pub async fn metrics(&self) -> String {
        self.text("/metrics").await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None, None).await
    }

    /// Create a sandbox and wait until it is ready; panics with its failure reason otherwise.
    pub async fn ready_sandbox(&self, kind: &str) -> String {
        let (status, body) = self
            .post("/api/v1/sandboxes", serde_json::json!({ "kind": kind }))
            .await;
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().expect("id").to_owned();
        self.wait_state(&id, "ready", Duration::from_secs(120))
            .await;
        id
    }

    pub async fn wait_state(&self, id: &str, want: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (_, body) = self.get(&format!("/api/v1/sandboxes/{id}")).await;
            let state = body["state"].as_str().unwrap_or("");
            if state == want {
                return body;
            }
            assert!(
                state != "failed" || want == "failed",
                "sandbox failed: {}",
                body["failure_reason"]
            );
            assert!(
                Instant::now() < deadline,
                "sandbox {id} is {state}, not {want}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn exec(&self, id: &str, argv: &[&str]) -> Value {
        let (status, body) = self
            .post(
                &format!("/api/v1/sandboxes/{id}/exec"),
                serde_json::json!({ "argv": argv }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

impl Drop for Harness {
    /// Even when a test fails half-way, destroy whatever it left running, with
    /// the driver's own destroy, so the next run starts clean.
    fn drop(&mut self) {
        let cfg = self.cfg.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let Some(manifest) = manifest() else {
                return;
            };
            let Ok(driver) = server::driver_for(&cfg, &manifest) else {
                return;
            };
            rt.block_on(async {
                for inst in driver.list().await.unwrap_or_default() {
                    let _ = driver.destroy(&inst.id).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Whether `hay` holds `needle` (a canary search over files, logs, memory).
pub fn contains(hay: &[u8], needle: &str) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Pids (space-separated) of processes whose command line matches `pattern`.
fn processes_matching(pattern: &str) -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "--", pattern])
        .output()
        .expect("pgrep");
    // 0: found, 1: none; anything else is pgrep failing, not an answer.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "pgrep {pattern:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What this sandbox still holds on the host: links, namespaces, mounts,
/// processes, directories. Empty means nothing leaked.
pub fn leftovers(data_dir: &std::path::Path, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    let short: String = id.chars().take(12).collect();
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    if String::from_utf8_lossy(&links.stdout).contains(&format!("al{short}")) {
        out.push(format!("link al{short}"));
    }
    if std::path::Path::new(&format!("/run/netns/airlock-{short}")).exists() {
        out.push(format!("netns airlock-{short}"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.contains(&format!("/sandboxes/{id}/")))
    {
        out.push("overlay mount".into());
    }
    // The container (systemd-nspawn --machine=…) and the VMM (qemu -name …).
    for pattern in [
        format!("--machine=airlock-{id}"),
        format!("-name airlock-{id} "),
    ] {
        let pids = processes_matching(&pattern);
        if !pids.is_empty() {
            out.push(format!("processes {pids}"));
        }
    }
    for dir in ["sandboxes", "qemu"] {
        if data_dir.join(dir).join(id).exists() {
            out.push(format!("{dir} directory"));
        }
    }
    out
}
