//! A screen recording of one real sandbox: started over the API, running
//! about five seconds, stopped, downloaded (whole and by range) and read by
//! ffprobe: one H.264 stream of the sandbox's size and the right length. The
//! recorder alone keeps the guest's encoder running, and lets it go.

mod common;

use common::{browser_unmet, unmet};
use serde_json::Value;
use std::time::{Duration, Instant};

/// ffprobe's view of a file: (codec, width, height, duration in seconds).
fn probe(path: &std::path::Path) -> (String, u64, u64, f64) {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_packets"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_packets:format=duration",
        ])
        .args(["-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every frame decodes, without a complaint.
    let decode = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        decode.status.success() && decode.stderr.is_empty(),
        "ffmpeg could not decode it: {}",
        String::from_utf8_lossy(&decode.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("ffprobe json");
    println!("ffprobe: {v}");
    let s = &v["streams"][0];
    let duration = v["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    (
        s["codec_name"].as_str().unwrap_or("").to_owned(),
        s["width"].as_u64().unwrap_or(0),
        s["height"].as_u64().unwrap_or(0),
        duration,
    )
}

fn ffprobe_unmet() -> bool {
    if std::process::Command::new("ffprobe")
        .arg("-version")
        .output()
        .is_ok()
    {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must check recordings with ffprobe: install ffmpeg (scripts/setup)"
    );
    eprintln!("skipping: ffprobe is not installed (ffmpeg)");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_of_a_real_sandbox_plays_for_as_long_as_it_ran() {
    if unmet().is_some() || ffprobe_unmet() {
        return;
    }
    let h = common::start_with("10.254.60.0/24", |cfg| {
        cfg.recording.enabled = true;
    })
    .await;
    let id = h.ready_sandbox("browser").await;
    let app = h.running.as_ref().expect("running").app.clone();
    let base = format!("/api/v1/sandboxes/{id}/recordings");

    let (status, body) = h.get(&base).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["recordings"], serde_json::json!([]), "{body}");
    assert_eq!(app.streams.viewers(&id), None, "no viewer, no hub");

    let (status, started) = h.post(&base, Value::Null).await;
    assert_eq!(status, 201, "{started}");
    let rid = started["id"].as_str().expect("id").to_owned();
    let (status, body) = h.post(&base, Value::Null).await;
    assert_eq!(status, 409, "a second start while recording: {body}");
    assert_eq!(
        app.streams.viewers(&id),
        Some(1),
        "the recorder holds the sandbox's video link"
    );

    // Another user sees neither the sandbox nor its recordings.
    let other = h.admin_token().await;
    let (status, _) = h
        .call(
            reqwest::Method::GET,
            &format!("{base}/{rid}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(status, 404);

    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, stopped) = h.delete(&format!("{base}/current")).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["ended"], "stopped", "{stopped}");
    let (status, body) = h.delete(&format!("{base}/current")).await;
    assert_eq!(status, 409, "nothing to stop: {body}");

    let metrics = h.metrics().await;
    assert!(metrics.contains("recordings_active 0"), "{metrics}");

    let resp = h
        .http
        .get(h.url(&format!("{base}/{rid}")))
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "video/mp4",
        "{:?}",
        resp.headers()
    );
    let file = resp.bytes().await.expect("body");
    assert_eq!(file.len() as u64, stopped["bytes"].as_u64().unwrap_or(0));
    let path = h.data_dir.join("downloaded.mp4");
    std::fs::write(&path, &file).expect("write");
    let (codec, width, height, duration) = probe(&path);
    assert_eq!(codec, "h264");
    assert_eq!(
        (width, height),
        (
            u64::from(h.cfg.display_width),
            u64::from(h.cfg.display_height)
        ),
        "the sandbox's resolution"
    );
    assert!(
        (3.5..=6.5).contains(&duration),
        "about five seconds, got {duration}"
    );
    println!(
        "recording: {} bytes, {duration:.2} s, {width}x{height}, API said {} ms",
        file.len(),
        stopped["duration_ms"]
    );

    let part = h
        .http
        .get(h.url(&format!("{base}/{rid}")))
        .header("Range", "bytes=0-99")
        .send()
        .await
        .expect("range");
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.expect("body")[..], file[..100]);

    // The hub lets the guest's encoder go once the recorder is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.streams.viewers(&id).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(app.streams.viewers(&id), None, "the video link closed");

    // The same through the viewer's Record button, in a real Chromium.
    if browser_unmet().is_none() {
        let root = common::repo_root();
        let artifacts = root.join("target/e2e/recording");
        let status = tokio::process::Command::new("node")
            .arg(root.join("tests/e2e/recording.mjs"))
            .args(["--url", &h.base, "--id", &id, "--artifacts"])
            .arg(&artifacts)
            .kill_on_drop(true)
            .status()
            .await
            .expect("node runs");
        assert!(
            status.success(),
            "the browser test failed ({status}); pictures are in {}",
            artifacts.display()
        );
        let (_, list) = h.get(&base).await;
        assert_eq!(
            list["recordings"].as_array().map(Vec::len),
            Some(2),
            "{list}"
        );
    }
    h.shutdown().await;
}
