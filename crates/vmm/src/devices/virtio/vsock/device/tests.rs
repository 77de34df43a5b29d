use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::persist::Persist;
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
    /// Bytes the guest consumed, per (guest port, host port).
    guest_fwd: std::cell::RefCell<HashMap<(u32, u32), u32>>,
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
        guest_fwd: Default::default(),
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

/// A rig whose device logs into the returned vector.
fn logged_rig(name: &str, cid: u64) -> (Rig, GuestMemoryMmap, Arc<Mutex<Vec<String>>>) {
    let (mut r, mem) = rig(name, cid);
    let (log, lines) = crate::devices::virtio::vsock::log::tests::collecting();
    r.dev.log = log;
    (r, mem, lines)
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
            fwd_cnt: self
                .guest_fwd
                .borrow()
                .get(&(src_port, dst_port))
                .copied()
                .unwrap_or(0),
        };
        let a = self.alloc(HDR_LEN as u64 + data.len() as u64);
        self.tx.write(a, &h.encode());
        self.tx.write(a + HDR_LEN as u64, data);
        self.tx.add_chain(&[D::r(a, (HDR_LEN + data.len()) as u32)]);
        self.dev.process_queue(TXQ);
    }

    /// A packet the device has handed the guest, if any (no waiting).
    fn try_recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (head, len) = self.rx.pop_used()?;
        let at = self.rx.read(self.rx.desc_table.0 + u64::from(head) * 16, 8);
        let addr = u64::from_le_bytes(at.try_into().unwrap());
        let hb: [u8; HDR_LEN] = self.rx.read(addr, HDR_LEN).try_into().unwrap();
        let h = Header::decode(&hb);
        assert_eq!(len as usize, HDR_LEN + h.len as usize);
        let data = self.rx.read(addr + HDR_LEN as u64, h.len as usize);
        *self
            .guest_fwd
            .borrow_mut()
            .entry((h.dst_port, h.src_port))
            .or_default() += h.len;
        self.post_rx(1);
        Some((h, data))
    }

    /// Runs the device's host side until the guest receives a packet.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let start = Instant::now();
        loop {
            if let Some(p) = self.try_recv() {
                return p;
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

    let dev = Vsock::restore(&state, path("restore2")).unwrap();
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

/// The guest side of one connection sending to the host as a Linux
/// guest does: never past the credit the device advertised.
struct GuestSender {
    guest_port: u32,
    host_port: u32,
    tx_cnt: u32,
    /// The device's fwd_cnt, as last seen in one of its headers.
    dev_fwd: u32,
    sent: Vec<u8>,
}

impl GuestSender {
    fn new(guest_port: u32, host_port: u32) -> Self {
        GuestSender {
            guest_port,
            host_port,
            tx_cnt: 0,
            dev_fwd: 0,
            sent: Vec::new(),
        }
    }

    fn credit(&self) -> u32 {
        CONN_BUF - self.tx_cnt.wrapping_sub(self.dev_fwd)
    }

    /// Takes in what the device told the guest about this connection.
    fn absorb(&mut self, r: &mut Rig) {
        while let Some((h, _)) = r.try_recv() {
            if (h.src_port, h.dst_port) == (self.host_port, self.guest_port) {
                assert_ne!(h.op, OP_RST, "the device reset the connection");
                self.dev_fwd = h.fwd_cnt;
            }
        }
    }

    /// Sends until the device's buffer and the host's socket are full
    /// (the host does not read): no credit comes back for a while.
    fn fill(&mut self, r: &mut Rig) {
        let mut idle = 0;
        while idle < 20 {
            self.absorb(r);
            let n = self.credit().min(MAX_PKT_PAYLOAD) as usize;
            if n == 0 {
                r.pump(2);
                idle += 1;
                continue;
            }
            idle = 0;
            let at = self.sent.len();
            let chunk: Vec<u8> = (at..at + n).map(|i| (i * 7 + i / 4096) as u8).collect();
            r.send(OP_RW, self.guest_port, self.host_port, 0, &chunk);
            self.sent.extend_from_slice(&chunk);
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        }
        assert_eq!(self.credit(), 0, "the device's buffer is full");
        assert!(
            self.sent.len() > CONN_BUF as usize,
            "the host's socket holds bytes too"
        );
    }
}

/// Reads `host` to its end on another thread while the device runs,
/// after `stall`; returns what arrived and the ops the guest was sent.
fn read_to_eof_while_pumping(
    r: &mut Rig,
    host: UnixStream,
    stall: Duration,
) -> (Vec<u8>, Vec<u16>) {
    let reader = std::thread::spawn(move || {
        std::thread::sleep(stall);
        let mut host = host;
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match host.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("host read after {} bytes: {e}", got.len()),
            }
        }
    });
    let start = Instant::now();
    let mut ops = Vec::new();
    while !reader.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no EOF for the host"
        );
        r.pump(5);
        while let Some((h, _)) = r.try_recv() {
            ops.push(h.op);
        }
    }
    (reader.join().unwrap(), ops)
}

/// The guest sends what the credit allows while the host reads nothing,
/// then closes as `close` does; the host then reads to its end. Returns the
/// ops the guest was sent after its close, and the device's log.
fn close_while_host_stalled(
    name: &str,
    close: impl FnOnce(&mut Rig, &GuestSender),
) -> (Vec<u16>, Vec<String>) {
    let (mut r, _mem, lines) = logged_rig(name, 3);
    r.post_rx(32);
    let (host, hport) = host_connect(&mut r, 1024);
    let mut g = GuestSender::new(1024, hport);
    g.fill(&mut r);
    close(&mut r, &g);
    // The guest's side is over at once; the bytes are the host's to read.
    assert_eq!(r.dev.connection_count(), 0);
    assert_eq!(r.dev.draining_count(), 1);
    let (got, ops) = read_to_eof_while_pumping(&mut r, host, Duration::from_millis(50));
    assert_eq!(
        got.len(),
        g.sent.len(),
        "bytes the guest sent before closing that reached the host"
    );
    assert!(got == g.sent, "the host's bytes differ from the guest's");
    assert_eq!(r.dev.draining_count(), 0);
    let lines = lines.lock().unwrap().clone();
    (ops, lines)
}

#[test]
fn guest_shutdown_both_ways_delivers_everything_buffered() {
    let (ops, log) = close_while_host_stalled("close-both", |r, g| {
        r.send(
            OP_SHUTDOWN,
            g.guest_port,
            g.host_port,
            SHUTDOWN_RCV | SHUTDOWN_SEND,
            &[],
        )
    });
    assert_eq!(ops, [OP_RST], "the guest's close is answered with a reset");
    assert!(log.is_empty(), "nothing was dropped: {log:?}");
}

#[test]
fn guest_reset_delivers_everything_buffered() {
    let (ops, log) = close_while_host_stalled("close-rst", |r, g| {
        r.send(OP_RST, g.guest_port, g.host_port, 0, &[])
    });
    assert!(ops.is_empty(), "a reset is not answered: {ops:?}");
    assert!(log.is_empty(), "nothing was dropped: {log:?}");
}

#[test]
fn guest_shutdown_in_two_steps_delivers_everything_buffered() {
    let (ops, log) = close_while_host_stalled("close-two", |r, g| {
        r.send(OP_SHUTDOWN, g.guest_port, g.host_port, SHUTDOWN_SEND, &[]);
        assert_eq!(r.dev.connection_count(), 1, "half closed");
        r.send(OP_SHUTDOWN, g.guest_port, g.host_port, SHUTDOWN_RCV, &[]);
    });
    assert_eq!(ops, [OP_RST]);
    assert!(log.is_empty(), "{log:?}");
}

#[test]
fn guest_initiated_close_while_host_stalled_and_port_reused() {
    let (mut r, _mem, lines) = logged_rig("guest-drain", 7);
    r.post_rx(32);
    let mut lpath = r.path.clone().into_os_string();
    lpath.push("_6000");
    let _ = std::fs::remove_file(&lpath);
    let listener = UnixListener::bind(&lpath).unwrap();
    r.send(OP_REQUEST, 4444, 6000, 0, &[]);
    assert_eq!(r.recv().0.op, OP_RESPONSE);
    let (first, _) = listener.accept().unwrap();
    let mut g = GuestSender::new(4444, 6000);
    g.fill(&mut r);
    r.send(OP_SHUTDOWN, 4444, 6000, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    // The guest reuses its port at once: a new connection, apart from the
    // old one's tail.
    r.send(OP_REQUEST, 4444, 6000, 0, &[]);
    let mut saw_response = false;
    for _ in 0..4 {
        match r.recv().0.op {
            OP_RESPONSE => {
                saw_response = true;
                break;
            }
            op => assert_eq!(op, OP_RST),
        }
    }
    assert!(saw_response, "the reused port was not accepted");
    let (mut second, _) = listener.accept().unwrap();
    r.send(OP_RW, 4444, 6000, 0, b"second");
    assert_eq!(r.dev.connection_count(), 1);
    assert_eq!(r.dev.draining_count(), 1);
    let (got, _) = read_to_eof_while_pumping(&mut r, first, Duration::from_millis(20));
    assert!(got == g.sent, "{} of {} bytes", got.len(), g.sent.len());
    assert_eq!(read_exact(&mut second, 6), b"second");
    assert!(lines.lock().unwrap().is_empty());
    let _ = std::fs::remove_file(&lpath);
}

#[test]
fn a_host_that_never_reads_loses_the_tail_after_the_deadline_and_it_is_logged() {
    let (mut r, _mem, lines) = logged_rig("drain-idle", 3);
    r.dev.drain_idle = Duration::from_millis(200);
    r.post_rx(32);
    let (mut host, hport) = host_connect(&mut r, 1024);
    let mut g = GuestSender::new(1024, hport);
    g.fill(&mut r);
    assert!(r.dev.timer.is_none(), "no drain yet, no timer");
    r.send(OP_SHUTDOWN, 1024, hport, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    assert_eq!(r.dev.draining_count(), 1);
    let start = Instant::now();
    while r.dev.draining_count() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the drain outlived its deadline"
        );
        r.pump(20);
    }
    assert!(start.elapsed() >= Duration::from_millis(190));
    // What the socket had taken still arrives, then EOF.
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(got.len() < g.sent.len());
    assert!(got[..] == g.sent[..got.len()]);
    let l = lines.lock().unwrap();
    assert_eq!(l.len(), 1, "{l:?}");
    let dropped = g.sent.len() - got.len();
    assert!(
        l[0].contains(&format!("guest port 1024 (opened by the host) closed by the guest: the host read nothing of its last bytes for 0.2 s; {dropped} bytes for the host dropped")),
        "{l:?}"
    );
}

#[test]
fn host_half_close_still_takes_the_guests_answer() {
    let (mut r, _mem) = rig("half", 3);
    r.post_rx(8);
    let (mut host, hport) = host_connect(&mut r, 1024);
    host.write_all(b"request").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, d) = r.recv();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"request"[..]));
    let (h, _) = r.recv();
    assert_eq!(
        (h.op, h.flags),
        (OP_SHUTDOWN, SHUTDOWN_SEND),
        "the host only stopped sending"
    );
    r.send(OP_RW, 1024, hport, 0, b"answer");
    r.send(OP_SHUTDOWN, 1024, hport, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    assert_eq!(r.recv().0.op, OP_RST);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"answer");
    // A host that closes entirely is gone both ways.
    let (host, _) = host_connect(&mut r, 1024);
    drop(host);
    let (h, _) = r.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
}

#[test]
fn guest_receive_shutdown_stops_host_data() {
    let (mut r, _mem) = rig("rcv-shut", 3);
    r.post_rx(8);
    let (mut host, hport) = host_connect(&mut r, 1024);
    r.send(OP_SHUTDOWN, 1024, hport, SHUTDOWN_RCV, &[]);
    host.write_all(b"unwanted").unwrap();
    r.quiet();
    // The other direction still works.
    r.send(OP_RW, 1024, hport, 0, b"still");
    assert_eq!(read_exact(&mut host, 5), b"still");
}

#[test]
fn connections_the_device_ends_are_logged_with_what_they_dropped() {
    let (mut r, _mem, lines) = logged_rig("abort-log", 3);
    r.post_rx(8);
    let (mut host, hport) = host_connect(&mut r, 1024);
    // The host stops reading; the guest overruns its credit.
    let mut g = GuestSender::new(1024, hport);
    g.fill(&mut r);
    // (The device may have written up to a credit update's worth more
    // than the guest was told: a full packet is past the credit for sure.)
    r.send(OP_RW, 1024, hport, 0, &[0u8; MAX_PKT_PAYLOAD as usize]);
    let got = r.recv();
    assert_eq!(got.0.op, OP_RST, "{got:?} {:?}", lines.lock().unwrap());
    assert_eq!(r.dev.connection_count(), 0);
    let l = lines.lock().unwrap().clone();
    assert_eq!(l.len(), 1, "{l:?}");
    assert!(
        l[0].contains(&format!("host port {hport} / guest port 1024 (opened by the host) closed: the guest sent 65536 bytes with"))
            && l[0].contains("past the 262144 bytes of credit")
            && l[0].contains("bytes for the host dropped"),
        "{l:?}"
    );
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = host.read_to_end(&mut rest);
    // An unknown operation.
    let (_host, hport) = host_connect(&mut r, 1025);
    r.send(99, 1025, hport, 0, &[]);
    assert_eq!(r.recv().0.op, OP_RST);
    let l = lines.lock().unwrap().clone();
    assert!(
        l[1].ends_with("closed: the guest sent unknown operation 99; 0 bytes for the host dropped"),
        "{l:?}"
    );
    // A bad CONNECT line.
    let mut bad = UnixStream::connect(&r.path).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    r.pump(50);
    r.pump(50);
    assert!(read_line(&mut bad).starts_with("ERROR"));
    let l = lines.lock().unwrap().clone();
    assert!(
        l[2].contains("its first line was not CONNECT <port>"),
        "{l:?}"
    );
}
