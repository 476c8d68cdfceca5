//! The `/api/v1` endpoints of logins (stored credentials: `credentials.rs`). Thin: parse,
//! call the app, shape the answer. No secret is ever part of an answer.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::logins::progress::LoginStep;
use crate::app::logins::state::LoginState;
use crate::app::logins::ProviderStats;
use crate::app::App;
use crate::store::LoginRow;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLogin {
    /// `claude`, `codex` or `gemini` (see `GET /providers`).
    pub provider: String,
    /// The name of the caller's workspace to deliver to (default
    /// `default`); made if it does not run.
    #[serde(default)]
    pub workspace: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Login {
    pub id: String,
    pub provider: String,
    pub state: LoginState,
    /// Why it failed, expired or was cancelled.
    pub error: Option<String>,
    /// The provider's sign-in page, once the CLI printed it.
    pub login_url: Option<String>,
    /// The CLI waits for a code the user pastes (`POST /logins/{id}/code`).
    pub awaiting_code: bool,
    /// While `starting`: the step it is in (each has its own deadline, and
    /// a failure's reason begins with the step that failed).
    pub step: Option<LoginStep>,
    /// While its task runs: each step entered so far, in order, and when.
    pub steps: Vec<StepMark>,
    pub browser_sandbox_id: Option<String>,
    pub workspace_sandbox_id: Option<String>,
    /// The page that shows the browser sandbox's desktop.
    pub viewer_url: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StepMark {
    pub step: LoginStep,
    /// When the login entered it.
    pub at: String,
    /// Seconds from the login's creation.
    pub after_s: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LoginList {
    pub logins: Vec<Login>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginCode {
    pub code: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Provider {
    pub name: String,
    pub display_name: String,
    /// The CLI may ask for a code pasted back.
    pub takes_code: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderList {
    pub providers: Vec<Provider>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LoginStats {
    pub providers: BTreeMap<String, ProviderStats>,
}

use crate::app::rfc3339;

fn view(app: &App, row: LoginRow) -> Login {
    let marks = app.logins.progress.marks(&row.id);
    let step = (row.state == LoginState::Starting)
        .then(|| marks.last().map(|m| m.step))
        .flatten();
    Login {
        step,
        steps: marks
            .iter()
            .map(|m| StepMark {
                step: m.step,
                at: rfc3339(m.at_ms),
                after_s: (m.at_ms - row.created_at).max(0) as f64 / 1000.0,
            })
            .collect(),
        viewer_url: row
            .browser_sandbox_id
            .as_ref()
            .map(|s| format!("/view/{s}")),
        id: row.id,
        provider: row.provider,
        state: row.state,
        error: row.reason,
        login_url: row.login_url,
        awaiting_code: row.awaiting_code,
        browser_sandbox_id: row.browser_sandbox_id,
        workspace_sandbox_id: row.workspace_sandbox_id,
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(row.updated_at),
        expires_at: rfc3339(row.expires_at),
        finished_at: row.finished_at.map(rfc3339),
    }
}

#[utoipa::path(post, path = "/api/v1/logins", request_body = CreateLogin,
    responses((status = 201, body = Login), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody, description = "a quota or rate limit; see Retry-After"), (status = 503, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn create(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    body: Result<Json<CreateLogin>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let row = app
        .start_login_to(&user, &body.provider, body.workspace.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(view(&app, row))).into_response())
}

#[utoipa::path(get, path = "/api/v1/logins", responses((status = 200, body = LoginList)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<LoginList>, ApiError> {
    let rows = app.logins_list(&user).await?;
    Ok(Json(LoginList {
        logins: rows.into_iter().map(|r| view(&app, r)).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/logins/{id}", responses((status = 200, body = Login), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<Login>, ApiError> {
    let row = app.login_of(&user, &id).await?;
    Ok(Json(view(&app, row)))
}

#[utoipa::path(delete, path = "/api/v1/logins/{id}", responses((status = 202, body = Login), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = app.cancel_login(&user, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&app, row))).into_response())
}

#[utoipa::path(post, path = "/api/v1/logins/{id}/code", request_body = LoginCode,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn code(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    body: Result<Json<LoginCode>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) = body?;
    app.submit_code(&user, &id, &body.code).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/providers", responses((status = 200, body = ProviderList)))]
pub async fn providers(State(app): State<Arc<App>>, Caller(_user): Caller) -> Json<ProviderList> {
    Json(ProviderList {
        providers: app
            .providers()
            .list()
            .iter()
            .map(|p| Provider {
                name: p.name.clone(),
                display_name: p.display_name.clone(),
                takes_code: p.code_prompt.is_some(),
            })
            .collect(),
    })
}

/// The caller's own logins only.
#[utoipa::path(get, path = "/api/v1/login-stats", responses((status = 200, body = LoginStats)))]
pub async fn stats(State(app): State<Arc<App>>, Caller(user): Caller) -> Json<LoginStats> {
    Json(LoginStats {
        providers: app.login_stats(&user),
    })
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/logins", post(create).get(list))
        .route("/logins/{id}", get(get_one).delete(cancel))
        .route("/logins/{id}/code", post(code))
        .route("/providers", get(providers))
        .route("/login-stats", get(stats))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(create, list, get_one, cancel, code, providers, stats),
    components(schemas(
        CreateLogin,
        Login,
        LoginList,
        LoginCode,
        Provider,
        ProviderList,
        LoginStats,
        ProviderStats,
        LoginState,
        LoginStep,
        StepMark
    ))
)]
pub struct Doc;
