//! Host networking for sandboxes: the address pool and the per-sandbox link
//! (a network namespace joined to the host by its own veth pair, or a TAP in
//! the host's namespace; no bridge shared between sandboxes).

pub mod firewall;
pub mod link;
pub mod pool;
pub mod tap;
