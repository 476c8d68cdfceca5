//! Warm pools: claim → `ready` through the real API, at a steady rate and in
//! bursts, with the hit rate and the time the pool takes to fill again.
//! Every sandbox handed out is deleted once measured (in the background), so
//! the run holds about the pool plus a few sandboxes at a time.

use crate::sandbox::ControlPlane;
use crate::stats::{ms, percentile, secs, Table};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The benchmark's own addresses (a /24 of the range its tests use).
const ADDRESSES: &str = "10.253.2.0/24";

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Browser sandboxes the pool keeps booted.
    #[arg(long, default_value_t = 4)]
    pub size: u32,
    /// Claims made one after another, `--every-ms` apart.
    #[arg(long, default_value_t = 200)]
    pub claims: usize,
    #[arg(long, default_value_t = 1000)]
    pub every_ms: u64,
    /// Claims made at once in each burst (after the pool filled up).
    #[arg(long, default_value_t = 20)]
    pub burst: usize,
    /// Bursts.
    #[arg(long, default_value_t = 3)]
    pub bursts: usize,
}

/// One create's outcome as a client sees it.
#[derive(Debug, Clone)]
struct Claimed {
    id: String,
    from_pool: bool,
    /// From the request to the sandbox `ready` (at once for a pool hit).
    to_ready: Duration,
}

pub async fn run(opts: Options) -> Result<()> {
    let size = opts.size;
    let cp = ControlPlane::start_with(|cfg| {
        cfg.address_pool = ADDRESSES.to_owned();
        cfg.pool.browser = size;
        cfg.pool.refill_every_s = 1;
    })
    .await?;
    // Interrupted (Ctrl-C, or a TERM from `timeout`): still destroy what it made.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = measure(&cp, &opts) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    cp.shutdown().await;
    result
}

async fn measure(cp: &ControlPlane, opts: &Options) -> Result<()> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let started = Instant::now();
    wait_full(&http, cp, opts.size, Duration::from_secs(600)).await?;
    let first_fill = started.elapsed();
    eprintln!(
        "pool: {} members ready after {}",
        opts.size,
        secs(first_fill)
    );

    // Steady claims: one started every `every_ms`, whether or not the ones
    // before are ready yet (a miss waits for its cold boot on its own).
    let every = Duration::from_millis(opts.every_ms);
    let mut next = Instant::now();
    let mut running = Vec::new();
    for i in 0..opts.claims {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let (http, cp_base) = (http.clone(), cp.base.clone());
        running.push(tokio::spawn(async move {
            let c = claim(&http, &cp_base).await;
            if let Ok(c) = &c {
                eprintln!(
                    "pool: claim {} {} in {}",
                    i + 1,
                    if c.from_pool { "hit" } else { "miss" },
                    ms(c.to_ready)
                );
                let _ = http
                    .delete(format!("{cp_base}/api/v1/sandboxes/{}", c.id))
                    .send()
                    .await;
            }
            c
        }));
    }
    let mut steady = Vec::new();
    for r in futures::future::join_all(running).await {
        steady.push(r??);
    }
    let mut deletes = Vec::new();

    // Bursts, each from a full pool.
    let mut burst = Vec::new();
    let mut refills = Vec::new();
    for b in 0..opts.bursts {
        wait_full(&http, cp, opts.size, Duration::from_secs(600)).await?;
        let all = futures::future::join_all((0..opts.burst).map(|_| claim(&http, &cp.base))).await;
        let t0 = Instant::now();
        let mut got = Vec::new();
        for c in all {
            got.push(c?);
        }
        let hits = got.iter().filter(|c| c.from_pool).count();
        eprintln!("pool: burst {} of {}: {hits} hits", b + 1, opts.burst);
        for c in &got {
            deletes.push(delete_later(&http, cp, &c.id));
        }
        futures::future::join_all(deletes.drain(..)).await;
        // From the burst's end to a full pool again.
        wait_full(&http, cp, opts.size, Duration::from_secs(600)).await?;
        refills.push(t0.elapsed());
        burst.extend(got);
    }

    let mut t = Table::new(
        &format!(
            "Warm pool of {} browser sandboxes: create → ready as the client sees it",
            opts.size
        ),
        &[
            "load",
            "claims",
            "hit rate",
            "hits p50",
            "hits p99",
            "misses p50",
            "misses p99",
        ],
    );
    for (name, set) in [
        (format!("one every {} ms", opts.every_ms), &steady),
        (
            format!("bursts of {} (×{})", opts.burst, opts.bursts),
            &burst,
        ),
    ] {
        let hits: Vec<Duration> = set
            .iter()
            .filter(|c| c.from_pool)
            .map(|c| c.to_ready)
            .collect();
        let misses: Vec<Duration> = set
            .iter()
            .filter(|c| !c.from_pool)
            .map(|c| c.to_ready)
            .collect();
        let pct = |v: &[Duration], p| {
            if v.is_empty() {
                "—".to_owned()
            } else {
                ms(percentile(v, p))
            }
        };
        t.row(&[
            name,
            set.len().to_string(),
            format!(
                "{:.0} %",
                100.0 * hits.len() as f64 / set.len().max(1) as f64
            ),
            pct(&hits, 50.0),
            pct(&hits, 99.0),
            pct(&misses, 50.0),
            pct(&misses, 99.0),
        ]);
    }
    t.print();
    let mut t = Table::new("Time to fill the pool", &["from", "to", "time"]);
    t.row(&[
        "empty (start)".to_owned(),
        format!("{} ready", opts.size),
        secs(first_fill),
    ]);
    for (i, r) in refills.iter().enumerate() {
        t.row(&[
            format!("burst {} answered", i + 1),
            format!("{} ready", opts.size),
            secs(*r),
        ]);
    }
    t.print();
    Ok(())
}

/// `POST /sandboxes`; for a cold create, wait until it is ready.
async fn claim(http: &reqwest::Client, base: &str) -> Result<Claimed> {
    let t0 = Instant::now();
    let resp = http
        .post(format!("{base}/api/v1/sandboxes"))
        .json(&json!({"kind": "browser"}))
        .send()
        .await
        .context("create")?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status != 201 {
        bail!("create answered {status}: {body}");
    }
    let id = body["id"].as_str().context("no id")?.to_owned();
    let from_pool = body["from_pool"] == true;
    if from_pool {
        if body["state"] != "ready" {
            bail!("a pool hit that is not ready: {body}");
        }
    } else {
        wait_ready(http, base, &id, Duration::from_secs(180)).await?;
    }
    Ok(Claimed {
        id,
        from_pool,
        to_ready: t0.elapsed(),
    })
}

/// Poll every 20 ms until `ready`; an error on `failed` or after `within`.
async fn wait_ready(http: &reqwest::Client, base: &str, id: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let body: Value = http
            .get(format!("{base}/api/v1/sandboxes/{id}"))
            .send()
            .await?
            .json()
            .await?;
        match body["state"].as_str().unwrap_or("") {
            "ready" => return Ok(()),
            "failed" => bail!("sandbox {id} failed: {}", body["failure_reason"]),
            s if Instant::now() > deadline => bail!("sandbox {id} still {s} after {within:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Delete a sandbox now, in the background (the teardown is not waited for).
fn delete_later(
    http: &reqwest::Client,
    cp: &ControlPlane,
    id: &str,
) -> tokio::task::JoinHandle<()> {
    let (http, url) = (http.clone(), format!("{}/api/v1/sandboxes/{id}", cp.base));
    tokio::spawn(async move {
        let _ = http.delete(url).send().await;
    })
}

/// Poll `GET /api/v1/pool` until `size` browser members are ready.
async fn wait_full(
    http: &reqwest::Client,
    cp: &ControlPlane,
    size: u32,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let body: Value = http
            .get(format!("{}/api/v1/pool", cp.base))
            .send()
            .await
            .context("pool status")?
            .json()
            .await?;
        let ready = body["pools"][0]["ready"].as_u64().unwrap_or(0);
        if ready >= u64::from(size) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pool holds {ready} of {size} after {within:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
