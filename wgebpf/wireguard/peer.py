"""A WireGuard peer: its handshake, keypairs, endpoint, staged packets and counters."""

import collections

from .cookie import CookieGenerator
from .crypto import ZERO_KEY
from .messages import MAX_STAGED_PACKETS
from .noise import Handshake, Keypairs
from .timers import Timers


class PeerStats:
    """Counters a peer keeps beyond wg's rx/tx bytes (exported as metrics)."""

    __slots__ = ("tx_packets", "rx_packets", "handshakes_completed", "handshakes_failed",
                 "handshakes_sent")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


class Peer:
    def __init__(self, device, public_key: bytes):
        self.device = device
        self.clock = device.clock
        self.public_key = public_key
        self.handshake = Handshake(remote_static=public_key)
        self.handshake.precompute(device.identity)
        self.keypairs = Keypairs()
        self.cookie = CookieGenerator(public_key, device.clock)
        self.endpoint: tuple[str, int] | None = None
        self.queue = 0                          # the peer's slot with the worker pool (its tag)
        self.source_policy: str | None = None   # per-peer override of SourcePolicy
        self.persistent_keepalive_interval = 0
        self.staged: collections.deque = collections.deque()
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.last_handshake_time = 0.0          # wall clock, 0 = never
        self.last_sent_handshake = -1e18        # monotonic
        self.handshake_started: float | None = None   # first initiation of this attempt
        self.keypair_installed_at: float | None = None
        self.sent_lastminute_handshake = False
        self.stats = PeerStats()
        self.drops: collections.Counter = collections.Counter()   # by reason
        self.timers = Timers(self, device.scheduler, device.actions, device.timing)

    def __repr__(self) -> str:
        import base64
        return f"peer({base64.b64encode(self.public_key).decode()[:8]}…)"

    # --- the settable attributes of the UAPI and the config --------------------

    @property
    def preshared_key(self) -> bytes:
        return self.handshake.preshared_key

    def set_preshared_key(self, key: bytes | None) -> None:
        self.handshake.preshared_key = key or ZERO_KEY

    def set_endpoint(self, endpoint: tuple[str, int] | None) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            self.device.dataplane.endpoint_changed(self)

    def set_persistent_keepalive(self, seconds: int) -> None:
        was = self.persistent_keepalive_interval
        self.persistent_keepalive_interval = seconds
        if seconds and not was and self.endpoint is not None:
            # Like wireguard-go: turning it on sends one at once, so a peer
            # behind NAT becomes reachable without waiting an interval.
            self.device.dataplane.send_keepalive(self)
        if not seconds:
            self.timers.persistent_keepalive.cancel()

    # --- staged packets (queued while a handshake runs) ------------------------

    def stage(self, packet: bytes) -> None:
        if len(self.staged) >= MAX_STAGED_PACKETS:
            self.staged.popleft()           # keep the newest, like the kernel
            self.device.drop("no_session", self)
        self.staged.append(packet)

    def purge_staged(self) -> None:
        if self.staged:
            self.device.drop("no_session", self, len(self.staged))
        self.staged.clear()
