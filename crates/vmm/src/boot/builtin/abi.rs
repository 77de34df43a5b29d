// The contract between forkd-vmm and the built-in guest program.
//
// This file is plain constants with no imports: build.rs `include!`s it and
// hands every value to the C compiler as a -D definition, so the guest and
// the VMM cannot disagree about an address or a port.

/// Guest address the guest program is linked and loaded at.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Boot-info page, written by the VMM before the first instruction runs.
pub const INFO_ADDR: u64 = 0x2000;
/// Mailbox page: one request/response in flight, host and guest take turns.
pub const MAILBOX_ADDR: u64 = 0x3000;
/// User-accessible identity page tables (PML4, PDPT, then page directories).
pub const PAGE_TABLES_ADDR: u64 = 0x22000;
/// vCPU stacks: vCPU n's stack ends at `STACKS_TOP - n * STACK_SIZE`.
pub const STACKS_TOP: u64 = 0x9_0000;
/// Size of one vCPU stack.
pub const STACK_SIZE: u64 = 0x1000;
/// First address the fill/verify operations may touch; everything below
/// belongs to the boot structures and the guest program.
pub const SCRATCH_START: u64 = 0x20_0000;
/// The guest program (code, data and zeroed data) must end below this.
pub const PROGRAM_END_MAX: u64 = VIRTIO_AREA_START;

/// The guest's virtio area: virtqueues and their buffers, owned by the
/// guest's vsock driver (the device reads and writes it through the rings).
/// Each queue takes two pages: the descriptor table in the first, the
/// available ring at the start of the second and the used ring in its
/// second half.
pub const VIRTIO_AREA_START: u64 = 0x18_0000;
/// vsock receive queue (queue 0).
pub const VSOCK_RXQ_ADDR: u64 = VIRTIO_AREA_START;
/// vsock transmit queue (queue 1).
pub const VSOCK_TXQ_ADDR: u64 = VIRTIO_AREA_START + 0x2000;
/// vsock event queue (queue 2).
pub const VSOCK_EVQ_ADDR: u64 = VIRTIO_AREA_START + 0x4000;
/// Offset of the available ring from a queue's address.
pub const VQ_AVAIL_OFFSET: u64 = 0x1000;
/// Offset of the used ring from a queue's address.
pub const VQ_USED_OFFSET: u64 = 0x1800;
/// Event buffers (8 bytes each).
pub const VSOCK_EV_BUFS: u64 = VIRTIO_AREA_START + 0x8000;
/// Receive buffers, `VSOCK_RX_NUM` of `VSOCK_BUF_SIZE` bytes.
pub const VSOCK_RX_BUFS: u64 = VIRTIO_AREA_START + 0x1_0000;
/// Transmit buffers, `VSOCK_TX_NUM` of `VSOCK_BUF_SIZE` bytes.
pub const VSOCK_TX_BUFS: u64 = VSOCK_RX_BUFS + VSOCK_RX_NUM * VSOCK_BUF_SIZE;
/// One past the virtio area.
pub const VIRTIO_AREA_END: u64 = VSOCK_TX_BUFS + VSOCK_TX_NUM * VSOCK_BUF_SIZE;
/// Entries of the receive and transmit queues (and their buffers).
pub const VSOCK_RX_NUM: u64 = 64;
pub const VSOCK_TX_NUM: u64 = 32;
/// Entries of the event queue.
pub const VSOCK_EV_NUM: u64 = 8;
/// Size of one receive or transmit buffer: a packet header and its payload.
pub const VSOCK_BUF_SIZE: u64 = 0x1000;

/// The virtio-mmio windows the guest probes: `VIRTIO_MMIO_COUNT` windows of
/// `VIRTIO_MMIO_WINDOW` bytes from `VIRTIO_MMIO_BASE` (the same values as
/// `layout::VIRTIO_MMIO_START`, `layout::VIRTIO_MMIO_SIZE` and the number
/// of interrupt lines the device manager hands out).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
pub const VIRTIO_MMIO_COUNT: u64 = 19;

/// The vsock port the guest answers the agent protocol on
/// (`proto::agent::DEFAULT_VSOCK_PORT`).
pub const AGENT_PORT: u64 = 1024;
/// Largest agent frame, JSON and binary parts (`proto::agent::MAX_FRAME`).
pub const AGENT_MAX_FRAME: u64 = 1 << 20;

/// Boot-info field offsets (each a u64).
pub const INFO_MAGIC: u64 = 0x00;
pub const INFO_LOW_RAM_END: u64 = 0x08;
pub const INFO_HIGH_RAM_SIZE: u64 = 0x10;
pub const INFO_NUM_VCPUS: u64 = 0x18;
pub const INFO_BOOT_ID: u64 = 0x20;
/// VM generation: a fresh random value at boot and at every restore, so a
/// restored child can tell it is a new copy (the built-in guest's vmgenid).
pub const INFO_VM_GENERATION: u64 = 0x28;
/// The running counter, on its own cache line.
pub const INFO_COUNTER: u64 = 0x40;
/// The page stamper's state: stamps done so far (one word, so a snapshot
/// at any instruction sees a consistent value), its first page (as a page
/// index into scratch memory) and its page count. With n stamps done, the
/// pass is n / pages + 1 and the cursor n % pages; pages below the cursor
/// carry the pass, the others the pass before, except that the page at the
/// cursor may already carry the new pass (its count update is next). That
/// is the invariant a snapshot taken at any instant must keep.
pub const INFO_STAMP_COUNT: u64 = 0x80;
pub const INFO_STAMP_BASE: u64 = 0x90;
pub const INFO_STAMP_PAGES: u64 = 0x98;
/// Value of the magic field: "FORKDBI1" little-endian.
pub const INFO_MAGIC_VALUE: u64 = 0x3149_4244_4b52_4f46;

/// Mailbox field offsets.
/// u32 doorbell: the host sets 1 after writing a request; the guest sets 0
/// when it takes the request.
pub const MB_DOORBELL: u64 = 0x00;
/// u32 operation code (`OP_*`).
pub const MB_OP: u64 = 0x04;
/// u64 arguments, `MB_NUM_ARGS` of them.
pub const MB_ARGS: u64 = 0x08;
pub const MB_NUM_ARGS: u64 = 4;
/// u32 status (`STATUS_*`), written by the guest.
pub const MB_STATUS: u64 = 0x28;
/// u64 results, `MB_NUM_RESULTS` of them.
pub const MB_RESULTS: u64 = 0x30;
pub const MB_NUM_RESULTS: u64 = 4;
/// u32 length of the text answer that follows.
pub const MB_TEXT_LEN: u64 = 0x50;
/// Text answer (UTF-8, not NUL-terminated).
pub const MB_TEXT: u64 = 0x58;
/// Room for the text answer: the rest of the page.
pub const MB_TEXT_MAX: u64 = 0x1000 - MB_TEXT;

/// Port I/O the guest uses to talk to the VMM (IOPL=3 lets it run at CPL3).
/// `in` (32-bit): block until there is work; answers a mask of `WAKE_*`
/// bits, 0 when the vCPU was woken for another reason (pause, shutdown):
/// re-check everything.
pub const PORT_WAIT: u64 = 0x6f0;
/// PORT_WAIT bit: a mailbox request is posted.
pub const WAKE_MAILBOX: u64 = 1;
/// PORT_WAIT bit: a virtio device raised its interrupt since the last wait
/// (the guest has no interrupt delivery: the VMM relays the device's
/// interrupt eventfd to this bit instead of to the irqchip).
pub const WAKE_DEVICE: u64 = 2;
/// `out` (32-bit): the response in the mailbox is complete.
pub const PORT_DONE: u64 = 0x6f1;
/// `out` (32-bit): the guest hit a fatal error; the value says which.
pub const PORT_PANIC: u64 = 0x6f2;
/// `in` (32-bit) from a secondary vCPU: park until the VM ends.
pub const PORT_PARK: u64 = 0x6f3;

/// Operations.
pub const OP_PING: u64 = 1;
/// results: boot id, VM generation.
pub const OP_IDENTITY: u64 = 2;
/// args: seed, sequence number, MiB, offset in MiB. results: bytes written.
pub const OP_FILL: u64 = 3;
/// args: seed, sequence number, MiB, offset in MiB.
/// results: bad words, first bad address, whether there was one.
pub const OP_VERIFY: u64 = 4;
pub const OP_COUNTER_START: u64 = 5;
/// results: counter value.
pub const OP_COUNTER_READ: u64 = 6;
pub const OP_COUNTER_STOP: u64 = 7;
/// args: MiB, offset in MiB. Stamps every page once (pass 1), then keeps
/// stamping in the background (pass 2, 3, ...): word 0 of a page is the
/// pass, word 1 its address. results: pages.
pub const OP_STAMP_START: u64 = 8;
/// results: pages that break the stamp invariant, pass, cursor.
pub const OP_STAMP_VERIFY: u64 = 9;
/// results: pass, cursor.
pub const OP_STAMP_STOP: u64 = 10;

/// Statuses.
pub const STATUS_OK: u64 = 0;
pub const STATUS_UNKNOWN_OP: u64 = 1;
pub const STATUS_OUT_OF_RANGE: u64 = 2;

/// Panic codes sent on `PORT_PANIC`.
pub const PANIC_BAD_INFO: u64 = 1;
