//! Sandbox endpoints. Thin: parse, call the app, shape the answer.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::shares::Viewer;
use crate::app::state::SandboxState;
use crate::app::{App, AppError};
use crate::relay::ws::{self, close};
use crate::store::SandboxRow;
use airlock_proto::metadata::SandboxKind;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// `browser` (disposable) or `workspace` (the user's long-lived machine).
    #[schema(value_type = String, example = "browser")]
    pub kind: SandboxKind,
    /// A workspace's name (default `default`): unique among the caller's
    /// live workspaces, and the name its home volume is kept under across
    /// rebuilds. Only for `workspace`.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Sandbox {
    pub id: String,
    #[schema(value_type = String, example = "browser")]
    pub kind: SandboxKind,
    pub state: SandboxState,
    pub owner: String,
    pub image_build_id: String,
    /// RFC 3339 timestamps.
    pub created_at: String,
    pub updated_at: String,
    pub ready_at: Option<String>,
    pub last_heartbeat_at: Option<String>,
    pub failure_reason: Option<String>,
    /// The page that shows this sandbox's desktop.
    pub viewer_url: String,
    /// In a create's answer only: `true` when a warm pool handed it out
    /// (it is `ready` already), `false` for a cold create (the pool was
    /// empty, off, or its member could not be handed over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_pool: Option<bool>,
    /// The node of the cluster it was placed on; null on a single host and
    /// before placement. Shown to its owner too: a name the operator chose,
    /// useful when reporting a problem, and no other tenant's sandbox is
    /// ever shown.
    pub node: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds, 1–600; 30 when omitted.
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecResult {
    /// Absent when the process was killed (by a signal or the timeout).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub truncated: bool,
}

pub(super) use crate::app::rfc3339;

fn view(row: SandboxRow, owner: &str, node: Option<String>) -> Sandbox {
    Sandbox {
        node,
        viewer_url: format!("/view/{}", row.id),
        id: row.id,
        kind: row.kind,
        state: row.state,
        owner: owner.to_owned(),
        image_build_id: row.image_build_id,
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(row.updated_at),
        ready_at: row.ready_at.map(rfc3339),
        last_heartbeat_at: row.last_heartbeat_at.map(rfc3339),
        failure_reason: row.failure_reason,
        from_pool: None,
    }
}

/// The node a sandbox (already checked to be the caller's) was placed on.
async fn node_of(app: &App, id: &str) -> Result<Option<String>, ApiError> {
    let mut nodes = app
        .store
        .nodes_of(&[id.to_owned()])
        .await
        .map_err(AppError::from)?;
    Ok(nodes.remove(id))
}

#[utoipa::path(post, path = "/api/v1/sandboxes", request_body = CreateSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody, description = "a quota or rate limit; see Retry-After"), (status = 503, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn create(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let created = match (body.kind, body.name.as_deref()) {
        (SandboxKind::Workspace, name) => app.create_workspace(&user, name, false).await?,
        (_, Some(_)) => {
            return Err(AppError::BadInput("name: only a workspace has a name".into()).into())
        }
        (kind, None) => app.create(&user, kind).await?,
    };
    let node = node_of(&app, &created.row.id).await?;
    let mut answer = view(created.row, &user.name, node);
    answer.from_pool = Some(created.from_pool);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

#[utoipa::path(get, path = "/api/v1/sandboxes", responses((status = 200, body = SandboxList)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<SandboxList>, ApiError> {
    let rows = app.sandboxes(&user).await?;
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let mut nodes = app.store.nodes_of(&ids).await.map_err(AppError::from)?;
    Ok(Json(SandboxList {
        sandboxes: rows
            .into_iter()
            .map(|r| {
                let node = nodes.remove(&r.id);
                view(r, &user.name, node)
            })
            .collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}", responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let row = app.sandbox_of(&user, &id).await?;
    let node = node_of(&app, &row.id).await?;
    Ok(Json(view(row, &user.name, node)))
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}", responses((status = 202, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = app.delete_sandbox(&user, &id).await?;
    let node = node_of(&app, &row.id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(row, &user.name, node))).into_response())
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/exec", request_body = ExecBody,
    responses((status = 200, body = ExecResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<Json<ExecResult>, ApiError> {
    let Json(body) = body?;
    let req = airlock_proto::agent::ExecRequest {
        argv: body.argv,
        env: body.env,
        timeout_s: body.timeout_s,
    };
    let out = app.exec(&user, &id, req).await?;
    Ok(Json(ExecResult {
        exit_code: out.exit_code,
        stdout: out.stdout,
        stderr: out.stderr,
        timed_out: out.timed_out,
        truncated: out.truncated,
    }))
}

/// The viewer's WebSocket. Ownership is checked before the upgrade; a sandbox
/// that is not ready is upgraded and closed at once with a reason.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/vnc",
    params(("id" = String, Path, description = "the sandbox"),
        ("ticket" = Option<String>, Query, description = "a viewer ticket (POST /api/v1/sandboxes/{id}/tickets); browsers cannot set headers on a WebSocket"),
        ("share" = Option<String>, Query, description = "a share link's secret (POST /api/v1/sandboxes/{id}/shares): a view without input unless the owner granted it")),
    responses((status = 101, description = "WebSocket carrying binary RFB"), (status = 404, body = ErrorBody)))]
pub async fn vnc(
    State(app): State<Arc<App>>,
    viewer: Viewer,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let row = app.sandbox_of(&viewer.user, &id).await?;
    let share = viewer.share;
    let upgrade = upgrade
        .protocols(["binary"])
        .max_message_size(1 << 20)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(1 << 20);
    let target = app.ready_endpoints(&row).await.map(|e| ws::Target {
        sandbox_id: row.id.clone(),
        vnc: e.display,
        password: row.vnc_password.clone(),
    });
    let state = row.state;
    Ok(upgrade.on_upgrade(move |socket| async move {
        app.metrics.viewer_opened();
        let code = match target {
            Ok(target) => {
                // An open viewer is activity: keep the idle reaper away while it lasts.
                let keepalive = {
                    let (app, id) = (app.clone(), target.sandbox_id.clone());
                    tokio::spawn(async move {
                        loop {
                            app.note_activity(&id).await;
                            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                        }
                    })
                };
                let stopping = app.stopping.subscribe();
                let metrics = app.stream_metrics.clone();
                let reports: ws::Reports = Box::new(move |report| match report {
                    ws::ViewerReport::Sample { input_to_photon_ms } => {
                        metrics.input_to_photon("vnc", input_to_photon_ms)
                    }
                });
                let (gate, watcher) = share.as_ref().map(|s| app.watch_share(s)).unzip();
                let code = ws::relay_gated(socket, target, stopping, reports, gate).await;
                keepalive.abort();
                if let Some(w) = watcher {
                    w.abort();
                }
                code
            }
            Err(_) => {
                let (code, reason) = not_ready(state);
                ws::close_with(socket, code, &reason).await;
                code
            }
        };
        app.note_activity(&id).await;
        app.metrics.viewer_closed(code);
    }))
}

/// The WebRTC viewer's signalling socket (see `webrtc::session` for its
/// messages). Checked like the VNC socket; 4503 when WebRTC is off here.
#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/stream",
    params(("id" = String, Path, description = "the sandbox"),
        ("ticket" = Option<String>, Query, description = "a viewer ticket (POST /api/v1/sandboxes/{id}/tickets)")),
    responses((status = 101, description = "WebSocket carrying WebRTC signalling (JSON)"), (status = 404, body = ErrorBody)))]
pub async fn stream(
    State(app): State<Arc<App>>,
    viewer: Viewer,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let row = app.sandbox_of(&viewer.user, &id).await?;
    let share = viewer.share;
    let target = app
        .ready_endpoints(&row)
        .await
        .map(|e| crate::webrtc::hub::GuestStream {
            sandbox_id: row.id.clone(),
            agent: e.stream,
            token: row.agent_token.clone(),
            fps: app.cfg.webrtc_fps,
        });
    let state = row.state;
    Ok(upgrade
        .max_message_size(256 * 1024)
        .on_upgrade(move |socket| async move {
            let code = match (target, app.webrtc.get().cloned()) {
                (Ok(guest), Some(endpoint)) => {
                    let hub = app.streams.join(guest);
                    let stopping = app.stopping.subscribe();
                    let metrics = app.stream_metrics.clone();
                    let (gate, watcher) = share.as_ref().map(|s| app.watch_share(s)).unzip();
                    let code = crate::webrtc::session::serve_gated(
                        socket, endpoint, hub, metrics, stopping, gate,
                    )
                    .await;
                    if let Some(w) = watcher {
                        w.abort();
                    }
                    code
                }
                (Ok(_), None) => {
                    ws::close_with(socket, close::NO_WEBRTC, "WebRTC is off on this server").await;
                    close::NO_WEBRTC
                }
                (Err(_), _) => {
                    let (code, reason) = not_ready(state);
                    ws::close_with(socket, code, &reason).await;
                    code
                }
            };
            tracing::debug!(sandbox = %id, code, "WebRTC viewer closed");
        }))
}

/// The close code and reason for a viewer of a sandbox that is not ready.
fn not_ready(state: SandboxState) -> (u16, String) {
    match state {
        SandboxState::Provisioning | SandboxState::Booting => (
            close::NOT_READY,
            format!("the sandbox is {state}; try again when it is ready"),
        ),
        _ => (close::GONE, format!("the sandbox is {state}")),
    }
}

#[cfg(test)]
mod tests {
    use crate::app::lifecycle_tests::World;
    use serde_json::{json, Value};
    use std::time::Duration;

    /// The sandbox API over the real app and the fakes (no root, no image):
    /// the kind is an enum on the way in and out, an unknown one is a 400
    /// that names the known ones, and times are RFC 3339.
    #[tokio::test]
    async fn the_sandbox_api_over_fakes() {
        let w = World::new().await;
        let (base, server, http) = w.serve().await;
        let send = |req: reqwest::RequestBuilder| async move {
            let resp = req.send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        };

        let (status, body) = send(
            http.post(format!("{base}/sandboxes"))
                .json(&json!({"kind": "spaceship"})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("kind"), "{body}");
        assert!(
            message.contains("browser") && message.contains("workspace"),
            "{body}"
        );
        assert!(w
            .store
            .sandboxes_of(&w.user.id)
            .await
            .expect("q")
            .is_empty());

        let (status, body) = send(
            http.post(format!("{base}/sandboxes"))
                .json(&json!({"kind": "browser"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["kind"], "browser");
        let id = body["id"].as_str().expect("id").to_owned();
        let created = body["created_at"].as_str().expect("created_at");
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");

        let mut state = String::new();
        for _ in 0..500 {
            let (_, body) = send(http.get(format!("{base}/sandboxes/{id}"))).await;
            state = body["state"].as_str().unwrap_or("").to_owned();
            if state == "ready" {
                assert!(body["ready_at"].as_str().is_some(), "{body}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state, "ready");

        let (status, body) = send(http.delete(format!("{base}/sandboxes/{id}"))).await;
        assert_eq!(status, 202, "{body}");
        server.abort();
    }
}
