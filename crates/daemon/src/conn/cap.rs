//! The connection cap: at most so many connections served at once. One
//! over the cap is still read (its TLS handshake and its request's
//! headers, within the header timeout) so that it can be answered the
//! daemon's JSON 503 with `Connection: close`, and then closed; as many
//! again may be in that state at once, and one more than that is closed
//! as soon as it is accepted.

use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue, Response};
use axum::response::IntoResponse;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use crate::error::ApiError;

/// How often, at most, refused connections are logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The connection cap.
#[derive(Debug, Clone)]
pub(super) struct Cap(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    max: usize,
    served: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    refused: AtomicU64,
    warned: Mutex<Option<Instant>>,
}

/// What an accepted connection gets: served, or answered 503 and closed.
/// Its slot (among those served, or those being refused) is given back
/// when this is dropped.
#[derive(Debug)]
pub(super) struct Ticket {
    served: bool,
    _slot: OwnedSemaphorePermit,
}

impl Ticket {
    /// Whether the connection is served (else refused).
    pub(super) fn served(&self) -> bool {
        self.served
    }
}

impl Cap {
    /// At most `max` connections served at once (and `max` more being
    /// refused).
    pub(super) fn new(max: usize) -> Cap {
        Cap(Arc::new(Inner {
            max,
            served: Arc::new(Semaphore::new(max)),
            refusing: Arc::new(Semaphore::new(max)),
            refused: AtomicU64::new(0),
            warned: Mutex::new(None),
        }))
    }

    /// A ticket for a connection just accepted; None: close it at once.
    pub(super) fn admit(&self) -> Option<Ticket> {
        if let Ok(slot) = self.0.served.clone().try_acquire_owned() {
            return Some(Ticket {
                served: true,
                _slot: slot,
            });
        }
        self.note_refusal();
        let slot = self.0.refusing.clone().try_acquire_owned().ok()?;
        Some(Ticket {
            served: false,
            _slot: slot,
        })
    }

    /// The answer to a connection over the cap.
    pub(super) fn refusal(&self) -> Refusal {
        Refusal { max: self.0.max }
    }

    fn note_refusal(&self) {
        let refused = self.0.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned = self.0.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        tracing::warn!(
            "refusing connections: {} are open (--max-connections); {refused} refused since the start",
            self.0.max
        );
    }
}

/// Answers every request the daemon's JSON 503 with `Connection: close`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refusal {
    max: usize,
}

impl Refusal {
    /// The answer.
    pub(super) fn response(self) -> Response<Body> {
        let mut response = ApiError::unavailable(format!(
            "the daemon is serving its most connections at once ({}, --max-connections); retry later, reusing one connection for many requests",
            self.max
        ))
        .into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// A connection's service: the app's, or the refusal.
#[derive(Debug, Clone)]
pub(super) enum Gate<S> {
    /// Served by the app.
    Open(S),
    /// Over the cap.
    Full(Refusal),
}

impl<S, Q> Service<Q> for Gate<S>
where
    S: Service<Q, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        match self {
            Gate::Open(app) => app.poll_ready(cx),
            Gate::Full(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Q) -> Self::Future {
        match self {
            Gate::Open(app) => Box::pin(app.call(req)),
            Gate::Full(refusal) => Box::pin(ready(Ok(refusal.response()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_cap_a_connection_is_refused_and_over_twice_closed() {
        let cap = Cap::new(2);
        let served = |t: &Option<Ticket>| t.as_ref().map(Ticket::served);
        let a = cap.admit();
        let b = cap.admit();
        assert_eq!((served(&a), served(&b)), (Some(true), Some(true)));
        let r1 = cap.admit();
        let r2 = cap.admit();
        assert_eq!((served(&r1), served(&r2)), (Some(false), Some(false)));
        assert!(cap.admit().is_none(), "refusals are capped too");
        drop(r1);
        assert_eq!(served(&cap.admit()), Some(false));
        drop(a);
        assert_eq!(served(&cap.admit()), Some(true));
    }

    #[test]
    fn the_refusal_is_the_daemons_json_503_and_closes() {
        let r = Cap::new(4).refusal().response();
        assert_eq!(r.status().as_u16(), 503);
        assert_eq!(r.headers()[header::CONNECTION], "close");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
