/* common.h: what wgebpf's eBPF programs and their Python loaders agree on.
 *
 * Map names, key and value layouts, flags, counter indexes and verdicts live
 * here and only here (the xdp-tools common_kern_user.h habit).
 * wgebpf/kernel/bpfmaps.py mirrors every item with ctypes; the tests compile this
 * header with bcc and check that sizes, offsets and values agree.
 *
 * Plain types only (__u8/__u32/__u64 and fixed arrays, no bitfields, no
 * implicit padding), so that ctypes lays them out exactly as clang does.
 */
#ifndef WGEBPF_COMMON_H
#define WGEBPF_COMMON_H

/* ---- Peers, slots, queues and tags ----------------------------------------
 * The device is a multi-queue TAP made an L3 link (NOARP): every packet at
 * both tc hooks starts with a 14-byte Ethernet header. Queue 0 belongs to the
 * control plane: whatever no peer takes goes there, and the control plane
 * answers it with ICMP unreachable. Queues 1..W belong to the W workers; a
 * peer owns no queue, so any worker may carry any peer's packets, and the
 * kernel's limit of 256 queues per TAP (MAX_TAP_QUEUES) bounds workers, not
 * peers.
 * A peer is a slot, its id in the maps below: 1..WG_SLOT_MAX, 0 = no peer.
 * The slot rides in the Ethernet header as a tag, a locally administered
 * unicast MAC {WG_TAG_0, WG_TAG_1, slot big-endian in 4 bytes}:
 *   egress   nexthop.c writes it as the destination MAC of a packet a peer
 *            takes; the worker reading the queue learns the peer from it.
 *   ingress  a worker writes it as the source MAC of a peer's decrypted
 *            packet (the destination is the device's own MAC); policy.c
 *            reads it. The control plane writes slot 0. */
#define WG_QUEUE_CONTROL	0
#define WG_SLOT_MIN		1
#define WG_SLOT_MAX		65535
#define WG_SLOTS		65536	/* entries of a slot-indexed map: 0..WG_SLOT_MAX */
#define WG_QUEUES_MAX		256	/* the kernel's MAX_TAP_QUEUES: 1 + workers */
#define WG_TAG_0		0x02	/* first byte of a tag: locally administered, unicast */
#define WG_TAG_1		0x77	/* second byte: ours */
#define WG_TAG_LEN		6	/* a MAC: WG_TAG_0, WG_TAG_1, slot (BE32) */
#define WG_ETH_DST		0	/* offset of the destination MAC in a frame */
#define WG_ETH_SRC		6	/* offset of the source MAC */

/* ---- Map names ------------------------------------------------------------
 * The C programs declare and use the maps under these identifiers (bcc
 * cannot rewrite map calls spelled through a macro, so the strings are the
 * reference and the tests check each is a map of the compiled programs with
 * the layouts below). At most 15 characters: BPF_OBJ_NAME_LEN. */
#define WG_MAP_CONFIG		"wg_config"	/* array[1] of struct wg_config */
#define WG_MAP_PEERS4		"wg_peers4"	/* lpm_trie wg_lpm_key4 -> __u32 slot */
#define WG_MAP_PEERS6		"wg_peers6"	/* lpm_trie wg_lpm_key6 -> __u32 slot */
#define WG_MAP_COUNTERS		"wg_counters"	/* percpu_array[WG_CNT_MAX] of __u64 */
#define WG_MAP_NEXTHOPS		"wg_nexthops"	/* lru_percpu_hash wg_nexthop_key -> wg_nexthop_stats */
#define WG_MAP_RXINDEX		"wg_rxindex"	/* hash __u32 receiver index -> __u32 socket position */
#define WG_MAP_POLICIES		"wg_policies"	/* array[WG_SLOTS] slot -> __u32 WG_POLICY_* */
#define WG_MAP_POLICY_CNT	"wg_policy_cnt"	/* percpu_hash[WG_SLOTS] slot -> wg_policy_counts */
#define WG_MAP_ROUTE_SEEN	"wg_route_seen"	/* percpu_array[1] of wg_route_seen (route read builds) */

/* Sizes. The tries are not preallocated (BPF_F_NO_PREALLOC is mandatory for
 * LPM tries), so a large bound costs nothing until used: a classic config
 * may carry a full routing table in AllowedIPs. */
#define WG_PEERS4_MAX		1048576
#define WG_PEERS6_MAX		262144
#define WG_NEXTHOPS_MAX		4096
#define WG_RXINDEX_MAX		65536

/* ---- wg_config[0] ---------------------------------------------------------
 * flags:     WG_CFG_* below.
 * fib_flags: bpf_fib_lookup flags; the loader picks them for the running
 *            kernel (WG_FIB_LOOKUP_MARK only from 6.10 on: older kernels
 *            refuse unknown flags with -EINVAL). The classifier adds or
 *            removes WG_FIB_LOOKUP_OUTPUT itself (see nexthop.c).
 * queues:    number of TAP queues, 1 + W workers. A packet a peer takes
 *            goes to worker queue 1 + (flow hash % W); with no worker queue
 *            (queues <= 1) it goes to queue 0, counted WG_CNT_NO_QUEUE.
 * policy:    the source policy (WG_POLICY_*) of every peer whose entry in
 *            wg_policies is WG_POLICY_DEFAULT; 0 reads as allowedips.
 * mark_mask, mark_shift:
 *            where the nftables policy puts the peer's slot in skb->mark:
 *            mark = (mark & ~mask) | ((slot << shift) & mask); shift is the
 *            mask's lowest set bit (the program has no ctz instruction). */
struct wg_config {
	__u32 flags;
	__u32 fib_flags;
	__u32 queues;
	__u32 policy;
	__u32 mark_mask;
	__u32 mark_shift;
};

/* Classic WireGuard rule: the destination itself is the key and no FIB
 * lookup is done. Without it the key is the route's next hop. */
#define WG_CFG_ALLOWEDIPS	(1U << 0)
/* A peer's flows spread over the workers by their flow hash (PeerSpread).
 * Without it every packet of a peer goes to its one worker, 1 + (slot - 1)
 * % W, the worker that also receives its sessions (dataplane/pool.py). */
#define WG_CFG_SPREAD_FLOWS	(1U << 1)

/* ---- Allowed-ips tries (key layout fixed by the kernel's LPM trie) ------- */
struct wg_lpm_key4 {
	__u32 prefixlen;	/* host byte order, 0..32 */
	__u8 addr[4];		/* network byte order */
};

struct wg_lpm_key6 {
	__u32 prefixlen;	/* host byte order, 0..128 */
	__u8 addr[16];		/* network byte order */
};

/* ---- Per-next-hop traffic (for metrics) -------------------------------------
 * Counted in nexthop mode for every packet whose FIB lookup gave a next hop,
 * whether a peer owns it or not. LRU: the table stays bounded, and a next hop
 * that has gone quiet makes room for a new one. */
struct wg_nexthop_key {
	__u8 family;		/* AF_INET (2) or AF_INET6 (10) */
	__u8 pad[3];		/* zero */
	__u8 addr[16];		/* network byte order; IPv4 uses the first 4, rest zero */
};

struct wg_nexthop_stats {
	__u64 packets;
	__u64 bytes;		/* skb->len: the IP packet, no outer headers */
};

/* ---- Route read (nexthop.c built with WG_ROUTE_DST) -------------------------
 * The dst_ops and device pointers the classifier last verified on this CPU
 * (dst_ops.family matched the packet; the device's ifindex is ours): a route
 * with the same two pointers needs neither check again. Only the program
 * uses it. */
struct wg_route_seen {
	__u64 ops[2];		/* [0] IPv4, [1] IPv6 */
	__u64 dev;
};

/* ---- Counters: wg_counters[index], one per-CPU __u64 each ----------------
 * Verdict reasons: every packet the classifier sees is counted under exactly
 * one of these. */
#define WG_CNT_PEER		0	/* a peer owns the key: tagged, a worker's queue */
#define WG_CNT_NO_PEER		1	/* queue 0: no peer owns the key */
#define WG_CNT_NOT_IP		2	/* queue 0: neither IPv4 nor IPv6 */
#define WG_CNT_TRUNCATED	3	/* queue 0: IP header cut short or bad */
#define WG_CNT_FIB_ERROR	4	/* queue 0: bpf_fib_lookup returned -errno */
#define WG_CNT_NO_QUEUE		5	/* queue 0: a peer owns the key but there is no
					 * worker queue (config.queues <= 1) */
#define WG_CNT_TAG_FAILED	6	/* queue 0: a peer owns the key but its tag could not
					 * be written (no linear Ethernet header) */
/* queue 0: bpf_fib_lookup returned WG_FIB_RET_x (x = 1..15), counted at
 * WG_CNT_FIB_RET_BASE + x. Only the codes nexthop.c treats as "no next hop"
 * are counted here; see its comment for each code. */
#define WG_CNT_FIB_RET_BASE	8
/* Events, counted in addition to the packet's verdict reason: */
#define WG_CNT_FIB_OTHER_DEV	24	/* the flow's route left by another device: looked up
					 * again pinned to this one */
#define WG_CNT_FIB_DEST_FALLBACK 25	/* even that named another device: key = destination */
/* Where the classifier's next hop came from (nexthop.c built with
 * WG_ROUTE_DST; one of these per packet in nexthop mode): */
#define WG_CNT_ROUTE_DST	26	/* read from the kernel's route (skb's dst) */
/* Fallbacks to the FIB lookup, by reason: */
#define WG_CNT_FB_NO_DST	27	/* the packet has no dst (AF_PACKET, tc redirect, test run) */
#define WG_CNT_FB_FOREIGN_DST	28	/* its dst is not a route of the packet's family */
#define WG_CNT_FB_OTHER_DEVICE	29	/* its dst's device is not this one */
#define WG_CNT_FB_READ_FAILED	30	/* bpf_probe_read_kernel failed */
#define WG_CNT_MAX		32

/* ---- bpf_fib_lookup (kernel 6.10+ UAPI layout, our own names) ------------
 * bcc compiles against Debian's 6.1 headers, which lack the `mark` field and
 * BPF_FIB_LOOKUP_MARK. This is include/uapi/linux/bpf.h's struct
 * bpf_fib_lookup as of 6.10 (the `mark` union after `tbid`), under a name
 * that cannot clash with whichever header bcc found. 64 bytes; the tests
 * check the offsets against the kernel's field positions. */
struct wg_fib_lookup {
	__u8 family;			/* in: AF_INET/AF_INET6; out: family of the next hop */
	__u8 l4_protocol;
	__be16 sport;
	__be16 dport;
	union {
		__u16 tot_len;		/* in: 0 = check the skb against the result's MTU */
		__u16 mtu_result;	/* out */
	} __attribute__((packed, aligned(2)));
	__u32 ifindex;			/* in: device of the lookup; out: device of the route */
	union {
		__u8 tos;		/* in, AF_INET */
		__be32 flowinfo;	/* in, AF_INET6: flow label + traffic class */
		__u32 rt_metric;	/* out */
	};
	union {
		__be32 ipv4_src;
		__u32 ipv6_src[4];
	};
	union {				/* in: destination; out: gateway, if the route has one */
		__be32 ipv4_dst;
		__u32 ipv6_dst[4];
	};
	union {
		struct {
			__be16 h_vlan_proto;
			__be16 h_vlan_TCI;
		};
		__u32 tbid;
	};
	union {
		struct {
			__u32 mark;	/* in, with WG_FIB_LOOKUP_MARK (6.10+) */
			__u32 mark_pad[2];
		};
		struct {
			__u8 smac[6];	/* out */
			__u8 dmac[6];
		};
	};
};

/* Lookup flags (UAPI values; MARK is 6.10+, SKIP_NEIGH 6.3+ upstream). */
#define WG_FIB_LOOKUP_DIRECT		(1U << 0)
#define WG_FIB_LOOKUP_OUTPUT		(1U << 1)
#define WG_FIB_LOOKUP_SKIP_NEIGH	(1U << 2)
#define WG_FIB_LOOKUP_TBID		(1U << 3)
#define WG_FIB_LOOKUP_SRC		(1U << 4)
#define WG_FIB_LOOKUP_MARK		(1U << 5)

/* Return codes (UAPI enum values). */
#define WG_FIB_RET_SUCCESS		0
#define WG_FIB_RET_BLACKHOLE		1
#define WG_FIB_RET_UNREACHABLE		2
#define WG_FIB_RET_PROHIBIT		3
#define WG_FIB_RET_NOT_FWDED		4
#define WG_FIB_RET_FWD_DISABLED		5
#define WG_FIB_RET_UNSUPP_LWT		6
#define WG_FIB_RET_NO_NEIGH		7
#define WG_FIB_RET_FRAG_NEEDED		8
#define WG_FIB_RET_NO_SRC_ADDR		9

/* ---- Source policy (policy.c, tc ingress) --------------------------------
 * A worker writes each decrypted packet behind an Ethernet header whose
 * source MAC is the sending peer's tag, so the sending peer's slot is read
 * from the frame (a source that is not a tag, or slot 0: no peer).
 * wg_policies[slot] picks the peer's policy; WG_POLICY_DEFAULT there means
 * wg_config.policy. wg_policy_cnt holds a row only for slots the loader
 * created (each configured peer, and row 0): a hash without preallocation,
 * so its memory follows the peers configured, not WG_SLOTS x CPUs. */
#define WG_POLICY_DEFAULT	0	/* per-slot only: follow wg_config.policy */
#define WG_POLICY_ALLOWEDIPS	1	/* source's longest match in wg_peers4/6 is this slot */
#define WG_POLICY_FIB		2	/* the route back to the source goes via this slot */
#define WG_POLICY_NFTABLES	3	/* no check: put the slot in skb->mark for nftables */
#define WG_POLICY_OFF		4	/* no check */
#define WG_POLICY_MAX		4

/* Verdicts, one counter each per slot (row 0: packets with no peer tag,
 * e.g. the control plane's own, which pass untouched). */
#define WG_POL_ACCEPTED		0	/* passed the check (or policy off) */
#define WG_POL_DROP_ALLOWEDIPS	1	/* allowedips: source not this peer's: TC_ACT_SHOT */
#define WG_POL_DROP_FIB		2	/* fib: route back goes via another peer or none: SHOT */
#define WG_POL_FIB_FAILED	3	/* fib: no route back (lookup gave no next hop): SHOT */
#define WG_POL_MARKED		4	/* nftables: marked and passed */
#define WG_POL_NOT_IP		5	/* allowedips/fib: no whole IPv4/IPv6 header to check: SHOT */
#define WG_POL_DROP_MARK	6	/* nftables: the slot does not fit under mark_mask, so
					 * nftables could not tell the peer: SHOT */
#define WG_POL_CNT_MAX		8

struct wg_policy_counts {
	__u64 n[WG_POL_CNT_MAX];	/* indexed by WG_POL_* */
};

/* ---- Receive steering (reuseport.c) --------------------------------------
 * WireGuard message header: a little-endian __u32 whose low byte is the
 * type and the rest zero; a data message carries the receiver index next.
 * Position 0 of each reuseport group is the control plane's socket. */
#define WG_MESSAGE_DATA			4
#define WG_MESSAGE_DATA_MIN_LEN		32	/* header 16 + Poly1305 tag 16 */
#define WG_SOCKET_CONTROL		0

/* Spreading one keypair over the workers: a wg_rxindex value with
 * WG_RX_SPREAD set (above every position, which is < 2^16) is not a
 * position but "any of the first W workers", W in its low bits
 * (WG_RX_WORKERS_MASK; the loader stores the current worker count and
 * rewrites spread entries when it changes). A data message then goes to
 * position 1 + (mix(counter >> WG_RX_SPREAD_SHIFT) + index) % W, its
 * counter being the little-endian __u64 at WG_RX_COUNTER_OFFSET and mix()
 * the high half of the run number times the golden ratio (reuseport.c). Runs
 * of 2^WG_RX_SPREAD_SHIFT consecutive counters (128: a sender's GSO burst
 * of at most 64 crosses at most one run's end) stay on one worker. The
 * workers share the keypair's replay window (wireguard/replay.py), since
 * UDP GRO steers a merged burst by its first message. W = 0: control
 * plane. */
#define WG_RX_SPREAD		(1U << 16)
#define WG_RX_WORKERS_MASK	0xffff
#define WG_RX_SPREAD_SHIFT	7
#define WG_RX_COUNTER_OFFSET	8

#endif /* WGEBPF_COMMON_H */
