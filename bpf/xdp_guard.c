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
 *      Before the rate limit, so that junk spoofing a real peer's address
 *      cannot empty that peer's bucket: only a sender who knows our public
 *      key gets to spend tokens.
 *   7. initiation and response: the source prefix (/32, /64) has a token
 *      in its bucket (wgx_sources)                            RATE_LIMITED
 * Initiations and responses that pass 6 are also counted into wgx_load's
 * one-second window, which tells the control plane it is under load (and
 * must demand cookies); rate-limited ones count too, they are the flood.
 *
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
 * UDP header cut off, an IPv6 extension chain longer than we walk) we cannot
 * tell it is ours, so it passes: the kernel drops the malformed ones itself,
 * and over-long extension chains are counted (WGX_CNT_UNPARSED) so that
 * anyone hiding behind them is seen. Once the port is known to be ours,
 * whatever fails to parse is junk and is dropped.
 *
 * Return value:
 *   XDP_PASS  not ours (OTHER), a later fragment (FRAGMENT), an extension
 *             chain too long to walk (UNPARSED), routed through this host
 *             (FORWARDED), or a datagram that passed every check (PASSED):
 *             the kernel's receive path takes it on
 *   XDP_DROP  a datagram to the port that failed a check; counted under the
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

/* Off the stack, which the unrolled BLAKE2s rounds nearly fill with
 * spilled state: mac1's message words, the FIB lookup's arguments.
 * Internal to this program. */
struct scratch {
	u32 words[32];
	struct bpf_fib_lookup fib;
};
BPF_TABLE("percpu_array", u32, struct scratch, wgx_scratch, 1);

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
	u32 v14 = 0x1F83D9AB ^ (last ? 0xFFFFFFFF : 0), v15 = 0x5BE0CD19;

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

/* Is mac1 right? words: the message up to mac1 as little-endian words,
 * zero-padded to whole blocks (32 words: 116 bytes of an initiation, or 60
 * of a response); blocks: 2 or 1; mac: the 16 bytes of mac1. One call site
 * and a loop over the blocks, so the unrolled rounds exist once in the
 * program (bcc cannot load BPF-to-BPF calls, and two inlined copies
 * overflow the 512-byte stack). */
static __always_inline int mac1_ok(const u32 *words, u32 blocks, u32 msg_len,
				   const u32 *mac, const struct wgx_config *cfg)
{
	u32 h[8], i;

#pragma unroll
	for (i = 0; i < 8; i++)
		h[i] = cfg->mac1_h[i];
	/* A loop, not two calls: bcc refuses programs over 4096 instructions,
	 * and one copy of the unrolled rounds is half of that. */
#pragma clang loop unroll(disable)
	for (i = 0; i < 2; i++) {
		/* t counts the key block (64 bytes) and the message so far. */
		int last = i + 1 == blocks;

		blake2s_compress(h, words + 16 * i, last ? 64 + msg_len : 64 * (i + 2), last);
		if (last)
			break;
	}
	return ((le32(mac[0]) ^ h[0]) | (le32(mac[1]) ^ h[1]) |
		(le32(mac[2]) ^ h[2]) | (le32(mac[3]) ^ h[3])) == 0;
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

/* ---- The WireGuard message ------------------------------------------------
 * msg: the UDP payload in the frame; len: the datagram's message length
 * from the UDP header (more than is in the frame for a first fragment). */
static __always_inline int judge_message(struct xdp_md *ctx, u8 *msg, u32 len, int fragment,
					 struct wgx_source_key *src,
					 const struct wgx_config *cfg)
{
	void *data_end = (void *)(long)ctx->data_end;
	u32 head[2], type, index;
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
	if (cfg->flags & WGX_CFG_MAC1) {
		/* Constant lengths in each branch, so the verifier can bound the
		 * reads; the caller checked the frame holds what IP says, and
		 * fragments were refused above, so this only fails on a lie. */
		u32 zero = 0, mac[4], hashed, i;
		struct scratch *sc = wgx_scratch.lookup(&zero);

		if (!sc)
			return verdict(WGX_CNT_PASSED);	/* cannot happen: an array has entry 0 */
		if (type == WGX_MESSAGE_HANDSHAKE_INITIATION) {
			if ((void *)(msg + WGX_MESSAGE_HANDSHAKE_INITIATION_LEN) > data_end)
				return verdict(WGX_CNT_BAD_LENGTH);
			hashed = WGX_MESSAGE_HANDSHAKE_INITIATION_LEN - 2 * WGX_MAC_LEN;
			__builtin_memcpy(sc->words, msg, WGX_MESSAGE_HANDSHAKE_INITIATION_LEN - 2 * WGX_MAC_LEN);
			__builtin_memset(&sc->words[29], 0, 3 * 4);	/* 116 -> 128 bytes */
			__builtin_memcpy(mac, msg + hashed, WGX_MAC_LEN);
		} else {
			if ((void *)(msg + WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN) > data_end)
				return verdict(WGX_CNT_BAD_LENGTH);
			hashed = WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN - 2 * WGX_MAC_LEN;
			__builtin_memcpy(sc->words, msg, WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN - 2 * WGX_MAC_LEN);
			sc->words[15] = 0;				/* 60 -> 64 bytes */
			__builtin_memcpy(mac, msg + hashed, WGX_MAC_LEN);
		}
#pragma unroll
		for (i = 0; i < 32; i++)
			sc->words[i] = le32(sc->words[i]);
		if (!mac1_ok(sc->words, hashed > 64 ? 2 : 1, hashed, mac, cfg))
			return verdict(WGX_CNT_BAD_MAC1);
	}
	now = bpf_ktime_get_ns();
	note_handshake(cfg, now);
	if (!source_allowed(src, cfg, now))
		return verdict(WGX_CNT_RATE_LIMITED);
	return verdict(WGX_CNT_PASSED);
}

/* Where the UDP header is, filled in by parse_ipv4/parse_ipv6. They return
 * WGX_PARSED when it is filled in, else the verdict counter for a packet
 * that is not a UDP datagram we can judge. judge_udp() has one call site
 * (below), so that the mac1 rounds exist once in the program: two inlined
 * copies overflow the 512-byte stack, and bcc cannot load BPF-to-BPF calls. */
#define WGX_PARSED	(-1)

struct udp_at {
	struct udphdr *udp;
	u32 payload;		/* IP payload length: IPv4 total - header, IPv6 payload - ext headers */
	int more;		/* a first fragment: more of the datagram follows */
	struct wgx_source_key src;
	void *ip;		/* the IPv4 or IPv6 header, for WGX_CFG_LOCAL_ONLY */
};

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
		return WGX_CNT_UNPARSED;
	at->udp = cursor;
	at->payload = payload;
	at->more = more;
	at->src.family = 6;
	__builtin_memcpy(at->src.addr, &ip->saddr, 8);	/* the /64 */
	at->ip = ip;
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
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = at->udp->source;
	fib->dport = at->udp->dest;
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
	return judge_message(ctx, (u8 *)(udp + 1), udp_len - sizeof(*udp), at->more, &at->src, cfg);
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
	if (parsed != WGX_PARSED)
		return verdict(parsed);
	return judge_udp(ctx, &at, cfg);
}
