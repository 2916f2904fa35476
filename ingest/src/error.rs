//! How ingest says no: every refusal is JSON with a reason, and the status
//! tells the client whether to fix the request (4xx) or retry later (503).

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An answer other than 2xx.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or an event is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// Every event of a batch was refused; each reason is listed.
    #[error("no event in the batch is valid")]
    AllRejected(Vec<serde_json::Value>),
    /// The body exceeds the limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body's encoding or type is not one ingest reads.
    #[error("{0}")]
    Unsupported(String),
    /// No such route.
    #[error("no such endpoint; see /v1/openapi.json")]
    NotFound,
    /// The call needs a key with a role.
    #[error("{0}")]
    Access(#[from] marsad_privacy::access::AccessError),
    /// The log cannot make events durable right now (why goes to the log, not the client).
    #[error("event log unavailable, retry later")]
    Unavailable {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// This client sent more than its rate allows.
    #[error("too many requests from this address; retry later")]
    TooMany {
        /// How long until the next request is allowed.
        retry_after: Duration,
    },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) | ApiError::AllRejected(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Access(marsad_privacy::access::AccessError::Unauthorized) => StatusCode::UNAUTHORIZED,
            ApiError::Access(marsad_privacy::access::AccessError::Forbidden { .. }) => StatusCode::FORBIDDEN,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
        };
        let body = match &self {
            ApiError::AllRejected(rejected) => json!({"error": self.to_string(), "accepted": 0, "rejected": rejected}),
            _ => json!({"error": self.to_string()}),
        };
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Unavailable { retry_after } | ApiError::TooMany { retry_after } = &self {
            let secs = (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
