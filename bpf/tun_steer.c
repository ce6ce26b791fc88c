/* tun_steer.c: put each packet on its peer's TUN queue.
 *
 * SOCKET_FILTER, attached to the wgebpf TUN device with the ioctl
 * TUNSETSTEERINGEBPF. The kernel runs it when it picks the transmit queue
 * (tun_select_queue), which comes after the tc egress hook in the same
 * __dev_queue_xmit() call, on the same CPU with bottom halves off. The
 * classifier (nexthop.c) has just stored its verdict in skb->queue_mapping;
 * nothing between the two touches that field, and it belongs to this skb,
 * so no other packet can overwrite it in between.
 *
 * Return value: the TUN queue for the packet: the peer's slot (1..255), or
 * 0 for the control plane. The kernel takes it modulo the number of queues,
 * which is why the classifier never hands out a slot >= the queue count.
 *
 * Why not skb->cb: tun runs this program through bpf_prog_run_clear_cb(),
 * which zeroes cb first. Why not skb->mark: the user routes by it.
 */
int wg_tun_steer(struct __sk_buff *skb)
{
	return skb->queue_mapping;
}
