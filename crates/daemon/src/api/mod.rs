//! The REST API v1: the router, the auth and audit layer, and a JSON body
//! extractor whose rejections answer `{"error": ...}` like every other
//! error.

mod sandboxes;
mod snapshots;
mod system;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use proto::routes;

use crate::daemon::Daemon;
use crate::error::{ApiError, Kind};

/// The router over `daemon`.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(routes::HEALTHZ, get(system::healthz))
        .route(routes::VERSION, get(system::version))
        .route(routes::METRICS, get(system::metrics))
        .route(
            routes::SNAPSHOTS,
            post(snapshots::create).get(snapshots::list),
        )
        .route(routes::SNAPSHOT, axum::routing::delete(snapshots::delete))
        .route(routes::SNAPSHOT_INFO, get(snapshots::info))
        .route(routes::SNAPSHOT_COMPACT, post(snapshots::compact))
        .route(
            routes::SANDBOXES,
            post(sandboxes::spawn).get(sandboxes::list),
        )
        .route(routes::SANDBOX, get(sandboxes::get).delete(sandboxes::kill))
        .route(routes::SANDBOX_PING, post(sandboxes::ping))
        .route(routes::SANDBOX_EXEC, post(sandboxes::exec))
        .route(routes::SANDBOX_EVAL, post(sandboxes::eval))
        .route(routes::SANDBOX_BRANCH, post(sandboxes::branch))
        .fallback(|| async { ApiError::not_found("no such route; see the forkd v1 API") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                Kind::MethodNotAllowed,
                "this route does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(daemon.clone(), guard))
        .with_state(daemon)
}

/// Checks the bearer token (every route but `/healthz`, when a token is
/// configured) and writes the audit line.
async fn guard(State(daemon): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let mut token_id = None;
    let response = match &daemon.auth {
        Some(auth) if req.uri().path() != routes::HEALTHZ => {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if auth.check(presented) {
                token_id = Some(auth.id());
                next.run(req).await
            } else {
                let mut r = ApiError::new(
                    Kind::Unauthorized,
                    "missing or wrong bearer token: send Authorization: Bearer <token> (forkd: --daemon-token or FORKD_TOKEN)",
                )
                .into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                r
            }
        }
        _ => next.run(req).await,
    };
    if let Some(audit) = &daemon.audit {
        audit.record(&crate::audit::Entry {
            time: crate::audit::now_secs(),
            remote,
            method: method.as_str(),
            path: &path,
            status: response.status().as_u16(),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            token_id,
        });
    }
    response
}

/// A JSON body; a missing, malformed or mistyped body answers 400 (415
/// without a JSON content type) as `{"error": ...}`.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rejection) => {
                let m = format!("bad request body: {}", rejection.body_text());
                Err(match rejection.status() {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        ApiError::new(Kind::UnsupportedMediaType, m)
                    }
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(Kind::PayloadTooLarge, m),
                    _ => ApiError::bad_request(m),
                })
            }
        }
    }
}
