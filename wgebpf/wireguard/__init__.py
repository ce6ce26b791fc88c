"""The WireGuard protocol, as the whitepaper and kernel WireGuard define it:
messages, Noise IKpsk2, cookies, replay window, timers, peers and the
device that ties them together. Pure Python and the kernel's clock only:
it imports nothing from the other layers, and reaches sockets, TUN queues
and eBPF maps through the seams Device declares (device.Dataplane,
device.HandshakeActions)."""
