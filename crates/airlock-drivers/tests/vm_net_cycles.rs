//! The VM drivers' network layer, 200 times over: a TAP per sandbox, addressed
//! from the pool, with the firewall hook's rules, then removed again. Runs in
//! a network namespace the test makes (and removes), so the host's own links
//! and rules are never touched. At the end nothing may be left: no TAP, no
//! address, no route, no per-sandbox rule.
//!
//! And a jailed Firecracker's network (a namespace per VM, its TAP bridged
//! there to a veth pair), for a few VMs at once, carrying real traffic between
//! the test's stand-in "host" namespace and a stand-in guest per VM, then
//! removed without a trace.

mod common;

use common::{in_netns, Namespace, NetOnly};

use airlock_drivers::host::{Cmd, Host};
use airlock_drivers::net::link::{self, LinkNames};
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::net::{firewall, tap};
use airlock_drivers::Lease;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What this machine lacks for these tests; in CI a lack is a failure.
fn can_run() -> Result<(), String> {
    let lack = lacking();
    if let Err(why) = &lack {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the VM network tests, but one {why}"
        );
    }
    lack
}

fn lacking() -> Result<(), String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false);
    if !root {
        return Err("needs root (network namespaces, TAPs, nftables)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    for tool in ["ip", "nft"] {
        let found = std::process::Command::new(tool).arg("-V").output().is_ok();
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn two_hundred_create_destroy_cycles_leave_nothing() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED: the VM network cycle test {why}");
        return;
    }
    let ns = Namespace(format!("airlock-vmnet-{}", std::process::id()));
    let made = std::process::Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .expect("ip netns add");
    assert!(made.success(), "could not make the test namespace");
    let host = NetOnly { ns: ns.0.clone() };
    let pool = AddressPool::parse("10.235.0.0/16").expect("pool");
    let started = Instant::now();
    for cycle in 0..200u32 {
        // Two sandboxes live at once, so removal of one never sees an empty table.
        let ids = [format!("c{cycle}a"), format!("c{cycle}b")];
        let mut live = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            let lease = pool.lease(cycle * 2 + n as u32).expect("lease");
            let names = LinkNames::for_sandbox(id);
            tap::create(&host, &names.host_if, &lease)
                .await
                .unwrap_or_else(|e| panic!("cycle {cycle}: tap: {e}"));
            firewall::install(&host, &names, &lease, Some(3128))
                .await
                .unwrap_or_else(|e| panic!("cycle {cycle}: firewall: {e}"));
            live.push(names);
        }
        for names in &live {
            assert!(tap::exists(&host, &names.host_if).await);
            firewall::remove(&host, names).await;
            tap::destroy(&host, &names.host_if).await;
        }
    }
    let took = started.elapsed();
    eprintln!("200 cycles (400 sandboxes' links and rules) in {took:.1?}");

    let links = host
        .run(&Cmd::new("ip").args(["-o", "link", "show"]))
        .await
        .expect("links");
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect();
    assert_eq!(names, ["lo"], "links left: {links}");
    let addrs = host
        .run(&Cmd::new("ip").args(["-o", "-4", "addr", "show"]))
        .await
        .expect("addrs");
    assert!(!addrs.contains("10.235."), "addresses left: {addrs}");
    let routes = host
        .run(&Cmd::new("ip").args(["-4", "route", "show"]))
        .await
        .expect("routes");
    assert!(routes.trim().is_empty(), "routes left: {routes}");
    let rules = host
        .run(&Cmd::new("nft").args(["list", "ruleset"]))
        .await
        .expect("ruleset");
    for leftover in ["al", "_in", "_to", "counter"] {
        let hits: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains(leftover) && !l.contains("vmap"))
            .filter(|l| !l.trim_start().starts_with("table"))
            .collect();
        assert!(hits.is_empty(), "{leftover}: rules left: {hits:?}\n{rules}");
    }
    assert!(!rules.contains("\"al"), "map entries left:\n{rules}");
}

/// TCP listeners in namespaces; each answers every connection with its tag.
#[derive(Default)]
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Listeners {
    fn serve(&mut self, ns: &str, addr: SocketAddr, tag: String) {
        let listener = in_netns(ns, move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = writeln!(stream, "{tag}");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        }));
    }

    /// Close every listener (a socket would keep its namespace alive).
    fn close(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connect from namespace `ns` to `addr` and read what answers, or why not.
fn ask(ns: &str, addr: SocketAddr, within: Duration) -> Result<String, String> {
    in_netns(ns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, within).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        Ok(text.trim().to_owned())
    })
}

fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What stands in for a VM's guest: a namespace of the test's whose `eth0`
/// (the guest's interface) is a veth pair plugged into the VM namespace's
/// bridge beside the TAP, with the leased address and the gateway as its
/// default route. A TAP carries frames only while a VMM holds it open, and
/// there is no VMM here; the bridge treats both ports alike.
fn plug_in_guest(names: &LinkNames, lease: &Lease, guest_ns: &str) {
    let vm_ns = names.netns.as_str();
    let guest_cidr = format!("{}/{}", lease.guest, lease.prefix_len);
    let gateway = lease.host.to_string();
    for step in [
        vec!["ip", "netns", "add", guest_ns],
        vec![
            "ip", "-n", vm_ns, "link", "add", "guest", "type", "veth", "peer", "name", "eth0",
            "netns", guest_ns,
        ],
        vec![
            "ip",
            "-n",
            vm_ns,
            "link",
            "set",
            "guest",
            "addrgenmode",
            "none",
        ],
        vec![
            "ip", "-n", vm_ns, "link", "set", "guest", "master", "br0", "up",
        ],
        vec![
            "ip",
            "-n",
            guest_ns,
            "addr",
            "add",
            &guest_cidr,
            "dev",
            "eth0",
        ],
        vec!["ip", "-n", guest_ns, "link", "set", "eth0", "up"],
        vec![
            "ip", "-n", guest_ns, "route", "add", "default", "via", &gateway,
        ],
    ] {
        sh(&step);
    }
}

/// Removes a VM's namespace and what is in it if the test fails before the
/// driver's own removal ran.
struct VmNetGuard(String);

impl Drop for VmNetGuard {
    fn drop(&mut self) {
        for dev in [link::VM_TAP, link::VM_BRIDGE] {
            let _ = std::process::Command::new("ip")
                .args(["-n", &self.0, "link", "del", dev])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A uid and gid with no name here, so `ip` shows them as numbers.
const VMM_UID: u32 = 64123;
const PROXY_PORT: u16 = 3128;
const OTHER_PORT: u16 = 3129;

#[tokio::test]
async fn jailed_vm_namespaces_carry_guest_traffic_and_leave_nothing() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED: the jailed VM network test {why}");
        return;
    }
    if std::process::Command::new("nsenter")
        .arg("-V")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the jailed VM network test, but nsenter (util-linux) is missing"
        );
        eprintln!("SKIPPED: the jailed VM network test needs nsenter (util-linux)");
        return;
    }
    let tag = std::process::id();
    // The test's "host": its links, rules and listeners live here.
    let outer = Namespace(format!("airlock-vmjail-{tag}"));
    sh(&["ip", "netns", "add", &outer.0]);
    sh(&["ip", "-n", &outer.0, "link", "set", "lo", "up"]);
    // Forwarding on, so a packet between guests is stopped by the rules, not
    // by a host that would not route it anyway.
    in_netns(&outer.0, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward")
    });
    let host = NetOnly {
        ns: outer.0.clone(),
    };
    let pool = AddressPool::parse("10.235.0.0/16").expect("pool");

    let mut listeners = Listeners::default();
    for port in [PROXY_PORT, OTHER_PORT] {
        listeners.serve(
            &outer.0,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            format!("host {port}"),
        );
    }
    let mut vms = Vec::new();
    let mut guests = Vec::new();
    let mut guards = Vec::new();
    for (n, letter) in ["a", "b", "c"].into_iter().enumerate() {
        let id = format!("j{tag}{letter}");
        let names = LinkNames::for_sandbox(&id);
        let lease = pool.lease(n as u32).expect("lease");
        guards.push(VmNetGuard(names.netns.clone()));
        link::create_for_vm(&host, &names, &lease, Some((VMM_UID, VMM_UID)))
            .await
            .unwrap_or_else(|e| panic!("{id}: link: {e}"));
        firewall::install(&host, &names, &lease, Some(PROXY_PORT))
            .await
            .unwrap_or_else(|e| panic!("{id}: firewall: {e}"));
        let guest = Namespace(format!("{}-guest", names.netns));
        plug_in_guest(&names, &lease, &guest.0);
        for port in [airlock_proto::AGENT_PORT, airlock_proto::VNC_PORT] {
            listeners.serve(
                &guest.0,
                SocketAddr::from((lease.guest, port)),
                format!("{id} {port}"),
            );
        }
        vms.push((id, names, lease));
        guests.push(guest);
    }

    let quick = Duration::from_secs(3);
    let refused_within = Duration::from_millis(700);
    for (n, (id, names, lease)) in vms.iter().enumerate() {
        let guest_ns = &guests[n].0;
        // The VM's namespace holds the TAP, owned for the jailed VMM, and no
        // address at all: the guest can reach nothing in there.
        let tap = sh(&["ip", "-n", &names.netns, "-d", "link", "show", "tap0"]);
        assert!(
            tap.contains("tun type tap") && tap.contains(&format!("user {VMM_UID}")),
            "{tap}"
        );
        assert!(tap.contains("master br0"), "{tap}");
        let addrs = sh(&["ip", "-n", &names.netns, "-o", "addr", "show"]);
        assert!(
            addrs.trim().is_empty(),
            "{id}: addresses in the VM namespace: {addrs}"
        );
        // The control plane reaches the guest's agent and VNC at its lease.
        for port in [airlock_proto::AGENT_PORT, airlock_proto::VNC_PORT] {
            let got = ask(&outer.0, SocketAddr::from((lease.guest, port)), quick);
            assert_eq!(got, Ok(format!("{id} {port}")), "{id}: host → guest:{port}");
        }
        // The guest reaches its gateway's proxy port, and nothing else.
        let got = ask(guest_ns, SocketAddr::from((lease.host, PROXY_PORT)), quick);
        assert_eq!(got, Ok(format!("host {PROXY_PORT}")), "{id}: guest → proxy");
        let got = ask(
            guest_ns,
            SocketAddr::from((lease.host, OTHER_PORT)),
            refused_within,
        );
        assert!(
            got.is_err(),
            "{id}: guest → gateway:{OTHER_PORT} got through: {got:?}"
        );
        let (_, _, other) = &vms[(n + 1) % vms.len()];
        let got = ask(
            guest_ns,
            SocketAddr::from((other.guest, airlock_proto::AGENT_PORT)),
            refused_within,
        );
        assert!(got.is_err(), "{id}: reached another guest: {got:?}");
        let blocked = firewall::blocked(&host, names)
            .await
            .expect("counters")
            .expect("rules installed");
        assert!(blocked.tcp >= 2, "{id}: drops not counted: {blocked:?}");
    }

    // The guests go (as a VMM that exits lets go of its TAP), then each VM's
    // network goes the way the driver's destroy takes it: rules, then links.
    listeners.close();
    drop(guests);
    for (_, names, _) in &vms {
        firewall::remove(&host, names).await;
        link::destroy_for_vm(&host, names).await;
        // Idempotent: a second removal finds nothing and minds nothing.
        link::destroy_for_vm(&host, names).await;
    }

    let namespaces = sh(&["ip", "netns", "list"]);
    let links = host
        .run(&Cmd::new("ip").args(["-o", "link", "show"]))
        .await
        .expect("links");
    let root_links = sh(&["ip", "-o", "link", "show"]);
    let rules = host
        .run(&Cmd::new("nft").args(["list", "ruleset"]))
        .await
        .expect("ruleset");
    for (id, names, _) in &vms {
        assert!(
            !namespaces.contains(&names.netns),
            "{id}: namespace left: {namespaces}"
        );
        assert!(
            !Path::new(&names.netns_path()).exists(),
            "{id}: {} left",
            names.netns_path()
        );
        assert!(!root_links.contains(&names.host_if), "{id}: {root_links}");
        assert!(
            !rules.contains(&names.host_if),
            "{id}: rules left:\n{rules}"
        );
    }
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect();
    assert_eq!(names, ["lo"], "links left in the test's host: {links}");
    let addrs = host
        .run(&Cmd::new("ip").args(["-o", "-4", "addr", "show"]))
        .await
        .expect("addrs");
    assert!(!addrs.contains("10.235."), "addresses left: {addrs}");
    let routes = host
        .run(&Cmd::new("ip").args(["-4", "route", "show"]))
        .await
        .expect("routes");
    assert!(!routes.contains("10.235."), "routes left: {routes}");
    for leftover in ["_in", "_to", "counter"] {
        let hits: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains(leftover) && !l.contains("vmap"))
            .collect();
        assert!(hits.is_empty(), "{leftover}: rules left: {hits:?}\n{rules}");
    }
    eprintln!("3 jailed VM networks carried traffic and left nothing");
}
