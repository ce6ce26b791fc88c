"""A crypto worker process: the data plane of the peers it owns.

The control plane (dataplane/pool.py) starts `python -m wgebpf.dataplane.worker FD` and
hands it, over the channel on FD, its UDP sockets (its position in each
SO_REUSEPORT group) and one TUN queue per owned peer. From then on, for
those peers only, this process:

  send:    reads the peer's TUN queue (the tc classifier already chose the
           peer: nothing here looks up a route or a peer), encrypts with
           the current keypair and sends from its own UDP socket;
  receive: gets the data messages whose receiver index the reuseport
           program maps to this worker, checks replay, decrypts, checks the
           inner source (SourcePolicy) and writes to the peer's TUN queue.

It owns the peers' keypairs, counters and replay windows; nothing else
touches them. It never handshakes: when a peer needs keys it asks the
control plane, which runs the handshake and sends back the keypair. Timer
events (data sent, data received, ...) are batched to the control plane,
which owns the timers; what the timers decide (a keepalive, zeroing keys)
comes back as a message.
"""

import logging
import os
import selectors
import signal
import socket
import sys
import time

from . import channel
from .commands import (EndpointLearned, HandshakeConfirmed, Init, InstallKeypair, MovedKeypair,
                       NeedHandshake, PeerAdd, PeerRemove, PeerState, PeerTraffic, PurgeStaged,
                       ReleasedIndices, ReplaceSockets, SendKeepalive, SendStaged, SetEndpoint,
                       SocketsDone, Stats, StatsRequest, Stop, TimerEvents, ZeroKeys)
from ..wireguard import send
from . import tcpgro
from .batch import ReceiveBatch, SendBatch, TunGone
from .udp import SegmentSender, enable_gro
from ..wireguard.device import Device, LocalDataplane
from ..wireguard.noise import Keypair
from ..wireguard.timers import Timing

log = logging.getLogger("wgebpf")

STATS_INTERVAL = 0.5
# Timer events reach the control plane this long after the first of a
# batch. They are flags, so a batch loses nothing, and the timers they feed
# run in seconds. One message per wake-up cost a pickle and two system calls
# per few packets under load, and woke the control plane right when the
# packet's answer was on its way (ping latency).
EVENT_INTERVAL = 0.05
HANDSHAKE_REQUEST_INTERVAL = 1.0

# Timer events, in the order the control plane applies a batch of them.
AUTH_RECEIVED, DATA_RECEIVED, AUTH_SENT, DATA_SENT, TRAVERSAL = 1, 2, 4, 8, 16
EVENT_ORDER = (AUTH_RECEIVED, DATA_RECEIVED, AUTH_SENT, DATA_SENT, TRAVERSAL)


class EventRecorder:
    """Stands in for a peer's Timers in a worker: records the hooks' events
    for the control plane instead of arming timers here."""

    def __init__(self, worker: "Worker", slot: int):
        self.worker = worker
        self.slot = slot
        self.handshake_attempts = 0

    def _flag(self, bit: int) -> None:
        events = self.worker.events
        events[self.slot] = events.get(self.slot, 0) | bit

    def data_sent(self):
        self._flag(DATA_SENT)

    def data_received(self):
        self._flag(DATA_RECEIVED)

    def any_authenticated_packet_sent(self):
        self._flag(AUTH_SENT)

    def any_authenticated_packet_received(self):
        self._flag(AUTH_RECEIVED)

    def any_authenticated_packet_traversal(self):
        self._flag(TRAVERSAL)

    def handshake_complete(self):
        self.worker.outbox.append(HandshakeConfirmed(self.slot))

    def stop(self):
        pass


class WorkerActions:
    def __init__(self, worker: "Worker"):
        self.worker = worker

    def send_handshake_initiation(self, peer, retry: bool) -> None:
        self.worker.request_handshake(peer)

    def send_keepalive(self, peer) -> None:
        send.send_keepalive(self.worker.device, peer)

    def zero_key_material(self, peer) -> None:
        self.worker.device.dataplane.zero_keys(peer)

    def handshake_gave_up(self, peer) -> None:
        peer.purge_staged()


class WorkerDataplane(LocalDataplane):
    """Sessions live here, as in LocalDataplane; a roamed endpoint is also
    told to the control plane, which owns endpoints."""

    def __init__(self, worker: "Worker"):
        super().__init__(worker.device)
        self.worker = worker

    def endpoint_changed(self, peer) -> None:
        self.worker.outbox.append(EndpointLearned(peer.queue, peer.endpoint))


class WorkerConn:
    """The worker's own pair of reuseport sockets (IPv4, IPv6), coalescing
    on receive (UDP GRO) where the kernel allows it."""

    def __init__(self, fds: list[int]):
        self.sockets = [socket.socket(fileno=fd) for fd in fds]
        for sock in self.sockets:
            sock.setblocking(False)
            enable_gro(sock)
        self.segments = SegmentSender()
        self.send_errors = 0

    def socket_for(self, endpoint: tuple) -> socket.socket:
        return self.sockets[1] if ":" in endpoint[0] else self.sockets[0]

    def send(self, data: bytes, endpoint: tuple) -> None:
        try:
            self.socket_for(endpoint).sendto(data, endpoint)
        except OSError:
            self.send_errors += 1

    def send_run(self, sock: socket.socket, view: memoryview, size: int, endpoint: tuple) -> None:
        """Back-to-back datagrams of `size` bytes (the last may be shorter)."""
        self.segments.send(sock, view, size, endpoint)

    def take_send_errors(self) -> int:
        errors = self.send_errors + self.segments.errors
        self.send_errors = self.segments.errors = 0
        return errors

    def replace(self, fds: list[int]) -> None:
        old = self.sockets
        self.__init__(fds)
        for sock in old:
            sock.close()


class WorkerTun:
    """The TUN queues of the owned peers, by slot (= queue number). With
    vnet_hdr every read and write carries a virtio-net header (tun.py)."""

    def __init__(self, vnet_hdr: bool = False):
        self.fds: dict[int, int] = {}
        self.vnet_hdr = vnet_hdr
        self.write_errors = 0

    def write(self, packet: bytes, queue: int) -> None:
        fd = self.fds.get(queue)
        if fd is None:
            return
        try:
            if self.vnet_hdr:
                os.writev(fd, (tcpgro.PLAIN_HDR, packet))
            else:
                os.write(fd, packet)
        except OSError:
            self.write_errors += 1

    def write_many(self, packets: list, queue: int) -> None:
        """A peer's decrypted packets, in order; TCP segments of one flow
        coalesced into super-packets when the TUN takes virtio-net headers."""
        fd = self.fds.get(queue)
        if fd is None:
            return
        for buffer in (tcpgro.coalesce(packets) if self.vnet_hdr else packets):
            try:
                os.write(fd, buffer)
            except OSError:
                self.write_errors += 1

    def take_write_errors(self) -> int:
        errors, self.write_errors = self.write_errors, 0
        return errors


class Worker:
    def __init__(self, control: socket.socket, init: Init, socket_fds):
        self.control = control
        self.id = init.worker_id
        self.tun = WorkerTun(init.vnet_hdr)
        self.conn = WorkerConn(socket_fds)
        self.device = Device(init.name, None, tun=self.tun, conn=self.conn,
                             mtu=init.mtu, timing=Timing.from_environment())
        self.sending = SendBatch(init.mtu, self.conn, init.vnet_hdr)
        self.receiving = ReceiveBatch(init.mtu, self.tun, init.vnet_hdr)
        self.device.attach_actions(WorkerActions(self))
        self.device.attach_dataplane(WorkerDataplane(self))
        self.by_slot: dict[int, object] = {}
        self.events: dict[int, int] = {}
        self.outbox: list = []            # commands.TO_CONTROL messages
        self.released: list[int] = []
        self.device.add_index_watcher(self)
        self.last_request: dict[int, float] = {}
        self.events_due: float | None = None     # when the withheld TimerEvents go
        self.counters = {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0}
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, ("control", None))
        self._register_sockets()
        self.running = True
        self.handlers = {
            PeerAdd: self.on_peer_add,
            PeerRemove: self.on_peer_remove,
            InstallKeypair: self.on_keypair,
            SendKeepalive: self.on_keepalive,
            ZeroKeys: self.on_zero,
            PurgeStaged: self.on_purge,
            SetEndpoint: self.on_endpoint,
            SendStaged: self.on_staged,
            ReplaceSockets: self.on_sockets,
            StatsRequest: self.on_stats_request,
            Stop: self.on_stop,
        }

    def _register_sockets(self) -> None:
        for sock in self.conn.sockets:
            self.selector.register(sock, selectors.EVENT_READ, ("udp", sock))

    # --- control messages ------------------------------------------------------

    def handle(self, message, fds: list[int]) -> None:
        self.handlers[type(message)](message, fds)

    def on_peer_add(self, message: PeerAdd, fds) -> None:
        slot = message.slot
        peer = self.device.add_peer(message.public_key)
        peer.timers = EventRecorder(self, slot)
        peer.queue = slot
        peer.endpoint = message.endpoint
        self.by_slot[slot] = peer
        os.set_blocking(fds[0], False)
        self.tun.fds[slot] = fds[0]
        self.selector.register(fds[0], selectors.EVENT_READ, ("tun", slot))
        for moved in message.keypairs:
            self._restore(peer, moved)

    def _restore(self, peer, moved: MovedKeypair) -> None:
        keypair = Keypair.restore(moved.state, peer)
        setattr(peer.keypairs, moved.role, keypair)
        self.device.indices[keypair.local_index] = (peer, keypair)

    def on_peer_remove(self, message: PeerRemove, fds) -> None:
        slot, export = message.slot, message.export
        peer = self.by_slot.pop(slot, None)
        if peer is None:
            log.warning("peer_remove for slot %d, which this worker does not have", slot)
            return
        moved = tuple(MovedKeypair(kp.export(), role) for role in ("previous", "current", "next")
                      if (kp := getattr(peer.keypairs, role)) is not None) if export else ()
        fd = self.tun.fds.pop(slot)
        if fd in self.selector.get_map():         # not if its device vanished (TunGone)
            self.selector.unregister(fd)
        os.close(fd)
        if export:
            # The keypairs move with the peer: their indices stay live.
            for kp in (peer.keypairs.previous, peer.keypairs.current, peer.keypairs.next):
                if kp is not None:
                    self.device.indices.pop(kp.local_index, None)
            peer.keypairs.previous = peer.keypairs.current = peer.keypairs.next = None
        self.device.remove_peer(peer.public_key)
        if export:
            self.outbox.append(PeerState(slot, moved, tuple(peer.staged)))

    def on_keypair(self, message: InstallKeypair, fds) -> None:
        peer = self.by_slot.get(message.slot)
        if peer is None:
            return
        keypair = Keypair.restore(message.state, peer)
        self.device.install_keypair(peer, keypair)

    def on_keepalive(self, message: SendKeepalive, fds) -> None:
        peer = self.by_slot.get(message.slot)
        if peer is not None:
            send.send_keepalive(self.device, peer)

    def on_zero(self, message: ZeroKeys, fds) -> None:
        peer = self.by_slot.get(message.slot)
        if peer is not None:
            self.device.dataplane.zero_keys(peer)

    def on_purge(self, message: PurgeStaged, fds) -> None:
        peer = self.by_slot.get(message.slot)
        if peer is not None:
            peer.purge_staged()

    def on_endpoint(self, message: SetEndpoint, fds) -> None:
        peer = self.by_slot.get(message.slot)
        if peer is not None:
            peer.endpoint = message.endpoint

    def on_staged(self, message: SendStaged, fds) -> None:
        peer = self.by_slot.get(message.slot)
        for packet in message.packets:
            send.packet_for_peer(self.device, peer, packet)

    def on_sockets(self, message: ReplaceSockets, fds) -> None:
        for sock in self.conn.sockets:
            self.selector.unregister(sock)
        self.conn.replace(fds)
        self._register_sockets()
        self.outbox.append(SocketsDone())

    def on_stats_request(self, message: StatsRequest, fds) -> None:
        self.outbox.append(self.stats())

    def on_stop(self, message: Stop, fds) -> None:
        self.running = False

    # --- requests to the control plane ----------------------------------------------

    # An index watcher (device.index_watchers): the control plane learns which
    # session indices died here, to unmap them from receive steering.
    def add_index(self, index: int) -> None:
        pass

    def remove_index(self, index: int) -> None:
        self.released.append(index)

    def request_handshake(self, peer) -> None:
        now = time.monotonic()
        if now - self.last_request.get(peer.queue, -1e9) >= HANDSHAKE_REQUEST_INTERVAL:
            self.last_request[peer.queue] = now
            self.outbox.append(NeedHandshake(peer.queue))

    def flush(self, force: bool = False) -> None:
        if self.events:
            now = time.monotonic()
            if self.events_due is None:
                self.events_due = now + EVENT_INTERVAL
            if force or now >= self.events_due:
                self.outbox.append(TimerEvents(self.events))
                self.events = {}
                self.events_due = None
        if self.released:
            self.outbox.append(ReleasedIndices(tuple(self.released)))
            self.released = []
        for message in self.outbox:
            channel.send(self.control, message)
        self.outbox = []

    def stats(self) -> Stats:
        """Per-peer counters since the last report (the control plane adds them up)."""
        peers = {}
        for slot, peer in self.by_slot.items():
            peers[slot] = PeerTraffic(peer.tx_bytes, peer.rx_bytes, peer.stats.tx_packets,
                                      peer.stats.rx_packets)
            peer.tx_bytes = peer.rx_bytes = peer.stats.tx_packets = peer.stats.rx_packets = 0
        drops = dict(self.device.drops)
        self.device.drops.clear()
        busy = time.process_time()
        depth = sum(len(peer.staged) for peer in self.by_slot.values())
        peer_drops = self._peer_drops(drops)
        return Stats(traffic_by_slot=peers, drops=drops, busy_seconds=busy, queue_depth=depth,
                     drops_by_slot=peer_drops)

    def _peer_drops(self, drops: dict) -> dict:
        """Drops whose peer is known, since the last report; adds the ones
        only a worker sees (send and TUN write errors) to `drops`."""
        out = {}
        for slot, peer in self.by_slot.items():
            if peer.drops:
                out[slot] = dict(peer.drops)
                peer.drops.clear()
        for reason, errors in (("udp_send_failed", self.conn.take_send_errors()),
                               ("tun_write_failed", self.tun.take_write_errors())):
            if errors:
                drops[reason] = drops.get(reason, 0) + errors
        return out

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        next_stats = time.monotonic() + STATS_INTERVAL
        while self.running:
            # Control first: a new keypair must be installed before the data
            # that the same wake-up brought for it is looked up.
            events = sorted(self.selector.select(self._timeout()),
                            key=lambda event: event[0].data[0] != "control")
            for key, _ in events:
                kind, arg = key.data
                if kind == "tun":
                    self._drain_tun(arg)
                elif kind == "udp":
                    self.receiving.drain(self.device, arg)
                else:
                    self._drain_control()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_INTERVAL
                self.outbox.append(self.stats())
            self.flush()

    def _timeout(self) -> float:
        """How long the loop may sleep: withheld timer events must still go."""
        if self.events_due is None:
            return STATS_INTERVAL
        return min(STATS_INTERVAL, max(0.0, self.events_due - time.monotonic()))

    def _drain_tun(self, slot: int) -> None:
        peer = self.by_slot.get(slot)
        if peer is None:
            return
        try:
            self.sending.drain(self.device, peer, self.tun.fds[slot])
        except TunGone:
            # The interface was deleted (`ip link delete`, wg-quick down):
            # the control plane stops us next; until then, stop polling.
            self.selector.unregister(self.tun.fds[slot])
            log.info("%s: TUN queue %d is gone (interface deleted)", self.device.name, slot)

    def _drain_control(self) -> None:
        while True:
            item = channel.receive(self.control)
            if item is None:
                return
            self.handle(*item)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="wgebpf-worker[%(process)d]: %(message)s")
    # Ctrl-C reaches the whole process group: the control plane stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[0]))
    control.setblocking(True)
    init, fds = channel.receive(control)
    if not isinstance(init, Init):
        raise SystemExit(f"wgebpf worker: expected Init first, got {type(init).__name__}")
    control.setblocking(False)
    worker = Worker(control, init, fds)
    try:
        worker.run()
    except channel.ChannelClosed:
        pass                       # the control plane is gone: so are we
    return 0


if __name__ == "__main__":
    sys.exit(main())
