//! Types shared across the wire between the control plane and `airlock-agent`:
//! the per-sandbox metadata document, the agent's HTTP API, the video link of
//! the WebRTC path, and VNC authentication.

pub mod agent;
pub mod login;
pub mod metadata;
pub mod process;
pub mod stream;
pub mod vncauth;

/// TCP port the agent listens on inside every guest.
pub const AGENT_PORT: u16 = 7000;
/// TCP port the guest's VNC server listens on.
pub const VNC_PORT: u16 = 5900;
