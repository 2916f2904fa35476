//! How the query service says no.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An answer other than 2xx.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, or an unknown one.
    #[error("missing or unknown API key: send `Authorization: Bearer KEY`")]
    Unauthorized,
    /// The key lacks the role.
    #[error("the key `{key}` lacks the `{role}` role this call needs")]
    Forbidden {
        /// The key's name.
        key: String,
        /// The role needed.
        role: &'static str,
    },
    /// The request or the query is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The query ran too long.
    #[error("the query ran longer than {0} s and was cancelled")]
    Timeout(u64),
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// Something failed that the client cannot fix; details are logged, not sent.
    #[error("internal error; see the service log")]
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (status, Json(json!({"error": self.to_string()}))).into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
