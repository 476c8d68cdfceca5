//! The host halves of sandbox isolation, against the real kernel (no image
//! needed): image layers idmapped into a uid range without a byte chowned,
//! and the firewall's output rule that keeps host users off a guest's link.

mod common;

use common::{in_netns, Namespace, NetOnly};

use airlock_drivers::host::{Host, RealHost};
use airlock_drivers::net::firewall;
use airlock_drivers::net::link::{self, LinkNames};
use airlock_drivers::net::pool::AddressPool;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false)
}

/// Whether the test can run; in CI a missing prerequisite is a failure.
fn can_run(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run {what}, but it needs root"
    );
    eprintln!("SKIPPED: {what} needs root");
    false
}

fn sh(argv: &[&str]) -> String {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Unmount(Vec<String>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for point in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .args(["-l", point])
                .status();
        }
    }
}

/// A layer owned by root on disk shows as owned by the range's root through
/// the idmapped bind, cannot be written through it, and an overlay on top
/// writes into an upper dir of the range, leaving the layer as it was.
#[tokio::test]
async fn an_idmapped_layer_is_the_guest_roots_and_stays_untouched() {
    if !can_run("the idmapped mount test") {
        return;
    }
    let base: u32 = 0x7FF0_0000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (layer, mapped) = (tmp.path().join("layer"), tmp.path().join("mapped"));
    for d in [&layer, &mapped] {
        std::fs::create_dir_all(d).expect("dir");
    }
    std::fs::create_dir_all(layer.join("etc")).expect("etc");
    std::fs::write(layer.join("etc/hostname"), "image\n").expect("file");
    std::os::unix::fs::chown(layer.join("etc/hostname"), Some(1000), Some(1000)).expect("chown");

    RealHost
        .idmapped_bind(&layer, &mapped, base, 65536)
        .expect("idmapped bind");
    let mut guard = Unmount(vec![mapped.display().to_string()]);
    let through = |p: &str| std::fs::metadata(mapped.join(p)).expect("stat");
    assert_eq!(
        through("etc").uid(),
        base,
        "root's dir shows as the range's root"
    );
    assert_eq!(through("etc/hostname").uid(), base + 1000);
    let err = std::fs::write(mapped.join("etc/new"), "x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // The overlay the driver builds on it.
    let (upper, work, merged) = (
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).expect("dir");
    }
    std::os::unix::fs::chown(&upper, Some(base), Some(base)).expect("chown upper");
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        mapped.display(),
        upper.display(),
        work.display()
    );
    sh(&[
        "mount",
        "-t",
        "overlay",
        "overlay",
        "-o",
        &options,
        &merged.display().to_string(),
    ]);
    guard.0.push(merged.display().to_string());
    std::fs::write(merged.join("etc/hostname"), "changed\n").expect("write through overlay");
    assert_eq!(
        std::fs::metadata(upper.join("etc/hostname"))
            .expect("copied up")
            .uid(),
        base + 1000,
        "a copied-up file keeps the range's ids on disk"
    );
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/hostname")).expect("layer"),
        "image\n"
    );
    let meta = std::fs::metadata(layer.join("etc/hostname")).expect("layer");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1000, 1000),
        "the layer was not chowned"
    );
    drop(guard);
}

/// A TCP connect from the test's "host" namespace, as root or as `uid`.
fn connects(ns: &str, uid: Option<u32>, addr: SocketAddr) -> bool {
    let mut argv: Vec<String> = vec!["nsenter".into(), format!("--net=/run/netns/{ns}")];
    if let Some(uid) = uid {
        argv.extend([
            "setpriv".into(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ]);
    }
    argv.extend([
        "timeout".into(),
        "3".into(),
        "bash".into(),
        "-c".into(),
        format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
    ]);
    std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn only_root_on_the_host_reaches_a_guest_port() {
    if !can_run("the host-user firewall test") {
        return;
    }
    let tag = std::process::id();
    let outer = Namespace(format!("airlock-iso-{tag}"));
    sh(&["ip", "netns", "add", &outer.0]);
    sh(&["ip", "-n", &outer.0, "link", "set", "lo", "up"]);
    let host = NetOnly {
        ns: outer.0.clone(),
    };
    let pool = AddressPool::parse("10.242.200.0/24").expect("pool");
    let lease = pool.lease(0).expect("lease");
    let id = format!("iso{tag}");
    let names = LinkNames::for_sandbox(&id);
    let _guest = Namespace(names.netns.clone());
    link::create(&host, &names, &lease).await.expect("link");
    firewall::install(&host, &names, &lease, None)
        .await
        .expect("firewall");
    let agent = SocketAddr::from((lease.guest, airlock_proto::AGENT_PORT));
    let listener = in_netns(&names.netns, move || {
        TcpListener::bind(agent).expect("bind")
    });
    listener.set_nonblocking(true).expect("nonblocking");

    assert!(
        connects(&outer.0, None, agent),
        "root reaches the agent port"
    );
    assert!(
        !connects(&outer.0, Some(65534), agent),
        "an unprivileged host process reached the agent port"
    );
    assert!(
        !connects(&outer.0, Some(1000), agent),
        "host uid 1000 reached the agent port"
    );
    // Removed with the sandbox: the next holder of the link name is not
    // blocked by a stale entry, and root still gets through meanwhile.
    firewall::remove(&host, &names).await;
    let set = sh(&[
        "ip",
        "netns",
        "exec",
        &outer.0,
        "nft",
        "list",
        "set",
        "inet",
        "airlock",
        "guest_links",
    ]);
    assert!(!set.contains(&names.host_if), "{set}");
    assert!(
        connects(&outer.0, Some(65534), agent),
        "without the sandbox's rules the port is open (the test's listener works)"
    );
    link::destroy(&host, &names).await;
}
