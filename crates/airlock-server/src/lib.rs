//! The airlock control plane as a library: the `airlock` binary and the
//! integration tests both start it through [`Server`].

pub mod app;
pub mod cluster;
pub mod config;
pub mod egress;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod node;
pub mod recording;
pub mod relay;
pub mod server;
pub mod store;
pub mod vault;
pub mod webrtc;

pub use config::Config;
