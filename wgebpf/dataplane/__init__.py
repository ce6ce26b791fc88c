"""Moving packets: the worker processes (worker), the pool that owns them
in the control plane (pool), the channel between the two (channel), the
UDP sockets (udp) and the multi-queue TUN device (tun)."""
