//! `airlock-bench fuzz`: the fuzz targets of `airlock-fuzz`, each for its
//! share of the time, with executions per second and anything found. A
//! finding's input is written to a file, to become a regression test.

use anyhow::{bail, Result};
use std::path::Path;
use std::time::Duration;

pub fn run(minutes: f64, target: Option<&str>, seed: u64, out: &Path) -> Result<()> {
    let targets = match target {
        Some(name) => match airlock_fuzz::by_name(name) {
            Some(t) => vec![t],
            None => {
                let names: Vec<&str> = airlock_fuzz::all().iter().map(|t| t.name).collect();
                bail!("no fuzz target {name:?}; there are {}", names.join(", "));
            }
        },
        None => airlock_fuzz::all(),
    };
    let each = Duration::from_secs_f64((minutes * 60.0 / targets.len() as f64).max(1.0));
    println!("| target | seconds | executions | per second | corpus | outcomes | findings |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut found = 0;
    for t in &targets {
        eprintln!(
            "fuzzing {} for {:.0} s: {}",
            t.name,
            each.as_secs_f64(),
            t.about
        );
        let r = airlock_fuzz::run(t, each, seed);
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} |",
            r.target,
            r.elapsed.as_secs_f64(),
            r.execs,
            r.execs_per_second(),
            r.corpus,
            r.signatures,
            r.findings.len()
        );
        for (i, f) in r.findings.iter().enumerate() {
            std::fs::create_dir_all(out)?;
            let file = out.join(format!("{}-{i}.bin", r.target));
            std::fs::write(&file, &f.input)?;
            eprintln!(
                "FOUND in {}: {} (input in {})",
                r.target,
                f.what,
                file.display()
            );
            found += 1;
        }
    }
    if found > 0 {
        bail!("{found} finding(s)");
    }
    Ok(())
}
