//! View shares (`app::shares`): `POST/GET /sandboxes/{id}/shares`,
//! `PATCH/DELETE /sandboxes/{id}/shares/{share_id}`, and [`Viewer`], the
//! caller of a viewer WebSocket that may be a share's holder (`?share=`).

use super::auth::{Caller, ViewerCaller};
use super::error::{ApiError, ErrorBody};
use crate::app::shares::DEFAULT_TTL;
use crate::app::App;
use crate::store::{ShareRow, UserRow};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateShare {
    /// Seconds the link works, 60 to 86400; 3600 when omitted.
    pub ttl_s: Option<u64>,
    /// Let the holder type, click and paste. Off unless asked for.
    #[serde(default)]
    pub input: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateShare {
    pub input: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Share {
    pub id: String,
    pub sandbox_id: String,
    pub input: bool,
    /// RFC 3339.
    pub created_at: String,
    pub expires_at: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewShare {
    #[serde(flatten)]
    pub share: Share,
    /// The viewer page with the secret in its fragment (a path on this
    /// server; browsers do not send the fragment, so it stays out of logs).
    /// Shown once: the server keeps only the secret's digest.
    pub url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ShareList {
    pub shares: Vec<Share>,
}

fn view(row: ShareRow) -> Share {
    Share {
        id: row.id,
        sandbox_id: row.sandbox_id,
        input: row.input,
        created_at: super::sandboxes::rfc3339(row.created_at),
        expires_at: super::sandboxes::rfc3339(row.expires_at),
    }
}

#[utoipa::path(post, path = "/api/v1/sandboxes/{id}/shares", request_body = CreateShare,
    responses((status = 201, body = NewShare), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
    body: Result<Json<CreateShare>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let ttl = body.ttl_s.map_or(DEFAULT_TTL, Duration::from_secs);
    let made = app.create_share(&user, &id, ttl, body.input).await?;
    let url = format!(
        "/view/{}#share={}",
        percent_encoding::utf8_percent_encode(
            &made.row.sandbox_id,
            percent_encoding::NON_ALPHANUMERIC
        ),
        made.secret
    );
    let body = NewShare {
        share: view(made.row),
        url,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(get, path = "/api/v1/sandboxes/{id}/shares",
    responses((status = 200, body = ShareList), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path(id): Path<String>,
) -> Result<Json<ShareList>, ApiError> {
    let rows = app.shares(&user, &id).await?;
    Ok(Json(ShareList {
        shares: rows.into_iter().map(view).collect(),
    }))
}

#[utoipa::path(patch, path = "/api/v1/sandboxes/{id}/shares/{share_id}", request_body = UpdateShare,
    responses((status = 200, body = Share), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path((id, share_id)): Path<(String, String)>,
    body: Result<Json<UpdateShare>, JsonRejection>,
) -> Result<Json<Share>, ApiError> {
    let Json(body) = body?;
    Ok(Json(view(
        app.set_share_input(&user, &id, &share_id, body.input)
            .await?,
    )))
}

#[utoipa::path(delete, path = "/api/v1/sandboxes/{id}/shares/{share_id}",
    responses((status = 204, description = "revoked; its open viewers close"), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    Caller(user): Caller,
    Path((id, share_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.revoke_share(&user, &id, &share_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Routes under `/api/v1`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sandboxes/{id}/shares", post(create).get(list))
        .route(
            "/sandboxes/{id}/shares/{share_id}",
            patch(update).delete(delete),
        )
}

/// This module's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(create, list, update, delete),
    components(schemas(CreateShare, UpdateShare, Share, NewShare, ShareList))
)]
pub struct Doc;

/// Who opens a viewer WebSocket: the owner ([`ViewerCaller`]), or the holder
/// of a share (`?share=vs_…`), who views the owner's sandbox through a gate.
#[derive(Debug)]
pub struct Viewer {
    /// The sandbox's owner (whose sandbox is looked up).
    pub user: UserRow,
    /// Set for a share's holder.
    pub share: Option<ShareRow>,
}

fn share_param(parts: &Parts) -> Option<String> {
    let query = parts.uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "share")
        .map(|(_, v)| v.into_owned())
}

impl FromRequestParts<Arc<App>> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let Some(secret) = share_param(parts) else {
            let ViewerCaller(user) = ViewerCaller::from_request_parts(parts, app).await?;
            return Ok(Viewer { user, share: None });
        };
        let Path(id) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(|_| ApiError::bad_request("the sandbox id in the path is not valid"))?;
        match app.redeem_share(&secret, &id).await? {
            Some(r) => Ok(Viewer {
                user: r.owner,
                share: Some(r.share),
            }),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the share link is unknown, revoked, expired or for another sandbox; \
                 ask the sandbox's owner for a new one",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::app::lifecycle_tests::World;
    use serde_json::{json, Value};

    #[test]
    fn shares_are_in_the_openapi_document() {
        let doc = serde_json::to_value(super::super::openapi()).expect("json");
        let paths = &doc["paths"];
        let list = &paths["/api/v1/sandboxes/{id}/shares"];
        assert!(list["post"].is_object() && list["get"].is_object());
        let one = &paths["/api/v1/sandboxes/{id}/shares/{share_id}"];
        assert!(one["patch"].is_object() && one["delete"].is_object());
        let vnc = paths["/api/v1/sandboxes/{id}/vnc"]["get"]["parameters"].to_string();
        assert!(vnc.contains("\"share\""), "{vnc}");
        let schemas = &doc["components"]["schemas"];
        for field in ["id", "input", "expires_at"] {
            assert!(
                schemas["Share"]["properties"][field].is_object(),
                "Share.{field}"
            );
        }
    }

    /// The share API over the real app and the fakes: bounds, the secret
    /// shown once, list, switch, revoke.
    #[tokio::test]
    async fn the_share_api_over_fakes() {
        let w = World::new().await;
        let (base, server, http) = w.serve().await;
        let send = |req: reqwest::RequestBuilder| async move {
            let resp = req.send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        };
        let (_, sb) = send(
            http.post(format!("{base}/sandboxes"))
                .json(&json!({"kind": "browser"})),
        )
        .await;
        let id = sb["id"].as_str().expect("id").to_owned();
        let (status, body) = send(
            http.post(format!("{base}/sandboxes/{id}/shares"))
                .json(&json!({"ttl_s": 90000})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = send(
            http.post(format!("{base}/sandboxes/{id}/shares"))
                .json(&json!({"ttl_s": 600})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["input"], false);
        let url = body["url"].as_str().expect("url");
        assert!(url.starts_with(&format!("/view/{id}#share=vs_")), "{url}");
        let share_id = body["id"].as_str().expect("id").to_owned();
        let (status, list) = send(http.get(format!("{base}/sandboxes/{id}/shares"))).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["shares"][0]["id"], share_id.as_str());
        assert!(
            !list.to_string().contains("vs_"),
            "no secret in a list: {list}"
        );
        let (status, body) = send(
            http.patch(format!("{base}/sandboxes/{id}/shares/{share_id}"))
                .json(&json!({"input": true})),
        )
        .await;
        assert_eq!(
            (status, body["input"].clone()),
            (200, json!(true)),
            "{body}"
        );
        let (status, _) =
            send(http.delete(format!("{base}/sandboxes/{id}/shares/{share_id}"))).await;
        assert_eq!(status, 204);
        let (status, body) =
            send(http.delete(format!("{base}/sandboxes/{id}/shares/{share_id}"))).await;
        assert_eq!(status, 404, "{body}");
        server.abort();
    }
}
