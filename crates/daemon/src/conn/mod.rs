//! The HTTP(S) server's connections and their limits: how long one may
//! take to send a request's headers (its TLS handshake included), how
//! long it may sit idle between requests, and how many may be open at
//! once. [`serve`] serves a router with them; the daemon serves its API
//! with it.
//!
//! - `deadline`: the header and idle deadlines, on the accepted stream;
//!   `track`: the service wrapper that tells them when requests start
//!   and end.
//! - `cap`: the connection cap and its 503; `fds`: room for it in the
//!   open-file limit.
//!
//! Both apply to HTTP/1 and HTTP/2, plain or TLS: the deadlines watch the
//! TCP stream under TLS, and a connection over the cap is answered inside
//! its TLS session.

mod cap;
mod deadline;
mod fds;
mod track;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::Router;
use axum_server::accept::{Accept, DefaultAcceptor};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use axum_server::Handle;
use tokio::net::TcpStream;

use cap::{Cap, Gate, Ticket};
use deadline::{Activity, Watched};
use track::Tracked;

/// How long a connection may wait and how many may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the accept, or from the first byte after an idle gap, to the
    /// end of a request's headers; TLS handshake included. After an idle
    /// gap it ends no earlier than the idle timeout would have.
    pub header_timeout: Duration,
    /// From the end of an answer to the first byte of the next request.
    pub idle_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

/// Serves `router` on `listener` (HTTPS with `tls`) within `limits` until
/// `handle` shuts it down. Requests carry their peer's address
/// (`ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<RustlsConfig>,
    limits: Limits,
    handle: Handle,
    router: Router,
) -> io::Result<()> {
    fds::check(limits.max_connections);
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let cap = Cap::new(limits.max_connections);
    match tls {
        Some(tls) => {
            let tls = RustlsAcceptor::new(tls).handshake_timeout(limits.header_timeout);
            let mut server = axum_server::from_tcp(listener)
                .acceptor(Limited {
                    inner: tls,
                    limits,
                    cap,
                })
                .handle(handle);
            // hyper's own header timer would also count the idle gap
            // before a request (see [`deadline`]); axum_server sets no
            // timer, so it is off already, and stays off should a later
            // version set one.
            //
            // A client that sends a whole request and closes its side
            // (gives up on the answer) has its request read to the end and
            // served: by default hyper drops a request the moment it reads
            // the end of the stream, even with the body in its buffer, and
            // a spawn or branch would be done or not by chance.
            server
                .http_builder()
                .http1()
                .header_read_timeout(None)
                .half_close(true);
            server.serve(app).await
        }
        None => {
            let plain = DefaultAcceptor::new();
            let mut server = axum_server::from_tcp(listener)
                .acceptor(Limited {
                    inner: plain,
                    limits,
                    cap,
                })
                .handle(handle);
            // As above.
            server
                .http_builder()
                .http1()
                .header_read_timeout(None)
                .half_close(true);
            server.serve(app).await
        }
    }
}

/// Accepts a connection within [`Limits`]: takes its ticket, watches its
/// stream, then hands it to `inner` (TLS, or nothing).
#[derive(Debug, Clone)]
struct Limited<A> {
    inner: A,
    limits: Limits,
    cap: Cap,
}

/// An accepted TCP stream, watched, holding its ticket.
type Watch = Watched<TcpStream, Ticket>;

impl<A, S> Accept<TcpStream, S> for Limited<A>
where
    A: Accept<Watch, Gate<S>>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = A::Stream;
    type Service = Tracked<A::Service>;
    type Future = Pin<Box<dyn Future<Output = io::Result<(A::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Some(ticket) = self.cap.admit() else {
            // Dropping the stream closes it.
            return Box::pin(std::future::ready(Err(io::Error::other(
                "over the connection cap, with as many being refused",
            ))));
        };
        let (gate, idle) = if ticket.served() {
            (Gate::Open(service), self.limits.idle_timeout)
        } else {
            // After its 503 a refused connection may not wait for more.
            (Gate::Full(self.cap.refusal()), Duration::ZERO)
        };
        let activity = Activity::new(self.limits.header_timeout, idle);
        let stream = Watched::new(stream, activity.clone(), ticket);
        let accepted = self.inner.accept(stream, gate);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((stream, Tracked::new(service, activity)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::io::{Read, Write};
    use std::task::{Context, Poll};
    use std::time::Instant;

    use axum::body::{Body, Bytes, HttpBody};
    use axum::routing::{get, post};
    use http_body::Frame;
    use tokio::time::Sleep;

    use super::*;

    /// Shorter than every handler's wait and every gap below.
    const TIMEOUT: Duration = Duration::from_secs(1);
    const SLOW: Duration = Duration::from_millis(2500);
    const GAP: Duration = Duration::from_millis(1500);

    /// Serves `router` on a loopback port with both timeouts at
    /// [`TIMEOUT`].
    fn start(router: Router) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            header_timeout: TIMEOUT,
            idle_timeout: TIMEOUT,
            max_connections: 8,
        };
        tokio::spawn(serve(listener, None, limits, Handle::new(), router));
        addr
    }

    /// Sends each part after its pause, then reads until the server
    /// closes; returns what it read.
    async fn exchange(addr: SocketAddr, parts: Vec<(Duration, &'static str)>) -> String {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            for (pause, part) in parts {
                std::thread::sleep(pause);
                s.write_all(part.as_bytes()).unwrap();
            }
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            String::from_utf8(got).unwrap()
        })
        .await
        .unwrap()
    }

    /// "drip\n" `left` times, [`GAP`] apart.
    struct Drip {
        left: u32,
        sleep: Pin<Box<Sleep>>,
    }

    impl HttpBody for Drip {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            std::task::ready!(self.sleep.as_mut().poll(cx));
            self.left -= 1;
            let next = tokio::time::Instant::now() + GAP;
            self.sleep.as_mut().reset(next);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"drip\n")))))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_slower_than_both_timeouts_is_still_answered() {
        let addr = start(Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(SLOW).await;
                "done"
            }),
        ));
        let started = Instant::now();
        let got = exchange(
            addr,
            vec![(
                Duration::ZERO,
                "GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )],
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("done"), "{got}");
        assert!(started.elapsed() >= SLOW);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_sent_slower_than_both_timeouts_is_still_read() {
        let addr = start(Router::new().route("/echo", post(|body: String| async move { body })));
        let got = exchange(
            addr,
            vec![
                (
                    Duration::ZERO,
                    "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nConnection: close\r\n\r\nabc",
                ),
                (SLOW, "def"),
            ],
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("\r\n\r\nabcdef"), "{got}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_streamed_with_gaps_longer_than_both_timeouts_is_received_whole() {
        let addr = start(Router::new().route(
            "/drip",
            get(|| async {
                Body::new(Drip {
                    left: 2,
                    sleep: Box::pin(tokio::time::sleep(GAP)),
                })
            }),
        ));
        let got = exchange(
            addr,
            vec![(
                Duration::ZERO,
                "GET /drip HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )],
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        // Chunked: each "drip\n" in a chunk of its own.
        assert_eq!(got.matches("drip\n").count(), 2, "{got}");
        assert!(got.ends_with("0\r\n\r\n"), "{got}");
    }
}
