//! The agent's process endpoints: `POST/GET /processes`, `GET/DELETE
//! /processes/{pid}`, and the `GET /processes/{pid}/io` WebSocket (its
//! messages are in `airlock_proto::process`).

use super::{Proc, ProcessError, Processes};
use crate::server::{error, AgentState};
use airlock_proto::process::{
    signal_number, IoControl, IoEvent, ProcessInfo, ProcessList, StartProcess, MAX_CONTROL_BYTES,
    MAX_STDIN_FRAME,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{
    close_code, rejection::WebSocketUpgradeRejection, CloseFrame, Message, WebSocket,
    WebSocketUpgrade,
};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;

pub fn routes() -> Router<Arc<AgentState>> {
    Router::new()
        .route("/processes", get(list).post(start))
        .route("/processes/{pid}", get(inspect).delete(kill))
        .route("/processes/{pid}/io", get(io))
        .merge(super::files::routes())
}

fn answer(e: ProcessError) -> Response {
    let status = match &e {
        ProcessError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ProcessError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        ProcessError::NotFound(_) => StatusCode::NOT_FOUND,
        ProcessError::Conflict(_) => StatusCode::CONFLICT,
        // The command cannot be started (not found, not executable, a bad
        // cwd): the caller's to fix.
        ProcessError::Spawn { .. } => StatusCode::BAD_REQUEST,
        ProcessError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, crate::chain(&e))
}

async fn start(
    State(state): State<Arc<AgentState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ProcessInfo>), Response> {
    let body = body.map_err(|r| error(r.status(), r.body_text()))?;
    let req: StartProcess = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid process request: {e}"),
        )
    })?;
    let program = req.argv.first().cloned().unwrap_or_default();
    let info = state.processes.start(req).map_err(answer)?;
    tracing::info!(pid = info.pid, program = %program, pty = info.pty.is_some(), "process started");
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list(State(state): State<Arc<AgentState>>) -> Json<ProcessList> {
    Json(ProcessList {
        processes: state.processes.list(),
    })
}

#[allow(clippy::result_large_err)] // the error is the answer, as in every handler
fn find(processes: &Processes, pid: &str) -> Result<Arc<Proc>, Response> {
    let pid: u32 = pid
        .parse()
        .map_err(|_| error(StatusCode::NOT_FOUND, format!("no process {pid:?} here")))?;
    processes.get(pid).map_err(answer)
}

async fn inspect(
    State(state): State<Arc<AgentState>>,
    Path(pid): Path<String>,
) -> Result<Json<ProcessInfo>, Response> {
    Ok(Json(find(&state.processes, &pid)?.info()))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KillQuery {
    signal: Option<String>,
}

/// Kills the process group (SIGKILL unless `?signal=` names another) and
/// answers how it stands after up to two seconds.
async fn kill(
    State(state): State<Arc<AgentState>>,
    Path(pid): Path<String>,
    query: Result<Query<KillQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ProcessInfo>, Response> {
    let Query(q) = query.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let signal = match q.signal.as_deref() {
        None => libc::SIGKILL,
        Some(name) => signal_number(name)
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, format!("unknown signal {name:?}")))?,
    };
    let proc = find(&state.processes, &pid)?;
    proc.signal(signal);
    proc.wait_ended(Duration::from_secs(2)).await;
    Ok(Json(proc.info()))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IoQuery {
    /// The output offset to start from (bytes already seen); 0 = the backlog.
    #[serde(default)]
    offset: u64,
}

async fn io(
    State(state): State<Arc<AgentState>>,
    Path(pid): Path<String>,
    query: Result<Query<IoQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Response> {
    let Query(q) = query.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let proc = find(&state.processes, &pid)?;
    let upgrade = upgrade.map_err(|r| error(r.status(), r.body_text()))?;
    Ok(upgrade
        .max_message_size(MAX_STDIN_FRAME + 16)
        .on_upgrade(move |socket| attach(socket, proc, q.offset))
        .into_response())
}

/// Largest output frame sent at once (bigger chunks are split).
const MAX_OUT_FRAME: usize = 64 * 1024;

/// Serves one client of a process until the process ended and the client has
/// all its output, or the client leaves (the process goes on).
pub async fn attach(socket: WebSocket, proc: Arc<Proc>, offset: u64) {
    let client = proc.join(offset);
    serve(socket, &proc, client, offset).await;
    proc.leave(client);
}

async fn serve(socket: WebSocket, proc: &Proc, client: u64, offset: u64) {
    let (mut tx, mut rx) = socket.split();
    let mut changed = proc.subscribe();
    let mut offset = offset;
    let close = |code, reason: String| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.chars().take(120).collect::<String>().into(),
        }))
    };
    loop {
        let since = proc.read_since(offset);
        offset = since.next;
        if since.skipped > 0 {
            let skipped = IoEvent::Skipped {
                bytes: since.skipped,
            };
            if send_json(&mut tx, &skipped).await.is_err() {
                return;
            }
        }
        for (tag, data) in since.chunks {
            for part in data.chunks(MAX_OUT_FRAME) {
                let mut frame = Vec::with_capacity(part.len() + 1);
                frame.push(tag);
                frame.extend_from_slice(part);
                if tx.send(Message::Binary(frame.into())).await.is_err() {
                    return;
                }
            }
        }
        proc.progress(client, offset);
        if let Some(ended) = since.ended {
            let _ = send_json(&mut tx, &ended.event()).await;
            let _ = tx
                .send(close(close_code::NORMAL, "the process ended".into()))
                .await;
            return;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            msg = rx.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    _ => return, // the client left; the process goes on
                };
                if let Err(reason) = take_input(proc, msg).await {
                    let _ = tx.send(close(close_code::POLICY, reason)).await;
                    return;
                }
            }
        }
    }
}

async fn send_json(
    tx: &mut futures::stream::SplitSink<WebSocket, Message>,
    event: &IoEvent,
) -> Result<(), axum::Error> {
    let text = serde_json::to_string(event).unwrap_or_default();
    tx.send(Message::Text(text.into())).await
}

/// Applies one client message; an error ends the connection with its reason.
async fn take_input(proc: &Proc, msg: Message) -> Result<(), String> {
    match msg {
        Message::Binary(bytes) => proc.write_stdin(&bytes).await.map_err(|e| crate::chain(&e)),
        Message::Text(text) => {
            if text.len() > MAX_CONTROL_BYTES {
                return Err("control message too long".into());
            }
            let control: IoControl = serde_json::from_str(text.as_str())
                .map_err(|e| format!("invalid control message: {e}"))?;
            match control {
                IoControl::Resize { cols, rows } => {
                    proc.resize(cols, rows).map_err(|e| crate::chain(&e))
                }
                IoControl::Signal { signal } => {
                    let n = signal_number(&signal)
                        .ok_or_else(|| format!("unknown signal {signal:?}"))?;
                    proc.signal(n);
                    Ok(())
                }
                IoControl::Eof => proc.close_stdin().await.map_err(|e| crate::chain(&e)),
            }
        }
        _ => Ok(()), // pings are answered by axum; a close ends the stream
    }
}
