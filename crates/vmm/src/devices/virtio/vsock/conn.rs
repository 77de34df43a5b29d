//! One vsock connection's state on the device, and the tail of a connection
//! the guest has finished with that is still on its way to the host.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// (host port, guest port).
pub(super) type Key = (u32, u32);

/// Which side opened the connection (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Initiator {
    /// A host process connected to the VM's socket and named a guest port.
    Host,
    /// The guest connected to a host port (`<uds_path>_<port>`).
    Guest,
}

impl std::fmt::Display for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Initiator::Host => "opened by the host",
            Initiator::Guest => "opened by the guest",
        })
    }
}

/// Names a connection in the log.
pub(super) fn describe(key: Key, initiator: Initiator) -> String {
    format!(
        "connection host port {} / guest port {} ({initiator})",
        key.0, key.1
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    Established,
}

/// Bytes from the guest on their way into the host's socket.
#[derive(Debug, Default)]
pub(super) struct HostBound {
    buf: VecDeque<u8>,
}

impl HostBound {
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
    }

    /// Writes what `w` takes without blocking. Returns the bytes written
    /// (0 when it takes none now), or the error that ended the writing
    /// (the host side is gone).
    pub(super) fn write_to(&mut self, w: &mut impl Write) -> std::io::Result<usize> {
        let mut total = 0;
        while !self.buf.is_empty() {
            let (a, b) = self.buf.as_slices();
            match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buf.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) initiator: Initiator,
    pub(super) state: ConnState,
    /// In the epoll set for reading.
    pub(super) reading: bool,
    /// Bytes from the guest not yet written to the host.
    pub(super) to_host: HostBound,
    /// Waiting for the socket to take `to_host`.
    pub(super) writing: bool,
    /// Bytes consumed (written to the host) in total.
    pub(super) fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    pub(super) fwd_cnt_sent: u32,
    /// Bytes sent to the guest in total.
    pub(super) tx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// What the guest has shut down so far (SHUTDOWN flags, accumulated:
    /// a SEND shutdown may be followed by a RCV one).
    pub(super) peer_shut: u32,
    /// The host's write side is shut (the guest sends no more and every
    /// byte it sent was written).
    pub(super) host_write_shut: bool,
    /// The host will send no more (read returned end of file).
    pub(super) host_eof: bool,
}

impl Conn {
    pub(super) fn new(
        stream: UnixStream,
        token: u64,
        initiator: Initiator,
        state: ConnState,
    ) -> Self {
        Conn {
            stream,
            token,
            initiator,
            state,
            reading: false,
            to_host: HostBound::default(),
            writing: false,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            peer_shut: 0,
            host_write_shut: false,
            host_eof: false,
        }
    }

    /// Bytes the guest can still take.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest has shut down both directions.
    pub(super) fn peer_done(&self) -> bool {
        self.peer_shut & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND
    }

    /// Host bytes may go to the guest (credit and buffers permitting).
    pub(super) fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && self.peer_shut & SHUTDOWN_RCV == 0
    }

    pub(super) fn describe(&self, key: Key) -> String {
        describe(key, self.initiator)
    }
}

/// A connection the guest has finished with (shut down both ways, or
/// reset) while bytes it sent were still waiting for the host's socket.
/// The guest no longer takes part: the device writes the rest as the host
/// reads it, then closes the host's stream, so the host reads every byte
/// and then end of file. A host that takes nothing for
/// [`DRAIN_IDLE`](super::device::DRAIN_IDLE) loses the rest, and the log
/// says so.
#[derive(Debug)]
pub(super) struct Drain {
    pub(super) stream: UnixStream,
    /// The connection it was, for the log.
    pub(super) name: String,
    pub(super) to_host: HostBound,
    /// When the host last took a byte (or the drain began).
    pub(super) progress_at: Instant,
}
