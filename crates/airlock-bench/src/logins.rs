//! Logins under load: `--concurrent` logins started at the same moment (the
//! real claude, codex and gemini CLIs in turn), each followed until it
//! reaches `awaiting_user` with a URL that passes its provider's rule; then
//! all are cancelled and their browser sandboxes waited out, and the next
//! round starts. Prints the time to the sign-in page (p50, p95, max), the
//! failures with their reasons, and where the time went, step by step
//! (`steps` in `GET /logins/{id}`: sandbox, agent, cli_start, prompts, url).

use crate::sandbox::ControlPlane;
use crate::stats::{percentile, secs, Table};
use airlock_server::app::logins::providers::Providers;
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// This bench's own address range (others use theirs).
const POOL: &str = "10.250.128.0/20";
const PROVIDERS: [&str; 3] = ["claude", "codex", "gemini"];
const STEPS: [&str; 5] = ["sandbox", "agent", "cli_start", "prompts", "url"];
/// A login not at its sign-in page by then counts as failed.
const PATIENCE: Duration = Duration::from_secs(300);

/// One login's outcome.
struct Outcome {
    provider: &'static str,
    /// Time from the request to `awaiting_user`, or why not.
    took: Result<Duration, String>,
    /// Seconds spent in each step.
    steps: BTreeMap<&'static str, Duration>,
}

pub async fn run(concurrent: usize, rounds: usize) -> Result<()> {
    let cp = ControlPlane::start_with(|c| {
        c.address_pool = POOL.to_owned();
        // Many sandboxes booting on a small host at once.
        c.boot_timeout_s = 300;
    })
    .await?;
    let result = measure(&cp, concurrent, rounds).await;
    cp.shutdown().await;
    result
}

async fn measure(cp: &ControlPlane, concurrent: usize, rounds: usize) -> Result<()> {
    let providers = Providers::load(None).map_err(anyhow::Error::msg)?;
    let mut all: Vec<Outcome> = Vec::new();
    let mut per_round = Table::new(
        &format!("Logins: {concurrent} at once, request → awaiting_user with a valid URL"),
        &["round", "p50", "p95", "max", "failed"],
    );
    for round in 1..=rounds {
        let outs = futures::future::join_all((0..concurrent).map(|i| {
            let provider = PROVIDERS[i % PROVIDERS.len()];
            one(cp, &providers, provider)
        }))
        .await;
        let times: Vec<Duration> = outs.iter().filter_map(|o| o.took.clone().ok()).collect();
        let failed = outs.iter().filter(|o| o.took.is_err()).count();
        eprintln!(
            "logins: round {round}: {} reached the sign-in page, {failed} failed, max {}",
            times.len(),
            secs(times.iter().max().copied().unwrap_or_default())
        );
        per_round.row(&[
            round.to_string(),
            secs(percentile(&times, 50.0)),
            secs(percentile(&times, 95.0)),
            secs(percentile(&times, 100.0)),
            failed.to_string(),
        ]);
        all.extend(outs);
    }
    per_round.print();

    let mut summary = Table::new(
        &format!(
            "Logins: {} in {rounds} rounds of {concurrent}, by provider",
            all.len()
        ),
        &["provider", "reached", "failed", "p50", "p95", "max"],
    );
    for provider in PROVIDERS.iter().copied().chain(["all"]) {
        let mine: Vec<&Outcome> = all
            .iter()
            .filter(|o| provider == "all" || o.provider == provider)
            .collect();
        let times: Vec<Duration> = mine.iter().filter_map(|o| o.took.clone().ok()).collect();
        summary.row(&[
            provider.to_owned(),
            times.len().to_string(),
            (mine.len() - times.len()).to_string(),
            secs(percentile(&times, 50.0)),
            secs(percentile(&times, 95.0)),
            secs(percentile(&times, 100.0)),
        ]);
    }
    summary.print();

    let mut steps = Table::new(
        "Logins: time in each step (logins that reached the sign-in page)",
        &["step", "logins", "p50", "p95", "max"],
    );
    for step in STEPS {
        let d: Vec<Duration> = all
            .iter()
            .filter(|o| o.took.is_ok())
            .filter_map(|o| o.steps.get(step).copied())
            .collect();
        steps.row(&[
            step.to_owned(),
            d.len().to_string(),
            secs(percentile(&d, 50.0)),
            secs(percentile(&d, 95.0)),
            secs(percentile(&d, 100.0)),
        ]);
    }
    steps.print();

    let failures: Vec<String> = all
        .iter()
        .filter_map(|o| {
            o.took
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", o.provider))
        })
        .collect();
    println!("\nFailures: {} of {}", failures.len(), all.len());
    for f in &failures {
        println!("- {f}");
    }
    Ok(())
}

/// One login, from the request to its sign-in page; cancelled after.
async fn one(cp: &ControlPlane, providers: &Providers, provider: &'static str) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome {
        provider,
        took: Err("not started".into()),
        steps: BTreeMap::new(),
    };
    let (status, body) = match cp
        .call(
            reqwest::Method::POST,
            "/api/v1/logins",
            Some(json!({ "provider": provider })),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.took = Err(format!("POST /logins: {e:#}"));
            return out;
        }
    };
    let Some(id) = body["id"]
        .as_str()
        .filter(|_| status == 201)
        .map(str::to_owned)
    else {
        out.took = Err(format!("POST /logins answered {status}: {body}"));
        return out;
    };
    let sandbox = body["browser_sandbox_id"].as_str().map(str::to_owned);
    let mut last = Value::Null;
    out.took = loop {
        if started.elapsed() > PATIENCE {
            break Err(format!(
                "still {} (step {}) after {PATIENCE:?}",
                last["state"], last["step"]
            ));
        }
        match cp
            .call(reqwest::Method::GET, &format!("/api/v1/logins/{id}"), None)
            .await
        {
            Ok((200, l)) => last = l,
            Ok((s, b)) => break Err(format!("GET /logins/{id} answered {s}: {b}")),
            Err(_) => {}
        }
        match last["state"].as_str().unwrap_or("") {
            "awaiting_user" => {
                let took = started.elapsed();
                let url = last["login_url"].as_str().unwrap_or("");
                let def = providers.get(provider);
                let why = def.and_then(|d| {
                    if d.url_prefixes.iter().any(|p| url.starts_with(p.as_str())) {
                        d.url.refuses(url)
                    } else {
                        Some("not the provider's host".into())
                    }
                });
                break match why {
                    None => Ok(took),
                    Some(why) => Err(format!("a URL that does not pass the rule ({why}): {url}")),
                };
            }
            "failed" | "expired" | "cancelled" => {
                break Err(format!(
                    "{}: {}",
                    last["state"].as_str().unwrap_or(""),
                    last["error"].as_str().unwrap_or("")
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Each step lasts until the next began; the last until the page.
    let marks: Vec<(&'static str, f64)> = last["steps"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            let step = STEPS.iter().find(|s| m["step"].as_str() == Some(s))?;
            Some((*step, m["after_s"].as_f64()?))
        })
        .collect();
    let end = out.took.as_ref().map(Duration::as_secs_f64).unwrap_or(0.0);
    for (i, (step, at)) in marks.iter().enumerate() {
        let until = marks.get(i + 1).map(|m| m.1).unwrap_or(end);
        out.steps
            .insert(step, Duration::from_secs_f64((until - at).max(0.0)));
    }
    let _ = cp
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/logins/{id}"),
            None,
        )
        .await;
    if let Some(sb) = sandbox {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match cp.state(&sb).await {
                Ok(s) if matches!(s["state"].as_str(), Some("stopped" | "failed")) => break,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    out
}
