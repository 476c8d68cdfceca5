//! Host networking for sandboxes: the address pool and the per-sandbox link
//! (a network namespace joined to the host by its own veth pair; no bridge).

pub mod firewall;
pub mod link;
pub mod pool;
pub mod tap;
