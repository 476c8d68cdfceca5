//! The `/api/v1` endpoints of egress (owned by the egress work).

use crate::app::App;
use axum::Router;
use std::sync::Arc;

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi()]
pub struct Doc;
