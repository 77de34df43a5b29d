//! The host side of the built-in guest's mailbox channel.
//!
//! One request is in flight at a time. The host writes the request into the
//! mailbox page and rings the doorbell; the guest either sees the doorbell
//! while spinning or is released from its blocking `in PORT_WAIT`; it writes
//! the answer and signals `out PORT_DONE`.
//!
//! The blocking ports are the built-in guest's HLT: a vCPU thread sits in
//! [`Channel::io_in`] until there is work, or until the VMM interrupts it to
//! pause or stop (then the guest sees 0 and simply asks again later). They
//! are handled here rather than on the device bus because a vCPU blocks in
//! them, and a bus device's lock must never be held across a wait.
//!
//! Everything read back from the mailbox is guest-controlled and bounded.
//!
//! The same wait also carries device interrupts. The built-in guest has no
//! interrupt delivery (no IDT, interrupts off), so its virtio devices'
//! interrupt eventfds are not wired to the irqchip: a relay thread
//! ([`Channel::start_relay`]) waits on them and wakes `PORT_WAIT` with the
//! [`abi::WAKE_DEVICE`] bit, and the guest then looks at its rings.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::guest::{GuestRequest, GuestResponse};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::abi;
use crate::memory::GuestMemoryMmap;

/// Errors talking to the built-in guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest did not answer in time.
    #[error(
        "the guest did not answer within {0:?}: it may be paused, busy with a long operation, or hung"
    )]
    Timeout(Duration),
    /// An earlier request that timed out is still being served.
    #[error("the guest is still serving an earlier request that timed out; try again later")]
    Busy,
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Stopping,
    /// The guest answered with an error status.
    #[error("the guest refused the request (status {status}): {message}")]
    Refused {
        /// Status code.
        status: u32,
        /// The guest's message.
        message: String,
    },
    /// Guest memory access failed.
    #[error("cannot access the mailbox in guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

#[derive(Default)]
struct State {
    /// A request has been posted and not yet answered.
    in_flight: bool,
    /// vCPUs must not block: a pause or stop is under way.
    interrupted: bool,
    /// The VM is ending: no more requests.
    stopping: bool,
    /// Fatal code the guest reported on PORT_PANIC, if any.
    panic_code: Option<u32>,
    /// A device raised its interrupt since the guest last waited.
    device_pending: bool,
}

/// The host side of the mailbox.
pub struct Channel {
    mem: GuestMemoryMmap,
    state: Mutex<State>,
    changed: Condvar,
    /// Serialises clients: one request in flight.
    client: Mutex<()>,
    /// Ends the interrupt relay, once there is one.
    relay_stop: Mutex<Option<EventFd>>,
}

/// What an `out` to a channel port means for the VM.
#[derive(Debug, PartialEq, Eq)]
pub enum OutEffect {
    /// Nothing for the VM to do.
    None,
    /// The guest reported a fatal error with this code.
    GuestPanic(u32),
}

impl Channel {
    /// A channel over the mailbox in `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Channel {
            mem,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            client: Mutex::new(()),
            relay_stop: Mutex::new(None),
        }
    }

    /// Starts the thread that relays device interrupts (`evts`: each
    /// device's interrupt eventfd, not registered as an irqfd) to
    /// `PORT_WAIT`. It ends when the channel stops or is dropped. The guest
    /// is woken once at the start, so a restored guest looks at its rings
    /// whatever happened before.
    pub fn start_relay(self: &Arc<Self>, evts: Vec<EventFd>) -> std::io::Result<JoinHandle<()>> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = stop.try_clone()?;
        *self.relay_stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop);
        if self.lock().stopping {
            let _ = theirs.write(1);
        }
        self.device_interrupt();
        let weak = Arc::downgrade(self);
        crate::seccomp::spawn(
            crate::seccomp::Kind::Device,
            "irq-relay".into(),
            move || relay(weak, theirs, evts),
        )
    }

    /// A device raised its interrupt: wake the guest's `PORT_WAIT`.
    pub fn device_interrupt(&self) {
        self.lock().device_pending = true;
        self.changed.notify_all();
    }

    /// Whether `port` belongs to the channel.
    pub fn handles(port: u16) -> bool {
        (abi::PORT_WAIT..=abi::PORT_PARK).contains(&u64::from(port))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest `in` on a channel port. May block until there is work or the
    /// VMM interrupts the vCPUs.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let port = u64::from(port);
        let mut state = self.lock();
        let answer: u32 = loop {
            if state.interrupted || state.stopping {
                break 0;
            }
            if port == abi::PORT_WAIT && (state.in_flight || state.device_pending) {
                let mut bits = 0;
                if state.in_flight {
                    bits |= abi::WAKE_MAILBOX as u32;
                }
                if std::mem::take(&mut state.device_pending) {
                    bits |= abi::WAKE_DEVICE as u32;
                }
                break bits;
            }
            if port != abi::PORT_WAIT && port != abi::PORT_PARK {
                break 0;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        };
        let bytes = answer.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A guest `out` on a channel port.
    pub fn io_out(&self, port: u16, data: &[u8]) -> OutEffect {
        let mut value = [0u8; 4];
        let n = data.len().min(4);
        value[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(value);
        match u64::from(port) {
            abi::PORT_DONE => {
                self.lock().in_flight = false;
                self.changed.notify_all();
                OutEffect::None
            }
            abi::PORT_PANIC => {
                self.lock().panic_code = Some(value);
                OutEffect::GuestPanic(value)
            }
            _ => OutEffect::None,
        }
    }

    /// Makes every blocked or blocking vCPU return from the channel ports
    /// (`true`), or lets them block again (`false`).
    pub fn set_interrupted(&self, interrupted: bool) {
        self.lock().interrupted = interrupted;
        self.changed.notify_all();
    }

    /// The VM is ending: release everything, refuse new requests.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
        self.stop_relay();
    }

    fn stop_relay(&self) {
        if let Some(stop) = &*self.relay_stop.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = stop.write(1);
        }
    }

    /// Sends `request` to the guest and waits up to `timeout` for its answer.
    pub fn request(
        &self,
        request: &GuestRequest,
        timeout: Duration,
    ) -> Result<GuestResponse, Error> {
        let deadline = Instant::now() + timeout;
        let _client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let (op, args) = encode(request);

        // Wait out an earlier request that timed out: its answer would
        // otherwise land on top of ours.
        let mut state = self.wait_while(self.lock(), deadline, |s| s.in_flight)?;
        if state.in_flight {
            return Err(Error::Busy);
        }
        let mb = |off: u64| GuestAddress(abi::MAILBOX_ADDR + off);
        self.mem.write_obj(op as u32, mb(abi::MB_OP))?;
        for (i, a) in args.iter().enumerate() {
            self.mem.write_obj(*a, mb(abi::MB_ARGS + 8 * i as u64))?;
        }
        // The request must be visible before the doorbell.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.write_obj(1u32, mb(abi::MB_DOORBELL))?;
        state.in_flight = true;
        self.changed.notify_all();

        state = self.wait_while(state, deadline, |s| s.in_flight)?;
        if state.in_flight {
            return Err(Error::Timeout(timeout));
        }
        drop(state);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);

        let status: u32 = self.mem.read_obj(mb(abi::MB_STATUS))?;
        let mut results = [0u64; abi::MB_NUM_RESULTS as usize];
        for (i, r) in results.iter_mut().enumerate() {
            *r = self.mem.read_obj(mb(abi::MB_RESULTS + 8 * i as u64))?;
        }
        let text = self.read_text()?;
        if u64::from(status) != abi::STATUS_OK {
            return Err(Error::Refused {
                status,
                message: text,
            });
        }
        Ok(decode(request, results, text))
    }

    fn wait_while<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
        cond: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, Error> {
        while cond(&state) {
            if state.stopping {
                return Err(Error::Stopping);
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(state)
    }

    /// The guest's text answer, bounded by the mailbox size whatever length
    /// the guest claims.
    fn read_text(&self) -> Result<String, Error> {
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(abi::MAILBOX_ADDR + abi::MB_TEXT_LEN))?;
        let len = u64::from(len).min(abi::MB_TEXT_MAX) as usize;
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(abi::MAILBOX_ADDR + abi::MB_TEXT))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.stop_relay();
    }
}

/// The relay thread: waits on the device interrupt eventfds (and `stop`)
/// and turns each interrupt into a wake of the channel.
fn relay(channel: Weak<Channel>, stop: EventFd, evts: Vec<EventFd>) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(&stop)
        .chain(&evts)
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures
        // whose descriptors stay open (owned by `stop` and `evts`) for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        let mut raised = false;
        for (fd, evt) in fds[1..].iter_mut().zip(&evts) {
            if fd.revents != 0 {
                // Non-blocking: an interrupt already taken reads as EAGAIN.
                let _ = evt.read();
                raised = true;
            }
            fd.revents = 0;
        }
        if raised {
            match channel.upgrade() {
                Some(ch) => ch.device_interrupt(),
                None => return,
            }
        }
    }
}

fn encode(request: &GuestRequest) -> (u64, [u64; abi::MB_NUM_ARGS as usize]) {
    match *request {
        GuestRequest::Ping => (abi::OP_PING, [0; 4]),
        GuestRequest::Identity => (abi::OP_IDENTITY, [0; 4]),
        GuestRequest::Fill {
            seed,
            seq,
            mib,
            offset_mib,
        } => (abi::OP_FILL, [seed, seq, mib, offset_mib]),
        GuestRequest::Verify {
            seed,
            seq,
            mib,
            offset_mib,
        } => (abi::OP_VERIFY, [seed, seq, mib, offset_mib]),
        GuestRequest::CounterStart => (abi::OP_COUNTER_START, [0; 4]),
        GuestRequest::CounterRead => (abi::OP_COUNTER_READ, [0; 4]),
        GuestRequest::CounterStop => (abi::OP_COUNTER_STOP, [0; 4]),
        GuestRequest::StampStart { mib, offset_mib } => {
            (abi::OP_STAMP_START, [0, 0, mib, offset_mib])
        }
        GuestRequest::StampVerify => (abi::OP_STAMP_VERIFY, [0; 4]),
        GuestRequest::StampStop => (abi::OP_STAMP_STOP, [0; 4]),
    }
}

fn decode(
    request: &GuestRequest,
    r: [u64; abi::MB_NUM_RESULTS as usize],
    text: String,
) -> GuestResponse {
    match request {
        GuestRequest::Ping => GuestResponse::Pong {
            guest: text,
            vcpus: r[0],
        },
        GuestRequest::Identity => GuestResponse::Identity {
            boot_id: r[0],
            generation: r[1],
        },
        GuestRequest::Fill { .. } => GuestResponse::Filled { bytes: r[0] },
        GuestRequest::Verify { .. } => GuestResponse::Verified {
            bad_words: r[0],
            first_bad_addr: (r[2] != 0).then_some(r[1]),
        },
        GuestRequest::StampStart { .. } => GuestResponse::Stamp {
            bad_pages: 0,
            pass: r[1],
            cursor: 0,
            pages: r[0],
        },
        GuestRequest::StampVerify => GuestResponse::Stamp {
            bad_pages: r[0],
            pass: r[1],
            cursor: r[2],
            pages: 0,
        },
        GuestRequest::StampStop => GuestResponse::Stamp {
            bad_pages: 0,
            pass: r[1],
            cursor: r[2],
            pages: 0,
        },
        GuestRequest::CounterStart | GuestRequest::CounterRead | GuestRequest::CounterStop => {
            GuestResponse::Counter { value: r[0] }
        }
    }
}

/// A vCPU blocked in the wait port is what a pause or a stop must release.
impl crate::kvm::vcpu::Blocker for Channel {
    fn set_interrupted(&self, interrupted: bool) {
        Channel::set_interrupted(self, interrupted);
    }

    fn stop(&self) {
        Channel::stop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn channel() -> Arc<Channel> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Arc::new(Channel::new(mem))
    }

    /// A fake guest on another thread: waits, answers ping with `text`.
    fn fake_guest(ch: Arc<Channel>, text_len: u32, status: u32) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut data = [0u8; 4];
            ch.io_in(abi::PORT_WAIT as u16, &mut data);
            assert_eq!(u32::from_le_bytes(data), 1);
            let mb = |off: u64| GuestAddress(abi::MAILBOX_ADDR + off);
            assert_eq!(ch.mem.read_obj::<u32>(mb(abi::MB_DOORBELL)).unwrap(), 1);
            assert_eq!(
                ch.mem.read_obj::<u32>(mb(abi::MB_OP)).unwrap(),
                abi::OP_PING as u32
            );
            ch.mem
                .write_slice(b"guest: builtin", mb(abi::MB_TEXT))
                .unwrap();
            ch.mem.write_obj(text_len, mb(abi::MB_TEXT_LEN)).unwrap();
            ch.mem.write_obj(status, mb(abi::MB_STATUS)).unwrap();
            ch.mem.write_obj(3u64, mb(abi::MB_RESULTS)).unwrap();
            assert_eq!(
                ch.io_out(abi::PORT_DONE as u16, &1u32.to_le_bytes()),
                OutEffect::None
            );
        })
    }

    #[test]
    fn request_is_answered_by_a_waiting_guest() {
        let ch = channel();
        let guest = fake_guest(ch.clone(), 14, 0);
        let r = ch
            .request(&GuestRequest::Ping, Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            r,
            GuestResponse::Pong {
                guest: "guest: builtin".into(),
                vcpus: 3
            }
        );
        guest.join().unwrap();
    }

    #[test]
    fn hostile_text_length_is_bounded() {
        let ch = channel();
        let guest = fake_guest(ch.clone(), u32::MAX, 0);
        match ch
            .request(&GuestRequest::Ping, Duration::from_secs(5))
            .unwrap()
        {
            GuestResponse::Pong { guest, .. } => assert_eq!(guest.len() as u64, abi::MB_TEXT_MAX),
            other => panic!("unexpected {other:?}"),
        }
        guest.join().unwrap();
    }

    #[test]
    fn error_status_is_reported() {
        let ch = channel();
        let guest = fake_guest(ch.clone(), 5, abi::STATUS_UNKNOWN_OP as u32);
        let err = ch
            .request(&GuestRequest::Ping, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, Error::Refused { status: 1, .. }), "{err}");
        guest.join().unwrap();
    }

    #[test]
    fn silent_guest_times_out_then_blocks_the_next_request_until_answered() {
        let ch = channel();
        let err = ch
            .request(&GuestRequest::Ping, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)));
        assert!(matches!(
            ch.request(&GuestRequest::Ping, Duration::from_millis(50)),
            Err(Error::Busy)
        ));
        // The guest finally answers the first request; the next one goes through.
        ch.io_out(abi::PORT_DONE as u16, &[0; 4]);
        let guest = fake_guest(ch.clone(), 14, 0);
        ch.request(&GuestRequest::Ping, Duration::from_secs(5))
            .unwrap();
        guest.join().unwrap();
    }

    #[test]
    fn interrupt_releases_blocked_vcpus() {
        let ch = channel();
        let waiter = {
            let ch = ch.clone();
            std::thread::spawn(move || {
                let mut d = [0xffu8; 4];
                ch.io_in(abi::PORT_PARK as u16, &mut d);
                u32::from_le_bytes(d)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        ch.set_interrupted(true);
        assert_eq!(waiter.join().unwrap(), 0);
        // While interrupted, waits return at once.
        let mut d = [0u8; 4];
        ch.io_in(abi::PORT_WAIT as u16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }

    #[test]
    fn stop_fails_pending_requests() {
        let ch = channel();
        let stopper = {
            let ch = ch.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                ch.stop();
            })
        };
        let err = ch
            .request(&GuestRequest::Ping, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, Error::Stopping));
        stopper.join().unwrap();
    }
}
