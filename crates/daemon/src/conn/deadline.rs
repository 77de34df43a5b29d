//! A connection's header and idle deadlines, kept at the IO layer.
//!
//! Why here and not in a library: in hyper 1.x (1.12 here),
//! `http1::Builder::header_read_timeout` (which needs a `Timer`;
//! axum_server's builder sets none) starts when hyper begins reading a
//! request head, which on a keep-alive connection is the moment it goes
//! idle: the idle gap and the header read share one timer, so an idle
//! timeout longer than the header timeout cannot be had from it. It also
//! misses the first bytes hyper-util's auto builder reads to tell HTTP/1
//! from HTTP/2 (a connection that sends nothing waits there for ever), and
//! HTTP/2 altogether; neither hyper, hyper-util nor axum_server has an
//! idle timeout. So a connection's [`Activity`] learns when requests start
//! and end from its service ([`super::track`]) and when bytes come in from
//! its stream ([`Watched`]), and a read past the current deadline fails,
//! which ends the connection. Nothing in flight is ever timed out: a
//! request counts from its service call until its response body is
//! dropped (sent in full, or the connection gone), and an upgraded
//! connection (101, or a successful CONNECT) has no deadline at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where a connection is, as far as its deadlines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request's headers since `since` (the accept, or the
    /// first byte read after an idle gap) until `until`.
    Headers { since: Instant, until: Instant },
    /// Nothing in flight and nothing read since `since`.
    Idle { since: Instant },
    /// This many requests called and not yet answered in full.
    Busy(usize),
    /// No longer HTTP: no deadline.
    Upgraded,
}

impl Phase {
    /// Waiting for a request's headers from `since`, for `header`.
    fn headers(since: Instant, header: Duration) -> Phase {
        Phase::Headers {
            since,
            until: since + header,
        }
    }
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The task last parked on a read, woken when the connection goes
    /// idle so that its idle deadline is armed.
    reader: Option<Waker>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    header: Duration,
    idle: Duration,
}

/// One connection's phase, shared by its stream, which enforces the
/// deadline, and its service, which says when requests start and end.
#[derive(Debug, Clone)]
pub(super) struct Activity(Arc<Shared>);

/// When the connection's current phase ends, and why it would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Deadline {
    at: Instant,
    what: &'static str,
    after: Duration,
}

impl Activity {
    /// A connection accepted now: its first request's headers (and its
    /// TLS handshake) are due within `header`; a gap between an answer
    /// and the next request may last `idle`.
    pub(super) fn new(header: Duration, idle: Duration) -> Activity {
        Activity(Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::headers(Instant::now(), header),
                reader: None,
            }),
            header,
            idle,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds a
        // whole state.
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current phase's deadline; None while a request is in flight
    /// or after an upgrade.
    pub(super) fn deadline(&self) -> Option<Deadline> {
        match self.state().phase {
            Phase::Headers { since, until } => Some(Deadline {
                at: until,
                what: "no whole request headers",
                after: until.saturating_duration_since(since),
            }),
            Phase::Idle { since } => Some(Deadline {
                at: since + self.0.idle,
                what: "no new request",
                after: self.0.idle,
            }),
            Phase::Busy(_) | Phase::Upgraded => None,
        }
    }

    /// Bytes came in: after an idle gap, they start a request's headers,
    /// due within the header timeout but never before the idle deadline
    /// they interrupt. Over HTTP/2 the bytes may be no request at all (a
    /// client's SETTINGS acknowledgement, a PING, a WINDOW_UPDATE, which
    /// may well arrive after the answer): they must not cut a gap the
    /// idle timeout allows, and they cannot stretch it past the later of
    /// the two either, since only a request's call ends the phase.
    fn read_some(&self) {
        let mut state = self.state();
        if let Phase::Idle { since } = state.phase {
            let now = Instant::now();
            state.phase = Phase::Headers {
                since: now,
                until: (now + self.0.header).max(since + self.0.idle),
            };
        }
    }

    fn park_reader(&self, waker: &Waker) {
        let mut state = self.state();
        if !state.reader.as_ref().is_some_and(|w| w.will_wake(waker)) {
            state.reader = Some(waker.clone());
        }
    }

    /// A request's headers are in and its service is called: no deadline
    /// until the returned guard (and every other in flight) is dropped.
    pub(super) fn request(&self) -> InFlight {
        let mut state = self.state();
        state.phase = match state.phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Upgraded => Phase::Upgraded,
            Phase::Headers { .. } | Phase::Idle { .. } => Phase::Busy(1),
        };
        InFlight(self.clone())
    }

    /// The connection was upgraded: it has no deadline from now on.
    pub(super) fn upgraded(&self) {
        self.state().phase = Phase::Upgraded;
    }

    fn answered(&self) {
        let reader = {
            let mut state = self.state();
            match state.phase {
                Phase::Busy(1) => {
                    state.phase = Phase::Idle {
                        since: Instant::now(),
                    };
                    state.reader.take()
                }
                Phase::Busy(n) => {
                    state.phase = Phase::Busy(n.saturating_sub(1));
                    None
                }
                _ => None,
            }
        };
        // Its stream arms the idle deadline at its next read, which the
        // connection may not start by itself.
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// A request in flight, from its service call until its response body is
/// dropped.
#[derive(Debug)]
pub(super) struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.answered();
    }
}

/// An accepted stream whose reads fail once its connection's deadline
/// passes; it holds `T` (the connection's slot) for as long as it lives.
#[derive(Debug)]
pub(super) struct Watched<S, T> {
    inner: S,
    activity: Activity,
    sleep: Option<Pin<Box<Sleep>>>,
    _held: T,
}

impl<S, T> Watched<S, T> {
    /// `inner`, watched by `activity`, holding `held` until dropped.
    pub(super) fn new(inner: S, activity: Activity, held: T) -> Self {
        Watched {
            inner,
            activity,
            sleep: None,
            _held: held,
        }
    }
}

fn timed_out(deadline: Deadline) -> io::Error {
    tracing::debug!(
        "closing a connection: {} in {} s",
        deadline.what,
        deadline.after.as_secs_f64()
    );
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{} in {} s", deadline.what, deadline.after.as_secs_f64()),
    )
}

impl<S: AsyncRead + Unpin, T: Unpin> AsyncRead for Watched<S, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let deadline = this.activity.deadline();
        if let Some(d) = deadline.filter(|d| Instant::now() >= d.at) {
            return Poll::Ready(Err(timed_out(d)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.read_some();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        this.activity.park_reader(cx.waker());
        // Read again: the phase may have changed since (another task ended
        // a request), and a change after this wakes the reader.
        let Some(deadline) = this.activity.deadline() else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.at)));
        if sleep.deadline() != deadline.at {
            sleep.as_mut().reset(deadline.at);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(timed_out(deadline))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin, T: Unpin> AsyncWrite for Watched<S, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(50);

    fn phase(a: &Activity) -> Phase {
        a.state().phase
    }

    #[test]
    fn a_request_in_flight_has_no_deadline_and_its_end_starts_the_idle_gap() {
        let a = Activity::new(HEADER, IDLE);
        let d = a.deadline().unwrap();
        assert_eq!((d.after, d.what), (HEADER, "no whole request headers"));
        let first = a.request();
        let second = a.request();
        assert_eq!(a.deadline(), None);
        drop(first);
        assert_eq!(a.deadline(), None, "one request is still in flight");
        drop(second);
        let d = a.deadline().unwrap();
        assert_eq!((d.after, d.what), (IDLE, "no new request"));
        // The next request's first bytes start its header deadline, which
        // ends no earlier than the idle gap they interrupt would have.
        let idle_end = d.at;
        a.read_some();
        assert!(matches!(phase(&a), Phase::Headers { .. }));
        let d = a.deadline().unwrap();
        assert_eq!((d.at, d.what), (idle_end, "no whole request headers"));
    }

    #[test]
    fn bytes_late_in_an_idle_gap_are_given_the_header_timeout() {
        // A header timeout longer than the idle one: bytes that come in
        // after an idle gap has run a while have the whole header timeout.
        let a = Activity::new(IDLE, HEADER);
        drop(a.request());
        let idle_end = a.deadline().unwrap().at;
        a.read_some();
        let d = a.deadline().unwrap();
        assert!(d.at > idle_end, "{d:?}");
        assert_eq!(d.after, IDLE);
    }

    #[test]
    fn bytes_read_while_busy_or_reading_headers_change_nothing() {
        let a = Activity::new(HEADER, IDLE);
        let start = phase(&a);
        a.read_some();
        assert_eq!(phase(&a), start, "the header deadline runs from the accept");
        let _req = a.request();
        a.read_some();
        assert_eq!(phase(&a), Phase::Busy(1));
    }

    #[test]
    fn an_upgraded_connection_never_times_out() {
        let a = Activity::new(HEADER, IDLE);
        let req = a.request();
        a.upgraded();
        drop(req);
        assert_eq!(a.deadline(), None);
        let _next = a.request();
        assert_eq!(phase(&a), Phase::Upgraded);
    }

    #[test]
    fn the_end_of_the_last_request_wakes_the_parked_reader() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(false.into()));
        let a = Activity::new(HEADER, IDLE);
        let req = a.request();
        a.park_reader(&Waker::from(flag.clone()));
        drop(req);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
    }
}
