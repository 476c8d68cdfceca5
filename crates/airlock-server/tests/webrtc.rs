//! The viewer's WebRTC path in a real headless Chromium (tests/e2e/webrtc.mjs)
//! against a real sandbox: the desktop arrives as video, input over the data
//! channel reaches the terminal, two viewers share one encoder in the guest,
//! and with the media ports blocked the viewer falls back to noVNC by itself.
//! On both paths the clipboard makes a round trip and the remote display
//! follows a resized window (tests/e2e/webrtc.mjs --clipboard --resize).

mod common;

use common::{browser_unmet, unmet, Harness};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Run tests/e2e/webrtc.mjs; `while_open` runs once it prints "viewers ready".
async fn drive<F: std::future::Future<Output = ()>>(
    h: &Harness,
    id: &str,
    args: &[&str],
    while_open: impl FnOnce() -> F,
) {
    let root = common::repo_root();
    let artifacts = root.join("target/e2e/webrtc");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let mut child = tokio::process::Command::new("node")
        .arg(root.join("tests/e2e/webrtc.mjs"))
        .args(["--url", &h.base, "--id", id, "--artifacts"])
        .arg(&artifacts)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(180), async {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{line}");
            if line == "viewers ready" {
                return true;
            }
        }
        false
    })
    .await;
    if ready == Ok(true) {
        while_open().await;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{line}");
    }
    let status = child.wait().await.expect("node ends");
    assert!(
        status.success(),
        "the browser test failed ({status}); pictures are in {}",
        artifacts.display()
    );
}

/// What the sandbox's file says, once it exists (typing lands asynchronously).
async fn file_in(h: &Harness, id: &str, path: &str) -> String {
    for _ in 0..50 {
        let out = h.exec(id, &["cat", path]).await;
        if out["exit_code"] == 0 {
            return out["stdout"].as_str().unwrap_or_default().trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    String::new()
}

async fn capture_processes(h: &Harness, id: &str) -> String {
    let out = h
        .exec(
            id,
            &["pgrep", "-c", "-f", "^/usr/local/bin/airlock-agent capture"],
        )
        .await;
    out["stdout"].as_str().unwrap_or_default().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_shows_the_desktop_takes_input_and_shares_one_encoder() {
    if unmet().is_some() || browser_unmet().is_some() {
        return;
    }
    let h = common::start("10.254.30.0/24").await;
    let id = h.ready_sandbox("browser").await;
    let mark = format!("webrtc-{}", hex::encode(rand::random::<[u8; 5]>()));
    let typed = format!("echo {mark} > /tmp/webrtc-mark");
    let app = h.running.as_ref().expect("running").app.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new((None, String::new())));
    let record = seen.clone();
    drive(
        &h,
        &id,
        &[
            "--expect",
            "webrtc",
            "--viewers",
            "2",
            "--type",
            &typed,
            "--clipboard",
            "--resize",
            "1000x700",
            "--hold-ms",
            "4000",
        ],
        || async {
            let viewers = app.streams.viewers(&id);
            let captures = capture_processes(&h, &id).await;
            *record.lock().expect("lock") = (viewers, captures);
        },
    )
    .await;
    let (viewers, captures) = seen.lock().expect("lock").clone();
    assert_eq!(viewers, Some(2), "both viewers hang off one hub");
    assert_eq!(captures, "1", "one encoder in the guest for two viewers");
    let typed_in = file_in(&h, &id, "/tmp/webrtc-mark").await;
    if typed_in != mark {
        let journal = h
            .exec(
                &id,
                &[
                    "journalctl",
                    "-u",
                    "airlock-agent",
                    "--no-pager",
                    "-n",
                    "60",
                ],
            )
            .await;
        println!("{}", journal["stdout"].as_str().unwrap_or_default());
    }
    assert_eq!(
        typed_in, mark,
        "typing over WebRTC did not reach the terminal"
    );

    // The viewers are gone: the hub closes the link, the guest stops encoding.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !app.streams.is_empty() || capture_processes(&h, &id).await != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest still encodes without viewers"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("airlock_webrtc_sessions_total 2"),
        "{metrics}"
    );
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("airlock_webrtc_frames_sent_total ") > 10.0,
        "{metrics}"
    );
    // Input went on both data channels; the unordered one, sent first, won.
    assert!(
        value("airlock_webrtc_input_applied_total{channel=\"fast\"} ") > 0.0,
        "{metrics}"
    );
    // The frames after the typing went twice (within the copy budget).
    assert!(
        value("airlock_webrtc_copy_bytes_sent_total ") > 0.0,
        "{metrics}"
    );
    assert!(
        value("airlock_viewer_input_to_photon_seconds_count{path=\"webrtc\"} ") > 0.0,
        "the viewer reported no latency samples: {metrics}"
    );
    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    assert_eq!(common::leftovers(&h.data_dir, &id), Vec::<String>::new());
    h.shutdown().await;
}

/// Drops the control plane's WebRTC ports (UDP and ICE-TCP) on this host while
/// it lives; a table of its own, removed on drop.
struct Blocked(String);

impl Blocked {
    fn ports(udp: u16, tcp: u16) -> Self {
        let table = format!("airlock_test_block_{}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n chain input {{\n type filter hook input priority -300; policy accept;\n udp dport {udp} drop\n tcp dport {tcp} drop\n }}\n}}\n"
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        use std::io::Write;
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("rules");
        assert!(nft.wait().expect("nft").success(), "nft refused {rules}");
        Blocked(table)
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_media_ports_blocked_the_viewer_falls_back_to_novnc() {
    if unmet().is_some() || browser_unmet().is_some() {
        return;
    }
    let h = common::start("10.254.31.0/24").await;
    let id = h.ready_sandbox("browser").await;
    let endpoint = h
        .running
        .as_ref()
        .expect("running")
        .app
        .webrtc
        .get()
        .cloned()
        .expect("WebRTC is on");
    let mark = format!("novnc-{}", hex::encode(rand::random::<[u8; 5]>()));
    let typed = format!("echo {mark} > /tmp/novnc-mark");
    {
        let _blocked = Blocked::ports(endpoint.udp_addr().port(), endpoint.tcp_addr().port());
        drive(
            &h,
            &id,
            &[
                "--expect",
                "vnc",
                "--type",
                &typed,
                "--clipboard",
                "--resize",
                "1000x700",
            ],
            || async {},
        )
        .await;
    }
    assert_eq!(file_in(&h, &id, "/tmp/novnc-mark").await, mark);
    // The noVNC page's own estimates reach the metrics through the relay.
    let metrics = h.metrics().await;
    let vnc_samples = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("airlock_viewer_input_to_photon_seconds_count{path=\"vnc\"} ")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0);
    assert!(
        vnc_samples > 0.0,
        "the noVNC viewer reported no latency samples: {metrics}"
    );
    h.delete(&format!("/api/v1/sandboxes/{id}")).await;
    h.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    h.shutdown().await;
}
