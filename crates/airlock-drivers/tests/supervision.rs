//! Supervision against a real systemd-nspawn: a sandbox whose nspawn is
//! SIGKILLed (its guest runs on, unsupervised) is dead within a second or
//! two, named by what died, and `destroy` ends the orphaned guest and leaves
//! no process, cgroup, mount, loop device, link, namespace or rule behind.
//! The same for a QEMU sandbox (under TCG: no working KVM is needed) whose
//! QEMU is killed.

mod common;

use airlock_drivers::host::RealHost;
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::{Driver, ImageRef, Limits, Liveness, SandboxSpec};
use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the test cannot run here; under `CI=true` that is a failure.
fn cannot_run(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the supervision test cannot run: {why}");
    }
    eprintln!("SKIPPED: the supervision test: {why}");
}

fn image() -> Result<ImageRef, String> {
    let dir = std::env::var_os("AIRLOCK_IMAGE_DIR")
        .ok_or("AIRLOCK_IMAGE_DIR is not set (scripts/test sets it)")?;
    let manifest = airlock_image::ImageStore::new(dir.into())
        .current()
        .map_err(|e| e.to_string())?
        .ok_or("there is no golden image (`airlock image build`)")?;
    Ok(ImageRef::of(&manifest))
}

/// A sandbox in this test's own range (10.246.0.0/16), its block picked by
/// pid so parallel runs do not collide; with a disk limit, so its writable
/// layer is a loop-mounted filesystem that destroy must give back.
fn spec(id: &str, image: ImageRef, half: u32) -> SandboxSpec {
    let pool = AddressPool::parse("10.246.0.0/16").expect("pool");
    let lease = pool
        .lease(half * 8000 + std::process::id() % 8000)
        .expect("lease");
    SandboxSpec {
        id: id.to_owned(),
        kind: SandboxKind::Browser,
        image,
        lease,
        metadata: Metadata {
            sandbox_id: id.to_owned(),
            kind: SandboxKind::Browser,
            agent_token: "supervision-test".into(),
            vnc_password: "suptestpw".into(),
            display: Display::default(),
            network: Network {
                address: lease.guest.to_string(),
                gateway: lease.host.to_string(),
                prefix_len: lease.prefix_len,
            },
            egress: None,
        },
        limits: Limits {
            disk_bytes: Some(1 << 30),
            ..Limits::default()
        },
        proxy_port: None,
        home_volume: None,
    }
}

/// Every process in the sandbox's cgroups, in every hierarchy, at any depth.
fn cgroup_pids(id: &str) -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    for dir in cgroup_dirs(id) {
        walk(&dir, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join("airlock").join(id)];
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        dirs.push(entry.path().join("airlock").join(id));
    }
    dirs.into_iter().filter(|d| d.exists()).collect()
}

/// Processes anywhere on the host whose cgroup names the sandbox, but for
/// zombies: those are dead already, their reaper (the host's init, once
/// their parent is gone) is not ours to wait for.
fn processes_in_its_cgroups(id: &str) -> Vec<u32> {
    let needle = format!("/airlock/{id}");
    let dead = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X")
        })
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.lines().any(|l| l.contains(&needle)))
        })
        .filter(|pid| !dead(pid))
        .collect()
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// What of the sandbox is left on the host, one line per kind.
fn leftovers(id: &str, root: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let names = airlock_drivers::net::link::LinkNames::for_sandbox(id);
    let procs = processes_in_its_cgroups(id);
    if !procs.is_empty() {
        left.push(format!("processes in its cgroups: {procs:?}"));
    }
    let cgroups = cgroup_dirs(id);
    if !cgroups.is_empty() {
        left.push(format!("cgroups: {cgroups:?}"));
    }
    let root_s = root.display().to_string();
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&root_s))
        .map(str::to_owned)
        .collect();
    if !mounts.is_empty() {
        left.push(format!("mounts: {mounts:?}"));
    }
    let loops: Vec<String> = sh("losetup -a")
        .lines()
        .filter(|l| l.contains(&root_s))
        .map(str::to_owned)
        .collect();
    if !loops.is_empty() {
        left.push(format!("loop devices: {loops:?}"));
    }
    if Path::new("/sys/class/net").join(&names.host_if).exists() {
        left.push(format!("link {}", names.host_if));
    }
    if Path::new(&names.netns_path()).exists() {
        left.push(format!("netns {}", names.netns));
    }
    let rules: Vec<String> = sh("nft list ruleset")
        .lines()
        .filter(|l| l.contains(&format!("\"{}\"", names.host_if)))
        .map(str::to_owned)
        .collect();
    if !rules.is_empty() {
        left.push(format!("nftables rules: {rules:?}"));
    }
    if root.join("sandboxes").join(id).exists() {
        left.push("its state directory".into());
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nspawn_is_dead_at_once_and_destroy_leaves_nothing() {
    if !common::is_root() {
        return cannot_run("it needs root (namespaces, mounts, cgroups)");
    }
    if common::on_path("systemd-nspawn").is_none() {
        return cannot_run("systemd-nspawn is not installed");
    }
    let image = match image() {
        Ok(i) => i,
        Err(why) => return cannot_run(&why),
    };
    let root = tempfile::Builder::new()
        .prefix("airlock-sup-test.")
        .tempdir_in("/var/tmp")
        .expect("state dir");
    let mut cfg = NspawnConfig::new(root.path().join("sandboxes"));
    cfg.stop_grace = Duration::from_secs(2);
    let driver = NspawnDriver::new(cfg, Arc::new(RealHost));
    let id = format!("sv{}", std::process::id() % 1_000_000);

    driver
        .create(&spec(&id, image, 0))
        .await
        .expect("create the sandbox");
    let mut failures = Vec::new();
    let checked = async {
        driver.start(&id).await.map_err(|e| format!("start: {e}"))?;
        // The guest is up once its systemd has started a few processes of
        // its own beside nspawn. Alive all along: nspawn's short-lived
        // helper children are not taken for the guest.
        let booted = Instant::now();
        while cgroup_pids(&id).len() < 4 {
            let now = driver.liveness(&id).await.map_err(|e| e.to_string())?;
            if now != Liveness::Alive {
                return Err(format!("a booting sandbox is {now:?}"));
            }
            if booted.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the guest did not start within 60 s: {:?}",
                    cgroup_pids(&id)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let alive = driver.liveness(&id).await.map_err(|e| e.to_string())?;
        if alive != Liveness::Alive {
            return Err(format!("a booted sandbox is {alive:?}"));
        }
        let nspawn = driver
            .inspect(&id)
            .await
            .map_err(|e| e.to_string())?
            .pid
            .ok_or("no nspawn pid")?;
        // SAFETY: kill(2) of a pid this test's driver started.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(nspawn as i32, libc::SIGKILL) };
        if rc != 0 {
            return Err(format!("kill nspawn: {}", std::io::Error::last_os_error()));
        }
        let killed = Instant::now();
        let why = loop {
            if let Liveness::Dead(why) = driver.liveness(&id).await.map_err(|e| e.to_string())? {
                break why;
            }
            if killed.elapsed() > Duration::from_secs(2) {
                return Err("still alive 2 s after nspawn was killed".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let noticed = killed.elapsed();
        eprintln!("liveness noticed the SIGKILLed nspawn after {noticed:?}: {why}");
        if why != format!("systemd-nspawn (pid {nspawn}) exited") {
            return Err(format!("the reason does not name nspawn: {why}"));
        }
        let orphans = cgroup_pids(&id);
        eprintln!(
            "the guest ran on without nspawn: {} processes",
            orphans.len()
        );
        if orphans.is_empty() {
            return Err("the guest died with nspawn: nothing to prove".into());
        }
        Ok(())
    }
    .await;
    if let Err(e) = checked {
        failures.push(e);
    }
    let destroyed = Instant::now();
    if let Err(e) = driver.destroy(&id).await {
        failures.push(format!("destroy: {e}"));
    }
    eprintln!("destroy took {:?}", destroyed.elapsed());
    let left = leftovers(&id, root.path());
    eprintln!("left behind after destroy: {left:?}");
    failures.extend(left.into_iter().map(|l| format!("left behind: {l}")));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_dead_at_once_and_destroy_leaves_nothing() {
    use airlock_drivers::qemu::{Accel, QemuConfig, QemuDriver};
    if !common::is_root() {
        return cannot_run("it needs root (TAP devices, nftables)");
    }
    if common::on_path("qemu-system-x86_64").is_none() {
        return cannot_run("qemu-system-x86_64 is not installed");
    }
    let (image, vm_image) = match common::vm_image() {
        Ok(v) => v,
        Err(why) => return cannot_run(&why),
    };
    let root = tempfile::Builder::new()
        .prefix("airlock-sup-test.")
        .tempdir_in("/var/tmp")
        .expect("state dir");
    let mut cfg = QemuConfig::new(root.path().join("sandboxes"), Some(vm_image));
    // Whether KVM runs guests does not matter here: the guest need not boot.
    cfg.accel = Some(Accel::Tcg);
    let driver = QemuDriver::new(cfg, Arc::new(RealHost));
    let id = format!("sq{}", std::process::id() % 1_000_000);
    driver
        .create(&spec(&id, image, 1))
        .await
        .expect("create the sandbox");
    let checked = async {
        driver.start(&id).await.map_err(|e| format!("start: {e}"))?;
        let alive = driver.liveness(&id).await.map_err(|e| e.to_string())?;
        if alive != Liveness::Alive {
            return Err(format!("a started VM is {alive:?}"));
        }
        let qemu = driver
            .inspect(&id)
            .await
            .map_err(|e| e.to_string())?
            .pid
            .ok_or("no qemu pid")?;
        // SAFETY: kill(2) of a pid this test's driver started.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
        if rc != 0 {
            return Err(format!("kill qemu: {}", std::io::Error::last_os_error()));
        }
        let killed = Instant::now();
        let why = loop {
            if let Liveness::Dead(why) = driver.liveness(&id).await.map_err(|e| e.to_string())? {
                break why;
            }
            if killed.elapsed() > Duration::from_secs(2) {
                return Err("still alive 2 s after qemu was killed".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        eprintln!(
            "liveness noticed the SIGKILLed qemu after {:?}: {why}",
            killed.elapsed()
        );
        if why != format!("qemu (pid {qemu}) exited") {
            return Err(format!("the reason does not name qemu: {why}"));
        }
        Ok(())
    }
    .await;
    let mut failures: Vec<String> = checked.err().into_iter().collect();
    if let Err(e) = driver.destroy(&id).await {
        failures.push(format!("destroy: {e}"));
    }
    let mut left = leftovers(&id, root.path());
    let named = format!("\0-name\0airlock-{id}\0");
    let qemus: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.contains(&named))
        .collect();
    if !qemus.is_empty() {
        left.push(format!("qemu processes: {qemus:?}"));
    }
    eprintln!("left behind after destroy: {left:?}");
    failures.extend(left.into_iter().map(|l| format!("left behind: {l}")));
    assert!(failures.is_empty(), "{failures:#?}");
}
