//! Screen recordings of a sandbox (docs/recording.md): start, stop, list,
//! and download (with a single byte range, so a `<video>` can seek). Thin:
//! `recording::service` checks ownership and the login rule.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::App;
use crate::recording::Meta;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recording {
    pub id: String,
    pub sandbox_id: String,
    /// RFC 3339.
    pub started_at: String,
    /// Media time written so far (updated every two seconds while recording).
    pub duration_ms: u64,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    /// `true` while it is being written.
    pub active: bool,
    /// Why it ended (`stopped`, the size limit, the sandbox went away).
    pub ended: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecordingList {
    /// Recording may be started on this server (`[recording] enabled`).
    pub enabled: bool,
    /// The recording under way, if any.
    pub current: Option<String>,
    /// Oldest first.
    pub recordings: Vec<Recording>,
}

fn shape(m: Meta, current: Option<&str>) -> Recording {
    Recording {
        active: current == Some(m.id.as_str()),
        started_at: crate::app::rfc3339(m.started_at),
        id: m.id,
        sandbox_id: m.sandbox_id,
        duration_ms: m.duration_ms,
        bytes: m.bytes,
        width: m.width,
        height: m.height,
        ended: m.ended,
    }
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/recordings",
    params(("id" = String, Path, description = "the sandbox")),
    responses((status = 201, body = Recording),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "recording is off, the sandbox is a login's browser sandbox (unless `[recording] logins = true`), is being recorded already, or is not ready")))]
pub async fn start(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let meta = app.start_recording(&user, &id).await?;
    let rid = meta.id.clone();
    Ok((StatusCode::CREATED, Json(shape(meta, Some(&rid)))).into_response())
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/recordings",
    params(("id" = String, Path, description = "the sandbox")),
    responses((status = 200, body = RecordingList), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<RecordingList>, ApiError> {
    let (list, current) = app.recordings_of(&user, &id).await?;
    Ok(Json(RecordingList {
        enabled: app.recordings.cfg.enabled,
        recordings: list
            .into_iter()
            .map(|m| shape(m, current.as_deref()))
            .collect(),
        current,
    }))
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/recordings/{rid}",
    params(("id" = String, Path, description = "the sandbox"),
        ("rid" = String, Path, description = "`current`, or the id of the recording under way")),
    responses((status = 200, body = Recording, description = "stopped; the file is complete"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "not being recorded")))]
pub async fn stop(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path((id, rid)): Path<(String, String)>,
) -> Result<Json<Recording>, ApiError> {
    let meta = app.stop_recording(&user, &id, &rid).await?;
    Ok(Json(shape(meta, None)))
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range within `len`;
/// `Err` for one that cannot be met (416), `Ok(None)` for none or another form.
fn range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(s), Some(e)) => (s, e.min(len.saturating_sub(1))),
        (Some(s), None) if b.is_empty() => (s, len.saturating_sub(1)),
        (None, Some(n)) if a.is_empty() && n > 0 => (len.saturating_sub(n), len.saturating_sub(1)),
        _ => return Ok(None),
    };
    if len == 0 || start > end || start >= len {
        return Err(());
    }
    Ok(Some((start, end)))
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/recordings/{rid}",
    params(("id" = String, Path, description = "the sandbox"), ("rid" = String, Path, description = "the recording")),
    responses((status = 200, content_type = "video/mp4", description = "the fragmented MP4 (one being written is served as far as it is written)"),
        (status = 206, content_type = "video/mp4", description = "the byte range asked for with `Range: bytes=…`"),
        (status = 404, body = ErrorBody, description = "no such recording of the caller's"),
        (status = 416, body = ErrorBody)))]
pub async fn download(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path((id, rid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (meta, path) = app.recording_of(&user, &id, &rid).await?;
    let gone = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("recording {rid:?} not found"),
        )
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(|_| gone())?;
    let len = file.metadata().await.map_err(|_| gone())?.len();
    let name = format!(
        "attachment; filename=\"{}-{}.mp4\"",
        meta.sandbox_id, meta.id
    );
    let (status, start, end) = match range(&headers, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
        Err(()) => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "bad_request",
                format!("the range is outside the recording's {len} bytes"),
            )
            .into_response();
            if let Ok(v) = format!("bytes */{len}").parse() {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|_| gone())?;
    let body = Body::from_stream(chunks(file.take(end - start)));
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "video/mp4")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::CONTENT_DISPOSITION, name);
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    resp.body(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// The file in chunks of 64 KiB, as it is read.
fn chunks(
    rd: tokio::io::Take<tokio::fs::File>,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    futures::stream::try_unfold(rd, |mut rd| async move {
        let mut buf = vec![0; 64 * 1024];
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((buf, rd)))
    })
}

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sandboxes/{id}/recordings", get(list).post(start))
        .route(
            "/sandboxes/{id}/recordings/{rid}",
            get(download).delete(stop),
        )
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(start, list, stop, download),
    components(schemas(Recording, RecordingList))
)]
pub struct Doc;

#[cfg(test)]
mod tests {
    use super::range;
    use axum::http::{header, HeaderMap};

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, v.parse().expect("test data"));
        h
    }

    #[test]
    fn recordings_are_in_the_openapi_document() {
        let doc = serde_json::to_value(super::super::openapi()).expect("json");
        let paths = &doc["paths"];
        let list = &paths["/api/v1/sandboxes/{id}/recordings"];
        assert!(list["get"].is_object() && list["post"].is_object());
        let one = &paths["/api/v1/sandboxes/{id}/recordings/{rid}"];
        assert!(one["get"].is_object() && one["delete"].is_object());
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(range(&HeaderMap::new(), 100), Ok(None));
        assert_eq!(range(&with("bytes=0-"), 100), Ok(Some((0, 99))));
        assert_eq!(range(&with("bytes=10-19"), 100), Ok(Some((10, 19))));
        assert_eq!(range(&with("bytes=90-500"), 100), Ok(Some((90, 99))));
        assert_eq!(range(&with("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(range(&with("bytes=100-"), 100), Err(()));
        assert_eq!(range(&with("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(range(&with("items=0-1"), 100), Ok(None));
    }
}
