//! Firecracker's HTTP API over its Unix socket: the request bodies the driver
//! sends (as typed values, one per definition of the API description), the
//! requests themselves, and a client behind [`ApiClient`] so driver logic runs
//! against [`FakeApi`] in unit tests. Every body built here is checked against
//! Firecracker's own API description in this crate's tests.
//!
//! Firecracker answers a refused request with `{"fault_message": "…"}`; that
//! text is kept verbatim in [`ApiError::Fault`], so it reaches the sandbox's
//! failure reason unchanged.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// `PUT /machine-config`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    pub smt: bool,
    /// Needed for diff snapshots; full snapshots (the pool's) do without.
    pub track_dirty_pages: bool,
}

/// `PUT /boot-source`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    pub boot_args: String,
}

/// `PUT /drives/{drive_id}` (a virtio-block drive backed by a file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// `PUT /network-interfaces/{iface_id}`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

/// `PUT /vsock`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

/// `PUT /mmds/config`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MmdsConfig {
    pub version: MmdsVersion,
    pub network_interfaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MmdsVersion {
    V1,
    V2,
}

/// `PUT /actions`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vm {
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PUT /snapshot/create`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotCreateParams {
    pub snapshot_type: SnapshotType,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/load`
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    pub resume_vm: bool,
    /// The restored VM's own TAP instead of the one the snapshot was taken with.
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// One API request: method, path and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

impl std::fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method.as_str(), self.path)
    }
}

fn body(value: &impl Serialize) -> Option<serde_json::Value> {
    // Serialising these plain structs cannot fail.
    Some(serde_json::to_value(value).unwrap_or(serde_json::Value::Null))
}

impl ApiRequest {
    fn new(method: Method, path: impl Into<String>, value: &impl Serialize) -> Self {
        ApiRequest {
            method,
            path: path.into(),
            body: body(value),
        }
    }
    pub fn machine_config(c: &MachineConfiguration) -> Self {
        Self::new(Method::Put, "/machine-config", c)
    }
    pub fn boot_source(b: &BootSource) -> Self {
        Self::new(Method::Put, "/boot-source", b)
    }
    pub fn drive(d: &Drive) -> Self {
        Self::new(Method::Put, format!("/drives/{}", d.drive_id), d)
    }
    pub fn network_interface(n: &NetworkInterface) -> Self {
        Self::new(
            Method::Put,
            format!("/network-interfaces/{}", n.iface_id),
            n,
        )
    }
    pub fn vsock(v: &Vsock) -> Self {
        Self::new(Method::Put, "/vsock", v)
    }
    pub fn mmds_config(c: &MmdsConfig) -> Self {
        Self::new(Method::Put, "/mmds/config", c)
    }
    /// `PUT /mmds`: the whole data store (the guest reads `/airlock/metadata`).
    pub fn mmds_put(contents: &serde_json::Value) -> Self {
        Self::new(Method::Put, "/mmds", contents)
    }
    pub fn action(action_type: ActionType) -> Self {
        Self::new(Method::Put, "/actions", &InstanceActionInfo { action_type })
    }
    pub fn vm_state(state: VmState) -> Self {
        Self::new(Method::Patch, "/vm", &Vm { state })
    }
    pub fn snapshot_create(p: &SnapshotCreateParams) -> Self {
        Self::new(Method::Put, "/snapshot/create", p)
    }
    pub fn snapshot_load(p: &SnapshotLoadParams) -> Self {
        Self::new(Method::Put, "/snapshot/load", p)
    }
    pub fn describe_instance() -> Self {
        ApiRequest {
            method: Method::Get,
            path: "/".into(),
            body: None,
        }
    }
}

/// The MMDS data store for a sandbox: its metadata document under
/// `/airlock/metadata`, where the agent asks for it.
pub fn mmds_contents(metadata: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "airlock": { "metadata": metadata } })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiReply {
    pub status: u16,
    pub body: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("could not reach Firecracker's API socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker's API did not answer {request} within {0:?}", .timeout)]
    Timeout { request: String, timeout: Duration },
    #[error("malformed answer from Firecracker's API to {request}: {problem}")]
    Malformed { request: String, problem: String },
    /// Firecracker refused the request; `fault_message` is its text, verbatim.
    #[error("Firecracker refused {request} ({status}): {fault_message}")]
    Fault {
        request: String,
        status: u16,
        fault_message: String,
    },
}

impl ApiError {
    /// Turn a non-2xx reply into a fault carrying Firecracker's message as is.
    pub fn from_reply(request: &ApiRequest, reply: &ApiReply) -> ApiError {
        #[derive(Deserialize)]
        struct Fault {
            fault_message: String,
        }
        let fault_message = serde_json::from_str::<Fault>(&reply.body)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| reply.body.trim().to_owned());
        ApiError::Fault {
            request: request.to_string(),
            status: reply.status,
            fault_message,
        }
    }
}

/// Sends requests to one Firecracker process's API socket.
#[async_trait]
pub trait ApiClient: Send + Sync + std::fmt::Debug + 'static {
    async fn send(&self, socket: &Path, request: &ApiRequest) -> Result<ApiReply, ApiError>;

    /// Send, and turn any non-2xx answer into [`ApiError::Fault`].
    async fn call(&self, socket: &Path, request: &ApiRequest) -> Result<ApiReply, ApiError> {
        let reply = self.send(socket, request).await?;
        if (200..300).contains(&reply.status) {
            Ok(reply)
        } else {
            Err(ApiError::from_reply(request, &reply))
        }
    }
}

/// HTTP/1.1 over the Unix socket, one connection per request (a handful of
/// requests per VM: connection reuse would save nothing measurable).
#[derive(Debug, Clone)]
pub struct UnixApi {
    pub timeout: Duration,
}

impl Default for UnixApi {
    fn default() -> Self {
        UnixApi {
            timeout: Duration::from_secs(10),
        }
    }
}

#[async_trait]
impl ApiClient for UnixApi {
    async fn send(&self, socket: &Path, request: &ApiRequest) -> Result<ApiReply, ApiError> {
        let exchange = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|source| ApiError::Connect {
                    socket: socket.to_owned(),
                    source,
                })?;
            let body = request
                .body
                .as_ref()
                .map(serde_json::Value::to_string)
                .unwrap_or_default();
            let mut head = format!(
                "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
                request.method.as_str(),
                request.path
            );
            if request.body.is_some() {
                head.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                ));
            }
            head.push_str("\r\n");
            let io = |source| ApiError::Connect {
                socket: socket.to_owned(),
                source,
            };
            stream.write_all(head.as_bytes()).await.map_err(io)?;
            stream.write_all(body.as_bytes()).await.map_err(io)?;
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                if let Some(reply) = parse_reply(&raw, request)? {
                    return Ok(reply);
                }
                let n = stream.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return parse_reply(&raw, request)?.ok_or_else(|| ApiError::Malformed {
                        request: request.to_string(),
                        problem: "connection closed before a full answer".into(),
                    });
                }
                raw.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                request: request.to_string(),
                timeout: self.timeout,
            })?
    }
}

/// A full reply once `raw` holds one; `None` while more bytes are needed.
fn parse_reply(raw: &[u8], request: &ApiRequest) -> Result<Option<ApiReply>, ApiError> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let malformed = |problem: &str| ApiError::Malformed {
        request: request.to_string(),
        problem: problem.to_owned(),
    };
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| malformed("header is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status line"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| malformed("bad Content-Length"))?
        .unwrap_or(0);
    let body = &raw[end + 4..];
    if body.len() < length {
        return Ok(None);
    }
    Ok(Some(ApiReply {
        status,
        body: String::from_utf8_lossy(&body[..length]).into_owned(),
    }))
}

/// A recording fake: every request is kept; a request whose `METHOD path`
/// starts with a configured prefix gets the configured fault.
#[derive(Debug, Default)]
pub struct FakeApi {
    pub requests: Mutex<Vec<(PathBuf, ApiRequest)>>,
    faults: Mutex<Vec<(String, u16, String)>>,
}

impl FakeApi {
    pub fn fault_on(&self, request_prefix: &str, status: u16, fault_message: &str) {
        if let Ok(mut f) = self.faults.lock() {
            f.push((request_prefix.to_owned(), status, fault_message.to_owned()));
        }
    }
    pub fn sent(&self) -> Vec<ApiRequest> {
        self.requests
            .lock()
            .map(|r| r.iter().map(|(_, req)| req.clone()).collect())
            .unwrap_or_default()
    }
}

#[async_trait]
impl ApiClient for FakeApi {
    async fn send(&self, socket: &Path, request: &ApiRequest) -> Result<ApiReply, ApiError> {
        if let Ok(mut r) = self.requests.lock() {
            r.push((socket.to_owned(), request.clone()));
        }
        let line = request.to_string();
        let fault = self.faults.lock().ok().and_then(|f| {
            f.iter()
                .find(|(prefix, _, _)| line.starts_with(prefix.as_str()))
                .cloned()
        });
        Ok(match fault {
            Some((_, status, message)) => ApiReply {
                status,
                body: serde_json::json!({ "fault_message": message }).to_string(),
            },
            None => ApiReply {
                status: 204,
                body: String::new(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> ApiRequest {
        ApiRequest::action(ActionType::InstanceStart)
    }

    #[test]
    fn replies_are_parsed_whole_or_not_at_all() {
        let r = put();
        assert_eq!(
            parse_reply(b"HTTP/1.1 204 No Content\r\n", &r).expect("ok"),
            None
        );
        let reply = parse_reply(
            b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n",
            &r,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(reply.status, 204);
        let partial = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 30\r\n\r\n{\"fault_message\"";
        assert_eq!(parse_reply(partial, &r).expect("ok"), None);
        let full =
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n\r\n{\"fault_message\":\"nope\"}";
        let reply = parse_reply(full, &r).expect("ok").expect("complete");
        assert_eq!(reply.status, 400);
        assert!(parse_reply(b"garbage\r\n\r\n", &r).is_err());
    }

    #[test]
    fn faults_keep_firecracker_words_verbatim() {
        let reply = ApiReply {
            status: 400,
            body: r#"{"fault_message":"Start microvm error: Cannot start microvm without kernel configuration."}"#
                .into(),
        };
        let err = ApiError::from_reply(&put(), &reply);
        assert_eq!(
            err.to_string(),
            "Firecracker refused PUT /actions (400): Start microvm error: Cannot start microvm without kernel configuration."
        );
    }

    #[tokio::test]
    async fn the_real_client_speaks_http_over_a_unix_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = vec![0u8; 4096];
            let n = s.read(&mut got).await.expect("read");
            s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 25\r\n\r\n{\"fault_message\":\"bad!\"}\n")
                .await
                .expect("write");
            String::from_utf8_lossy(&got[..n]).into_owned()
        });
        let err = UnixApi::default()
            .call(&sock, &put())
            .await
            .expect_err("fault");
        assert!(err.to_string().ends_with("(400): bad!"), "{err}");
        let request = server.await.expect("server");
        assert!(
            request.starts_with("PUT /actions HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.ends_with("{\"action_type\":\"InstanceStart\"}"),
            "{request}"
        );
    }
}
