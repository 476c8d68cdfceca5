//! The VM drivers' network layer, 200 times over: a TAP per sandbox, addressed
//! from the pool, with the firewall hook's rules, then removed again. Runs in
//! a network namespace the test makes (and removes), so the host's own links
//! and rules are never touched. At the end nothing may be left: no TAP, no
//! address, no route, no per-sandbox rule.

use airlock_drivers::host::{Cmd, Host, HostError, RealHost};
use airlock_drivers::net::link::LinkNames;
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::net::{firewall, tap};
use async_trait::async_trait;
use std::path::Path;
use std::time::Instant;

/// The real host, with every command run inside the test's namespace.
#[derive(Debug)]
struct InNamespace {
    ns: String,
}

#[async_trait]
impl Host for InNamespace {
    async fn run(&self, cmd: &Cmd) -> Result<String, HostError> {
        let wrapped = Cmd::new("ip")
            .args(["netns", "exec", &self.ns, &cmd.program])
            .args(cmd.args.clone());
        RealHost.run(&wrapped).await
    }
    async fn spawn_detached(&self, cmd: &Cmd, log: &Path) -> Result<u32, HostError> {
        RealHost.spawn_detached(cmd, log).await
    }
    fn signal(&self, pid: u32, signal: i32) -> Result<(), HostError> {
        RealHost.signal(pid, signal)
    }
    fn cmdline(&self, pid: u32) -> Option<String> {
        RealHost.cmdline(pid)
    }
    fn children(&self, pid: u32) -> Vec<u32> {
        RealHost.children(pid)
    }
}

fn can_run() -> Result<(), String> {
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

struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
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
    let host = InNamespace { ns: ns.0.clone() };
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
