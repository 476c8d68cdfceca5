//! Churn: create → wait ready → exec → delete → wait stopped, over and over,
//! by several workers at once, against a running control plane's API. Used
//! by `airlock-bench churn` and by the chaos tests (which include this file),
//! so CI runs the very loop the figures in docs/performance.md come from.
//!
//! Times are taken by the client: create → ready runs from the `POST` that
//! was admitted until the first `GET` (every 50 ms) that says `ready`; delete
//! from the `DELETE` until the first `GET` that says `stopped`. A create the
//! admission refuses for a while (429 rate limit, 503 no memory) is retried
//! after its `Retry-After`; the waits are counted, not taken as failures.

use crate::stats::{percentile, secs, Table};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a worker asks for a sandbox's state.
const POLL: Duration = Duration::from_millis(50);

/// A control plane's API, as one user.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    /// `None`: the token-less user `local` (a loopback caller).
    token: Option<String>,
    http: reqwest::Client,
}

/// What an API call answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<Duration>,
}

impl Api {
    pub fn new(base: &str, token: Option<String>) -> Api {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("an HTTP client"),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_secs);
        Ok(Answer {
            status,
            body: resp.json().await.unwrap_or(Value::Null),
            retry_after,
        })
    }

    /// A sandbox as the API shows it (`null` when the call fails).
    pub async fn sandbox(&self, id: &str) -> Value {
        self.call(
            reqwest::Method::GET,
            &format!("/api/v1/sandboxes/{id}"),
            None,
        )
        .await
        .map(|a| a.body)
        .unwrap_or(Value::Null)
    }

    /// Poll until the sandbox's state is one of `want`; the sandbox as last
    /// seen. `Err` on `failed` (unless wanted) or after `within`.
    pub async fn wait_state(
        &self,
        id: &str,
        want: &[&str],
        within: Duration,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + within;
        loop {
            let body = self.sandbox(id).await;
            let state = body["state"].as_str().unwrap_or("");
            if want.contains(&state) {
                return Ok(body);
            }
            if state == "failed" {
                return Err(format!("failed: {}", reason(&body)));
            }
            if Instant::now() >= deadline {
                return Err(format!("still {state:?} after {}", secs(within)));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A failed sandbox's reason, or the API error's message.
pub fn reason(body: &Value) -> String {
    body["failure_reason"]
        .as_str()
        .or(body["error"]["message"].as_str())
        .map_or_else(|| body.to_string(), str::to_owned)
}

#[derive(Debug, Clone)]
pub struct Options {
    pub cycles: usize,
    pub parallel: usize,
    /// `browser` or `workspace`.
    pub kind: String,
    /// How long a sandbox may take to become ready, and to stop.
    pub boot_timeout: Duration,
    pub stop_timeout: Duration,
}

/// One cycle that did not complete.
#[derive(Debug, Clone)]
pub struct Failure {
    pub cycle: usize,
    pub sandbox: Option<String>,
    /// `create`, `ready`, `exec`, `delete`, `stopped`.
    pub step: &'static str,
    pub reason: String,
}

/// What a churn run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub cycles: usize,
    pub completed: usize,
    pub elapsed: Duration,
    pub create_to_ready: Vec<Duration>,
    pub exec: Vec<Duration>,
    pub delete_to_stopped: Vec<Duration>,
    pub failures: Vec<Failure>,
    /// Creates refused for a while (429, 503) and retried, and the time spent waiting.
    pub refusals: usize,
    pub refused_wait: Duration,
    /// Every sandbox created.
    pub ids: Vec<String>,
}

impl Outcome {
    pub fn cycles_per_minute(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9) * 60.0
    }
}

#[derive(Debug, Default)]
struct Shared {
    out: Outcome,
}

/// Run the churn; `on_ready` sees each sandbox once it is ready (the bench
/// notes its uid range for the leak check then).
pub async fn run(api: &Api, opts: &Options, on_ready: &(dyn Fn(&str) + Sync)) -> Outcome {
    let next = AtomicUsize::new(0);
    let shared = Mutex::new(Shared::default());
    let started = Instant::now();
    let workers = (0..opts.parallel.max(1)).map(|_| async {
        loop {
            let cycle = next.fetch_add(1, Ordering::Relaxed);
            if cycle >= opts.cycles {
                return;
            }
            let result = one_cycle(api, opts, cycle, &shared, on_ready).await;
            let mut s = shared.lock().expect("churn results");
            match result {
                Ok(t) => {
                    s.out.completed += 1;
                    s.out.create_to_ready.push(t.ready);
                    s.out.exec.push(t.exec);
                    s.out.delete_to_stopped.push(t.stopped);
                }
                Err(f) => {
                    eprintln!(
                        "churn: cycle {cycle} failed at {} ({}): {}",
                        f.step,
                        f.sandbox.as_deref().unwrap_or("no sandbox"),
                        f.reason
                    );
                    s.out.failures.push(f);
                }
            }
            let done = s.out.completed + s.out.failures.len();
            if done % 10 == 0 || done == opts.cycles {
                eprintln!(
                    "churn: {done}/{} cycles, {} failed, {}",
                    opts.cycles,
                    s.out.failures.len(),
                    secs(started.elapsed())
                );
            }
        }
    });
    futures::future::join_all(workers).await;
    let mut out = shared.into_inner().expect("churn results").out;
    out.cycles = opts.cycles;
    out.elapsed = started.elapsed();
    out
}

struct Times {
    ready: Duration,
    exec: Duration,
    stopped: Duration,
}

async fn one_cycle(
    api: &Api,
    opts: &Options,
    cycle: usize,
    shared: &Mutex<Shared>,
    on_ready: &(dyn Fn(&str) + Sync),
) -> Result<Times, Failure> {
    let fail = |sandbox: Option<&str>, step, reason: String| Failure {
        cycle,
        sandbox: sandbox.map(str::to_owned),
        step,
        reason,
    };
    // Create, waiting out refusals that say when to come back.
    let (id, t0) = loop {
        let t0 = Instant::now();
        let a = api
            .call(
                reqwest::Method::POST,
                "/api/v1/sandboxes",
                Some(json!({ "kind": opts.kind })),
            )
            .await
            .map_err(|e| fail(None, "create", e))?;
        match (a.status, a.retry_after) {
            (201, _) => {
                let id = a.body["id"].as_str().unwrap_or_default().to_owned();
                break (id, t0);
            }
            (429 | 503, Some(wait)) => {
                let wait = wait.max(Duration::from_secs(1));
                {
                    let mut s = shared.lock().expect("churn results");
                    s.out.refusals += 1;
                    s.out.refused_wait += wait;
                }
                tokio::time::sleep(wait).await;
            }
            (status, _) => {
                return Err(fail(
                    None,
                    "create",
                    format!("{status}: {}", reason(&a.body)),
                ))
            }
        }
    };
    shared
        .lock()
        .expect("churn results")
        .out
        .ids
        .push(id.clone());
    let result = async {
        api.wait_state(&id, &["ready"], opts.boot_timeout)
            .await
            .map_err(|e| ("ready", e))?;
        let ready = t0.elapsed();
        on_ready(&id);
        let t1 = Instant::now();
        let a = api
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/sandboxes/{id}/exec"),
                Some(json!({ "argv": ["true"], "timeout_s": 30 })),
            )
            .await
            .map_err(|e| ("exec", e))?;
        if a.status != 200 || a.body["exit_code"] != 0 {
            return Err(("exec", format!("{}: {}", a.status, a.body)));
        }
        let exec = t1.elapsed();
        Ok((ready, exec))
    }
    .await;
    // Delete whatever happened above, so a failed cycle leaves nothing running.
    let t2 = Instant::now();
    let deleted = async {
        let a = api
            .call(
                reqwest::Method::DELETE,
                &format!("/api/v1/sandboxes/{id}"),
                None,
            )
            .await
            .map_err(|e| ("delete", e))?;
        if a.status != 202 && !(result.is_err() && a.status == 409) {
            return Err(("delete", format!("{}: {}", a.status, reason(&a.body))));
        }
        let want: &[&str] = if result.is_ok() {
            &["stopped"]
        } else {
            &["stopped", "failed"]
        };
        api.wait_state(&id, want, opts.stop_timeout)
            .await
            .map_err(|e| ("stopped", e))?;
        Ok(t2.elapsed())
    }
    .await;
    let (ready, exec) = result.map_err(|(step, e)| fail(Some(&id), step, e))?;
    let stopped = deleted.map_err(|(step, e)| fail(Some(&id), step, e))?;
    Ok(Times {
        ready,
        exec,
        stopped,
    })
}

/// The figures as tables on stdout, and the leaks found afterwards.
pub fn print(out: &Outcome, opts: &Options, leaks: &[impl std::fmt::Display]) {
    let mut t = Table::new(
        &format!(
            "Churn: {} cycles of create → ready → exec → delete → stopped, {} at a time ({})",
            out.cycles, opts.parallel, opts.kind
        ),
        &["figure", "value"],
    );
    t.row(&["cycles completed", &out.completed.to_string()]);
    t.row(&["cycles failed", &out.failures.len().to_string()]);
    t.row(&["wall time", &secs(out.elapsed)]);
    t.row(&["cycles/min", &format!("{:.1}", out.cycles_per_minute())]);
    for (what, samples) in [
        ("create → ready", &out.create_to_ready),
        ("exec `true`", &out.exec),
        ("delete → stopped", &out.delete_to_stopped),
    ] {
        for p in [50.0, 99.0] {
            t.row(&[format!("{what} p{p:.0}"), secs(percentile(samples, p))]);
        }
    }
    t.row(&[
        "creates refused and retried (429/503)".to_owned(),
        format!("{} (waited {})", out.refusals, secs(out.refused_wait)),
    ]);
    t.row(&["leaks after the run", &leaks.len().to_string()]);
    t.print();
    if out.refusals > 0 {
        println!(
            "Creates were refused for a while: raise `creates_per_minute` (and \
             `max_sandboxes`) under `[quota]` in the server's config, or the figures \
             measure the limit, not the host.\n"
        );
    }
    if !out.failures.is_empty() {
        let mut f = Table::new("Failed cycles", &["cycle", "sandbox", "step", "reason"]);
        for x in &out.failures {
            f.row(&[
                x.cycle.to_string(),
                x.sandbox.clone().unwrap_or_default(),
                x.step.to_owned(),
                x.reason.clone(),
            ]);
        }
        f.print();
    }
    if !leaks.is_empty() {
        let mut l = Table::new("Left behind", &["what"]);
        for x in leaks {
            l.row(&[x.to_string()]);
        }
        l.print();
    }
}
