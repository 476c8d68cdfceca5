//! Fuzzing the parsers that hostile bytes reach, on stable Rust.
//!
//! Each [`Target`] takes arbitrary bytes, feeds them to one parser, and
//! checks what must hold whatever the input (no panic, and the target's own
//! invariants: round trips, bounds). The engine (engine.rs) is mutational
//! and coverage-free: it starts from a corpus of valid inputs, mutates them
//! with a fast PRNG (bit flips, interesting integers, dictionary tokens,
//! splices), and keeps an input that produced an outcome not seen before
//! (targets return a small signature of what the parser decided), so the
//! corpus walks into the parser's branches without compiler instrumentation.
//!
//! Why not libFuzzer or AFL: both need the compiler to instrument every
//! crate (`cargo fuzz` a nightly toolchain, `cargo afl` its own LLVM build);
//! this one runs with the toolchain CI already has, from `airlock-bench fuzz`
//! and from a test, in seconds.

mod engine;
mod targets;

pub use engine::{run, Finding, Report};
pub use targets::{all, by_name};

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    /// What it feeds, for people.
    pub about: &'static str,
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens worth inserting (keywords, separators, magic bytes).
    pub dict: &'static [&'static [u8]],
    /// Run one input. Panics on a finding; returns a signature of the
    /// outcome (which error, which branch) to steer the corpus.
    pub exec: fn(&[u8]) -> u64,
}
