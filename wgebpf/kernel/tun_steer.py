"""Worker queues: loader for bpf/tun_steer.c (TUNSETSTEERINGEBPF).

The steering program returns skb->queue_mapping, where the egress classifier
(nexthop.py) left the packet's queue: a peer's packet (tagged with its slot
in the destination MAC) -> worker queue 1 + flow hash % workers, no peer ->
queue 0, the control plane's. Attach it before the device carries traffic:
without it the kernel spreads packets over every queue by flow hash, queue 0
included, so the control plane would get peers' packets and workers
untagged ones.
"""

from __future__ import annotations

from typing import Protocol

from . import bpfmaps as m


class SteerableTun(Protocol):
    """What steering needs of the device (dataplane/tun.py's Tun, a TAP)."""

    fds: list

    def set_steering_program(self, prog_fd: int) -> None: ...


class TunSteering:
    """The steering program of one multi-queue device.

    Pass the NextHopClassifier to reuse the program compiled with it (no
    second compile); without one, tun_steer.c is compiled on its own.
    """

    def __init__(self, tun: SteerableTun, classifier=None):
        self.tun = tun
        self.bpf = None
        if classifier is not None:
            self.prog_fd = classifier.steering_fd
        else:
            self.bpf = m.compile_programs("tun_steer.c")
            self.prog_fd = self.bpf.load_func(b"wg_tun_steer", self.bpf.SOCKET_FILTER).fd
        self.attached = False

    @property
    def prog_id(self) -> int:
        return m.prog_info(self.prog_fd).id

    def attach(self) -> None:
        """Install the program on the device (it holds its own reference)."""
        self.tun.set_steering_program(self.prog_fd)
        self.attached = True

    def detach(self) -> None:
        """Back to the kernel's own queue choice; a closed Tun is fine."""
        if self.attached and self.tun.fds:
            self.tun.set_steering_program(-1)
        self.attached = False

    def close(self) -> None:
        try:
            self.detach()
        finally:
            if self.bpf is not None:
                self.bpf.cleanup()

    def __enter__(self) -> "TunSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
