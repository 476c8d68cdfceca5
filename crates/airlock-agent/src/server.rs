//! `airlock-agent serve`: the agent's HTTP API. Every request carries the
//! sandbox's bearer token; answers that are not 2xx are JSON [`AgentError`]s.

use crate::exec::{self, ExecConfig, ExecError};
use airlock_proto::agent::{AgentError, ExecRequest, ExecResponse, Health};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Instant;

/// Request bodies beyond this are refused with 413 before they are parsed.
const MAX_BODY_BYTES: usize = 256 * 1024;

pub struct AgentState {
    pub token: String,
    pub sandbox_id: String,
    pub image_build_id: String,
    pub started: Instant,
    pub exec: ExecConfig,
    pub logins: Arc<crate::login::Logins>,
    pub streams: Arc<crate::stream::route::Streams>,
    pub processes: Arc<crate::process::Processes>,
    /// Its owner, once a warm pool handed it out (`/session`).
    pub session: crate::session::Held,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("token", &"[redacted]")
            .field("sandbox_id", &self.sandbox_id)
            .field("image_build_id", &self.image_build_id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(AgentError {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Compares in time that depends only on the lengths, never on where the first
/// difference is.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = presented.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(0);
        diff |= usize::from(p ^ e);
    }
    diff == 0
}

async fn require_token(State(state): State<Arc<AgentState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if presented.is_empty() || !token_matches(presented, state.token.as_bytes()) {
        tracing::warn!(path = %req.uri().path(), "request without a valid bearer token");
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(req).await
}

async fn health(State(state): State<Arc<AgentState>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        sandbox_id: state.sandbox_id.clone(),
        image_build_id: state.image_build_id.clone(),
        uptime_s: state.started.elapsed().as_secs(),
    })
}

async fn exec_handler(
    State(state): State<Arc<AgentState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ExecResponse>, Response> {
    // The body is JSON whatever the Content-Type says: callers are scripts and
    // curl as often as the control plane.
    let body = body.map_err(|r| error(r.status(), r.body_text()))?;
    let req: ExecRequest = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid exec request: {e}"),
        )
    })?;
    let program = req.argv.first().cloned().unwrap_or_default();
    let started = Instant::now();
    match exec::run(&state.processes, req).await {
        Ok(resp) => {
            tracing::info!(
                program = %program,
                exit_code = ?resp.exit_code,
                timed_out = resp.timed_out,
                took_ms = started.elapsed().as_millis() as u64,
                "exec"
            );
            Ok(Json(resp))
        }
        Err(ExecError::BadRequest(m)) => Err(error(StatusCode::BAD_REQUEST, m)),
        Err(ExecError::TooMany(m)) => Err(error(StatusCode::TOO_MANY_REQUESTS, m)),
        Err(e) => {
            tracing::error!(program = %program, error = %crate::chain(&e), "exec failed");
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, crate::chain(&e)))
        }
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/exec", post(exec_handler))
        .merge(crate::login::routes::routes())
        .merge(crate::stream::route::routes())
        .merge(crate::process::routes::routes())
        .merge(crate::session::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::RunAs;
    use axum::body::{Body, Bytes};
    use tower::ServiceExt;

    const TOKEN: &str = "tok-0123456789abcdef";

    fn app() -> Router {
        router(Arc::new(AgentState {
            token: TOKEN.into(),
            sandbox_id: "sb-1".into(),
            image_build_id: "0123456789abcdef".into(),
            started: Instant::now(),
            exec: ExecConfig {
                run_as: RunAs::Current,
                home: std::env::temp_dir(),
                base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            },
            logins: Arc::new(crate::login::Logins::new(crate::login::LoginConfig::guest(
                RunAs::Current,
                std::env::temp_dir(),
                vec![],
                "10.0.0.1".into(),
            ))),
            streams: Arc::new(crate::stream::route::Streams::new(
                crate::stream::route::CaptureCommand {
                    argv: vec!["false".into()],
                    run_as: RunAs::Current,
                    env: vec![],
                    cwd: std::env::temp_dir(),
                },
            )),
            processes: Arc::new(crate::process::Processes::new(ExecConfig {
                run_as: RunAs::Current,
                home: std::env::temp_dir(),
                base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            })),
            session: Default::default(),
        }))
    }

    async fn call(
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let resp = app()
            .oneshot(b.body(Body::from(body.to_owned())).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn exec_body_needs_no_content_type() {
        let req = Request::builder()
            .method("POST")
            .uri("/exec")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(r#"{"argv":["true"]}"#))
            .expect("request");
        let resp = app().oneshot(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
        assert!(!token_matches(b"abcd", b"abc"));
        assert!(!token_matches(b"", b"abc"));
    }

    #[tokio::test]
    async fn every_endpoint_needs_the_token() {
        let bearer = format!("Bearer {TOKEN}");
        for auth in [
            None,
            Some("Bearer wrong"),
            Some(TOKEN),
            Some("Basic x"),
            Some("Bearer "),
        ] {
            for (m, p) in [
                ("GET", "/health"),
                ("POST", "/exec"),
                ("GET", airlock_proto::stream::STREAM_PATH),
                ("GET", "/nope"),
            ] {
                let (status, body) = call(m, p, auth, "{}").await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{m} {p} {auth:?}");
                assert!(body["error"].is_string());
            }
        }
        let (status, body) = call("GET", "/health", Some(&bearer), "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["image_build_id"], "0123456789abcdef");
        assert_eq!(body["sandbox_id"], "sb-1");
        let (status, _) = call("GET", "/nope", Some(&bearer), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Not a WebSocket handshake: refused, as JSON like every other error.
        let (status, body) =
            call("GET", airlock_proto::stream::STREAM_PATH, Some(&bearer), "").await;
        assert!(status.is_client_error(), "{status}");
        assert!(body["error"].is_string());
    }

    /// One owner, ever: the first session is kept, a repeat is answered as
    /// it was, another user's is refused, and nothing is readable without
    /// the token.
    #[tokio::test]
    async fn a_session_is_handed_once() {
        let app = app();
        let bearer = format!("Bearer {TOKEN}");
        let send = |method: &'static str, auth: Option<String>, body: String| {
            let app = app.clone();
            async move {
                let mut b = Request::builder().method(method).uri("/session");
                if let Some(a) = auth {
                    b = b.header("authorization", a);
                }
                let resp = app
                    .oneshot(b.body(Body::from(body)).expect("request"))
                    .await
                    .expect("response");
                let status = resp.status();
                let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                    .await
                    .expect("body");
                let json: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                (status, json)
            }
        };
        let body = |user: &str| {
            format!(
                r#"{{"sandbox_id":"sb-1","user_id":"{user}","user_name":"n","claimed_at_ms":5}}"#
            )
        };
        let (status, _) = send("GET", Some(bearer.clone()), String::new()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = send("PUT", None, body("u1")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, json) = send("PUT", Some(bearer.clone()), body("u1")).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let (status, _) = send("PUT", Some(bearer.clone()), body("u1")).await;
        assert_eq!(status, StatusCode::OK);
        let (status, json) = send("PUT", Some(bearer.clone()), body("u2")).await;
        assert_eq!(status, StatusCode::CONFLICT, "{json}");
        let (status, _) = send("PUT", Some(bearer.clone()), "{\"x\":1}".into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, json) = send("GET", Some(bearer), String::new()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["user_id"], "u1");
    }

    async fn put_file(name: &str, body: Body, length: Option<u64>) -> (StatusCode, String) {
        let mut b = Request::builder()
            .method("PUT")
            .uri(format!("/files?path={name}"))
            .header("authorization", format!("Bearer {TOKEN}"));
        if let Some(n) = length {
            b = b.header("content-length", n);
        }
        let resp = app()
            .oneshot(b.body(body).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// What the test left under the name (the file, or a half-written one beside it).
    fn traces(name: &str) -> Vec<String> {
        std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(name))
            .collect()
    }

    /// Uploads stream into the file (in chunks, with no length said), and
    /// the 64 MiB cap holds while they do: a larger one is 413 and leaves no
    /// file, whole or partial; so does one that breaks off.
    #[tokio::test]
    async fn uploads_stream_and_the_cap_leaves_nothing_behind() {
        use airlock_proto::process::MAX_FILE_BYTES;
        let name = format!("airlock-put-{}", std::process::id());
        let chunks = |n: usize, size: usize| {
            Body::from_stream(futures::stream::iter(
                (0..n).map(move |i| Ok::<_, std::io::Error>(Bytes::from(vec![i as u8; size]))),
            ))
        };
        let (status, body) = put_file(&name, chunks(16, 65536), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let path = std::env::temp_dir().join(&name);
        let got = std::fs::read(&path).expect("written");
        assert_eq!(got.len(), 16 * 65536);
        assert_eq!(got[65536 * 3], 3);
        assert_eq!(traces(&name), vec![name.clone()]);
        // Replacing a file keeps its permission bits (an executable stays one).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let (status, body) = put_file(&name, chunks(16, 65536), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o7777, 0o750);

        // Over the cap, streamed without a length: refused at the byte past it;
        // the old file stays as it was.
        let mib = 1 << 20;
        let (status, body) = put_file(&name, chunks(MAX_FILE_BYTES / mib + 1, mib), None).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert!(body.contains("64 MiB"), "{body}");
        assert_eq!(std::fs::read(&path).expect("kept").len(), 16 * 65536);
        assert_eq!(traces(&name), vec![name.clone()]);

        // Announced too large: refused before a byte is read.
        std::fs::remove_file(&path).expect("rm");
        let (status, _) = put_file(&name, Body::from("x"), Some(MAX_FILE_BYTES as u64 + 1)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        // Broken off half-way.
        let broken = Body::from_stream(futures::stream::iter([
            Ok(Bytes::from_static(b"half")),
            Err(std::io::Error::other("connection reset")),
        ]));
        let (status, body) = put_file(&name, broken, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(traces(&name).is_empty(), "{:?}", traces(&name));
    }

    /// A directory whose tar would pass the cap is refused before a byte of
    /// it is sent (a sparse file: no disk is used).
    #[tokio::test]
    async fn a_directory_over_the_tar_cap_is_413() {
        use airlock_proto::process::MAX_TAR_BYTES;
        let name = format!("airlock-tar-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::File::create(dir.join("small"))
            .expect("create")
            .set_len(1000)
            .expect("size");
        let get = |name: String| async move {
            let req = Request::builder()
                .uri(format!("/files?path={name}"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .expect("request");
            let resp = app().oneshot(req).await.expect("response");
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("body");
            (status, bytes)
        };
        let (status, tar) = get(name.clone()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(tar.len() % 512, 0);
        std::fs::File::create(dir.join("big"))
            .expect("create")
            .set_len(MAX_TAR_BYTES)
            .expect("sparse");
        let (status, body) = get(name.clone()).await;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(&name) && body.contains("1024 MiB"), "{body}");
    }

    #[tokio::test]
    async fn exec_round_trip_and_bad_bodies() {
        let bearer = format!("Bearer {TOKEN}");
        let (status, body) =
            call("POST", "/exec", Some(&bearer), r#"{"argv":["echo","hi"]}"#).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["stdout"], "hi\n");
        assert_eq!(body["exit_code"], 0);

        for bad in [
            "",
            "{",
            r#"{"argv":[]}"#,
            r#"{"argv":"echo"}"#,
            r#"{"argv":["x"],"what":1}"#,
            r#"{"argv":["x"],"timeout_s":-1}"#,
        ] {
            let (status, body) = call("POST", "/exec", Some(&bearer), bad).await;
            assert!(status.is_client_error(), "{bad:?} gave {status}");
            assert!(body["error"].is_string(), "{bad:?}");
        }
        let huge = format!(r#"{{"argv":["echo","{}"]}}"#, "x".repeat(MAX_BODY_BYTES));
        let (status, _) = call("POST", "/exec", Some(&bearer), &huge).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
