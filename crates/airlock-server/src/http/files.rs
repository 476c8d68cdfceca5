//! `PUT`/`GET /api/v1/sandboxes/{id}/files?path=…`: one file up or down, or a
//! directory down as a tar stream. Thin: the agent confines the path to the
//! sandbox user's home (and /tmp) and writes as that user.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::App;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// Relative to the sandbox user's home, or absolute inside it or /tmp.
    pub path: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileWritten {
    /// Where the file is, absolute.
    pub path: String,
    pub size: u64,
}

fn query(q: Result<Query<FileQuery>, QueryRejection>) -> Result<String, ApiError> {
    q.map(|Query(q)| q.path)
        .map_err(|e| ApiError::bad_request(format!("{} (?path= is required)", e.body_text())))
}

#[utoipa::path(put, path = "/api/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "the sandbox"), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file, at most 64 MiB"),
    responses((status = 200, body = FileWritten), (status = 400, body = ErrorBody, description = "a path outside the home or /tmp, through a symlink that leads out, or a parent that is not a directory; the message names the path and why"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn put(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<FileWritten>, ApiError> {
    let path = query(q)?;
    let body = body.map_err(|r| {
        ApiError::new(
            r.status(),
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            },
            format!(
                "{} (files are at most {} MiB)",
                r.body_text(),
                airlock_proto::process::MAX_FILE_BYTES >> 20
            ),
        )
    })?;
    let info = app.put_file(&user, &id, &path, body).await?;
    Ok(Json(FileWritten {
        path: info.path,
        size: info.size,
    }))
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "the sandbox"), FileQuery),
    responses((status = 200, description = "the file (application/octet-stream), or a directory as a tar stream (application/x-tar)"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn get_file(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let path = query(q)?;
    let download = app.get_file(&user, &id, &path).await?;
    Ok((
        [(header::CONTENT_TYPE, download.content_type)],
        download.body,
    )
        .into_response())
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route(
        "/sandboxes/{id}/files",
        get(get_file).put(put).layer(DefaultBodyLimit::max(
            airlock_proto::process::MAX_FILE_BYTES,
        )),
    )
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(put, get_file), components(schemas(FileWritten)))]
pub struct Doc;
