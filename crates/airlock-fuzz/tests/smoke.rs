//! Every fuzz target for a few seconds (`AIRLOCK_FUZZ_SECONDS`, default 3):
//! nothing found, and the engine gets through inputs at a useful rate. The
//! long runs are `airlock-bench fuzz --minutes N`.

use std::time::Duration;

#[test]
fn every_target_runs_clean_for_a_few_seconds() {
    let secs: u64 = std::env::var("AIRLOCK_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut found = Vec::new();
    for target in airlock_fuzz::all() {
        let r = airlock_fuzz::run(&target, Duration::from_secs(secs), 0x5eed);
        println!(
            "{:<16} {:>9} execs {:>9.0}/s  corpus {:>5}  outcomes {:>5}  findings {}",
            r.target,
            r.execs,
            r.execs_per_second(),
            r.corpus,
            r.signatures,
            r.findings.len()
        );
        assert!(r.execs > 100, "{} barely ran: {r:?}", r.target);
        for f in r.findings {
            found.push(format!(
                "{}: {} (input {:?})",
                r.target,
                f.what,
                String::from_utf8_lossy(&f.input)
            ));
        }
    }
    assert!(found.is_empty(), "findings:\n{}", found.join("\n"));
}
