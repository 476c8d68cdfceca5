//! The caller: from `Authorization: Bearer …`, or the token-less local user
//! when the front door (`guard`) marked the request local. The viewer
//! WebSockets (browsers cannot set headers there) also take a single-use
//! `?ticket=`, and for one more release the API token as `?token=`.

use super::error::ApiError;
use super::guard::LocalCaller;
use crate::app::App;
use crate::store::UserRow;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Caller(pub UserRow);

/// The caller of a viewer WebSocket (`/sandboxes/{id}/vnc`, `/stream`).
#[derive(Debug)]
pub struct ViewerCaller(pub UserRow);

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// The bearer token, `None` without the header, refused when malformed.
fn bearer(parts: &Parts) -> Result<Option<String>, ApiError> {
    let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Some(t.trim().to_owned()))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))
}

fn query_param(parts: &Parts, name: &str) -> Option<String> {
    let query = parts.uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn header_or_local(parts: &Parts, app: &Arc<App>) -> Result<UserRow, ApiError> {
    let token = bearer(parts)?;
    let local = parts.extensions.get::<LocalCaller>().is_some();
    Ok(app.authenticate(token.as_deref(), local).await?)
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        header_or_local(parts, app).await.map(Caller)
    }
}

/// `?token=` on a viewer socket is said once per process, never with its value.
static TOKEN_IN_URL_WARNED: AtomicBool = AtomicBool::new(false);

impl FromRequestParts<Arc<App>> for ViewerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        if parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            return header_or_local(parts, app).await.map(ViewerCaller);
        }
        if let Some(ticket) = query_param(parts, "ticket") {
            let Path(id) = Path::<String>::from_request_parts(parts, app)
                .await
                .map_err(|_| ApiError::bad_request("the sandbox id in the path is not valid"))?;
            return app
                .redeem_ticket(&ticket, &id)
                .await?
                .map(ViewerCaller)
                .ok_or_else(|| {
                    unauthorized(
                        "the viewer ticket is unknown, used, expired, for another sandbox, \
                     or its user may no longer sign in; get a new one with \
                     POST /api/v1/sandboxes/{id}/tickets",
                    )
                });
        }
        if let Some(token) = query_param(parts, "token") {
            if !TOKEN_IN_URL_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "a viewer WebSocket was opened with the API token in its URL (?token=); \
                     that is deprecated and goes in the next release: use a viewer ticket \
                     (POST /api/v1/sandboxes/{{id}}/tickets) instead"
                );
            }
            return Ok(ViewerCaller(app.authenticate(Some(&token), false).await?));
        }
        header_or_local(parts, app).await.map(ViewerCaller)
    }
}
