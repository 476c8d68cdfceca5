//! The mutational loop: pick a corpus entry, mutate it, run it under
//! `catch_unwind`, keep it when its outcome signature is new. A watchdog
//! reports an input that runs longer than [`HANG`] as a finding.

use crate::Target;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One input taking longer than this is a finding (a loop the input controls).
const HANG: Duration = Duration::from_secs(2);
/// Largest input the mutator grows to.
const MAX_LEN: usize = 4096;
/// Corpus entries kept at most.
const MAX_CORPUS: usize = 4096;

/// Something a target must not do, with the input that did it.
#[derive(Debug, Clone)]
pub struct Finding {
    pub what: String,
    pub input: Vec<u8>,
}

/// What one run of one target did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub execs: u64,
    pub elapsed: Duration,
    pub corpus: usize,
    pub signatures: usize,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn execs_per_second(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

thread_local! {
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Run `target` for `budget` from PRNG seed `seed`. Findings are deduplicated
/// by message; the first input of each is kept.
pub fn run(target: &Target, budget: Duration, seed: u64) -> Report {
    // Panics are findings, reported by us: keep the default hook quiet, and
    // remember the message for the report.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
    }));

    let current: Arc<Mutex<Vec<u8>>> = Arc::default();
    let started_at = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let watchdog = {
        let (current, started_at, done) = (current.clone(), started_at.clone(), done.clone());
        std::thread::spawn(move || -> Option<Finding> {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let at = started_at.load(Ordering::Relaxed);
                let now = t0.elapsed().as_millis() as u64;
                if at != 0 && now.saturating_sub(at) > HANG.as_millis() as u64 {
                    return Some(Finding {
                        what: format!("one input ran for more than {}s", HANG.as_secs()),
                        input: current.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    });
                }
            }
            None
        })
    };

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut corpus: Vec<Vec<u8>> = (target.seeds)();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut seen: HashSet<u64> = HashSet::new();
    let mut findings: Vec<Finding> = Vec::new();
    let mut execs = 0u64;
    let deadline = t0 + budget;
    let mut queue: Vec<Vec<u8>> = corpus.clone();
    while Instant::now() < deadline && !watchdog.is_finished() {
        let input = match queue.pop() {
            Some(seed_input) => seed_input,
            None => {
                let base = &corpus[rng.usize(..corpus.len())];
                let other = &corpus[rng.usize(..corpus.len())];
                mutate(&mut rng, base, other, target.dict)
            }
        };
        if let Ok(mut c) = current.lock() {
            c.clone_from(&input);
        }
        started_at.store(t0.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (target.exec)(&input)));
        started_at.store(0, Ordering::Relaxed);
        execs += 1;
        match outcome {
            Ok(sig) => {
                if seen.insert(sig) && corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                }
            }
            Err(_) => {
                let what = PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "panic".into());
                // One finding per place: the message may quote the input.
                let place = |w: &str| w.rsplit_once(" at ").map(|(_, at)| at.to_owned());
                let key = place(&what);
                if !findings
                    .iter()
                    .any(|f| f.what == what || (key.is_some() && place(&f.what) == key))
                {
                    findings.push(Finding { what, input });
                }
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let hung = if watchdog.is_finished() {
        watchdog.join().ok().flatten()
    } else {
        // Not joined if an input is still running: that thread is stuck.
        None
    };
    findings.extend(hung);
    std::panic::set_hook(previous);
    Report {
        target: target.name,
        execs,
        elapsed: t0.elapsed(),
        corpus: corpus.len(),
        signatures: seen.len(),
        findings,
    }
}

/// Integers that find off-by-ones and overflows, big- and little-endian.
const INTERESTING: &[u32] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

fn mutate(rng: &mut fastrand::Rng, base: &[u8], other: &[u8], dict: &[&[u8]]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.usize(..4) {
        match rng.u8(..10) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] = rng.u8(..);
            }
            2 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                let n = rng.usize(1..=(v.len() - i).min(16));
                v.drain(i..i + n);
            }
            3 => {
                let i = rng.usize(..=v.len());
                let n = rng.usize(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                v.splice(i..i, bytes);
            }
            4 | 5 if !dict.is_empty() => {
                let tok = dict[rng.usize(..dict.len())];
                let i = rng.usize(..=v.len());
                if rng.bool() || v.is_empty() {
                    v.splice(i..i, tok.iter().copied());
                } else {
                    let end = (i + tok.len()).min(v.len());
                    v.splice(i..end, tok.iter().copied());
                }
            }
            6 => {
                let n = INTERESTING[rng.usize(..INTERESTING.len())];
                let width = [1usize, 2, 4][rng.usize(..3)];
                let bytes = if rng.bool() {
                    n.to_be_bytes()
                } else {
                    n.to_le_bytes()
                };
                let bytes = if rng.bool() {
                    bytes[4 - width..].to_vec()
                } else {
                    bytes[..width].to_vec()
                };
                let i = rng.usize(..=v.len());
                let end = (i + width).min(v.len());
                v.splice(i..end, bytes);
            }
            7 if !other.is_empty() => {
                // Splice: a head of this one, a tail of another.
                let cut = rng.usize(..=v.len());
                let from = rng.usize(..other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            8 if !v.is_empty() => {
                // Repeat a chunk (deep nesting, long runs).
                let i = rng.usize(..v.len());
                let n = rng.usize(1..=(v.len() - i).min(32));
                let chunk = v[i..i + n].to_vec();
                for _ in 0..rng.usize(1..=16) {
                    v.splice(i..i, chunk.iter().copied());
                }
            }
            9 if !v.is_empty() => {
                // A decimal number, as text (JSON and URLs carry them so).
                let n = match rng.u8(..4) {
                    0 => i64::from(i32::MIN).to_string(),
                    1 => u64::MAX.to_string(),
                    2 => rng.i64(..).to_string(),
                    _ => rng.u32(..).to_string(),
                };
                let i = rng.usize(..=v.len());
                v.splice(i..i, n.into_bytes());
            }
            _ => {}
        }
    }
    v.truncate(MAX_LEN);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panics_on_boom(input: &[u8]) -> u64 {
        assert!(!input.windows(4).any(|w| w == b"boom"), "found the boom");
        input.len() as u64
    }

    #[test]
    fn the_engine_finds_a_planted_bug() {
        let t = Target {
            name: "planted",
            about: "panics when the input holds `boom`",
            seeds: || vec![b"hello world".to_vec()],
            dict: &[b"boo", b"m"],
            exec: panics_on_boom,
        };
        let r = run(&t, Duration::from_secs(5), 7);
        assert!(r.execs > 1000, "{r:?}");
        assert_eq!(r.findings.len(), 1, "{r:?}");
        assert!(r.findings[0].what.contains("found the boom"));
        assert!(r.findings[0].input.windows(4).any(|w| w == b"boom"));
    }
}
