//! The virtio-block device model: one request queue; requests read,
//! write, flush or identify a disk made of a [`DiskStack`].
//!
//! A request is a chain: a 16-byte device-readable header (type, reserved,
//! sector), data buffers (device-readable for writes, device-writable for
//! reads and GET_ID), and a final device-writable status byte. A chain
//! that does not have that shape is returned unanswered (length 0); a
//! request past the end of the disk, of a length that is not whole
//! sectors, or a write to a read-only drive gets status IOERR.

use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};

use super::layers::{DiskConfig, DiskStack, Frozen, LayerError};
use crate::devices::virtio::queue::{self, pop_chain, Cursor, DescriptorChain};
use crate::devices::virtio::{
    complete, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// Entries in the request queue.
pub(super) const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (header and status aside).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of the serial/ID string GET_ID answers with.
pub const BLOCK_ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
const SECTOR: u64 = 512;
const HEADER_LEN: u64 = 16;
/// Bounce buffer size for moving data between the disk and guest memory.
const CHUNK: usize = 128 * 1024;

/// A drive as the VM's configuration gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Its layers.
    pub disk: DiskConfig,
    /// Serial/ID string (up to 20 bytes are reported).
    pub id: String,
}

/// A virtio block device.
pub struct Block {
    pub(super) disk: DiskStack,
    pub(super) id: String,
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) active: Option<ActivateContext>,
    bounce: Vec<u8>,
    /// Host I/O errors are the guest's to provoke (a full disk): logged
    /// through this.
    log_limit: crate::logger::RateLimit,
    /// Writes refused because the CoW layer holds its quota.
    quota_refusals: u64,
}

impl Block {
    /// Opens the drive's disk (creating its CoW layer if needed).
    pub fn new(cfg: &BlockConfig) -> Result<Self, LayerError> {
        Ok(Self::with_disk(DiskStack::open(&cfg.disk)?, cfg.id.clone()))
    }

    pub(super) fn with_disk(disk: DiskStack, id: String) -> Self {
        Block {
            disk,
            id,
            acked_features: 0,
            queues: queue::new_queues(&[QUEUE_SIZE]),
            active: None,
            bounce: Vec::new(),
            log_limit: crate::logger::RateLimit::per_device(),
            quota_refusals: 0,
        }
    }

    pub(super) fn features_for(read_only: bool) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR
    }

    /// The disk.
    pub fn disk(&self) -> &DiskStack {
        &self.disk
    }

    /// How many guest writes were refused because its CoW layer held its
    /// quota.
    pub fn quota_refusals(&self) -> u64 {
        self.quota_refusals
    }

    /// Freezes the drive's current CoW layer and continues on a new empty
    /// one at `new_top` (see [`DiskStack::freeze_top`]). Call it with the
    /// VM paused, or at least with this device locked, as a snapshot does.
    pub fn freeze_layer(&mut self, new_top: &Path) -> Result<Frozen, LayerError> {
        self.disk.freeze_top(new_top)
    }

    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c
    }

    fn process_requests(&mut self) {
        let Some(ctx) = self.active.clone() else {
            return;
        };
        let mut bounce = std::mem::take(&mut self.bounce);
        bounce.resize(CHUNK, 0);
        while let Some((head, chain)) = pop_chain(&mut self.queues[0], &ctx.mem) {
            let used = match chain {
                Ok(chain) => self.handle(&ctx.mem, &chain, &mut bounce),
                Err(_) => 0,
            };
            if complete(&mut self.queues[0], &ctx.mem, &ctx.interrupt, head, used).is_err() {
                break;
            }
        }
        self.bounce = bounce;
    }

    /// Carries out one request; returns the bytes written into the chain.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: &DescriptorChain, bounce: &mut [u8]) -> u32 {
        let writable = chain.writable_len();
        if writable == 0 || chain.readable_len() < HEADER_LEN {
            return 0; // No room for a status byte or no header: not a request.
        }
        let mut r = chain.reader(mem);
        let mut hdr = [0u8; HEADER_LEN as usize];
        if r.read(&mut hdr).ok() != Some(hdr.len()) {
            return 0;
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let mut w = chain.writer(mem);
        let data_in = writable - 1;
        let (status, wrote) = match kind {
            VIRTIO_BLK_T_IN => self.read_disk(sector, data_in, &mut w, bounce),
            VIRTIO_BLK_T_OUT => (self.write_disk(sector, &mut r, bounce), 0),
            VIRTIO_BLK_T_FLUSH => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    crate::warn_limited!(self.log_limit, "virtio-block flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; BLOCK_ID_LEN];
                let b = self.id.as_bytes();
                let n = b.len().min(BLOCK_ID_LEN);
                id[..n].copy_from_slice(&b[..n]);
                let n = (data_in as usize).min(BLOCK_ID_LEN);
                match w.write(&id[..n]) {
                    Ok(m) => (VIRTIO_BLK_S_OK, m as u64),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        // The status byte is the last writable byte, whatever came before.
        let skip = w.remaining() - 1;
        w.skip(skip as usize);
        if w.write(&[status as u8]).ok() != Some(1) {
            return 0;
        }
        (wrote + 1) as u32
    }

    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR != 0 {
            return None;
        }
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (end <= self.disk.size()).then_some(offset)
    }

    fn read_disk(
        &mut self,
        sector: u64,
        len: u64,
        w: &mut Cursor,
        bounce: &mut [u8],
    ) -> (u32, u64) {
        let Some(mut offset) = self.range(sector, len) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(bounce.len());
            if let Err(e) = self.disk.read_at(&mut bounce[..n], offset) {
                crate::warn_limited!(self.log_limit, "virtio-block read failed: {e}");
                return (VIRTIO_BLK_S_IOERR, len - left);
            }
            if w.write(&bounce[..n]).ok() != Some(n) {
                return (VIRTIO_BLK_S_IOERR, len - left);
            }
            offset += n as u64;
            left -= n as u64;
        }
        (VIRTIO_BLK_S_OK, len)
    }

    fn write_disk(&mut self, sector: u64, r: &mut Cursor, bounce: &mut [u8]) -> u32 {
        if self.disk.read_only() {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = r.remaining();
        let Some(mut offset) = self.range(sector, len) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(bounce.len());
            if r.read(&mut bounce[..n]).ok() != Some(n) {
                return VIRTIO_BLK_S_IOERR;
            }
            if let Err(e) = self.disk.write_at(&bounce[..n], offset) {
                if matches!(e, LayerError::Quota { .. }) {
                    self.quota_refusals += 1;
                }
                crate::warn_limited!(self.log_limit, "virtio-block write failed: {e}");
                return VIRTIO_BLK_S_IOERR;
            }
            offset += n as u64;
            left -= n as u64;
        }
        VIRTIO_BLK_S_OK
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn avail_features(&self) -> u64 {
        Self::features_for(self.disk.read_only())
    }
    crate::devices::virtio::virtio_common_accessors!();
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if !self.queues[0].is_valid(&ctx.mem) {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.active = Some(ctx);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process_requests();
        }
    }
    fn reset(&mut self) {
        self.active = None;
        // What was written stays written.
        let _ = self.disk.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::epoll::Epoll;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::persist::Persist;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, D};
    use crate::devices::virtio::{EventRegistry, Interrupt};

    struct Rig {
        blk: Block,
        q: GuestQueue,
        dir: std::path::PathBuf,
    }

    fn rig(name: &str, read_only: bool) -> Rig {
        rig_with_quota(name, read_only, None)
    }

    fn rig_with_quota(name: &str, read_only: bool, quota: Option<u64>) -> Rig {
        let dir = std::env::temp_dir().join(format!("forkd-blk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        std::fs::write(&base, vec![0xabu8; 1 << 20]).unwrap();
        let mem = guest_memory();
        let mut blk = Block::new(&BlockConfig {
            disk: DiskConfig {
                base: Some(base),
                cow: (!read_only).then(|| dir.join("top.cow")),
                read_only,
                quota,
                ..Default::default()
            },
            id: "forkd-disk-0123456789abcdef".into(),
        })
        .unwrap();
        let q = GuestQueue::new(&mem, 16);
        q.configure(&mut blk.queues[0]);
        blk.activate(ActivateContext {
            mem,
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            events: EventRegistry::new(Arc::new(Epoll::new().unwrap())),
        })
        .unwrap();
        Rig { blk, q, dir }
    }

    fn header(q: &GuestQueue, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        q.write(at, &h);
    }

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn run(r: &mut Rig) -> (u32, u8) {
        r.blk.process_queue(0);
        let (_, len) = r.q.pop_used().expect("request answered");
        (len, r.q.read(STATUS, 1)[0])
    }

    #[test]
    fn write_read_flush_get_id() {
        let mut r = rig("rw", false);
        // Write 2 sectors at sector 3, split across two buffers.
        r.q.write(DATA, &[0x11; 512]);
        r.q.write(DATA + 0x1000, &[0x22; 512]);
        header(&r.q, HDR, VIRTIO_BLK_T_OUT, 3);
        r.q.add_chain(&[
            D::r(HDR, 16),
            D::r(DATA, 512),
            D::r(DATA + 0x1000, 512),
            D::w(STATUS, 1),
        ]);
        assert_eq!(run(&mut r), (1, VIRTIO_BLK_S_OK as u8));
        // Read sectors 2..6 back: base, the two written, base.
        header(&r.q, HDR, VIRTIO_BLK_T_IN, 2);
        r.q.add_chain(&[D::r(HDR, 16), D::w(DATA + 0x4000, 2048), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r), (2049, VIRTIO_BLK_S_OK as u8));
        let got = r.q.read(DATA + 0x4000, 2048);
        assert!(got[..512].iter().all(|&b| b == 0xab));
        assert!(got[512..1024].iter().all(|&b| b == 0x11));
        assert!(got[1024..1536].iter().all(|&b| b == 0x22));
        assert!(got[1536..].iter().all(|&b| b == 0xab));
        // Flush.
        header(&r.q, HDR, VIRTIO_BLK_T_FLUSH, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r), (1, VIRTIO_BLK_S_OK as u8));
        // GET_ID: 20 bytes, truncated.
        header(&r.q, HDR, VIRTIO_BLK_T_GET_ID, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::w(DATA, 20), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r), (21, VIRTIO_BLK_S_OK as u8));
        assert_eq!(r.q.read(DATA, 20), b"forkd-disk-012345678");
        // Config space: capacity in sectors.
        let mut cap = [0u8; 8];
        r.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        std::fs::remove_dir_all(&r.dir).unwrap();
    }

    #[test]
    fn bad_requests_get_errors() {
        let mut r = rig("bad", false);
        // Past the end of the disk.
        header(&r.q, HDR, VIRTIO_BLK_T_IN, 2047);
        r.q.add_chain(&[D::r(HDR, 16), D::w(DATA, 1024), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r).1, VIRTIO_BLK_S_IOERR as u8);
        // Sector number that overflows when turned into bytes.
        header(&r.q, HDR, VIRTIO_BLK_T_OUT, u64::MAX / 2);
        r.q.add_chain(&[D::r(HDR, 16), D::r(DATA, 512), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r).1, VIRTIO_BLK_S_IOERR as u8);
        // Not whole sectors.
        header(&r.q, HDR, VIRTIO_BLK_T_OUT, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::r(DATA, 100), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r).1, VIRTIO_BLK_S_IOERR as u8);
        // Unknown type.
        header(&r.q, HDR, 77, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r).1, VIRTIO_BLK_S_UNSUPP as u8);
        // No status byte / short header: returned with nothing written.
        r.q.add_chain(&[D::r(HDR, 16)]);
        r.blk.process_queue(0);
        assert_eq!(r.q.pop_used().unwrap().1, 0);
        r.q.add_chain(&[D::r(HDR, 8), D::w(STATUS, 1)]);
        r.blk.process_queue(0);
        assert_eq!(r.q.pop_used().unwrap().1, 0);
        std::fs::remove_dir_all(&r.dir).unwrap();
    }

    /// A write that needs a cluster past the layer's quota is an I/O
    /// error the device counts; writes into clusters held go on.
    #[test]
    fn writes_past_the_quota_are_io_errors_and_counted() {
        let cluster = 64 << 10;
        let mut r = rig_with_quota("quota", false, Some(cluster));
        let write = |r: &mut Rig, sector: u64| {
            r.q.write(DATA, &[0x11; 512]);
            header(&r.q, HDR, VIRTIO_BLK_T_OUT, sector);
            r.q.add_chain(&[D::r(HDR, 16), D::r(DATA, 512), D::w(STATUS, 1)]);
            run(r)
        };
        assert_eq!(write(&mut r, 0), (1, VIRTIO_BLK_S_OK as u8));
        assert_eq!(r.blk.quota_refusals(), 0);
        let past = cluster / 512;
        assert_eq!(write(&mut r, past), (1, VIRTIO_BLK_S_IOERR as u8));
        assert_eq!(write(&mut r, past + 1), (1, VIRTIO_BLK_S_IOERR as u8));
        assert_eq!(r.blk.quota_refusals(), 2);
        assert_eq!(write(&mut r, 1), (1, VIRTIO_BLK_S_OK as u8));
        assert_eq!(r.blk.quota_refusals(), 2);
        std::fs::remove_dir_all(&r.dir).unwrap();
    }

    #[test]
    fn read_only_drive_refuses_writes() {
        let mut r = rig("ro", true);
        assert_ne!(r.blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        r.q.write(DATA, &[0x11; 512]);
        header(&r.q, HDR, VIRTIO_BLK_T_OUT, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::r(DATA, 512), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r), (1, VIRTIO_BLK_S_IOERR as u8));
        header(&r.q, HDR, VIRTIO_BLK_T_IN, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::w(DATA, 512), D::w(STATUS, 1)]);
        assert_eq!(run(&mut r), (513, VIRTIO_BLK_S_OK as u8));
        assert!(r.q.read(DATA, 512).iter().all(|&b| b == 0xab));
        assert!(std::fs::read(r.dir.join("base.img"))
            .unwrap()
            .iter()
            .all(|&b| b == 0xab));
        std::fs::remove_dir_all(&r.dir).unwrap();
    }

    #[test]
    fn save_restore_keeps_queue_position() {
        let mut r = rig("persist", false);
        header(&r.q, HDR, VIRTIO_BLK_T_FLUSH, 0);
        r.q.add_chain(&[D::r(HDR, 16), D::w(STATUS, 1)]);
        run(&mut r);
        let state = r.blk.save();
        assert_eq!(state.virtio.queues[0].next_avail, 1);
        let disk = DiskStack::open(&DiskConfig {
            base: Some(r.dir.join("base.img")),
            read_only: true,
            ..Default::default()
        })
        .unwrap();
        // A restore onto a disk of another mode is refused.
        assert!(Block::restore(&state, disk).is_err());
        drop(r.blk);
        let disk = DiskStack::open(&DiskConfig {
            base: Some(r.dir.join("base.img")),
            cow: Some(r.dir.join("top.cow")),
            ..Default::default()
        })
        .unwrap();
        let b = Block::restore(&state, disk).unwrap();
        assert_eq!(b.save(), state);
        std::fs::remove_dir_all(&r.dir).unwrap();
    }
}
