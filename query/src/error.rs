//! How the query service says no.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use marsad_privacy::access::AccessError;
use serde_json::json;

/// An answer other than 2xx.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, a wrong key, or a key without the role.
    #[error("{0}")]
    Access(#[from] marsad_privacy::access::AccessError),
    /// The service cannot do this now (e.g. the log is unavailable); retry.
    #[error("{0}")]
    Unavailable(String),
    /// The request or the query is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The query ran too long.
    #[error("the query ran longer than {0} s and was cancelled")]
    Timeout(u64),
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// No such thing (e.g. segment).
    #[error("{0}")]
    NotFoundWhat(String),
    /// It exists but cannot be given now (e.g. a held-back segment).
    #[error("{0}")]
    Conflict(String),
    /// The key may not see this (an advertiser asking beyond its campaigns).
    #[error("{0}")]
    ForbiddenWhat(String),
    /// The key's privacy budget for today is spent.
    #[error(
        "this key's privacy budget for today is spent ({remaining:.2} ε left, the answer needs {needed:.2}); \
         it refills at midnight UTC. Asking again for numbers already answered today is free"
    )]
    BudgetExhausted {
        /// ε left today.
        remaining: f64,
        /// ε the answer needed.
        needed: f64,
        /// Seconds until the budget refills.
        retry_after: u64,
    },
    /// Every query slot is taken and none freed up in time.
    #[error("too many queries are running; retry in a moment")]
    Busy,
    /// Something failed that the client cannot fix; details are logged, not sent.
    #[error("internal error; see the service log")]
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Access(AccessError::Unauthorized) => StatusCode::UNAUTHORIZED,
            ApiError::Access(AccessError::Forbidden { .. }) | ApiError::ForbiddenWhat(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_) | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::NotFound | ApiError::NotFoundWhat(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BudgetExhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (status, Json(json!({"error": self.to_string()}))).into_response();
        if let ApiError::BudgetExhausted { retry_after, .. } = &self
            && let Ok(value) = HeaderValue::from_str(&retry_after.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if matches!(self, ApiError::Busy) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Access(AccessError::Unauthorized)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
