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
//! A restored device has no connections: on activation it sends the guest a
//! TRANSPORT_RESET event, and the guest resets every connection it had.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::packet::*;
use crate::devices::virtio::queue::{self, pop_chain};
use crate::devices::virtio::{
    complete, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

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

const LISTENER_TOKEN: u64 = 0;

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

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    /// In the epoll set for reading.
    reading: bool,
    /// Bytes from the guest not yet written to the host.
    to_host: Vec<u8>,
    /// Waiting for the socket to take `to_host`.
    writing: bool,
    /// Bytes consumed (written to the host) in total.
    fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes sent to the guest in total.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The guest will send no more: shut the host's write side once `to_host` drains.
    shut_to_host: bool,
    /// The host will send no more (read returned end of file).
    host_eof: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Conn {
            stream,
            token,
            state,
            reading: false,
            to_host: Vec::new(),
            writing: false,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            shut_to_host: false,
            host_eof: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
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
            owners: HashMap::new(),
            ctrl: VecDeque::new(),
            next_token: 1,
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
        let want_read = c.state == ConnState::Established;
        let want_write = c.writing;
        let mut ev = EventSet::empty();
        if want_read && c.reading {
            ev |= EventSet::IN;
        }
        if want_write {
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

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            if let Some(events) = self.events() {
                let _ = events.remove(c.stream.as_raw_fd());
            }
            self.owners.remove(&c.token);
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
            if self.pending.len() + self.conns.len() >= MAX_CONNS {
                continue; // Dropped: the host sees the stream close.
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
        let (Some(port), true) = (port, self.ctrl.len() < MAX_PENDING_CTRL) else {
            let mut s = p.stream;
            let _ = s.write_all(b"ERROR bad CONNECT line: send \"CONNECT <port>\\n\"\n");
            return;
        };
        let host_port = self.alloc_host_port(port);
        let key = (host_port, port);
        self.owners.insert(token, Owner::Conn(key));
        self.conns
            .insert(key, Conn::new(p.stream, token, ConnState::Connecting));
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
        let mut failed = false;
        while !c.to_host.is_empty() {
            match c.stream.write(&c.to_host) {
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.close(key);
            self.send_rst(key);
            return;
        }
        let was_writing = c.writing;
        c.writing = !c.to_host.is_empty();
        if c.to_host.is_empty() && c.shut_to_host {
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
                    } else if h.op != OP_RST {
                        // A payload shorter than its header says, or too big.
                        let key = (h.dst_port, h.src_port);
                        self.close(key);
                        self.send_rst(key);
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
                    self.close(key);
                    return self.send_rst(key);
                }
                c.state = ConnState::Established;
                c.reading = true;
                let line = format!("OK {}\n", key.0);
                // The stream is fresh: a short line fits its socket buffer.
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key);
                    return self.send_rst(key);
                }
                self.set_conn_interest(key);
                self.read_host(key);
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return self.send_rst(key);
                };
                if c.state != ConnState::Established
                    || c.to_host.len() + payload.len() > CONN_BUF as usize
                {
                    // Data before the connection is up, or past the credit given.
                    self.close(key);
                    return self.send_rst(key);
                }
                c.to_host.extend_from_slice(payload);
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
                if !self.conns.contains_key(&key) {
                    return;
                }
                if h.flags & SHUTDOWN_RCV != 0 && h.flags & SHUTDOWN_SEND != 0 {
                    // Both ways: flush what we can, then the connection ends.
                    self.flush_to_host(key);
                    self.close(key);
                    self.send_rst(key);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.shut_to_host = true;
                    }
                    self.flush_to_host(key);
                }
            }
            OP_RST => self.close(key),
            _ => {
                self.close(key);
                self.send_rst(key);
            }
        }
    }

    /// A guest connection to host port `key.0`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() + self.pending.len() >= MAX_CONNS {
            return self.send_rst(key);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => return self.send_rst(key),
        };
        let token = self.alloc_token();
        let mut c = Conn::new(stream, token, ConnState::Established);
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
            if c.state != ConnState::Established || c.host_eof {
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
                    // The host closed (or shut its write side): tell the guest.
                    self.queues[RXQ].go_to_previous_position();
                    let mut h = self.header(key, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
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
                Err(_) => {
                    self.queues[RXQ].go_to_previous_position();
                    self.close(key);
                    self.send_rst(key);
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
            .filter(|(_, c)| {
                c.state == ConnState::Established
                    && !c.reading
                    && !c.host_eof
                    && c.peer_credit() > 0
            })
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

    fn drop_connections(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.close(k);
        }
        for (_, p) in self.pending.drain() {
            if let Some(a) = &self.active {
                let _ = a.events.remove(p.stream.as_raw_fd());
            }
        }
        self.owners.clear();
        self.ctrl.clear();
    }
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
        match self.owners.get(&token).copied() {
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
        }
        self.reset_event_due = false;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vmm_sys_util::epoll::{Epoll, EpollEvent};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, D};
    use crate::devices::virtio::{EventRegistry, Interrupt, DEVICE_TOKEN_BASE};
    use crate::memory::GuestMemoryMmap;

    const GUEST_BUF: u32 = 64 * 1024;

    /// A vsock device and the guest-side queues driving it, with a small
    /// event loop standing in for the transport's worker.
    struct Rig {
        dev: Vsock,
        epoll: Arc<Epoll>,
        rx: GuestQueue,
        tx: GuestQueue,
        ev: GuestQueue,
        cid: u64,
        path: PathBuf,
        /// Next guest buffer address.
        buf: std::cell::Cell<u64>,
        guest_fwd: std::cell::Cell<u32>,
    }

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("forkd-vsock-{name}-{}.sock", std::process::id()))
    }

    fn rig_with(mem: &GuestMemoryMmap, dev: Vsock, base: u64) -> Rig {
        let mut dev = dev;
        let rx = GuestQueue::at(mem, 64, base);
        let tx = GuestQueue::at(mem, 64, base + 0x8000);
        let ev = GuestQueue::at(mem, 64, base + 0x10000);
        rx.configure(&mut dev.queues[RXQ]);
        tx.configure(&mut dev.queues[TXQ]);
        ev.configure(&mut dev.queues[EVQ]);
        let epoll = Arc::new(Epoll::new().unwrap());
        let cid = dev.cid;
        let path = dev.uds_path.clone();
        let r = Rig {
            dev,
            epoll: epoll.clone(),
            rx,
            tx,
            ev,
            cid,
            path,
            buf: std::cell::Cell::new(base + 0x20_0000),
            guest_fwd: std::cell::Cell::new(0),
        };
        let mut r = r;
        r.dev
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
                events: EventRegistry::new(epoll),
            })
            .unwrap();
        r
    }

    fn rig(name: &str, cid: u64) -> (Rig, GuestMemoryMmap) {
        let mem = guest_memory();
        let dev = Vsock::new(cid, &path(name)).unwrap();
        (rig_with(&mem, dev, 0x1000), mem)
    }

    impl Rig {
        fn alloc(&self, len: u64) -> u64 {
            let a = self.buf.get();
            self.buf.set(a + len.next_multiple_of(0x1000));
            a
        }

        /// Posts `n` receive buffers.
        fn post_rx(&mut self, n: usize) {
            for _ in 0..n {
                let a = self.alloc(u64::from(GUEST_BUF) + HDR_LEN as u64);
                self.rx.add_chain(&[D::w(a, GUEST_BUF + HDR_LEN as u32)]);
            }
            self.dev.process_queue(RXQ);
        }

        /// Sends a packet from the guest.
        fn send(&mut self, op: u16, src_port: u32, dst_port: u32, flags: u32, data: &[u8]) {
            let h = Header {
                src_cid: self.cid,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: GUEST_BUF,
                fwd_cnt: self.guest_fwd.get(),
            };
            let a = self.alloc(HDR_LEN as u64 + data.len() as u64);
            self.tx.write(a, &h.encode());
            self.tx.write(a + HDR_LEN as u64, data);
            self.tx.add_chain(&[D::r(a, (HDR_LEN + data.len()) as u32)]);
            self.dev.process_queue(TXQ);
        }

        /// Runs the device's host side until the guest receives a packet.
        fn recv(&mut self) -> (Header, Vec<u8>) {
            let start = Instant::now();
            loop {
                if let Some((head, len)) = self.rx.pop_used() {
                    let at = self.rx.read(self.rx.desc_table.0 + u64::from(head) * 16, 8);
                    let addr = u64::from_le_bytes(at.try_into().unwrap());
                    let hb: [u8; HDR_LEN] = self.rx.read(addr, HDR_LEN).try_into().unwrap();
                    let h = Header::decode(&hb);
                    assert_eq!(len as usize, HDR_LEN + h.len as usize);
                    let data = self.rx.read(addr + HDR_LEN as u64, h.len as usize);
                    self.guest_fwd.set(self.guest_fwd.get() + h.len);
                    self.post_rx(1);
                    return (h, data);
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "no packet for the guest"
                );
                self.pump(10);
            }
        }

        /// One round of the event loop.
        fn pump(&mut self, timeout_ms: i32) {
            let mut evs = vec![EpollEvent::default(); 16];
            let n = self.epoll.wait(timeout_ms, &mut evs).unwrap();
            for e in &evs[..n] {
                self.dev
                    .process_event(e.data() - DEVICE_TOKEN_BASE, e.event_set());
            }
        }

        /// Nothing reaches the guest for a while.
        fn quiet(&mut self) {
            for _ in 0..5 {
                self.pump(5);
            }
            assert_eq!(self.rx.pop_used(), None);
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    }

    fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    /// Host connects with CONNECT, guest accepts; returns the stream and host port.
    fn host_connect(r: &mut Rig, guest_port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&r.path).unwrap();
        host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let (h, _) = r.recv();
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.dst_port),
            (OP_REQUEST, 2, r.cid, guest_port)
        );
        r.send(OP_RESPONSE, guest_port, h.src_port, 0, &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", h.src_port));
        (host, h.src_port)
    }

    #[test]
    fn host_connect_and_data_both_ways() {
        let (mut r, _mem) = rig("host", 3);
        r.post_rx(8);
        let (mut host, hport) = host_connect(&mut r, 1234);
        host.write_all(b"hello guest").unwrap();
        let (h, data) = r.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, hport, 1234));
        assert_eq!(data, b"hello guest");
        r.send(OP_RW, 1234, hport, 0, b"hello host");
        assert_eq!(read_exact(&mut host, 10), b"hello host");
        // Bulk both ways, more than one packet's worth.
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        host.write_all(&big).unwrap();
        let mut got = Vec::new();
        while got.len() < big.len() {
            let (h, data) = r.recv();
            if h.op == OP_RW {
                got.extend_from_slice(&data);
            }
            // Tell the device what the guest consumed.
            r.send(OP_CREDIT_UPDATE, 1234, hport, 0, &[]);
        }
        assert_eq!(got, big);
        // The host closes: the guest is told.
        drop(host);
        let (h, _) = r.recv();
        assert_eq!(h.op, OP_SHUTDOWN);
        r.send(OP_RST, 1234, hport, 0, &[]);
        assert_eq!(r.dev.connection_count(), 0);
    }

    #[test]
    fn guest_initiated_connection() {
        let (mut r, _mem) = rig("guest", 4);
        r.post_rx(8);
        let mut lpath = r.path.clone().into_os_string();
        lpath.push("_5000");
        let _ = std::fs::remove_file(&lpath);
        let listener = UnixListener::bind(&lpath).unwrap();
        r.send(OP_REQUEST, 7777, 5000, 0, &[]);
        let (h, _) = r.recv();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RESPONSE, 5000, 7777, 4)
        );
        let (mut host, _) = listener.accept().unwrap();
        r.send(OP_RW, 7777, 5000, 0, b"ping");
        assert_eq!(read_exact(&mut host, 4), b"ping");
        host.write_all(b"pong").unwrap();
        let (h, data) = r.recv();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"pong"[..]));
        // Nobody listens on port 5001: reset.
        r.send(OP_REQUEST, 7778, 5001, 0, &[]);
        let (h, _) = r.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 7778));
        // Guest shuts down both ways: the host sees EOF.
        r.send(OP_SHUTDOWN, 7777, 5000, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
        let mut rest = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let _ = std::fs::remove_file(&lpath);
    }

    #[test]
    fn hostile_guest_packets() {
        let (mut r, _mem) = rig("hostile", 5);
        r.post_rx(8);
        let (mut host, hport) = host_connect(&mut r, 99);
        // Wrong source CID: reset, and the real connection is untouched.
        let mut h = Header {
            src_cid: 77,
            dst_cid: HOST_CID,
            src_port: 99,
            dst_port: hport,
            type_: TYPE_STREAM,
            op: OP_RW,
            ..Default::default()
        };
        let a = r.alloc(64);
        r.tx.write(a, &h.encode());
        r.tx.add_chain(&[D::r(a, HDR_LEN as u32)]);
        r.dev.process_queue(TXQ);
        assert_eq!(r.recv().0.op, OP_RST);
        assert_eq!(r.dev.connection_count(), 1);
        // A header claiming more payload than the chain has: reset.
        h.src_cid = r.cid;
        h.len = 1000;
        let a = r.alloc(64);
        r.tx.write(a, &h.encode());
        r.tx.add_chain(&[D::r(a, HDR_LEN as u32 + 10)]);
        r.dev.process_queue(TXQ);
        assert_eq!(r.recv().0.op, OP_RST);
        assert_eq!(r.dev.connection_count(), 0);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let _ = host.read_to_end(&mut rest);
        // A bad CONNECT line is refused.
        let mut bad = UnixStream::connect(&r.path).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        r.pump(50);
        r.pump(50);
        assert!(read_line(&mut bad).starts_with("ERROR"));
        // Short chains do not panic.
        r.tx.add_chain(&[D::r(a, 3)]);
        r.dev.process_queue(TXQ);
        r.quiet();
    }

    #[test]
    fn two_devices_never_cross() {
        let mem = guest_memory();
        let mut a = rig_with(&mem, Vsock::new(10, &path("cross-a")).unwrap(), 0x1000);
        let mut b = rig_with(&mem, Vsock::new(11, &path("cross-b")).unwrap(), 0x80_0000);
        a.post_rx(8);
        b.post_rx(8);
        let (mut ha, pa) = host_connect(&mut a, 42);
        b.quiet();
        let (mut hb, pb) = host_connect(&mut b, 42);
        a.quiet();
        ha.write_all(b"for a").unwrap();
        hb.write_all(b"for b").unwrap();
        let (h, d) = a.recv();
        assert_eq!((h.dst_cid, d.as_slice()), (10, &b"for a"[..]));
        let (h, d) = b.recv();
        assert_eq!((h.dst_cid, d.as_slice()), (11, &b"for b"[..]));
        a.quiet();
        b.quiet();
        a.send(OP_RW, 42, pa, 0, b"from a");
        b.send(OP_RW, 42, pb, 0, b"from b");
        assert_eq!(read_exact(&mut ha, 6), b"from a");
        assert_eq!(read_exact(&mut hb, 6), b"from b");
        // Guest A addressing B's host port reaches nothing of B's.
        a.send(OP_RW, 42, pb + 1000, 0, b"stray");
        assert_eq!(a.recv().0.op, OP_RST);
        b.quiet();
    }

    #[test]
    fn restored_device_resets_the_guest() {
        let (mut r, mem) = rig("restore", 6);
        r.post_rx(8);
        let (mut host, _) = host_connect(&mut r, 1);
        let state = r.dev.save();
        let queues_at = (r.rx.desc_table, r.tx.desc_table, r.ev.desc_table);
        drop(r);
        // The old VM's host side is gone with it.
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = Vec::new();
        let _ = host.read_to_end(&mut rest);

        let dev = Vsock::restore(&state, &path("restore2")).unwrap();
        assert_eq!(dev.connection_count(), 0);
        assert!(dev.reset_event_due);
        let mut dev = dev;
        let ev = GuestQueue::at(&mem, 64, queues_at.2 .0);
        ev.add_chain(&[D::w(0x70_0000, 8)]);
        let epoll = Arc::new(Epoll::new().unwrap());
        // The restored queues are where the guest left them.
        assert_eq!(dev.queues[RXQ].desc_table(), queues_at.0 .0);
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            events: EventRegistry::new(epoll),
        })
        .unwrap();
        assert_eq!(ev.pop_used(), Some((0, 4)));
        assert_eq!(ev.read(0x70_0000, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
        assert!(!dev.reset_event_due);
    }
}
