/* reuseport.c: send each incoming WireGuard data message to the socket of
 * the worker that owns its receiver index.
 *
 * SOCKET_FILTER, attached with SO_ATTACH_REUSEPORT_EBPF to a UDP
 * SO_REUSEPORT group (one for IPv4, one for IPv6; the same program serves
 * both). The kernel runs it for each datagram with skb->data at the UDP
 * payload, i.e. the WireGuard message.
 *
 * Return value: the position (join order) of the socket in the group.
 *   wg_rxindex[receiver index]   a data message (type 4) whose receiver
 *                                index a worker owns: that worker's socket
 *   1 + (mix(counter >> WG_RX_SPREAD_SHIFT) + index) % W
 *                                a data message whose index is spread over
 *                                W workers (entry WG_RX_SPREAD | W): the
 *                                worker picked by its counter's run of
 *                                2^WG_RX_SPREAD_SHIFT, so one session's
 *                                bursts spread over every worker. The
 *                                workers share the session's replay window
 *                                (wireguard/replay.py): with UDP GRO the
 *                                kernel merges a burst before this program
 *                                runs and steers it by its first message,
 *                                so steering alone could not keep the copies
 *                                of a counter together.
 *   WG_SOCKET_CONTROL (0)        everything else: handshake initiations and
 *                                responses, cookie replies, unknown indexes,
 *                                short or malformed messages. The control
 *                                plane owns socket 0 and deals with them.
 * A position the group does not have makes the kernel fall back to its
 * hash; the loader only stores positions of sockets that exist.
 */
#include "common.h"

BPF_HASH(wg_rxindex, u32, u32, WG_RXINDEX_MAX);

/* 2^64 / golden ratio: Fibonacci hashing of the counter's run number. Here,
 * not in common.h: the layout test reads constants through 32-bit map
 * sizes; wgebpf/kernel/reuseport.py mirrors it (RX_MIX), and a test runs
 * this program against the mirror. */
#define RX_MIX	0x9E3779B97F4A7C15ULL

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

/* The worker of a counter of a spread index: runs of 2^WG_RX_SPREAD_SHIFT
 * counters per worker, the run number mixed (Fibonacci hashing) so that a
 * sender whose counters come in blocks owned by one of its own workers
 * (wireguard/counters.py: blocks k with k % W == w) still reaches every
 * receiving worker, offset by the index so that keypairs differ. */
static __always_inline u32 spread_position(struct __sk_buff *skb, u32 index, u32 entry)
{
	u64 counter;
	u32 workers = entry & WG_RX_WORKERS_MASK;

	if (!workers)
		return WG_SOCKET_CONTROL;
	if (bpf_skb_load_bytes(skb, WG_RX_COUNTER_OFFSET, &counter, sizeof(counter)) < 0)
		return WG_SOCKET_CONTROL;
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	counter = __builtin_bswap64(counter);
#endif
	u32 mixed = (u32)(((counter >> WG_RX_SPREAD_SHIFT) * RX_MIX) >> 32);

	return 1 + (u32)(((u64)mixed + index) % workers);
}

int wg_reuseport(struct __sk_buff *skb)
{
	u32 head[2];	/* type + 3 reserved zero bytes, receiver index */
	u32 index, *entry;

	if (skb->len < WG_MESSAGE_DATA_MIN_LEN)
		return WG_SOCKET_CONTROL;
	if (bpf_skb_load_bytes(skb, 0, head, sizeof(head)) < 0)
		return WG_SOCKET_CONTROL;
	/* The whole first word, so nonzero reserved bytes are not data. */
	if (le32(head[0]) != WG_MESSAGE_DATA)
		return WG_SOCKET_CONTROL;
	index = le32(head[1]);
	entry = wg_rxindex.lookup(&index);
	if (!entry)
		return WG_SOCKET_CONTROL;
	if (*entry & WG_RX_SPREAD)
		return spread_position(skb, index, *entry);
	return *entry;
}
