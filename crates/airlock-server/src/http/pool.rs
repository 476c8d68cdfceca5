//! `GET /api/v1/pool`: the warm pools, as the status the operator checks
//! (target, members ready, booting, stale). Sandboxes in a pool belong to
//! no user; this says only how many there are.

use super::auth::Caller;
use super::error::ApiError;
use crate::app::pool::PoolStatus;
use crate::app::App;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Pools {
    pub pools: Vec<PoolStatus>,
    /// Seconds a member may wait before it is replaced.
    pub max_age_s: u64,
}

#[utoipa::path(get, path = "/api/v1/pool", responses((status = 200, body = Pools)))]
pub async fn pools(
    State(app): State<Arc<App>>,
    Caller(_user): Caller,
) -> Result<Json<Pools>, ApiError> {
    Ok(Json(Pools {
        pools: app.pool_status().await?,
        max_age_s: app.cfg.pool.max_age.as_secs(),
    }))
}

pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/pool", get(pools))
}

#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(pools), components(schemas(Pools, PoolStatus)))]
pub struct Doc;

#[cfg(test)]
mod tests {
    #[test]
    fn the_pool_is_in_the_openapi_document() {
        let doc = serde_json::to_value(super::super::openapi()).expect("json");
        assert!(doc["paths"]["/api/v1/pool"]["get"].is_object());
        let schemas = &doc["components"]["schemas"];
        for field in ["kind", "target", "ready", "starting", "stale"] {
            assert!(
                schemas["PoolStatus"]["properties"][field].is_object(),
                "PoolStatus.{field}"
            );
        }
        assert!(schemas["Sandbox"]["properties"]["from_pool"].is_object());
    }
}
