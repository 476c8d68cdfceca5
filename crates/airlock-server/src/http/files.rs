//! `PUT`/`GET /api/v1/sandboxes/{id}/files?path=…`: one file up or down, or a
//! directory down as a tar stream. Thin: the agent confines the path to the
//! sandbox user's home (and /tmp) and writes as that user.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::App;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
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
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file, at most 64 MiB; streamed to the sandbox as it arrives, written beside the target and renamed over it once whole"),
    responses((status = 200, body = FileWritten),
        (status = 400, body = ErrorBody, description = "no ?path=, a path that names no file, a directory that does not exist, or an upload that broke off"),
        (status = 403, body = ErrorBody, description = "a path with '..', outside the home and /tmp, through a symlink that leads out, or a symlink itself; the message names the path and why"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody, description = "more than 64 MiB (said by Content-Length, or counted as it streams); nothing is left behind")))]
pub async fn put(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FileWritten>, ApiError> {
    let path = query(q)?;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let info = app.put_file(&user, &id, &path, announced, body).await?;
    Ok(Json(FileWritten {
        path: info.path,
        size: info.size,
    }))
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "the sandbox"), FileQuery),
    responses((status = 200, description = "the file (application/octet-stream), or a directory as a tar stream (application/x-tar), sent as it is read"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody, description = "a path that leads out of the home and /tmp, or one the user may not read"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody, description = "a directory whose tar would exceed 1 GiB")))]
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
    // The upload is streamed on to the agent (no body extractor): the app
    // counts it against MAX_FILE_BYTES as it passes.
    Router::new().route("/sandboxes/{id}/files", get(get_file).put(put))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(put, get_file), components(schemas(FileWritten)))]
pub struct Doc;
