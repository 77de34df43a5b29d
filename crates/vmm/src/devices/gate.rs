//! A gate that device worker threads pass through for each piece of work.
//! Closing it waits until no worker is inside and keeps new ones out, so a
//! snapshot sees devices (and the guest memory they write) standing still
//! while the vCPUs are paused.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    closed: bool,
    inside: usize,
}

/// See the module documentation.
#[derive(Default)]
pub struct DeviceGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// A worker's passage: the gate cannot close while it lives.
pub struct Passage<'a>(&'a DeviceGate);

/// The gate held closed: reopens when dropped.
pub struct Closed<'a>(&'a DeviceGate);

impl DeviceGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the gate is closed, then enters.
    pub fn pass(&self) -> Passage<'_> {
        let mut s = self.lock();
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.inside += 1;
        Passage(self)
    }

    /// Closes the gate and waits until every worker inside has left.
    pub fn close(&self) -> Closed<'_> {
        let mut s = self.lock();
        s.closed = true;
        while s.inside > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Closed(self)
    }
}

impl Drop for Passage<'_> {
    fn drop(&mut self) {
        self.0.lock().inside -= 1;
        self.0.changed.notify_all();
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.lock().closed = false;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn close_waits_for_workers_inside_and_keeps_others_out() {
        let gate = Arc::new(DeviceGate::default());
        let work = Arc::new(AtomicUsize::new(0));
        let inside = gate.pass();
        let closer = {
            let gate = gate.clone();
            let work = work.clone();
            std::thread::spawn(move || {
                let _closed = gate.close();
                // The worker inside has finished its piece.
                assert_eq!(work.load(Ordering::SeqCst), 1);
                std::thread::sleep(Duration::from_millis(50));
                // Nobody got in while closed.
                assert_eq!(work.load(Ordering::SeqCst), 1);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        work.fetch_add(1, Ordering::SeqCst);
        drop(inside);
        std::thread::sleep(Duration::from_millis(10));
        let late = {
            let gate = gate.clone();
            let work = work.clone();
            std::thread::spawn(move || {
                let _p = gate.pass();
                work.fetch_add(1, Ordering::SeqCst);
            })
        };
        closer.join().unwrap();
        late.join().unwrap();
        assert_eq!(work.load(Ordering::SeqCst), 2);
    }
}
