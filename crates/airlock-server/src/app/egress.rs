//! Egress: every byte a sandbox sends leaves through its user's upstream proxy.
//! (Owned by the egress work; these hooks are what the lifecycle calls.)

use super::{App, AppError};
use crate::store::SandboxRow;
use airlock_drivers::Lease;

/// Per-sandbox forward proxies and the upstream settings they use.
#[derive(Debug, Default)]
pub struct EgressState {}

impl App {
    /// The egress settings injected into a new sandbox's metadata, and the
    /// gateway port its firewall lets through; `None`: no egress at all.
    pub(crate) async fn egress_for(
        &self,
        _row: &SandboxRow,
        _lease: &Lease,
    ) -> Result<Option<(airlock_proto::metadata::Egress, u16)>, AppError> {
        Ok(None)
    }

    /// After the driver made the sandbox's link: start its forward proxy.
    pub(crate) async fn egress_attach(
        &self,
        _row: &SandboxRow,
        _lease: &Lease,
    ) -> Result<(), AppError> {
        Ok(())
    }

    /// On teardown: stop the sandbox's forward proxy.
    pub(crate) async fn egress_detach(&self, _id: &str) {}
}
