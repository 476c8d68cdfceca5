//! Per-sandbox packet filtering (nftables): the host may reach the guest's
//! agent and VNC ports; the guest may reach only its gateway's proxy port.
//! (Owned by the egress work: `install` and `remove` are the driver's hooks.)

use crate::host::{Host, HostError};
use crate::net::link::LinkNames;
use crate::Lease;

/// Install the sandbox's rules, atomically. `proxy_port: None` lets nothing out.
pub async fn install(
    _host: &dyn Host,
    _names: &LinkNames,
    _lease: &Lease,
    _proxy_port: Option<u16>,
) -> Result<(), HostError> {
    Ok(())
}

/// Remove the sandbox's rules; missing rules are not an error.
pub async fn remove(_host: &dyn Host, _names: &LinkNames) {}
