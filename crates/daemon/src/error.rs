//! The service layer's one error: what went wrong, as a [`Kind`], with a
//! message that says what to do. Its HTTP status is decided here and only
//! here ([`Kind::status`]); the answer is `{"error": "..."}`. The typed
//! errors of the modules below the service (driver, netns, cgroup, store,
//! agent client) become it here, each with its kind.
//!
//! [`StartError`] is the other error: what keeps the daemon from serving.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::api::ErrorBody;

/// What kind of failure an error is; its HTTP status follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 400: the request is wrong.
    BadRequest,
    /// 401: no token, or the wrong one.
    Unauthorized,
    /// 403: the guest refused access.
    Forbidden,
    /// 404: no such thing (or route).
    NotFound,
    /// 405: the route does not take that method.
    MethodNotAllowed,
    /// 409: it conflicts with the current state.
    Conflict,
    /// 413: the body is too large.
    PayloadTooLarge,
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 422: well formed, but the VMM refused it for this sandbox.
    Refused,
    /// 422: well-formed JSON with a field missing or of the wrong type.
    InvalidBody,
    /// 500: the daemon or a VMM failed.
    Internal,
    /// 502: the guest or its VMM answered wrongly, or went away.
    BadGateway,
    /// 503: a limit is reached; retry later.
    Unavailable,
    /// 504: the guest did not answer in time.
    GatewayTimeout,
    /// 501: the guest (or its agent's protocol version) cannot do this.
    NotImplemented,
}

impl Kind {
    /// The HTTP status of this kind of error: decided here and only here.
    pub fn status(self) -> StatusCode {
        match self {
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Kind::Refused | Kind::InvalidBody => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Kind::BadGateway => StatusCode::BAD_GATEWAY,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// An error answer: its kind, and what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// What kind of failure.
    pub kind: Kind,
    /// What went wrong and what to do.
    pub message: String,
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::BadRequest, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::NotFound, message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::Conflict, message)
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::Unavailable, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(Kind::Internal, message)
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The same error with `context` in front of its message.
    pub fn with_context(mut self, context: &str) -> ApiError {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status())
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
        let kind = match &e {
            E::Timeout { .. } => Kind::GatewayTimeout,
            E::Agent { .. } | E::Invalid { .. } | E::TooLarge { .. } => Kind::BadRequest,
            _ => Kind::BadGateway,
        };
        ApiError::new(kind, e.to_string())
    }
}

impl ApiError {
    /// An agent failure on the routes that act on the guest's processes
    /// and files, where the guest's own error says what happened: no such
    /// path 404, permission denied 403, too large 413, unsupported 501,
    /// busy 503, timeout 504, a malformed request 400, the guest's I/O
    /// failing or anything else 502.
    pub fn from_guest(e: agent_client::ClientError) -> ApiError {
        use agent_client::agent::ErrorCode as C;
        use agent_client::ClientError as E;
        let kind = match &e {
            E::Agent { code, .. } => match code {
                C::NotFound => Kind::NotFound,
                C::PermissionDenied => Kind::Forbidden,
                C::TooLarge => Kind::PayloadTooLarge,
                C::Unsupported => Kind::NotImplemented,
                C::Busy => Kind::Unavailable,
                C::Timeout => Kind::GatewayTimeout,
                C::BadRequest => Kind::BadRequest,
                C::Io | C::Internal => Kind::BadGateway,
            },
            _ => return ApiError::from(e),
        };
        ApiError::new(kind, e.to_string())
    }
}

/// A VMM or fork server that failed or refused: the daemon's side (500).
/// A caller for which the VMM's refusal is the request's fault maps that
/// case itself (branch: 422).
impl From<crate::driver::Error> for ApiError {
    fn from(e: crate::driver::Error) -> Self {
        ApiError::internal(e.to_string())
    }
}

impl From<crate::netns::Error> for ApiError {
    fn from(e: crate::netns::Error) -> Self {
        ApiError::internal(e.to_string())
    }
}

impl From<crate::cgroup::Error> for ApiError {
    fn from(e: crate::cgroup::Error) -> Self {
        ApiError::internal(e.to_string())
    }
}

/// What keeps the daemon from serving: bad configuration, or a state
/// directory, store or listener it cannot open. `forkd-daemon` prints it
/// and exits 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag (or the environment variable behind it) is wrong.
    #[error("{0}")]
    Config(String),
    /// The token file.
    #[error(transparent)]
    Auth(#[from] crate::auth::Error),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] crate::audit::OpenError),
    /// forkd-vmm.
    #[error(transparent)]
    Vmm(#[from] crate::driver::Error),
    /// The state database.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A directory of the state directory.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was done to it.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The address to listen on.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key.
    #[error("cannot load the TLS certificate {} and key {}: {source}", cert.display(), key.display())]
    Tls {
        /// The certificate file.
        cert: std::path::PathBuf,
        /// The key file.
        key: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("the server failed: {0}")]
    Served(#[source] std::io::Error),
    /// Re-adopting the previous run's sandboxes failed.
    #[error("cannot re-adopt the previous run's sandboxes: {0}")]
    Recover(String),
}

/// A source VM that did not come up: it exiting is the VMM's failure
/// (500), its agent staying silent the guest's (504).
impl From<crate::driver::BootError> for ApiError {
    fn from(e: crate::driver::BootError) -> Self {
        use crate::driver::BootError as E;
        match e {
            E::Exited(m) => ApiError::new(Kind::Internal, m),
            E::Silent(m) => ApiError::new(Kind::GatewayTimeout, m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The daemon's own failures go to its log too: the client may not
        // show the body (raise_for_status), and the operator needs the why.
        if self.status().is_server_error() {
            tracing::warn!(status = self.status().as_u16(), "{}", self.message);
        }
        (
            self.status(),
            Json(ErrorBody {
                error: self.message,
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
        let e = ApiError::new(Kind::GatewayTimeout, "silent").with_context("snapshot");
        assert_eq!(
            (e.status(), e.message.as_str()),
            (StatusCode::GATEWAY_TIMEOUT, "snapshot: silent")
        );
        assert_eq!(ApiError::new(Kind::Refused, "").status().as_u16(), 422);
        let boot: ApiError = crate::driver::BootError::Exited("the VM exited".into()).into();
        assert_eq!(boot.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let boot: ApiError = crate::driver::BootError::Silent("no answer".into()).into();
        assert_eq!(boot.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    /// The typed errors below the service keep their message (which names
    /// the socket or namespace) and answer 500.
    #[test]
    fn lower_errors_keep_their_message_and_are_the_daemons_fault() {
        let unreachable = crate::driver::Error::Unreachable {
            what: "VMM",
            socket: "/run/x/control.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let e = ApiError::from(unreachable).with_context("fork failed");
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            e.message
                .starts_with("fork failed: cannot reach the VMM at /run/x/control.sock: "),
            "{}",
            e.message
        );
        let taken = ApiError::from(crate::netns::Error::Taken("forkd-ab".into()));
        assert_eq!(taken.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(taken.message.contains("forkd-ab"), "{}", taken.message);
        let start = StartError::Listen {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert!(start
            .to_string()
            .starts_with("cannot listen on 127.0.0.1:1: "));
    }
}
