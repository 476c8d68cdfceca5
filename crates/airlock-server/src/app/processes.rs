//! Processes and files in a user's sandbox, through its agent: who may (the
//! owner, of a ready sandbox), what is passed on (checked requests), and how
//! the agent's refusals become API errors. The wire types are in
//! `airlock_proto::process`; the agent does the work.

use super::agent::AgentError;
use super::{App, AppError};
use crate::store::UserRow;
use airlock_proto::process::{FileInfo, ProcessInfo, ProcessList, StartProcess, MAX_FILE_BYTES};
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The longest path a file request may name.
const MAX_PATH: usize = 4096;
/// Frames queued each way between a client's socket and the agent's.
const IO_QUEUE: usize = 64;
/// An upload must be whole within this (64 MiB needs about 220 kB/s); a
/// download's head must come within it. The agent's other calls are quick.
const FILE_TIMEOUT: Duration = Duration::from_secs(300);
/// A download stalls when the agent sends nothing for this long.
const DOWNLOAD_IDLE: Duration = Duration::from_secs(60);

/// One frame of a process's io socket (see `airlock_proto::process`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoFrame {
    Binary(bytes::Bytes),
    Text(String),
    Close(u16, String),
}

/// An attached process: frames to send to it, frames it sent. Dropping
/// `to_guest` detaches (the process goes on).
#[derive(Debug)]
pub struct ProcessIo {
    pub to_guest: mpsc::Sender<IoFrame>,
    pub from_guest: mpsc::Receiver<IoFrame>,
}

/// A file's bytes or a directory's tar stream, as the agent sends it.
pub struct Download {
    pub content_type: String,
    pub body: axum::body::Body,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

/// What an agent's refusal means to the API caller; `what` names the object
/// for a 404.
pub(crate) fn refused(e: AgentError, what: &str) -> AppError {
    match e {
        AgentError::Status { status, message } => match status {
            400 => AppError::BadInput(message),
            403 => AppError::Forbidden(message),
            413 => AppError::TooLarge(message),
            404 => AppError::NotFound(what.to_owned()),
            409 | 429 => AppError::Conflict(message),
            _ => AppError::Unavailable(format!("the sandbox's agent answered {status}: {message}")),
        },
        other => AppError::Unavailable(other.to_string()),
    }
}

fn check_path(path: &str) -> Result<(), AppError> {
    if path.is_empty() || path.len() > MAX_PATH || path.contains('\0') {
        return Err(AppError::BadInput(format!(
            "path must be 1–{MAX_PATH} bytes without NUL"
        )));
    }
    Ok(())
}

impl App {
    /// The agent of `user`'s ready sandbox `id`, and its token.
    async fn agent_of(&self, user: &UserRow, id: &str) -> Result<(SocketAddr, String), AppError> {
        let row = self.sandbox_of(user, id).await?;
        let endpoints = self.ready_endpoints(&row).await?;
        self.note_activity(id).await;
        Ok((endpoints.agent, row.agent_token))
    }

    pub async fn start_process(
        &self,
        user: &UserRow,
        id: &str,
        req: StartProcess,
    ) -> Result<ProcessInfo, AppError> {
        req.check().map_err(AppError::BadInput)?;
        let (agent, token) = self.agent_of(user, id).await?;
        self.guest
            .process_start(agent, &token, &req)
            .await
            .map_err(|e| refused(e, &format!("sandbox {id:?}")))
    }

    pub async fn processes(&self, user: &UserRow, id: &str) -> Result<ProcessList, AppError> {
        let (agent, token) = self.agent_of(user, id).await?;
        self.guest
            .process_list(agent, &token)
            .await
            .map_err(|e| refused(e, &format!("sandbox {id:?}")))
    }

    pub async fn process(
        &self,
        user: &UserRow,
        id: &str,
        pid: u32,
    ) -> Result<ProcessInfo, AppError> {
        let (agent, token) = self.agent_of(user, id).await?;
        self.guest
            .process_get(agent, &token, pid)
            .await
            .map_err(|e| refused(e, &format!("process {pid} in sandbox {id:?}")))
    }

    pub async fn kill_process(
        &self,
        user: &UserRow,
        id: &str,
        pid: u32,
        signal: Option<&str>,
    ) -> Result<ProcessInfo, AppError> {
        if let Some(s) = signal {
            if airlock_proto::process::signal_number(s).is_none() {
                return Err(AppError::BadInput(format!(
                    "unknown signal {s:?} (INT, TERM, KILL, HUP, QUIT, USR1, USR2, WINCH, CONT, STOP)"
                )));
            }
        }
        let (agent, token) = self.agent_of(user, id).await?;
        self.guest
            .process_kill(agent, &token, pid, signal)
            .await
            .map_err(|e| refused(e, &format!("process {pid} in sandbox {id:?}")))
    }

    /// Attaches to a process; checked before the client's socket is upgraded.
    pub async fn attach_process(
        &self,
        user: &UserRow,
        id: &str,
        pid: u32,
        offset: u64,
    ) -> Result<ProcessIo, AppError> {
        let (agent, token) = self.agent_of(user, id).await?;
        self.guest
            .process_io(agent, &token, pid, offset)
            .await
            .map_err(|e| refused(e, &format!("process {pid} in sandbox {id:?}")))
    }

    /// Writes `body` to `path` as it arrives (nothing is held here);
    /// `announced` is the request's Content-Length, if it said one.
    pub async fn put_file(
        &self,
        user: &UserRow,
        id: &str,
        path: &str,
        announced: Option<u64>,
        body: axum::body::Body,
    ) -> Result<FileInfo, AppError> {
        check_path(path)?;
        let too_large = || {
            AppError::TooLarge(format!(
                "{path}: larger than {} MiB, the most a file may be",
                MAX_FILE_BYTES >> 20
            ))
        };
        if announced.is_some_and(|n| n > MAX_FILE_BYTES as u64) {
            return Err(too_large());
        }
        let (agent, token) = self.agent_of(user, id).await?;
        let (body, over) = capped(body, MAX_FILE_BYTES as u64);
        let answer = self.guest.file_put(agent, &token, path, body).await;
        // Past the cap the body fails, the upload to the agent breaks off
        // (and the agent removes what it had written): say why.
        if over.load(Ordering::SeqCst) {
            return Err(too_large());
        }
        answer.map_err(|e| refused(e, &format!("{path:?} in sandbox {id:?}")))
    }

    pub async fn get_file(
        &self,
        user: &UserRow,
        id: &str,
        path: &str,
    ) -> Result<Download, AppError> {
        check_path(path)?;
        let (agent, token) = self.agent_of(user, id).await?;
        self.guest
            .file_get(agent, &token, path)
            .await
            .map_err(|e| refused(e, &format!("{path:?} in sandbox {id:?}")))
    }
}

/// `s` escaped for a query string.
pub(crate) fn query_escape(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Opens the agent's io socket for `pid` and pumps it into a [`ProcessIo`].
pub(crate) async fn connect_io(
    agent: SocketAddr,
    token: &str,
    pid: u32,
    offset: u64,
) -> Result<ProcessIo, AgentError> {
    let url = format!("ws://{agent}/processes/{pid}/io?offset={offset}");
    let mut req = url
        .into_client_request()
        .map_err(|e| AgentError::Down(format!("bad guest address: {e}")))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| AgentError::Down("the agent token is not a valid header".into()))?;
    req.headers_mut().insert("Authorization", bearer);
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let connect = tokio_tungstenite::connect_async_with_config(req, Some(config), true);
    let socket = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok((s, _))) => s,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let message = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<airlock_proto::agent::AgentError>(b).ok())
                .map(|e| e.error)
                .unwrap_or_else(|| resp.status().to_string());
            return Err(AgentError::Status {
                status: resp.status().as_u16(),
                message,
            });
        }
        Ok(Err(e)) => return Err(AgentError::Down(e.to_string())),
        Err(_) => return Err(AgentError::Down("the agent did not answer in time".into())),
    };
    let (mut sink, mut stream) = socket.split();
    let (to_guest, mut outbound) = mpsc::channel::<IoFrame>(IO_QUEUE);
    let (inbound, from_guest) = mpsc::channel::<IoFrame>(IO_QUEUE);
    tokio::spawn(async move {
        while let Some(frame) = outbound.recv().await {
            let msg = match frame {
                IoFrame::Binary(b) => Message::Binary(b),
                IoFrame::Text(t) => Message::Text(t.into()),
                IoFrame::Close(..) => break,
            };
            if sink.send(msg).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let frame = match msg {
                Message::Binary(b) => IoFrame::Binary(b),
                Message::Text(t) => IoFrame::Text(t.as_str().to_owned()),
                Message::Close(c) => {
                    let (code, reason) = c
                        .map(|c| (u16::from(c.code), c.reason.as_str().to_owned()))
                        .unwrap_or((1000, String::new()));
                    let _ = inbound.send(IoFrame::Close(code, reason)).await;
                    return;
                }
                _ => continue,
            };
            if inbound.send(frame).await.is_err() {
                return;
            }
        }
        let _ = inbound
            .send(IoFrame::Close(1011, "the agent's socket ended".into()))
            .await;
    });
    Ok(ProcessIo {
        to_guest,
        from_guest,
    })
}

fn files_url(agent: SocketAddr, path: &str) -> String {
    format!("http://{agent}/files?path={}", query_escape(path))
}

/// `body` that fails once more than `cap` bytes came through; the flag
/// says it did.
fn capped(body: axum::body::Body, cap: u64) -> (axum::body::Body, Arc<AtomicBool>) {
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    let mut seen = 0u64;
    let chunks = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > cap {
            flag.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other("the file is larger than allowed"));
        }
        Ok(chunk)
    });
    (axum::body::Body::from_stream(chunks), over)
}

/// Chunks of an upload in flight between the caller's body and the agent's
/// request: the body is read only as fast as the agent takes it.
const UPLOAD_QUEUE: usize = 4;

/// A request body fed through a channel, chunk by chunk, for the HTTP
/// client (which asks of a body that it can be shared across threads; a
/// caller's streaming body cannot). An error sent ends the request.
#[derive(Debug)]
pub struct UploadBody(mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);

impl UploadBody {
    /// The sender to feed, and the body; at most `depth` chunks wait.
    pub fn channel(depth: usize) -> (mpsc::Sender<Result<Vec<u8>, std::io::Error>>, UploadBody) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, UploadBody(rx))
    }
}

impl hyper::body::Body for UploadBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|c| c.map(|v| hyper::body::Frame::data(bytes::Bytes::from(v)))))
    }
}

pub(crate) async fn put_file(
    client: &super::agent::AgentClient,
    agent: SocketAddr,
    token: &str,
    path: &str,
    body: axum::body::Body,
) -> Result<FileInfo, AgentError> {
    let (tx, upload) = UploadBody::channel(UPLOAD_QUEUE);
    let pump = tokio::spawn(async move {
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map(Vec::from).map_err(std::io::Error::other);
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    let sent = client
        .http
        .put(files_url(agent, path))
        .bearer_auth(token)
        .timeout(FILE_TIMEOUT)
        .body(reqwest::Body::wrap(upload))
        .send()
        .await;
    pump.abort();
    super::agent::decode(sent.map_err(AgentError::Unreachable)?).await
}

pub(crate) async fn get_file(
    client: &super::agent::AgentClient,
    agent: SocketAddr,
    token: &str,
    path: &str,
) -> Result<Download, AgentError> {
    // No limit on the whole download (a large tar to a slow client takes
    // its time): the answer's head must come within FILE_TIMEOUT, and then
    // each chunk within DOWNLOAD_IDLE of being asked for.
    let sent = client
        .http
        .get(files_url(agent, path))
        .bearer_auth(token)
        .send();
    let resp = tokio::time::timeout(FILE_TIMEOUT, sent)
        .await
        .map_err(|_| AgentError::Down("the agent did not answer in time".into()))?
        .map_err(AgentError::Unreachable)?;
    if !resp.status().is_success() {
        return Err(super::agent::decode::<serde_json::Value>(resp)
            .await
            .err()
            .unwrap_or(AgentError::Down("an error without a status".into())));
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let chunks = futures::stream::unfold(Some(resp), |resp| async move {
        let mut resp = resp?;
        match tokio::time::timeout(DOWNLOAD_IDLE, resp.chunk()).await {
            Ok(Ok(Some(c))) => Some((Ok(c), Some(resp))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some((Err(std::io::Error::other(e)), None)),
            Err(_) => Some((
                Err(std::io::Error::other("the sandbox sent nothing for 60 s")),
                None,
            )),
        }
    });
    Ok(Download {
        content_type,
        body: axum::body::Body::from_stream(chunks),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_refusals_become_the_api_errors_they_mean() {
        let said = |status| AgentError::Status {
            status,
            message: format!("said {status}"),
        };
        assert!(matches!(refused(said(400), "x"), AppError::BadInput(m) if m == "said 400"));
        assert!(matches!(refused(said(403), "x"), AppError::Forbidden(m) if m == "said 403"));
        assert!(matches!(refused(said(413), "x"), AppError::TooLarge(_)));
        assert!(
            matches!(refused(said(404), "file \"a\""), AppError::NotFound(m) if m == "file \"a\"")
        );
        // Too many processes running (an /exec too): try again later.
        assert!(matches!(refused(said(429), "x"), AppError::Conflict(_)));
        assert!(matches!(refused(said(409), "x"), AppError::Conflict(_)));
        assert!(matches!(refused(said(500), "x"), AppError::Unavailable(m) if m.contains("500")));
        assert!(matches!(
            refused(AgentError::Down("refused".into()), "x"),
            AppError::Unavailable(_)
        ));
    }

    async fn drain(body: axum::body::Body) -> (usize, bool) {
        let mut chunks = body.into_data_stream();
        let mut n = 0;
        while let Some(c) = chunks.next().await {
            match c {
                Ok(c) => n += c.len(),
                Err(_) => return (n, true),
            }
        }
        (n, false)
    }

    #[tokio::test]
    async fn an_upload_passes_whole_up_to_the_cap_and_fails_past_it() {
        let body = |n: usize| {
            axum::body::Body::from_stream(futures::stream::iter(
                (0..n).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 1000]))),
            ))
        };
        let (capped_body, over) = capped(body(10), 10_000);
        assert_eq!(drain(capped_body).await, (10_000, false));
        assert!(!over.load(Ordering::SeqCst));
        let (capped_body, over) = capped(body(11), 10_000);
        assert_eq!(drain(capped_body).await, (10_000, true));
        assert!(over.load(Ordering::SeqCst));
    }
}
