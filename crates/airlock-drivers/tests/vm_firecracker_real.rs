//! The Firecracker driver against a real `firecracker` (`$AIRLOCK_FIRECRACKER_BIN`,
//! else on PATH): every configuration call and InstanceStart through the real
//! API socket, then the guest's agent answering `/health` with the injected
//! sandbox id (metadata from MMDS v2), then a clean destroy. Skips, saying
//! why, where there is no binary, no working KVM, no root or no VM artefacts.

mod common;

use airlock_drivers::firecracker::api::{ApiClient, ApiRequest, UnixApi};
use airlock_drivers::firecracker::{FirecrackerConfig, FirecrackerDriver};
use airlock_drivers::host::RealHost;
use airlock_drivers::qemu::{probe_kvm, KvmProbe};
use airlock_drivers::Driver;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_firecracker_boots_the_image() {
    let bin = std::env::var("AIRLOCK_FIRECRACKER_BIN").unwrap_or_else(|_| "firecracker".into());
    let Some(firecracker) = common::on_path(&bin) else {
        eprintln!(
            "SKIPPED: no firecracker binary ({bin} is not on PATH; set AIRLOCK_FIRECRACKER_BIN). \
             The driver's requests are still checked against the API description by the unit tests."
        );
        return;
    };
    if !common::is_root() {
        eprintln!("SKIPPED: the Firecracker test needs root (TAP devices, /dev/kvm)");
        return;
    }
    let (image_ref, vm_image) = match common::vm_image() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("SKIPPED: the Firecracker test: {why}");
            return;
        }
    };
    if common::on_path("qemu-system-x86_64").is_some() {
        let probe = probe_kvm(
            "qemu-system-x86_64",
            &vm_image.bzimage,
            Duration::from_secs(15),
        )
        .await;
        if !matches!(probe, KvmProbe::Works(_)) {
            eprintln!("SKIPPED: the Firecracker test needs a KVM that runs guests: {probe}");
            return;
        }
    } else if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: the Firecracker test needs /dev/kvm");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("airlock-fc-test.")
        .tempdir_in("/var/tmp")
        .expect("state dir");
    let mut cfg = FirecrackerConfig::new(root.path().to_path_buf(), Some(vm_image));
    cfg.firecracker_bin = firecracker;
    let api = Arc::new(UnixApi::default());
    let driver = FirecrackerDriver::new(cfg, Arc::new(RealHost), api.clone());
    let id = format!("fc{}", std::process::id());
    let token = format!("fctest-token-{}", std::process::id());
    let spec = common::spec(&id, image_ref, &token);

    let t0 = Instant::now();
    let outcome = async {
        driver.create(&spec).await.map_err(|e| format!("create: {e}"))?;
        driver.start(&id).await.map_err(|e| format!("start: {e}"))?;
        let configured = t0.elapsed();
        let info = api
            .call(&root.path().join(&id).join("api.sock"), &ApiRequest::describe_instance())
            .await
            .map_err(|e| e.to_string())?;
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
        eprintln!(
            "firecracker: configured and started in {configured:.1?}, agent answered at {:.1?}; instance {}",
            t0.elapsed(),
            info.body
        );
        Ok::<(), String>(())
    }
    .await;
    driver.destroy(&id).await.expect("destroy");
    assert!(!root.path().join(&id).exists());
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
