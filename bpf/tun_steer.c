/* tun_steer.c: put each packet on the TAP queue the classifier chose.
 *
 * SOCKET_FILTER, attached to the wgebpf device with the ioctl
 * TUNSETSTEERINGEBPF. The kernel runs it when it picks the transmit queue
 * (tun_select_queue), which comes after the tc egress hook in the same
 * __dev_queue_xmit() call, on the same CPU with bottom halves off. The
 * classifier (nexthop.c) has just stored its verdict in skb->queue_mapping;
 * nothing between the two touches that field, and it belongs to this skb,
 * so no other packet can overwrite it in between.
 *
 * Return value: the TAP queue for the packet. Queues are workers, not peers:
 * 1..W is the worker the classifier picked by the packet's flow hash (the
 * peer travels in the packet, as a tag in the destination MAC), 0 is the
 * control plane's (no peer). The kernel takes the result modulo the number
 * of queues; the classifier only hands out queues below wg_config.queues.
 *
 * Why not skb->cb: tun runs this program through bpf_prog_run_clear_cb(),
 * which zeroes cb first. Why not skb->mark: the user routes by it.
 */
int wg_tun_steer(struct __sk_buff *skb)
{
	return skb->queue_mapping;
}
