"""Session indices live exactly as long as their handshake or keypair, in the
device and in every index watcher (the XDP guard's map); a watcher that
cannot take a new index refuses that one handshake, counted, and nothing
else breaks."""

import errno
import logging

from memnet import Host, ipv4_packet, pair
from wgebpf.wireguard import send
from wgebpf.wireguard.messages import (MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE,
                             REKEY_TIMEOUT, message_type)

A_TO_B = ipv4_packet("198.51.100.1", "198.51.100.2")
B_TO_A = ipv4_packet("198.51.100.2", "198.51.100.1")


class MapWatcher:
    """Stands in for the XDP guard's index map: a hash map with room for
    `capacity` entries that fails like a full BPF map (E2BIG) beyond it."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self.live: set[int] = set()

    def add_index(self, index: int) -> None:
        if len(self.live) >= self.capacity:
            raise OSError(errno.E2BIG, "Argument list too long")
        self.live.add(index)

    def remove_index(self, index: int) -> None:
        self.live.discard(index)


def watch(host, capacity: int = 65536) -> MapWatcher:
    watcher = MapWatcher(capacity)
    watcher.live.update(host.device.indices)
    host.device.index_watchers.append(watcher)
    return watcher


def run(clock, network, hosts, seconds: float, step: float = 0.25):
    end = clock.now + seconds
    while clock.now < end:
        clock.advance(step)
        for host in hosts:
            host.device.scheduler.run_due()
        network.pump()


def referenced_indices(device) -> set[int]:
    """The indices something still uses: a keypair, or a pending handshake."""
    out = set()
    for peer in device.peers.values():
        for keypair in (peer.keypairs.previous, peer.keypairs.current, peer.keypairs.next):
            if keypair is not None:
                out.add(keypair.local_index)
        if peer.handshake.local_index:
            out.add(peer.handshake.local_index)
    return out


def indices_of(device, peer) -> set[int]:
    return {index for index, (owner, _) in device.indices.items() if owner is peer}


def cross_handshakes(clock, network, a, b, times: int) -> None:
    """Both sides initiate at the same moment, `times` times over."""
    peer_a, peer_b = a.device.peers[b.public_key], b.device.peers[a.public_key]
    for _ in range(times):
        clock.advance(REKEY_TIMEOUT + 1)
        send.send_handshake_initiation(a.device, peer_a, retry=False)
        send.send_handshake_initiation(b.device, peer_b, retry=False)
        network.pump()
        run(clock, network, (a, b), 1)


def crossing_pair():
    clock, network, a, b = pair()
    b.device.peers[a.public_key].set_endpoint(a.conn.address)
    return clock, network, a, b


def test_crossing_handshakes_leave_only_referenced_indices():
    clock, network, a, b = crossing_pair()
    watchers = {a: watch(a), b: watch(b)}
    cross_handshakes(clock, network, a, b, 30)
    for host in (a, b):
        live = referenced_indices(host.device)
        assert set(host.device.indices) == live
        assert watchers[host].live == live
        assert len(live) <= 4             # previous, current, next, one handshake


def test_crossing_handshakes_still_converge_to_a_working_session():
    clock, network, a, b = crossing_pair()
    cross_handshakes(clock, network, a, b, 5)
    run(clock, network, (a, b), 3 * REKEY_TIMEOUT, step=0.01)
    a.device.on_tun_packet(A_TO_B)
    b.device.on_tun_packet(B_TO_A)
    run(clock, network, (a, b), 2 * REKEY_TIMEOUT)
    assert A_TO_B in b.tun.received and B_TO_A in a.tun.received


def test_remove_peer_leaves_no_index_of_it():
    clock, network, a, b = crossing_pair()
    watcher = watch(a)
    a.device.on_tun_packet(A_TO_B)
    network.pump()
    cross_handshakes(clock, network, a, b, 5)
    peer = a.device.peers[b.public_key]
    clock.advance(REKEY_TIMEOUT + 1)
    send.send_handshake_initiation(a.device, peer, retry=False)   # one pending, too
    assert indices_of(a.device, peer)
    a.device.remove_peer(b.public_key)
    assert indices_of(a.device, peer) == set() and a.device.indices == {}
    assert watcher.live == set()


def test_zeroing_keys_leaves_no_index_of_the_peer():
    clock, network, a, b = crossing_pair()
    watcher = watch(a)
    cross_handshakes(clock, network, a, b, 5)
    peer = a.device.peers[b.public_key]
    a.device.zero_key_material(peer)
    assert indices_of(a.device, peer) == set() and watcher.live == set()


def test_rekeys_release_retired_keypairs():
    clock, network, a, b = pair()
    watcher = watch(b)
    for _ in range(20):
        a.device.on_tun_packet(A_TO_B)
        network.pump()
        clock.advance(REKEY_TIMEOUT + 1)
        send.send_handshake_initiation(a.device, a.device.peers[b.public_key], retry=False)
        network.pump()
    live = referenced_indices(b.device)
    assert set(b.device.indices) == live == watcher.live and len(live) <= 3


def trio():
    """A with two peers, B and C; B's and A's sessions established."""
    clock, network, a, b = pair()
    c = Host(network, clock, "198.51.100.3/24", ("192.0.2.3", 51822))
    a.add_peer(c, ["198.51.100.3/32"])
    c.add_peer(a, ["198.51.100.1/32"])
    a.device.on_tun_packet(A_TO_B)
    network.pump()
    return clock, network, a, b, c


def handshake_messages(network, mark: int, source) -> list[int]:
    return [message_type(d) for d, s, _ in network.sent_log[mark:]
            if s == source and message_type(d) in (MESSAGE_HANDSHAKE_INITIATION,
                                                    MESSAGE_HANDSHAKE_RESPONSE)]


def test_full_index_map_refuses_our_initiation_counted(caplog):
    clock, network, a, b, c = trio()
    watcher = watch(a, capacity=len(a.device.indices))      # full
    before = dict(a.device.indices)
    mark = len(network.sent_log)
    with caplog.at_level(logging.WARNING, "wgebpf"):
        for _ in range(5):
            a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.3"))
            clock.advance(REKEY_TIMEOUT + 1)
            a.device.scheduler.run_due()
            network.pump()
    assert handshake_messages(network, mark, a.conn.address) == []
    assert a.device.drops["index_refused"] >= 5
    assert a.device.peers[c.public_key].drops["index_refused"] >= 5
    assert a.device.indices == before and watcher.live == set(before)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refusals) < 5                            # rate-limited
    # The established session with B carries on.
    a.device.on_tun_packet(A_TO_B)
    b.device.on_tun_packet(B_TO_A)
    network.pump()
    assert b.tun.received.count(A_TO_B) == 2 and a.tun.received == [B_TO_A]
    # Room again: the retransmit timer (or new data) completes the handshake.
    watcher.capacity = 65536
    run(clock, network, (a, b, c), 2 * REKEY_TIMEOUT)
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.3"))
    network.pump()
    assert c.tun.received
    assert set(a.device.indices) == referenced_indices(a.device) == watcher.live


def test_full_index_map_refuses_to_answer_an_initiation_counted():
    clock, network, a, b, c = trio()
    watcher = watch(a, capacity=len(a.device.indices))
    before = dict(a.device.indices)
    mark = len(network.sent_log)
    c.device.on_tun_packet(ipv4_packet("198.51.100.3", "198.51.100.1"))
    network.pump()
    assert handshake_messages(network, mark, a.conn.address) == []
    assert a.device.drops["index_refused"] == 1
    assert a.device.indices == before and watcher.live == set(before)
    watcher.capacity = 65536
    run(clock, network, (a, b, c), 2 * REKEY_TIMEOUT)          # C retransmits
    c.device.on_tun_packet(ipv4_packet("198.51.100.3", "198.51.100.1"))
    network.pump()
    assert ipv4_packet("198.51.100.3", "198.51.100.1") in a.tun.received


def test_full_index_map_on_a_timer_does_not_escape_the_scheduler():
    """The retransmit and rekey timers start handshakes from run_due, outside
    any packet handler: a refusal there must not raise either."""
    clock, network, a, b = pair()
    a.device.on_tun_packet(A_TO_B)
    network.pump()
    watch(a, capacity=0)
    peer = a.device.peers[b.public_key]
    peer.timers.new_handshake.mod(0)
    clock.advance(REKEY_TIMEOUT + 1)
    for _ in range(30):
        clock.advance(REKEY_TIMEOUT + 1)
        a.device.scheduler.run_due()
        network.pump()
    assert a.device.drops["index_refused"] >= 2


def test_removed_peer_and_its_secrets_are_not_kept_alive():
    """Nothing of the device (indices, timer heap) keeps a removed peer, its
    handshake or its precomputed static-static DH reachable."""
    import gc
    import weakref
    from wgebpf.wireguard.crypto import ZERO_KEY
    clock, network, a, b = crossing_pair()
    a.device.peers[b.public_key].set_persistent_keepalive(25)
    cross_handshakes(clock, network, a, b, 3)
    peer = a.device.peers[b.public_key]
    handshake = peer.handshake
    alive = weakref.ref(peer)
    del peer
    a.device.remove_peer(b.public_key)
    assert handshake.precomputed_static_static == ZERO_KEY
    assert handshake.preshared_key == ZERO_KEY and handshake.local_index == 0
    del handshake
    gc.collect()
    assert alive() is None
    assert a.device.scheduler._heap == [] and a.device.scheduler.next_deadline() is None
