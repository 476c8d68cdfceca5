//! Input-to-photon through the real viewer in headless Chromium, WebRTC vs
//! noVNC, on one sandbox showing the flip page (tests/e2e/latency.mjs does the
//! pressing and the detecting; this drives it and reports). With `soak`, one
//! press a second for a long time on each path, with memory once a minute.

use crate::keypress::show_page;
use crate::sandbox::{cgroup_memory, clock_ticks, cpu_ticks, self_rss, ControlPlane};
use crate::shaped::{Link, Shape};
use crate::stats::{mib, ms, percentile, Table};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Run {
    path: String,
    /// Press → the new picture in the page (tests/e2e/latency.mjs: `ready`).
    samples_ms: Vec<f64>,
    /// Press → the rendering step that first saw it (`step`).
    step_ms: Vec<f64>,
    /// Press → the first animation frame whose sample of the shown pixel
    /// turned, the same way on both paths (`probe`; with `--probe` only).
    probe_ms: Vec<f64>,
    missed: usize,
    disconnects: usize,
    fallbacks: usize,
    busy: Option<Busy>,
}

/// The busy screen: distinct frames the viewer showed, of those the page drew.
#[derive(Debug)]
struct Busy {
    seconds: f64,
    delivered: u64,
    produced: u64,
}

/// This process's RSS (the control plane runs in it) and the sandbox's memory.
fn memory(id: &str) -> (u64, u64) {
    (self_rss(), cgroup_memory(id).map(|m| m.usage).unwrap_or(0))
}

/// How long the busy screen is watched after the presses of a run.
const BUSY_SECONDS: u64 = 15;

#[derive(Debug)]
struct Measured {
    run: Run,
    guest_cpu: f64,
    plane_cpu: f64,
}

fn script() -> Result<PathBuf> {
    let root = std::env::current_dir()?;
    let s = root.join("tests/e2e/latency.mjs");
    if !s.exists() || !root.join("tests/e2e/node_modules/playwright-core").exists() {
        bail!("run from the repository root after `npm ci --prefix tests/e2e` (needs tests/e2e/latency.mjs and playwright-core)");
    }
    Ok(s)
}

/// This process's CPU time (the control plane runs in it), in clock ticks.
fn self_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Where the browser runs and what address it uses for the control plane.
#[derive(Debug, Clone)]
struct Browser {
    url: String,
    /// A network namespace to run it in (the shaped link), if any.
    netns: Option<String>,
}

/// What the page records beyond the default stamps.
#[derive(Debug, Clone, Copy)]
struct Record<'a> {
    /// Where the page's raw stamps go.
    raw: Option<&'a std::path::Path>,
    /// The like-for-like probe on too.
    probe: bool,
}

async fn measure(
    browser: &Browser,
    id: &str,
    path: &str,
    presses: usize,
    gap: (u64, u64),
    busy_seconds: u64,
    record: Record<'_>,
) -> Result<Measured> {
    let Record { raw, probe } = record;
    let (g0, p0, t0) = (cpu_ticks(id), self_ticks(), Instant::now());
    let mut cmd = match &browser.netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, "node"]);
            c
        }
        None => tokio::process::Command::new("node"),
    };
    cmd.arg(script()?)
        .args(["--url", &browser.url, "--id", id, "--path", path])
        .args(["--presses", &presses.to_string()])
        .args([
            "--gap-min",
            &gap.0.to_string(),
            "--gap-max",
            &gap.1.to_string(),
        ])
        .args(["--busy-seconds", &busy_seconds.to_string()]);
    if probe {
        cmd.arg("--probe");
    }
    if let Some(raw) = raw {
        cmd.arg("--raw")
            .arg(raw.with_extension(format!("{path}.json")));
    }
    let out = cmd.output().await.context("running node")?;
    let wall = t0.elapsed();
    let (g1, p1) = (cpu_ticks(id), self_ticks());
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!(
            "the latency script failed on the {path} path ({})",
            out.status
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("reading the script's result: {line}"))?;
    let count = |k: &str| v[k].as_u64().unwrap_or(0);
    let samples = |k: &str| {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .filter(|x| *x >= 0.0)
                    .collect()
            })
            .unwrap_or_default()
    };
    let run = Run {
        path: v["path"].as_str().unwrap_or(path).to_owned(),
        samples_ms: samples("samples_ms"),
        step_ms: samples("step_ms"),
        probe_ms: samples("probe_ms"),
        // A flip stamped before its press, or seen by one stamp and not the
        // other, cannot be attributed: counted as missed, never as a sample.
        missed: (count("missed") + count("negative") + count("unpaired")) as usize,
        disconnects: count("disconnects") as usize,
        fallbacks: count("fallbacks") as usize,
        busy: v["busy"].is_object().then(|| Busy {
            seconds: v["busy"]["seconds"].as_f64().unwrap_or(0.0),
            delivered: v["busy"]["delivered"].as_u64().unwrap_or(0),
            produced: v["busy"]["produced"].as_u64().unwrap_or(0),
        }),
    };
    let hz = clock_ticks() as f64;
    let pct = |ticks: u64| ticks as f64 / hz / wall.as_secs_f64() * 100.0;
    Ok(Measured {
        run,
        guest_cpu: pct(g1.saturating_sub(g0)),
        plane_cpu: pct(p1.saturating_sub(p0)),
    })
}

/// What `airlock-bench viewer` measures, and how.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Presses per path, at random gaps of 150–400 ms.
    #[arg(long, default_value_t = 200)]
    presses: usize,
    /// Instead: a soak of one press a second for this many minutes per path.
    #[arg(long)]
    soak_minutes: Option<u64>,
    /// Frames per second the guest encodes for WebRTC.
    #[arg(long, default_value_t = 60)]
    fps: u32,
    /// Between browser and control plane: 40 ms round trip, 10 Mbit/s,
    /// 0.5 % loss each way (a namespace, a veth pair, tbf, nftables, and a
    /// delaying relay: this kernel has no netem).
    #[arg(long)]
    shaped: bool,
    /// Second copies of video packets against loss, kbit/s per viewer
    /// (the control plane's `webrtc_copies_kbps`; 0 for none).
    #[arg(long, default_value_t = 1000)]
    copies_kbps: u32,
    /// Also write the viewer page's stamps (every press and flip) to
    /// RAW.webrtc.json and RAW.vnc.json.
    #[arg(long)]
    raw: Option<PathBuf>,
    /// Also the like-for-like probe: on every animation frame the viewer page
    /// samples the pixel it shows (the video, noVNC's canvas), the same way on
    /// both paths (an animation loop in the page, which slows WebRTC's video:
    /// docs/performance.md).
    #[arg(long)]
    probe: bool,
    /// The control plane's address pool (its own, so the bench runs beside
    /// the other benchmarks and tests).
    #[arg(long, default_value = "10.238.0.0/16")]
    pool: String,
}

/// `presses` per path with random gaps, or `soak_minutes` of one press a second.
pub async fn run(opts: Options) -> Result<()> {
    let Options {
        presses,
        soak_minutes,
        fps,
        shaped,
        copies_kbps,
        raw,
        probe,
        pool,
    } = opts;
    script()?;
    let shape = Shape {
        rtt: Duration::from_millis(40),
        mbit: 10,
        loss_per_mille: 5,
    };
    let mut link = if shaped { Some(Link::up(shape)?) } else { None };
    let advertise = link.as_ref().map(|l| std::net::IpAddr::V4(l.host));
    let cp = ControlPlane::start_with(|cfg| {
        // Its own addresses, so it can run beside the other benchmarks.
        cfg.address_pool = pool.clone();
        cfg.webrtc_fps = fps;
        cfg.webrtc_copies_kbps = copies_kbps;
        cfg.webrtc_address = advertise;
    })
    .await?;
    let port = cp.port().context("no HTTP port")?;
    let browser = match link.as_mut() {
        Some(link) => {
            let (udp, tcp) = cp.webrtc_ports().context("WebRTC is off")?;
            link.relay(port, false, shape).await?;
            link.relay(udp, true, shape).await?;
            if tcp != udp {
                link.relay(tcp, false, shape).await?;
            }
            Browser {
                url: format!("http://{}:{port}", link.host),
                netns: Some(link.netns.clone()),
            }
        }
        None => Browser {
            url: cp.base.clone(),
            netns: None,
        },
    };
    let id = cp.create("browser").await?;
    let result = async {
        cp.wait_ready(&id, Duration::from_secs(120)).await?;
        show_page(&cp, &id).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (n, gap, busy) = match soak_minutes {
            Some(m) => (m as usize * 60, (1000, 1000), 0),
            None => (presses, (150, 400), BUSY_SECONDS),
        };
        let mut rows = Vec::new();
        for path in ["webrtc", "vnc"] {
            // Memory once a minute while the path runs (and at both ends).
            let readings = std::sync::Arc::new(std::sync::Mutex::new(vec![memory(&id)]));
            let sampler = {
                let (readings, id) = (readings.clone(), id.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(60));
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        if let Ok(mut r) = readings.lock() {
                            r.push(memory(&id));
                        }
                    }
                })
            };
            let record = Record {
                raw: raw.as_deref(),
                probe,
            };
            let m = measure(&browser, &id, path, n, gap, busy, record).await;
            sampler.abort();
            let m = m?;
            let mut readings = readings.lock().map(|r| r.clone()).unwrap_or_default();
            readings.push(memory(&id));
            rows.push((m, readings));
            // The guest's CPU is read per process: let the encoder of the
            // WebRTC run exit before the next run's first reading.
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        let mut t = Table::new(
            &format!(
                "Input to photon through the viewer in headless Chromium ({n} presses per path, WebRTC at {fps} fps, {})",
                if shaped {
                    "shaped link: 40 ms round trip, 10 Mbit/s, 0.5 % loss each way"
                } else {
                    "loopback"
                }
            ),
            &[
                "path",
                "p50",
                "p95",
                "p99",
                "at the rendering step: p50 / p95 / p99",
                "probe (every animation frame, both paths): p50 / p95 / p99",
                "missed",
                "busy screen: frames/s shown (drawn)",
                "guest CPU",
                "control plane CPU",
            ],
        );
        let durations = |v: &[f64]| -> Vec<Duration> {
            v.iter()
                .filter_map(|v| Duration::try_from_secs_f64(v / 1000.0).ok())
                .collect()
        };
        for (m, _) in &rows {
            let d = durations(&m.run.samples_ms);
            let step = durations(&m.run.step_ms);
            let probed = durations(&m.run.probe_ms);
            let fps = match &m.run.busy {
                Some(b) if b.seconds > 0.0 => format!(
                    "{:.1} ({:.1})",
                    b.delivered as f64 / b.seconds,
                    b.produced as f64 / b.seconds
                ),
                _ => "-".into(),
            };
            t.row(&[
                m.run.path.clone(),
                ms(percentile(&d, 50.0)),
                ms(percentile(&d, 95.0)),
                ms(percentile(&d, 99.0)),
                format!(
                    "{} / {} / {}",
                    ms(percentile(&step, 50.0)),
                    ms(percentile(&step, 95.0)),
                    ms(percentile(&step, 99.0))
                ),
                if probed.is_empty() {
                    "-".into()
                } else {
                    format!(
                        "{} / {} / {}",
                        ms(percentile(&probed, 50.0)),
                        ms(percentile(&probed, 95.0)),
                        ms(percentile(&probed, 99.0))
                    )
                },
                m.run.missed.to_string(),
                fps,
                format!("{:.0} %", m.guest_cpu),
                format!("{:.0} %", m.plane_cpu),
            ]);
        }
        t.print();
        // How the losses were met: which input copy came first, what the
        // second copies of video packets cost.
        let metrics = cp.metrics().await.unwrap_or_default();
        for line in metrics.lines().filter(|l| {
            l.starts_with("airlock_webrtc_input_applied_total")
                || l.starts_with("airlock_webrtc_copy_bytes_sent_total")
                || l.starts_with("airlock_webrtc_video_bytes_sent_total")
        }) {
            println!("{line}");
        }
        if soak_minutes.is_some() {
            let mut s = Table::new(
                "Soak: one press a second",
                &[
                    "path",
                    "disconnects",
                    "fell back",
                    "plane RSS first → last (min–max)",
                    "sandbox memory first → last (min–max)",
                ],
            );
            let span = |v: Vec<u64>| {
                let (min, max) = (v.iter().min(), v.iter().max());
                match (v.first(), v.last(), min, max) {
                    (Some(a), Some(b), Some(lo), Some(hi)) => {
                        format!("{} → {} ({}–{})", mib(*a), mib(*b), mib(*lo), mib(*hi))
                    }
                    _ => "-".into(),
                }
            };
            for (m, readings) in &rows {
                s.row(&[
                    m.run.path.clone(),
                    m.run.disconnects.to_string(),
                    m.run.fallbacks.to_string(),
                    span(readings.iter().map(|r| r.0).collect()),
                    span(readings.iter().map(|r| r.1).collect()),
                ]);
            }
            s.print();
            for (m, readings) in &rows {
                let series: Vec<String> = readings.iter().map(|r| format!("{:.1}", r.0 as f64 / 1048576.0)).collect();
                println!("{} path, control plane RSS each minute (MiB): {}", m.run.path, series.join(" "));
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = cp.delete(&id).await;
    cp.shutdown().await;
    drop(link);
    result
}
