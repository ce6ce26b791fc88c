/* policy.c: the source-address check, per peer, on the wgebpf device's ingress.
 *
 * SCHED_CLS, direct action, on the TAP device's clsact ingress hook. A worker
 * writes each decrypted packet behind an Ethernet header of its own making:
 * destination the device's MAC, source the sending peer's tag
 * {WG_TAG_0, WG_TAG_1, slot BE32} (common.h). So the sending peer is exact:
 * the slot is read from the source MAC, whichever worker wrote the frame.
 * A remote peer cannot forge it: the worker builds that header itself in
 * front of the decrypted IP packet, from the peer whose keys decrypted it;
 * nothing a peer sends is copied into it, and the IP packet behind it is
 * parsed at ETH_HLEN, never as a header. This runs before the kernel's IP
 * stack (and nftables' prerouting) sees the packet.
 *
 * Compiled after nexthop.c in one text (bpfmaps.compile_programs): it shares
 * the classifier's maps (wg_config, the allowed-ips tries wg_peers4/6) and
 * its helpers (header parsing, the FIB lookup with its ECMP and other-device
 * handling, the trie lookup), so both directions agree on what a next hop is.
 *
 * Policy of a peer: wg_policies[slot], or wg_config.policy when that is
 * WG_POLICY_DEFAULT (common.h):
 *   allowedips  the source's longest match in the allowed-ips tries must be
 *               this slot (classic WireGuard).
 *   fib         reverse-path check: look the source up in the FIB as a
 *               destination, as the classifier does for an outgoing packet
 *               of the reply's flow (addresses and ports swapped, same tos,
 *               mark and flags); the route's next hop (its gateway, or the
 *               source itself when the route has none) must belong to this
 *               slot. So a classic config (allowed-ips and on-link routes)
 *               passes, and an `ip route replace` moves acceptance at once.
 *               No route back (unreachable, blackhole, local, forwarding off
 *               on the device, ...) drops. ECMP: the lookup picks one
 *               path by the flow hash, so with a route spread over several
 *               peers a flow is accepted from one of them only: for IPv4 the
 *               one the classifier sends its replies to (same addresses,
 *               ports and tos); for IPv6 the hash also takes the flow label,
 *               and the replies' label is not the incoming one. Give peers
 *               that share an ECMP route another policy if the far side
 *               does not hash the same way.
 *   nftables    no check: the slot goes into skb->mark under
 *               wg_config.mark_mask, the other mark bits kept; the table
 *               wgebpf/kernel/nftables.py installs drops what does not match.
 *   off         no check.
 *               A slot that does not fit under the mask is dropped
 *               (WG_POL_DROP_MARK): unmarked, nftables would let it by.
 * Frames whose source MAC is not a tag, or the tag of slot 0 (the control
 * plane's own packets, e.g. its ICMP errors), pass untouched, counted in
 * row 0.
 *
 * Return value: TC_ACT_OK (let the stack have it) or TC_ACT_SHOT (drop).
 * Every packet is counted once in wg_policy_cnt[slot].n[WG_POL_*], if the
 * loader made the slot's row (it does for each configured peer and row 0).
 */

BPF_TABLE("array", u32, u32, wg_policies, WG_SLOTS);
/* A hash, not an array: a per-CPU array would preallocate WG_SLOTS rows of
 * 64 bytes on every CPU; the loader adds a row per peer and removes it. */
BPF_F_TABLE("percpu_hash", u32, struct wg_policy_counts, wg_policy_cnt, WG_SLOTS,
	    BPF_F_NO_PREALLOC);

static __always_inline int policy_verdict(u32 slot, u32 reason, int action)
{
	struct wg_policy_counts *c = wg_policy_cnt.lookup(&slot);

	/* Per-CPU row, and tc programs do not nest on one CPU: no atomics. No
	 * row: a slot with no peer configured (being removed); its packet is
	 * judged, not counted: inserting here could revive a removed row. */
	if (c && reason < WG_POL_CNT_MAX)
		c->n[reason] += 1;
	return action;
}

/* The sending peer's slot from the frame's source MAC: 0 unless it is a
 * tag (WG_TAG_0, WG_TAG_1, slot BE32) of a slot in 1..WG_SLOT_MAX. */
static __always_inline u32 sender_slot(struct __sk_buff *skb)
{
	u8 *data = (u8 *)(long)skb->data;
	u8 *mac = data + WG_ETH_SRC;
	u32 slot;

	/* The Ethernet header is always in the linear part (eth_type_trans
	 * pulled it), so direct access suffices. */
	if ((void *)(mac + WG_TAG_LEN) > (void *)(long)skb->data_end)
		return 0;
	if (mac[0] != WG_TAG_0 || mac[1] != WG_TAG_1)
		return 0;
	slot = ((u32)mac[2] << 24) | ((u32)mac[3] << 16) | ((u32)mac[4] << 8) | mac[5];
	return slot <= WG_SLOT_MAX ? slot : 0;
}

/* nftables: the slot into skb->mark under mark_mask, other bits kept. */
static __always_inline int mark_peer(struct __sk_buff *skb, struct wg_config *cfg, u32 slot)
{
	u32 shift = cfg->mark_shift & 31;

	if (slot > cfg->mark_mask >> shift)
		return policy_verdict(slot, WG_POL_DROP_MARK, TC_ACT_SHOT);
	skb->mark = (skb->mark & ~cfg->mark_mask) | ((slot << shift) & cfg->mark_mask);
	return policy_verdict(slot, WG_POL_MARKED, TC_ACT_OK);
}

/* The lookup filled from the packet, turned into the reply's: the source
 * becomes the destination, and the ports swap, so an ECMP route hashes the
 * flow the way the classifier will hash the replies. */
static __always_inline void reverse(struct wg_fib_lookup *fib)
{
	__be16 port = fib->sport;
	__u32 addr[4];

	fib->sport = fib->dport;
	fib->dport = port;
	if (fib->family == WG_AF_INET) {
		addr[0] = fib->ipv4_src;
		fib->ipv4_src = fib->ipv4_dst;
		fib->ipv4_dst = addr[0];
	} else {
		__builtin_memcpy(addr, fib->ipv6_src, 16);
		__builtin_memcpy(fib->ipv6_src, fib->ipv6_dst, 16);
		__builtin_memcpy(fib->ipv6_dst, addr, 16);
	}
}

/* allowedips and fib: does the packet's source belong to `slot`? */
static __always_inline int check_source(struct __sk_buff *skb, u32 slot, u32 policy,
					u32 fib_flags)
{
	struct wg_fib_lookup fib = {};
	struct wg_nexthop_key key = {};
	int reason;

	if (skb->protocol == bpf_htons(ETH_P_IP))
		reason = parse4(skb, &fib);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		reason = parse6(skb, &fib);
	else
		reason = WG_CNT_NOT_IP;
	if (reason)	/* no source to check; the stack would drop it anyway */
		return policy_verdict(slot, WG_POL_NOT_IP, TC_ACT_SHOT);

	reverse(&fib);
	key_from_fib(&key, &fib);	/* the source */
	if (policy == WG_POLICY_FIB) {
		if (fib_nexthop(skb, &fib, &key, fib_flags, 0))
			return policy_verdict(slot, WG_POL_FIB_FAILED, TC_ACT_SHOT);
		if (peer_of(&key) != slot)
			return policy_verdict(slot, WG_POL_DROP_FIB, TC_ACT_SHOT);
		return policy_verdict(slot, WG_POL_ACCEPTED, TC_ACT_OK);
	}
	if (peer_of(&key) != slot)
		return policy_verdict(slot, WG_POL_DROP_ALLOWEDIPS, TC_ACT_SHOT);
	return policy_verdict(slot, WG_POL_ACCEPTED, TC_ACT_OK);
}

int wg_policy(struct __sk_buff *skb)
{
	u32 zero = 0, slot, policy;
	struct wg_config *cfg;
	u32 *own;

	slot = sender_slot(skb);
	if (!slot)	/* not from a peer: the control plane's, or no tag */
		return policy_verdict(0, WG_POL_ACCEPTED, TC_ACT_OK);

	cfg = wg_config.lookup(&zero);
	if (!cfg)	/* cannot happen: an array always has its element */
		return TC_ACT_SHOT;
	own = wg_policies.lookup(&slot);
	policy = own && *own != WG_POLICY_DEFAULT ? *own : cfg->policy;

	switch (policy) {
	case WG_POLICY_OFF:
		return policy_verdict(slot, WG_POL_ACCEPTED, TC_ACT_OK);
	case WG_POLICY_NFTABLES:
		return mark_peer(skb, cfg, slot);
	case WG_POLICY_FIB:
		return check_source(skb, slot, WG_POLICY_FIB, cfg->fib_flags);
	default:	/* allowedips, and 0 or unknown values: the safe rule */
		return check_source(skb, slot, WG_POLICY_ALLOWEDIPS, cfg->fib_flags);
	}
}
