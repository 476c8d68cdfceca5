//! The web terminal: `/term/{id}` (web/terminal.html, a PTY in the sandbox
//! over the process API) and xterm.js, embedded at build time from the npm
//! package pinned in web/package-lock.json.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

#[derive(rust_embed::RustEmbed)]
#[folder = "../../web/"]
#[include = "terminal.html"]
struct Page;

/// xterm.js: the script and its style sheet only.
#[derive(rust_embed::RustEmbed)]
#[folder = "../../web/node_modules/@xterm/xterm/"]
#[include = "lib/xterm.js"]
#[include = "css/xterm.css"]
struct XTerm;

fn serve<E: rust_embed::RustEmbed>(path: &str) -> Response {
    match E::get(path) {
        Some(file) => (
            [
                (header::CONTENT_TYPE, file.metadata.mimetype().to_owned()),
                (header::CACHE_CONTROL, "no-cache".to_owned()),
            ],
            file.data,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

async fn page(Path(_id): Path<String>) -> Response {
    serve::<Page>("terminal.html")
}

async fn xterm(Path(path): Path<String>) -> Response {
    serve::<XTerm>(&path)
}

/// Routes outside `/api/v1`.
pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/term/{id}", get(page))
        .route("/xterm/{*path}", get(xterm))
}
