//! The caller, from `Authorization: Bearer …` or, for WebSockets (browsers
//! cannot set headers there), a `token` query parameter.

use super::error::ApiError;
use crate::app::App;
use crate::store::UserRow;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use std::sync::Arc;

#[derive(Debug)]
pub struct Caller(pub UserRow);

fn token_from(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(str::to_owned))
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let has_header = parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION);
        let token = token_from(parts);
        if has_header && token.is_none() {
            return Err(ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the Authorization header must be `Bearer <token>`",
            ));
        }
        Ok(Caller(app.authenticate(token.as_deref()).await?))
    }
}
