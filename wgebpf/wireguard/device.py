"""The WireGuard interface: identity, peers, session indices, and the settings
the UAPI and the config change.

The device owns no socket or TUN itself: it is handed a `tun` (a
seams.PacketSink) and a `conn` (a seams.DatagramSender, or a ListenSocket
where ListenPort and FwMark can change), so two devices can handshake over
in-memory fakes in a unit test and over the real kernel in production.
Packets flow through send.py and receive.py. Everything else it reaches
outside itself goes through the seams declared in seams.py and attached
with the `attach_*`/`add_*`/`watch_*` methods of Device.
"""

import collections
import errno
import ipaddress
import logging
import os
import threading

from . import receive, send
from .allowedips import AllowedIPs
from .cookie import CookieChecker
from .messages import HANDSHAKES_PER_SECOND_UNDER_LOAD, MAX_PEERS, UNDER_LOAD_AFTER
from .noise import StaticIdentity
from .peer import Peer
from .ratelimiter import RateLimiter
from .histogram import HANDSHAKE_DURATION_BUCKETS, Histogram
from .scheduler import Clock, Scheduler
from .seams import (Dataplane, DatagramSender, IdentityListener, IndexWatcher, ListenSocket,
                    LoadProbe, PacketSink, TimerActions)
from .timers import Timing

log = logging.getLogger("wgebpf")


class DeviceError(OSError):
    """A request the device cannot honour; carries an errno for the UAPI."""

    def __init__(self, message: str, code: int = errno.EINVAL):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class _Actions:
    """What timers may do to a peer, in one process (a seams.TimerActions)."""

    def __init__(self, device: "Device"):
        self.device = device

    def send_handshake_initiation(self, peer, retry: bool) -> None:
        send.send_handshake_initiation(self.device, peer, retry)

    def send_keepalive(self, peer) -> None:
        self.device.dataplane.send_keepalive(peer)

    def zero_key_material(self, peer) -> None:
        self.device.zero_key_material(peer)

    def handshake_gave_up(self, peer) -> None:
        peer.stats.handshakes_failed += 1
        peer.handshake_started = None
        self.device.dataplane.purge_staged(peer)


class LocalDataplane:
    """Sessions live in this process (a seams.Dataplane): unit tests, and the
    reference for dataplane/pool.py's WorkerPool, which implements the same
    hooks across processes."""

    def __init__(self, device: "Device"):
        self.device = device

    def install_keypair(self, peer, keypair) -> None:
        peer.keypairs.add(keypair)
        self.device.release_retired_keypairs(peer)
        if keypair.i_am_the_initiator:
            peer.sent_lastminute_handshake = False
            send.send_keepalive(self.device, peer)

    def send_keepalive(self, peer) -> None:
        send.send_keepalive(self.device, peer)

    def zero_keys(self, peer) -> None:
        peer.keypairs.clear()
        self.device.release_retired_keypairs(peer)

    def endpoint_changed(self, peer) -> None:
        pass

    def purge_staged(self, peer) -> None:
        peer.purge_staged()

    def refresh(self) -> None:
        pass

    def policy_changed(self) -> None:
        pass

    def peer_added(self, peer) -> None:
        pass

    def peer_removed(self, peer) -> None:
        pass

    def allowed_ips_changed(self, peer=None) -> None:
        pass


class Device:
    """One WireGuard interface. Its seams (seams.py), each with a default
    that keeps everything in this process:

      tun, conn        given to the constructor
      actions          what peer timers do (attach_actions; a worker's)
      dataplane        where sessions live (attach_dataplane; the worker
                       pool in the control plane, a worker's own in a worker)
      index_watchers   mirrors of the live indices (add_index_watcher; the
                       XDP guard, a worker)
      external_load    an under-load view besides our own count
                       (watch_external_load; the XDP guard)
      identity_listeners  told when the private key changes
                       (watch_identity; the XDP guard, for mac1)
    """

    def __init__(self, name: str = "wgebpf0", private_key: bytes | None = None, *,
                 clock: Clock | None = None, tun: PacketSink | None = None,
                 conn: DatagramSender | None = None, timing: Timing | None = None,
                 addresses=(), mtu: int = 1420):
        self.name = name
        self.clock = clock or Clock()
        self.scheduler = Scheduler(self.clock)
        self.timing = timing or Timing()
        self.actions: TimerActions = _Actions(self)
        self.dataplane: Dataplane = LocalDataplane(self)
        self.source_policy = "allowedips"
        self.peer_selection = "allowedips"
        self.identity = StaticIdentity(private_key)
        self.tun: PacketSink | None = tun
        # A ListenSocket wherever ListenPort or FwMark can be set; a worker's
        # conn only sends (workers never change settings).
        self.conn: DatagramSender | ListenSocket | None = conn
        self.mtu = mtu
        self.addresses = list(addresses)
        self.fwmark = 0
        self._listen_port = 0
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips = AllowedIPs()
        self.indices: dict[int, tuple] = {}
        self.index_watchers: list[IndexWatcher] = []
        self.ratelimiter = RateLimiter(clock=self.clock.monotonic)
        self.cookie_checker = CookieChecker(self.identity.public_key, self.clock,
                                            self.ratelimiter.allow)
        self.force_under_load = False
        self.external_load: LoadProbe = lambda: False
        self.identity_listeners: list[IdentityListener] = []
        self._handshake_times: collections.deque = collections.deque()
        self._last_under_load = -1e18
        self.drops: collections.Counter = collections.Counter()
        self._last_watcher_warning = -1e18
        self.handshake_durations = Histogram(HANDSHAKE_DURATION_BUCKETS)
        self.lock = threading.RLock()

    # --- seams: who attaches what (seams.py) ------------------------------------------

    def attach_dataplane(self, dataplane: Dataplane) -> None:
        """Where sessions live from now on: control/attach.py gives the
        WorkerPool, dataplane/worker.py its WorkerDataplane. Before any peer
        is added, so no session is left behind in the old one."""
        self.dataplane = dataplane

    def attach_actions(self, actions: TimerActions) -> None:
        """What peer timers do: dataplane/worker.py's WorkerActions ask the
        control plane for a handshake instead of running one. Before any
        peer is added: a Peer's Timers keep the actions they were made with."""
        self.actions = actions

    def add_index_watcher(self, watcher: IndexWatcher) -> None:
        """Mirror live receiver indices into `watcher` from now on (the XDP
        guard from control/attach.py, a worker from dataplane/worker.py).
        Indices already live are not replayed to it."""
        self.index_watchers.append(watcher)

    def watch_external_load(self, probe: LoadProbe) -> None:
        """Also count as under load while `probe()` is true: the XDP guard's
        view of the handshake rate (control/attach.py)."""
        self.external_load = probe

    def watch_identity(self, listener: IdentityListener) -> None:
        """Call `listener()` after every change of the private key (the XDP
        guard recomputes mac1 with the new public key; control/attach.py)."""
        self.identity_listeners.append(listener)

    def identity_changed(self) -> None:
        for listener in self.identity_listeners:
            listener()

    # --- identity and socket settings -------------------------------------------

    @property
    def private_key(self) -> bytes | None:
        return self.identity.private_key

    @property
    def public_key(self) -> bytes | None:
        return self.identity.public_key

    @property
    def listen_port(self) -> int:
        return self.conn.listen_port if self.conn is not None else self._listen_port

    def set_private_key(self, key: bytes | None) -> None:
        if key == self.identity.private_key:
            return
        self.identity.set(key)
        self.cookie_checker.set_public_key(self.identity.public_key)
        # A peer with our own public key can never handshake: wg drops it.
        if self.identity.public_key in self.peers:
            self.remove_peer(self.identity.public_key)
        for peer in self.peers.values():
            peer.handshake.precompute(self.identity)
            self.zero_key_material(peer)
        self.identity_changed()

    def set_listen_port(self, port: int) -> None:
        if self.conn is not None:
            self.conn.rebind(port)
        else:
            self._listen_port = port

    def set_fwmark(self, mark: int) -> None:
        from .sourcepolicy import nftables_mark_conflict
        previous, self.fwmark = self.fwmark, mark
        problem = nftables_mark_conflict(self)
        if problem:
            self.fwmark = previous
            raise DeviceError(problem)
        if self.conn is not None:
            self.conn.set_mark(mark)

    # --- peers ---------------------------------------------------------------------

    def add_peer(self, public_key: bytes) -> Peer:
        peer = self.peers.get(public_key)
        if peer is not None:
            return peer
        if public_key == self.identity.public_key:
            raise DeviceError("a peer cannot have the interface's own public key")
        if len(self.peers) >= MAX_PEERS:
            raise DeviceError("too many peers", errno.ENOSPC)
        peer = Peer(self, public_key)
        try:
            self.dataplane.peer_added(peer)      # may refuse: no queue left
        except BaseException:
            peer.timers.stop()
            raise
        self.peers[public_key] = peer
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        peer.timers.stop()
        self.zero_key_material(peer)
        peer.purge_staged()
        self.allowed_ips.remove_by_peer(peer)
        self.dataplane.peer_removed(peer)      # first: a worker pool unmaps its sessions
        self.forget_indices_of(peer)
        peer.handshake.wipe()

    def remove_all_peers(self) -> None:
        for key in list(self.peers):
            self.remove_peer(key)

    def peer_by_static(self, public_key: bytes):
        peer = self.peers.get(public_key)
        return peer.handshake if peer is not None else None

    def allowed_ips_of(self, peer) -> list:
        return self.allowed_ips.entries_for(peer)

    def add_allowed_ip(self, peer, network) -> None:
        self.allowed_ips.insert(ipaddress.ip_network(network, strict=False), peer)
        self.dataplane.allowed_ips_changed(peer)

    def clear_allowed_ips(self, peer) -> None:
        self.allowed_ips.remove_by_peer(peer)
        self.dataplane.allowed_ips_changed(peer)

    # --- session indices (receiver index -> handshake or keypair) -----------------

    # Watchers mirror the live indices elsewhere: the XDP guard's map (so it
    # can drop data for dead sessions), or, in a worker, the list of
    # released indices it reports to the control plane. Every index that
    # dies goes through forget_index, so the watchers keep no stale ones.

    # At most one warning per this many seconds about failing watchers.
    WATCHER_WARNING_INTERVAL = 10.0

    def new_index(self, peer, owner) -> int | None:
        """A fresh receiver index for `owner`, known to every watcher; or
        None (counted as an "index_refused" drop) when a watcher cannot take
        it, e.g. the XDP guard's map is full: the caller then starts no
        session, since the guard would drop every message naming it."""
        index = self._unused_index()
        self.indices[index] = (peer, owner)
        for watcher in self.index_watchers:
            try:
                watcher.add_index(index)
            except (OSError, KeyError) as exc:      # a full BPF hash map: E2BIG, ENOMEM
                self.forget_index(index)
                self.drop("index_refused", peer)
                self._warn("%s: no session index for %s, handshake refused (%s: %r)",
                           self.name, peer, type(watcher).__name__, exc)
                return None
        return index

    def _unused_index(self) -> int:
        while True:
            index = int.from_bytes(os.urandom(4), "little")
            if index and index not in self.indices:
                return index

    def forget_index(self, index: int) -> None:
        if self.indices.pop(index, None) is None:
            return
        for watcher in self.index_watchers:
            try:
                watcher.remove_index(index)
            except (OSError, KeyError) as exc:
                self._warn("%s: index watcher %s could not remove an index: %r",
                           self.name, type(watcher).__name__, exc)

    drop_index = forget_index

    def forget_handshake_index(self, peer) -> None:
        """The index of the peer's handshake dies: a new handshake (ours or
        the peer's) supersedes it, or the keys are zeroed."""
        index = peer.handshake.local_index
        entry = self.indices.get(index)
        if entry is not None and entry[1] is peer.handshake:
            self.forget_index(index)
        peer.handshake.local_index = 0

    def forget_indices_of(self, peer) -> None:
        """Whatever index still names a removed peer dies with it."""
        for index in [i for i, (owner, _) in self.indices.items() if owner is peer]:
            self.forget_index(index)

    def _warn(self, message: str, *args) -> None:
        """log.warning, at most once per WATCHER_WARNING_INTERVAL: with a full
        map every handshake fails, and that must not flood the log."""
        now = self.clock.monotonic()
        if now - self._last_watcher_warning >= self.WATCHER_WARNING_INTERVAL:
            self._last_watcher_warning = now
            log.warning(message, *args)

    def release_retired_keypairs(self, peer) -> None:
        for keypair in peer.keypairs.take_retired():
            entry = self.indices.get(keypair.local_index)
            if entry is not None and entry[1] is keypair:
                self.forget_index(keypair.local_index)

    def install_keypair(self, peer, keypair) -> None:
        """A new session: it takes over the handshake's index, and goes to
        whoever owns the peer's data plane."""
        self.indices[keypair.local_index] = (peer, keypair)
        self.dataplane.install_keypair(peer, keypair)

    def zero_key_material(self, peer) -> None:
        """Forget every key of a peer (after 3 x REJECT_AFTER_TIME, or on removal)."""
        self.dataplane.zero_keys(peer)
        self.forget_handshake_index(peer)
        peer.handshake.clear()

    def drop(self, reason: str, peer=None, count: int = 1) -> None:
        """Count a dropped packet by reason, and against its peer when known."""
        self.drops[reason] += count
        if peer is not None:
            peer.drops[reason] += count

    # --- load ----------------------------------------------------------------------------

    def note_handshake_message(self) -> bool:
        """Record one incoming handshake message; True while under load.

        Under load (more than HANDSHAKES_PER_SECOND_UNDER_LOAD in the last
        second, and for UNDER_LOAD_AFTER after) we answer with cookies instead
        of spending DH operations.
        """
        now = self.clock.monotonic()
        times = self._handshake_times
        times.append(now)
        while times and now - times[0] > 1.0:
            times.popleft()
        if (self.force_under_load or len(times) > HANDSHAKES_PER_SECOND_UNDER_LOAD
                or self.external_load()):
            self._last_under_load = now
            return True
        return now - self._last_under_load < UNDER_LOAD_AFTER

    # --- packet entry points -------------------------------------------------------

    def on_tun_packet(self, packet: bytes) -> None:
        send.packet_from_tun(self, packet)

    def on_datagram(self, data: bytes, source: tuple) -> None:
        receive.handle_datagram(self, data, source)

    def close(self) -> None:
        self.remove_all_peers()
