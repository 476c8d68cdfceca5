//! Sandbox start time and idle memory: sandboxes created one after another
//! through the real API (each left running), then measured together once idle.

use crate::sandbox::{
    cgroup_memory, clock_ticks, cpu_ticks, meminfo, process_memory, ControlPlane,
};
use crate::stats::{mib, percentile, secs, Table};
use anyhow::Result;
use std::time::{Duration, Instant};

/// Never let the benchmark take the machine below this much available memory.
const KEEP_FREE: u64 = 6 << 30;

pub async fn run(count: usize, settle: Duration) -> Result<()> {
    let cp = ControlPlane::start().await?;
    let result = measure(&cp, count, settle).await;
    cp.shutdown().await;
    result
}

async fn measure(cp: &ControlPlane, count: usize, settle: Duration) -> Result<()> {
    let avail_before = meminfo("MemAvailable");
    let total = meminfo("MemTotal");
    let mut ids = Vec::new();
    let mut times = Vec::new();
    let mut t = Table::new(
        "Sandboxes: create → ready, one after another (earlier ones left running)",
        &[
            "#",
            "sandbox",
            "create → ready",
            "sandboxes already running",
        ],
    );
    for i in 0..count {
        let avail = meminfo("MemAvailable");
        if avail < KEEP_FREE + (512 << 20) {
            eprintln!("sandboxes: stopping at {i}: only {} available", mib(avail));
            break;
        }
        let started = Instant::now();
        let id = cp.create("browser").await?;
        cp.wait_ready(&id, Duration::from_secs(120)).await?;
        let took = started.elapsed();
        eprintln!("sandboxes: {id} ready in {}", secs(took));
        t.row(&[(i + 1).to_string(), id.clone(), secs(took), i.to_string()]);
        ids.push(id);
        times.push(took);
    }
    t.row(&[
        "p50".to_owned(),
        String::new(),
        secs(percentile(&times, 50.0)),
        String::new(),
    ]);
    t.row(&[
        "p95".to_owned(),
        String::new(),
        secs(percentile(&times, 95.0)),
        String::new(),
    ]);
    t.print();

    eprintln!(
        "sandboxes: {} running; letting them idle for {}",
        ids.len(),
        secs(settle)
    );
    tokio::time::sleep(settle).await;
    // Idle CPU: every sandbox's processes over one 10 s window.
    let window = Duration::from_secs(10);
    let before: Vec<u64> = ids.iter().map(|id| cpu_ticks(id)).collect();
    tokio::time::sleep(window).await;
    let idle_cpu: Vec<f64> = ids
        .iter()
        .zip(&before)
        .map(|(id, b)| {
            cpu_ticks(id).saturating_sub(*b) as f64 / clock_ticks() as f64 / window.as_secs_f64()
        })
        .collect();

    let mut m = Table::new(
        &format!(
            "Idle memory per sandbox ({} running together, after {} idle)",
            ids.len(),
            secs(settle)
        ),
        &[
            "sandbox",
            "cgroup usage",
            "usage − inactive file",
            "rss",
            "cache (shmem)",
            "processes",
            "Σ PSS",
            "Σ RSS",
            "idle CPU",
        ],
    );
    let n = ids.len().max(1) as u64;
    let (mut su, mut sw, mut spss) = (0u64, 0u64, 0u64);
    for (id, cpu) in ids.iter().zip(&idle_cpu) {
        let c = cgroup_memory(id)?;
        let (procs, pss, rss) = process_memory(id);
        let working = c.usage.saturating_sub(c.inactive_file);
        su += c.usage;
        sw += working;
        spss += pss;
        m.row(&[
            id.clone(),
            mib(c.usage),
            mib(working),
            mib(c.rss),
            format!("{} ({})", mib(c.cache), mib(c.shmem)),
            procs.to_string(),
            mib(pss),
            mib(rss),
            format!("{:.1}% of a core", cpu * 100.0),
        ]);
    }
    m.row(&[
        "mean".to_owned(),
        mib(su / n),
        mib(sw / n),
        String::new(),
        String::new(),
        String::new(),
        mib(spss / n),
        String::new(),
        format!(
            "{:.1}% of a core",
            idle_cpu.iter().sum::<f64>() / n as f64 * 100.0
        ),
    ]);
    m.print();

    let avail_after = meminfo("MemAvailable");
    let host_per = avail_before.saturating_sub(avail_after) / n;
    let mut cap = Table::new(
        "How many idle sandboxes this machine holds (estimate)",
        &["quantity", "value", "how"],
    );
    cap.row(&["MemTotal", &mib(total), "/proc/meminfo"]);
    cap.row(&[
        "MemAvailable before",
        &mib(avail_before),
        "before the first create",
    ]);
    cap.row(&[
        "MemAvailable with all running",
        &mib(avail_after),
        &format!("after {} idle", secs(settle)),
    ]);
    cap.row(&[
        "host cost per sandbox",
        &mib(host_per),
        &format!("(before − after) / {n}; includes other engineers' drift"),
    ]);
    let reserve: u64 = 2 << 30;
    let per = host_per.max(su / n).max(1);
    let usable = total.saturating_sub(reserve);
    cap.row(&[
        "per-sandbox figure used",
        &mib(per),
        "the larger of host cost and mean cgroup usage",
    ]);
    cap.row(&[
        "idle sandboxes that fit",
        &(usable / per).to_string(),
        &format!(
            "(MemTotal {} − 2 GiB for host and control plane) / {}",
            mib(total),
            mib(per)
        ),
    ]);
    cap.row(&[
        "… next to today's other load",
        &((avail_before.saturating_sub(reserve)) / per).to_string(),
        &format!(
            "(MemAvailable before {} − 2 GiB) / {}",
            mib(avail_before),
            mib(per)
        ),
    ]);
    let mean_cpu = idle_cpu.iter().sum::<f64>() / n as f64;
    if mean_cpu > 0.0 {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
        cap.row(&[
            "idle sandboxes the CPUs carry".to_owned(),
            format!("{:.0}", cores / mean_cpu),
            format!(
                "{cores} cores / {:.1}% of a core per idle sandbox (no headroom left)",
                mean_cpu * 100.0
            ),
        ]);
    }
    cap.print();

    let mut del = Vec::new();
    for id in &ids {
        let t = Instant::now();
        cp.delete(id).await?;
        del.push(t.elapsed());
    }
    let mut d = Table::new("Delete → stopped", &["p50", "p95"]);
    d.row(&[secs(percentile(&del, 50.0)), secs(percentile(&del, 95.0))]);
    d.print();
    Ok(())
}
