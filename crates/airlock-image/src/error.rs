//! The one error type of this crate. Messages give the context; the cause sits
//! in `source` and is not repeated.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}) while {doing}; last output:\n{tail}")]
    Command {
        program: String,
        doing: String,
        status: String,
        tail: String,
    },
    #[error("could not start {program} while {doing}")]
    Spawn {
        program: String,
        doing: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent binary is missing at {0} (build it with `cargo build --release -p airlock-agent`, or set AIRLOCK_AGENT_BIN)")]
    AgentMissing(PathBuf),
    #[error("image recipe problem: {0}")]
    Recipe(String),
    #[error("manifest {path} is unreadable")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no Debian mirror: {0}")]
    Mirror(String),
    #[error("building the image needs root (mmdebstrap, overlay mounts, systemd-nspawn)")]
    NotRoot,
    #[error("image {build_id} failed verification: {failures}")]
    VerifyFailed { build_id: String, failures: String },
    #[error(
        "not enough disk space for {what}: it needs about {need_mib} MiB in {}, \
         {free_mib} MiB are free (`airlock image prune` removes builds no sandbox uses)",
        dir.display()
    )]
    NoSpace {
        what: String,
        dir: PathBuf,
        need_mib: u64,
        free_mib: u64,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}
