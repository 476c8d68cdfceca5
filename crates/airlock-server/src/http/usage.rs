//! `GET /api/v1/usage`: the caller's quotas and how much of them is used.

use super::auth::Caller;
use super::error::ApiError;
use crate::app::admission::{HostRoom, Quotas, Usage, Used};
use crate::app::App;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

#[utoipa::path(get, path = "/api/v1/usage", responses((status = 200, body = Usage)))]
pub async fn usage(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<Usage>, ApiError> {
    Ok(Json(app.admission.usage(&user.id).await?))
}

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/usage", get(usage))
}

#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(usage), components(schemas(Usage, Quotas, Used, HostRoom)))]
pub struct Doc;

#[cfg(test)]
mod tests {
    #[test]
    fn usage_is_in_the_openapi_document() {
        let doc = serde_json::to_value(super::super::openapi()).expect("json");
        let get = &doc["paths"]["/api/v1/usage"]["get"];
        assert!(get.is_object(), "no GET /api/v1/usage");
        let schemas = &doc["components"]["schemas"];
        for field in ["limits", "used", "host"] {
            assert!(
                schemas["Usage"]["properties"][field].is_object(),
                "Usage.{field}"
            );
        }
        assert!(schemas["Used"]["properties"]["creates_last_minute"].is_object());
        let create = &doc["paths"]["/api/v1/sandboxes"]["post"]["responses"];
        assert!(create["429"].is_object(), "429 documented on create");
    }
}
