//! The web UI and noVNC, embedded into the binary at build time (the noVNC
//! files come from the npm package pinned in web/package-lock.json).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::RustEmbed)]
#[folder = "../../web/"]
#[include = "*.html"]
#[include = "*.js"]
#[include = "*.css"]
#[include = "*.svg"]
#[include = "node_modules/@novnc/novnc/core/**"]
#[include = "node_modules/@novnc/novnc/vendor/**"]
#[exclude = "node_modules/@novnc/novnc/**/tests/**"]
#[exclude = "tests/**"]
#[exclude = "package*.json"]
struct Assets;

fn serve(path: &str) -> Response {
    match Assets::get(path) {
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
    serve("index.html")
}

pub async fn viewer(Path(_id): Path<String>) -> Response {
    serve("viewer.html")
}

pub async fn novnc(Path(path): Path<String>) -> Response {
    serve(&format!("node_modules/@novnc/novnc/{path}"))
}

pub async fn asset(Path(path): Path<String>) -> Response {
    if path.starts_with("node_modules/") {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    serve(&path)
}
