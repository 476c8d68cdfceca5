//! The agent's login endpoints (merged into the authenticated router).

use super::{LoginError, Logins};
use crate::server::AgentState;
use airlock_proto::agent::AgentError;
use airlock_proto::login::{FileSet, LoginInput, LoginStart, LoginStatus};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

fn fail(e: LoginError) -> Response {
    let status = match &e {
        LoginError::BadRequest(_) => StatusCode::BAD_REQUEST,
        LoginError::NotFound(_) => StatusCode::NOT_FOUND,
        LoginError::Conflict(_) => StatusCode::CONFLICT,
        LoginError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        tracing::error!(error = %crate::chain(&e), "login request failed");
    }
    (
        status,
        Json(AgentError {
            error: crate::chain(&e),
        }),
    )
        .into_response()
}

#[allow(clippy::result_large_err)] // an axum Response, as the handlers return
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(AgentError {
                error: format!("invalid request: {e}"),
            }),
        )
            .into_response()
    })
}

fn logins(state: &AgentState) -> &Arc<Logins> {
    &state.logins
}

async fn start(
    State(state): State<Arc<AgentState>>,
    bytes: Bytes,
) -> Result<Json<LoginStatus>, Response> {
    let req: LoginStart = body(&bytes)?;
    logins(&state).start(req).map(Json).map_err(fail)
}

async fn status(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<Json<LoginStatus>, Response> {
    logins(&state).status(&id).map(Json).map_err(fail)
}

async fn cancel(State(state): State<Arc<AgentState>>, Path(id): Path<String>) -> StatusCode {
    logins(&state).cancel(&id);
    StatusCode::NO_CONTENT
}

async fn credentials(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Result<Json<FileSet>, Response> {
    let files = logins(&state).credentials(&id).map_err(fail)?;
    tracing::info!(login = %id, files = files.files.len(), "credentials handed over");
    Ok(Json(files))
}

async fn input(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<StatusCode, Response> {
    let req: LoginInput = body(&bytes)?;
    let l = logins(&state).clone();
    tokio::task::spawn_blocking(move || l.input(&id, &req.text))
        .await
        .map_err(|_| fail(LoginError::Conflict("typing was interrupted".into())))?
        .map_err(fail)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn deliver(
    State(state): State<Arc<AgentState>>,
    bytes: Bytes,
) -> Result<StatusCode, Response> {
    let set: FileSet = body(&bytes)?;
    let n = set.files.len();
    logins(&state).deliver(set).map_err(fail)?;
    tracing::info!(files = n, "credentials delivered");
    Ok(StatusCode::NO_CONTENT)
}

pub fn routes() -> Router<Arc<AgentState>> {
    Router::new()
        .route("/login", post(start))
        .route("/login/{id}", get(status).delete(cancel))
        .route("/login/{id}/credentials", get(credentials))
        .route("/login/{id}/input", post(input))
        .route("/credentials/deliver", post(deliver))
}
