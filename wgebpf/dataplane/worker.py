"""A crypto worker process: a share of the data plane of every peer.

The control plane (dataplane/pool.py) starts `python -m wgebpf.dataplane.worker FD` and
hands it, over the channel on FD, its own TAP queue and its UDP sockets (its
position in each SO_REUSEPORT group). Queues are workers, not peers: every
worker holds every peer, and each packet says which peer it belongs to
(which worker gets which packets is the steering's choice: pool.py).

  send:    reads its TAP queue; the tc classifier already chose the peer
           and wrote it into the frame's Ethernet header (tun.py, "Peer
           tags"), so nothing here looks up a route or a peer. It
           encrypts with the peer's current keypair, taking counters from
           its own share of the keypair's counter space (noise.Keypair,
           wireguard/counters.py), and sends from its own UDP socket;
  receive: gets the data messages the reuseport program steers to it,
           checks replay (the session's window: its own, or under
           PeerSpread one shared with every worker), decrypts and writes to
           its TAP queue with the peer's tag for the source policy.

It never handshakes: when a peer needs keys it asks the control plane,
which runs the handshake and sends the keypair to every worker. Timer
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
from .commands import (ConfirmKeypair, EndpointLearned, HandshakeConfirmed, Init, InstallKeypair,
                       NeedHandshake,
                       PeerAdd, PeerRemove, PeerTraffic, PurgeStaged, ReleasedIndices,
                       ReplaceSockets, SendKeepalive, SetEndpoint, SocketsDone, Stats,
                       StatsRequest, Stop, TimerEvents, ZeroKeys)
from ..wireguard import send
from . import tcpgro
from .batch import ReceiveBatch, SendBatch, TunGone
from .tun import tag
from ..wireguard import counters
from .udp import SegmentSender, enable_gro
from ..wireguard.device import Device, LocalDataplane
from ..wireguard.noise import Keypair
from ..wireguard.replay import SharedReplayWindows
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
        peer = self.worker.by_slot.get(self.slot)
        current = peer.keypairs.current if peer is not None else None
        index = current.local_index if current is not None else 0
        self.worker.outbox.append(HandshakeConfirmed(self.slot, index))

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
    """The worker's TAP queue. Every frame written carries the tag of the
    peer the packet came from (tun.py, "Peer tags"); with vnet_hdr every
    read and write starts with a virtio-net header."""

    def __init__(self, fd: int, mac: bytes, vnet_hdr: bool = True):
        self.fd = fd
        self.mac = mac
        self.vnet_hdr = vnet_hdr
        self.links: dict[int, tcpgro.Link] = {}
        self.write_errors = 0

    def link(self, slot: int) -> tcpgro.Link:
        link = self.links.get(slot)
        if link is None:
            link = self.links[slot] = tcpgro.Link(self.mac + tag(slot))
        return link

    def forget(self, slot: int) -> None:
        self.links.pop(slot, None)

    def write(self, packet: bytes, slot: int) -> None:
        link = self.link(slot)
        header = link.plain6 if packet and packet[0] >> 4 == 6 else link.plain4
        try:
            os.writev(self.fd, (header, packet))
        except OSError:
            self.write_errors += 1

    def write_many(self, packets: list, slot: int) -> None:
        """A peer's decrypted packets, in order; TCP segments of one flow
        coalesced into super-packets."""
        for buffer in tcpgro.coalesce(packets, self.link(slot)):
            try:
                os.write(self.fd, buffer)
            except OSError:
                self.write_errors += 1

    def take_write_errors(self) -> int:
        errors, self.write_errors = self.write_errors, 0
        return errors


class Worker:
    def __init__(self, control: socket.socket, init: Init, fds):
        self.control = control
        self.id = init.worker_id
        tun_fd, socket_fds = fds[0], fds[1:]
        self.hints = self.windows = None
        if init.replay_windows:
            fd = socket_fds.pop()
            self.windows = SharedReplayWindows.from_fd(fd)
            os.close(fd)
        if init.counter_hints:
            fd = socket_fds.pop()
            self.hints = counters.CounterHints.from_fd(fd)
            os.close(fd)
        self.workers = init.workers
        self.block = counters.block_size(init.workers)
        os.set_blocking(tun_fd, False)
        self.tun = WorkerTun(tun_fd, init.mac)
        self.conn = WorkerConn(socket_fds)
        self.device = Device(init.name, None, tun=self.tun, conn=self.conn,
                             mtu=init.mtu, timing=Timing.from_environment())
        self.sending = SendBatch(init.mtu, self.conn)
        self.receiving = ReceiveBatch(init.mtu, self.tun)
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
        self.selector.register(tun_fd, selectors.EVENT_READ, ("tun", None))
        self._register_sockets()
        self.running = True
        self.handlers = {
            PeerAdd: self.on_peer_add,
            PeerRemove: self.on_peer_remove,
            InstallKeypair: self.on_keypair,
            ConfirmKeypair: self.on_confirm,
            SendKeepalive: self.on_keepalive,
            ZeroKeys: self.on_zero,
            PurgeStaged: self.on_purge,
            SetEndpoint: self.on_endpoint,
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

    def on_peer_remove(self, message: PeerRemove, fds) -> None:
        peer = self.by_slot.pop(message.slot, None)
        if peer is None:
            log.warning("peer_remove for slot %d, which this worker does not have", message.slot)
            return
        self.tun.forget(message.slot)
        self.device.remove_peer(peer.public_key)

    def on_keypair(self, message: InstallKeypair, fds) -> None:
        peer = self.by_slot.get(message.slot)
        if peer is None:
            return
        keypair = Keypair.restore(message.state, peer)
        if self.windows is not None and "replay_row" in message.state:
            keypair.replay = self.windows.window(message.state["replay_row"])
        if self.hints is not None:
            # Its row in the hints: any will do, uniqueness does not depend
            # on it (counters.py); a row another keypair used only makes
            # this one's counters start further up.
            row = keypair.local_index % self.hints.rows
            keypair.share_counters(counters.SendCounter(self.hints, row, self.id - 1, self.block))
        self.device.install_keypair(peer, keypair)

    def on_confirm(self, message: ConfirmKeypair, fds) -> None:
        """The session was confirmed on another worker; data may never reach
        this one under it (receive steering), so it rotates here as well."""
        peer = self.by_slot.get(message.slot)
        pending = peer.keypairs.next if peer is not None else None
        if pending is None or pending.local_index != message.index:
            return
        peer.keypairs.received_with(pending)
        self.device.release_retired_keypairs(peer)
        send.send_staged(self.device, peer)

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
        """Per-peer counters since the last report (the control plane adds them
        up); only peers that had traffic, so a report stays small at 10^4 peers."""
        peers = {}
        for slot, peer in self.by_slot.items():
            if peer.tx_bytes or peer.rx_bytes or peer.stats.tx_packets or peer.stats.rx_packets:
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
                    self._drain_tun()
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

    def _drain_tun(self) -> None:
        try:
            self.sending.drain(self.device, self.by_slot, self.tun.fd)
        except TunGone:
            # The interface was deleted (`ip link delete`, wg-quick down):
            # the control plane stops us next; until then, stop polling.
            self.selector.unregister(self.tun.fd)
            log.info("%s: TAP queue %d is gone (interface deleted)", self.device.name, self.id)

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
