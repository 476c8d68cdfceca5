//! The real `airlock up` as a child process over a data dir of its own, for
//! tests that kill the control plane with SIGKILL and start it again: an
//! in-process server cannot be killed like that without killing the test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the real binary cannot run here, or `None`. In CI: a failure.
pub fn unmet() -> Option<String> {
    if binary().exists() {
        return None;
    }
    let why = format!(
        "{} is not built (`cargo build -p airlock`)",
        binary().display()
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the chaos tests, but {why}"
    );
    eprintln!("skipping: {why}");
    Some(why)
}

/// `airlock` next to this test binary's directory (`target/<profile>/`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("airlock")
}

/// A control plane running as `airlock up --config <file>`.
pub struct ChildPlane {
    child: Option<Child>,
    pub base: String,
    pub data_dir: PathBuf,
    pub pool: String,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

impl ChildPlane {
    /// Write a config (port 0, the pool, quotas raised) and start.
    pub fn start(pool: &str) -> ChildPlane {
        Self::start_with(pool, "")
    }

    /// Like [`ChildPlane::start`], with more top-level config lines.
    pub fn start_with(pool: &str, extra: &str) -> ChildPlane {
        Self::start_in(pool, extra, None)
    }

    /// Like [`ChildPlane::start_with`], with the data directory somewhere of
    /// the caller's choosing (a small file system of its own, say).
    pub fn start_in(pool: &str, extra: &str, data_dir: Option<PathBuf>) -> ChildPlane {
        Self::start_at(pool, extra, data_dir, "127.0.0.1:0")
    }

    /// Like [`ChildPlane::start_in`], listening on `listen` (a fixed port
    /// stays the same across restarts, so a browser can come back to it).
    pub fn start_at(
        pool: &str,
        extra: &str,
        data_dir: Option<PathBuf>,
        listen: &str,
    ) -> ChildPlane {
        let tmp = tempfile::Builder::new()
            .prefix("airlock-chaos-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let data_dir = data_dir.unwrap_or_else(|| tmp.path().join("data"));
        let config = tmp.path().join("airlock.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\n\
                 data_dir = \"{}\"\n\
                 address_pool = \"{pool}\"\n\
                 webrtc_udp_port = 0\n\
                 webrtc_tcp_port = 0\n\
                 min_free_disk_mb = 256\n\
                 {extra}\n\
                 [quota]\n\
                 max_sandboxes = 100\n\
                 creates_per_minute = 10000\n",
                data_dir.display()
            ),
        )
        .expect("config");
        let mut plane = ChildPlane {
            child: None,
            base: String::new(),
            data_dir,
            pool: pool.to_owned(),
            config,
            _tmp: tmp,
        };
        plane.spawn();
        plane
    }

    /// Start `airlock up` and wait for the address it prints.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new(binary())
            .args(["up", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("airlock up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("airlock up: {line}");
                if let Some(rest) = line.strip_prefix("airlock is up: ") {
                    let url = rest.split_whitespace().next().unwrap_or("");
                    let _ = tx.send(url.trim_end_matches('/').to_owned());
                }
            }
        });
        let started = Instant::now();
        let base = loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(200)) {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("airlock up exited with {status} before it was up");
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "airlock up did not say it was up within 120 s"
            );
        };
        self.base = base;
        self.child = Some(child);
    }

    /// The token of a new admin user, made with `airlock user add --admin`.
    pub fn admin_token(&self, name: &str) -> String {
        let out = Command::new(binary())
            .args(["user", "add", name, "--admin", "--config"])
            .arg(&self.config)
            .output()
            .expect("airlock user add");
        assert!(
            out.status.success(),
            "airlock user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a token")
            .trim()
            .to_owned()
    }

    /// Its config file (for `airlock … --config`).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The control plane's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash: nothing of the control plane runs any more, its
    /// sandboxes are left as they are.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
        }
    }

    /// Kill, then start again over the same data dir.
    pub fn crash_and_restart(&mut self) -> Instant {
        self.kill9();
        let at = Instant::now();
        self.spawn();
        at
    }
}

impl Drop for ChildPlane {
    /// Stop the control plane, then destroy whatever sandboxes it left with
    /// the driver's own destroy, so a failed test does not leave them running.
    fn drop(&mut self) {
        self.kill9();
        destroy_leftovers(&self.config, &self.data_dir);
    }
}

/// Destroy, with the driver's own destroy, every sandbox the process that
/// ran with `config` over `data_dir` left behind.
pub fn destroy_leftovers(config: &Path, data_dir: &Path) {
    let Ok(mut cfg) = airlock_server::config::Config::from_file(config) else {
        return;
    };
    cfg.data_dir = data_dir.to_path_buf();
    let cleanup = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let Some(manifest) = crate::common::manifest() else {
            return;
        };
        let Ok(driver) = airlock_server::server::driver_for(&cfg, &manifest) else {
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
