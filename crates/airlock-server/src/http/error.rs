//! The one public error type of the API and its one conversion to HTTP:
//! `{"error": {"code", "message"}}` with an honest status.

use crate::app::AppError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conflict`, `misdirected` (a Host
    /// that is not ours), `too_large`, `quota_exceeded`, `rate_limited` (429,
    /// with `Retry-After`), `no_capacity`, `insufficient_storage`,
    /// `unavailable`, `internal`.
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

/// What a 503 `store_unavailable` asks the caller to wait.
const STORE_RETRY_AFTER_S: u64 = 5;

impl From<AppError> for ApiError {
    fn from(err: AppError) -> Self {
        let (status, code) = match &err {
            AppError::BadInput(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AppError::NoCapacity(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_capacity"),
            AppError::NoStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            AppError::Unavailable(_) => (StatusCode::BAD_GATEWAY, "unavailable"),
            AppError::Quota { kind, .. } => (StatusCode::TOO_MANY_REQUESTS, kind.code()),
            AppError::Store(e) if e.is_unavailable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            AppError::Store(e) if e.is_disk_full() => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            AppError::Store(_) | AppError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %crate::app::sandboxes::chain(&err), "request failed");
        }
        let retry_after = match &err {
            AppError::Quota { retry_after, .. } => {
                Some(crate::app::admission::whole_seconds(*retry_after))
            }
            AppError::Store(e) if e.is_unavailable() => Some(STORE_RETRY_AFTER_S),
            _ => None,
        };
        let message = match &err {
            AppError::Store(e) if code == "store_unavailable" => {
                format!("{e}: the database is not reachable right now; try again in a few seconds")
            }
            AppError::Store(e) if code == "insufficient_storage" => {
                format!("{e}: the disk holding the database is full; delete sandboxes or old images (`airlock image prune`)")
            }
            _ => err.to_string(),
        };
        if code == "store_unavailable" {
            tracing::warn!(error = %crate::app::sandboxes::chain(&err), "the database is unavailable");
        }
        ApiError {
            status,
            code,
            message,
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rej: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        match &rej {
            J::BytesRejection(_) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is too large",
            ),
            J::MissingJsonContentType(_) => {
                ApiError::bad_request("send the body as JSON (Content-Type: application/json)")
            }
            _ => ApiError::bad_request(format!("invalid JSON body: {}", rej.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::admission::Refusal;
    use std::time::Duration;

    #[tokio::test]
    async fn a_quota_refusal_is_429_with_retry_after_and_names_the_limit() {
        let err = AppError::Quota {
            kind: Refusal::RateLimited,
            message:
                "you made 30 creates in the last minute, the limit (quota.creates_per_minute) is 30"
                    .into(),
            retry_after: Duration::from_millis(12_300),
        };
        let resp = ApiError::from(err).into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("13"),
            "rounded up, in whole seconds"
        );
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["error"]["code"], "rate_limited");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("quota.creates_per_minute")));

        let resp = ApiError::from(AppError::Quota {
            kind: Refusal::QuotaExceeded,
            message: "x".into(),
            retry_after: Duration::ZERO,
        })
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "never 0"
        );
        let other = ApiError::from(AppError::NoCapacity("full".into())).into_response();
        assert!(other
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .is_none());
    }

    #[test]
    fn an_unreachable_database_is_503_with_retry_after_and_a_refused_query_is_500() {
        use crate::store::StoreError;
        for source in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            let err = AppError::Store(StoreError::Query {
                what: "list sandboxes",
                source,
            });
            let api = ApiError::from(err);
            assert_eq!(
                (api.status, api.code, api.retry_after),
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    Some(5)
                )
            );
            assert!(api.message.contains("list sandboxes"), "{}", api.message);
        }
        let refused = AppError::Store(StoreError::Query {
            what: "list sandboxes",
            source: sqlx::Error::RowNotFound,
        });
        let api = ApiError::from(refused);
        assert_eq!(
            (api.status, api.retry_after),
            (StatusCode::INTERNAL_SERVER_ERROR, None)
        );
    }
}
