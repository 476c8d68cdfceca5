//! The `/api/v1` endpoints of egress. The account, per-user upstreams and
//! settings are for admins (users added with `airlock user add NAME --admin`,
//! and not disabled; the token-less `local` user is not one by being local);
//! a sandbox's egress status is for its owner.

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::egress::{
    AccountInput, AccountView, BlockedView, EgressSettings, SandboxEgress, UserEgressView,
    UserUpstreamInput,
};
use crate::app::App;
use crate::store::UserRow;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sandboxes/{id}/egress", get(sandbox_egress))
        .route(
            "/egress/account",
            get(get_account).put(put_account).delete(delete_account),
        )
        .route(
            "/egress/users/{name}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/egress/settings", get(get_settings).put(put_settings))
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(
        sandbox_egress,
        get_account,
        put_account,
        delete_account,
        get_user,
        put_user,
        delete_user,
        get_settings,
        put_settings
    ),
    components(schemas(
        AccountInput,
        AccountView,
        UserUpstreamInput,
        UserEgressView,
        EgressSettings,
        SandboxEgress,
        BlockedView
    ))
)]
pub struct Doc;

fn admin(app: &App, user: &UserRow) -> Result<(), ApiError> {
    if app.is_egress_admin(user) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the admin may change egress settings",
        ))
    }
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/egress",
    responses((status = 200, body = SandboxEgress), (status = 404, body = ErrorBody)))]
pub async fn sandbox_egress(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxEgress>, ApiError> {
    Ok(Json(app.sandbox_egress(&user, &id).await?))
}

#[utoipa::path(get, path = "/api/v1/egress/account",
    responses((status = 200, body = AccountView), (status = 404, body = ErrorBody)))]
pub async fn get_account(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<AccountView>, ApiError> {
    admin(&app, &user)?;
    crate::app::egress::account(&app.store)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no provider account is set",
            )
        })
}

#[utoipa::path(put, path = "/api/v1/egress/account", request_body = AccountInput,
    responses((status = 200, body = AccountView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn put_account(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    body: Result<Json<AccountInput>, JsonRejection>,
) -> Result<Json<AccountView>, ApiError> {
    admin(&app, &user)?;
    let Json(body) = body?;
    Ok(Json(app.set_egress_account(&body).await?))
}

#[utoipa::path(delete, path = "/api/v1/egress/account",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_account(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<StatusCode, ApiError> {
    admin(&app, &user)?;
    if app.clear_egress_account().await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no provider account is set",
        ))
    }
}

#[utoipa::path(get, path = "/api/v1/egress/users/{name}",
    responses((status = 200, body = UserEgressView), (status = 404, body = ErrorBody)))]
pub async fn get_user(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(name): Path<String>,
) -> Result<Json<UserEgressView>, ApiError> {
    admin(&app, &user)?;
    Ok(Json(
        crate::app::egress::user_egress(&app.store, &name).await?,
    ))
}

#[utoipa::path(put, path = "/api/v1/egress/users/{name}", request_body = UserUpstreamInput,
    responses((status = 200, body = UserEgressView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_user(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(name): Path<String>,
    body: Result<Json<UserUpstreamInput>, JsonRejection>,
) -> Result<Json<UserEgressView>, ApiError> {
    admin(&app, &user)?;
    let Json(body) = body?;
    Ok(Json(app.set_user_egress(&name, &body.url).await?))
}

#[utoipa::path(delete, path = "/api/v1/egress/users/{name}",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_user(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&app, &user)?;
    if app.clear_user_egress(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("user {name:?} has no explicit upstream"),
        ))
    }
}

#[utoipa::path(get, path = "/api/v1/egress/settings",
    responses((status = 200, body = EgressSettings)))]
pub async fn get_settings(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
) -> Result<Json<EgressSettings>, ApiError> {
    admin(&app, &user)?;
    Ok(Json(crate::app::egress::settings(&app.store).await?))
}

#[utoipa::path(put, path = "/api/v1/egress/settings", request_body = EgressSettings,
    responses((status = 200, body = EgressSettings), (status = 400, body = ErrorBody)))]
pub async fn put_settings(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    body: Result<Json<EgressSettings>, JsonRejection>,
) -> Result<Json<EgressSettings>, ApiError> {
    admin(&app, &user)?;
    let Json(body) = body?;
    Ok(Json(
        crate::app::egress::set_settings(&app.store, &body).await?,
    ))
}
