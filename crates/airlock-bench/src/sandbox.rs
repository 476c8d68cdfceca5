//! The real control plane for the sandbox benchmarks: `server::start` with the
//! real nspawn driver and the golden image from `AIRLOCK_IMAGE_DIR`, on port 0,
//! with its own data directory and address pool; plus what the benchmarks read
//! about a sandbox from the host (cgroup memory, process PSS, its VNC address).

use airlock_drivers::host::RealHost;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::{Driver, ImageRef};
use airlock_server::config::Config;
use airlock_server::server::{self, Running};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the benchmarks' sandboxes take their addresses (one /30 each).
pub const POOL: &str = "10.236.0.0/16";

pub fn image() -> Result<ImageRef> {
    let dir = std::env::var_os("AIRLOCK_IMAGE_DIR")
        .context("set AIRLOCK_IMAGE_DIR to a built golden image")?;
    let manifest = airlock_image::ImageStore::new(PathBuf::from(dir))
        .current()
        .context("reading the golden image")?
        .context("no current golden image: run `airlock image build`")?;
    Ok(ImageRef::of(&manifest))
}

/// A control plane running in this process.
pub struct ControlPlane {
    running: Option<Running>,
    pub base: String,
    data_dir: PathBuf,
    _tmp: tempfile::TempDir,
    http: reqwest::Client,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("base", &self.base)
            .finish()
    }
}

impl ControlPlane {
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`ControlPlane::start`], with the configuration adjusted first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("airlock-bench-")
            .tempdir_in("/var/tmp")?;
        let cfg = Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: tmp.path().to_path_buf(),
            address_pool: POOL.to_owned(),
            webrtc_udp_port: 0,
            webrtc_tcp_port: 0,
            // Benchmarks start more sandboxes, faster, than one user may.
            quota: airlock_server::config::QuotaConfig {
                max_sandboxes: 1000,
                max_logins: 1000,
                creates_per_minute: 10_000,
                ..Default::default()
            },
            ..Config::default()
        };
        let mut cfg = cfg;
        adjust(&mut cfg);
        let driver: Arc<dyn Driver> = Arc::new(NspawnDriver::new(
            NspawnConfig::new(cfg.data_dir.join("sandboxes")),
            Arc::new(RealHost),
        ));
        let running = server::start(&cfg, image()?, driver)
            .await
            .map_err(|e| anyhow::anyhow!("starting the control plane: {e}"))?;
        Ok(ControlPlane {
            base: format!("http://{}", running.addr),
            running: Some(running),
            data_dir: cfg.data_dir,
            _tmp: tmp,
            http: reqwest::Client::builder().no_proxy().build()?,
        })
    }

    /// The WebRTC endpoint's UDP and TCP ports.
    pub fn webrtc_ports(&self) -> Option<(u16, u16)> {
        let e = self.running.as_ref()?.app.webrtc.get()?;
        Some((e.udp_addr().port(), e.tcp_addr().port()))
    }

    /// The HTTP port.
    pub fn port(&self) -> Option<u16> {
        Some(self.running.as_ref()?.addr.port())
    }

    pub fn ws_url(&self, id: &str) -> String {
        format!(
            "{}/api/v1/sandboxes/{id}/vnc",
            self.base.replace("http://", "ws://")
        )
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling {path}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// The control plane's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .context("reading /metrics")?;
        Ok(resp.text().await?)
    }

    /// Create a sandbox; returns its id.
    pub async fn create(&self, kind: &str) -> Result<String> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/sandboxes",
                Some(json!({ "kind": kind })),
            )
            .await?;
        if status != 201 {
            bail!("create answered {status}: {body}");
        }
        Ok(body["id"].as_str().context("no id")?.to_owned())
    }

    pub async fn state(&self, id: &str) -> Result<Value> {
        Ok(self
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/sandboxes/{id}"),
                None,
            )
            .await?
            .1)
    }

    /// Poll every 20 ms until `ready`; an error on `failed` or after `within`.
    pub async fn wait_ready(&self, id: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let body = self.state(id).await?;
            match body["state"].as_str().unwrap_or("") {
                "ready" => return Ok(()),
                "failed" => bail!("sandbox {id} failed: {}", body["failure_reason"]),
                s if Instant::now() > deadline => bail!("sandbox {id} still {s} after {within:?}"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub async fn exec(&self, id: &str, argv: &[&str]) -> Result<Value> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/sandboxes/{id}/exec"),
                Some(json!({ "argv": argv, "timeout_s": 30 })),
            )
            .await?;
        if status != 200 {
            bail!("exec {argv:?} answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        let (status, body) = self
            .call(
                reqwest::Method::DELETE,
                &format!("/api/v1/sandboxes/{id}"),
                None,
            )
            .await?;
        if status != 202 {
            bail!("delete answered {status}: {body}");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let s = self.state(id).await?;
            if matches!(s["state"].as_str(), Some("stopped" | "failed")) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("sandbox {id} did not stop within 60 s")
    }

    /// The guest's VNC server and its secret, from the driver's metadata file
    /// (root-only on the host), for measuring without the relay.
    pub fn vnc_target(&self, id: &str) -> Result<(SocketAddr, String)> {
        let path = self
            .data_dir
            .join("sandboxes")
            .join(id)
            .join("meta/metadata.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)?;
        let addr = v["network"]["address"]
            .as_str()
            .context("no guest address")?;
        let pw = v["vnc_password"].as_str().context("no VNC password")?;
        Ok((format!("{addr}:5900").parse()?, pw.to_owned()))
    }

    /// Stop serving, then destroy whatever is left with the driver's own destroy.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        let driver = NspawnDriver::new(
            NspawnConfig::new(self.data_dir.join("sandboxes")),
            Arc::new(RealHost),
        );
        for inst in driver.list().await.unwrap_or_default() {
            let _ = driver.destroy(&inst.id).await;
        }
    }
}

/// The memory cgroup (v1) the driver made for a sandbox.
pub fn memory_cgroup(id: &str) -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/memory/airlock").join(id)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CgroupMemory {
    pub usage: u64,
    pub rss: u64,
    pub cache: u64,
    pub shmem: u64,
    pub inactive_file: u64,
}

pub fn cgroup_memory(id: &str) -> Result<CgroupMemory> {
    let dir = memory_cgroup(id);
    let usage = std::fs::read_to_string(dir.join("memory.usage_in_bytes"))
        .with_context(|| format!("reading {}", dir.display()))?
        .trim()
        .parse()?;
    let stat = std::fs::read_to_string(dir.join("memory.stat"))?;
    let get = |k: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    Ok(CgroupMemory {
        usage,
        rss: get("total_rss "),
        cache: get("total_cache "),
        shmem: get("total_shmem "),
        inactive_file: get("total_inactive_file "),
    })
}

fn procs_under(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                procs_under(&e.path(), out);
            }
        }
    }
}

/// (processes, summed PSS, summed RSS) of every process in the sandbox's cgroup.
pub fn process_memory(id: &str) -> (usize, u64, u64) {
    let mut pids = Vec::new();
    procs_under(&memory_cgroup(id), &mut pids);
    let (mut pss, mut rss) = (0u64, 0u64);
    for pid in &pids {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            for l in text.lines() {
                let kb = |rest: &str| -> u64 {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .unwrap_or(0)
                        * 1024
                };
                if let Some(r) = l.strip_prefix("Pss:") {
                    pss += kb(r);
                } else if let Some(r) = l.strip_prefix("Rss:") {
                    rss += kb(r);
                }
            }
        }
    }
    (pids.len(), pss, rss)
}

/// A field of /proc/meminfo in bytes.
pub fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(':')?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

/// This process's resident set (the in-process control plane plus the bench client).
pub fn self_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

/// CPU time (user + system, in clock ticks) of every process now in the
/// sandbox's cgroup. Processes that exit between two readings drop out.
pub fn cpu_ticks(id: &str) -> u64 {
    let mut pids = Vec::new();
    procs_under(&memory_cgroup(id), &mut pids);
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command: state is field 3; utime and stime are 14 and 15.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 when that cannot be asked.
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}
