/* xdp_guard.h: what the underlay guard (xdp_guard.c) and its loader
 * (wgebpf/kernel/xdp_guard.py) agree on.
 *
 * Kept apart from common.h on purpose: the guard is one self-contained
 * program with maps of its own (prefix wgx_), loaded as its own object on
 * the underlay device, and shares nothing with the TUN-side programs.
 * wgebpf/kernel/xdp_guard.py mirrors every item; tests/test_bpf_xdp_guard.py
 * compiles this header with bcc and checks that sizes, offsets and values
 * agree. Plain types only, no implicit padding.
 */
#ifndef WGEBPF_XDP_GUARD_H
#define WGEBPF_XDP_GUARD_H

/* ---- WireGuard wire facts the guard checks (messages.py's names) -------- */
#define WGX_MESSAGE_HANDSHAKE_INITIATION	1
#define WGX_MESSAGE_HANDSHAKE_RESPONSE		2
#define WGX_MESSAGE_HANDSHAKE_COOKIE		3
#define WGX_MESSAGE_DATA			4
#define WGX_MESSAGE_HANDSHAKE_INITIATION_LEN	148
#define WGX_MESSAGE_HANDSHAKE_RESPONSE_LEN	92
#define WGX_MESSAGE_HANDSHAKE_COOKIE_LEN	64
#define WGX_MESSAGE_DATA_MIN_LEN		32	/* header 16 + Poly1305 tag 16 */
#define WGX_MESSAGE_HEADER_LEN			8	/* type+reserved, then an index */
#define WGX_MAC_LEN				16	/* mac1 and mac2 each */

/* ---- Map names (at most 15 characters: BPF_OBJ_NAME_LEN) ----------------- */
#define WGX_MAP_CONFIG		"wgx_config"	/* array[1] of struct wgx_config */
#define WGX_MAP_INDEX		"wgx_index"	/* hash __u32 receiver index -> __u32 (any) */
#define WGX_MAP_SOURCES		"wgx_sources"	/* lru_hash wgx_source_key -> wgx_bucket */
#define WGX_MAP_LOAD		"wgx_load"	/* array[1] of struct wgx_load (shared) */
#define WGX_MAP_COUNTERS	"wgx_counters"	/* percpu_array[WGX_CNT_MAX] of __u64 */
#define WGX_PROG		"wgx_guard"	/* the XDP function */
#define WGX_PROG_MACS		"wgx_macs"	/* its second half, for handshake messages */
#define WGX_MAP_JUMP		"wgx_jump"	/* prog_array[1]: [0] = WGX_PROG_MACS */

/* The index map mirrors the control plane's whole local index table: every
 * index with a handshake under way or a keypair. A response and a cookie
 * reply name a handshake's index, a data message a keypair's, and a
 * keypair keeps its handshake's index, so one map serves all three. */
#define WGX_INDEX_MAX		65536
/* Buckets of sources seen recently. LRU: a flood of spoofed sources evicts
 * the oldest buckets instead of filling the table (an evicted source starts
 * again with a full bucket, as a new one would). */
#define WGX_SOURCES_MAX		16384

/* ---- wgx_config[0] --------------------------------------------------------
 * port:           the listen port, host order; 0 = guard off (all passes).
 * flags:          WGX_CFG_* below.
 * rate, burst:    per-source token bucket for handshake initiations and
 *                 responses together: `rate` a second, at most `burst` in a
 *                 row. rate 0 = no rate limit.
 * load_threshold: handshake messages a second (all sources, after the mac1
 *                 check) above which the guard declares "under load".
 * load_hold_ns:   how long "under load" lasts after the last second that
 *                 was over the threshold.
 * mac1_h:         BLAKE2s state after the key block of
 *                 MAC(HASH("mac1----" || our public key), ...): mac1 of
 *                 messages sent to us, with the key block already
 *                 compressed (the loader does that once, not every packet).
 *                 Used when WGX_CFG_MAC1 is set.
 * cookie_until_ns: the control plane's cookie secret is good until this
 *                 CLOCK_MONOTONIC time (0: no secret yet). While it is,
 *                 mac2 is checked under load.
 * cookie_h:       BLAKE2s state after the key block of MAC(secret, ...):
 *                 the cookie of a source is MAC(secret, ip || port), and
 *                 mac2 is MAC(cookie, message up to mac2). */
struct wgx_config {
	__u16 port;
	__u16 pad;
	__u32 flags;
	__u32 rate;
	__u32 burst;
	__u32 load_threshold;
	__u32 pad2;
	__u64 load_hold_ns;
	__u32 mac1_h[8];
	__u64 cookie_until_ns;
	__u32 cookie_h[8];
};

#define WGX_CFG_MAC1		(1U << 0)	/* drop handshake messages whose mac1 is wrong */
/* Judge only datagrams this host receives itself: ask the FIB (as the
 * kernel will) and pass those it would forward, so that a router running
 * wgebpf never filters another host's WireGuard on the same port. When
 * forwarding is off on the device (IPv6: globally) the FIB is not asked:
 * then every datagram to the port is ours or dropped by the kernel. */
#define WGX_CFG_LOCAL_ONLY	(1U << 1)

/* ---- wgx_sources: token buckets per source prefix, only under load --------
 * IPv4 by /32, IPv6 by /64 (one host may use its whole /64), as WireGuard's
 * own rate limiter keys them. Two buckets a prefix: one for messages whose
 * mac2 is right (the sender got our cookie at that address, so it receives
 * there: a spoofer cannot spend this one), one for the rest (cookie
 * requests). Not under load, nothing is rate limited, as in the kernel and
 * wireguard-go: a forged source address never costs a real peer a
 * handshake. */
struct wgx_source_key {
	__u8 family;		/* 4 or 6 */
	__u8 proven;		/* 1: the bucket of messages with a right mac2 */
	__u8 pad[2];
	__u8 addr[8];		/* IPv4: 4 bytes + 4 zero; IPv6: the top 64 bits */
};

/* Tokens are nanoseconds, as in the kernel's ratelimiter.c: time refills
 * the bucket, a packet costs 1e9 / rate of them, the bucket holds at most
 * burst packets' worth. */
struct wgx_bucket {
	__u64 tokens;
	__u64 last_ns;		/* bpf_ktime_get_ns() of the last refill */
};

/* ---- wgx_load[0]: "under load", shared by all CPUs -------------------------
 * A one-second window of handshake messages (initiations and responses
 * with a valid mac1, rate-limited ones included: the flood is what counts).
 * When a window passes load_threshold, under_load_until_ns = now +
 * load_hold_ns. The control plane reads it: under load while
 * CLOCK_MONOTONIC < under_load_until_ns (bpf_ktime_get_ns is that clock).
 * Updates from several CPUs race mildly (a window may restart twice); the
 * count is an atomic add, so the threshold is not missed by much. */
struct wgx_load {
	__u64 window_start_ns;
	__u64 window_count;
	__u64 under_load_until_ns;
};

/* ---- Counters: wgx_counters[index], one per-CPU __u64 each -------------------
 * Verdicts: every packet the program sees is counted under exactly one. */
#define WGX_CNT_OTHER		0	/* pass: not a UDP datagram to the listen port */
#define WGX_CNT_PASSED		1	/* pass: to the port, looks like WireGuard */
#define WGX_CNT_FRAGMENT	2	/* pass: a later IP fragment, no UDP header to judge */
#define WGX_CNT_UNPARSED	3	/* pass: IPv6 extension headers beyond what we walk, routed on */
#define WGX_CNT_FORWARDED	4	/* pass: to the port, but routed through this host */
#define WGX_CNT_SHORT		5	/* drop: to the port, too short to hold a message header */
#define WGX_CNT_BAD_TYPE	6	/* drop: unknown type or nonzero reserved bytes */
#define WGX_CNT_BAD_LENGTH	7	/* drop: wrong length for the type, or UDP length != IP's */
#define WGX_CNT_UNKNOWN_INDEX	8	/* drop: receiver index not in wgx_index */
#define WGX_CNT_BAD_MAC1	9	/* drop: handshake message with a wrong mac1 */
#define WGX_CNT_RATE_LIMITED	10	/* drop: under load, the source's bucket is empty */
#define WGX_CNT_EXT_CHAIN	11	/* drop: IPv6 extension chain longer than we walk, to this host */
#define WGX_CNT_LAST_PASS	WGX_CNT_FORWARDED	/* verdicts up to here pass */
/* Events, counted in addition to the verdict: */
#define WGX_CNT_INITIATIONS	16	/* well-formed initiations seen (any verdict after) */
#define WGX_CNT_RESPONSES	17	/* well-formed responses to a live index */
#define WGX_CNT_LOAD_ONSETS	18	/* windows that went over load_threshold */
#define WGX_CNT_MAC2_VALID	19	/* under load: handshake messages with a right mac2 */
#define WGX_CNT_MAC2_MISSING	20	/* under load: handshake messages without one */
#define WGX_CNT_MAX		24

/* IPv6 extension headers walked before giving up. A longer chain hides
 * the port; to this host it is dropped (EXT_CHAIN: otherwise it would be
 * a way around every check), routed on it passes (UNPARSED). */
#define WGX_IPV6_EXT_MAX	6

#endif /* WGEBPF_XDP_GUARD_H */
