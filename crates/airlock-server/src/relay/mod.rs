//! The viewer relay: a browser's WebSocket carrying binary RFB, joined to the
//! guest's VNC server. The relay authenticates to the guest itself (VncAuth
//! with the per-sandbox secret) and offers the browser security type None, so
//! the secret never leaves the host.

pub mod gate;
pub mod readonly;
pub mod rfb;
pub mod ws;
