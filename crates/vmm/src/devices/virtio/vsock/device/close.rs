//! How connections end: the guest finishing with one (its tail then
//! drains to the host), the device ending one on its own (logged with what
//! it dropped), and the drain deadline's timer.

use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use vmm_sys_util::timerfd::TimerFd;

use super::{Owner, Vsock, CONN_BUF, MAX_PKT_PAYLOAD, TIMER_TOKEN};
use crate::devices::virtio::vsock::conn::{Conn, Drain, Key};

/// Why the device ends a connection on its own (the log's words).
#[derive(Debug)]
pub(super) enum Abort {
    HostWrite(std::io::Error),
    HostRead(std::io::Error),
    PastCredit { held: usize, len: usize },
    DataBeforeEstablished,
    UnexpectedResponse,
    BadPayload { claimed: u32, got: usize },
    UnknownOp(u16),
    ResponseLine(std::io::Error),
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abort::HostWrite(e) => write!(f, "writing to the host's socket failed ({e})"),
            Abort::HostRead(e) => write!(f, "reading the host's socket failed ({e})"),
            Abort::PastCredit { held, len } => write!(
                f,
                "the guest sent {len} bytes with {held} already buffered, past the {CONN_BUF} bytes of credit it was given"
            ),
            Abort::DataBeforeEstablished => {
                f.write_str("the guest sent data before the connection was established")
            }
            Abort::UnexpectedResponse => {
                f.write_str("the guest answered a connection request nobody made")
            }
            Abort::BadPayload { claimed, got } => write!(
                f,
                "a guest packet claimed {claimed} bytes of payload and carried {got} (at most {MAX_PKT_PAYLOAD})"
            ),
            Abort::UnknownOp(op) => write!(f, "the guest sent unknown operation {op}"),
            Abort::ResponseLine(e) => write!(f, "telling the host the connection is up failed ({e})"),
        }
    }
}

impl Vsock {
    /// Forgets a connection; its host stream closes with it.
    pub(super) fn close(&mut self, key: Key) -> Option<Conn> {
        let c = self.conns.remove(&key)?;
        if let Some(events) = self.events() {
            let _ = events.remove(c.stream.as_raw_fd());
        }
        self.owners.remove(&c.token);
        Some(c)
    }

    /// Ends a connection on the device's own account: closes it, resets the
    /// guest's side, and logs why and what it dropped.
    pub(super) fn abort(&mut self, key: Key, why: Abort) {
        let Some(c) = self.close(key) else {
            return self.send_rst(key);
        };
        self.send_rst(key);
        let name = c.describe(key);
        self.log.line(format_args!(
            "{name} closed: {why}; {} bytes for the host dropped",
            c.to_host.len()
        ));
    }

    /// The guest is finished with the connection (both directions shut
    /// down, or reset; `reset` says which). What it sent still reaches the
    /// host: a connection with bytes waiting becomes a drain.
    pub(super) fn guest_finished(&mut self, key: Key, reset: bool) {
        let Some(c) = self.close(key) else {
            return;
        };
        if !reset {
            self.send_rst(key);
        }
        if c.to_host.is_empty() {
            return; // The host's stream closes here: it reads end of file.
        }
        let token = c.token;
        let drain = Drain {
            name: c.describe(key),
            stream: c.stream,
            to_host: c.to_host,
            progress_at: Instant::now(),
        };
        let registered = self
            .events()
            .map(|e| e.add(drain.stream.as_raw_fd(), token, EventSet::OUT));
        if let Some(Err(e)) = registered {
            self.log.line(format_args!(
                "{} closed by the guest: cannot wait for the host's socket ({e}); {} bytes for the host dropped",
                drain.name,
                drain.to_host.len()
            ));
            return;
        }
        self.owners.insert(token, Owner::Drain);
        self.drains.insert(token, drain);
        self.arm_timer();
    }

    /// Writes a drain's bytes as the host takes them; ends it when all are
    /// written or the host is gone.
    pub(super) fn flush_drain(&mut self, token: u64) {
        let Some(d) = self.drains.get_mut(&token) else {
            return;
        };
        match d.to_host.write_to(&mut d.stream) {
            Ok(0) => return,
            Ok(_) if !d.to_host.is_empty() => {
                d.progress_at = Instant::now();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                self.log.line(format_args!(
                    "{} closed by the guest: writing its last bytes to the host failed ({e}); {} bytes for the host dropped",
                    d.name,
                    d.to_host.len()
                ));
            }
        }
        self.end_drain(token);
    }

    /// Removes a drain; its host stream closes (the host reads end of file).
    pub(super) fn end_drain(&mut self, token: u64) -> Option<Drain> {
        let d = self.drains.remove(&token)?;
        self.owners.remove(&token);
        if let Some(events) = self.events() {
            let _ = events.remove(d.stream.as_raw_fd());
        }
        Some(d)
    }

    /// Gives up on drains whose host took nothing for `drain_idle`; arms
    /// the timer for the next one due.
    pub(super) fn expire_drains(&mut self) {
        self.timer_armed = false;
        let now = Instant::now();
        let idle = self.drain_idle;
        let due: Vec<u64> = self
            .drains
            .iter()
            .filter(|(_, d)| now.duration_since(d.progress_at) >= idle)
            .map(|(t, _)| *t)
            .collect();
        for token in due {
            if let Some(d) = self.end_drain(token) {
                self.log.line(format_args!(
                    "{} closed by the guest: the host read nothing of its last bytes for {} s; {} bytes for the host dropped",
                    d.name,
                    idle.as_secs_f32(),
                    d.to_host.len()
                ));
            }
        }
        self.arm_timer();
    }

    /// Arms the timer for the oldest drain's deadline, or disarms it when
    /// there is none. (Setting the timer also clears an expiry not yet read,
    /// so the worker never blocks reading it.)
    pub(super) fn arm_timer(&mut self) {
        let next = self.drains.values().map(|d| d.progress_at).min();
        let result = match next {
            Some(at) if !self.timer_armed => {
                let wait = (at + self.drain_idle).saturating_duration_since(Instant::now());
                let armed = self
                    .drain_timer()
                    .and_then(|t| Ok(t.reset(wait.max(Duration::from_millis(1)), None)?));
                self.timer_armed = armed.is_ok();
                armed
            }
            Some(_) => Ok(()),
            None => {
                self.timer_armed = false;
                match self.timer.as_mut() {
                    Some(t) => t.clear().map_err(std::io::Error::from),
                    None => Ok(()),
                }
            }
        };
        if let Err(e) = result {
            self.log.line(format_args!(
                "the drain timer failed ({e}); a host that never reads may hold a finished connection's bytes"
            ));
        }
    }

    /// The drain timer, made and watched on first use.
    fn drain_timer(&mut self) -> std::io::Result<&mut TimerFd> {
        if self.timer.is_none() {
            let t = TimerFd::new()?;
            if let Some(events) = self.events() {
                events.add(t.as_raw_fd(), TIMER_TOKEN, EventSet::IN)?;
            }
            self.timer = Some(t);
        }
        Ok(self.timer.as_mut().expect("made above"))
    }

    pub(super) fn drop_connections(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            if let Some(c) = self.close(k) {
                if !c.to_host.is_empty() {
                    self.log.line(format_args!(
                        "{} closed: the device was reset; {} bytes for the host dropped",
                        c.describe(k),
                        c.to_host.len()
                    ));
                }
            }
        }
        let tokens: Vec<u64> = self.drains.keys().copied().collect();
        for t in tokens {
            if let Some(d) = self.end_drain(t) {
                self.log.line(format_args!(
                    "{} closed by the guest: the device was reset; {} bytes for the host dropped",
                    d.name,
                    d.to_host.len()
                ));
            }
        }
        self.arm_timer();
        for (_, p) in self.pending.drain() {
            if let Some(a) = &self.active {
                let _ = a.events.remove(p.stream.as_raw_fd());
            }
        }
        self.owners.clear();
        self.ctrl.clear();
    }
}
