//! The service layer's one error: what went wrong, as a kind, with a
//! message that says what to do. Its HTTP status is decided here and only
//! here ([`ApiError::status`]); the answer is `{"error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::api::ErrorBody;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request is wrong.
    BadRequest(String),
    /// 401: no token, or the wrong one.
    Unauthorized(String),
    /// 404: no such thing (or route).
    NotFound(String),
    /// 405: the route does not take that method.
    MethodNotAllowed(String),
    /// 409: it conflicts with the current state.
    Conflict(String),
    /// 413: the body is too large.
    PayloadTooLarge(String),
    /// 415: the body is not JSON.
    UnsupportedMediaType(String),
    /// 422: well formed, but the VMM refused it for this sandbox.
    Refused(String),
    /// 500: the daemon or a VMM failed.
    Internal(String),
    /// 502: the guest or its VMM answered wrongly, or went away.
    BadGateway(String),
    /// 503: a limit is reached; retry later.
    Unavailable(String),
    /// 504: the guest did not answer in time.
    GatewayTimeout(String),
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(message.into())
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::NotFound(message.into())
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::Conflict(message.into())
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::Unavailable(message.into())
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::Internal(message.into())
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// What went wrong and what to do.
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::Conflict(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Refused(m)
            | ApiError::Internal(m)
            | ApiError::BadGateway(m)
            | ApiError::Unavailable(m)
            | ApiError::GatewayTimeout(m) => m,
        }
    }

    fn message_mut(&mut self) -> &mut String {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::Conflict(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Refused(m)
            | ApiError::Internal(m)
            | ApiError::BadGateway(m)
            | ApiError::Unavailable(m)
            | ApiError::GatewayTimeout(m) => m,
        }
    }

    /// The same error with `context` in front of its message.
    pub fn with_context(mut self, context: &str) -> ApiError {
        let m = self.message_mut();
        *m = format!("{context}: {m}");
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(format!("a daemon task failed: {e}"))
    }
}

/// How an agent failure maps onto a status: the guest's own error is the
/// request's fault (400), a timeout is 504, anything else a bad gateway.
impl From<agent_client::ClientError> for ApiError {
    fn from(e: agent_client::ClientError) -> Self {
        use agent_client::ClientError as E;
        let m = e.to_string();
        match &e {
            E::Timeout { .. } => ApiError::GatewayTimeout(m),
            E::Agent { .. } | E::Invalid { .. } | E::TooLarge { .. } => ApiError::BadRequest(m),
            _ => ApiError::BadGateway(m),
        }
    }
}

/// A source VM that did not come up: it exiting is the VMM's failure
/// (500), its agent staying silent the guest's (504).
impl From<crate::driver::BootError> for ApiError {
    fn from(e: crate::driver::BootError) -> Self {
        use crate::driver::BootError as E;
        match e {
            E::Exited(m) => ApiError::Internal(m),
            E::Silent(m) => ApiError::GatewayTimeout(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        (
            status,
            Json(ErrorBody {
                error: self.message().to_owned(),
            }),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status_and_context_keeps_it() {
        let e = ApiError::GatewayTimeout("silent".into()).with_context("snapshot");
        assert_eq!(
            (e.status(), e.message()),
            (StatusCode::GATEWAY_TIMEOUT, "snapshot: silent")
        );
        assert_eq!(ApiError::Refused(String::new()).status().as_u16(), 422);
        let boot: ApiError = crate::driver::BootError::Exited("the VM exited".into()).into();
        assert_eq!(boot.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let boot: ApiError = crate::driver::BootError::Silent("no answer".into()).into();
        assert_eq!(boot.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
