//! The Firecracker driver against a real `firecracker` (`$AIRLOCK_FIRECRACKER_BIN`,
//! else on PATH) and, for the jailed run, a real `jailer`
//! (`$AIRLOCK_JAILER_BIN`, else on PATH): every configuration call and
//! InstanceStart through the real API socket, each request body checked
//! against Firecracker's API description; the metadata read back from MMDS;
//! under the jailer, the process's chroot, uid and network namespace; then
//! a clean destroy that leaves no process, jail, link, namespace, rule or
//! state behind. The jailed run first SIGKILLs its Firecracker: liveness must
//! name it dead within 2 s, and destroy clean up without it. Where KVM runs
//! guests, the unjailed run's guest agent must then answer
//! `/health` with the injected sandbox id; where it does not (a `/dev/kvm`
//! whose guests never make progress) that part is skipped, saying why.
//! Skips entirely, saying why, where there is no binary, no root or no VM
//! artefacts.

mod common;

use airlock_drivers::firecracker::api::{ApiClient, ApiError, ApiReply, ApiRequest, UnixApi};
use airlock_drivers::firecracker::{FirecrackerConfig, FirecrackerDriver, JailerConfig};
use airlock_drivers::host::RealHost;
use airlock_drivers::net::link::LinkNames;
use airlock_drivers::qemu::{probe_kvm, KvmProbe};
use airlock_drivers::{Driver, Liveness};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The validator the unit tests use, over the same kept API description
/// (it names the API types as `crate::firecracker::api`).
#[path = "../src/firecracker/tests/spec.rs"]
mod spec;
mod firecracker {
    pub mod api {
        pub use airlock_drivers::firecracker::api::*;
    }
}

/// The real API client, keeping every request it sent.
#[derive(Debug, Default)]
struct Recorded {
    inner: UnixApi,
    sent: Mutex<Vec<ApiRequest>>,
}

#[async_trait]
impl ApiClient for Recorded {
    async fn send(&self, socket: &Path, request: &ApiRequest) -> Result<ApiReply, ApiError> {
        if let Ok(mut sent) = self.sent.lock() {
            sent.push(request.clone());
        }
        self.inner.send(socket, request).await
    }
}

struct Setup {
    firecracker: PathBuf,
    image_ref: airlock_drivers::ImageRef,
    vm_image: airlock_drivers::vm::VmImage,
}

fn setup() -> Option<Setup> {
    let bin = std::env::var("AIRLOCK_FIRECRACKER_BIN").unwrap_or_else(|_| "firecracker".into());
    let Some(firecracker) = common::on_path(&bin) else {
        eprintln!(
            "SKIPPED: no firecracker binary ({bin} is not on PATH; set AIRLOCK_FIRECRACKER_BIN). \
             The driver's requests are still checked against the API description by the unit tests."
        );
        return None;
    };
    if !common::is_root() {
        eprintln!("SKIPPED: the Firecracker test needs root (TAP devices, namespaces, /dev/kvm)");
        return None;
    }
    match common::vm_image() {
        Ok((image_ref, vm_image)) => Some(Setup {
            firecracker,
            image_ref,
            vm_image,
        }),
        Err(why) => {
            eprintln!("SKIPPED: the Firecracker test: {why}");
            None
        }
    }
}

/// Whether KVM really runs guests here, or why not.
async fn kvm_runs_guests(vm_image: &airlock_drivers::vm::VmImage) -> Result<(), String> {
    if common::on_path("qemu-system-x86_64").is_none() {
        return if Path::new("/dev/kvm").exists() {
            Ok(())
        } else {
            Err("there is no /dev/kvm".into())
        };
    }
    match probe_kvm(
        "qemu-system-x86_64",
        &vm_image.bzimage,
        Duration::from_secs(10),
    )
    .await
    {
        KvmProbe::Works(_) => Ok(()),
        probe => Err(probe.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_firecracker_is_configured_started_and_destroyed() {
    let Some(s) = setup() else { return };
    run(s, None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jailed_firecracker_is_configured_started_and_destroyed() {
    let Some(s) = setup() else { return };
    let bin = std::env::var("AIRLOCK_JAILER_BIN").unwrap_or_else(|_| "jailer".into());
    let Some(jailer) = common::on_path(&bin) else {
        eprintln!("SKIPPED: no jailer binary ({bin} is not on PATH; set AIRLOCK_JAILER_BIN)");
        return;
    };
    run(s, Some(jailer), 1).await;
}

/// An unprivileged uid and gid for the jailed Firecracker, unused on the host.
const JAIL_ID: u32 = 64_123;

async fn run(s: Setup, jailer: Option<PathBuf>, half: u32) {
    // The jail holds hard links to the image's files: the state must be on
    // the image's file system, as the driver requires of its data dir.
    let image_fs = s
        .vm_image
        .rootfs
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("tmp"))
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let root = tempfile::Builder::new()
        // Short: the jailed API socket's path must fit a Unix socket address.
        .prefix("fc.")
        .tempdir_in(if jailer.is_some() {
            image_fs
        } else {
            PathBuf::from("/var/tmp")
        })
        .expect("state dir");
    let mut cfg = FirecrackerConfig::new(root.path().join("vms"), Some(s.vm_image.clone()));
    cfg.firecracker_bin = s.firecracker.clone();
    cfg.stop_grace = Duration::from_secs(2);
    let chroot_base = root.path().join("jail");
    if let Some(jailer_bin) = &jailer {
        cfg.jailer = Some(JailerConfig {
            jailer_bin: jailer_bin.clone(),
            uid: JAIL_ID,
            gid: JAIL_ID,
            chroot_base: chroot_base.clone(),
            // No cgroup limits asked of the jailer: this host's cgroup v2 is
            // a hybrid one without controllers.
            cgroup_version: 1,
        });
    }
    let api = Arc::new(Recorded::default());
    let driver = FirecrackerDriver::new(cfg, Arc::new(RealHost), api.clone());
    let id = format!("fc{}{}", half, std::process::id() % 100_000);
    let token = format!("fctest-token-{}", std::process::id());
    let mut spec = common::spec(&id, s.image_ref.clone(), &token);
    // This test's own address range.
    let pool = airlock_drivers::net::pool::AddressPool::parse("10.246.0.0/16").expect("pool");
    spec.lease = pool
        .lease(16_000 + half * 150 + std::process::id() % 150)
        .expect("lease");
    spec.metadata.network.address = spec.lease.guest.to_string();
    spec.metadata.network.gateway = spec.lease.host.to_string();

    let kvm = kvm_runs_guests(&s.vm_image).await;
    let t0 = Instant::now();
    let outcome = async {
        driver.create(&spec).await.map_err(|e| format!("create: {e}"))?;
        driver.start(&id).await.map_err(|e| format!("start: {e}"))?;
        let configured = t0.elapsed();
        let socket = match &jailer {
            Some(_) => chroot_base.join("firecracker").join(&id).join("root/run/firecracker.socket"),
            None => root.path().join("vms").join(&id).join("api.sock"),
        };
        // Every request the driver sent, InstanceStart last, as the API
        // description allows.
        let sent = api.sent.lock().map(|s| s.clone()).unwrap_or_default();
        let described = spec::ApiSpec::load();
        for request in &sent {
            described
                .validate(request)
                .map_err(|p| format!("{request} does not match the API description: {p:?}"))?;
        }
        let last = sent.last().map(ToString::to_string).unwrap_or_default();
        if last != "PUT /actions" {
            return Err(format!("the last request was {last}, not InstanceStart"));
        }
        let info = api
            .call(&socket, &ApiRequest::describe_instance())
            .await
            .map_err(|e| format!("describe: {e}"))?;
        if !info.body.contains("\"state\":\"Running\"") {
            return Err(format!("not running after InstanceStart: {}", info.body));
        }
        let mmds = api
            .call(
                &socket,
                &ApiRequest {
                    method: firecracker::api::Method::Get,
                    path: "/mmds".into(),
                    body: None,
                },
            )
            .await
            .map_err(|e| format!("GET /mmds: {e}"))?;
        if !mmds.body.contains(&format!("\"sandbox_id\":\"{id}\"")) || !mmds.body.contains(&token) {
            return Err(format!("MMDS does not serve the sandbox's metadata: {} bytes", mmds.body.len()));
        }
        let pid = driver
            .inspect(&id)
            .await
            .map_err(|e| e.to_string())?
            .pid
            .ok_or("no firecracker pid")?;
        if jailer.is_some() {
            check_jail(pid, &chroot_base.join("firecracker").join(&id).join("root"), &id)?;
        }
        let alive = driver.liveness(&id).await.map_err(|e| e.to_string())?;
        if alive != Liveness::Alive {
            return Err(format!("a started VM is {alive:?}"));
        }
        eprintln!(
            "firecracker{}: {} requests valid, configured and started in {configured:.1?}; MMDS serves the metadata; {}",
            if jailer.is_some() { " (jailed)" } else { "" },
            sent.len(),
            info.body
        );
        if jailer.is_some() {
            // The jailed run also loses its VMM: dead at once, named, and
            // destroyed without it.
            // SAFETY: kill(2) of a pid this test's driver started.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            if rc != 0 {
                return Err(format!("kill firecracker: {}", std::io::Error::last_os_error()));
            }
            let killed = Instant::now();
            let why = loop {
                if let Liveness::Dead(why) = driver.liveness(&id).await.map_err(|e| e.to_string())? {
                    break why;
                }
                if killed.elapsed() > Duration::from_secs(2) {
                    return Err("still alive 2 s after firecracker was killed".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            eprintln!("liveness noticed the SIGKILLed firecracker after {:?}: {why}", killed.elapsed());
            if why != format!("firecracker (pid {pid}) exited") {
                return Err(format!("the reason does not name firecracker: {why}"));
            }
            return Ok(());
        }
        if let Err(why) = &kvm {
            eprintln!("SKIPPED (the wait for the guest's agent): KVM does not run guests here: {why}");
            return Ok(());
        }
        let endpoints = driver
            .wait_ready(&id, Duration::from_secs(120))
            .await
            .map_err(|e| format!("wait_ready: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let body = loop {
            match common::get(endpoints.agent, "/health", &token).await {
                Ok((200, body)) => break body,
                other if Instant::now() > deadline => return Err(format!("/health: {other:?}")),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if !body.contains(&format!("\"sandbox_id\":\"{id}\"")) {
            return Err(format!("/health names another sandbox: {body}"));
        }
        eprintln!("firecracker: the agent answered at {:.1?}", t0.elapsed());
        Ok::<(), String>(())
    }
    .await;
    let mut failures: Vec<String> = outcome.err().into_iter().collect();
    if let Err(e) = driver.destroy(&id).await {
        failures.push(format!("destroy: {e}"));
    }
    let left = leftovers(&id, root.path());
    eprintln!("left behind after destroy: {left:?}");
    failures.extend(left.into_iter().map(|l| format!("left behind: {l}")));
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The jailed Firecracker runs chrooted in its jail, as the jail's uid, in
/// the sandbox's network namespace.
fn check_jail(pid: u32, jail: &Path, id: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // The jailer pivots into the jail in a mount namespace of its own: the
    // process's `/` is the jail's root directory, its `/rw.ext4` the jail's.
    let ino = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let seen = ino(&Path::new(&format!("/proc/{pid}/root")).join("rw.ext4"));
    let linked = ino(&jail.join("rw.ext4"));
    if seen.is_err() || seen.as_ref().ok() != linked.as_ref().ok() {
        return Err(format!(
            "firecracker's root is not its jail {} ({seen:?} vs {linked:?})",
            jail.display()
        ));
    }
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    if !uid_line
        .split_whitespace()
        .skip(1)
        .all(|u| u == JAIL_ID.to_string())
    {
        return Err(format!(
            "firecracker does not run as the jail's uid: {uid_line}"
        ));
    }
    let netns = std::fs::metadata(LinkNames::for_sandbox(id).netns_path())
        .map_err(|e| format!("the sandbox's netns: {e}"))?
        .ino();
    let its = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map_err(|e| e.to_string())?
        .ino();
    if its != netns {
        return Err("firecracker is not in the sandbox's network namespace".into());
    }
    Ok(())
}

/// What of the sandbox is left on the host, one line per kind.
fn leftovers(id: &str, root: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let names = LinkNames::for_sandbox(id);
    let marker = format!("\0--id\0{id}\0");
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.contains(&marker))
        .collect();
    if !procs.is_empty() {
        left.push(format!("processes: {procs:?}"));
    }
    if Path::new("/sys/class/net").join(&names.host_if).exists() {
        left.push(format!("link {}", names.host_if));
    }
    if Path::new(&names.netns_path()).exists() {
        left.push(format!("netns {}", names.netns));
    }
    let rules = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if rules.contains(&format!("\"{}\"", names.host_if)) {
        left.push("nftables rules".into());
    }
    for dir in [
        root.join("vms").join(id),
        root.join("jail/firecracker").join(id),
    ] {
        if dir.exists() {
            left.push(format!("{}", dir.display()));
        }
    }
    left
}
