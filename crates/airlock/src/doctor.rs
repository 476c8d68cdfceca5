//! `airlock doctor`: which drivers this host can run, and for each it cannot, why.
//!
//! KVM is judged by running a guest, not by `/dev/kvm` existing: on some hosts
//! the device is there and guests never make progress. The probe boots the
//! image's guest kernel without a disk (it needs `airlock image build --vm`).

use airlock_drivers::qemu::{probe_kvm, KvmProbe};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn on_path(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|c| c.is_file())
    })
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

/// What the checks found, as data, so the verdicts can be tested.
#[derive(Debug, Clone)]
pub struct Facts {
    pub root: bool,
    pub nspawn: bool,
    pub overlay: bool,
    pub ip: bool,
    pub qemu: bool,
    pub firecracker: Option<PathBuf>,
    /// `None`: the image has no guest kernel to probe with.
    pub kvm: Option<KvmProbe>,
    pub kvm_device: bool,
    /// Why the VM artefacts are unusable, if they are.
    pub vm_artefacts: Result<(), String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub driver: &'static str,
    /// Empty: the driver can run.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

pub fn judge(f: &Facts) -> Vec<Verdict> {
    let mut common = Vec::new();
    if !f.root {
        common.push("not running as root (namespaces, mounts, links and TAPs need it)".to_owned());
    }
    if !f.ip {
        common.push("iproute2 (`ip`) is not installed".to_owned());
    }

    let mut nspawn = common.clone();
    if !f.nspawn {
        nspawn.push("systemd-nspawn is not installed (apt-get install systemd-container)".into());
    }
    if !f.overlay {
        nspawn.push("the kernel has no overlay filesystem".into());
    }

    let mut vm_common = common.clone();
    if let Err(why) = &f.vm_artefacts {
        vm_common.push(why.clone());
    }
    let kvm_note = match &f.kvm {
        Some(probe) => probe.to_string(),
        None if !f.kvm_device => "no /dev/kvm".into(),
        None => "KVM not probed (no guest kernel yet)".into(),
    };

    let mut qemu = vm_common.clone();
    let mut qemu_notes = Vec::new();
    if !f.qemu {
        qemu.push("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into());
    }
    match &f.kvm {
        Some(KvmProbe::Works(_)) => qemu_notes.push(format!("accelerated: {kvm_note}")),
        _ => qemu_notes.push(format!("TCG emulation, slow: {kvm_note}")),
    }

    let mut firecracker = vm_common;
    match &f.kvm {
        Some(KvmProbe::Works(_)) => {}
        Some(KvmProbe::Hangs(_)) => {
            firecracker.push("KVM is present but guests do not run on it".into())
        }
        Some(other) => firecracker.push(format!("no usable KVM: {other}")),
        None if !f.kvm_device => firecracker.push("no KVM (/dev/kvm is missing)".into()),
        None => firecracker.push(
            "KVM could not be checked: build the guest kernel with `airlock image build --vm`"
                .into(),
        ),
    }
    if f.firecracker.is_none() {
        firecracker.push(
            "no firecracker binary (on PATH or AIRLOCK_FIRECRACKER_BIN); Debian does not package it"
                .into(),
        );
    }
    vec![
        Verdict {
            driver: "nspawn",
            problems: nspawn,
            notes: vec!["containers share this host's kernel: for one trusted user".into()],
        },
        Verdict {
            driver: "qemu",
            problems: qemu,
            notes: qemu_notes,
        },
        Verdict {
            driver: "firecracker",
            problems: firecracker,
            notes: Vec::new(),
        },
    ]
}

pub async fn run() -> Result<()> {
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cfg = crate::load_config(&crate::Common {
        config: env_path("AIRLOCK_CONFIG"),
        data_dir: env_path("AIRLOCK_DATA_DIR"),
        image_dir: env_path("AIRLOCK_IMAGE_DIR"),
    })?;
    let manifest = airlock_image::ImageStore::new(cfg.image_dir())
        .current()
        .ok()
        .flatten();
    let vm_artefacts = match manifest.as_ref().map(|m| (m, &m.vm)) {
        None => Err("no golden image yet (`airlock image build --vm`)".to_owned()),
        Some((m, None)) => Err(format!(
            "golden image {} has no guest kernel and ext4 (`airlock image build --vm`)",
            m.build_id
        )),
        Some((_, Some(_))) => Ok(()),
    };
    let kernel = manifest
        .as_ref()
        .and_then(|m| m.vm.as_ref())
        .map(|vm| vm.kernel.bzimage.clone())
        .filter(|k| k.is_file());
    let kvm_device = Path::new("/dev/kvm").exists();
    let qemu = on_path("qemu-system-x86_64").is_some();
    let kvm = match kernel {
        Some(k) if qemu && kvm_device => {
            eprintln!("probing KVM with the guest kernel (at most 15 s)…");
            Some(probe_kvm("qemu-system-x86_64", &k, Duration::from_secs(15)).await)
        }
        _ if !kvm_device => Some(KvmProbe::NoDevice),
        _ => None,
    };
    let firecracker_bin = std::env::var("AIRLOCK_FIRECRACKER_BIN").unwrap_or("firecracker".into());
    let facts = Facts {
        root: is_root(),
        nspawn: on_path("systemd-nspawn").is_some(),
        overlay: std::fs::read_to_string("/proc/filesystems")
            .map(|f| f.contains("overlay"))
            .unwrap_or(false),
        ip: on_path("ip").is_some(),
        qemu,
        firecracker: on_path(&firecracker_bin),
        kvm,
        kvm_device,
        vm_artefacts,
    };
    for v in judge(&facts) {
        if v.problems.is_empty() {
            println!("{:<12} ok", v.driver);
        } else {
            println!("{:<12} unavailable: {}", v.driver, v.problems.join("; "));
        }
        for note in &v.notes {
            println!("{:<12}   ({note})", "");
        }
    }
    print_density(&cfg);
    Ok(())
}

/// At `airlock up`: a warning for each kernel limit that leaves room for
/// fewer sandboxes than the pool and a few users need (see `airlock doctor`).
pub fn warn_density(cfg: &airlock_server::config::Config) {
    use airlock_server::app::limits::{read, Cost};
    let wanted = u64::from(cfg.pool.browser) + 20;
    for r in read(&Cost::IDLE_BROWSER) {
        if r.per_user && cfg.user_namespaces {
            continue;
        }
        if r.room() < wanted {
            eprintln!(
                "warning: {} = {} leaves room for about {} sandboxes (each takes about {}); \
                 raise it with `sysctl -w {}=…` to run more",
                r.name,
                r.limit,
                r.room(),
                r.per_sandbox,
                r.name
            );
        }
    }
}

/// The kernel limits that cap how many sandboxes fit, and the pool.
fn print_density(cfg: &airlock_server::config::Config) {
    use airlock_server::app::limits::{read, Cost};
    println!("\nhost limits (one idle browser sandbox takes about the figure in brackets):");
    for r in read(&Cost::IDLE_BROWSER) {
        let used = r.used.map_or(String::new(), |u| format!(", {u} in use"));
        let verdict = if r.per_user && cfg.user_namespaces {
            "per host uid: each sandbox has its own (user_namespaces)".to_owned()
        } else if r.per_user {
            format!(
                "per host uid, shared by every sandbox without user_namespaces: about {} sandboxes",
                r.room()
            )
        } else {
            format!("room for about {} more sandboxes", r.room())
        };
        println!(
            "  {:<32} {}{used} [{}]: {verdict}",
            r.name, r.limit, r.per_sandbox
        );
    }
    let p = &cfg.pool;
    println!(
        "\nwarm pool: browser = {} (max_age_s {}, refill_parallel {}); workspaces are cold-only; \
         a running server reports its members at GET /api/v1/pool",
        p.browser, p.max_age_s, p.refill_parallel
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_host() -> Facts {
        Facts {
            root: true,
            nspawn: true,
            overlay: true,
            ip: true,
            qemu: true,
            firecracker: None,
            kvm: Some(KvmProbe::Hangs(Duration::from_secs(15))),
            kvm_device: true,
            vm_artefacts: Ok(()),
        }
    }

    fn problems(f: &Facts, driver: &str) -> Vec<String> {
        judge(f)
            .into_iter()
            .find(|v| v.driver == driver)
            .map(|v| v.problems)
            .unwrap_or_default()
    }

    #[test]
    fn a_host_whose_kvm_hangs_runs_nspawn_and_qemu_on_tcg_only() {
        let f = this_host();
        assert!(problems(&f, "nspawn").is_empty());
        assert!(problems(&f, "qemu").is_empty());
        let v = judge(&f);
        assert!(v[1].notes[0].starts_with("TCG"), "{:?}", v[1].notes);
        let fc = problems(&f, "firecracker").join("; ");
        assert!(fc.contains("KVM is present but guests do not run"), "{fc}");
        assert!(fc.contains("no firecracker binary"), "{fc}");
    }

    #[test]
    fn every_reason_is_named() {
        let f = Facts {
            root: false,
            nspawn: false,
            overlay: true,
            ip: true,
            qemu: false,
            firecracker: Some("/usr/bin/firecracker".into()),
            kvm: Some(KvmProbe::NoDevice),
            kvm_device: false,
            vm_artefacts: Err("no guest kernel".into()),
        };
        let nspawn = problems(&f, "nspawn").join("; ");
        assert!(nspawn.contains("not running as root") && nspawn.contains("systemd-nspawn"));
        let qemu = problems(&f, "qemu").join("; ");
        assert!(qemu.contains("qemu-system-x86_64") && qemu.contains("no guest kernel"));
        let fc = problems(&f, "firecracker").join("; ");
        assert!(fc.contains("no /dev/kvm"), "{fc}");
        assert!(!fc.contains("firecracker binary"), "{fc}");
        let ok = Facts {
            kvm: Some(KvmProbe::Works(Duration::from_millis(300))),
            firecracker: Some("/x/firecracker".into()),
            ..this_host()
        };
        assert!(problems(&ok, "firecracker").is_empty());
    }
}
