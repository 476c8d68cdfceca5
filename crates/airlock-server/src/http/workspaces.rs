//! `GET /api/v1/workspaces`: the caller's named workspaces, the sandbox
//! running each, and which providers' credentials each holds. Thin: the
//! logic is in `app/workspaces.rs`.

use super::auth::Caller;
use super::error::ApiError;
use crate::app::state::SandboxState;
use crate::app::App;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

/// One named workspace. Its home volume is kept under its name, so a
/// workspace made again under the same name has the same home.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Workspace {
    pub name: String,
    /// The sandbox running it now (null: none runs).
    pub sandbox_id: Option<String>,
    pub state: Option<SandboxState>,
    /// Providers whose credentials were delivered here.
    pub providers: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkspaceList {
    pub workspaces: Vec<Workspace>,
}

#[utoipa::path(get, path = "/api/v1/workspaces", responses((status = 200, body = WorkspaceList)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<WorkspaceList>, ApiError> {
    let all = app.workspaces(&user).await?;
    Ok(Json(WorkspaceList {
        workspaces: all
            .into_iter()
            .map(|w| Workspace {
                name: w.name,
                sandbox_id: w.sandbox.as_ref().map(|s| s.id.clone()),
                state: w.sandbox.map(|s| s.state),
                providers: w.providers,
            })
            .collect(),
    }))
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/workspaces", get(list))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(paths(list), components(schemas(Workspace, WorkspaceList)))]
pub struct Doc;
