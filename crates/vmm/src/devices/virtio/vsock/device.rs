//! The virtio-vsock device model with its host side on Unix sockets.
//!
//! - Host to guest: a host process connects to the VM's socket
//!   (`uds_path`) and writes `CONNECT <port>\n`. The device picks a host
//!   port, asks the guest for a connection to `<port>`, and when the guest
//!   accepts answers `OK <host port>\n`; from then on the Unix stream
//!   carries the connection's bytes both ways. A refusal closes the stream.
//! - Guest to host: a guest connection to host port `P` is a connection to
//!   the Unix socket `<uds_path>_<P>`, which a host process listens on.
//!
//! Flow control is virtio-vsock's credit scheme: the device never sends the
//! guest more than the guest's advertised buffer allows, and buffers at most
//! [`CONN_BUF`] bytes per connection on the way to the host (a guest that
//! sends past the credit it was given gets its connection reset). A host
//! stream is only read while the guest has both credit and receive buffers;
//! otherwise it is left in the kernel's socket buffer (and taken out of the
//! epoll set so it does not spin the worker).
//!
//! Closing: a guest that shuts a connection down in both directions (or
//! resets it) may do so right behind its last data, while the host reader
//! is behind. The bytes the device still holds for the host are not
//! dropped: the connection leaves the guest's port space (the guest gets
//! its RST at once) and becomes a [`Drain`] that writes the rest as the
//! host reads it, then closes the host's stream. Every connection the
//! device ends on its own is logged ([`ConnLog`]).
//!
//! A restored device has no connections: on activation it sends the guest a
//! TRANSPORT_RESET event, and the guest resets every connection it had.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{describe, Conn, ConnState, Drain, Initiator, Key};
use super::log::ConnLog;
use super::packet::*;
use crate::devices::virtio::queue::{self, pop_chain};
use crate::devices::virtio::{
    complete, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};
use close::Abort;

/// Entries in each queue.
pub(super) const QUEUE_SIZE: u16 = 256;
/// The receive, transmit and event queues.
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;
/// Bytes the device buffers per connection toward the host (its buf_alloc).
pub const CONN_BUF: u32 = 256 * 1024;
/// Largest payload accepted in one packet from the guest.
const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Control packets waiting for guest receive buffers, at most.
const MAX_PENDING_CTRL: usize = 4096;
/// Connections at most.
const MAX_CONNS: usize = 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out for host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// How long a host reader may take no byte of a finished connection's
/// tail before the device gives up on it (and logs what it dropped). A
/// Linux guest waits 8 s for its own close; a host client gets longer.
pub(super) const DRAIN_IDLE: Duration = Duration::from_secs(60);

const LISTENER_TOKEN: u64 = 0;
/// The drain deadline's timer.
const TIMER_TOKEN: u64 = 1;
const FIRST_CONN_TOKEN: u64 = 2;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The VM's socket could not be created.
    #[error("cannot listen on {path}: {source}; choose a path in a writable directory that no other VM uses")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CID the guest cannot have.
    #[error(
        "guest CID {0} is reserved: use 3 or more (0-2 are the hypervisor, local and host CIDs)"
    )]
    Cid(u64),
}

/// A host connection that has not named its port yet.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Pending,
    Conn(Key),
    Drain,
}

/// A virtio socket device.
pub struct Vsock {
    pub(super) cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) active: Option<ActivateContext>,
    conns: HashMap<Key, Conn>,
    pending: HashMap<u64, Pending>,
    /// Finished connections whose last bytes are still going to the host,
    /// by token.
    drains: HashMap<u64, Drain>,
    /// Fires when the oldest drain may have gone idle too long.
    /// Made with the first drain (a restored child that never has one
    /// pays nothing for it), in the epoll set from then on.
    timer: Option<TimerFd>,
    timer_armed: bool,
    drain_idle: Duration,
    log: ConnLog,
    owners: HashMap<u64, Owner>,
    /// Control packets for the guest.
    ctrl: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    /// A TRANSPORT_RESET event is owed to the guest (after a restore).
    pub(super) reset_event_due: bool,
    /// Host-to-guest staging buffer.
    bounce: Vec<u8>,
    /// Guest-to-host payload buffer (apart from `bounce`: handling a guest
    /// packet may move host bytes to the guest).
    tx_buf: Vec<u8>,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        let listener = bind(uds_path)?;
        Ok(Vsock {
            cid,
            uds_path: uds_path.to_owned(),
            listener,
            acked_features: 0,
            queues: queue::new_queues(&[QUEUE_SIZE; 3]),
            active: None,
            conns: HashMap::new(),
            pending: HashMap::new(),
            drains: HashMap::new(),
            timer: None,
            timer_armed: false,
            drain_idle: DRAIN_IDLE,
            log: ConnLog::to_log(),
            owners: HashMap::new(),
            ctrl: VecDeque::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            reset_event_due: false,
            bounce: vec![0u8; MAX_PKT_PAYLOAD as usize],
            tx_buf: vec![0u8; MAX_PKT_PAYLOAD as usize],
        })
    }

    pub(super) const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1;

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The socket host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Finished connections whose last bytes are still going to the host.
    pub fn draining_count(&self) -> usize {
        self.drains.len()
    }

    /// Connections of any kind: the ones MAX_CONNS bounds.
    fn open_count(&self) -> usize {
        self.conns.len() + self.pending.len() + self.drains.len()
    }

    fn header(&self, key: Key, op: u16) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    fn push_ctrl(&mut self, h: Header) {
        if self.ctrl.len() < MAX_PENDING_CTRL {
            self.ctrl.push_back(h);
        } else {
            self.log.line(format_args!(
                "connection host port {} / guest port {}: a control packet (op {}) for the guest was dropped: {MAX_PENDING_CTRL} already wait for guest receive buffers",
                h.src_port, h.dst_port, h.op
            ));
        }
    }

    fn send_rst(&mut self, key: Key) {
        let h = self.header(key, OP_RST);
        self.push_ctrl(h);
    }

    fn events(&self) -> Option<&crate::devices::virtio::EventRegistry> {
        self.active.as_ref().map(|a| &a.events)
    }

    fn set_conn_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let mut ev = EventSet::empty();
        if c.reading && c.wants_host_data() {
            ev |= EventSet::IN;
        }
        if c.writing {
            ev |= EventSet::OUT;
        }
        let fd = c.stream.as_raw_fd();
        let token = c.token;
        let Some(events) = self.events() else { return };
        // Out of the set entirely when nothing is wanted (level-triggered
        // HUP would otherwise spin the worker).
        let _ = events.remove(fd);
        if !ev.is_empty() {
            let _ = events.add(fd, token, ev);
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- host side ----

    fn accept_host(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return,
            };
            if self.open_count() >= MAX_CONNS {
                // Dropped: the host sees the stream close.
                self.log.line(format_args!(
                    "a host connection was refused: {MAX_CONNS} connections are open"
                ));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            let Some(events) = self.events() else { return };
            if events.add(stream.as_raw_fd(), token, EventSet::IN).is_err() {
                continue;
            }
            self.owners.insert(token, Owner::Pending);
            self.pending.insert(
                token,
                Pending {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Reads the `CONNECT <port>\n` line of a new host connection.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: nothing past the newline may be consumed, it is
        // connection data.
        let done = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => break Err(()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Err(()),
            }
        };
        let p = self.pending.remove(&token).expect("present above");
        self.owners.remove(&token);
        if let Some(events) = self.events() {
            let _ = events.remove(p.stream.as_raw_fd());
        }
        let port = done.ok().and_then(|()| parse_connect(&p.line));
        let Some(port) = port else {
            self.log.line(format_args!(
                "a host connection was refused: its first line was not CONNECT <port>"
            ));
            let mut s = p.stream;
            let _ = s.write_all(b"ERROR bad CONNECT line: send \"CONNECT <port>\\n\"\n");
            return;
        };
        if self.ctrl.len() >= MAX_PENDING_CTRL {
            self.log.line(format_args!(
                "a host connection to guest port {port} was refused: the guest takes no packets ({MAX_PENDING_CTRL} wait for its receive buffers)"
            ));
            let mut s = p.stream;
            let _ = s.write_all(b"ERROR the guest takes no packets: try again later\n");
            return;
        }
        let host_port = self.alloc_host_port(port);
        let key = (host_port, port);
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(
            key,
            Conn::new(p.stream, token, Initiator::Host, ConnState::Connecting),
        );
        let h = self.header(key, OP_REQUEST);
        self.push_ctrl(h);
        self.deliver_rx();
    }

    fn alloc_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// Moves guest bytes waiting for the host into its socket.
    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        match c.to_host.write_to(&mut c.stream) {
            Ok(n) => c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32),
            Err(e) => return self.abort(key, Abort::HostWrite(e)),
        }
        let was_writing = c.writing;
        c.writing = !c.to_host.is_empty();
        if c.to_host.is_empty() && c.peer_shut & SHUTDOWN_SEND != 0 && !c.host_write_shut {
            // The guest sends no more and all it sent is written.
            c.host_write_shut = true;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        let owed = c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent);
        if owed >= CONN_BUF / 4 {
            c.fwd_cnt_sent = c.fwd_cnt;
            let h = self.header(key, OP_CREDIT_UPDATE);
            self.push_ctrl(h);
        }
        let c = self.conns.get(&key).expect("present above");
        if was_writing != c.writing {
            self.set_conn_interest(key);
        }
    }

    // ---- guest side ----

    fn process_tx(&mut self) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        while let Some((head, chain)) = pop_chain(&mut self.queues[TXQ], &ctx.mem) {
            if let Ok(chain) = chain {
                let mut r = chain.reader(&ctx.mem);
                let mut hb = [0u8; HDR_LEN];
                if r.read(&mut hb).ok() == Some(HDR_LEN) {
                    let h = Header::decode(&hb);
                    let len = h.len.min(MAX_PKT_PAYLOAD) as usize;
                    let mut payload = std::mem::take(&mut self.tx_buf);
                    let n = if h.op == OP_RW {
                        r.read(&mut payload[..len]).unwrap_or(0)
                    } else {
                        0
                    };
                    if h.op != OP_RW || (n == len && h.len <= MAX_PKT_PAYLOAD) {
                        self.handle_guest_packet(&h, &payload[..n]);
                    } else {
                        // A payload shorter than its header says, or too big.
                        let key = (h.dst_port, h.src_port);
                        self.abort(
                            key,
                            Abort::BadPayload {
                                claimed: h.len,
                                got: n,
                            },
                        );
                    }
                    self.tx_buf = payload;
                }
            }
            if complete(&mut self.queues[TXQ], &ctx.mem, &ctx.interrupt, head, 0).is_err() {
                break;
            }
        }
        self.deliver_rx();
    }

    fn handle_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                let mut r = self.header(key, OP_RST);
                r.dst_cid = h.src_cid;
                self.push_ctrl(r);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_connect(key, h),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return self.send_rst(key);
                };
                if c.state != ConnState::Connecting {
                    return self.abort(key, Abort::UnexpectedResponse);
                }
                c.state = ConnState::Established;
                c.reading = true;
                let line = format!("OK {}\n", key.0);
                // The stream is fresh: a short line fits its socket buffer.
                if let Err(e) = c.stream.write_all(line.as_bytes()) {
                    return self.abort(key, Abort::ResponseLine(e));
                }
                self.set_conn_interest(key);
                self.read_host(key);
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return self.send_rst(key);
                };
                if c.state != ConnState::Established {
                    return self.abort(key, Abort::DataBeforeEstablished);
                }
                if c.to_host.len() + payload.len() > CONN_BUF as usize {
                    let held = c.to_host.len();
                    let len = payload.len();
                    return self.abort(key, Abort::PastCredit { held, len });
                }
                c.to_host.push(payload);
                self.flush_to_host(key);
            }
            OP_CREDIT_UPDATE => self.read_host(key),
            OP_CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.fwd_cnt_sent = c.fwd_cnt;
                    let h = self.header(key, OP_CREDIT_UPDATE);
                    self.push_ctrl(h);
                }
            }
            OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                // Flags add up: SEND now and RCV later is both ways.
                c.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_done() {
                    self.flush_to_host(key);
                    self.guest_finished(key, false);
                } else {
                    // SEND: the host's write side shuts once the buffer is
                    // written. RCV: host bytes stop going to the guest.
                    self.flush_to_host(key);
                    self.set_conn_interest(key);
                }
            }
            OP_RST => {
                self.flush_to_host(key);
                self.guest_finished(key, true);
            }
            op => self.abort(key, Abort::UnknownOp(op)),
        }
    }

    /// A guest connection to host port `key.0`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) {
            return self.abort(key, Abort::UnexpectedResponse);
        }
        if self.open_count() >= MAX_CONNS {
            self.log.line(format_args!(
                "{} refused: {MAX_CONNS} connections are open",
                describe(key, Initiator::Guest)
            ));
            return self.send_rst(key);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        // Nobody listening is the guest's answer (a reset), not the device's
        // decision: not logged.
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => return self.send_rst(key),
        };
        let token = self.alloc_token();
        let mut c = Conn::new(stream, token, Initiator::Guest, ConnState::Established);
        c.reading = true;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.owners.insert(token, Owner::Conn(key));
        self.conns.insert(key, c);
        self.set_conn_interest(key);
        let h = self.header(key, OP_RESPONSE);
        self.push_ctrl(h);
    }

    /// Moves host bytes to the guest while it has credit and buffers.
    fn read_host(&mut self, key: Key) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        loop {
            let Some(c) = self.conns.get(&key) else {
                return;
            };
            if !c.wants_host_data() {
                return;
            }
            let credit = c.peer_credit();
            if credit == 0
                || !queue::has_available(&self.queues[RXQ], &ctx.mem)
                || !self.ctrl.is_empty()
            {
                // Wait for credit or buffers (or for control packets to go first).
                if c.reading {
                    self.conns.get_mut(&key).expect("present").reading = false;
                    self.set_conn_interest(key);
                }
                return;
            }
            let Some((head, chain)) = pop_chain(&mut self.queues[RXQ], &ctx.mem) else {
                return;
            };
            let Ok(chain) = chain else {
                let _ = complete(&mut self.queues[RXQ], &ctx.mem, &ctx.interrupt, head, 0);
                continue;
            };
            let room = chain.writable_len().saturating_sub(HDR_LEN as u64);
            let want = room.min(u64::from(credit)).min(u64::from(MAX_PKT_PAYLOAD)) as usize;
            if want == 0 {
                let _ = complete(&mut self.queues[RXQ], &ctx.mem, &ctx.interrupt, head, 0);
                continue;
            }
            let c = self.conns.get_mut(&key).expect("present");
            let read = loop {
                match c.stream.read(&mut self.bounce[..want]) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let n = match read {
                Ok(0) => {
                    // The host closed, or shut only its write side: tell the
                    // guest which (a half-closed host still reads).
                    let hung_up = host_hung_up(&c.stream);
                    self.queues[RXQ].go_to_previous_position();
                    let mut h = self.header(key, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    if hung_up {
                        h.flags |= SHUTDOWN_RCV;
                    }
                    let c = self.conns.get_mut(&key).expect("present");
                    c.reading = false;
                    c.host_eof = true;
                    self.set_conn_interest(key);
                    self.push_ctrl(h);
                    self.deliver_rx();
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.queues[RXQ].go_to_previous_position();
                    if !c.reading {
                        c.reading = true;
                        self.set_conn_interest(key);
                    }
                    return;
                }
                Err(e) => {
                    self.queues[RXQ].go_to_previous_position();
                    self.abort(key, Abort::HostRead(e));
                    self.deliver_rx();
                    return;
                }
            };
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            c.fwd_cnt_sent = c.fwd_cnt;
            let mut h = self.header(key, OP_RW);
            h.len = n as u32;
            let mut w = chain.writer(&ctx.mem);
            let ok = w.write(&h.encode()).ok() == Some(HDR_LEN)
                && w.write(&self.bounce[..n]).ok() == Some(n);
            let used = if ok { (HDR_LEN + n) as u32 } else { 0 };
            if complete(&mut self.queues[RXQ], &ctx.mem, &ctx.interrupt, head, used).is_err() {
                return;
            }
        }
    }

    /// Sends queued control packets, then lets connections waiting for
    /// buffers or credit read again.
    fn deliver_rx(&mut self) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        while !self.ctrl.is_empty() {
            let Some((head, chain)) = pop_chain(&mut self.queues[RXQ], &ctx.mem) else {
                return;
            };
            let mut used = 0;
            if let Ok(chain) = chain {
                let h = self.ctrl.front().expect("not empty");
                if chain.writer(&ctx.mem).write(&h.encode()).ok() == Some(HDR_LEN) {
                    used = HDR_LEN as u32;
                    self.ctrl.pop_front();
                }
            }
            if complete(&mut self.queues[RXQ], &ctx.mem, &ctx.interrupt, head, used).is_err() {
                return;
            }
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wants_host_data() && !c.reading && c.peer_credit() > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(&key) {
                c.reading = true;
            }
            self.set_conn_interest(key);
        }
    }

    fn send_reset_event(&mut self) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        if !self.reset_event_due {
            return;
        }
        let Some((head, chain)) = pop_chain(&mut self.queues[EVQ], &ctx.mem) else {
            return;
        };
        let mut used = 0;
        if let Ok(chain) = chain {
            if chain
                .writer(&ctx.mem)
                .write(&EVENT_TRANSPORT_RESET.to_le_bytes())
                .ok()
                == Some(4)
            {
                used = 4;
                self.reset_event_due = false;
            }
        }
        let _ = complete(&mut self.queues[EVQ], &ctx.mem, &ctx.interrupt, head, used);
    }
}

/// Whether the host closed its socket entirely (not just its write side).
fn host_hung_up(stream: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and a zero timeout: poll only reports.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    // A Unix stream whose peer closed reports POLLHUP; one whose peer only
    // shut its write side reports POLLRDHUP without it.
    n == 1 && p.revents & libc::POLLHUP != 0
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Binds the VM's socket, replacing a stale socket file nobody listens on.
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    let err = |source| VsockError::Bind {
        path: path.to_owned(),
        source,
    };
    let l = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(err(e));
            }
            std::fs::remove_file(path).map_err(err)?;
            UnixListener::bind(path).map_err(err)?
        }
        Err(e) => return Err(err(e)),
    };
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn avail_features(&self) -> u64 {
        Self::AVAIL_FEATURES
    }
    crate::devices::virtio::virtio_common_accessors!();
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&ctx.mem) {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        ctx.events
            .add(self.listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN)
            .map_err(|e| ActivateError::Backend(format!("cannot watch the vsock socket: {e}")))?;
        if let Some(t) = &self.timer {
            ctx.events
                .add(t.as_raw_fd(), TIMER_TOKEN, EventSet::IN)
                .map_err(|e| {
                    ActivateError::Backend(format!("cannot watch the vsock timer: {e}"))
                })?;
        }
        self.active = Some(ctx);
        self.send_reset_event();
        self.accept_host();
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        match index {
            RXQ => self.deliver_rx(),
            TXQ => self.process_tx(),
            EVQ => self.send_reset_event(),
            _ => {}
        }
    }
    fn process_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host();
            return;
        }
        if token == TIMER_TOKEN {
            self.expire_drains();
            return;
        }
        match self.owners.get(&token).copied() {
            Some(Owner::Drain) => self.flush_drain(token),
            Some(Owner::Pending) => self.read_connect_line(token),
            Some(Owner::Conn(key)) => {
                if events.contains(EventSet::OUT) {
                    self.flush_to_host(key);
                }
                if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.read_host(key);
                }
                self.deliver_rx();
            }
            None => {}
        }
    }
    fn reset(&mut self) {
        self.drop_connections();
        if let Some(a) = self.active.take() {
            let _ = a.events.remove(self.listener.as_raw_fd());
            if let Some(t) = &self.timer {
                let _ = a.events.remove(t.as_raw_fd());
            }
        }
        self.reset_event_due = false;
    }
}

mod close;
#[cfg(test)]
mod tests;
