//! HTTP: the `/api/v1` routes, the OpenAPI document, health, metrics, and the UI.

pub mod auth;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod files;
pub mod guard;
pub mod logins;
pub mod nodes;
pub mod pool;
pub mod processes;
pub mod recordings;
pub mod sandboxes;
pub mod shares;
pub mod terminal;
pub mod tickets;
pub mod usage;
pub mod web;
pub mod workspaces;

use crate::app::App;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::future::Future;
use std::sync::Arc;
use utoipa::OpenApi;

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "airlock", description = "Disposable desktops in the browser"),
    paths(sandboxes::create, sandboxes::list, sandboxes::get, sandboxes::delete, sandboxes::exec, sandboxes::vnc, sandboxes::stream),
    components(schemas(
        sandboxes::CreateSandbox, sandboxes::Sandbox, sandboxes::SandboxList, sandboxes::ExecBody,
        sandboxes::ExecResult, error::ErrorBody, error::ErrorDetail, crate::app::state::SandboxState
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The whole OpenAPI document: sandboxes, logins, egress.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(logins::Doc::openapi());
    doc.merge(credentials::Doc::openapi());
    doc.merge(egress::Doc::openapi());
    doc.merge(tickets::Doc::openapi());
    doc.merge(usage::Doc::openapi());
    doc.merge(processes::Doc::openapi());
    doc.merge(files::Doc::openapi());
    doc.merge(pool::Doc::openapi());
    doc.merge(workspaces::Doc::openapi());
    doc.merge(nodes::Doc::openapi());
    doc.merge(shares::Doc::openapi());
    doc.merge(recordings::Doc::openapi());
    doc
}

/// Request bodies are small JSON documents.
const BODY_LIMIT: usize = 64 * 1024;

/// The whole HTTP surface, behind the front door (`guard`): it needs the
/// connection's addresses, so serve it with
/// `into_make_service_with_connect_info::<guard::Peer>()` as [`serve`] does.
pub fn router(app: Arc<App>) -> Router {
    let door = Arc::new(guard::Guard::new(&app.cfg));
    let api = Router::new()
        .route("/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/sandboxes/{id}/exec", post(sandboxes::exec))
        .route("/sandboxes/{id}/vnc", get(sandboxes::vnc))
        .route("/sandboxes/{id}/stream", get(sandboxes::stream))
        .merge(logins::routes())
        .merge(credentials::routes())
        .merge(egress::routes())
        .merge(tickets::routes())
        .merge(usage::routes())
        .merge(processes::routes())
        .merge(files::routes())
        .merge(pool::routes())
        .merge(workspaces::routes())
        .merge(nodes::routes())
        .merge(shares::routes())
        .merge(recordings::routes())
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "no such API endpoint",
            )
        });
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/", get(web::index))
        .route("/view/{id}", get(web::viewer))
        .route("/novnc/{*path}", get(web::novnc))
        .merge(terminal::routes())
        .route("/{*path}", get(web::asset))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(door, guard::guard))
        // The path only: a query may hold a viewer ticket or a token.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<axum::body::Body>| {
                    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
                },
            ),
        )
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let counts = app.store.count_by_state().await.unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(&counts),
    )
}

/// Serve until `shutdown` resolves. The caller owns the listener, so tests bind
/// port 0 and read the address back.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(app).into_make_service_with_connect_info::<guard::Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
