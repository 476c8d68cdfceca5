//! The API as the client commands see it: JSON calls with the token, and
//! errors that carry their exit code.

use super::{exit, Conn};
use serde_json::Value;
use std::time::Duration;

/// A failure with the exit code it means to a script.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

pub fn fail(code: i32, message: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code an HTTP status means.
pub fn code_for(status: u16) -> i32 {
    match status {
        400 | 413 | 422 => exit::BAD_REQUEST,
        401 | 403 => exit::NO_PERMISSION,
        404 => exit::NOT_FOUND,
        409 | 429 => exit::TEMPORARY,
        500..=599 => exit::UNAVAILABLE,
        _ => exit::FAILURE,
    }
}

#[derive(Debug, Clone)]
pub struct Api {
    pub base: url::Url,
    pub token: Option<String>,
    http: reqwest::Client,
}

#[derive(Debug, Default, serde::Deserialize)]
struct FileConfig {
    url: Option<String>,
    token: Option<String>,
}

fn config_path(conn: &Conn) -> Option<std::path::PathBuf> {
    if let Some(p) = &conn.client_config {
        return Some(p.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config")))?;
    Some(base.join("airlock").join("client.json"))
}

impl Api {
    pub fn new(conn: &Conn) -> anyhow::Result<Api> {
        let file = match config_path(conn) {
            Some(path) if path.exists() || conn.client_config.is_some() => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| fail(exit::CONFIG, format!("reading {}: {e}", path.display())))?;
                serde_json::from_str::<FileConfig>(&text)
                    .map_err(|e| fail(exit::CONFIG, format!("{}: {e}", path.display())))?
            }
            _ => FileConfig::default(),
        };
        let url = conn
            .url
            .clone()
            .or(file.url)
            .unwrap_or_else(|| "http://127.0.0.1:4000".to_owned());
        let base = url::Url::parse(&url)
            .map_err(|e| fail(exit::CONFIG, format!("the server URL {url:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(fail(
                exit::CONFIG,
                format!("the server URL {url:?} must be http(s)"),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| fail(exit::CONFIG, format!("making the HTTP client: {e}")))?;
        Ok(Api {
            base,
            token: conn.token.clone().or(file.token).filter(|t| !t.is_empty()),
            http,
        })
    }

    /// `path` (starting `/api/v1/…`) on the server.
    pub fn url(&self, path: &str) -> String {
        let mut base = self.base.as_str().trim_end_matches('/').to_owned();
        base.push_str(path);
        base
    }

    /// The WebSocket URL of `path`.
    pub fn ws_url(&self, path: &str) -> String {
        let url = self.url(path);
        if let Some(rest) = url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            format!("ws://{}", url.trim_start_matches("http://"))
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends and turns a non-2xx answer into a [`Failure`] with the API's message.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            fail(
                exit::UNAVAILABLE,
                format!("cannot reach the airlock server at {}: {e}", self.base),
            )
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| status.to_string());
        let hint = if status.as_u16() == 401 && self.token.is_none() {
            " (set AIRLOCK_TOKEN or --token)"
        } else {
            ""
        };
        Err(fail(code_for(status.as_u16()), format!("{message}{hint}")))
    }

    pub async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = self.send(req).await?;
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.json(reqwest::Method::GET, path, None).await
    }
}

/// A path segment, escaped.
pub fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
