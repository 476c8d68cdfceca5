//! The per-sandbox metadata document. It is injected by the driver (a read-only
//! file for nspawn, fw_cfg for QEMU, MMDS for Firecracker) and never baked into
//! the image. The agent reads it once at start.

use serde::{Deserialize, Serialize};

/// Where the nspawn driver places the metadata document inside the guest.
pub const NSPAWN_METADATA_PATH: &str = "/run/airlock/meta/metadata.json";

/// The fw_cfg file QEMU serves the document as (`-fw_cfg name=…`).
pub const FW_CFG_METADATA_NAME: &str = "opt/airlock/metadata";

/// On a guest's kernel command line: fw_cfg is there, read it over its I/O
/// ports (the QEMU driver adds it; no other guest is ever told to poke ports).
pub const FW_CFG_CMDLINE_FLAG: &str = "airlock.fw_cfg=ioport";

/// Everything a guest needs to know about itself.
///
/// `agent_token` and `vnc_password` are secrets: the document is readable by root
/// only inside the guest, and the type's `Debug` hides them.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub sandbox_id: String,
    pub kind: SandboxKind,
    /// Bearer token the control plane presents to the agent.
    pub agent_token: String,
    /// Password of the guest's VNC server (VncAuth uses at most 8 bytes).
    pub vnc_password: String,
    pub display: Display,
    pub network: Network,
    /// Upstream settings for the guest's processes; `None` means no egress at all.
    #[serde(default)]
    pub egress: Option<Egress>,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("sandbox_id", &self.sandbox_id)
            .field("kind", &self.kind)
            .field("agent_token", &"[redacted]")
            .field("vnc_password", &"[redacted]")
            .field("display", &self.display)
            .field("network", &self.network)
            .field("egress", &self.egress)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// Disposable: a login or a one-off browsing session.
    Browser,
    /// The user's long-lived CLI machine; its home lives on a persistent volume.
    Workspace,
}

impl SandboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxKind::Browser => "browser",
            SandboxKind::Workspace => "workspace",
        }
    }
}

impl std::str::FromStr for SandboxKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "browser" => Ok(SandboxKind::Browser),
            "workspace" => Ok(SandboxKind::Workspace),
            other => Err(UnknownKind(other.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown sandbox kind {0:?} (expected \"browser\" or \"workspace\")")]
pub struct UnknownKind(pub String);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Display {
    pub width: u32,
    pub height: u32,
}

impl Default for Display {
    fn default() -> Self {
        Display {
            width: 1280,
            height: 800,
        }
    }
}

/// The guest's side of its private link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The guest's own address, e.g. `10.231.0.2`.
    pub address: String,
    /// The host end of the link, e.g. `10.231.0.1`.
    pub gateway: String,
    pub prefix_len: u8,
}

/// How the guest's traffic leaves: through a forward proxy on its gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// `http://GATEWAY:PORT`, never with credentials.
    pub proxy_url: String,
    pub no_proxy: String,
}
