"""The seams of the protocol core (wgebpf/wireguard/seams.py) against what
implements them: a renamed method or a changed parameter list in the data
plane, the XDP guard or a worker fails here, not in a running tunnel."""

import inspect

import pytest

from wgebpf.control.attach import Attachment
from wgebpf.dataplane.pool import WorkerPool
from wgebpf.dataplane.udp import UDPConn
from wgebpf.dataplane.worker import Worker, WorkerActions, WorkerConn, WorkerDataplane, WorkerTun
from wgebpf.kernel.xdp_guard import XdpGuard
from wgebpf.wireguard import seams
from wgebpf.wireguard.device import Device, LocalDataplane, _Actions
from wgebpf.wireguard.keys import generate_private_key

from memnet import MemoryConn, MemoryNetwork, MemoryTun


def protocol_methods(protocol) -> dict:
    """The methods a Protocol declares, its bases' included."""
    methods = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, seams.Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                methods[name] = value
    return methods


def call_shape(method) -> tuple[list, dict]:
    """Arguments as the caller passes them: by position before `/`, by
    keyword after it."""
    positional, keywords = [], {}
    for parameter in list(inspect.signature(method).parameters.values())[1:]:
        if parameter.kind is parameter.POSITIONAL_ONLY:
            positional.append(object())
        else:
            keywords[parameter.name] = object()
    return positional, keywords


def mismatches(implementation: type, protocol) -> list[str]:
    """How `implementation` fails `protocol`: missing methods, and methods
    that would not accept the arguments the protocol's callers pass."""
    problems = []
    for name, declared in protocol_methods(protocol).items():
        method = inspect.getattr_static(implementation, name, None)
        if not callable(method):
            problems.append(f"{implementation.__name__}.{name} is missing")
            continue
        positional, keywords = call_shape(declared)
        try:
            inspect.signature(method).bind(object(), *positional, **keywords)
        except TypeError as exc:
            problems.append(f"{implementation.__name__}.{name}: {exc}")
    return problems


IMPLEMENTATIONS = [
    (seams.Dataplane, LocalDataplane),
    (seams.Dataplane, WorkerPool),
    (seams.Dataplane, WorkerDataplane),
    (seams.TimerActions, _Actions),
    (seams.TimerActions, WorkerActions),
    (seams.IndexWatcher, XdpGuard),
    (seams.IndexWatcher, Worker),
    (seams.DatagramSender, WorkerConn),
    (seams.ListenSocket, UDPConn),
    (seams.ListenSocket, MemoryConn),
    (seams.PacketSink, Attachment),
    (seams.PacketSink, WorkerTun),
    (seams.PacketSink, MemoryTun),
]


@pytest.mark.parametrize("protocol, implementation", IMPLEMENTATIONS,
                         ids=[f"{i.__name__}-{p.__name__}" for p, i in IMPLEMENTATIONS])
def test_implementation_has_every_method_of_its_seam(protocol, implementation):
    assert mismatches(implementation, protocol) == []


def test_a_renamed_or_reshaped_method_is_caught():
    class RenamedWatcher:
        def add_index(self, index): ...
        def forget_index(self, index): ...

    class ReshapedActions(_Actions):
        def send_handshake_initiation(self, peer, is_retry): ...   # called with retry=

    assert mismatches(RenamedWatcher, seams.IndexWatcher) == [
        "RenamedWatcher.remove_index is missing"]
    assert len(mismatches(ReshapedActions, seams.TimerActions)) == 1


def test_the_default_seams_of_a_device_are_instances_of_their_protocols():
    network = MemoryNetwork()
    device = Device(tun=MemoryTun(), conn=MemoryConn(network, ("192.0.2.1", 51820)))
    assert isinstance(device.dataplane, seams.Dataplane)
    assert isinstance(device.actions, seams.TimerActions)
    assert isinstance(device.conn, seams.ListenSocket)
    assert isinstance(device.tun, seams.PacketSink)


def test_udpconn_is_a_listen_socket_and_reports_a_rebind():
    conn = UDPConn(0)
    try:
        assert isinstance(conn, seams.ListenSocket)
        rebinds = []
        conn.watch_rebind(lambda: rebinds.append(conn.listen_port))
        conn.rebind(0)
        assert rebinds == [conn.listen_port]
    finally:
        conn.close()


class RecordingWatcher:
    def __init__(self):
        self.live: set[int] = set()

    def add_index(self, index: int) -> None:
        self.live.add(index)

    def remove_index(self, index: int) -> None:
        self.live.discard(index)


def test_attached_index_watcher_sees_indices_come_and_go():
    device = Device(private_key=generate_private_key())
    watcher = RecordingWatcher()
    device.add_index_watcher(watcher)
    peer = device.add_peer(Device(private_key=generate_private_key()).public_key)
    index = device.new_index(peer, peer.handshake)
    assert watcher.live == {index}
    device.remove_peer(peer.public_key)
    assert watcher.live == set()


def test_identity_listeners_hear_a_new_private_key_once():
    device = Device(private_key=generate_private_key())
    heard = []
    device.watch_identity(lambda: heard.append(device.public_key))
    new_key = generate_private_key()
    device.set_private_key(new_key)
    device.set_private_key(new_key)         # unchanged: no news
    assert heard == [device.public_key]


def test_external_load_puts_the_device_under_load():
    device = Device()
    assert device.note_handshake_message() is False
    device.watch_external_load(lambda: True)
    assert device.note_handshake_message() is True


def test_attached_dataplane_hears_about_new_peers():
    class CountingDataplane(LocalDataplane):
        added = 0

        def peer_added(self, peer) -> None:
            self.added += 1

    device = Device(private_key=generate_private_key())
    dataplane = CountingDataplane(device)
    device.attach_dataplane(dataplane)
    device.add_peer(Device(private_key=generate_private_key()).public_key)
    assert device.dataplane is dataplane and dataplane.added == 1
