//! The REST API v1: the router, the auth and audit layer, and a JSON body
//! extractor whose rejections answer `{"error": ...}` like every other
//! error, with upstream's statuses (malformed JSON 400, a missing or
//! mistyped field 422); fields it does not know are ignored and logged at
//! debug level.

mod guest;
pub mod openapi;
mod sandboxes;
mod snapshots;
mod system;
mod workspaces;

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
use crate::error::{ApiError, ApiResult, Kind};

/// The router over `daemon`.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(routes::HEALTHZ, get(system::healthz))
        .route(routes::HEALTHZ_SLASH, get(system::healthz))
        .route(routes::VERSION, get(system::version))
        .route(routes::METRICS, get(system::metrics))
        .route(routes::OPENAPI, get(system::openapi))
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
        .route(routes::SANDBOX_PAUSE, post(sandboxes::pause))
        .route(routes::SANDBOX_RESUME, post(sandboxes::resume))
        .route(routes::SANDBOX_TIMEOUT, post(sandboxes::timeout))
        .route(routes::SANDBOX_STATS, get(sandboxes::stats))
        .route(
            routes::WORKSPACES,
            post(workspaces::create).get(workspaces::list),
        )
        .route(
            routes::WORKSPACE,
            get(workspaces::get).delete(workspaces::delete),
        )
        .route(routes::WORKSPACE_SUSPEND, post(workspaces::suspend))
        .route(routes::WORKSPACE_RESUME, post(workspaces::resume))
        .route(routes::SANDBOX_EXEC_STREAM, post(guest::exec_stream))
        .route(routes::SANDBOX_EXEC_WS, get(guest::exec_ws))
        .route(
            routes::SANDBOX_PROCESSES,
            post(guest::start_process).get(guest::list_processes),
        )
        .route(routes::PROCESS_SIGNAL, post(guest::signal_process))
        .route(routes::PROCESS_STDIN, post(guest::process_stdin))
        .route(routes::PROCESS_RESIZE, post(guest::resize_process))
        .route(routes::PROCESS_WAIT, post(guest::wait_process))
        .route(
            routes::SANDBOX_FILES,
            get(guest::download)
                .put(guest::upload)
                .delete(guest::remove),
        )
        .route(routes::FILES_LIST, get(guest::list))
        .route(routes::FILES_STAT, get(guest::stat))
        .route(routes::FILES_MKDIR, post(guest::mkdir))
        .route(routes::FILES_RENAME, post(guest::rename))
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

/// Runs the rest of a request: one that changes state on a task of its
/// own, which a client that hangs up (hyper then drops this future) does
/// not cancel; the rest in place.
async fn run(next: Next, req: Request) -> Response {
    if !changes_state(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    match tokio::spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(format!("the request's task failed: {e}")).into_response(),
    }
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
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // The path only (as upstream logs it): a query may carry what a client
    // should not have put there (a token), and both are bounded, so a flood
    // of long paths cannot grow the log by more than a line each.
    let path = crate::audit::bounded(req.uri().path());
    let mut token_id = None;
    let response = match &daemon.auth {
        Some(auth) if !routes::is_healthz(req.uri().path()) => {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if auth.check(presented) {
                token_id = Some(auth.id());
                run(next, req).await
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
        _ => run(next, req).await,
    };
    if let Some(audit) = &daemon.audit {
        let latency = started.elapsed();
        audit.record(&crate::audit::Entry {
            ts: crate::audit::rfc3339(std::time::SystemTime::now()),
            time: crate::audit::now_secs(),
            remote,
            method: method.as_str(),
            path: &path,
            status: response.status().as_u16(),
            latency_ms: latency.as_secs_f64() * 1000.0,
            latency_us: latency.as_micros() as u64,
            ua: &crate::audit::bounded(&user_agent),
            token_id,
        });
    }
    response
}

/// Whether a request changes state (spawn, snapshot, branch, compact,
/// delete, and the guest's processes and files): such a request runs to
/// its end, recorded or cleaned up, whether or not its client is still
/// there. An exec, eval, stream or wait is cancelled when its client goes
/// (a stream's process with it, unless it asked to detach); a ping changes
/// nothing.
pub fn changes_state(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    (method == Method::POST || method == Method::DELETE)
        && !["/exec", "/eval", "/ping", "/exec/stream", "/wait"]
            .iter()
            .any(|op| path.ends_with(op))
}

/// A JSON body (see [`parse_body`]); 415 without a JSON content type, 413
/// when too large.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::new(
                Kind::UnsupportedMediaType,
                "bad request body: send it as JSON with Content-Type: application/json",
            ));
        }
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_body(&bytes).map(Body)
    }
}

/// A body's bytes, whatever its type; too large (axum's limit, 2 MB) is a
/// JSON 413 like every other error, not axum's plain text.
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|r| {
                let m = format!("bad request body: {}", r.body_text());
                match r.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(Kind::PayloadTooLarge, m),
                    _ => ApiError::bad_request(m),
                }
            })
    }
}

/// Whether the request says its body is JSON (`application/json` or a
/// `+json` type), as axum's own JSON extractor decides it.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(mime) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = mime.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json") || sub.to_ascii_lowercase().ends_with("+json"))
}

/// A request body as `T`: malformed JSON answers 400, a missing, mistyped
/// or unknown-variant field 422 (upstream's statuses); fields `T` does not
/// have are ignored (a newer client's) and logged at debug level.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut ignored = Vec::new();
    let value = serde_ignored::deserialize(&mut de, |path| ignored.push(path.to_string()))
        .and_then(|v| de.end().map(|()| v))
        .map_err(body_error)?;
    if !ignored.is_empty() {
        tracing::debug!(
            ?ignored,
            "request body fields this daemon does not use, ignored"
        );
    }
    Ok(value)
}

fn body_error(e: serde_json::Error) -> ApiError {
    let kind = match e.classify() {
        serde_json::error::Category::Data => Kind::InvalidBody,
        _ => Kind::BadRequest,
    };
    ApiError::new(kind, format!("bad request body: {e}"))
}

/// The boolean query parameters `names` (`?name=true`, `=1`, `=false`,
/// `=0`, or a bare `?name`), in that order; anything else is a 400.
pub fn flags<const N: usize>(query: Option<&str>, names: [&str; N]) -> ApiResult<[bool; N]> {
    let mut out = [false; N];
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        let flag = match value {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{key}={value:?}: use true or false"
                )))
            }
        };
        match names.iter().position(|n| *n == key) {
            Some(i) => out[i] = flag,
            None => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {key:?} (known: {})",
                    names.join(", ")
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::SpawnRequest;

    /// Upstream's statuses: malformed JSON 400, a missing or mistyped field
    /// 422; a field nobody here knows is taken and ignored.
    #[test]
    fn bodies_answer_upstreams_statuses() {
        let status = |body: &str| {
            parse_body::<SpawnRequest>(body.as_bytes())
                .map(|_| 200)
                .unwrap_or_else(|e| e.status().as_u16())
        };
        assert_eq!(status(r#"{"snapshot_tag":"t","future":{"x":1}}"#), 200);
        assert_eq!(status(r#"{"snapshot_tag":"t""#), 400);
        assert_eq!(status(r#"{"snapshot_tag":"t"} trailing"#), 400);
        assert_eq!(status(""), 400);
        assert_eq!(status(r#"{"n":1}"#), 422);
        assert_eq!(status(r#"{"snapshot_tag":"t","n":"1"}"#), 422);
        assert_eq!(status(r#"[]"#), 422);
    }

    #[test]
    fn json_content_types_are_told_apart() {
        let with = |v: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            json_content_type(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("Application/JSON"));
        assert!(with("application/problem+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!json_content_type(&axum::http::HeaderMap::new()));
    }

    #[test]
    fn query_flags_are_named_booleans() {
        assert_eq!(flags(None, ["all"]).unwrap(), [false]);
        assert_eq!(flags(Some("all"), ["all"]).unwrap(), [true]);
        assert_eq!(
            flags(Some("force=1&cascade=false"), ["cascade", "force"]).unwrap(),
            [false, true]
        );
        assert!(flags(Some("all=yes"), ["all"]).is_err());
        let err = flags(Some("al=true"), ["all"]).unwrap_err();
        assert!(err.message.contains("known: all"), "{}", err.message);
    }
}
