//! Many hosts (docs/cluster.md). PostgreSQL is the only coordinator:
//! - nodes register in `nodes` and renew a lease ([`node`]);
//! - a replica places each new sandbox on a node and routes every later
//!   call for it there ([`router::Cluster`], [`placement`]);
//! - exactly one process (the holder of an advisory lock) reaps, supervises,
//!   refills pools, and fails the sandboxes of a node whose lease ran out
//!   ([`duties`]).
//!
//! One host stays the default: SQLite and a node in the process, where this
//! module's only part is that the one process always leads.

pub mod duties;
pub mod node;
pub mod placement;
pub mod replica;
pub mod router;

#[cfg(test)]
mod tests;
