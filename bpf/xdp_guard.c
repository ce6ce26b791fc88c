/* xdp_guard.c: drop, on the underlay, what cannot be WireGuard for us.
 *
 * XDP, on the underlay device (native where the driver has XDP, generic
 * otherwise). A Python data plane handles far fewer packets a second than a
 * NIC delivers, so junk aimed at the listen port must die here, before the
 * kernel builds a socket buffer, wakes a socket and a Python process for it.
 *
 * What it judges: UDP datagrams to wgx_config.port, over IPv4 or IPv6
 * (extension headers walked, up to WGX_IPV6_EXT_MAX). Everything else
 * passes untouched: other ports, other protocols, non-IP frames, VLAN-tagged
 * frames (they belong to a VLAN device, not to a socket bound to this one).
 *
 * First, with WGX_CFG_LOCAL_ONLY: is the datagram for this host? When the
 * device forwards, the FIB is asked as the kernel will ask it, and what it
 * would route on to another host passes (FORWARDED): a router running
 * wgebpf must not filter its neighbours' WireGuard on the same port.
 *
 * Checks on a datagram to the port, cheapest first; the first that fails
 * drops it and counts why (xdp_guard.h, WGX_CNT_*):
 *   1. UDP length equals the IP payload length (a lying length would make
 *      the kernel trim or drop it anyway)                     BAD_LENGTH
 *   2. a message header (type + index, 8 bytes) is there      SHORT
 *   3. the first 4 bytes, little-endian, are a known type: the reserved
 *      bytes must be zero                                     BAD_TYPE
 *   4. the length fits the type: initiation 148, response 92, cookie reply
 *      64, data at least 32                                   BAD_LENGTH
 *   5. response, cookie reply and data name a receiver index of ours
 *      (wgx_index: handshakes under way and keypairs)         UNKNOWN_INDEX
 *   6. initiation and response: mac1 is right for our public key, when the
 *      loader gave us the key (WGX_CFG_MAC1)                  BAD_MAC1
 *      Before anything is counted as load or spent from a bucket: only a
 *      sender who knows our public key gets that far.
 *   7. only while under load, initiation and response: the source prefix
 *      (/32, /64) has a token in its bucket (wgx_sources)     RATE_LIMITED
 *      A message with a right mac2 (checked here, with the control plane's
 *      cookie secret) spends the "proven" bucket, any other the second
 *      one. A right mac2 proves the sender received our cookie at that
 *      address and port, so someone forging a real peer's address can
 *      spend only the second bucket, and never while there is no load.
 *      That is the rule of the kernel's WireGuard and wireguard-go: rate
 *      limit per source only under load, and only messages with mac2.
 * Initiations and responses that pass 6 are also counted into wgx_load's
 * one-second window, which tells the control plane it is under load (and
 * must demand cookies); rate-limited ones count too, they are the flood.

 * Fragments of datagrams to the port. An IPv4 first fragment (or an IPv6
 * one, offset 0) carries the UDP header, whose length field states the
 * whole datagram's length: it gets every check above with that length,
 * except that a handshake message must not be fragmented at all (148 bytes
 * or less; nobody fragments that legitimately, and mac1 could not be
 * checked): BAD_LENGTH. Later fragments carry no UDP header, so the port is
 * unknown: they pass (WGX_CNT_FRAGMENT). That is no way around the guard:
 * without its first fragment, reassembly never completes and the kernel
 * drops the rest after ipfrag_time, in the kernel, not in Python.
 *
 * What cannot be parsed. Before the port is known (IPv4 header with ihl < 5,
 * UDP header cut off) we cannot tell it is ours, so it passes: the kernel
 * drops the malformed ones itself. An IPv6 extension chain longer than we
 * walk (WGX_IPV6_EXT_MAX) hides the port of a well-formed packet the
 * kernel would deliver, so it would be a way around every check: to this
 * host it is dropped (EXT_CHAIN); one the host routes on passes
 * (UNPARSED). Real traffic does not carry such chains (RFC 9098 reports
 * them widely dropped on the Internet). Once the port is known to be
 * ours, whatever fails to parse is junk and is dropped.
 *
 * Return value:
 *   XDP_PASS  not ours (OTHER), a later fragment (FRAGMENT), an extension
 *             chain too long to walk but routed on (UNPARSED), routed
 *             through this host
 *             (FORWARDED), or a datagram that passed every check (PASSED):
 *             the kernel's receive path takes it on
 *   XDP_DROP  a datagram to the port that failed a check, or a packet to
 *             this host behind too long an extension chain (EXT_CHAIN); counted under the
 *             first reason it failed
 * Every packet is counted under exactly one verdict in wgx_counters.
 *
 * Not checked here: UDP checksums (the kernel checks them before the socket
 * sees the datagram) and anything needing a session key.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

#include "xdp_guard.h"

BPF_TABLE("array", u32, struct wgx_config, wgx_config, 1);
BPF_HASH(wgx_index, u32, u32, WGX_INDEX_MAX);
BPF_TABLE("lru_hash", struct wgx_source_key, struct wgx_bucket, wgx_sources, WGX_SOURCES_MAX);
BPF_TABLE("array", u32, struct wgx_load, wgx_load, 1);
BPF_TABLE("percpu_array", u32, u64, wgx_counters, WGX_CNT_MAX);

/* The BLAKE2s compressions one handshake message may need, in order
 * (see plan_macs): mac1 (2 or 1), then under load the source's cookie (1)
 * and mac2 (key block + 3 or 2). */
#define WGX_STEPS_MAX	8

enum step_start {
	STEP_CONTINUE = 0,	/* go on from the previous step's state */
	STEP_MAC1,		/* start from wgx_config.mac1_h (key block done) */
	STEP_COOKIE,		/* start from wgx_config.cookie_h (key block done) */
	STEP_MAC2,		/* a fresh 16-byte-key MAC: its block is the cookie */
};

enum step_end {
	STEP_MORE = 0,
	STEP_CHECK_MAC1,	/* compare with the message's mac1; stop if wrong */
	STEP_SAVE_COOKIE,	/* the state is the source's cookie: keep it */
	STEP_CHECK_MAC2,	/* compare with the message's mac2 */
};

struct hash_step {
	u32 t;			/* bytes hashed after this block, key block included */
	u8 start;		/* enum step_start */
	u8 end;			/* enum step_end */
	u8 last;		/* the final block of its hash */
	u8 pad;
};

/* Off the stack, which the unrolled BLAKE2s rounds nearly fill with
 * spilled state: the blocks to hash, the FIB lookup's arguments.
 * Internal to this program. */
struct scratch {
	u32 blocks[WGX_STEPS_MAX][16];
	struct hash_step steps[WGX_STEPS_MAX];
	u32 starts[4][8];	/* by enum step_start: states a hash starts from */
	u32 macs[2][4];		/* the message's mac1 and mac2 */
	u32 cookie[4];
	u32 right;		/* WGX_MAC*_RIGHT: what run_steps found right */
	u32 nsteps;		/* how many steps plan_macs planned */
	u32 loaded;		/* under load when the message came */
	u64 now;
	struct wgx_source_key src;
	struct bpf_fib_lookup fib;
};
BPF_TABLE("percpu_array", u32, struct scratch, wgx_scratch, 1);
/* Tail calls: [WGX_JUMP_MACS] = wgx_macs, filled in by the loader. */
BPF_PROG_ARRAY(wgx_jump, 1);
#define WGX_JUMP_MACS	0

#define WGX_NSEC_PER_SEC 1000000000ULL
#define WGX_AF_INET	2
#define WGX_AF_INET6	10
#define IP_MF		0x2000
#define IP_OFFSET	0x1fff
#define NEXTHDR_HOP	0
#define NEXTHDR_ROUTING	43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH	51
#define NEXTHDR_DEST	60

static __always_inline int count(u32 index)
{
	u64 *n = wgx_counters.lookup(&index);

	if (n)
		*n += 1;	/* per-CPU: no other writer */
	return 0;
}

static __always_inline int verdict(u32 reason)
{
	count(reason);
	return reason <= WGX_CNT_LAST_PASS ? XDP_PASS : XDP_DROP;
}

/* WireGuard's fields are little-endian on the wire; BPF loads are in the
 * host's order. */
static __always_inline u32 le32(u32 v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	return __builtin_bswap32(v);
#else
	return v;
#endif
}

/* ---- BLAKE2s, just enough for mac1 ---------------------------------------
 * mac1 = BLAKE2s-128 keyed with HASH("mac1----" || our public key) over the
 * message up to mac1. The loader compresses the key block once and hands
 * us the state (wgx_config.mac1_h); here only the message blocks remain:
 * two for an initiation (116 bytes), one for a response (60). Rounds are
 * unrolled with the message schedule spelled out, so every index is a
 * constant and the verifier sees straight-line code. */
#define ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define G(a, b, c, d, x, y) do {				\
		a = a + b + (x); d = ROTR32(d ^ a, 16);		\
		c = c + d;       b = ROTR32(b ^ c, 12);		\
		a = a + b + (y); d = ROTR32(d ^ a, 8);		\
		c = c + d;       b = ROTR32(b ^ c, 7);		\
	} while (0)
#define ROUND(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15) do { \
		G(v0, v4, v8, v12, m[s0], m[s1]);		\
		G(v1, v5, v9, v13, m[s2], m[s3]);		\
		G(v2, v6, v10, v14, m[s4], m[s5]);		\
		G(v3, v7, v11, v15, m[s6], m[s7]);		\
		G(v0, v5, v10, v15, m[s8], m[s9]);		\
		G(v1, v6, v11, v12, m[s10], m[s11]);		\
		G(v2, v7, v8, v13, m[s12], m[s13]);		\
		G(v3, v4, v9, v14, m[s14], m[s15]);		\
	} while (0)

/* One compression of block m into h; t = bytes hashed so far including
 * this block (the key block counts: 64). */
static __always_inline void blake2s_compress(u32 *h, const u32 *m, u32 t, int last)
{
	u32 v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3];
	u32 v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
	u32 v8 = 0x6A09E667, v9 = 0xBB67AE85, v10 = 0x3C6EF372, v11 = 0xA54FF53A;
	u32 v12 = 0x510E527F ^ t, v13 = 0x9B05688C;
	/* No branch on `last`: with two known values of v14 the verifier
	 * would walk the rounds twice. */
	u32 v14 = 0x1F83D9AB ^ (0U - (u32)last), v15 = 0x5BE0CD19;

	ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
	ROUND(14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3);
	ROUND(11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4);
	ROUND(7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8);
	ROUND(9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13);
	ROUND(2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9);
	ROUND(12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11);
	ROUND(13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10);
	ROUND(6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5);
	ROUND(10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0);

	h[0] ^= v0 ^ v8;  h[1] ^= v1 ^ v9;  h[2] ^= v2 ^ v10; h[3] ^= v3 ^ v11;
	h[4] ^= v4 ^ v12; h[5] ^= v5 ^ v13; h[6] ^= v6 ^ v14; h[7] ^= v7 ^ v15;
}

/* Run the planned compressions (plan_*) with one copy of the rounds: bcc
 * cannot load BPF-to-BPF calls, and a second inlined copy overflows the
 * 512-byte stack. The loop is not unrolled for the same reason. Sets
 * sc->right to the WGX_MAC*_RIGHT bits of what was checked and right. */
#define WGX_MAC1_RIGHT	1
#define WGX_MAC2_RIGHT	2

static __always_inline u32 words_equal(const u32 *a, const u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline void run_steps(struct scratch *sc, u32 nsteps)
{
	u32 h[8], i, j;

	/* Loop-carried state is only i and h; the verdicts go to memory.
	 * Otherwise the verifier, which walks each iteration, could not
	 * prune the paths through the branches below and gives up. */
	sc->right = 0;
#pragma unroll
	for (j = 0; j < 8; j++)		/* unknown to the verifier, like any state */
		h[j] = sc->starts[0][j];
#pragma clang loop unroll(disable)
	for (i = 0; i < WGX_STEPS_MAX; i++) {
		struct hash_step *st;

		if (i >= nsteps)
			break;
		st = &sc->steps[i];
		if (st->start != STEP_CONTINUE) {
#pragma unroll
			for (j = 0; j < 8; j++)
				h[j] = sc->starts[st->start & 3][j];
		}
		if (st->start == STEP_MAC2) {
#pragma unroll
			for (j = 0; j < 4; j++)
				sc->blocks[i][j] = sc->cookie[j];
		}
		blake2s_compress(h, sc->blocks[i], st->t, st->last);
		if (st->end == STEP_CHECK_MAC1) {
			if (!words_equal(h, sc->macs[0]))
				break;
			sc->right |= WGX_MAC1_RIGHT;
		} else if (st->end == STEP_SAVE_COOKIE) {
#pragma unroll
			for (j = 0; j < 4; j++)
				sc->cookie[j] = h[j];
		} else if (st->end == STEP_CHECK_MAC2) {
			if (words_equal(h, sc->macs[1]))
				sc->right |= WGX_MAC2_RIGHT;
		}
	}
}

/* ---- Per-source token bucket (the kernel's ratelimiter.c, in ns) -------- */
static __always_inline int source_allowed(struct wgx_source_key *key,
					  const struct wgx_config *cfg, u64 now)
{
	u64 cost, max, tokens;
	struct wgx_bucket *b;

	if (!cfg->rate)
		return 1;
	cost = WGX_NSEC_PER_SEC / cfg->rate;
	max = cost * cfg->burst;
	b = wgx_sources.lookup(key);
	if (!b) {
		/* A new source starts full, minus the packet that created it. If
		 * two CPUs race here, one insert wins; both packets pass. */
		struct wgx_bucket fresh = { .tokens = max - cost, .last_ns = now };

		wgx_sources.update(key, &fresh);
		return 1;
	}
	/* Unlocked read-modify-write: two CPUs on one bucket at once may both
	 * spend the same token. The bucket is a guard, not an accountant. */
	tokens = b->tokens + (now - b->last_ns);
	if (tokens > max)
		tokens = max;
	b->last_ns = now;
	if (tokens < cost) {
		b->tokens = tokens;
		return 0;
	}
	b->tokens = tokens - cost;
	return 1;
}

/* ---- "Under load": handshake messages a second, over all sources ----------- */
static __always_inline void note_handshake(const struct wgx_config *cfg, u64 now)
{
	u32 zero = 0;
	struct wgx_load *load = wgx_load.lookup(&zero);

	if (!load)
		return;
	if (now - load->window_start_ns >= WGX_NSEC_PER_SEC) {
		load->window_start_ns = now;
		load->window_count = 0;
	}
	__sync_fetch_and_add(&load->window_count, 1);
	if (load->window_count > cfg->load_threshold) {
		if (load->under_load_until_ns < now)
			count(WGX_CNT_LOAD_ONSETS);
		load->under_load_until_ns = now + cfg->load_hold_ns;
	}
}

/* Where the UDP header is, filled in by parse_ipv4/parse_ipv6. They return
 * WGX_PARSED when it is filled in, else the verdict counter for a packet
 * that is not a UDP datagram we can judge. judge_udp() has one call site
 * (below), so that the mac1 rounds exist once in the program: two inlined
 * copies overflow the 512-byte stack, and bcc cannot load BPF-to-BPF calls. */
#define WGX_PARSED	(-1)
/* parse_ipv6: the extension chain is longer than we walk (at->ip and the
 * family are filled in, at->udp is not). */
#define WGX_LONG_CHAIN	(-2)

struct udp_at {
	struct udphdr *udp;
	u32 payload;		/* IP payload length: IPv4 total - header, IPv6 payload - ext headers */
	int more;		/* a first fragment: more of the datagram follows */
	struct wgx_source_key src;
	void *ip;		/* the IPv4 or IPv6 header, for WGX_CFG_LOCAL_ONLY */
};

/* ---- Planning the MACs of one handshake message ----------------------------
 * Copies what is to be hashed into sc->blocks and describes each
 * compression in sc->steps; returns how many there are, 0 if the frame is
 * too short (a lie: the caller checked lengths). With mac2, also the
 * source's cookie: MAC(secret, source address || source port), then
 * MAC(cookie, message up to mac2), as cookie.py computes them. */
static __always_inline void plan_step(struct scratch *sc, u32 i, u8 start, u32 t, u8 last, u8 end)
{
	sc->steps[i].start = start;
	sc->steps[i].t = t;
	sc->steps[i].last = last;
	sc->steps[i].end = end;
}

/* Steps k..: the cookie of the source (k), the mac2 key block (k + 1),
 * then the message blocks; the message itself is copied by the caller. */
static __always_inline u32 plan_mac2(struct xdp_md *ctx, struct scratch *sc, struct udp_at *at,
				     u32 k, u32 hashed)
{
	void *data_end = (void *)(long)ctx->data_end;
	u8 *source = (u8 *)sc->blocks[k];
	u32 alen;

	if ((void *)(at->udp + 1) > data_end)
		return 0;
	if (at->src.family == 4) {
		struct iphdr *ip = at->ip;

		if ((void *)(ip + 1) > data_end)
			return 0;
		__builtin_memcpy(source, &ip->saddr, 4);
		__builtin_memcpy(source + 4, &at->udp->source, 2);
		alen = 4;
	} else {
		struct ipv6hdr *ip = at->ip;

		if ((void *)(ip + 1) > data_end)
			return 0;
		__builtin_memcpy(source, &ip->saddr, 16);
		__builtin_memcpy(source + 16, &at->udp->source, 2);
		alen = 16;
	}
	plan_step(sc, k, STEP_COOKIE, 64 + alen + 2, 1, STEP_SAVE_COOKIE);
	plan_step(sc, k + 1, STEP_MAC2, 64, 0, STEP_MORE);
	plan_step(sc, k + 2, STEP_CONTINUE, hashed <= 64 ? 64 + hashed : 128, hashed <= 64,
		  hashed <= 64 ? STEP_CHECK_MAC2 : STEP_MORE);
	if (hashed <= 64)
		return k + 3;
	plan_step(sc, k + 3, STEP_CONTINUE, hashed <= 128 ? 64 + hashed : 192, hashed <= 128,
		  hashed <= 128 ? STEP_CHECK_MAC2 : STEP_MORE);
	if (hashed <= 128)
		return k + 4;
	plan_step(sc, k + 4, STEP_CONTINUE, 64 + hashed, 1, STEP_CHECK_MAC2);
	return k + 5;
}

/* An initiation: mac1 over 116 bytes (2 blocks), mac2 over 132 (3). */
static __always_inline u32 plan_initiation(struct xdp_md *ctx, struct scratch *sc, u8 *msg,
					   struct udp_at *at, int with_mac2)
{
	void *data_end = (void *)(long)ctx->data_end;
	const u32 off = WGX_MESSAGE_HANDSHAKE_INITIATION_LEN - 2 * WGX_MAC_LEN;

	if ((void *)(msg + WGX_MESSAGE_HANDSHAKE_INITIATION_LEN) > data_end)
		return 0;
	__builtin_memcpy(sc->blocks[0], msg, off);
	__builtin_memcpy(sc->macs[0], msg + off, WGX_MAC_LEN);
	plan_step(sc, 0, STEP_MAC1, 128, 0, STEP_MORE);
	plan_step(sc, 1, STEP_CONTINUE, 64 + off, 1, STEP_CHECK_MAC1);
	if (!with_mac2)
		return 2;
	__builtin_memcpy(sc->blocks[4], msg, off + WGX_MAC_LEN);
	__builtin_memcpy(sc->macs[1], msg + off + WGX_MAC_LEN, WGX_MAC_LEN);
	return plan_mac2(ctx, sc, at, 2, off + WGX_MAC_LEN);
}

/* A response: mac1 over 60 bytes (1 block), mac2 over 76 (2). */
static __always_inline u32 plan_response(struct xdp_md *ctx, struct scratch *sc, u8 *msg,
					 struct udp_at *at, int with_mac2)
{
	void *data_end = (void *)(long)ctx->data_end;
	const u32 off = WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN - 2 * WGX_MAC_LEN;

	if ((void *)(msg + WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN) > data_end)
		return 0;
	__builtin_memcpy(sc->blocks[0], msg, off);
	__builtin_memcpy(sc->macs[0], msg + off, WGX_MAC_LEN);
	plan_step(sc, 0, STEP_MAC1, 64 + off, 1, STEP_CHECK_MAC1);
	if (!with_mac2)
		return 1;
	__builtin_memcpy(sc->blocks[3], msg, off + WGX_MAC_LEN);
	__builtin_memcpy(sc->macs[1], msg + off + WGX_MAC_LEN, WGX_MAC_LEN);
	return plan_mac2(ctx, sc, at, 1, off + WGX_MAC_LEN);
}

/* Copies the message and its source into sc and plans the MACs (mac2
 * only when asked); false if the frame is shorter than it claims. */
static __always_inline int plan_macs(struct xdp_md *ctx, struct scratch *sc, u8 *msg, u32 type,
				     struct udp_at *at, const struct wgx_config *cfg, int with_mac2)
{
	__builtin_memset(sc->blocks, 0, sizeof(sc->blocks));
	__builtin_memcpy(sc->starts[STEP_MAC1], cfg->mac1_h, sizeof(cfg->mac1_h));
	__builtin_memcpy(sc->starts[STEP_COOKIE], cfg->cookie_h, sizeof(cfg->cookie_h));
	/* BLAKE2s IV with the parameter block of a 16-byte key and a
	 * 16-byte digest: mac2's key block is the cookie. */
	sc->starts[STEP_MAC2][0] = 0x6A09E667 ^ 0x01011010;
	sc->starts[STEP_MAC2][1] = 0xBB67AE85;
	sc->starts[STEP_MAC2][2] = 0x3C6EF372;
	sc->starts[STEP_MAC2][3] = 0xA54FF53A;
	sc->starts[STEP_MAC2][4] = 0x510E527F;
	sc->starts[STEP_MAC2][5] = 0x9B05688C;
	sc->starts[STEP_MAC2][6] = 0x1F83D9AB;
	sc->starts[STEP_MAC2][7] = 0x5BE0CD19;
	if (type == WGX_MESSAGE_HANDSHAKE_INITIATION)
		sc->nsteps = plan_initiation(ctx, sc, msg, at, with_mac2);
	else
		sc->nsteps = plan_response(ctx, sc, msg, at, with_mac2);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	/* BLAKE2s reads its blocks as little-endian words. */
	for (u32 i = 0; i < WGX_STEPS_MAX * 16; i++)
		((u32 *)sc->blocks)[i] = le32(((u32 *)sc->blocks)[i]);
	for (u32 i = 0; i < 8; i++)
		((u32 *)sc->macs)[i] = le32(((u32 *)sc->macs)[i]);
#endif
	return sc->nsteps != 0;
}

static __always_inline int under_load(u64 now)
{
	u32 zero = 0;
	struct wgx_load *load = wgx_load.lookup(&zero);

	return load && now < load->under_load_until_ns;
}

/* After mac1 (and mac2, under load) are known: count the message as load
 * and, only under load, spend a token of the source's bucket. */
static __always_inline int finish_handshake(const struct wgx_config *cfg,
					    struct wgx_source_key *src, u64 now, u32 loaded,
					    u32 mac2_right)
{
	note_handshake(cfg, now);
	if (!loaded)
		return verdict(WGX_CNT_PASSED);
	/* Under load: a right mac2 spends its own bucket, which only a sender
	 * that receives at this address can reach; the rest (cookie requests,
	 * which the control plane answers with a cookie) spend the other. */
	src->proven = !!mac2_right;
	count(src->proven ? WGX_CNT_MAC2_VALID : WGX_CNT_MAC2_MISSING);
	if (!source_allowed(src, cfg, now))
		return verdict(WGX_CNT_RATE_LIMITED);
	return verdict(WGX_CNT_PASSED);
}

/* The second half of a handshake message's judgement, reached by tail
 * call from judge_message with the plan and the facts in wgx_scratch
 * (per CPU: XDP runs to the end on one CPU, so nothing else writes it). */
int wgx_macs(struct xdp_md *ctx)
{
	struct wgx_config *cfg;
	struct scratch *sc;
	u32 zero = 0;

	cfg = wgx_config.lookup(&zero);
	sc = wgx_scratch.lookup(&zero);
	if (!cfg || !sc)
		return verdict(WGX_CNT_BAD_MAC1);	/* cannot happen: arrays have entry 0 */
	run_steps(sc, sc->nsteps);
	if (!(sc->right & WGX_MAC1_RIGHT))
		return verdict(WGX_CNT_BAD_MAC1);
	return finish_handshake(cfg, &sc->src, sc->now, sc->loaded, sc->right & WGX_MAC2_RIGHT);
}

/* ---- The WireGuard message ------------------------------------------------
 * msg: the UDP payload in the frame; len: the datagram's message length
 * from the UDP header (more than is in the frame for a first fragment). */
static __always_inline int judge_message(struct xdp_md *ctx, u8 *msg, u32 len, struct udp_at *at,
					 const struct wgx_config *cfg)
{
	void *data_end = (void *)(long)ctx->data_end;
	u32 head[2], type, index, zero = 0;
	int fragment = at->more, loaded;
	struct scratch *sc;
	u64 now;

	if (len < WGX_MESSAGE_HEADER_LEN || (void *)(msg + WGX_MESSAGE_HEADER_LEN) > data_end)
		return verdict(WGX_CNT_SHORT);
	__builtin_memcpy(head, msg, sizeof(head));
	type = le32(head[0]);	/* the whole word: reserved bytes must be zero */
	index = le32(head[1]);	/* receiver, or an initiation's sender */

	switch (type) {
	case WGX_MESSAGE_HANDSHAKE_INITIATION:
		if (len != WGX_MESSAGE_HANDSHAKE_INITIATION_LEN || fragment)
			return verdict(WGX_CNT_BAD_LENGTH);
		count(WGX_CNT_INITIATIONS);
		break;
	case WGX_MESSAGE_HANDSHAKE_RESPONSE:
		if (len != WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN || fragment)
			return verdict(WGX_CNT_BAD_LENGTH);
		break;
	case WGX_MESSAGE_HANDSHAKE_COOKIE:
		if (len != WGX_MESSAGE_HANDSHAKE_COOKIE_LEN || fragment)
			return verdict(WGX_CNT_BAD_LENGTH);
		break;
	case WGX_MESSAGE_DATA:
		if (len < WGX_MESSAGE_DATA_MIN_LEN)
			return verdict(WGX_CNT_BAD_LENGTH);
		break;
	default:
		return verdict(WGX_CNT_BAD_TYPE);
	}

	/* Every type but the initiation answers something of ours. The
	 * receiver index follows the header, except in a response, which
	 * puts its sender index first. */
	if (type == WGX_MESSAGE_HANDSHAKE_RESPONSE) {
		if ((void *)(msg + WGX_MESSAGE_HEADER_LEN + 4) > data_end)
			return verdict(WGX_CNT_BAD_LENGTH);
		__builtin_memcpy(&index, msg + WGX_MESSAGE_HEADER_LEN, 4);
		index = le32(index);
	}
	if (type != WGX_MESSAGE_HANDSHAKE_INITIATION && !wgx_index.lookup(&index))
		return verdict(WGX_CNT_UNKNOWN_INDEX);
	if (type == WGX_MESSAGE_HANDSHAKE_COOKIE || type == WGX_MESSAGE_DATA)
		return verdict(WGX_CNT_PASSED);

	if (type == WGX_MESSAGE_HANDSHAKE_RESPONSE)
		count(WGX_CNT_RESPONSES);
	now = bpf_ktime_get_ns();
	loaded = under_load(now);
	if (!(cfg->flags & WGX_CFG_MAC1))
		return finish_handshake(cfg, &at->src, now, loaded, 0);
	/* mac1 first, so that junk spoofing a real peer's address is neither
	 * load nor a spent token; mac2 only under load, while the control
	 * plane's cookie secret is current. The rounds run in wgx_macs, a
	 * program of their own (a tail call): walking them once for every
	 * way to get here (IPv4, IPv6 behind each extension chain, each
	 * type) is more than the verifier allows. */
	sc = wgx_scratch.lookup(&zero);
	if (!sc)
		return verdict(WGX_CNT_PASSED);		/* cannot happen: an array has entry 0 */
	if (!plan_macs(ctx, sc, msg, type, at, cfg, loaded && now < cfg->cookie_until_ns))
		return verdict(WGX_CNT_BAD_LENGTH);
	sc->src = at->src;
	sc->now = now;
	sc->loaded = loaded;
	wgx_jump.call(ctx, WGX_JUMP_MACS);
	/* Only if the jump table is empty, which the loader never leaves it:
	 * fail closed. */
	return verdict(WGX_CNT_BAD_MAC1);
}

static __always_inline int parse_ipv4(struct xdp_md *ctx, struct iphdr *ip, struct udp_at *at)
{
	void *data_end = (void *)(long)ctx->data_end;
	u32 hlen, tot_len;
	u16 frag;

	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return WGX_CNT_OTHER;
	if (ip->protocol != IPPROTO_UDP)
		return WGX_CNT_OTHER;
	frag = bpf_ntohs(ip->frag_off);
	if (frag & IP_OFFSET)
		return WGX_CNT_FRAGMENT;
	hlen = ip->ihl * 4;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < hlen)
		return WGX_CNT_OTHER;	/* malformed: the kernel drops it */
	at->udp = (void *)ip + hlen;
	at->payload = tot_len - hlen;
	at->more = !!(frag & IP_MF);
	at->src.family = 4;
	__builtin_memcpy(at->src.addr, &ip->saddr, 4);
	at->ip = ip;
	return WGX_PARSED;
}

struct ipv6_opt_hdr_min {
	u8 nexthdr;
	u8 hdrlen;
};

struct ipv6_frag_hdr_min {
	u8 nexthdr;
	u8 reserved;
	__be16 frag_off;	/* offset << 3 | M */
	__be32 id;
};

static __always_inline int parse_ipv6(struct xdp_md *ctx, struct ipv6hdr *ip, struct udp_at *at)
{
	void *data_end = (void *)(long)ctx->data_end;
	u32 payload, i, len;
	void *cursor;
	int more = 0;
	u8 next;

	if ((void *)(ip + 1) > data_end || ip->version != 6)
		return WGX_CNT_OTHER;
	payload = bpf_ntohs(ip->payload_len);
	next = ip->nexthdr;
	at->src.family = 6;
	at->ip = ip;
	cursor = ip + 1;
	for (i = 0; i < WGX_IPV6_EXT_MAX; i++) {
		if (next == IPPROTO_UDP)
			break;
		if (next == NEXTHDR_FRAGMENT) {
			struct ipv6_frag_hdr_min *f = cursor;

			if ((void *)(f + 1) > data_end)
				return WGX_CNT_OTHER;
			if (bpf_ntohs(f->frag_off) & ~7)
				return WGX_CNT_FRAGMENT;
			more = bpf_ntohs(f->frag_off) & 1;
			next = f->nexthdr;
			len = sizeof(*f);
		} else if (next == NEXTHDR_HOP || next == NEXTHDR_ROUTING ||
			   next == NEXTHDR_DEST || next == NEXTHDR_AUTH) {
			struct ipv6_opt_hdr_min *o = cursor;

			if ((void *)(o + 1) > data_end)
				return WGX_CNT_OTHER;
			len = next == NEXTHDR_AUTH ? (o->hdrlen + 2) * 4 : (o->hdrlen + 1) * 8;
			next = o->nexthdr;
		} else {
			return WGX_CNT_OTHER;	/* TCP, ICMPv6, ESP, no next header... */
		}
		if (len > payload)
			return WGX_CNT_OTHER;	/* malformed: the kernel drops it */
		payload -= len;
		cursor += len;
	}
	if (next != IPPROTO_UDP)
		return WGX_LONG_CHAIN;
	at->udp = cursor;
	at->payload = payload;
	at->more = more;
	__builtin_memcpy(at->src.addr, &ip->saddr, 8);	/* the /64 */
	return WGX_PARSED;
}

/* ---- UDP: is it for our port, for this host, and does its length agree? -- */

/* Would the kernel deliver it here (or drop it), rather than forward it?
 * The lookup's arguments live in the scratch map: the stack is full. */
static __always_inline int delivered_here(struct xdp_md *ctx, struct udp_at *at)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct bpf_fib_lookup *fib;
	struct scratch *sc;
	u32 zero = 0;
	long ret;

	sc = wgx_scratch.lookup(&zero);
	if (!sc)
		return 1;
	fib = &sc->fib;
	__builtin_memset(fib, 0, sizeof(*fib));
	if (at->src.family == 4) {
		struct iphdr *ip = at->ip;

		if ((void *)(ip + 1) > data_end)
			return 1;
		fib->family = WGX_AF_INET;
		fib->tos = ip->tos;
		fib->ipv4_src = ip->saddr;
		fib->ipv4_dst = ip->daddr;
	} else {
		struct ipv6hdr *ip = at->ip;

		if ((void *)(ip + 1) > data_end)
			return 1;
		fib->family = WGX_AF_INET6;
		fib->flowinfo = *(__be32 *)ip & bpf_htonl(0x0FFFFFFF);	/* class + label */
		__builtin_memcpy(fib->ipv6_src, &ip->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, &ip->daddr, 16);
	}
	if (at->udp) {		/* none behind a long extension chain */
		if ((void *)(at->udp + 1) > data_end)
			return 1;
		fib->l4_protocol = IPPROTO_UDP;
		fib->sport = at->udp->source;
		fib->dport = at->udp->dest;
	}
	fib->ifindex = ctx->ingress_ifindex;
	ret = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	/* NOT_FWDED: a local (or broadcast) route. FWD_DISABLED: nothing is
	 * forwarded here. An error: we cannot tell, so judge it. Anything else
	 * (a unicast route, whatever the neighbour state) is someone else's;
	 * unroutable ones the kernel drops itself. */
	return ret < 0 || ret == BPF_FIB_LKUP_RET_NOT_FWDED || ret == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

static __always_inline int judge_udp(struct xdp_md *ctx, struct udp_at *at,
				     const struct wgx_config *cfg)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct udphdr *udp = at->udp;
	u32 udp_len, payload = at->payload;

	if ((void *)(udp + 1) > data_end)
		return verdict(WGX_CNT_OTHER);	/* no port to read: the kernel drops it */
	if (udp->dest != bpf_htons(cfg->port))
		return verdict(WGX_CNT_OTHER);
	if ((cfg->flags & WGX_CFG_LOCAL_ONLY) && !delivered_here(ctx, at))
		return verdict(WGX_CNT_FORWARDED);
	/* From here on it is ours: what does not parse is junk. The frame
	 * must hold what IP says is there (it may hold more: padding). */
	if ((void *)udp + payload > data_end)
		return verdict(WGX_CNT_BAD_LENGTH);
	udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp))
		return verdict(WGX_CNT_BAD_LENGTH);
	if (at->more ? udp_len <= payload : udp_len != payload)
		return verdict(WGX_CNT_BAD_LENGTH);
	return judge_message(ctx, (u8 *)(udp + 1), udp_len - sizeof(*udp), at, cfg);
}

int wgx_guard(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udp_at at = {};
	struct wgx_config *cfg;
	u32 zero = 0;
	int parsed;

	cfg = wgx_config.lookup(&zero);
	if (!cfg || !cfg->port || (void *)(eth + 1) > data_end)
		return verdict(WGX_CNT_OTHER);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		parsed = parse_ipv4(ctx, (void *)(eth + 1), &at);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		parsed = parse_ipv6(ctx, (void *)(eth + 1), &at);
	else
		parsed = WGX_CNT_OTHER;
	if (parsed == WGX_LONG_CHAIN) {
		/* The port is out of sight, so this may be ours: passing it
		 * would be a way around every check. A router passes what it
		 * routes on; what is for this host is dropped and counted. */
		if ((cfg->flags & WGX_CFG_LOCAL_ONLY) && !delivered_here(ctx, &at))
			return verdict(WGX_CNT_UNPARSED);
		return verdict(WGX_CNT_EXT_CHAIN);
	}
	if (parsed != WGX_PARSED)
		return verdict(parsed);
	return judge_udp(ctx, &at, cfg);
}
