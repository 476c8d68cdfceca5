//! Isolation under the real nspawn driver: each guest in a user namespace of
//! its own, its home unreadable to host users, its agent port closed to every
//! host process but the control plane, its CPU and IO limits on its cgroups.

mod common;

use common::unmet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the driver recorded about a sandbox (`sandbox.json`).
fn record(data_dir: &Path, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(data_dir.join("sandboxes").join(id).join("sandbox.json"))
        .expect("sandbox.json");
    serde_json::from_str(&text).expect("json")
}

/// Run `argv` on the host, as root or (with `uid`) as that user with no
/// groups; whether it succeeded.
fn run_as(uid: Option<u32>, argv: &[&str]) -> bool {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
            ]);
            c.args(argv);
            c
        }
        None => {
            let mut c = std::process::Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A TCP connection attempt from the host, bounded to 3 s.
fn connects(uid: Option<u32>, addr: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{addr}/{port}");
    run_as(uid, &["timeout", "3", "bash", "-c", &script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_its_own_user_namespace_and_host_users_cannot_reach_it() {
    if unmet().is_some() {
        return;
    }
    let h = common::start("10.242.1.0/24").await;
    let id = h.ready_sandbox("workspace").await;
    let rec = record(&h.data_dir, &id);
    let base = rec["uid_base"].as_u64().expect("a uid range") as u32;
    assert!(base >= 0x7000_0000 && base.is_multiple_of(65536), "{rec}");

    // Inside: the desktop user is uid 1000 and root is root, mapped onto the
    // sandbox's own range.
    let out = h
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "id -u; cat /proc/self/uid_map; echo secret > ~/kept; stat -c %u ~/kept",
            ],
        )
        .await;
    let stdout = out["stdout"].as_str().expect("stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "1000", "{out}");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["0", &base.to_string(), "65536"],
        "{out}"
    );
    assert_eq!(lines[2], "1000", "{out}");

    // Outside: the home and what the guest wrote in it belong to the range,
    // not to host uid 1000, who cannot read them.
    let home: PathBuf = h.data_dir.join("volumes/local/home");
    let kept = home.join("kept");
    assert_eq!(std::fs::metadata(&home).expect("home").uid(), base + 1000);
    assert_eq!(std::fs::metadata(&kept).expect("kept").uid(), base + 1000);
    let kept_s = kept.display().to_string();
    assert!(run_as(None, &["cat", &kept_s]), "root reads it");
    assert!(
        !run_as(Some(1000), &["cat", &kept_s]),
        "host uid 1000 read the guest's home"
    );

    // The agent and VNC ports: the control plane (root) reaches them, a host
    // user does not.
    let guest = rec["guest_addr"]
        .as_str()
        .expect("guest address")
        .to_owned();
    for port in [airlock_proto::AGENT_PORT, airlock_proto::VNC_PORT] {
        assert!(connects(None, &guest, port), "root reaches {guest}:{port}");
        assert!(
            !connects(Some(65534), &guest, port),
            "an unprivileged host process reached {guest}:{port}"
        );
        assert!(
            !connects(Some(1000), &guest, port),
            "host uid 1000 reached {guest}:{port}"
        );
    }
    // Still served afterwards.
    assert_eq!(h.exec(&id, &["true"]).await["exit_code"], 0);

    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    assert_eq!(common::leftovers(&h.data_dir, &id), Vec::<String>::new());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_io_limits_are_on_the_sandbox_cgroups() {
    if unmet().is_some() {
        return;
    }
    let h = common::start_with("10.242.2.0/24", |cfg| {
        cfg.cpu_max = Some(0.5);
        cfg.io_max = Some(20 << 20);
    })
    .await;
    let id = h.ready_sandbox("browser").await;
    let cg = Path::new("/sys/fs/cgroup");
    if cg.join("cpu/cgroup.procs").exists() {
        let dir = cg.join("cpu/airlock").join(&id);
        let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).expect("quota");
        let period = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).expect("period");
        assert_eq!((quota.trim(), period.trim()), ("50000", "100000"));
        let blkio = cg.join("blkio/airlock").join(&id);
        for file in [
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
        ] {
            let text = std::fs::read_to_string(blkio.join(file)).expect(file);
            assert!(text.trim().ends_with(" 20971520"), "{file}: {text:?}");
        }
    } else {
        let dir = cg.join("airlock").join(&id);
        let cpu = std::fs::read_to_string(dir.join("cpu.max")).expect("cpu.max");
        assert_eq!(cpu.trim(), "50000 100000");
        let io = std::fs::read_to_string(dir.join("io.max")).expect("io.max");
        assert!(io.contains("rbps=20971520 wbps=20971520"), "{io:?}");
    }
    // The limit holds: a busy loop in the guest gets about half a CPU.
    let out = h
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "timeout 3 sh -c 'while :; do :; done'; awk '{print $16+$17}' /proc/$$/stat",
            ],
        )
        .await;
    // Children's user+system time in clock ticks (100 per second). Under
    // the limit the loop gets at most half a CPU, 150 ticks; unlimited it
    // would take a whole one, 300. How much less it gets depends on what
    // else the host runs, so only the ceiling is checked (and that it ran).
    let ticks: f64 = out["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .expect("ticks");
    assert!(
        ticks > 0.0 && ticks < 200.0,
        "3 s of busy loop used {ticks} ticks: more than half a CPU"
    );
    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    h.shutdown().await;
}

/// Free bytes on the filesystem that holds `path`.
fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

/// Bytes a file takes on disk (not its apparent size).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sandbox_disk_is_enospc_inside_and_the_host_keeps_its_space() {
    if unmet().is_some() {
        return;
    }
    const QUOTA_MB: u64 = 256;
    let h = common::start_with("10.242.3.0/24", |cfg| {
        cfg.disk_mb = QUOTA_MB;
        cfg.home_disk_mb = 128;
    })
    .await;
    let id = h.ready_sandbox("workspace").await;
    let before = free_bytes(&h.data_dir);

    // The writable layer: 4 GiB does not fit, and what fits stops at the quota.
    let out = h
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "fallocate -l 4G /var/tmp/big; echo rc=$?; \
                 dd if=/dev/zero of=/var/tmp/fill bs=1M count=4096 2>&1 | tail -1; \
                 df -m / | tail -1",
            ],
        )
        .await;
    let text = format!("{}{}", out["stdout"], out["stderr"]);
    assert!(text.contains("No space left on device"), "{out}");
    assert!(!text.contains("rc=0"), "fallocate of 4G succeeded: {out}");
    let image = h.data_dir.join("sandboxes").join(&id).join("rw.img");
    let used = allocated(&image);
    assert!(
        used <= QUOTA_MB << 20,
        "the layer takes {used} bytes on the host"
    );
    let after = free_bytes(&h.data_dir);
    // Other processes share the disk: allow them some slack, far below the
    // 4 GiB the guest asked for.
    assert!(
        before.saturating_sub(after) < (QUOTA_MB << 20) + (1 << 30),
        "host free space fell by {} bytes",
        before.saturating_sub(after)
    );

    // The home: its own limit (a failed fallocate may keep what it got: the
    // file goes, then the home takes writes again).
    let out = h
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "fallocate -l 512M ~/big; echo rc=$?; rm -f ~/big; echo kept > ~/small && cat ~/small",
            ],
        )
        .await;
    let text = format!("{}{}", out["stdout"], out["stderr"]);
    assert!(text.contains("No space left on device"), "{out}");
    assert!(text.contains("kept"), "{out}");
    // The guest frees its space: the sandbox still works afterwards.
    let out = h
        .exec(
            &id,
            &["sh", "-c", "rm -f /var/tmp/fill /var/tmp/big; echo ok"],
        )
        .await;
    assert_eq!(out["stdout"], "ok\n", "{out}");

    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    assert_eq!(common::leftovers(&h.data_dir, &id), Vec::<String>::new());
    // The home stays, on its own filesystem, for the next workspace.
    let next = h.ready_sandbox("workspace").await;
    assert_eq!(
        h.exec(&next, &["cat", "/home/airlock/small"]).await["stdout"],
        "kept\n"
    );
    h.delete(&format!("/api/v1/sandboxes/{next}")).await;
    h.wait_state(&next, "stopped", Duration::from_secs(30))
        .await;
    h.shutdown().await;
}
