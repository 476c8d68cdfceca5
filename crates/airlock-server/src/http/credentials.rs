//! The `/api/v1` endpoints of stored credentials and their audit trail:
//! list (metadata and health only), revoke, and the caller's events. Thin:
//! parse, call the app (`app/credentials.rs`), shape the answer. No secret
//! is ever part of an answer.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::credentials::{AuditKind, CredentialView, Health};
use crate::app::{rfc3339, App};
use crate::store::AuditRow;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Metadata of stored credentials; never the credentials.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Credential {
    pub provider: String,
    /// The login that captured them.
    pub login_id: String,
    pub created_at: String,
    /// The last change: a login, or a re-capture of the CLI's refreshed files.
    pub updated_at: String,
    pub delivered_at: Option<String>,
    /// When the credentials expire, as read from the CLI's file where the
    /// provider definition says; null when it states none.
    pub expires_at: Option<String>,
    /// The last health check's finding, judged again against the clock;
    /// null until the first check.
    pub status: Option<Health>,
    /// Why, for a status other than healthy (never a secret).
    pub detail: Option<String>,
    /// When the last check ran.
    pub checked_at: Option<String>,
    /// The workspace the last check looked into.
    pub workspace_sandbox_id: Option<String>,
    /// 1 as a login captured them, one more for each re-capture.
    pub version: i64,
    /// The CLI holds a refresh token and renews its access itself (null:
    /// the provider names none).
    pub refreshable: Option<bool>,
    /// The status calls for a new login (`POST /logins`).
    pub sign_in_again: bool,
    /// The names of the caller's workspaces it was delivered to.
    pub workspaces: Vec<String>,
}

/// Where to deliver stored credentials.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deliver {
    /// The name of one of the caller's workspaces, which must be ready
    /// (default `default`).
    #[serde(default)]
    pub workspace: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Delivered {
    pub provider: String,
    pub workspace: String,
    pub workspace_sandbox_id: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CredentialList {
    pub credentials: Vec<Credential>,
}

/// One event of the caller's audit trail.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEvent {
    pub id: String,
    pub at: String,
    /// `captured`, `delivered`, `recaptured`, `expired`, `refresh_failed`, `revoked`.
    pub kind: String,
    pub provider: String,
    pub workspace_sandbox_id: Option<String>,
    pub login_id: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub events: Vec<AuditEvent>,
    /// Pass as `before` for the next (older) page; null on the last.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// 1 to 200, default 50.
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub before: Option<String>,
}

fn view(v: CredentialView) -> Credential {
    let sign_in_again = v.sign_in_again();
    let h = v.health;
    Credential {
        provider: v.record.provider,
        login_id: v.record.login_id,
        created_at: rfc3339(v.record.created_at),
        updated_at: rfc3339(v.record.updated_at),
        delivered_at: v.record.delivered_at.map(rfc3339),
        expires_at: h.as_ref().and_then(|h| h.expires_at).map(rfc3339),
        status: v.status,
        detail: h.as_ref().and_then(|h| h.detail.clone()),
        checked_at: h.as_ref().map(|h| rfc3339(h.checked_at)),
        workspace_sandbox_id: h.as_ref().and_then(|h| h.workspace_sandbox_id.clone()),
        version: h.as_ref().map_or(1, |h| h.version),
        refreshable: v.refreshable,
        sign_in_again,
        workspaces: v.workspaces,
    }
}

fn event(r: AuditRow) -> AuditEvent {
    AuditEvent {
        id: r.id,
        at: rfc3339(r.at),
        kind: r.kind,
        provider: r.provider,
        workspace_sandbox_id: r.workspace_sandbox_id,
        login_id: r.login_id,
        detail: r.detail,
    }
}

#[utoipa::path(get, path = "/api/v1/credentials", responses((status = 200, body = CredentialList)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<CredentialList>, ApiError> {
    let rows = app.credentials_view(&user).await?;
    Ok(Json(CredentialList {
        credentials: rows.into_iter().map(view).collect(),
    }))
}

/// Revoke: the vault record goes, and the files leave the caller's
/// workspace (now if one runs, else before it is used again). A second
/// call finds nothing and changes nothing; another user's are untouched.
#[utoipa::path(delete, path = "/api/v1/credentials/{provider}",
    params(("provider" = String, Path, description = "`claude`, `codex`, `gemini`, …")),
    responses((status = 204, description = "revoked, or there was nothing to revoke"), (status = 400, body = ErrorBody)))]
pub async fn revoke(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(provider): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.revoke_credentials(&user, &provider).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deliver the stored credentials to another of the caller's workspaces
/// (the same record: a refresh in either is captured back, and a revocation
/// removes the files from both).
#[utoipa::path(post, path = "/api/v1/credentials/{provider}/deliver", request_body = Deliver,
    params(("provider" = String, Path, description = "`claude`, `codex`, `gemini`, …")),
    responses((status = 200, body = Delivered), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such credentials or workspace"),
        (status = 409, body = ErrorBody, description = "the workspace is not ready, or the credentials were revoked meanwhile"),
        (status = 503, body = ErrorBody)))]
pub async fn deliver(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(provider): Path<String>,
    body: Result<Json<Deliver>, JsonRejection>,
) -> Result<Json<Delivered>, ApiError> {
    let Json(body) = body?;
    let ws = app
        .deliver_to(&user, &provider, body.workspace.as_deref())
        .await?;
    Ok(Json(Delivered {
        provider,
        workspace: body
            .workspace
            .unwrap_or_else(|| crate::app::workspaces::DEFAULT.to_owned()),
        workspace_sandbox_id: ws.id,
    }))
}

/// The caller's credential events, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody)))]
pub async fn audit(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (rows, next) = app.audit_page(&user, q.before.as_deref(), q.limit).await?;
    Ok(Json(AuditPage {
        events: rows.into_iter().map(event).collect(),
        next,
    }))
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/credentials", get(list))
        .route("/credentials/{provider}", axum::routing::delete(revoke))
        .route(
            "/credentials/{provider}/deliver",
            axum::routing::post(deliver),
        )
        .route("/audit", get(audit))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(list, revoke, deliver, audit),
    components(schemas(
        Credential,
        CredentialList,
        Deliver,
        Delivered,
        AuditEvent,
        AuditPage,
        Health,
        AuditKind
    ))
)]
pub struct Doc;
