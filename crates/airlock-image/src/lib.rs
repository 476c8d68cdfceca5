//! The golden image: a stack of content-addressed, immutable layer directories
//! that the nspawn driver mounts as overlayfs lower layers (and that a VM
//! driver can flatten into an ext4 disk).
//!
//! ```text
//! <image dir>/
//!   layers/<name>-<digest16>/    one plain directory tree per layer; complete if present
//!   builds/<build id>/manifest.json
//!   current                      the build id in use
//!   tmp/                         layers being built, verification overlays
//! ```
//!
//! The recipe (`image/` in the source tree) is embedded in this crate, so the
//! binary that builds an image can also tell whether an existing one is stale.

mod error;
mod host;
pub mod inputs;
mod manifest;
pub mod mirror;
pub mod recipe;
mod store;
mod verify;
pub mod vm;

pub use error::ImageError;
pub use inputs::{expected_inputs, AGENT_INPUT};
pub use manifest::{LayerRecord, Manifest, StaleImage};
pub use store::{
    default_agent_bin, image_dir, BuildOptions, ImageStore, AGENT_BIN_ENV, IMAGE_DIR_ENV,
};
pub use verify::{CheckResult, VerifyReport};

use std::time::Duration;

/// How a build reports what it is doing; the CLI draws a progress bar from it.
pub trait Progress {
    /// A stage begins; `estimate` is how long it took last time (or a default).
    fn stage(&self, name: &str, estimate: Option<Duration>);
    /// A line of detail within the current stage.
    fn message(&self, msg: &str);
    /// The stage ended; `cached` when an existing result was reused.
    fn done(&self, name: &str, took: Duration, cached: bool);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: &str, _: Option<Duration>) {}
    fn message(&self, _: &str) {}
    fn done(&self, _: &str, _: Duration, _: bool) {}
}
