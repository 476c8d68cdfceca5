//! The Firecracker driver against a fake host and a fake API; every request
//! body it sends is validated against Firecracker's API description.

use super::*;
use crate::host::{FakeHost, HostError};
use crate::{ImageRef, Lease, Limits};
use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};
use api::FakeApi;
use std::net::Ipv4Addr;
use std::sync::Mutex;

pub(crate) mod spec;

/// FakeHost, plus: a spawned firecracker "opens" its API socket at once.
#[derive(Debug, Default)]
struct Host2 {
    inner: FakeHost,
    spawned: Mutex<Vec<Cmd>>,
}

#[async_trait]
impl Host for Host2 {
    async fn run(&self, cmd: &Cmd) -> Result<String, HostError> {
        self.inner.run(cmd).await
    }
    async fn spawn_detached(&self, cmd: &Cmd, log: &Path) -> Result<Process, HostError> {
        let pid = self.inner.spawn_detached(cmd, log).await?;
        if let Some(i) = cmd.args.iter().position(|a| a == "--api-sock") {
            std::fs::write(&cmd.args[i + 1], b"").map_err(|source| HostError::Io {
                what: "fake socket".into(),
                source,
            })?;
        }
        if let Some(i) = cmd.args.iter().position(|a| a == "--chroot-base-dir") {
            let id = &cmd.args[1];
            let sock = Path::new(&cmd.args[i + 1])
                .join("firecracker")
                .join(id)
                .join("root")
                .join(JAILED_SOCKET);
            let _ = std::fs::write(sock, b"");
        }
        if let Ok(mut s) = self.spawned.lock() {
            s.push(cmd.clone());
        }
        Ok(pid)
    }
    fn signal(&self, pid: u32, signal: i32) -> Result<(), HostError> {
        self.inner.signal(pid, signal)
    }
    fn cmdline(&self, pid: u32) -> Option<String> {
        self.inner.cmdline(pid)
    }
    fn children(&self, pid: u32) -> Vec<u32> {
        self.inner.children(pid)
    }
    fn hold(&self, pid: u32, started: Option<u64>) -> Option<Process> {
        self.inner.hold(pid, started)
    }
    fn has_exited(&self, process: &Process) -> bool {
        self.inner.has_exited(process)
    }
    fn signal_process(&self, process: &Process, signal: i32) -> Result<(), HostError> {
        self.inner.signal_process(process, signal)
    }
    fn pid_namespace(&self, pid: u32) -> Option<u64> {
        self.inner.pid_namespace(pid)
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), HostError> {
        self.inner.chown(path, uid, gid)
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    host: Arc<Host2>,
    api: Arc<FakeApi>,
    driver: FirecrackerDriver,
}

fn artefacts(dir: &Path) -> VmImage {
    let k = dir.join("vmlinux");
    let b = dir.join("bzImage");
    let r = dir.join("root.ext4");
    std::fs::write(&k, b"elf kernel").expect("w");
    std::fs::write(&b, b"bz kernel").expect("w");
    std::fs::write(&r, b"ext4 bytes").expect("w");
    VmImage {
        build_id: "b1".into(),
        vmlinux_sha256: airlock_image::inputs::sha256_file(&k).expect("h"),
        bzimage_sha256: airlock_image::inputs::sha256_file(&b).expect("h"),
        rootfs_sha256: airlock_image::inputs::sha256_file(&r).expect("h"),
        rootfs_size: 10,
        vmlinux: k,
        bzimage: b,
        rootfs: r,
    }
}

fn setup(jailed: bool) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("fc");
    let mut cfg = FirecrackerConfig::new(root.clone(), Some(artefacts(tmp.path())));
    cfg.stop_grace = Duration::from_millis(100);
    cfg.socket_timeout = Duration::from_millis(500);
    if jailed {
        cfg.jailer = Some(JailerConfig {
            jailer_bin: "jailer".into(),
            uid: 123,
            gid: 456,
            chroot_base: tmp.path().join("jail"),
            cgroup_version: 2,
        });
    }
    let host = Arc::new(Host2::default());
    let api = Arc::new(FakeApi::default());
    let driver = FirecrackerDriver::new(cfg, host.clone(), api.clone());
    Setup {
        _tmp: tmp,
        root,
        host,
        api,
        driver,
    }
}

pub(crate) fn sandbox(id: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.into(),
        kind: SandboxKind::Browser,
        image: ImageRef {
            build_id: "b1".into(),
            layers: vec![],
        },
        lease: Lease {
            index: 5,
            host: Ipv4Addr::new(10, 235, 0, 21),
            guest: Ipv4Addr::new(10, 235, 0, 22),
            prefix_len: 30,
        },
        metadata: Metadata {
            sandbox_id: id.into(),
            kind: SandboxKind::Browser,
            agent_token: "0123456789abcdef0123".into(),
            vnc_password: "pw".into(),
            display: Display::default(),
            network: Network {
                address: "10.235.0.22".into(),
                gateway: "10.235.0.21".into(),
                prefix_len: 30,
            },
            egress: None,
        },
        limits: Limits::default(),
        proxy_port: Some(3128),
        home_volume: None,
    }
}

fn assert_all_valid(api: &FakeApi) {
    let spec = spec::ApiSpec::load();
    for request in api.sent() {
        if let Err(problems) = spec.validate(&request) {
            panic!("{request} does not match the API description: {problems:#?}");
        }
    }
}

#[tokio::test]
async fn boots_through_the_api_in_order_and_every_body_is_valid() {
    let s = setup(false);
    s.driver.create(&sandbox("vm1")).await.expect("create");
    s.driver.start("vm1").await.expect("start");
    let sent = s.api.sent();
    let lines: Vec<String> = sent.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/root",
            "PUT /drives/rw",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /mmds/config",
            "PUT /mmds",
            "PUT /actions",
        ]
    );
    assert_all_valid(&s.api);
    let body = |i: usize| sent[i].body.clone().expect("body");
    assert_eq!(body(0)["mem_size_mib"], 2048);
    assert!(body(1)["boot_args"]
        .as_str()
        .expect("str")
        .contains("ip=10.235.0.22::10.235.0.21:255.255.255.252::eth0:off"));
    assert_eq!(body(2)["is_read_only"], true);
    assert_eq!(body(2)["is_root_device"], true);
    assert_eq!(body(3)["is_read_only"], false);
    assert!(body(3)["path_on_host"]
        .as_str()
        .expect("str")
        .ends_with("vm1/rw.ext4"));
    assert_eq!(body(4)["host_dev_name"], "alvm1");
    assert_eq!(body(6)["version"], "V2");
    assert_eq!(body(7)["airlock"]["metadata"]["sandbox_id"], "vm1");
    assert_eq!(body(8)["action_type"], "InstanceStart");
    let cmds = s.host.inner.commands();
    assert!(cmds.contains(&"ip tuntap add dev alvm1 mode tap".to_owned()));
    assert!(cmds.contains(&"ip addr add 10.235.0.21/30 dev alvm1".to_owned()));
    let info = s.driver.inspect("vm1").await.expect("inspect");
    assert!(info.running);
    let meta = std::fs::metadata(s.root.join("vm1/metadata.json")).expect("metadata");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
}

#[tokio::test]
async fn stop_asks_the_guest_then_kills_and_destroy_leaves_nothing() {
    let s = setup(false);
    s.driver.create(&sandbox("vm2")).await.expect("create");
    s.driver.start("vm2").await.expect("start");
    let pid = s.driver.vmm.pid("vm2").expect("running");
    assert_eq!(
        s.driver.liveness("vm2").await.expect("liveness"),
        crate::Liveness::Alive
    );
    s.driver.destroy("vm2").await.expect("destroy");
    let last = s.api.sent().pop().expect("sent");
    assert_eq!(last.body.expect("body")["action_type"], "SendCtrlAltDel");
    assert_all_valid(&s.api);
    let signals = s.host.inner.signals.lock().expect("lock").clone();
    assert_eq!(
        signals,
        [(pid, libc::SIGKILL)],
        "killed after the grace period"
    );
    assert!(!s.root.join("vm2").exists());
    assert!(s.driver.list().await.expect("list").is_empty());
    assert!(s
        .host
        .inner
        .commands()
        .contains(&"ip link del alvm2".to_owned()));
    s.driver.destroy("vm2").await.expect("idempotent");
}

#[tokio::test]
async fn a_firecracker_fault_reaches_the_error_verbatim_and_the_vmm_is_killed() {
    let s = setup(false);
    let fault = "Unable to create the block device BackingFile(Os { code: 2, kind: NotFound, message: \"No such file or directory\" })";
    s.api.fault_on("PUT /drives/root", 400, fault);
    s.driver.create(&sandbox("vm3")).await.expect("create");
    let err = s.driver.start("vm3").await.expect_err("refused");
    assert!(err.to_string().contains(fault), "{err}");
    assert!(err.to_string().contains("PUT /drives/root (400)"), "{err}");
    assert!(s.driver.vmm.pid("vm3").is_none(), "killed");
    assert_eq!(s.api.sent().len(), 3, "nothing sent after the fault");
}

#[tokio::test]
async fn mismatching_artefacts_are_refused_before_anything_is_made() {
    let s = setup(false);
    let image = s.driver.cfg.image.clone().expect("image");
    std::fs::write(&image.vmlinux, b"another kernel").expect("w");
    let err = s.driver.create(&sandbox("vm4")).await.expect_err("refused");
    assert!(
        err.to_string().contains("does not match the manifest"),
        "{err}"
    );
    assert!(s.host.inner.commands().is_empty());
    assert!(!s.root.join("vm4").exists());

    let mut other = sandbox("vm4");
    other.image.build_id = "b9".into();
    let err = s.driver.create(&other).await.expect_err("other build");
    assert!(
        err.to_string().contains("airlock image build --vm"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failed_create_rolls_back() {
    let s = setup(false);
    s.host.inner.fail_on("ip link set alvm5 up");
    s.driver
        .create(&sandbox("vm5"))
        .await
        .expect_err("tap fails");
    assert!(!s.root.join("vm5").exists());
    assert!(s
        .host
        .inner
        .commands()
        .contains(&"ip link del alvm5".to_owned()));
}

#[tokio::test]
async fn jailed_vms_see_their_files_inside_the_jail() {
    let s = setup(true);
    s.driver.create(&sandbox("vm6")).await.expect("create");
    s.driver.start("vm6").await.expect("start");
    let spawned = s.host.spawned.lock().expect("lock").clone();
    let line = spawned[0].to_string();
    assert!(line.starts_with("jailer --id vm6 --exec-file firecracker --uid 123 --gid 456"));
    assert!(line.contains("--cgroup memory.max="), "{line}");
    let jail = s.driver.jail_root("vm6").expect("jail");
    for f in ["vmlinux", "rootfs.ext4", "rw.ext4"] {
        assert!(jail.join(f).exists(), "{f} linked into the jail");
    }
    let sent = s.api.sent();
    assert_eq!(
        sent[1].body.as_ref().expect("b")["kernel_image_path"],
        "/vmlinux"
    );
    assert_eq!(
        sent[3].body.as_ref().expect("b")["path_on_host"],
        "/rw.ext4"
    );
    assert!(s
        .host
        .inner
        .commands()
        .contains(&"ip -n airlock-vm6 tuntap add dev tap0 mode tap user 123 group 456".to_owned()));
    let writable = s.root.join("vm6/rw.ext4");
    assert!(
        s.host
            .inner
            .commands()
            .contains(&format!("chown 123:456 {}", writable.display())),
        "the jail's uid may write the VM's own disk"
    );
    assert_all_valid(&s.api);
    s.driver.destroy("vm6").await.expect("destroy");
    assert!(!jail.exists());
}

/// What a jailed VM's network is made of, in order (`link::create_for_vm`).
fn jailed_net_commands(id: &str) -> Vec<String> {
    let ns = format!("airlock-{id}");
    [
        format!("ip netns add {ns}"),
        format!("ip link add al{id} type veth peer name eth0 netns {ns}"),
        format!("ip addr add 10.235.0.21/30 dev al{id}"),
        format!("ip link set al{id} up"),
        format!("ip -n {ns} link add br0 type bridge"),
        format!("ip -n {ns} tuntap add dev tap0 mode tap user 123 group 456"),
        format!("ip -n {ns} link set br0 addrgenmode none"),
        format!("ip -n {ns} link set eth0 addrgenmode none"),
        format!("ip -n {ns} link set tap0 addrgenmode none"),
        format!("ip -n {ns} link set eth0 master br0 up"),
        format!("ip -n {ns} link set tap0 master br0 up"),
        format!("ip -n {ns} link set br0 up"),
    ]
    .into()
}

/// What removing it is made of, after the firewall rules' removal.
fn jailed_net_removal(id: &str) -> Vec<String> {
    let ns = format!("airlock-{id}");
    [
        format!("ip -n {ns} link del tap0"),
        format!("ip -n {ns} link del br0"),
        format!("ip link del al{id}"),
        format!("ip netns del {ns}"),
    ]
    .into()
}

fn is_network(cmd: &str) -> bool {
    cmd.starts_with("ip ") || cmd.starts_with("nft ")
}

#[tokio::test]
async fn a_jailed_vm_gets_a_network_namespace_with_its_tap_inside() {
    let s = setup(true);
    s.driver.create(&sandbox("vm10")).await.expect("create");
    let cmds: Vec<String> = s
        .host
        .inner
        .commands()
        .into_iter()
        .filter(|c| is_network(c))
        .collect();
    let mut want = jailed_net_commands("vm10");
    assert_eq!(cmds[..want.len()], want[..], "{cmds:#?}");
    // Then the firewall, on the host end of the veth pair, as for nspawn.
    assert_eq!(cmds.len(), want.len() + 1, "{cmds:#?}");
    let nft = &cmds[want.len()];
    assert!(nft.starts_with("nft add table inet airlock"), "{nft}");
    assert!(nft.contains("add element inet airlock from_guest { \"alvm10\" : jump alvm10_in }"));
    assert!(nft.contains("ip daddr 10.235.0.21 tcp dport 3128 ct state new accept"));
    assert!(
        !cmds.iter().any(|c| c.starts_with("ip tuntap")),
        "no TAP in the host's namespace: {cmds:#?}"
    );
    let record = VmRecord::read(&s.root.join("vm10"), "vm10").expect("record");
    assert_eq!(
        (record.tap.as_str(), record.netns.as_deref()),
        ("tap0", Some("airlock-vm10"))
    );

    s.driver.start("vm10").await.expect("start");
    let spawned = s.host.spawned.lock().expect("lock").clone();
    let line = spawned[0].to_string();
    assert!(
        line.ends_with(" --netns /run/netns/airlock-vm10"),
        "the jailer joins the VM's namespace: {line}"
    );
    let sent = s.api.sent();
    let nic = sent
        .iter()
        .find(|r| r.path == "/network-interfaces/eth0")
        .and_then(|r| r.body.clone())
        .expect("network interface");
    assert_eq!(nic["host_dev_name"], "tap0", "the TAP inside the namespace");
    assert_eq!(nic["guest_mac"], "06:00:0a:eb:00:16");
    let boot = sent[1].body.as_ref().expect("boot source");
    assert!(boot["boot_args"]
        .as_str()
        .expect("str")
        .contains("ip=10.235.0.22::10.235.0.21:255.255.255.252::eth0:off"));
    assert_all_valid(&s.api);

    let before = s.host.inner.commands().len();
    s.driver.destroy("vm10").await.expect("destroy");
    let removal: Vec<String> = s.host.inner.commands()[before..]
        .iter()
        .filter(|c| is_network(c))
        .cloned()
        .collect();
    assert!(
        removal[0].starts_with("nft delete element inet airlock from_guest { \"alvm10\" }"),
        "{removal:#?}"
    );
    want = jailed_net_removal("vm10");
    assert_eq!(removal[1..], want[..], "{removal:#?}");
    assert!(!s.root.join("vm10").exists());
    assert!(!s.driver.jail_root("vm10").expect("jail").exists());
    // Again: idempotent, the same removal of what may be left.
    let before = s.host.inner.commands().len();
    s.driver.destroy("vm10").await.expect("idempotent");
    let again: Vec<String> = s.host.inner.commands()[before..]
        .iter()
        .filter(|c| c.starts_with("ip "))
        .cloned()
        .collect();
    assert_eq!(again, want);
}

#[tokio::test]
async fn a_jailed_create_that_fails_half_way_leaves_nothing() {
    // Every step of the VM's network, and the firewall after it.
    let mut failures: Vec<String> = jailed_net_commands("vm11");
    failures.push("nft add table".into());
    for failing in failures {
        let s = setup(true);
        s.host.inner.fail_on(&failing);
        let err = s
            .driver
            .create(&sandbox("vm11"))
            .await
            .expect_err("a step fails");
        assert!(
            matches!(err, DriverError::Host { .. }),
            "{failing}: {err:#?}"
        );
        let cmds = s.host.inner.commands();
        let removal = jailed_net_removal("vm11");
        assert_eq!(
            cmds[cmds.len() - removal.len()..],
            removal[..],
            "{failing}: {cmds:#?}"
        );
        assert!(
            cmds.iter()
                .any(|c| c.starts_with("nft delete element inet airlock from_guest")),
            "{failing}: the rules' removal is tried too"
        );
        assert!(!s.root.join("vm11").exists(), "{failing}");
        assert!(
            !s.driver.jail_root("vm11").expect("jail").exists(),
            "{failing}"
        );
        assert!(s.host.spawned.lock().expect("lock").is_empty());
    }
}

#[tokio::test]
async fn an_unjailed_vm_keeps_its_tap_in_the_host_namespace() {
    let s = setup(false);
    s.driver.create(&sandbox("vm12")).await.expect("create");
    s.driver.start("vm12").await.expect("start");
    s.driver.destroy("vm12").await.expect("destroy");
    let cmds = s.host.inner.commands();
    assert!(
        !cmds
            .iter()
            .any(|c| c.contains("netns") || c.contains(" -n ")),
        "{cmds:#?}"
    );
    let spawned = s.host.spawned.lock().expect("lock").clone();
    assert!(!spawned[0].to_string().contains("--netns"));
    let record_tap = s
        .api
        .sent()
        .into_iter()
        .find(|r| r.path == "/network-interfaces/eth0")
        .and_then(|r| r.body)
        .expect("nic");
    assert_eq!(record_tap["host_dev_name"], "alvm12");
}

/// A control plane restarted with other settings still cleans up exactly
/// what a sandbox has: the record says it has a namespace of its own.
#[tokio::test]
async fn a_jailed_vm_re_adopted_without_the_jailer_is_cleaned_up_whole() {
    let jailed = setup(true);
    jailed
        .driver
        .create(&sandbox("vm13"))
        .await
        .expect("create");
    let mut cfg = jailed.driver.cfg.clone();
    cfg.jailer = None;
    let host = Arc::new(Host2::default());
    let restarted = FirecrackerDriver::new(cfg, host.clone(), Arc::new(FakeApi::default()));
    let listed = restarted.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "vm13");
    restarted.destroy("vm13").await.expect("destroy");
    let cmds: Vec<String> = host
        .inner
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("ip "))
        .collect();
    assert_eq!(cmds, jailed_net_removal("vm13"));
    assert!(restarted.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn snapshot_and_restore_calls_are_valid() {
    let s = setup(false);
    s.driver.create(&sandbox("vm7")).await.expect("create");
    s.driver.start("vm7").await.expect("start");
    s.driver
        .snapshot_create("vm7", Path::new("/snap/vmstate"), Path::new("/snap/mem"))
        .await
        .expect("snapshot");
    s.driver.destroy("vm7").await.expect("destroy");
    s.driver.create(&sandbox("vm8")).await.expect("create");
    s.driver
        .restore(
            "vm8",
            Path::new("/snap/vmstate"),
            Path::new("/snap/mem"),
            true,
        )
        .await
        .expect("restore");
    let lines: Vec<String> = s.api.sent().iter().map(ToString::to_string).collect();
    let tail = &lines[lines.len() - 3..];
    assert_eq!(tail, ["PUT /snapshot/load", "PUT /mmds", "PATCH /vm"]);
    assert!(lines.contains(&"PUT /snapshot/create".to_owned()));
    assert_all_valid(&s.api);
    let load = s
        .api
        .sent()
        .into_iter()
        .find(|r| r.path == "/snapshot/load")
        .and_then(|r| r.body)
        .expect("load body");
    assert_eq!(load["network_overrides"][0]["host_dev_name"], "alvm8");
}

#[tokio::test]
async fn without_vm_artefacts_create_says_how_to_get_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let driver = FirecrackerDriver::new(
        FirecrackerConfig::new(tmp.path().join("fc"), None),
        Arc::new(FakeHost::default()),
        Arc::new(FakeApi::default()),
    );
    let err = driver
        .create(&sandbox("x"))
        .await
        .expect_err("no artefacts");
    assert!(err.to_string().contains("--vm"), "{err}");
}

#[test]
fn the_validator_itself_rejects_what_firecracker_would() {
    use serde_json::json;
    let spec = spec::ApiSpec::load();
    let req = |method, path: &str, body| ApiRequest {
        method,
        path: path.into(),
        body: Some(body),
    };
    // Accepts a minimal valid body.
    spec.validate(&req(
        api::Method::Put,
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 512}),
    ))
    .expect("valid");
    for (method, path, body) in [
        // A required field missing.
        (api::Method::Put, "/boot-source", json!({"boot_args": "x"})),
        // A field Firecracker does not know (it denies unknown fields).
        (
            api::Method::Put,
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 512, "ht_enabled": true}),
        ),
        // Out of range.
        (
            api::Method::Put,
            "/machine-config",
            json!({"vcpu_count": 64, "mem_size_mib": 512}),
        ),
        // Not in the enum.
        (
            api::Method::Put,
            "/actions",
            json!({"action_type": "Reboot"}),
        ),
        (
            api::Method::Put,
            "/vsock",
            json!({"guest_cid": 2, "uds_path": "/x"}),
        ),
        (
            api::Method::Put,
            "/mmds/config",
            json!({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}),
        ),
        // A path or method the API does not have.
        (api::Method::Put, "/nonexistent", json!({})),
        (
            api::Method::Patch,
            "/boot-source",
            json!({"kernel_image_path": "/k"}),
        ),
    ] {
        let r = req(method, path, body);
        assert!(
            spec.validate(&r).is_err(),
            "{r} {:?} should be refused",
            r.body
        );
    }
}

#[tokio::test]
async fn a_socket_path_too_long_for_a_unix_socket_is_refused_before_anything_is_made() {
    let s = setup(true);
    let id = format!("v{}", "x".repeat(110));
    let err = s.driver.create(&sandbox(&id)).await.expect_err("too long");
    assert!(err.to_string().contains("at most 107"), "{err}");
    assert!(s.host.inner.commands().is_empty());
    assert!(!s.root.join(&id).exists());
}

#[tokio::test]
async fn a_killed_firecracker_is_dead_by_name() {
    let s = setup(true);
    s.driver.create(&sandbox("vm9")).await.expect("create");
    s.driver.start("vm9").await.expect("start");
    let pid = s.driver.vmm.pid("vm9").expect("running");
    s.host.signal(pid, libc::SIGKILL).expect("kill");
    assert_eq!(
        s.driver.liveness("vm9").await.expect("liveness"),
        crate::Liveness::Dead(format!("firecracker (pid {pid}) exited"))
    );
    s.driver.destroy("vm9").await.expect("destroy");
    assert!(matches!(
        s.driver.liveness("vm9").await,
        Err(DriverError::NotFound(_))
    ));
}
