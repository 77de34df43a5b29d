/*
 * The forkd built-in guest.
 *
 * A tiny freestanding program that forkd-vmm loads at LOAD_ADDR and enters
 * directly in 64-bit mode at CPL3 with IOPL=3 and user-accessible identity
 * page tables. Everything it does runs as plain user-mode instructions, so
 * it runs natively even on a KVM that emulates guest kernel code (PVM), and
 * it needs no interrupts: it idles by blocking in a port read that the VMM
 * answers when there is work.
 *
 * Written in C because no bare-metal Rust target can be installed on the
 * build machines (only x86_64-unknown-linux-gnu, without rust-src). Every
 * address, port and operation code comes from crates/vmm/src/boot/builtin/abi.rs
 * through -D definitions; see that file for the contract.
 *
 * vCPU 0 serves requests from the mailbox page. Other vCPUs park.
 */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long u64;

#define VOL(type, addr) (*(volatile type *)(u64)(addr))
#define INFO(off) VOL(u64, INFO_ADDR + (off))
#define MB32(off) VOL(u32, MAILBOX_ADDR + (off))
#define MB64(off) VOL(u64, MAILBOX_ADDR + (off))

static inline u32 port_in(u32 port)
{
	u32 v;
	__asm__ volatile("inl %w1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline void port_out(u32 port, u32 v)
{
	__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}

/* The compiler may emit calls to these even in freestanding code. */
void *memset(void *d, int c, u64 n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

/*
 * The fill pattern: the 64-bit word at guest address `addr` for (seed, seq)
 * is a splitmix64 finaliser of the three. The host side has the same
 * function (builtin::pattern_word) to check memory from outside the guest.
 */
static inline u64 pattern_word(u64 seed, u64 seq, u64 addr)
{
	u64 z = seed ^ (seq * 0x9e3779b97f4a7c15UL) ^ addr;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/*
 * The scratch area is RAM from SCRATCH_START up, skipping the MMIO gap, seen
 * as one linear space. Calls fn(start, end) for each piece of scratch bytes
 * [skip, skip + bytes); returns 0 when RAM is too small.
 */
typedef void (*range_fn)(u64 start, u64 end, u64 seed, u64 seq, u64 *acc);

static u64 scratch_low_room(void)
{
	u64 low_end = INFO(INFO_LOW_RAM_END);
	return low_end > SCRATCH_START ? low_end - SCRATCH_START : 0;
}

/* Whether scratch bytes [skip, skip + bytes) exist. */
static int scratch_fits(u64 skip, u64 bytes)
{
	u64 room = scratch_low_room() + INFO(INFO_HIGH_RAM_SIZE);
	return skip <= room && bytes <= room - skip;
}

static int for_scratch(u64 skip, u64 bytes, range_fn fn, u64 seed, u64 seq, u64 *acc)
{
	u64 low_room = scratch_low_room();
	if (!scratch_fits(skip, bytes))
		return 0;
	u64 end = skip + bytes;
	if (skip < low_room) {
		u64 low_stop = end < low_room ? end : low_room;
		fn(SCRATCH_START + skip, SCRATCH_START + low_stop, seed, seq, acc);
	}
	if (end > low_room) {
		u64 from = skip > low_room ? skip - low_room : 0;
		fn(0x100000000UL + from, 0x100000000UL + (end - low_room), seed, seq, acc);
	}
	return 1;
}

static void fill_range(u64 start, u64 end, u64 seed, u64 seq, u64 *acc)
{
	for (u64 a = start; a < end; a += 8)
		VOL(u64, a) = pattern_word(seed, seq, a);
	acc[0] += end - start;
}

/* acc[0]: bad words, acc[1]: first bad address + 1 (0 when none). */
static void verify_range(u64 start, u64 end, u64 seed, u64 seq, u64 *acc)
{
	for (u64 a = start; a < end; a += 8) {
		if (VOL(u64, a) != pattern_word(seed, seq, a)) {
			if (!acc[1])
				acc[1] = a + 1;
			acc[0]++;
		}
	}
}

static void reply_text(const char *s)
{
	u32 n = 0;
	while (s[n] && n < MB_TEXT_MAX) {
		VOL(u8, MAILBOX_ADDR + MB_TEXT + n) = (u8)s[n];
		n++;
	}
	MB32(MB_TEXT_LEN) = n;
}

static int counter_running;
static int stamp_running;

/*
 * The stamper: pages are addressed through the scratch mapping (skipping
 * the MMIO gap), so page i of the stamp range is at scratch_page(base + i).
 */
static u64 scratch_page(u64 index)
{
	u64 offset = index << 12, low_room = scratch_low_room();
	return offset < low_room ? SCRATCH_START + offset : 0x100000000UL + (offset - low_room);
}

static void stamp_one(void)
{
	u64 n = INFO(INFO_STAMP_COUNT), pages = INFO(INFO_STAMP_PAGES);
	u64 addr = scratch_page(INFO(INFO_STAMP_BASE) + n % pages);
	VOL(u64, addr) = n / pages + 1;
	VOL(u64, addr + 8) = addr;
	/* The count moves only after the page holds the new pass. */
	INFO(INFO_STAMP_COUNT) = n + 1;
}

static u64 stamp_verify(void)
{
	u64 n = INFO(INFO_STAMP_COUNT), pages = INFO(INFO_STAMP_PAGES);
	u64 pass = n / pages + 1, cursor = n % pages, base = INFO(INFO_STAMP_BASE), bad = 0;
	for (u64 i = 0; i < pages; i++) {
		u64 addr = scratch_page(base + i);
		u64 want = i < cursor ? pass : pass - 1, got = VOL(u64, addr);
		if ((got != want && !(i == cursor && got == pass)) || VOL(u64, addr + 8) != addr)
			bad++;
	}
	return bad;
}

static void serve(void)
{
	u32 op = MB32(MB_OP);
	u64 a0 = MB64(MB_ARGS), a1 = MB64(MB_ARGS + 8), a2 = MB64(MB_ARGS + 16);
	u64 a3 = MB64(MB_ARGS + 24);
	u64 acc[2] = { 0, 0 };
	u32 status = STATUS_OK;

	MB32(MB_DOORBELL) = 0;
	MB32(MB_TEXT_LEN) = 0;
	for (u32 i = 0; i < MB_NUM_RESULTS; i++)
		MB64(MB_RESULTS + 8 * i) = 0;

	switch (op) {
	case OP_PING:
		reply_text("guest: builtin");
		MB64(MB_RESULTS) = INFO(INFO_NUM_VCPUS);
		break;
	case OP_IDENTITY:
		MB64(MB_RESULTS) = INFO(INFO_BOOT_ID);
		MB64(MB_RESULTS + 8) = INFO(INFO_VM_GENERATION);
		break;
	case OP_FILL:
	case OP_VERIFY:
		/* a2, a3 are in MiB; refuse values whose byte count would overflow. */
		if (a2 > (1UL << 40) || a3 > (1UL << 40) ||
		    !for_scratch(a3 << 20, a2 << 20, op == OP_FILL ? fill_range : verify_range,
				 a0, a1, acc)) {
			status = STATUS_OUT_OF_RANGE;
			reply_text("not enough guest memory for that many MiB");
			break;
		}
		MB64(MB_RESULTS) = acc[0];
		MB64(MB_RESULTS + 8) = acc[1] ? acc[1] - 1 : 0;
		MB64(MB_RESULTS + 16) = acc[1] != 0;
		break;
	case OP_COUNTER_START:
		counter_running = 1;
		break;
	case OP_COUNTER_READ:
		MB64(MB_RESULTS) = INFO(INFO_COUNTER);
		break;
	case OP_COUNTER_STOP:
		counter_running = 0;
		MB64(MB_RESULTS) = INFO(INFO_COUNTER);
		break;
	case OP_STAMP_START: {
		/* a2 is MiB, a3 the offset in MiB, as for fill. */
		if (a2 == 0 || a2 > (1UL << 40) || a3 > (1UL << 40) || !scratch_fits(a3 << 20, a2 << 20)) {
			status = STATUS_OUT_OF_RANGE;
			reply_text("not enough guest memory for that many MiB");
			break;
		}
		INFO(INFO_STAMP_BASE) = (a3 << 20) >> 12;
		INFO(INFO_STAMP_PAGES) = (a2 << 20) >> 12;
		INFO(INFO_STAMP_COUNT) = 0;
		do
			stamp_one();
		while (INFO(INFO_STAMP_COUNT) != INFO(INFO_STAMP_PAGES));
		stamp_running = 1;
		MB64(MB_RESULTS) = INFO(INFO_STAMP_PAGES);
		MB64(MB_RESULTS + 8) = 2;
		break;
	}
	case OP_STAMP_VERIFY:
	case OP_STAMP_STOP: {
		u64 n = INFO(INFO_STAMP_COUNT), pages = INFO(INFO_STAMP_PAGES);
		if (op == OP_STAMP_STOP)
			stamp_running = 0;
		MB64(MB_RESULTS) = op == OP_STAMP_VERIFY && pages ? stamp_verify() : 0;
		MB64(MB_RESULTS + 8) = pages ? n / pages + 1 : 0;
		MB64(MB_RESULTS + 16) = pages ? n % pages : 0;
		break;
	}
	default:
		status = STATUS_UNKNOWN_OP;
		reply_text("unknown operation");
	}
	MB32(MB_STATUS) = status;
	port_out(PORT_DONE, op);
}

/* Entered with RSP at this vCPU's stack and RDI = vCPU index. */
__attribute__((noreturn, used)) void _start(u64 vcpu)
{
	if (vcpu != 0) {
		for (;;)
			port_in(PORT_PARK);
	}
	if (INFO(INFO_MAGIC) != INFO_MAGIC_VALUE) {
		for (;;)
			port_out(PORT_PANIC, PANIC_BAD_INFO);
	}
	for (;;) {
		if (MB32(MB_DOORBELL)) {
			serve();
		} else if (counter_running || stamp_running) {
			/* Natively this spins at about a nanosecond an iteration. */
			if (counter_running)
				INFO(INFO_COUNTER)++;
			if (stamp_running)
				stamp_one();
		} else {
			port_in(PORT_WAIT);
		}
	}
}
