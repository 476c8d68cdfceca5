//! `POST /api/v1/sandboxes/{id}/tickets`: a short-lived, single-use ticket
//! for a viewer WebSocket URL, so the API token never travels in a URL.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::App;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Ticket {
    /// Good for one WebSocket connection to this sandbox, by its owner.
    pub ticket: String,
    /// RFC 3339; at most 60 s after it was issued.
    pub expires_at: String,
    /// The noVNC socket, with the ticket: a path on this server (use ws:// or wss://).
    pub vnc_url: String,
    /// The WebRTC signalling socket, with the ticket (same use).
    pub stream_url: String,
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/tickets",
    responses((status = 201, body = Ticket), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let issued = app.issue_ticket(&user, &id).await?;
    let path = format!(
        "/api/v1/sandboxes/{}",
        percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC)
    );
    let body = Ticket {
        vnc_url: format!("{path}/vnc?ticket={}", issued.ticket),
        stream_url: format!("{path}/stream?ticket={}", issued.ticket),
        expires_at: super::sandboxes::rfc3339(issued.expires_at),
        ticket: issued.ticket,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/sandboxes/{id}/tickets", post(create))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(create), components(schemas(Ticket)))]
pub struct Doc;
