//! The virtio-net device model: a receive and a transmit queue, frames
//! moved between them and a tap device.
//!
//! No offloads are offered (checksum, TSO, mergeable buffers): each frame
//! is one chain, preceded by the 12-byte `virtio_net_hdr_v1`, which on the
//! way out is dropped and on the way in is all zeros but `num_buffers = 1`.
//! The tap is read only while the guest has receive buffers; otherwise it
//! is taken out of the worker's epoll set until the guest posts more (the
//! kernel queues, and eventually drops, frames meanwhile, as a wire would).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::tap::{Tap, TapError};
use crate::devices::virtio::queue::{self, pop_chain};
use crate::devices::virtio::{
    complete, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Entries in each queue.
pub(super) const QUEUE_SIZE: u16 = 256;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
/// `virtio_net_hdr_v1`.
const NET_HDR_LEN: usize = 12;
/// Largest frame: 64 KiB plus an Ethernet header and VLAN tag.
const MAX_FRAME: usize = 65536 + 18;
const TAP_TOKEN: u64 = 0;

/// A network interface as the VM's configuration gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap device name (created if missing).
    pub tap: String,
    /// Network namespace to create the tap in (a name under /var/run/netns).
    pub netns: Option<String>,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

pub use proto::snapshot::{format_mac, parse_mac};

/// A virtio network device.
pub struct Net {
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) active: Option<ActivateContext>,
    /// The tap is in the epoll set.
    tap_watched: bool,
    frame: Vec<u8>,
}

impl Net {
    /// Opens the tap device and makes the device.
    pub fn new(cfg: &NetConfig) -> Result<Self, TapError> {
        Ok(Self::with_tap(
            Tap::open(&cfg.tap, cfg.netns.as_deref())?,
            cfg.mac,
        ))
    }

    /// A device on an open tap.
    pub fn with_tap(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            acked_features: 0,
            queues: queue::new_queues(&[QUEUE_SIZE; 2]),
            active: None,
            tap_watched: false,
            frame: vec![0u8; NET_HDR_LEN + MAX_FRAME],
        }
    }

    pub(super) const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC;

    /// The tap device.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn watch_tap(&mut self, on: bool) {
        if on == self.tap_watched {
            return;
        }
        let Some(ctx) = &self.active else { return };
        let fd = self.tap.file().as_raw_fd();
        let r = if on {
            ctx.events.add(fd, TAP_TOKEN, EventSet::IN)
        } else {
            ctx.events.remove(fd)
        };
        if r.is_ok() {
            self.tap_watched = on;
        }
    }

    fn process_tx(&mut self) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        while let Some((head, chain)) = pop_chain(&mut self.queues[TXQ], &ctx.mem) {
            if let Ok(chain) = chain {
                let mut r = chain.reader(&ctx.mem);
                if let Ok(n) = r.read(&mut self.frame) {
                    if n > NET_HDR_LEN {
                        // A full tap queue drops the frame, as a wire would.
                        let _ = self.tap.file().write(&self.frame[NET_HDR_LEN..n]);
                    }
                }
            }
            if complete(&mut self.queues[TXQ], &ctx.mem, &ctx.interrupt, head, 0).is_err() {
                break;
            }
        }
    }

    fn process_rx(&mut self) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        loop {
            if !queue::has_available(&self.queues[RXQ], &ctx.mem) {
                self.watch_tap(false);
                return;
            }
            let n = match self.tap.file().read(&mut self.frame[NET_HDR_LEN..]) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    // WouldBlock (nothing to read) or a tap error: wait for the next event.
                    self.watch_tap(true);
                    return;
                }
            };
            let Some((head, chain)) = pop_chain(&mut self.queues[RXQ], &ctx.mem) else {
                return;
            };
            let mut used = 0;
            match chain {
                Ok(chain) if chain.writable_len() >= (NET_HDR_LEN + n) as u64 => {
                    self.frame[..NET_HDR_LEN].fill(0);
                    // num_buffers = 1.
                    self.frame[10] = 1;
                    let total = NET_HDR_LEN + n;
                    if chain.writer(&ctx.mem).write(&self.frame[..total]).ok() == Some(total) {
                        used = total as u32;
                    }
                }
                // A buffer too small for the frame: the frame is dropped and
                // the buffer returned empty.
                _ => {}
            }
            if complete(&mut self.queues[RXQ], &ctx.mem, &ctx.interrupt, head, used).is_err() {
                // The used ring is broken: put the chain back and stop.
                self.queues[RXQ].go_to_previous_position();
                return;
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn avail_features(&self) -> u64 {
        Self::AVAIL_FEATURES
    }
    crate::devices::virtio::virtio_common_accessors!();
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&ctx.mem) {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        self.active = Some(ctx);
        self.watch_tap(true);
        if !self.tap_watched {
            self.active = None;
            return Err(ActivateError::Backend(format!(
                "cannot watch tap {}",
                self.tap.name()
            )));
        }
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        match index {
            RXQ => self.process_rx(),
            TXQ => self.process_tx(),
            _ => {}
        }
    }
    fn process_event(&mut self, token: u64, _events: EventSet) {
        if token == TAP_TOKEN {
            self.process_rx();
        }
    }
    fn reset(&mut self) {
        self.watch_tap(false);
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vmm_sys_util::epoll::{Epoll, EpollEvent};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, D};
    use crate::devices::virtio::{EventRegistry, Interrupt, DEVICE_TOKEN_BASE};

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    const HOST_IP: [u8; 4] = [169, 254, 77, 1];
    const GUEST_IP: [u8; 4] = [169, 254, 77, 2];

    fn ip(args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("the `ip` command (iproute2) is needed");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A network namespace for one test, deleted when dropped.
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    fn arp_request() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06]); // ARP
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&HOST_IP);
        f
    }

    /// The guest asks who has the host's address (ARP) through the TX
    /// queue; the kernel in the namespace answers through the tap into the
    /// RX queue.
    #[test]
    fn arp_through_a_real_tap_in_a_namespace() {
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun (modprobe tun) and root"
        );
        let ns = Netns(format!("forkd-net-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        let tap_name = format!("fkt{}", std::process::id() % 100_000);
        let tap = Tap::open(&tap_name, Some(&ns.0)).expect("tap opens inside the namespace");
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            "169.254.77.1/24",
            "dev",
            &tap_name,
        ]);
        ip(&["-n", &ns.0, "link", "set", &tap_name, "up"]);

        let mem = guest_memory();
        let mut net = Net::with_tap(tap, GUEST_MAC);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, GUEST_MAC);
        let rx = GuestQueue::at(&mem, 64, 0x1000);
        let tx = GuestQueue::at(&mem, 64, 0x9000);
        rx.configure(&mut net.queues[RXQ]);
        tx.configure(&mut net.queues[TXQ]);
        let epoll = Arc::new(Epoll::new().unwrap());
        net.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            events: EventRegistry::new(epoll.clone()),
        })
        .unwrap();
        for i in 0..16u64 {
            rx.add_chain(&[D::w(0x20_0000 + i * 0x1_0000, 0x1_0000)]);
        }
        net.process_queue(RXQ);

        let mut pkt = vec![0u8; NET_HDR_LEN];
        pkt.extend_from_slice(&arp_request());
        tx.write(0x10_0000, &pkt);
        tx.add_chain(&[
            D::r(0x10_0000, NET_HDR_LEN as u32),
            D::r(
                0x10_0000 + NET_HDR_LEN as u64,
                (pkt.len() - NET_HDR_LEN) as u32,
            ),
        ]);
        net.process_queue(TXQ);
        assert_eq!(tx.pop_used().map(|u| u.1), Some(0));

        // Frames arrive; find the ARP reply among whatever else the kernel sends.
        let start = Instant::now();
        let mut evs = vec![EpollEvent::default(); 8];
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no ARP reply from the namespace's kernel"
            );
            let n = epoll.wait(50, &mut evs).unwrap();
            for e in &evs[..n] {
                net.process_event(e.data() - DEVICE_TOKEN_BASE, e.event_set());
            }
            let mut found = false;
            while let Some((head, len)) = rx.pop_used() {
                let f = rx.read(0x20_0000 + u64::from(head) * 0x1_0000, len as usize);
                assert_eq!(f[10], 1, "num_buffers is 1");
                let frame = &f[NET_HDR_LEN..];
                if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                    assert_eq!(&frame[0..6], &GUEST_MAC, "reply to the guest's MAC");
                    assert_eq!(&frame[28..32], &HOST_IP, "sender is the host address");
                    found = true;
                }
            }
            if found {
                break;
            }
        }
    }
}
