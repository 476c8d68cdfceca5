//! `airlock doctor`: which drivers this host can run, and for each it cannot, why.

use anyhow::Result;
use std::path::Path;

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn run() -> Result<()> {
    let root = is_root();
    let overlay = std::fs::read_to_string("/proc/filesystems")
        .map(|f| f.contains("overlay"))
        .unwrap_or(false);
    let kvm = Path::new("/dev/kvm").exists();

    let mut nspawn_problems = Vec::new();
    if !root {
        nspawn_problems.push("not running as root (namespaces, mounts and links need it)");
    }
    if !on_path("systemd-nspawn") {
        nspawn_problems.push("systemd-nspawn is not installed (apt-get install systemd-container)");
    }
    if !overlay {
        nspawn_problems.push("the kernel has no overlay filesystem");
    }
    if !on_path("ip") {
        nspawn_problems.push("iproute2 (`ip`) is not installed");
    }
    report("nspawn", &nspawn_problems);

    let mut qemu_problems = vec!["the qemu driver is not part of this build yet"];
    if !on_path("qemu-system-x86_64") {
        qemu_problems.push("qemu-system-x86_64 is not installed");
    }
    if !kvm {
        qemu_problems.push("no /dev/kvm (it would fall back to slow TCG emulation)");
    }
    report("qemu", &qemu_problems);

    let mut fc_problems = vec!["the firecracker driver is not part of this build yet"];
    if !kvm {
        fc_problems.push("no /dev/kvm");
    }
    if !on_path("firecracker") {
        fc_problems.push("no firecracker binary on PATH");
    }
    report("firecracker", &fc_problems);
    Ok(())
}

fn report(driver: &str, problems: &[&str]) {
    if problems.is_empty() {
        println!("{driver:<12} ok");
    } else {
        println!("{driver:<12} unavailable: {}", problems.join("; "));
    }
}
