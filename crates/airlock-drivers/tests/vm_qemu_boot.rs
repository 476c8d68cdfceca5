//! The golden image boots as a VM: the QEMU driver with the image's guest
//! kernel and ext4 (KVM where it really runs guests, TCG otherwise), the
//! metadata through fw_cfg, a TAP of its own. Passes when the agent in the
//! guest answers `/health` with the sandbox id the metadata injected; prints
//! how long each phase took. Skips, saying why, without root, QEMU or the VM
//! artefacts (`airlock image build --vm`).

mod common;

use airlock_drivers::host::{Cmd, Host, RealHost};
use airlock_drivers::qemu::{QemuConfig, QemuDriver};
use airlock_drivers::Driver;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_golden_image_boots_under_qemu_until_the_agent_answers() {
    let why_not = if !common::is_root() {
        Some("needs root (TAP devices)".to_owned())
    } else if common::on_path("qemu-system-x86_64").is_none() {
        Some("qemu-system-x86_64 is not installed".to_owned())
    } else {
        common::vm_image().err()
    };
    if let Some(why) = why_not {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the QEMU boot test, but it {why}"
        );
        eprintln!("SKIPPED: the QEMU boot test {why}");
        return;
    }
    let (image_ref, vm_image) = common::vm_image().expect("checked above");
    let root = tempfile::Builder::new()
        .prefix("airlock-qemu-test.")
        .tempdir_in("/var/tmp")
        .expect("state dir");
    let driver = QemuDriver::new(
        QemuConfig::new(root.path().to_path_buf(), Some(vm_image)),
        Arc::new(RealHost),
    );
    let id = format!("qt{}", std::process::id());
    let token = format!("vmtest-token-{}", std::process::id());
    let spec = common::spec(&id, image_ref, &token);

    let outcome = boot_and_ask(&driver, &spec, &token, root.path()).await;
    let serial =
        std::fs::read_to_string(root.path().join(&id).join("serial.log")).unwrap_or_default();
    let stop_started = Instant::now();
    driver.destroy(&id).await.expect("destroy");
    let stop = stop_started.elapsed();
    if let Err(e) = &outcome {
        let tail: Vec<&str> = serial.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{e}\n--- guest console (last 40 lines) ---\n{}",
            tail.join("\n")
        );
    }
    eprintln!("destroy (Ctrl-Alt-Del, bounded wait, cleanup): {stop:.1?}");
    assert!(serial.contains("Linux version"), "serial console captured");
    assert!(
        RealHost
            .run(&Cmd::new("ip").args(["link", "show", &format!("al{id}")]))
            .await
            .is_err(),
        "TAP removed"
    );
    assert!(!root.path().join(&id).exists(), "state removed");
}

async fn boot_and_ask(
    driver: &QemuDriver,
    spec: &airlock_drivers::SandboxSpec,
    token: &str,
    root: &std::path::Path,
) -> Result<(), String> {
    let t0 = Instant::now();
    driver
        .create(spec)
        .await
        .map_err(|e| format!("create: {e}"))?;
    let created = t0.elapsed();
    let disk = std::fs::metadata(root.join(&spec.id).join("rw.ext4"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    let accel = driver.accel().await.map_err(|e| e.to_string())?;
    let t1 = Instant::now();
    driver
        .start(&spec.id)
        .await
        .map_err(|e| format!("start: {e}"))?;
    let endpoints = driver
        .wait_ready(&spec.id, Duration::from_secs(900))
        .await
        .map_err(|e| format!("wait_ready: {e}"))?;
    let port_open = t1.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let health = loop {
        match common::get(endpoints.agent, "/health", token).await {
            Ok((200, body)) => break body,
            other if Instant::now() > deadline => {
                return Err(format!("agent /health never answered 200: {other:?}"))
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    let answered = t1.elapsed();
    let health: serde_json::Value =
        serde_json::from_str(&health).map_err(|e| format!("/health body: {e}: {health}"))?;
    if health["sandbox_id"] != spec.id.as_str() {
        return Err(format!("/health names another sandbox: {health}"));
    }
    if health["image_build_id"] != spec.image.build_id.as_str() {
        return Err(format!("/health names another image: {health}"));
    }
    eprintln!(
        "qemu ({}): create {created:.1?} (writable disk {} KiB on the host), \
         start → agent port open {port_open:.1?}, → /health with the sandbox id {answered:.1?}",
        accel.as_str(),
        disk / 1024
    );
    Ok(())
}
