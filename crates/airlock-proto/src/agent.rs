//! The agent's HTTP API (`http://GUEST:7000`, bearer token from the metadata).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `GET /health`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub sandbox_id: String,
    /// Build id of the golden image the guest booted from.
    pub image_build_id: String,
    pub uptime_s: u64,
}

/// `POST /exec`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds before the process is killed; the agent caps it at [`MAX_EXEC_TIMEOUT_S`].
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

pub const DEFAULT_EXEC_TIMEOUT_S: u64 = 30;
pub const MAX_EXEC_TIMEOUT_S: u64 = 600;
/// Output beyond this many bytes per stream is cut off (and `truncated` set).
pub const MAX_EXEC_OUTPUT: usize = 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecResponse {
    /// `None` when the process was killed by a signal or by the timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub truncated: bool,
}

/// The body of every non-2xx answer from the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentError {
    pub error: String,
}

/// `PUT /session` (and `GET /session`): who a sandbox handed out from a warm
/// pool now belongs to. The control plane sends it once, right after the
/// claim; the agent keeps it and refuses a second owner (a pool member is
/// handed out at most once). A sandbox created for its user has none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Session {
    /// Must be the agent's own sandbox: a session meant for another is refused.
    pub sandbox_id: String,
    pub user_id: String,
    pub user_name: String,
    /// When the claim was made, in ms since the Unix epoch.
    pub claimed_at_ms: i64,
}

/// The longest id or name a [`Session`] may carry.
pub const MAX_SESSION_FIELD: usize = 128;
