//! Processes through the API into one real workspace: start latency (the
//! POST sent → the first output byte on the io socket), `/exec`'s round
//! trip, output throughput through the io socket, a PTY keystroke's round
//! trip (a key in, its echo out), and files up and down: throughput, and how
//! much the control plane's memory (this process's) grows while a file
//! passes through it.

use crate::sandbox::ControlPlane;
use crate::stats::{ms, percentile, Table};
use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The bench's own addresses (tests use others).
const POOL: &str = "10.252.2.0/24";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(http: &reqwest::Client, base: &str, id: &str, body: Value) -> Result<u64> {
    let resp = http
        .post(format!("{base}/api/v1/sandboxes/{id}/processes"))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let info: Value = resp.json().await?;
    if status.as_u16() != 201 {
        bail!("starting a process: {status} {info}");
    }
    info["pid"].as_u64().context("no pid")
}

async fn attach(base: &str, id: &str, pid: u64) -> Result<Ws> {
    let url = format!(
        "{}/api/v1/sandboxes/{id}/processes/{pid}/io",
        base.replacen("http://", "ws://", 1)
    );
    Ok(tokio_tungstenite::connect_async(url).await?.0)
}

/// Output bytes of the next binary frame (0 for other frames); `None` at the end.
async fn next_output(ws: &mut Ws) -> Result<Option<usize>> {
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => Ok(Some(b.len().saturating_sub(1))),
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) => Ok(None),
        Ok(Some(Ok(_))) => Ok(Some(0)),
        Ok(Some(Err(e))) => Err(e.into()),
        Err(_) => bail!("no output for 30 s"),
    }
}

pub async fn run(starts: usize, mib: u64, keys: usize) -> Result<()> {
    let plane = ControlPlane::start_with(|cfg| cfg.address_pool = POOL.to_owned()).await?;
    let id = plane.create("workspace").await?;
    // Whatever happens, the sandbox and the control plane are ended.
    let result = measure(&plane, &id, starts, mib, keys).await;
    let _ = plane.delete(&id).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while plane
            .state(&id)
            .await
            .is_ok_and(|s| s["state"] != "stopped" && s["state"] != "failed")
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    plane.shutdown().await;
    result
}

async fn measure(
    plane: &ControlPlane,
    id: &str,
    starts: usize,
    mib: u64,
    keys: usize,
) -> Result<()> {
    let id = id.to_owned();
    plane.wait_ready(&id, Duration::from_secs(180)).await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = plane.base.clone();

    // Files first (the peak memory below is this process's, the control
    // plane's, and must not carry what the later runs left).
    let files = files(&http, &base, &id, FILE_MIB).await?;

    // /exec's round trip: one request, `true` run to its end.
    let mut execs = Vec::new();
    for _ in 0..starts {
        let t = Instant::now();
        let resp = http
            .post(format!("{base}/api/v1/sandboxes/{id}/exec"))
            .json(&json!({"argv": ["true"]}))
            .send()
            .await?;
        let out: Value = resp.json().await?;
        if out["exit_code"] != 0 {
            bail!("exec true: {out}");
        }
        execs.push(t.elapsed());
    }

    // Start latency: POST → attached → first byte of `echo`.
    let mut first = Vec::new();
    for _ in 0..starts {
        let t = Instant::now();
        let pid = start(&http, &base, &id, json!({"argv": ["echo", "x"]})).await?;
        let mut ws = attach(&base, &id, pid).await?;
        while next_output(&mut ws).await? == Some(0) {}
        first.push(t.elapsed());
    }

    // Throughput: `mib` MiB of zeros through the socket, three runs.
    let mut rates = Vec::new();
    for _ in 0..3 {
        let cmd = format!("head -c {} /dev/zero", mib << 20);
        let pid = start(&http, &base, &id, json!({"argv": ["sh", "-c", cmd]})).await?;
        let t = Instant::now();
        let mut ws = attach(&base, &id, pid).await?;
        let mut got = 0usize;
        while let Some(n) = next_output(&mut ws).await? {
            got += n;
        }
        if got as u64 != mib << 20 {
            bail!(
                "got {got} bytes of {} (the backlog cannot have dropped any: we attached at once)",
                mib << 20
            );
        }
        rates.push((mib as f64) / t.elapsed().as_secs_f64());
    }

    // PTY keystroke round trip: a key into `cat` on a terminal, its echo back.
    let pid = start(
        &http,
        &base,
        &id,
        json!({"argv": ["cat"], "pty": {"cols": 80, "rows": 24}}),
    )
    .await?;
    let mut ws = attach(&base, &id, pid).await?;
    let mut trips = Vec::new();
    for i in 0..keys {
        let t = Instant::now();
        ws.send(Message::Binary(vec![b'a' + (i % 26) as u8].into()))
            .await?;
        while next_output(&mut ws).await? == Some(0) {}
        trips.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(ws);

    let mut t = Table::new(
        "Processes through the API (one workspace, nspawn)",
        &["figure", "runs", "p50", "p90", "p99 / max"],
    );
    t.row(&[
        "start: POST → first output byte".to_owned(),
        starts.to_string(),
        ms(percentile(&first, 50.0)),
        ms(percentile(&first, 90.0)),
        ms(percentile(&first, 100.0)),
    ]);
    t.row(&[
        "exec `true`: POST → answer".to_owned(),
        starts.to_string(),
        ms(percentile(&execs, 50.0)),
        ms(percentile(&execs, 90.0)),
        ms(percentile(&execs, 100.0)),
    ]);
    t.row(&[
        "PTY keystroke → echo".to_owned(),
        keys.to_string(),
        ms(percentile(&trips, 50.0)),
        ms(percentile(&trips, 90.0)),
        ms(percentile(&trips, 99.0)),
    ]);
    t.print();
    rates.sort_by(f64::total_cmp);
    println!(
        "\noutput throughput through the io socket ({mib} MiB, 3 runs): {:.0} / {:.0} / {:.0} MiB/s",
        rates[0], rates[1], rates[2]
    );
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|r| format!("{r:.digits$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "files through the API ({FILE_MIB} MiB, 3 runs each): up {} MiB/s, down {} MiB/s",
        list(&files.up, 0),
        list(&files.down, 0)
    );
    println!(
        "the control plane's resident memory while one passed (most above where it stood): \
         up {} MiB, down {} MiB",
        list(&files.grew_up, 1),
        list(&files.grew_down, 1)
    );
    Ok(())
}

/// The size of the file sent up and down.
const FILE_MIB: usize = 60;

#[derive(Debug, Default)]
struct FileFigures {
    up: Vec<f64>,
    down: Vec<f64>,
    /// Per upload and per download: the most this process's resident
    /// memory rose above where it stood before, in MiB.
    grew_up: Vec<f64>,
    grew_down: Vec<f64>,
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the resident memory every 5 ms while `work` runs; answers how
/// far it rose above where it stood at the start, in MiB.
async fn peak_growth<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<(T, f64)> {
    let base = rss_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(base));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let out = work.await;
    sampler.abort();
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(base);
    Ok((out?, grew as f64 / 1024.0))
}

/// `mib` MiB up (`PUT …/files`) and back down, three times each; the bytes
/// that come down are counted and compared, not kept.
async fn files(http: &reqwest::Client, base: &str, id: &str, mib: usize) -> Result<FileFigures> {
    let data: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
    let data = axum::body::Bytes::from(data);
    let url = format!("{base}/api/v1/sandboxes/{id}/files?path=bench.bin");
    let mut f = FileFigures::default();
    for _ in 0..3 {
        let t = Instant::now();
        let (status, grew) = peak_growth(async {
            let resp = http.put(&url).body(data.clone()).send().await?;
            Ok(resp.status())
        })
        .await?;
        if !status.is_success() {
            bail!("upload: {status}");
        }
        f.up.push(mib as f64 / t.elapsed().as_secs_f64());
        f.grew_up.push(grew);

        let t = Instant::now();
        let (got, grew) = peak_growth(async {
            let mut resp = http.get(&url).send().await?;
            let mut got = 0usize;
            while let Some(chunk) = resp.chunk().await? {
                if got + chunk.len() > data.len() || chunk[..] != data[got..got + chunk.len()] {
                    bail!("the download differs at byte {got}");
                }
                got += chunk.len();
            }
            Ok(got)
        })
        .await?;
        if got != data.len() {
            bail!("downloaded {got} bytes of {}", data.len());
        }
        f.down.push(mib as f64 / t.elapsed().as_secs_f64());
        f.grew_down.push(grew);
    }
    Ok(f)
}
