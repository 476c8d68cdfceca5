//! The host-side forward proxy: one listener per sandbox on its gateway
//! address, inside the control plane. It takes the sandbox's CONNECT and plain
//! HTTP requests, adds the user's upstream credentials, and relays them to the
//! user's upstream proxy; the credentials never enter the sandbox.

pub mod guard;
pub mod proxy;
pub mod upstream;

pub use guard::{Guard, Refusal};
pub use proxy::{serve, ProxyConfig, RefusedLabel, Resolve, Stats};
/// Re-exported so the CLI hands passwords over without a plain `String` API.
pub use secrecy::{ExposeSecret, SecretString};
pub use upstream::{Upstream, UpstreamError};

/// The port of every sandbox's forward proxy, on its own gateway address.
pub const PROXY_PORT: u16 = 3128;

/// Destinations the guest's tools reach without the proxy (its own loopback).
pub const NO_PROXY: &str = "localhost,127.0.0.1,::1";
