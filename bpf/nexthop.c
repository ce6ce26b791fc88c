/* nexthop.c: pick the peer for every packet leaving the wgebpf device.
 *
 * SCHED_CLS, direct action, on the device's clsact egress hook. The device
 * is a multi-queue TAP made an L3 link (NOARP, common.h), so skb->data is an
 * Ethernet header whose destination is the device's own MAC, and the IP
 * header follows at ETH_HLEN. The kernel has already routed the packet into
 * the device and attached that route to it; built with -DWG_ROUTE_DST (and
 * the WG_OFF_* offsets from the kernel's BTF, wgebpf/kernel/btf.py) this
 * program reads the route's next hop: its gateway, or the destination
 * itself when it has none. So every rule selector and ECMP hash comes out
 * exactly as the kernel decided.
 * Where the packet has no usable route (see route_nexthop) and in builds
 * without WG_ROUTE_DST, it asks the FIB again instead (fib_nexthop), with
 * what it can pass (addresses, L4 ports, protocol, tos/flow label, the
 * device, and the packet's mark for fwmark rules). The peer is the
 * longest-prefix match of the next hop in the peers' allowed-ips
 * (wg_peers4 / wg_peers6). In allowedips mode (WG_CFG_ALLOWEDIPS) the
 * destination is the key and neither is done: classic WireGuard.
 *
 * The verdict has two parts:
 *   the peer   its tag (common.h) replaces the destination MAC: the worker
 *              that reads the frame learns the peer from it. The tag
 *              survives GSO: a super-packet passes tc egress once, and the
 *              kernel segments it later (validate_xmit_skb, the TAP offers
 *              no TSO/USO), copying the whole header block from the MAC
 *              header on, tag included, onto every segment.
 *   the queue  a worker's TAP queue: the peer's own, 1 + (slot - 1) % W for
 *              W workers (wg_config.queues - 1), or with WG_CFG_SPREAD_FLOWS
 *              (PeerSpread) 1 + (flow hash % W), so a flow keeps its worker
 *              and its order (flow_hash); 0 (the control plane's) when no peer
 *              takes it.
 *              It is left in skb->queue_mapping for tun_steer.c, which runs
 *              right after this program in the same __dev_queue_xmit() call
 *              (tc egress first, then the device's queue selection). skb->cb
 *              cannot carry it: tun runs the steering program with
 *              bpf_prog_run_clear_cb(), which zeroes cb. skb->mark must not:
 *              the user routes by it. The steering program could parse the
 *              tag again, but the queue is not the peer, and the flow's
 *              addresses and ports are at hand here, parsed already.
 * Every packet is counted under one reason in wg_counters (common.h), and
 * in nexthop mode under where its next hop came from (WG_CNT_ROUTE_DST or a
 * WG_CNT_FB_* fallback reason).
 * ECMP, fallback only: the lookup hashes the flow (addresses, ports,
 * protocol, as net.ipv4.fib_multipath_hash_policy says), so a flow keeps its
 * peer and flows spread over the paths; the path is not always the one the
 * kernel's own lookup took for the packet (that lookup may hash other
 * inputs, e.g. a source address of 0 before one was chosen), but it is
 * always one of the route's paths.
 *
 * Return value: always TC_ACT_OK. Nothing is dropped here; queue 0 is where
 * the unwanted ones go, so the control plane can tell the sender.
 *
 * Rule selectors the fallback lookup honours: from, to, tos/dsfield, fwmark
 * (6.10+), ipproto, sport, dport. Not honoured: uidrange (the lookup has no
 * socket), iif (the lookup runs as if the packet came in through this
 * device), oif and l3mdev/VRF of the sending socket. Rules keyed on those
 * may choose differently from the kernel's own route.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "common.h"

#define WG_AF_INET	2
#define WG_AF_INET6	10

BPF_TABLE("array", u32, struct wg_config, wg_config, 1);
BPF_F_TABLE("lpm_trie", struct wg_lpm_key4, u32, wg_peers4, WG_PEERS4_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct wg_lpm_key6, u32, wg_peers6, WG_PEERS6_MAX, BPF_F_NO_PREALLOC);
BPF_TABLE("percpu_array", u32, u64, wg_counters, WG_CNT_MAX);
BPF_TABLE("lru_percpu_hash", struct wg_nexthop_key, struct wg_nexthop_stats, wg_nexthops,
       WG_NEXTHOPS_MAX);

static __always_inline void count(u32 index)
{
	u64 *n = wg_counters.lookup(&index);

	/* Per-CPU slot, and tc programs do not nest on one CPU: no atomics. */
	if (n)
		*n += 1;
}

static __always_inline int verdict(struct __sk_buff *skb, u32 queue, u32 reason)
{
	/* The mask is not for the value (queues are < 256) but for the
	 * register: the kernel skips a queue_mapping write whose source is
	 * >= 0xffff compared as 64 bits (bpf_convert_ctx_access), and clang
	 * may leave the upper half of a u32 it computed in 64-bit registers
	 * dirty (here: 1 + hash % workers, the hash's multiplications). The
	 * AND clears both halves above bit 15. */
	skb->queue_mapping = queue & 0xffff;
	count(reason);
	return TC_ACT_OK;
}

static __always_inline int has_ports(u8 proto)
{
	/* Protocols whose header starts with source and destination port, as
	 * the kernel's flow keys read them for multipath hashing. */
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP ||
	       proto == IPPROTO_UDPLITE || proto == IPPROTO_SCTP;
}

/* Make `len` bytes from the IP header on readable. skb->data is the
 * Ethernet header at both tc hooks of the TAP, so the IP header starts at
 * ETH_HLEN. Returns a pointer to the IP header, or NULL. */
static __always_inline void *header(struct __sk_buff *skb, u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (data + ETH_HLEN + len <= end)
		return data + ETH_HLEN;
	/* Rare: headers not in the linear part. Pulling moves the data. */
	if (skb->len < ETH_HLEN + len || bpf_skb_pull_data(skb, ETH_HLEN + len) < 0)
		return NULL;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	return data + ETH_HLEN + len <= end ? data + ETH_HLEN : NULL;
}

/* Fill the lookup from an IPv4 header. Returns 0 or a counter index. */
static __always_inline int parse4(struct __sk_buff *skb, struct wg_fib_lookup *fib)
{
	struct iphdr *ip = header(skb, sizeof(*ip));
	u32 ihl;

	if (!ip || ip->version != 4 || ip->ihl < 5)
		return WG_CNT_TRUNCATED;
	ihl = ip->ihl * 4;
	fib->family = WG_AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	/* Fragments carry no ports (or only the first does): leave them 0 so
	 * every fragment of a datagram takes the same ECMP path. */
	if (has_ports(ip->protocol) && !(ip->frag_off & bpf_htons(0x3fff))) {
		__be16 *ports = header(skb, ihl + 4);

		if (!ports)
			return WG_CNT_TRUNCATED;
		ports = (void *)ports + ihl;
		/* header() may have pulled: re-check against the new end */
		if ((void *)(ports + 2) > (void *)(long)skb->data_end)
			return WG_CNT_TRUNCATED;
		fib->sport = ports[0];
		fib->dport = ports[1];
	}
	return 0;
}

/* Fill the lookup from an IPv6 header. Extension headers are not walked:
 * ports are read only when the L4 header follows the fixed header. */
static __always_inline int parse6(struct __sk_buff *skb, struct wg_fib_lookup *fib)
{
	struct ipv6hdr *ip6 = header(skb, sizeof(*ip6));

	if (!ip6 || ip6->version != 6)
		return WG_CNT_TRUNCATED;
	fib->family = WG_AF_INET6;
	/* The first word minus the version: traffic class and flow label,
	 * which the kernel masks itself (IPV6_FLOWINFO_MASK). */
	fib->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
	fib->l4_protocol = ip6->nexthdr;
	__builtin_memcpy(fib->ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, &ip6->daddr, 16);
	if (has_ports(ip6->nexthdr)) {
		__be16 *ports = header(skb, sizeof(*ip6) + 4);

		if (!ports)
			return WG_CNT_TRUNCATED;
		ports = (void *)ports + sizeof(*ip6);
		if ((void *)(ports + 2) > (void *)(long)skb->data_end)
			return WG_CNT_TRUNCATED;
		fib->sport = ports[0];
		fib->dport = ports[1];
	}
	return 0;
}

/* The address the lookup left in `fib` (destination in, gateway out). */
static __always_inline void key_from_fib(struct wg_nexthop_key *key, struct wg_fib_lookup *fib)
{
	key->family = fib->family;
	if (fib->family == WG_AF_INET)
		__builtin_memcpy(key->addr, &fib->ipv4_dst, 4);
	else
		__builtin_memcpy(key->addr, fib->ipv6_dst, 16);
}

/* One bpf_fib_lookup(). Returns 0 when `fib` now names a next hop, or the
 * counter index of the reason there is none. Each result:
 *   SUCCESS       ipv4_dst/ipv6_dst hold the gateway, or still the
 *                 destination for an on-link route: that is the key.
 *   NO_NEIGH      only without SKIP_NEIGH (kernels before it existed): the
 *                 next hop is filled in before the neighbour lookup that
 *                 failed, and the device is NOARP anyway: use it.
 *   FRAG_NEEDED   with tot_len 0 the kernel checks the skb against the
 *                 result device's MTU after filling in the next hop; the
 *                 packet is already on its way through this device (GSO
 *                 sizes are fine): use it.
 *   BLACKHOLE, UNREACHABLE, PROHIBIT
 *                 the route says "do not deliver": no peer (queue 0).
 *   NOT_FWDED     no route, or a local/broadcast/multicast/anycast one
 *                 (e.g. IPv6 neighbour discovery, MLD): no peer.
 *   FWD_DISABLED  forwarding is off on this device
 *                 (net.ipv4.conf.DEV.forwarding / net.ipv6.conf.DEV.forwarding);
 *                 the runtime must turn it on. No peer, counted so it shows.
 *   UNSUPP_LWT    the route has a lightweight-tunnel encap: no next hop we
 *                 can name. No peer.
 *   NO_SRC_ADDR   only with WG_FIB_LOOKUP_SRC, which we do not pass. No peer.
 *   < 0           helper error (-EINVAL: a flag the kernel does not know).
 *                 No peer, counted as WG_CNT_FIB_ERROR.
 */
static __always_inline int ask_fib(struct __sk_buff *skb, struct wg_fib_lookup *fib,
				      u32 flags)
{
	long rc = bpf_fib_lookup(skb, fib, sizeof(*fib), flags);

	if (rc < 0 || rc > 15)
		return WG_CNT_FIB_ERROR;
	if (rc == WG_FIB_RET_SUCCESS || rc == WG_FIB_RET_NO_NEIGH ||
	    rc == WG_FIB_RET_FRAG_NEEDED)
		return 0;
	return WG_CNT_FIB_RET_BASE + rc;
}

/* Ask the FIB for the next hop; on success overwrite `key` with it.
 * Returns 0 or the counter index of the reason there is no next hop.
 *
 * The first lookup is made as if the packet had come in through this
 * device (no WG_FIB_LOOKUP_OUTPUT), because only a lookup without an output
 * device picks an ECMP path by the flow hash (fib_select_path and
 * fib6_select_path take the first path on the output device otherwise).
 * It can answer with a route through another device: an ECMP route that
 * mixes devices, or a socket bound to this device sending where the routes
 * say elsewhere. Then a second lookup pinned to this device (OUTPUT,
 * ifindex = this device) names the next hop behind it; counted as
 * WG_CNT_FIB_OTHER_DEV. If even that answer is another device (IPv6 only
 * prefers the output device), the destination is the key, as in allowedips
 * mode, counted as WG_CNT_FIB_DEST_FALLBACK.
 * `events`: whether to count those two events in wg_counters (the
 * classifier does; policy.c's reverse-path lookup must not add to the
 * classifier's counters).
 */
static __always_inline int fib_nexthop(struct __sk_buff *skb, struct wg_fib_lookup *fib,
				       struct wg_nexthop_key *key, u32 fib_flags, int events)
{
	struct wg_fib_lookup in;
	int reason;

	fib->ifindex = skb->ifindex;
	fib->mark = skb->mark;
	__builtin_memcpy(&in, fib, sizeof(in));
	reason = ask_fib(skb, fib, fib_flags & ~WG_FIB_LOOKUP_OUTPUT);
	if (!reason && fib->ifindex != skb->ifindex) {
		if (events)
			count(WG_CNT_FIB_OTHER_DEV);
		__builtin_memcpy(fib, &in, sizeof(in));
		reason = ask_fib(skb, fib, fib_flags | WG_FIB_LOOKUP_OUTPUT);
		if (!reason && fib->ifindex != skb->ifindex) {
			if (events)
				count(WG_CNT_FIB_DEST_FALLBACK);
			return 0;	/* key still holds the destination */
		}
	}
	if (reason)
		return reason;
	__builtin_memset(key->addr, 0, sizeof(key->addr));
	key_from_fib(key, fib);
	return 0;
}

#ifdef WG_ROUTE_DST
/* ---- The route the kernel already chose (compiled with -DWG_ROUTE_DST) ----
 * By tc egress the kernel has routed the packet and attached the result to
 * the skb: skb->_skb_refdst, a struct dst_entry pointer (bit 0 is
 * SKB_DST_NOREF, not part of the address). For IPv4 that dst is the start of
 * a struct rtable, for IPv6 of a struct rt6_info; their gateway is the next
 * hop the kernel's own lookup picked, with every rule selector (uidrange,
 * oif, iif, l3mdev), ECMP hash and nexthop object already applied. Reading
 * it instead of asking the FIB again is both exact and cheaper.
 *
 * These structs are kernel-internal, so the offsets (WG_OFF_*) come from the
 * running kernel's BTF at load time (wgebpf/kernel/btf.py); the program can
 * only reach them through bpf_probe_read_kernel (a plain load from ctx at
 * that offset is refused by the verifier). Each read is checked; anything
 * unexpected returns a fallback reason and the caller asks the FIB. */

#define WG_SKB_DST_NOREF	1UL
#define WG_RTF_GATEWAY		0x2	/* include/uapi/linux/ipv6_route.h */

/* Each bpf_probe_read_kernel costs tens of ns, so members that lie close
 * together are read in one go: a span from the lower offset to the end of
 * the higher member. btf.py only accepts layouts where every span fits
 * WG_SPAN_MAX bytes. */
#define WG_MIN(a, b)		((a) < (b) ? (a) : (b))
#define WG_MAX(a, b)		((a) > (b) ? (a) : (b))
#define WG_SPAN_MAX		64
/* dst_entry: dev and ops, 8 bytes each */
#define WG_DST_SPAN_START	WG_MIN(WG_OFF_DST_DEV, WG_OFF_DST_OPS)
#define WG_DST_SPAN_LEN		(WG_MAX(WG_OFF_DST_DEV, WG_OFF_DST_OPS) + 8 - WG_DST_SPAN_START)
/* rtable: rt_gw_family (1 byte) and the rt_gw4/rt_gw6 union (16 bytes) */
#define WG_RT_SPAN_START	WG_MIN(WG_OFF_RT_GW_FAMILY, WG_OFF_RT_GW6)
#define WG_RT_SPAN_LEN		(WG_MAX(WG_OFF_RT_GW_FAMILY + 1, WG_OFF_RT_GW6 + 16) - WG_RT_SPAN_START)
/* rt6_info: rt6i_gateway (16 bytes) and rt6i_flags (4 bytes) */
#define WG_RT6_SPAN_START	WG_MIN(WG_OFF_RT6_GATEWAY, WG_OFF_RT6_FLAGS)
#define WG_RT6_SPAN_LEN		(WG_MAX(WG_OFF_RT6_GATEWAY + 16, WG_OFF_RT6_FLAGS + 4) - WG_RT6_SPAN_START)
_Static_assert(WG_DST_SPAN_LEN <= WG_SPAN_MAX && WG_RT_SPAN_LEN <= WG_SPAN_MAX &&
	       WG_RT6_SPAN_LEN <= WG_SPAN_MAX, "route members too far apart (btf.py checks)");

BPF_TABLE("percpu_array", u32, struct wg_route_seen, wg_route_seen, 1);

static __always_inline int kread(void *dst, u32 size, unsigned long addr)
{
	return bpf_probe_read_kernel(dst, size, (void *)addr);
}

/* Whether the route's dst_ops are of the packet's family and its device is
 * this one: read and compared, or, for the pointers last verified on this
 * CPU (wg_route_seen), known. Returns 0 or a WG_CNT_FB_* reason. */
static __always_inline int check_dst(struct __sk_buff *skb, u8 family,
				     unsigned long ops, unsigned long dev)
{
	u32 zero = 0, index = family == WG_AF_INET6;
	struct wg_route_seen *seen = wg_route_seen.lookup(&zero);
	u16 dst_family = 0;
	int ifindex = 0;

	/* Both are long-lived kernel objects: the dst_ops of a family (one per
	 * network namespace at most) and the device this program is attached
	 * to, which cannot go away while it runs on it. */
	if (seen && seen->ops[index] == ops && seen->dev == dev)
		return 0;
	if (kread(&dst_family, sizeof(dst_family), ops + WG_OFF_DST_OPS_FAMILY))
		return WG_CNT_FB_READ_FAILED;
	/* Not an rtable/rt6_info of this packet's family (e.g. a metadata dst,
	 * or IPv4 in IPv6): its layout is not the one we read. */
	if (dst_family != family)
		return WG_CNT_FB_FOREIGN_DST;
	if (kread(&ifindex, sizeof(ifindex), dev + WG_OFF_DEV_IFINDEX))
		return WG_CNT_FB_READ_FAILED;
	/* A route through another device: its gateway is not a next hop
	 * behind this one. */
	if (ifindex != skb->ifindex)
		return WG_CNT_FB_OTHER_DEVICE;
	if (seen) {
		seen->ops[index] = ops;
		seen->dev = dev;
	}
	return 0;
}

/* The packet's dst entry, checked to be a route of the packet's family on
 * this device. Returns 0 and sets *dst, or a WG_CNT_FB_* reason. */
static __always_inline int packet_dst(struct __sk_buff *skb, u8 family, unsigned long *dst)
{
	u8 head[WG_DST_SPAN_LEN];
	unsigned long refdst = 0, ops, dev;

	if (kread(&refdst, sizeof(refdst), (unsigned long)skb + WG_OFF_SKB_REFDST))
		return WG_CNT_FB_READ_FAILED;
	*dst = refdst & ~WG_SKB_DST_NOREF;
	/* None: injected with AF_PACKET, redirected from another device, or a
	 * BPF_PROG_TEST_RUN packet. */
	if (!*dst)
		return WG_CNT_FB_NO_DST;
	if (kread(head, sizeof(head), *dst + WG_DST_SPAN_START))
		return WG_CNT_FB_READ_FAILED;
	__builtin_memcpy(&ops, head + WG_OFF_DST_OPS - WG_DST_SPAN_START, sizeof(ops));
	__builtin_memcpy(&dev, head + WG_OFF_DST_DEV - WG_DST_SPAN_START, sizeof(dev));
	if (!ops || !dev)
		return WG_CNT_FB_READ_FAILED;
	return check_dst(skb, family, ops, dev);
}

/* IPv4: the rtable's gateway, by its family (RFC 5549 routes carry an IPv6
 * gateway); none means on-link and `key` keeps the destination. */
static __always_inline int route_gateway4(unsigned long rt, struct wg_nexthop_key *key)
{
	u8 span[WG_RT_SPAN_LEN];
	u8 gw_family;

	if (kread(span, sizeof(span), rt + WG_RT_SPAN_START))
		return WG_CNT_FB_READ_FAILED;
	gw_family = span[WG_OFF_RT_GW_FAMILY - WG_RT_SPAN_START];
	if (gw_family == WG_AF_INET) {
		__builtin_memset(key->addr, 0, sizeof(key->addr));
		__builtin_memcpy(key->addr, span + WG_OFF_RT_GW4 - WG_RT_SPAN_START, 4);
	} else if (gw_family == WG_AF_INET6) {
		__builtin_memcpy(key->addr, span + WG_OFF_RT_GW6 - WG_RT_SPAN_START, 16);
	} else if (gw_family != 0) {
		return WG_CNT_FB_FOREIGN_DST;
	}
	if (gw_family)
		key->family = gw_family;
	return 0;
}

/* IPv6: the rt6_info's gateway when the route has one (RTF_GATEWAY); else
 * on-link and `key` keeps the destination. */
static __always_inline int route_gateway6(unsigned long rt, struct wg_nexthop_key *key)
{
	u8 span[WG_RT6_SPAN_LEN];
	u32 flags;

	if (kread(span, sizeof(span), rt + WG_RT6_SPAN_START))
		return WG_CNT_FB_READ_FAILED;
	__builtin_memcpy(&flags, span + WG_OFF_RT6_FLAGS - WG_RT6_SPAN_START, sizeof(flags));
	if (flags & WG_RTF_GATEWAY)
		__builtin_memcpy(key->addr, span + WG_OFF_RT6_GATEWAY - WG_RT6_SPAN_START, 16);
	return 0;
}

/* The next hop of the kernel's own route into `key` (which holds the
 * destination on entry). Returns 0, or the WG_CNT_FB_* reason to fall back
 * to the FIB lookup; on a fallback `key` may be half written, and the
 * caller rebuilds it. */
static __always_inline int route_nexthop(struct __sk_buff *skb, struct wg_nexthop_key *key)
{
	unsigned long dst = 0;
	int reason = packet_dst(skb, key->family, &dst);

	if (reason)
		return reason;
	if (key->family == WG_AF_INET)
		return route_gateway4(dst, key);
	return route_gateway6(dst, key);
}
#endif /* WG_ROUTE_DST */

/* The next hop into `key` (the destination on entry): the kernel's route
 * when this build reads it, else, or when it cannot be read, a FIB lookup.
 * Returns 0 or the counter index of the reason there is no next hop. */
static __always_inline int nexthop_of(struct __sk_buff *skb, struct wg_fib_lookup *fib,
				      struct wg_nexthop_key *key, u32 fib_flags)
{
#ifdef WG_ROUTE_DST
	int fallback = route_nexthop(skb, key);

	if (!fallback) {
		count(WG_CNT_ROUTE_DST);
		return 0;
	}
	count(fallback);
	__builtin_memset(key, 0, sizeof(*key));
	key_from_fib(key, fib);
#endif
	return fib_nexthop(skb, fib, key, fib_flags, 1);
}

static __always_inline void count_nexthop(struct wg_nexthop_key *key, u32 len)
{
	struct wg_nexthop_stats *st = wg_nexthops.lookup(key);
	struct wg_nexthop_stats first = { .packets = 1, .bytes = len };

	if (!st) {
		/* NOEXIST: if another CPU inserted it meanwhile, add to that. */
		if (wg_nexthops.insert(key, &first) == 0)
			return;
		st = wg_nexthops.lookup(key);
		if (!st)
			return;
	}
	st->packets += 1;
	st->bytes += len;
}

/* Longest-prefix match of the key in the family's trie: the slot, or 0. */
static __always_inline u32 peer_of(struct wg_nexthop_key *key)
{
	u32 *slot;

	if (key->family == WG_AF_INET) {
		struct wg_lpm_key4 k4 = { .prefixlen = 32 };

		__builtin_memcpy(k4.addr, key->addr, 4);
		slot = wg_peers4.lookup(&k4);
	} else {
		struct wg_lpm_key6 k6 = { .prefixlen = 128 };

		__builtin_memcpy(k6.addr, key->addr, 16);
		slot = wg_peers6.lookup(&k6);
	}
	return slot ? *slot : 0;
}

/* The peer's tag as the destination MAC. Returns 0 or a counter index.
 * A direct write, not bpf_skb_store_bytes (about 50 ns a packet more): for
 * a program that writes packet data the verifier adds a prologue that makes
 * the linear part writable once (bpf_unclone_prologue); a TCP clone shares
 * only the payload, so that copies nothing there. */
static __always_inline int write_tag(struct __sk_buff *skb, u32 slot)
{
	u8 tag[WG_TAG_LEN] = { WG_TAG_0, WG_TAG_1, slot >> 24, slot >> 16, slot >> 8, slot };
	u8 *data = (u8 *)(long)skb->data;

	/* parse4/parse6 made ETH_HLEN + an IP header readable; checked again
	 * for the verifier */
	if ((void *)(data + WG_ETH_DST + WG_TAG_LEN) > (void *)(long)skb->data_end)
		return WG_CNT_TAG_FAILED;
	__builtin_memcpy(data + WG_ETH_DST, tag, WG_TAG_LEN);
	return 0;
}

/* One round of mixing a word into a hash (multiply by the golden ratio,
 * fold the high bits down). */
static __always_inline u32 mix(u32 h, u32 v)
{
	h = (h ^ v) * 0x9e3779b1;
	return h ^ (h >> 15);
}

/* The packet's flow hash, from the addresses, ports and protocol
 * parse4/parse6 read (fragments have no ports, so all of a datagram's
 * fragments hash alike). Call before the FIB lookup, which overwrites the
 * destination.
 * Not the kernel's skb hash: bpf_get_hash_recalc runs the flow dissector for
 * each packet that has none yet (150-200 ns a packet on 6.18, measured with
 * tests/test_bpf_nexthop.py::test_cost_per_packet: as much as the rest of
 * the classifier), and a TCP socket's hash changes when it retransmits
 * after a timeout (net.core.txrehash), which would move the flow to
 * another worker. This costs a few ns and never changes for a flow. */
static __always_inline u32 flow_hash(struct wg_fib_lookup *fib)
{
	u32 h, i;

	h = mix(fib->l4_protocol, ((u32)fib->sport << 16) | fib->dport);
	if (fib->family == WG_AF_INET)
		return mix(mix(h, fib->ipv4_src), fib->ipv4_dst);
#pragma unroll
	for (i = 0; i < 4; i++)
		h = mix(mix(h, fib->ipv6_src[i]), fib->ipv6_dst[i]);
	return h;
}

/* Tag the packet with `slot` and pick a worker's queue: the peer's own
 * worker, or with WG_CFG_SPREAD_FLOWS one by the flow hash (a flow keeps
 * its worker, so its packets stay in order). */
static __always_inline int to_worker(struct __sk_buff *skb, struct wg_config *cfg, u32 slot,
				     u32 hash)
{
	u32 workers = cfg->queues > 1 ? cfg->queues - 1 : 0;
	int reason;

	if (!workers)
		return verdict(skb, WG_QUEUE_CONTROL, WG_CNT_NO_QUEUE);
	reason = write_tag(skb, slot);
	if (reason)
		return verdict(skb, WG_QUEUE_CONTROL, reason);
	if (!(cfg->flags & WG_CFG_SPREAD_FLOWS))
		hash = slot - 1;
	return verdict(skb, 1 + hash % workers, WG_CNT_PEER);
}

int wg_nexthop(struct __sk_buff *skb)
{
	struct wg_fib_lookup fib = {};
	struct wg_nexthop_key key = {};
	struct wg_config *cfg;
	u32 zero = 0, slot, hash;
	int reason;

	cfg = wg_config.lookup(&zero);
	if (!cfg)	/* cannot happen: an array always has its element */
		return verdict(skb, WG_QUEUE_CONTROL, WG_CNT_NO_PEER);

	/* skb->protocol is the frame's EtherType (set by the stack, or by
	 * eth_type_trans for a test run) */
	if (skb->protocol == bpf_htons(ETH_P_IP))
		reason = parse4(skb, &fib);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		reason = parse6(skb, &fib);
	else
		reason = WG_CNT_NOT_IP;
	if (reason)
		return verdict(skb, WG_QUEUE_CONTROL, reason);

	hash = flow_hash(&fib);
	key_from_fib(&key, &fib);	/* the destination */
	if (!(cfg->flags & WG_CFG_ALLOWEDIPS)) {
		reason = nexthop_of(skb, &fib, &key, cfg->fib_flags);
		if (reason)
			return verdict(skb, WG_QUEUE_CONTROL, reason);
		count_nexthop(&key, skb->len - ETH_HLEN);
	}

	slot = peer_of(&key);
	if (!slot || slot > WG_SLOT_MAX)
		return verdict(skb, WG_QUEUE_CONTROL, WG_CNT_NO_PEER);
	return to_worker(skb, cfg, slot, hash);
}
