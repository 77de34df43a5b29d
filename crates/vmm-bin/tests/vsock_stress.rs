//! Host tests: tens of MiB from a guest to a host reader over virtio-vsock,
//! byte-exact, whatever the reader does and however the guest closes.
//!
//! The built-in guest's `pattern BYTES SEED [wait|shutdown|reset]` streams
//! a seeded pattern as stdout frames and then ends the connection as told:
//! `shutdown` is what a Linux guest's close() does (SHUTDOWN both ways right
//! behind the last byte), `reset` an abort, `wait` the polite way (the host
//! closes). The readers stall for random intervals, read in tiny pieces, or
//! read as fast as they can, while the VMM process is stopped and continued
//! at random. `.ci/run` runs this file against the release VMM as well.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_vsock_vm, vsock_connect};
use proto::agent::{read_frame, write_raw_frame, FrameError, MAX_FRAME};
use serde_json::{json, Value};
use vmm::boot::builtin::pattern_word;

/// A small deterministic generator (xorshift64*), seeded per test so a
/// failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// How a reader takes the stream.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Random reads of up to 256 KiB, with a 0-30 ms pause before one read
    /// in eight.
    Stalls,
    /// Reads of 1 to 64 bytes.
    Tiny,
    /// Reads as large as the caller asks.
    Fast,
}

struct Paced {
    s: UnixStream,
    pace: Pace,
    rng: Rng,
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self.pace {
            Pace::Stalls => {
                if self.rng.below(8) == 0 {
                    std::thread::sleep(Duration::from_millis(self.rng.below(31)));
                }
                1 + self.rng.below(256 << 10) as usize
            }
            Pace::Tiny => 1 + self.rng.below(64) as usize,
            Pace::Fast => buf.len(),
        };
        let n = n.min(buf.len());
        self.s.read(&mut buf[..n])
    }
}

/// The pattern's byte at `offset` (the guest's `pattern` program).
fn pattern_byte(seed: u64, offset: u64) -> u8 {
    (pattern_word(seed, 0, offset & !7) >> (8 * (offset & 7))) as u8
}

/// Asks the guest for `bytes` of pattern `seed`, ended by `close`.
fn request(uds: &Path, bytes: u64, seed: u64, close: &str) -> UnixStream {
    let mut s = vsock_connect(uds);
    let req =
        json!({"op": "exec", "args": ["pattern", bytes.to_string(), seed.to_string(), close]});
    write_raw_frame(&mut s, req.to_string().as_bytes(), b"").unwrap();
    s
}

/// Reads a `pattern` answer to its end, checking every byte; panics with
/// where it went wrong.
fn read_pattern(s: UnixStream, pace: Pace, bytes: u64, seed: u64, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = Paced {
        s,
        pace,
        rng: Rng(seed | 1),
    };
    let mut at = 0u64;
    let mut exit = None;
    loop {
        let f = match read_frame(&mut r, MAX_FRAME) {
            Ok(f) => f,
            Err(FrameError::Closed) => break,
            Err(e) => panic!("{what}: reading frames after {at} of {bytes} bytes: {e}"),
        };
        let j: Value = serde_json::from_slice(&f.json).unwrap();
        assert!(exit.is_none(), "{what}: a frame after the exit frame: {j}");
        match j["kind"].as_str() {
            Some("stdout") => {
                for (i, b) in f.data.iter().enumerate() {
                    let o = at + i as u64;
                    assert_eq!(*b, pattern_byte(seed, o), "{what}: byte {o} differs");
                }
                at += f.data.len() as u64;
            }
            Some("exit") => exit = Some(j["code"].as_i64()),
            _ => panic!("{what}: unexpected frame {j}"),
        }
    }
    assert_eq!(at, bytes, "{what}: stdout bytes before end of file");
    assert_eq!(exit, Some(Some(0)), "{what}: the exit frame");
}

/// Stops and continues process `pid` at random (runs of 0-20 ms, stops of
/// 0-10 ms) until dropped: the VMM's threads are descheduled at moments
/// nobody chose.
struct Descheduler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Descheduler {
    fn start(pid: u32, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut stops = 0;
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(rng.below(20_000)));
                // SAFETY: signals to the test's own child process.
                unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_micros(rng.below(10_000)));
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                stops += 1;
            }
            stops
        });
        Descheduler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops descheduling; returns how many times the process was stopped.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Descheduler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn three_readers_at_once_get_every_byte_while_the_vmm_is_descheduled() {
    let (vm, uds) = start_vsock_vm("vsock-stress");
    let d = Descheduler::start(vm.child.id(), 0x5eed);
    let start = Instant::now();
    let readers: Vec<_> = [
        (Pace::Stalls, "shutdown", 11),
        (Pace::Tiny, "reset", 12),
        (Pace::Fast, "wait", 13),
    ]
    .into_iter()
    .map(|(pace, close, seed)| {
        let uds = uds.clone();
        std::thread::spawn(move || {
            let what = format!("{pace:?} reader, guest closing by {close}");
            let s = request(&uds, 32 * MIB, seed, close);
            read_pattern(s, pace, 32 * MIB, seed, &what);
        })
    })
    .collect();
    for r in readers {
        r.join().unwrap();
    }
    let stops = d.finish();
    eprintln!(
        "3 x 32 MiB byte-exact in {:.1} s, the VMM stopped {stops} times",
        start.elapsed().as_secs_f64()
    );
    assert!(stops > 10, "the VMM was hardly descheduled ({stops} stops)");
}

/// The close path on purpose: the reader takes nothing until the guest has
/// sent all it can and closed, so the device holds the stream's tail when
/// the guest's SHUTDOWN or RST arrives. Every byte must still arrive.
#[test]
fn every_close_reaches_a_reader_that_was_stalled() {
    let (_vm, uds) = start_vsock_vm("vsock-close");
    // More than the device buffers for a connection (256 KiB), less than
    // that and a Unix socket's default buffer (about 200 KiB) together: the
    // guest sends it all and closes during the stall, with the tail still
    // in the device.
    let bytes = 384 << 10;
    for (close, seed) in [("shutdown", 21), ("reset", 22), ("wait", 23)] {
        for pace in [Pace::Fast, Pace::Tiny] {
            let s = request(&uds, bytes, seed, close);
            std::thread::sleep(Duration::from_millis(300));
            let what = format!("{pace:?} reader after a 300 ms stall, guest closing by {close}");
            read_pattern(s, pace, bytes, seed, &what);
        }
    }
}
