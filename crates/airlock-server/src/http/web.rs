//! The web UI and noVNC, embedded into the binary at build time (the noVNC
//! files come from the npm package pinned in web/package-lock.json).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The UI's own files (never anything under node_modules).
#[derive(rust_embed::RustEmbed)]
#[folder = "../../web/"]
#[include = "*.html"]
#[include = "*.js"]
#[include = "*.css"]
#[include = "*.svg"]
#[exclude = "node_modules/**"]
#[exclude = "tests/**"]
struct Assets;

/// noVNC, from the npm package pinned in web/package-lock.json.
#[derive(rust_embed::RustEmbed)]
#[folder = "../../web/node_modules/@novnc/novnc/"]
#[include = "core/**"]
#[include = "vendor/**"]
#[exclude = "**/tests/**"]
struct NoVnc;

fn serve<E: rust_embed::RustEmbed>(path: &str) -> Response {
    match E::get(path) {
        Some(file) => {
            let mime = file.metadata.mimetype().to_owned();
            (
                [
                    (header::CONTENT_TYPE, mime),
                    (header::CACHE_CONTROL, "no-cache".to_owned()),
                ],
                file.data,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

pub async fn index() -> Response {
    serve::<Assets>("index.html")
}

pub async fn viewer(Path(_id): Path<String>) -> Response {
    serve::<Assets>("viewer.html")
}

pub async fn novnc(Path(path): Path<String>) -> Response {
    serve::<NoVnc>(&path)
}

pub async fn asset(Path(path): Path<String>) -> Response {
    serve::<Assets>(&path)
}
