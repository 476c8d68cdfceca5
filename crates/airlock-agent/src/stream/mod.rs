//! The guest side of the video link ([`airlock_proto::stream`]): the route the
//! control plane opens, and the `capture` program behind it.
//!
//! ```text
//!  control plane ══ WebSocket ══▶ agent `serve` (root)         route.rs
//!                                   │ stdin: Control lines
//!                                   │ stdout: framed info + frames    wire.rs
//!                                   ▼
//!                                 `capture` (desktop user)      capture.rs
//!                                   ├─ DAMAGE + MIT-SHM: pixels   grab.rs
//!                                   ├─ XFixes: pointer picture    cursor.rs
//!                                   ├─ selections: clipboard      clipboard.rs
//!                                   ├─ RandR: fit to the viewer   display.rs
//!                                   ├─ GStreamer: → H.264         encoder.rs
//!                                   └─ XTest: pointer, keys       input.rs
//! ```
//!
//! Capture runs in a child process as the desktop user: the agent itself
//! stays root and never links its own state to the display server, and a
//! crash in GStreamer ends one stream, not the agent.

pub mod capture;
pub mod clipboard;
pub mod cursor;
pub mod display;
pub mod encoder;
pub mod grab;
pub mod input;
pub mod route;
pub mod wire;
