//! A connection's service, wrapped to tell its [`Activity`] when each
//! request starts (its service is called: its headers are in) and ends
//! (its response body is dropped: sent in full, or the connection gone),
//! and when the connection is upgraded.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::HttpBody;
use axum::http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use tower_service::Service;

use super::deadline::{Activity, InFlight};

/// `S`, reporting each request to its connection's [`Activity`].
#[derive(Debug, Clone)]
pub(super) struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    /// `inner`, reporting to `activity`.
    pub(super) fn new(inner: S, activity: Activity) -> Self {
        Tracked { inner, activity }
    }
}

/// What the connection's service answers with.
type Answer<B, E> = Pin<Box<dyn Future<Output = Result<Response<Tracking<B>>, E>> + Send>>;

impl<S, Q, B> Service<Request<Q>> for Tracked<S>
where
    S: Service<Request<Q>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Tracking<B>>;
    type Error = S::Error;
    type Future = Answer<B, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Q>) -> Self::Future {
        let connect = req.method() == Method::CONNECT;
        let in_flight = self.activity.request();
        let activity = self.activity.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            let status = response.status();
            if status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
                activity.upgraded();
            }
            Ok(response.map(|body| Tracking {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request in flight until dropped.
#[derive(Debug)]
pub(super) struct Tracking<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: HttpBody + Unpin> HttpBody for Tracking<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::{ready, Ready};
    use std::time::Duration;

    use super::*;

    /// Answers every request with its status and an empty body.
    #[derive(Clone)]
    struct Answers(StatusCode);

    impl Service<Request<()>> for Answers {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Ready<Result<Response<String>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let mut response = Response::new(String::new());
            *response.status_mut() = self.0;
            ready(Ok(response))
        }
    }

    /// Whether the connection has a deadline once `method` was answered
    /// `status` and the answer's body was sent.
    async fn timed_after(method: Method, status: StatusCode) -> bool {
        let activity = Activity::new(Duration::from_secs(1), Duration::from_secs(1));
        let mut service = Tracked::new(Answers(status), activity.clone());
        let request = Request::builder().method(method).body(()).unwrap();
        let response = service.call(request).await.unwrap();
        assert_eq!(activity.deadline(), None, "its body is not sent yet");
        drop(response);
        activity.deadline().is_some()
    }

    #[tokio::test]
    async fn an_answer_sent_starts_the_idle_gap_unless_it_upgrades() {
        assert!(timed_after(Method::GET, StatusCode::OK).await);
        assert!(timed_after(Method::CONNECT, StatusCode::BAD_GATEWAY).await);
        assert!(!timed_after(Method::GET, StatusCode::SWITCHING_PROTOCOLS).await);
        assert!(!timed_after(Method::CONNECT, StatusCode::OK).await);
    }
}
