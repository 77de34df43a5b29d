//! Errors the API answers: a status and `{"error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::api::ErrorBody;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    /// Its status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such thing.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 409: it conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    /// 503: try again later.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// The same error with `context` in front of its message.
    pub fn with_context(mut self, context: &str) -> ApiError {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// 500: the daemon or a VMM failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal(format!("a daemon task failed: {e}"))
    }
}

/// How an agent failure maps onto a status: the guest's own error is the
/// request's fault (400), a timeout is 504, anything else a bad gateway.
impl From<agent_client::ClientError> for ApiError {
    fn from(e: agent_client::ClientError) -> Self {
        use agent_client::ClientError as E;
        let status = match &e {
            E::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            E::Agent { .. } | E::Invalid { .. } | E::TooLarge { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}
