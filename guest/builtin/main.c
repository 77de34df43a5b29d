/*
 * The forkd built-in guest.
 *
 * A tiny freestanding program that forkd-vmm loads at LOAD_ADDR and enters
 * directly in 64-bit mode at CPL3 with IOPL=3 and user-accessible identity
 * page tables. Everything it does runs as plain user-mode instructions, so
 * it runs natively even on a KVM that emulates guest kernel code (PVM), and
 * it needs no interrupts: it idles by blocking in a port read that the VMM
 * answers when there is work (a mailbox request, or a device interrupt that
 * the VMM relays to that read instead of to an interrupt controller).
 *
 * Written in C because no bare-metal Rust target can be installed on the
 * build machines (only x86_64-unknown-linux-gnu, without rust-src). Every
 * address, port and operation code comes from crates/vmm/src/boot/builtin/abi.rs
 * through -D definitions; see that file for the contract.
 *
 * vCPU 0 does everything: it serves the mailbox (the VMM's control socket)
 * and, when the VM has a virtio-vsock device, the agent protocol of
 * crates/proto/src/agent.rs on vsock port AGENT_PORT, through a small
 * polling virtio-mmio driver. Both paths share the operations. Other vCPUs
 * park.
 *
 * Everything read from the device or from a host connection is bounded:
 * odd input gets an error answer or a reset connection, never a crash.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define VOL(type, addr) (*(volatile type *)(u64)(addr))
#define INFO(off) VOL(u64, INFO_ADDR + (off))
#define MB32(off) VOL(u32, MAILBOX_ADDR + (off))
#define MB64(off) VOL(u64, MAILBOX_ADDR + (off))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

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

/* A full barrier (the device runs on other host threads). */
static inline void fence(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
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

void *memmove(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	if (p < q) {
		while (n--)
			*p++ = *q++;
	} else {
		while (n--)
			p[n] = q[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

static u32 cstrlen(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	return n;
}

/* Whether the n bytes at s are exactly the C string lit. */
static int str_is(const char *s, u32 n, const char *lit)
{
	return n == cstrlen(lit) && !memcmp(s, lit, n);
}

/*
 * vCPU 0 runs on a stack of its own in the program's zeroed data: the
 * per-vCPU stacks of the boot layout are one page each, too small for the
 * JSON reader and the expression evaluator.
 */
#define MAIN_STACK_SIZE 0x10000
u8 main_stack[MAIN_STACK_SIZE] __attribute__((aligned(16)));

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	test %rdi, %rdi\n"
	"	jnz 1f\n"
	"	lea main_stack+" "65536" "(%rip), %rsp\n"
	"	jmp 2f\n"
	"1:	and $-16, %rsp\n"
	"2:	call guest_main\n"
	"	ud2\n");

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

/*
 * The operations both paths share: the mailbox (codes OP_*, u64 arguments)
 * and vsock (JSON requests tagged by "op", mapped to the same codes).
 */
struct op_result {
	u32 status;
	u64 r[MB_NUM_RESULTS];
	const char *text;
};

static void run_op(u32 op, const u64 *a, struct op_result *res)
{
	u64 acc[2] = { 0, 0 };

	memset(res, 0, sizeof(*res));
	res->status = STATUS_OK;
	res->text = "";
	switch (op) {
	case OP_PING:
		res->text = "guest: builtin";
		res->r[0] = INFO(INFO_NUM_VCPUS);
		break;
	case OP_IDENTITY:
		res->r[0] = INFO(INFO_BOOT_ID);
		res->r[1] = INFO(INFO_VM_GENERATION);
		break;
	case OP_FILL:
	case OP_VERIFY:
		/* a[2], a[3] are in MiB; refuse values whose byte count would overflow. */
		if (a[2] > (1UL << 40) || a[3] > (1UL << 40) ||
		    !for_scratch(a[3] << 20, a[2] << 20, op == OP_FILL ? fill_range : verify_range,
				 a[0], a[1], acc)) {
			res->status = STATUS_OUT_OF_RANGE;
			res->text = "not enough guest memory for that many MiB";
			break;
		}
		res->r[0] = acc[0];
		res->r[1] = acc[1] ? acc[1] - 1 : 0;
		res->r[2] = acc[1] != 0;
		break;
	case OP_COUNTER_START:
		counter_running = 1;
		break;
	case OP_COUNTER_READ:
		res->r[0] = INFO(INFO_COUNTER);
		break;
	case OP_COUNTER_STOP:
		counter_running = 0;
		res->r[0] = INFO(INFO_COUNTER);
		break;
	case OP_STAMP_START:
		/* a[2] is MiB, a[3] the offset in MiB, as for fill. */
		if (a[2] == 0 || a[2] > (1UL << 40) || a[3] > (1UL << 40) ||
		    !scratch_fits(a[3] << 20, a[2] << 20)) {
			res->status = STATUS_OUT_OF_RANGE;
			res->text = "not enough guest memory for that many MiB";
			break;
		}
		INFO(INFO_STAMP_BASE) = (a[3] << 20) >> 12;
		INFO(INFO_STAMP_PAGES) = (a[2] << 20) >> 12;
		INFO(INFO_STAMP_COUNT) = 0;
		do
			stamp_one();
		while (INFO(INFO_STAMP_COUNT) != INFO(INFO_STAMP_PAGES));
		stamp_running = 1;
		res->r[0] = INFO(INFO_STAMP_PAGES);
		res->r[1] = 2;
		break;
	case OP_STAMP_VERIFY:
	case OP_STAMP_STOP: {
		u64 n = INFO(INFO_STAMP_COUNT), pages = INFO(INFO_STAMP_PAGES);
		if (op == OP_STAMP_STOP)
			stamp_running = 0;
		res->r[0] = op == OP_STAMP_VERIFY && pages ? stamp_verify() : 0;
		res->r[1] = pages ? n / pages + 1 : 0;
		res->r[2] = pages ? n % pages : 0;
		break;
	}
	default:
		res->status = STATUS_UNKNOWN_OP;
		res->text = "unknown operation";
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

/* One mailbox request. */
static void serve_mailbox(void)
{
	u32 op = MB32(MB_OP);
	u64 a[MB_NUM_ARGS];
	struct op_result res;

	for (u32 i = 0; i < MB_NUM_ARGS; i++)
		a[i] = MB64(MB_ARGS + 8 * i);
	MB32(MB_DOORBELL) = 0;
	MB32(MB_TEXT_LEN) = 0;
	for (u32 i = 0; i < MB_NUM_RESULTS; i++)
		MB64(MB_RESULTS + 8 * i) = 0;

	run_op(op, a, &res);
	for (u32 i = 0; i < MB_NUM_RESULTS; i++)
		MB64(MB_RESULTS + 8 * i) = res.r[i];
	reply_text(res.text);
	MB32(MB_STATUS) = res.status;
	port_out(PORT_DONE, op);
}

/* ---- JSON writer: into a caller's buffer, marks overflow instead of writing past it. */

struct jw {
	char *buf;
	u32 len, cap;
	int overflow;
};

static void jw_bytes(struct jw *w, const char *s, u32 n)
{
	if (w->overflow || n > w->cap - w->len) {
		w->overflow = 1;
		return;
	}
	memcpy(w->buf + w->len, s, n);
	w->len += n;
}

static void jw_raw(struct jw *w, const char *s)
{
	jw_bytes(w, s, cstrlen(s));
}

static void jw_u64(struct jw *w, u64 v)
{
	char tmp[24];
	u32 i = sizeof(tmp);
	do {
		tmp[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	jw_bytes(w, tmp + i, sizeof(tmp) - i);
}

static void jw_i64(struct jw *w, i64 v)
{
	if (v < 0) {
		jw_raw(w, "-");
		jw_u64(w, -(u64)v);
	} else {
		jw_u64(w, (u64)v);
	}
}

/* A JSON string: quotes, backslashes and control bytes escaped. */
static void jw_str(struct jw *w, const char *s, u32 n)
{
	static const char hex[] = "0123456789abcdef";
	jw_raw(w, "\"");
	for (u32 i = 0; i < n; i++) {
		u8 c = (u8)s[i];
		if (c == '"' || c == '\\') {
			char e[2] = { '\\', (char)c };
			jw_bytes(w, e, 2);
		} else if (c == '\n') {
			jw_raw(w, "\\n");
		} else if (c < 0x20 || c == 0x7f) {
			char e[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
			jw_bytes(w, e, 6);
		} else {
			jw_bytes(w, (const char *)&c, 1);
		}
	}
	jw_raw(w, "\"");
}

static void jw_cstr(struct jw *w, const char *s)
{
	jw_str(w, s, cstrlen(s));
}

/* ",\"key\":" (or without the comma for the first key). */
static void jw_key(struct jw *w, const char *key)
{
	if (w->len && w->buf[w->len - 1] != '{')
		jw_raw(w, ",");
	jw_raw(w, "\"");
	jw_raw(w, key);
	jw_raw(w, "\":");
}

/* ---- JSON reader: the flat request objects of the agent protocol. ---- */

#define JSON_MAX 8192	/* largest JSON part of a request the guest takes */
#define MAX_ARGS 64
#define MAX_DEPTH 32

/* Decoded strings go here (a decoded string is never longer than its source). */
static char arena[JSON_MAX];
static u32 arena_len;

struct jr {
	const u8 *p, *end;
	const char *err;
};

static void jr_ws(struct jr *r)
{
	while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
		r->p++;
}

static int jr_fail(struct jr *r, const char *err)
{
	if (!r->err)
		r->err = err;
	return 0;
}

static int jr_eat(struct jr *r, u8 c)
{
	jr_ws(r);
	if (r->p < r->end && *r->p == c) {
		r->p++;
		return 1;
	}
	return 0;
}

static int hexval(u8 c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int jr_hex4(struct jr *r, u32 *v)
{
	if (r->end - r->p < 4)
		return jr_fail(r, "truncated \\u escape");
	*v = 0;
	for (int i = 0; i < 4; i++) {
		int h = hexval(r->p[i]);
		if (h < 0)
			return jr_fail(r, "bad \\u escape");
		*v = *v << 4 | (u32)h;
	}
	r->p += 4;
	return 1;
}

static void put_utf8(char *out, u32 *n, u32 cp)
{
	if (cp < 0x80) {
		out[(*n)++] = (char)cp;
	} else if (cp < 0x800) {
		out[(*n)++] = (char)(0xc0 | cp >> 6);
		out[(*n)++] = (char)(0x80 | (cp & 0x3f));
	} else if (cp < 0x10000) {
		out[(*n)++] = (char)(0xe0 | cp >> 12);
		out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[(*n)++] = (char)(0x80 | (cp & 0x3f));
	} else {
		out[(*n)++] = (char)(0xf0 | cp >> 18);
		out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3f));
		out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[(*n)++] = (char)(0x80 | (cp & 0x3f));
	}
}

/*
 * A string at r->p (after whitespace). With `keep`, its decoded bytes go to
 * the arena and *s, *n point at them; otherwise it is only checked.
 */
static int jr_string(struct jr *r, int keep, const char **s, u32 *n)
{
	char *out = arena + arena_len;
	u32 len = 0;
	if (!jr_eat(r, '"'))
		return jr_fail(r, "expected a string");
	for (;;) {
		if (r->p >= r->end)
			return jr_fail(r, "unterminated string");
		u8 c = *r->p++;
		u32 cp;
		if (c == '"')
			break;
		if (c < 0x20)
			return jr_fail(r, "control character in a string");
		if (c != '\\') {
			if (keep)
				out[len] = (char)c;
			len++;
			continue;
		}
		if (r->p >= r->end)
			return jr_fail(r, "unterminated string");
		c = *r->p++;
		switch (c) {
		case '"': cp = '"'; break;
		case '\\': cp = '\\'; break;
		case '/': cp = '/'; break;
		case 'b': cp = 8; break;
		case 'f': cp = 12; break;
		case 'n': cp = 10; break;
		case 'r': cp = 13; break;
		case 't': cp = 9; break;
		case 'u':
			if (!jr_hex4(r, &cp))
				return 0;
			if (cp >= 0xdc00 && cp < 0xe000)
				return jr_fail(r, "lone low surrogate in a string");
			if (cp >= 0xd800 && cp < 0xdc00) {
				u32 lo;
				if (r->end - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u')
					return jr_fail(r, "lone high surrogate in a string");
				r->p += 2;
				if (!jr_hex4(r, &lo))
					return 0;
				if (lo < 0xdc00 || lo >= 0xe000)
					return jr_fail(r, "bad surrogate pair in a string");
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			}
			break;
		default:
			return jr_fail(r, "bad escape in a string");
		}
		/* An escape is at least 2 source bytes and at most 4 output bytes per 6 (or 12) source bytes. */
		if (keep)
			put_utf8(out, &len, cp);
		else
			len++;
	}
	if (keep) {
		arena_len += len;
		*s = out;
		*n = len;
	}
	return 1;
}

/* A number. Integers set *is_int and their magnitude and sign (*big when past 64 bits). */
static int jr_number(struct jr *r, u64 *mag, int *neg, int *is_int, int *big)
{
	const u8 *p;
	*mag = 0;
	*neg = 0;
	*is_int = 1;
	*big = 0;
	jr_ws(r);
	p = r->p;
	if (p < r->end && *p == '-') {
		*neg = 1;
		p++;
	}
	if (p >= r->end || *p < '0' || *p > '9')
		return jr_fail(r, "expected a value");
	if (*p == '0' && p + 1 < r->end && p[1] >= '0' && p[1] <= '9')
		return jr_fail(r, "leading zero in a number");
	while (p < r->end && *p >= '0' && *p <= '9') {
		u64 d = (u64)(*p - '0');
		if (*mag > (~0UL - d) / 10)
			*big = 1;
		else
			*mag = *mag * 10 + d;
		p++;
	}
	if (p < r->end && *p == '.') {
		*is_int = 0;
		p++;
		if (p >= r->end || *p < '0' || *p > '9')
			return jr_fail(r, "bad number");
		while (p < r->end && *p >= '0' && *p <= '9')
			p++;
	}
	if (p < r->end && (*p == 'e' || *p == 'E')) {
		*is_int = 0;
		p++;
		if (p < r->end && (*p == '+' || *p == '-'))
			p++;
		if (p >= r->end || *p < '0' || *p > '9')
			return jr_fail(r, "bad number");
		while (p < r->end && *p >= '0' && *p <= '9')
			p++;
	}
	r->p = p;
	return 1;
}

static int jr_literal(struct jr *r, const char *lit)
{
	u32 n = cstrlen(lit);
	if ((u64)(r->end - r->p) < n || memcmp(r->p, lit, n))
		return jr_fail(r, "expected a value");
	r->p += n;
	return 1;
}

/* Checks and skips any value, nested at most MAX_DEPTH deep. */
static int jr_skip(struct jr *r, int depth)
{
	u64 m;
	int a, b, c;
	if (depth > MAX_DEPTH)
		return jr_fail(r, "nested too deeply");
	jr_ws(r);
	if (r->p >= r->end)
		return jr_fail(r, "expected a value");
	switch (*r->p) {
	case '"':
		return jr_string(r, 0, 0, 0);
	case '{':
		r->p++;
		if (jr_eat(r, '}'))
			return 1;
		do {
			if (!jr_string(r, 0, 0, 0) || !jr_eat(r, ':'))
				return jr_fail(r, "expected \"key\": value");
			if (!jr_skip(r, depth + 1))
				return 0;
		} while (jr_eat(r, ','));
		return jr_eat(r, '}') ? 1 : jr_fail(r, "expected , or } in an object");
	case '[':
		r->p++;
		if (jr_eat(r, ']'))
			return 1;
		do {
			if (!jr_skip(r, depth + 1))
				return 0;
		} while (jr_eat(r, ','));
		return jr_eat(r, ']') ? 1 : jr_fail(r, "expected , or ] in an array");
	case 't':
		return jr_literal(r, "true");
	case 'f':
		return jr_literal(r, "false");
	case 'n':
		return jr_literal(r, "null");
	default:
		return jr_number(r, &m, &a, &b, &c);
	}
}

/* What the guest reads from a request. */
enum { F_SEED, F_SEQ, F_MIB, F_OFFSET_MIB, NUM_U64_FIELDS };
static const char *const u64_fields[NUM_U64_FIELDS] = { "seed", "seq", "mib", "offset_mib" };

struct req {
	const char *op;
	u32 op_len;
	int has_op;
	u64 num[NUM_U64_FIELDS];
	/* 1: present and a u64; -1: present with another type. */
	int has_num[NUM_U64_FIELDS];
	const char *code;
	u32 code_len;
	int has_code; /* 1, or -1 when not a string */
	u32 nargs;
	const char *arg[MAX_ARGS];
	u32 arg_len[MAX_ARGS];
	int has_args; /* 1, or -1 when not an array of strings (or too long) */
};

static int jr_peek(struct jr *r)
{
	jr_ws(r);
	return r->p < r->end ? *r->p : -1;
}

/* A string array into req->arg; -1 for the wrong shape (skipped), 0 on malformed JSON. */
static int jr_args(struct jr *r, struct req *q)
{
	if (jr_peek(r) != '[')
		return jr_skip(r, 1) ? -1 : 0;
	r->p++;
	q->nargs = 0;
	if (jr_eat(r, ']'))
		return 1;
	int shape = 1;
	do {
		if (jr_peek(r) == '"' && q->nargs < MAX_ARGS) {
			if (!jr_string(r, 1, &q->arg[q->nargs], &q->arg_len[q->nargs]))
				return 0;
			q->nargs++;
		} else {
			shape = -1;
			if (!jr_skip(r, 2))
				return 0;
		}
	} while (jr_eat(r, ','));
	if (!jr_eat(r, ']'))
		return jr_fail(r, "expected , or ] in an array");
	return shape;
}

/* Parses a request object; returns an error message, or 0 when it parsed. */
static const char *parse_request(const u8 *json, u32 len, struct req *q)
{
	struct jr r = { json, json + len, 0 };
	memset(q, 0, sizeof(*q));
	arena_len = 0;
	if (!jr_eat(&r, '{'))
		return "the request is not a JSON object";
	if (!jr_eat(&r, '}')) {
		do {
			const char *key;
			u32 klen;
			int done = 0;
			if (!jr_string(&r, 1, &key, &klen) || !jr_eat(&r, ':'))
				return r.err ? r.err : "expected \"key\": value";
			if (str_is(key, klen, "op")) {
				if (jr_peek(&r) != '"')
					return "\"op\" must be a string";
				if (!jr_string(&r, 1, &q->op, &q->op_len))
					return r.err;
				q->has_op = 1;
				done = 1;
			} else if (str_is(key, klen, "code")) {
				if (jr_peek(&r) == '"') {
					if (!jr_string(&r, 1, &q->code, &q->code_len))
						return r.err;
					q->has_code = 1;
				} else {
					if (!jr_skip(&r, 1))
						return r.err;
					q->has_code = -1;
				}
				done = 1;
			} else if (str_is(key, klen, "args")) {
				int got = jr_args(&r, q);
				if (!got)
					return r.err;
				q->has_args = got;
				done = 1;
			}
			for (int i = 0; i < NUM_U64_FIELDS && !done; i++) {
				u64 m;
				int neg, is_int, big;
				if (!str_is(key, klen, u64_fields[i]))
					continue;
				done = 1;
				int c = jr_peek(&r);
				if (c == '-' || (c >= '0' && c <= '9')) {
					if (!jr_number(&r, &m, &neg, &is_int, &big))
						return r.err;
					if (is_int && !big && (!neg || m == 0)) {
						q->num[i] = m;
						q->has_num[i] = 1;
					} else {
						q->has_num[i] = -1;
					}
				} else {
					if (!jr_skip(&r, 1))
						return r.err;
					q->has_num[i] = -1;
				}
			}
			if (!done && !jr_skip(&r, 1))
				return r.err;
		} while (jr_eat(&r, ','));
		if (!jr_eat(&r, '}'))
			return "expected , or } in the request object";
	}
	jr_ws(&r);
	if (r.p != r.end)
		return "bytes after the request object";
	return 0;
}

/* ---- eval: 64-bit signed integer arithmetic ---- */

struct ev {
	const char *s;
	u32 n, i;
	const char *err;
	u32 err_at;
};

static i64 ev_expr(struct ev *e, int depth);

static void ev_ws(struct ev *e)
{
	while (e->i < e->n && (e->s[e->i] == ' ' || e->s[e->i] == '\t' || e->s[e->i] == '\n' ||
			       e->s[e->i] == '\r'))
		e->i++;
}

static i64 ev_fail(struct ev *e, const char *err)
{
	if (!e->err) {
		e->err = err;
		e->err_at = e->i;
	}
	return 0;
}

static int ev_peek(struct ev *e)
{
	ev_ws(e);
	return e->i < e->n ? (u8)e->s[e->i] : -1;
}

static i64 ev_unary(struct ev *e, int depth)
{
	int c;
	if (depth > 64)
		return ev_fail(e, "expression nested too deeply");
	c = ev_peek(e);
	if (c == '-' || c == '+') {
		e->i++;
		/* -9223372036854775808 is a literal too large for its own positive form. */
		if (c == '-' && ev_peek(e) >= '0' && ev_peek(e) <= '9') {
			u32 save = e->i;
			u64 v = 0;
			while (e->i < e->n && e->s[e->i] >= '0' && e->s[e->i] <= '9' &&
			       v <= (1UL << 63) / 10)
				v = v * 10 + (u64)(e->s[e->i++] - '0');
			int more = e->i < e->n && e->s[e->i] >= '0' && e->s[e->i] <= '9';
			if (v == (1UL << 63) && !more)
				return (i64)(1UL << 63);
			e->i = save;
		}
		i64 v = ev_unary(e, depth + 1);
		if (c == '+' || e->err)
			return v;
		i64 r;
		if (__builtin_sub_overflow((i64)0, v, &r))
			return ev_fail(e, "integer overflow");
		return r;
	}
	if (c == '(') {
		e->i++;
		i64 v = ev_expr(e, depth + 1);
		if (e->err)
			return 0;
		if (ev_peek(e) != ')')
			return ev_fail(e, "expected )");
		e->i++;
		return v;
	}
	if (c >= '0' && c <= '9') {
		u64 v = 0;
		while (e->i < e->n && e->s[e->i] >= '0' && e->s[e->i] <= '9') {
			u64 d = (u64)(e->s[e->i] - '0');
			if (v > (((1UL << 63) - 1) - d) / 10)
				return ev_fail(e, "integer literal out of the 64-bit signed range");
			v = v * 10 + d;
			e->i++;
		}
		return (i64)v;
	}
	if (c < 0)
		return ev_fail(e, "unexpected end of expression");
	return ev_fail(e, "unexpected character");
}

static i64 ev_term(struct ev *e, int depth)
{
	i64 v = ev_unary(e, depth);
	for (;;) {
		int c = ev_peek(e);
		if (e->err || (c != '*' && c != '/' && c != '%'))
			return v;
		e->i++;
		i64 w = ev_unary(e, depth), r;
		if (e->err)
			return 0;
		if (c == '*') {
			if (__builtin_mul_overflow(v, w, &r))
				return ev_fail(e, "integer overflow");
			v = r;
		} else {
			if (w == 0)
				return ev_fail(e, "division by zero");
			if (v == (i64)(1UL << 63) && w == -1)
				return ev_fail(e, "integer overflow");
			v = c == '/' ? v / w : v % w;
		}
	}
}

static i64 ev_expr(struct ev *e, int depth)
{
	i64 v = ev_term(e, depth);
	for (;;) {
		int c = ev_peek(e);
		if (e->err || (c != '+' && c != '-'))
			return v;
		e->i++;
		i64 w = ev_term(e, depth), r;
		if (e->err)
			return 0;
		if (c == '+' ? __builtin_add_overflow(v, w, &r) : __builtin_sub_overflow(v, w, &r))
			return ev_fail(e, "integer overflow");
		v = r;
	}
}

/* Evaluates s[0..n]; returns 0 and sets *out, or an error message (at *at). */
static const char *eval_arith(const char *s, u32 n, i64 *out, u32 *at)
{
	struct ev e = { s, n, 0, 0, 0 };
	if (ev_peek(&e) < 0) {
		*at = 0;
		return "empty expression";
	}
	i64 v = ev_expr(&e, 0);
	if (!e.err && ev_peek(&e) >= 0)
		ev_fail(&e, "unexpected character");
	if (e.err) {
		*at = e.err_at;
		return e.err;
	}
	*out = v;
	return 0;
}

/* ---- virtio-mmio (version 2) and virtio-vsock, polled ---- */

/* virtio-mmio registers (virtio 1.2, 4.2.2). */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_AVAIL_LOW 0x090
#define R_QUEUE_AVAIL_HIGH 0x094
#define R_QUEUE_USED_LOW 0x0a0
#define R_QUEUE_USED_HIGH 0x0a4
#define R_CONFIG 0x100

#define MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_ID_VSOCK 19
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64
#define S_FAILED 128
#define DESC_F_WRITE 2

/* virtio-vsock (virtio 1.2, 5.10). */
#define HOST_CID 2
#define TYPE_STREAM 1
#define VOP_REQUEST 1
#define VOP_RESPONSE 2
#define VOP_RST 3
#define VOP_SHUTDOWN 4
#define VOP_RW 5
#define VOP_CREDIT_UPDATE 6
#define VOP_CREDIT_REQUEST 7
#define SHUT_RCV 1
#define SHUT_SEND 2
#define EVENT_TRANSPORT_RESET 0
#define HDR_LEN 44

struct vsock_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_hdr) == HDR_LEN, "vsock header is 44 bytes");
_Static_assert(MAIN_STACK_SIZE == 65536, "_start hard-codes the stack size");

#define RXQ 0
#define TXQ 1
#define EVQ 2

struct vq {
	u64 addr;  /* descriptor table; avail at +VQ_AVAIL_OFFSET, used at +VQ_USED_OFFSET */
	u16 num;
	u16 avail_idx; /* next free slot in the available ring */
	u16 last_used; /* next used entry to look at */
};

#define DESC(q, i) ((q)->addr + 16 * (u64)(i))
#define AVAIL_IDX(q) VOL(u16, (q)->addr + VQ_AVAIL_OFFSET + 2)
#define AVAIL_RING(q, i) VOL(u16, (q)->addr + VQ_AVAIL_OFFSET + 4 + 2 * (u64)(i))
#define USED_IDX(q) VOL(u16, (q)->addr + VQ_USED_OFFSET + 2)
#define USED_ID(q, i) VOL(u32, (q)->addr + VQ_USED_OFFSET + 4 + 8 * (u64)(i))
#define USED_LEN(q, i) VOL(u32, (q)->addr + VQ_USED_OFFSET + 8 + 8 * (u64)(i))

static u64 vs_base;	/* the device's window; 0 without a device */
static int vs_up;	/* the driver is set up */
static u64 vs_cid;
static struct vq rxq, txq, evq;
static u16 tx_free[VSOCK_TX_NUM];
static u32 tx_nfree;
static u8 tx_busy[VSOCK_TX_NUM];
static int kick[3];

static inline u32 mmio_read(u64 off)
{
	return VOL(u32, vs_base + off);
}

static inline void mmio_write(u64 off, u32 v)
{
	VOL(u32, vs_base + off) = v;
}

/* Makes buffer (addr, len) descriptor `id` and offers it to the device. */
static void vq_post(struct vq *q, u16 id, u64 addr, u32 len, u16 flags)
{
	VOL(u64, DESC(q, id)) = addr;
	VOL(u32, DESC(q, id) + 8) = len;
	VOL(u16, DESC(q, id) + 12) = flags;
	VOL(u16, DESC(q, id) + 14) = 0;
	AVAIL_RING(q, q->avail_idx % q->num) = id;
	fence();
	q->avail_idx++;
	AVAIL_IDX(q) = q->avail_idx;
}

static int vq_setup(u32 index, struct vq *q, u64 addr, u16 num)
{
	memset((void *)addr, 0, 0x2000);
	q->addr = addr;
	q->num = num;
	q->avail_idx = 0;
	q->last_used = 0;
	mmio_write(R_QUEUE_SEL, index);
	if (mmio_read(R_QUEUE_READY) || mmio_read(R_QUEUE_NUM_MAX) < num)
		return 0;
	mmio_write(R_QUEUE_NUM, num);
	mmio_write(R_QUEUE_DESC_LOW, (u32)addr);
	mmio_write(R_QUEUE_DESC_HIGH, (u32)(addr >> 32));
	mmio_write(R_QUEUE_AVAIL_LOW, (u32)(addr + VQ_AVAIL_OFFSET));
	mmio_write(R_QUEUE_AVAIL_HIGH, (u32)((addr + VQ_AVAIL_OFFSET) >> 32));
	mmio_write(R_QUEUE_USED_LOW, (u32)(addr + VQ_USED_OFFSET));
	mmio_write(R_QUEUE_USED_HIGH, (u32)((addr + VQ_USED_OFFSET) >> 32));
	mmio_write(R_QUEUE_READY, 1);
	return mmio_read(R_QUEUE_READY) == 1;
}

/* Finds the vsock device and sets it up; leaves vs_up 0 when there is none or it refuses. */
static void vsock_init(void)
{
	for (u64 i = 0; i < VIRTIO_MMIO_COUNT; i++) {
		u64 base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_WINDOW;
		/* Windows are handed out from the first on: stop at the first empty one. */
		if (VOL(u32, base + R_MAGIC) != MMIO_MAGIC)
			break;
		if (VOL(u32, base + R_VERSION) == 2 && VOL(u32, base + R_DEVICE_ID) == VIRTIO_ID_VSOCK) {
			vs_base = base;
			break;
		}
	}
	if (!vs_base)
		return;
	mmio_write(R_STATUS, 0);
	mmio_write(R_STATUS, S_ACKNOWLEDGE);
	mmio_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	mmio_write(R_DEVICE_FEATURES_SEL, 1);
	if (!(mmio_read(R_DEVICE_FEATURES) & 1)) /* VIRTIO_F_VERSION_1 is bit 32 */
		goto fail;
	mmio_write(R_DRIVER_FEATURES_SEL, 0);
	mmio_write(R_DRIVER_FEATURES, 0);
	mmio_write(R_DRIVER_FEATURES_SEL, 1);
	mmio_write(R_DRIVER_FEATURES, 1);
	mmio_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(mmio_read(R_STATUS) & S_FEATURES_OK))
		goto fail;
	if (!vq_setup(RXQ, &rxq, VSOCK_RXQ_ADDR, VSOCK_RX_NUM) ||
	    !vq_setup(TXQ, &txq, VSOCK_TXQ_ADDR, VSOCK_TX_NUM) ||
	    !vq_setup(EVQ, &evq, VSOCK_EVQ_ADDR, VSOCK_EV_NUM))
		goto fail;
	vs_cid = mmio_read(R_CONFIG) | (u64)mmio_read(R_CONFIG + 4) << 32;
	for (u16 i = 0; i < VSOCK_RX_NUM; i++)
		vq_post(&rxq, i, VSOCK_RX_BUFS + i * VSOCK_BUF_SIZE, VSOCK_BUF_SIZE, DESC_F_WRITE);
	for (u16 i = 0; i < VSOCK_EV_NUM; i++)
		vq_post(&evq, i, VSOCK_EV_BUFS + 8 * i, 8, DESC_F_WRITE);
	for (u16 i = 0; i < VSOCK_TX_NUM; i++) {
		tx_free[i] = i;
		tx_busy[i] = 0;
	}
	tx_nfree = VSOCK_TX_NUM;
	mmio_write(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	if (mmio_read(R_STATUS) & (S_NEEDS_RESET | S_FAILED))
		goto fail;
	mmio_write(R_QUEUE_NOTIFY, RXQ);
	mmio_write(R_QUEUE_NOTIFY, EVQ);
	vs_up = 1;
	return;
fail:
	mmio_write(R_STATUS, mmio_read(R_STATUS) | S_FAILED);
}

/* Sends one packet if a transmit buffer is free; returns whether it did. */
static int tx_pkt(u32 src_port, u32 dst_port, u16 op, u32 flags, u32 fwd_cnt, const u8 *data,
		  u32 len);

/* ---- connections ---- */

#define NCONN 16
#define BUF_ALLOC 0x10000	/* what the guest advertises: it consumes bytes at once */
#define OUT_MAX (JSON_MAX + 1024)
#define MAX_PAYLOAD (VSOCK_BUF_SIZE - HDR_LEN)

enum { C_FREE, C_READING, C_DONE };

/* How a connection ends once answered. */
enum {
	CLOSE_WAIT,	/* SHUTDOWN(SEND), then the host closes: the default */
	CLOSE_SHUTDOWN, /* SHUTDOWN(RCV|SEND) right behind the last byte, as Linux's close() */
	CLOSE_RESET,	/* RST right behind the last byte */
};

/* `pattern`'s output: stdout frames of at most this many bytes. */
#define PATTERN_CHUNK 8192
/* `pattern` streams at most this many bytes. */
#define PATTERN_MAX (1UL << 32)

struct conn {
	u32 state;
	u32 port;	/* the host's port (our port is AGENT_PORT) */
	u64 born;	/* order of arrival, for eviction */
	u32 fwd_cnt, fwd_sent, tx_cnt, peer_buf, peer_fwd;
	u8 resp_due, credit_due, credit_asked, shut_sent, close_after, rst_due, close_mode;
	u64 pat_left, pat_off, pat_seed; /* `pattern` bytes still to generate */
	u8 hdr[8];
	u32 hdr_got, json_len, json_got, data_len;
	u64 data_left;
	u32 out_len, out_off;
	u8 in[JSON_MAX];
	u8 out[OUT_MAX];
};

static struct conn conns[NCONN];
static u64 conn_serial;

/* Resets for connections the guest has no slot for. */
#define NCTRL 32
static struct {
	u32 port_local, port_peer;
} ctrl[NCTRL];
static u32 ctrl_n;

static void queue_rst(u32 local, u32 peer)
{
	if (ctrl_n < NCTRL) {
		ctrl[ctrl_n].port_local = local;
		ctrl[ctrl_n].port_peer = peer;
		ctrl_n++;
	}
}

static struct conn *conn_find(u32 peer_port, u32 local_port)
{
	if (local_port != AGENT_PORT)
		return 0;
	for (int i = 0; i < NCONN; i++)
		if (conns[i].state != C_FREE && conns[i].port == peer_port)
			return &conns[i];
	return 0;
}

static struct conn *conn_alloc(void)
{
	struct conn *oldest_done = 0;
	for (int i = 0; i < NCONN; i++) {
		if (conns[i].state == C_FREE)
			return &conns[i];
		if (conns[i].state == C_DONE && conns[i].out_off == conns[i].out_len &&
		    !conns[i].pat_left && (!oldest_done || conns[i].born < oldest_done->born))
			oldest_done = &conns[i];
	}
	/* Full: reuse the oldest answered connection whose host has not closed it. */
	if (oldest_done) {
		queue_rst(AGENT_PORT, oldest_done->port);
		oldest_done->state = C_FREE;
	}
	return oldest_done;
}

/* Appends one agent frame to the connection's output; false when it does not fit. */
static int put_frame(struct conn *c, const char *json, u32 jlen, const char *data, u32 dlen)
{
	u32 need = 8 + jlen + dlen;
	if (jlen > OUT_MAX || dlen > OUT_MAX || need > OUT_MAX - c->out_len)
		return 0;
	u8 *p = c->out + c->out_len;
	for (int i = 0; i < 4; i++) {
		p[i] = (u8)(jlen >> (8 * i));
		p[4 + i] = (u8)(dlen >> (8 * i));
	}
	memcpy(p + 8, json, jlen);
	memcpy(p + 8 + jlen, data, dlen);
	c->out_len += need;
	return 1;
}

static char jbuf[1024];

static void put_json(struct conn *c, struct jw *w, const char *data, u32 dlen)
{
	if (w->overflow || !put_frame(c, w->buf, w->len, data, dlen)) {
		static const char e[] = "{\"kind\":\"error\",\"code\":\"internal\","
					"\"message\":\"the answer does not fit the guest's buffer\"}";
		put_frame(c, e, sizeof(e) - 1, "", 0);
	}
}

static void put_error(struct conn *c, const char *code, const char *msg, const char *detail, u32 dlen)
{
	struct jw w = { jbuf, 0, sizeof(jbuf), 0 };
	char m[768];
	struct jw mw = { m, 0, sizeof(m), 0 };
	jw_raw(&mw, msg);
	if (detail) {
		jw_bytes(&mw, detail, MIN(dlen, 600u));
		if (dlen > 600)
			jw_raw(&mw, "...");
	}
	if (mw.overflow)
		mw.len = sizeof(m);
	jw_raw(&w, "{");
	jw_key(&w, "kind");
	jw_raw(&w, "\"error\"");
	jw_key(&w, "code");
	jw_cstr(&w, code);
	jw_key(&w, "message");
	jw_str(&w, m, mw.len);
	jw_raw(&w, "}");
	put_json(c, &w, "", 0);
}

static void put_exit(struct conn *c, u32 code)
{
	struct jw w = { jbuf, 0, sizeof(jbuf), 0 };
	jw_raw(&w, "{\"kind\":\"exit\",\"code\":");
	jw_u64(&w, code);
	jw_raw(&w, ",\"signal\":null,\"timed_out\":false,\"duration_ms\":0}");
	put_json(c, &w, "", 0);
}

static const char can_do[] =
	"; the built-in guest answers ping, eval (integer arithmetic), exec (echo, true, false, pattern), "
	"identity, fill, verify, counter_start, counter_read, counter_stop, stamp_start, "
	"stamp_verify and stamp_stop";

/* A decimal u64 that is the whole of (s, n). */
static int parse_dec(const char *s, u32 n, u64 *out)
{
	u64 v = 0;
	if (!n || n > 20)
		return 0;
	for (u32 i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		u64 d = (u64)(s[i] - '0');
		if (v > (~0UL - d) / 10)
			return 0;
		v = v * 10 + d;
	}
	*out = v;
	return 1;
}

/*
 * `pattern BYTES SEED [wait|shutdown|reset]`: BYTES bytes of a seeded
 * pattern on stdout (byte i is byte i%8, little-endian, of
 * pattern_word(SEED, 0, i & ~7)), generated as the host takes them, then
 * the exit frame, then the connection ends as the third argument says.
 * The host tests stream tens of MiB through the vsock device with it.
 */
static void do_pattern(struct conn *c, struct req *q)
{
	static const char usage[] = "usage: pattern BYTES SEED [wait|shutdown|reset] (BYTES at most 2^32)\n";
	static const char se[] = "{\"kind\":\"stderr\"}";
	u64 bytes, seed;
	u8 mode = CLOSE_WAIT;
	int ok = q->nargs >= 3 && q->nargs <= 4 && parse_dec(q->arg[1], q->arg_len[1], &bytes) &&
		 parse_dec(q->arg[2], q->arg_len[2], &seed) && bytes <= PATTERN_MAX;
	if (ok && q->nargs == 4) {
		if (str_is(q->arg[3], q->arg_len[3], "shutdown"))
			mode = CLOSE_SHUTDOWN;
		else if (str_is(q->arg[3], q->arg_len[3], "reset"))
			mode = CLOSE_RESET;
		else if (!str_is(q->arg[3], q->arg_len[3], "wait"))
			ok = 0;
	}
	if (!ok) {
		put_frame(c, se, sizeof(se) - 1, usage, sizeof(usage) - 1);
		put_exit(c, 2);
		return;
	}
	c->close_mode = mode;
	c->pat_seed = seed;
	c->pat_off = 0;
	c->pat_left = bytes;
	if (!bytes)
		put_exit(c, 0);
}

/* The next piece of a `pattern` answer into the (sent) output buffer; 0 when there is none. */
static int pattern_refill(struct conn *c)
{
	static const char so[] = "{\"kind\":\"stdout\"}";
	static u8 chunk[PATTERN_CHUNK];
	if (!c->pat_left)
		return 0;
	u32 n = (u32)MIN(c->pat_left, (u64)PATTERN_CHUNK);
	for (u32 i = 0; i < n; i++) {
		u64 o = c->pat_off + i;
		chunk[i] = (u8)(pattern_word(c->pat_seed, 0, o & ~7UL) >> (8 * (o & 7)));
	}
	c->out_off = c->out_len = 0;
	put_frame(c, so, sizeof(so) - 1, (const char *)chunk, n);
	c->pat_off += n;
	c->pat_left -= n;
	if (!c->pat_left)
		put_exit(c, 0);
	return 1;
}

static void do_exec(struct conn *c, struct req *q)
{
	static char out[JSON_MAX + 2];
	struct jw w = { out, 0, sizeof(out), 0 };
	if (q->has_args != 1 || q->nargs == 0) {
		put_error(c, "bad_request", "exec needs \"args\": a non-empty array of strings", 0, 0);
		return;
	}
	const char *prog = q->arg[0];
	u32 plen = q->arg_len[0];
	if (str_is(prog, plen, "echo")) {
		u32 first = 1;
		int newline = 1;
		if (q->nargs > 1 && str_is(q->arg[1], q->arg_len[1], "-n")) {
			newline = 0;
			first = 2;
		}
		for (u32 i = first; i < q->nargs; i++) {
			if (i > first)
				jw_raw(&w, " ");
			jw_bytes(&w, q->arg[i], q->arg_len[i]);
		}
		if (newline)
			jw_raw(&w, "\n");
		if (w.len) {
			static const char so[] = "{\"kind\":\"stdout\"}";
			if (w.overflow || !put_frame(c, so, sizeof(so) - 1, out, w.len)) {
				put_error(c, "too_large", "echo output does not fit the guest's buffer", 0, 0);
				return;
			}
		}
		put_exit(c, 0);
	} else if (str_is(prog, plen, "pattern")) {
		do_pattern(c, q);
	} else if (str_is(prog, plen, "true")) {
		put_exit(c, 0);
	} else if (str_is(prog, plen, "false")) {
		put_exit(c, 1);
	} else {
		static const char se[] = "{\"kind\":\"stderr\"}";
		jw_raw(&w, "command not found: ");
		jw_bytes(&w, prog, MIN(plen, 256u));
		jw_raw(&w, " (the built-in guest runs only echo, true, false, pattern)\n");
		put_frame(c, se, sizeof(se) - 1, out, w.len);
		put_exit(c, 127);
	}
}

static void do_eval(struct conn *c, struct req *q)
{
	struct jw w = { jbuf, 0, sizeof(jbuf), 0 };
	i64 v = 0;
	u32 at = 0;
	const char *err;
	if (q->has_code != 1) {
		put_error(c, "bad_request", "eval needs \"code\": a string", 0, 0);
		return;
	}
	err = eval_arith(q->code, q->code_len, &v, &at);
	jw_raw(&w, "{\"kind\":\"eval\",\"result\":");
	if (err) {
		char m[256];
		struct jw mw = { m, 0, sizeof(m), 0 };
		jw_raw(&mw, err);
		jw_raw(&mw, " at offset ");
		jw_u64(&mw, at);
		jw_raw(&mw, " (the built-in guest evaluates integer arithmetic only: + - * / % "
			    "and parentheses on 64-bit signed integers)");
		if (mw.overflow)
			mw.len = sizeof(m);
		jw_raw(&w, "null,\"error\":");
		jw_str(&w, m, mw.len);
		jw_raw(&w, ",\"exit_code\":1");
	} else {
		char num[24];
		struct jw nw = { num, 0, sizeof(num), 0 };
		jw_i64(&nw, v);
		jw_str(&w, num, nw.len);
		jw_raw(&w, ",\"error\":null,\"exit_code\":0");
	}
	jw_raw(&w, ",\"stdout\":\"\",\"stderr\":\"\"}");
	put_json(c, &w, "", 0);
}

static void do_ping(struct conn *c)
{
	struct jw w = { jbuf, 0, sizeof(jbuf), 0 };
	jw_raw(&w, "{\"kind\":\"pong\",\"version\":");
	jw_cstr(&w, GUEST_VERSION);
	jw_raw(&w, ",\"protocol\":1,\"interpreter_ready\":false,\"guest\":\"guest: builtin\",\"vcpus\":");
	jw_u64(&w, INFO(INFO_NUM_VCPUS));
	jw_raw(&w, "}");
	put_json(c, &w, "", 0);
}

/* The memory operations of proto::guest, answered in GuestResponse's shape. */
static const struct {
	const char *name;
	u32 op;
} guest_ops[] = {
	{ "identity", OP_IDENTITY },
	{ "fill", OP_FILL },
	{ "verify", OP_VERIFY },
	{ "counter_start", OP_COUNTER_START },
	{ "counter_read", OP_COUNTER_READ },
	{ "counter_stop", OP_COUNTER_STOP },
	{ "stamp_start", OP_STAMP_START },
	{ "stamp_verify", OP_STAMP_VERIFY },
	{ "stamp_stop", OP_STAMP_STOP },
};

static void do_guest_op(struct conn *c, struct req *q, u32 op)
{
	struct jw w = { jbuf, 0, sizeof(jbuf), 0 };
	struct op_result res;
	u64 a[MB_NUM_ARGS] = { 0, 0, 0, 0 };
	int need_seed = op == OP_FILL || op == OP_VERIFY;
	int need_mib = need_seed || op == OP_STAMP_START;

	for (int i = 0; i < NUM_U64_FIELDS; i++) {
		int needed = (need_seed && (i == F_SEED || i == F_SEQ)) || (need_mib && i == F_MIB);
		int used = needed || (need_mib && i == F_OFFSET_MIB);
		if ((needed && q->has_num[i] != 1) || (used && q->has_num[i] == -1)) {
			put_error(c, "bad_request", "this op needs a non-negative integer field: ",
				  u64_fields[i], cstrlen(u64_fields[i]));
			return;
		}
	}
	if (need_seed) {
		a[0] = q->num[F_SEED];
		a[1] = q->num[F_SEQ];
	}
	a[2] = q->num[F_MIB];
	a[3] = q->num[F_OFFSET_MIB];
	run_op(op, a, &res);
	if (res.status != STATUS_OK) {
		put_error(c, "too_large", res.text, 0, 0);
		return;
	}
	jw_raw(&w, "{");
	switch (op) {
	case OP_IDENTITY:
		jw_raw(&w, "\"kind\":\"identity\",\"boot_id\":");
		jw_u64(&w, res.r[0]);
		jw_raw(&w, ",\"generation\":");
		jw_u64(&w, res.r[1]);
		break;
	case OP_FILL:
		jw_raw(&w, "\"kind\":\"filled\",\"bytes\":");
		jw_u64(&w, res.r[0]);
		break;
	case OP_VERIFY:
		jw_raw(&w, "\"kind\":\"verified\",\"bad_words\":");
		jw_u64(&w, res.r[0]);
		jw_raw(&w, ",\"first_bad_addr\":");
		if (res.r[2])
			jw_u64(&w, res.r[1]);
		else
			jw_raw(&w, "null");
		break;
	case OP_STAMP_START:
	case OP_STAMP_VERIFY:
	case OP_STAMP_STOP:
		/* The same fields the mailbox path decodes (channel.rs). */
		jw_raw(&w, "\"kind\":\"stamp\",\"bad_pages\":");
		jw_u64(&w, op == OP_STAMP_VERIFY ? res.r[0] : 0);
		jw_raw(&w, ",\"pass\":");
		jw_u64(&w, res.r[1]);
		jw_raw(&w, ",\"cursor\":");
		jw_u64(&w, op == OP_STAMP_START ? 0 : res.r[2]);
		jw_raw(&w, ",\"pages\":");
		jw_u64(&w, op == OP_STAMP_START ? res.r[0] : 0);
		break;
	default:
		jw_raw(&w, "\"kind\":\"counter\",\"value\":");
		jw_u64(&w, res.r[0]);
	}
	jw_raw(&w, "}");
	put_json(c, &w, "", 0);
}

/* A complete request frame is in c->in: answer it. */
static void handle_request(struct conn *c)
{
	static struct req q;
	const char *err = parse_request(c->in, c->json_len, &q);
	if (err) {
		put_error(c, "bad_request", "malformed request JSON: ", err, cstrlen(err));
		return;
	}
	if (!q.has_op) {
		put_error(c, "bad_request", "the request has no \"op\" field", 0, 0);
		return;
	}
	if (str_is(q.op, q.op_len, "ping")) {
		do_ping(c);
		return;
	}
	if (str_is(q.op, q.op_len, "eval")) {
		do_eval(c, &q);
		return;
	}
	if (str_is(q.op, q.op_len, "exec")) {
		do_exec(c, &q);
		return;
	}
	for (u32 i = 0; i < sizeof(guest_ops) / sizeof(guest_ops[0]); i++) {
		if (str_is(q.op, q.op_len, guest_ops[i].name)) {
			do_guest_op(c, &q, guest_ops[i].op);
			return;
		}
	}
	{
		char m[512];
		struct jw mw = { m, 0, sizeof(m) - 200, 0 };
		jw_raw(&mw, "op ");
		jw_str(&mw, q.op, MIN(q.op_len, 64u));
		jw_raw(&mw, " is not supported by the built-in guest");
		mw.cap = sizeof(m);
		jw_raw(&mw, can_do);
		put_error(c, "unsupported", "", m, mw.overflow ? sizeof(m) : mw.len);
	}
}

/* Connection bytes from the host: the one request frame, then nothing. */
static void conn_consume(struct conn *c, const u8 *p, u32 n)
{
	while (n && c->state == C_READING) {
		u32 take;
		if (c->hdr_got < 8) {
			take = MIN(8 - c->hdr_got, n);
			memcpy(c->hdr + c->hdr_got, p, take);
			c->hdr_got += take;
			if (c->hdr_got == 8) {
				c->json_len = c->hdr[0] | c->hdr[1] << 8 | c->hdr[2] << 16 | (u32)c->hdr[3] << 24;
				c->data_len = c->hdr[4] | c->hdr[5] << 8 | c->hdr[6] << 16 | (u32)c->hdr[7] << 24;
				c->data_left = c->data_len;
				if ((u64)c->json_len + c->data_len > AGENT_MAX_FRAME) {
					put_error(c, "too_large", "the frame exceeds the 1 MiB limit of the protocol", 0, 0);
					c->state = C_DONE;
				} else if (c->json_len < 2) {
					put_error(c, "bad_request", "a frame needs a JSON object of at least 2 bytes", 0, 0);
					c->state = C_DONE;
				} else if (c->json_len > JSON_MAX) {
					put_error(c, "too_large", "the built-in guest takes requests with at most 8192 bytes of JSON", 0, 0);
					c->state = C_DONE;
				}
			}
		} else if (c->json_got < c->json_len) {
			take = MIN(c->json_len - c->json_got, n);
			memcpy(c->in + c->json_got, p, take);
			c->json_got += take;
		} else {
			/* The binary part (exec's stdin) is not used: skipped. */
			take = (u32)MIN(c->data_left, (u64)n);
			c->data_left -= take;
		}
		p += take;
		n -= take;
		if (c->state == C_READING && c->hdr_got == 8 && c->json_got == c->json_len && !c->data_left) {
			handle_request(c);
			c->state = C_DONE;
		}
	}
}

static void conn_free(struct conn *c)
{
	c->state = C_FREE;
}

/* Sends what a connection owes the host, as far as buffers and credit allow. */
static void conn_flush(struct conn *c)
{
	if (c->state == C_FREE)
		return;
	if (c->resp_due) {
		if (!tx_pkt(AGENT_PORT, c->port, VOP_RESPONSE, 0, c->fwd_cnt, 0, 0))
			return;
		c->resp_due = 0;
	}
	if (c->rst_due) {
		if (tx_pkt(AGENT_PORT, c->port, VOP_RST, 0, c->fwd_cnt, 0, 0))
			conn_free(c);
		return;
	}
	do {
		while (c->out_off < c->out_len) {
			u32 in_flight = c->tx_cnt - c->peer_fwd;
			u32 credit = c->peer_buf > in_flight ? c->peer_buf - in_flight : 0;
			u32 n = MIN(MIN(c->out_len - c->out_off, (u32)MAX_PAYLOAD), credit);
			if (!n) {
				if (!c->credit_asked &&
				    tx_pkt(AGENT_PORT, c->port, VOP_CREDIT_REQUEST, 0, c->fwd_cnt, 0, 0))
					c->credit_asked = 1;
				return;
			}
			if (!tx_pkt(AGENT_PORT, c->port, VOP_RW, 0, c->fwd_cnt, c->out + c->out_off, n))
				return;
			c->out_off += n;
			c->tx_cnt += n;
			c->fwd_sent = c->fwd_cnt;
		}
	} while (pattern_refill(c));
	if (c->credit_due) {
		if (!tx_pkt(AGENT_PORT, c->port, VOP_CREDIT_UPDATE, 0, c->fwd_cnt, 0, 0))
			return;
		c->credit_due = 0;
		c->fwd_sent = c->fwd_cnt;
	}
	if (c->state == C_DONE && !c->shut_sent) {
		if (c->close_after || c->close_mode == CLOSE_RESET) {
			c->rst_due = 1;
			conn_flush(c);
			return;
		}
		/*
		 * Answered: we send no more; the host closes (or, both ways shut,
		 * resets), then the slot is freed.
		 */
		u32 how = c->close_mode == CLOSE_SHUTDOWN ? SHUT_RCV | SHUT_SEND : SHUT_SEND;
		if (tx_pkt(AGENT_PORT, c->port, VOP_SHUTDOWN, how, c->fwd_cnt, 0, 0))
			c->shut_sent = 1;
	}
}

static int tx_pkt(u32 src_port, u32 dst_port, u16 op, u32 flags, u32 fwd_cnt, const u8 *data,
		  u32 len)
{
	struct vsock_hdr h;
	if (!tx_nfree || len > MAX_PAYLOAD)
		return 0;
	u16 id = tx_free[--tx_nfree];
	u64 buf = VSOCK_TX_BUFS + (u64)id * VSOCK_BUF_SIZE;
	tx_busy[id] = 1;
	h.src_cid = vs_cid;
	h.dst_cid = HOST_CID;
	h.src_port = src_port;
	h.dst_port = dst_port;
	h.len = len;
	h.type = TYPE_STREAM;
	h.op = op;
	h.flags = flags;
	h.buf_alloc = BUF_ALLOC;
	h.fwd_cnt = fwd_cnt;
	memcpy((void *)buf, &h, HDR_LEN);
	if (len)
		memcpy((void *)(buf + HDR_LEN), data, len);
	vq_post(&txq, id, buf, HDR_LEN + len, 0);
	kick[TXQ] = 1;
	return 1;
}

/* One packet from the device. */
static void rx_packet(const struct vsock_hdr *h, const u8 *payload, u32 plen)
{
	struct conn *c;
	if (h->src_cid != HOST_CID || h->dst_cid != vs_cid)
		return;
	if (h->type != TYPE_STREAM) {
		if (h->op != VOP_RST)
			queue_rst(h->dst_port, h->src_port);
		return;
	}
	c = conn_find(h->src_port, h->dst_port);
	if (h->op == VOP_REQUEST) {
		if (h->dst_port != AGENT_PORT) {
			queue_rst(h->dst_port, h->src_port);
			return;
		}
		/* The same ports again: the old connection is gone on the host side. */
		if (c)
			conn_free(c);
		c = conn_alloc();
		if (!c) {
			queue_rst(h->dst_port, h->src_port);
			return;
		}
		memset(c, 0, (u64)((u8 *)&c->in - (u8 *)c));
		c->state = C_READING;
		c->port = h->src_port;
		c->born = ++conn_serial;
		c->resp_due = 1;
	}
	if (!c) {
		if (h->op != VOP_RST)
			queue_rst(h->dst_port, h->src_port);
		return;
	}
	c->peer_buf = h->buf_alloc;
	c->peer_fwd = h->fwd_cnt;
	c->credit_asked = 0;
	switch (h->op) {
	case VOP_REQUEST:
	case VOP_CREDIT_UPDATE:
		break;
	case VOP_RW:
		c->fwd_cnt += plen;
		conn_consume(c, payload, plen);
		if (c->fwd_cnt - c->fwd_sent >= BUF_ALLOC / 4)
			c->credit_due = 1;
		break;
	case VOP_CREDIT_REQUEST:
		c->credit_due = 1;
		break;
	case VOP_SHUTDOWN:
		/* The host went away (or half-closed): finish the answer, then reset. */
		if (c->state == C_DONE && (c->out_off < c->out_len || c->pat_left))
			c->close_after = 1;
		else
			c->rst_due = 1;
		break;
	case VOP_RST:
		conn_free(c);
		break;
	default:
		c->rst_due = 1;
	}
}

static int vsock_pending(void)
{
	return vs_up && (USED_IDX(&rxq) != rxq.last_used || USED_IDX(&evq) != evq.last_used ||
			 USED_IDX(&txq) != txq.last_used);
}

/* Everything the device has handed back, and everything we owe it. */
static void vsock_poll(void)
{
	u16 idx;
	if (!vs_up)
		return;
	/* Events first: a transport reset (after a restore) voids every connection. */
	idx = USED_IDX(&evq);
	fence();
	while (evq.last_used != idx) {
		u32 id = USED_ID(&evq, evq.last_used % evq.num);
		u32 len = USED_LEN(&evq, evq.last_used % evq.num);
		evq.last_used++;
		if (id >= VSOCK_EV_NUM)
			continue;
		if (len >= 4 && VOL(u32, VSOCK_EV_BUFS + 8 * id) == EVENT_TRANSPORT_RESET) {
			for (int i = 0; i < NCONN; i++)
				conn_free(&conns[i]);
			ctrl_n = 0;
		}
		vq_post(&evq, (u16)id, VSOCK_EV_BUFS + 8 * id, 8, DESC_F_WRITE);
		kick[EVQ] = 1;
	}
	/* Transmit buffers the device is done with. */
	idx = USED_IDX(&txq);
	fence();
	while (txq.last_used != idx) {
		u32 id = USED_ID(&txq, txq.last_used % txq.num);
		txq.last_used++;
		if (id < VSOCK_TX_NUM && tx_busy[id] && tx_nfree < VSOCK_TX_NUM) {
			tx_busy[id] = 0;
			tx_free[tx_nfree++] = (u16)id;
		}
	}
	/* Received packets; each buffer goes straight back to the device. */
	idx = USED_IDX(&rxq);
	fence();
	while (rxq.last_used != idx) {
		u32 id = USED_ID(&rxq, rxq.last_used % rxq.num);
		u32 len = USED_LEN(&rxq, rxq.last_used % rxq.num);
		rxq.last_used++;
		if (id >= VSOCK_RX_NUM)
			continue;
		u64 buf = VSOCK_RX_BUFS + (u64)id * VSOCK_BUF_SIZE;
		if (len >= HDR_LEN && len <= VSOCK_BUF_SIZE) {
			struct vsock_hdr h;
			memcpy(&h, (const void *)buf, HDR_LEN);
			u32 plen = h.op == VOP_RW ? MIN(h.len, len - HDR_LEN) : 0;
			rx_packet(&h, (const u8 *)(buf + HDR_LEN), plen);
		}
		vq_post(&rxq, (u16)id, buf, VSOCK_BUF_SIZE, DESC_F_WRITE);
		kick[RXQ] = 1;
	}
	/* What we owe: resets first, then each connection. */
	while (ctrl_n && tx_pkt(ctrl[ctrl_n - 1].port_local, ctrl[ctrl_n - 1].port_peer, VOP_RST, 0,
				0, 0, 0))
		ctrl_n--;
	for (int i = 0; i < NCONN; i++)
		conn_flush(&conns[i]);
	for (u32 q = 0; q < 3; q++) {
		if (kick[q]) {
			kick[q] = 0;
			mmio_write(R_QUEUE_NOTIFY, q);
		}
	}
}

/* The VMM relayed the device's interrupt: acknowledge it. */
static void vsock_ack(void)
{
	if (!vs_up)
		return;
	u32 status = mmio_read(R_INTERRUPT_STATUS);
	if (status)
		mmio_write(R_INTERRUPT_ACK, status);
}

/* ---- the main loop ---- */

__attribute__((noreturn, used)) void guest_main(u64 vcpu)
{
	if (vcpu != 0) {
		for (;;)
			port_in(PORT_PARK);
	}
	if (INFO(INFO_MAGIC) != INFO_MAGIC_VALUE) {
		for (;;)
			port_out(PORT_PANIC, PANIC_BAD_INFO);
	}
	vsock_init();
	for (;;) {
		if (MB32(MB_DOORBELL)) {
			serve_mailbox();
		} else if (vsock_pending()) {
			vsock_poll();
		} else if (counter_running || stamp_running) {
			/* Natively this spins at about a nanosecond an iteration. */
			if (counter_running)
				INFO(INFO_COUNTER)++;
			if (stamp_running)
				stamp_one();
		} else if (port_in(PORT_WAIT) & WAKE_DEVICE) {
			vsock_ack();
			vsock_poll();
		}
	}
}
