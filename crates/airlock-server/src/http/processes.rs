//! Process endpoints: start, list, inspect, kill, and the io WebSocket that
//! relays a process's output out and stdin, resize and signals in. Thin:
//! the app checks ownership and the request, the agent runs the process.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::agent::{IoFrame, ProcessIo};
use crate::app::App;
use crate::store::UserRow;
use airlock_proto::process as wire;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// 1–1000.
    pub cols: u16,
    /// 1–1000.
    pub rows: u16,
}

#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcessBody {
    /// The program and its arguments (the program is looked up in PATH).
    pub argv: Vec<String>,
    /// Laid over the sandbox user's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute, or relative to the user's home; the home when omitted.
    pub cwd: Option<String>,
    /// Run on a terminal of this size (then stdin is always open).
    pub pty: Option<PtySize>,
    /// Keep stdin open for the io socket.
    #[serde(default)]
    pub stdin: bool,
    /// Seconds before the process group is killed, 1–86400; none when omitted.
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Process {
    /// The process id inside the sandbox.
    pub pid: u32,
    pub argv: Vec<String>,
    /// `running` or `exited`.
    pub state: String,
    /// Set once the process exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The timeout killed it.
    pub timed_out: bool,
    pub pty: Option<PtySize>,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    /// Output bytes produced so far (the io socket's `offset` counts these).
    pub output_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

impl From<wire::ProcessInfo> for Process {
    fn from(p: wire::ProcessInfo) -> Self {
        Process {
            pid: p.pid,
            argv: p.argv,
            state: match p.state {
                wire::ProcessState::Running => "running".into(),
                wire::ProcessState::Exited => "exited".into(),
            },
            exit_code: p.exit_code,
            signal: p.signal,
            timed_out: p.timed_out,
            pty: p.pty.map(|s| PtySize {
                cols: s.cols,
                rows: s.rows,
            }),
            started_at_ms: p.started_at_ms,
            ended_at_ms: p.ended_at_ms,
            output_bytes: p.output_bytes,
        }
    }
}

/// A pid in the path that is not a number names no process.
fn pid(id: &str, pid: &str) -> Result<u32, ApiError> {
    pid.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("not found: process {pid:?} in sandbox {id:?}"),
        )
    })
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/processes", request_body = StartProcessBody,
    params(("id" = String, Path, description = "the sandbox")),
    responses((status = 201, body = Process), (status = 400, body = ErrorBody, description = "a bad request, or a program that cannot be started"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the sandbox is not ready, or runs too many processes")))]
pub async fn start(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    body: Result<Json<StartProcessBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body?;
    let req = wire::StartProcess {
        argv: b.argv,
        env: b.env,
        cwd: b.cwd,
        pty: b.pty.map(|s| wire::PtySize {
            cols: s.cols,
            rows: s.rows,
        }),
        stdin: b.stdin,
        timeout_s: b.timeout_s,
    };
    let info = app.start_process(&user, &id, req).await?;
    Ok((StatusCode::CREATED, Json(Process::from(info))).into_response())
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/processes",
    params(("id" = String, Path, description = "the sandbox")),
    responses((status = 200, body = ProcessList), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let list = app.processes(&user, &id).await?;
    Ok(Json(ProcessList {
        processes: list.processes.into_iter().map(Process::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/processes/{pid}",
    params(("id" = String, Path, description = "the sandbox"), ("pid" = u32, Path, description = "the process")),
    responses((status = 200, body = Process), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path((id, p)): Path<(String, String)>,
) -> Result<Json<Process>, ApiError> {
    let p = pid(&id, &p)?;
    Ok(Json(app.process(&user, &id, p).await?.into()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct KillQuery {
    /// `INT`, `TERM`, `KILL` (the default), `HUP`, `QUIT`, `USR1`, `USR2`, `WINCH`, `CONT`, `STOP`.
    pub signal: Option<String>,
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/processes/{pid}",
    params(("id" = String, Path, description = "the sandbox"), ("pid" = u32, Path, description = "the process"), KillQuery),
    responses((status = 200, body = Process, description = "how the process stands up to 2 s after the signal"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn kill(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path((id, p)): Path<(String, String)>,
    query: Result<Query<KillQuery>, QueryRejection>,
) -> Result<Json<Process>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let p = pid(&id, &p)?;
    Ok(Json(
        app.kill_process(&user, &id, p, q.signal.as_deref())
            .await?
            .into(),
    ))
}

/// The caller of the io socket: the bearer token (or the local user), or a
/// single-use `?ticket=` for this sandbox (browsers cannot set headers on a
/// WebSocket).
#[derive(Debug)]
pub struct IoCaller(pub UserRow);

impl FromRequestParts<Arc<App>> for IoCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let ticket = parts.uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ticket")
                .map(|(_, v)| v.into_owned())
        });
        let with_header = parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION);
        match ticket {
            Some(ticket) if !with_header => {
                let Path((id, _)) = Path::<(String, String)>::from_request_parts(parts, app)
                    .await
                    .map_err(|_| {
                        ApiError::bad_request("the sandbox id in the path is not valid")
                    })?;
                app.redeem_ticket(&ticket, &id)
                    .await?
                    .map(IoCaller)
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::UNAUTHORIZED,
                            "unauthorized",
                            "the ticket is unknown, used, expired, or for another sandbox; \
                         get a new one with POST /api/v1/sandboxes/{id}/tickets",
                        )
                    })
            }
            _ => Caller::from_request_parts(parts, app)
                .await
                .map(|Caller(u)| IoCaller(u)),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct IoQuery {
    /// Output bytes already seen: the socket starts after them. 0 (the
    /// default) replays what the backlog (the last 1 MiB) still holds.
    #[serde(default)]
    pub offset: u64,
    /// A viewer ticket, for browsers.
    pub ticket: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/processes/{pid}/io",
    params(("id" = String, Path, description = "the sandbox"), ("pid" = u32, Path, description = "the process"), IoQuery),
    responses((status = 101, description = "WebSocket. Out: binary frames [1 = stdout | 2 = stderr][bytes], \
        then a text frame {\"type\":\"exit\",\"exit_code\",\"signal\",\"timed_out\"} and a close; \
        {\"type\":\"skipped\",\"bytes\"} when output left the backlog unseen. \
        In: binary frames are stdin; text frames {\"type\":\"resize\",\"cols\",\"rows\"}, \
        {\"type\":\"signal\",\"signal\":\"INT\"}, {\"type\":\"eof\"}."),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn io(
    State(app): State<Arc<App>>,
    IoCaller(user): IoCaller,
    Path((id, p)): Path<(String, String)>,
    query: Result<Query<IoQuery>, QueryRejection>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let p = pid(&id, &p)?;
    let io = app.attach_process(&user, &id, p, q.offset).await?;
    Ok(upgrade
        .max_message_size(wire::MAX_STDIN_FRAME + 16)
        .on_upgrade(move |socket| relay(socket, io)))
}

/// Frames both ways until either side ends; the process goes on.
async fn relay(socket: WebSocket, mut io: ProcessIo) {
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            frame = io.from_guest.recv() => {
                let msg = match frame {
                    Some(IoFrame::Binary(b)) => Message::Binary(b),
                    Some(IoFrame::Text(t)) => Message::Text(t.into()),
                    Some(IoFrame::Close(code, reason)) => {
                        let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(Message::Close(Some(CloseFrame { code: 1011, reason: "the sandbox's agent went away".into() }))).await;
                        return;
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            msg = rx.next() => {
                let frame = match msg {
                    Some(Ok(Message::Binary(b))) => IoFrame::Binary(b),
                    Some(Ok(Message::Text(t))) => IoFrame::Text(t.as_str().to_owned()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => return, // closed: dropping `io` detaches from the process
                };
                if io.to_guest.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sandboxes/{id}/processes", get(list).post(start))
        .route("/sandboxes/{id}/processes/{pid}", get(inspect).delete(kill))
        .route("/sandboxes/{id}/processes/{pid}/io", get(io))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(start, list, inspect, kill, io),
    components(schemas(StartProcessBody, Process, ProcessList, PtySize))
)]
pub struct Doc;

#[cfg(test)]
mod tests {
    use crate::app::lifecycle_tests::World;
    use futures::{SinkExt, StreamExt};
    use serde_json::{json, Value};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    /// Processes and files over the real app and HTTP stack with the fake
    /// guest: the owner starts, lists, attaches (output out, stdin in, the
    /// exit), kills, and moves a file; bad requests are 400 and change
    /// nothing; another user gets 404 for all of it, socket included.
    #[tokio::test]
    async fn processes_and_files_over_fakes() {
        let w = World::new().await;
        let (base, server, http) = w.serve().await;
        let (_, mallory) = w.app.add_user("mallory").await.expect("user");
        let send = |req: reqwest::RequestBuilder| async move {
            let resp = req.send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        };

        let (status, body) = send(
            http.post(format!("{base}/sandboxes"))
                .json(&json!({"kind": "workspace"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().expect("id").to_owned();
        let procs = format!("{base}/sandboxes/{id}/processes");
        // Not ready yet, or ready: poll until the start is not a conflict.
        let mut started = Value::Null;
        for _ in 0..500 {
            let (status, body) = send(
                http.post(&procs)
                    .json(&json!({"argv": ["cat"], "stdin": true})),
            )
            .await;
            if status == 201 {
                started = body;
                break;
            }
            assert_eq!(status, 409, "{body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pid = started["pid"].as_u64().expect("pid");
        assert_eq!(started["state"], "running");

        for bad in [
            json!({"argv": []}),
            json!({"argv": ["x"], "pty": {"cols": 0, "rows": 5}}),
            json!({"argv": ["x"], "timeout_s": 0}),
            json!({"argv": ["x"], "what": 1}),
        ] {
            let (status, body) = send(http.post(&procs).json(&bad)).await;
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(body["error"]["message"].is_string());
        }
        let (status, body) = send(http.get(&procs)).await;
        assert_eq!(status, 200);
        assert_eq!(
            body["processes"].as_array().map(Vec::len),
            Some(1),
            "{body}"
        );

        // The io socket: output, an echo of stdin, the exit on eof.
        let url = format!(
            "{}/sandboxes/{id}/processes/{pid}/io",
            base.replacen("http://", "ws://", 1)
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("ws");
        let first = ws.next().await.expect("frame").expect("ok");
        assert_eq!(first, Message::Binary(b"\x01fake output\n".to_vec().into()));
        ws.send(Message::Binary(b"ping".to_vec().into()))
            .await
            .expect("send");
        let echo = ws.next().await.expect("frame").expect("ok");
        assert_eq!(echo, Message::Binary(b"\x01ping".to_vec().into()));
        ws.send(Message::Text(r#"{"type":"eof"}"#.into()))
            .await
            .expect("send");
        let exit = ws.next().await.expect("frame").expect("ok");
        let exit: Value = serde_json::from_str(exit.to_text().expect("text")).expect("json");
        assert_eq!(exit["type"], "exit");
        assert_eq!(exit["exit_code"], 0);

        let (status, body) = send(http.delete(format!("{procs}/{pid}?signal=TERM"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "exited");
        let (status, _) = send(http.delete(format!("{procs}/{pid}?signal=BOOM"))).await;
        assert_eq!(status, 400);
        let (status, _) = send(http.get(format!("{procs}/999"))).await;
        assert_eq!(status, 404);
        let (status, _) = send(http.get(format!("{procs}/abc"))).await;
        assert_eq!(status, 404);

        let files = format!("{base}/sandboxes/{id}/files");
        let data = vec![42u8; 100_000];
        let (status, body) = send(http.put(format!("{files}?path=a.bin")).body(data.clone())).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["size"], 100_000);
        let got = http
            .get(format!("{files}?path=a.bin"))
            .send()
            .await
            .expect("get");
        assert_eq!(got.status().as_u16(), 200);
        assert_eq!(got.bytes().await.expect("bytes").as_ref(), &data[..]);
        let (status, body) = send(http.put(format!("{files}?path=../x")).body("x")).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("'..'"),
            "{body}"
        );
        let (status, _) = send(http.put(&files).body("x")).await;
        assert_eq!(status, 400, "no ?path=");
        // Over 64 MiB: said by the length, or counted while it streams (in
        // chunks with no length); either way 413, and nothing is written.
        let max = airlock_proto::process::MAX_FILE_BYTES;
        let (status, body) = send(
            http.put(format!("{files}?path=big.bin"))
                .body(vec![0u8; max + 1]),
        )
        .await;
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["error"]["code"], "too_large");
        let (tx, upload) = crate::app::processes::UploadBody::channel(4);
        tokio::spawn(async move {
            for _ in 0..=max >> 20 {
                if tx.send(Ok(vec![1u8; 1 << 20])).await.is_err() {
                    return;
                }
            }
        });
        let streamed = reqwest::Body::wrap(upload);
        let (status, body) = send(http.put(format!("{files}?path=big.bin")).body(streamed)).await;
        assert_eq!(status, 413, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("64 MiB"),
            "{body}"
        );
        let (status, _) = send(http.get(format!("{files}?path=big.bin"))).await;
        assert_eq!(status, 404, "nothing was written");

        // Another user: every one of these is 404, the socket before it opens.
        let as_mallory = |r: reqwest::RequestBuilder| r.bearer_auth(&mallory);
        for req in [
            as_mallory(http.get(&procs)),
            as_mallory(http.post(&procs).json(&json!({"argv": ["id"]}))),
            as_mallory(http.get(format!("{procs}/{pid}"))),
            as_mallory(http.delete(format!("{procs}/{pid}"))),
            as_mallory(http.get(format!("{files}?path=a.bin"))),
            as_mallory(http.put(format!("{files}?path=b.bin")).body("x")),
        ] {
            let (status, body) = send(req).await;
            assert_eq!(status, 404, "{body}");
        }
        let mut req = url.as_str().into_client_request().expect("req");
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {mallory}").parse().expect("h"),
        );
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 404)
            }
            other => panic!("mallory's socket: {other:?}"),
        }
        server.abort();
    }
}
