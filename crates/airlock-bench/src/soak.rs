//! Soak: one sandbox, one viewer through the relay, a key press every second
//! for N minutes. Counts disconnects (and reconnects), samples the control
//! plane's RSS and the sandbox's cgroup memory every minute, and says whether
//! memory stayed flat. Run on demand; not part of CI.

use crate::keypress::{relay_viewer, show_page, Flipper};
use crate::sandbox::{cgroup_memory, self_rss, ControlPlane};
use crate::stats::{mib, ms, percentile, Table};
use crate::wire::WsClient;
use anyhow::Result;
use std::time::{Duration, Instant};

/// Growth from the first sample (after a minute of warm-up) to the last that
/// still counts as flat.
const FLAT_BYTES: u64 = 32 << 20;

pub async fn run(minutes: u64) -> Result<()> {
    let cp = ControlPlane::start().await?;
    let result = soak(&cp, minutes).await;
    cp.shutdown().await;
    result
}

async fn connect(cp: &ControlPlane, id: &str) -> Result<Flipper<WsClient>> {
    let mut v = relay_viewer(cp, id).await?;
    v.wait_black(Duration::from_secs(60)).await.ok();
    Ok(v)
}

async fn soak(cp: &ControlPlane, minutes: u64) -> Result<()> {
    let id = cp.create("browser").await?;
    cp.wait_ready(&id, Duration::from_secs(120)).await?;
    show_page(cp, &id).await?;
    let mut viewer = Some(connect(cp, &id).await?);
    if let Some(v) = viewer.as_mut() {
        v.run(3, Duration::from_millis(200)).await?;
    }

    let mut table = Table::new(
        &format!(
            "Soak: one sandbox, one viewer through the relay, a key press a second, {minutes} min"
        ),
        &[
            "minute",
            "control plane RSS",
            "sandbox cgroup usage",
            "sandbox rss",
            "presses",
            "p50",
            "p95",
            "disconnects so far",
        ],
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut next_sample = started + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut window: Vec<Duration> = Vec::new();
    let (mut disconnects, mut failures, mut total) = (0u32, 0u32, 0u64);
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut minute = 0u64;
    let sample = |minute: u64,
                  window: &[Duration],
                  disconnects: u32,
                  t: &mut Table|
     -> Result<(u64, u64)> {
        let c = cgroup_memory(&id)?;
        let rss = self_rss();
        t.row(&[
            minute.to_string(),
            mib(rss),
            mib(c.usage),
            mib(c.rss),
            window.len().to_string(),
            ms(percentile(window, 50.0)),
            ms(percentile(window, 95.0)),
            disconnects.to_string(),
        ]);
        eprintln!(
            "soak: minute {minute}: control plane RSS {}, sandbox {} (rss {}), {} presses, {} disconnects",
            mib(rss),
            mib(c.usage),
            mib(c.rss),
            window.len(),
            disconnects
        );
        Ok((rss, c.usage))
    };
    samples.push(sample(0, &window, 0, &mut table)?);
    while Instant::now() < end {
        tick.tick().await;
        match viewer.as_mut() {
            Some(v) => match v.press(Duration::from_secs(5)).await {
                Ok(d) => {
                    window.push(d);
                    total += 1;
                }
                Err(e) => {
                    disconnects += 1;
                    eprintln!("soak: viewer lost after {:?}: {e:#}", started.elapsed());
                    viewer = None;
                }
            },
            None => match connect(cp, &id).await {
                Ok(v) => viewer = Some(v),
                Err(e) => {
                    failures += 1;
                    eprintln!("soak: reconnect failed: {e:#}");
                }
            },
        }
        if Instant::now() >= next_sample {
            minute += 1;
            samples.push(sample(minute, &window, disconnects, &mut table)?);
            window.clear();
            next_sample += Duration::from_secs(60);
        }
    }
    table.print();

    // Flat: from minute 1 (after warm-up) to the end, each grows by less than FLAT_BYTES.
    let first = samples
        .get(1)
        .or(samples.first())
        .copied()
        .unwrap_or_default();
    let last = samples.last().copied().unwrap_or_default();
    let grow_cp = last.0 as i64 - first.0 as i64;
    let grow_sb = last.1 as i64 - first.1 as i64;
    let flat = grow_cp < FLAT_BYTES as i64 && grow_sb < FLAT_BYTES as i64;
    let mut s = Table::new("Soak summary", &["what", "value"]);
    s.row(&["duration", &format!("{minutes} min")]);
    s.row(&["key presses answered", &total.to_string()]);
    s.row(&["viewer disconnects", &disconnects.to_string()]);
    s.row(&["failed reconnects", &failures.to_string()]);
    s.row(&[
        "control plane RSS, minute 1 → end",
        &format!(
            "{} → {} ({:+.1} MiB)",
            mib(first.0),
            mib(last.0),
            grow_cp as f64 / 1048576.0
        ),
    ]);
    s.row(&[
        "sandbox cgroup usage, minute 1 → end",
        &format!(
            "{} → {} ({:+.1} MiB)",
            mib(first.1),
            mib(last.1),
            grow_sb as f64 / 1048576.0
        ),
    ]);
    s.row(&[
        "memory flat (each grew < 32 MiB)",
        if flat { "yes" } else { "no" },
    ]);
    s.print();
    drop(viewer);
    cp.delete(&id).await?;
    Ok(())
}
