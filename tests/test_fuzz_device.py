"""Property-based fuzzing of whole devices (two in-memory Devices, memnet).

(a) Datagrams: arbitrary bytes, and real handshake initiations, responses,
    cookie replies and data messages with bit flips, truncation, extension,
    a wrong type or a wrong index, fed to a device that has a session with
    an honest peer. Each must be counted as one drop under a documented
    reason, nothing may raise, and the session must still carry traffic.
(b) Inner packets: arbitrary plaintexts (IPv4/IPv6 headers with bogus
    versions and lengths, truncated headers) inside validly encrypted data
    messages from the peer. Each is delivered (cut to its IP length) or
    counted as malformed_inner; nothing raises; traffic goes on.

Budget: the "ci" profile by default, --hypothesis-profile=long for a long
run (tests/conftest.py).
"""

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from memnet import ipv4_packet, ipv6_packet, pair
from wgebpf.wireguard import send
from wgebpf.wireguard.crypto import aead_nonce
from wgebpf.wireguard.messages import (DATA_HEADER, MESSAGE_DATA, MESSAGE_HANDSHAKE_COOKIE,
                             MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE,
                             REKEY_TIMEOUT, message_type)
from wgebpf.control.metrics import DROP_REASONS

A_TO_B = ipv4_packet("198.51.100.1", "198.51.100.2")
B_TO_A = ipv6_packet("2001:db8:100::2", "2001:db8:100::1")
STRANGER = ("203.0.113.9", 4444)


class Session:
    """A (initiator) and B (responder) with an established, confirmed
    session, and the real messages of that exchange to mutate."""

    def __init__(self):
        self.clock, self.network, self.a, self.b = pair()
        self.a.device.on_tun_packet(A_TO_B)
        self.network.pump()
        self.b.device.on_tun_packet(B_TO_A)
        self.network.pump()
        assert self.b.tun.received == [A_TO_B] and self.a.tun.received == [B_TO_A]
        sent = [data for data, _, _ in self.network.sent_log]
        initiation = self.first(sent, MESSAGE_HANDSHAKE_INITIATION)
        response = self.first(sent, MESSAGE_HANDSHAKE_RESPONSE)
        data = [d for d in sent if message_type(d) == MESSAGE_DATA]
        self.messages = {
            "initiation": initiation,
            "response": response,
            # a cookie reply B would send A, and one A would send B: the
            # latter is for B's live index and authentic (B takes it).
            "cookie_to_a": self.b.device.cookie_checker.create_reply(initiation, self.a.conn.address),
            "cookie_to_b": self.a.device.cookie_checker.create_reply(response, self.b.conn.address),
            "data": data[0],
            "data_back": data[-1],
        }
        self.acceptable = {self.messages["cookie_to_b"]}
        self.clock.advance(1)

    @staticmethod
    def first(sent, kind):
        return next(d for d in sent if message_type(d) == kind)

    def still_carries_traffic(self) -> None:
        a, b = self.a, self.b
        self.network.pump()
        before_a, before_b = len(a.tun.received), len(b.tun.received)
        a.device.on_tun_packet(A_TO_B)
        b.device.on_tun_packet(B_TO_A)
        self.network.pump()
        assert b.tun.received[before_b:] == [A_TO_B]
        assert a.tun.received[before_a:] == [B_TO_A]


# --- (a) datagrams -------------------------------------------------------------------

# ("live", n): the n-th of B's live indices (resolved when mutating).
index_value = st.one_of(st.integers(0, 2**32 - 1),
                        st.tuples(st.just("live"), st.integers(0, 7)))
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4095), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 4095)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("type"), st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 255, 0x104]),
                                         st.integers(0, 2**32 - 1))),
    st.tuples(st.just("index"), st.sampled_from(["sender", "receiver"]), index_value),
)
real_message = st.tuples(
    st.sampled_from(["initiation", "response", "cookie_to_a", "cookie_to_b", "data",
                     "data_back"]),
    st.lists(mutation, min_size=1, max_size=4))
# Random bodies behind a valid type and length get past the first check.
shaped_random = st.one_of(
    st.binary(min_size=144, max_size=144).map(lambda b: b"\x01\0\0\0" + b),
    st.binary(min_size=88, max_size=88).map(lambda b: b"\x02\0\0\0" + b),
    st.binary(min_size=60, max_size=60).map(lambda b: b"\x03\0\0\0" + b),
    st.binary(min_size=28, max_size=200).map(lambda b: b"\x04\0\0\0" + b),
)
datagram = st.one_of(real_message, st.binary(max_size=300), shaped_random)
source = st.sampled_from(["peer", "stranger"])


def index_field(data: bytearray, which: str) -> int | None:
    """Offset of the sender or receiver index in this message, if it has one."""
    kind = message_type(data)
    if which == "sender":
        return 4 if kind in (MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE) else None
    if kind == MESSAGE_HANDSHAKE_RESPONSE:
        return 8
    return 4 if kind in (MESSAGE_HANDSHAKE_COOKIE, MESSAGE_DATA) else None


def mutate(data: bytes, mutations, live_indices: list[int]) -> bytes:
    out = bytearray(data)
    for step in mutations:
        kind = step[0]
        if kind == "flip" and out:
            out[step[1] % len(out)] ^= 1 << step[2]
        elif kind == "truncate" and out:
            del out[step[1] % len(out):]
        elif kind == "extend":
            out += step[1]
        elif kind == "type" and len(out) >= 4:
            out[:4] = step[1].to_bytes(4, "little")
        elif kind == "index":
            offset = index_field(out, step[1])
            value = step[2]
            if isinstance(value, tuple):
                value = live_indices[value[1] % len(live_indices)] if live_indices else 0
            if offset is not None and len(out) >= offset + 4:
                out[offset:offset + 4] = value.to_bytes(4, "little")
    return bytes(out)


def feed_and_check_drop(session: Session, device, data: bytes, origin: tuple) -> None:
    before = dict(device.drops)
    device.on_datagram(data, origin)
    delta = {r: n - before.get(r, 0) for r, n in device.drops.items() if n != before.get(r, 0)}
    if data in session.acceptable and not delta:
        return                      # an authentic message, taken as such
    assert sum(delta.values()) == 1, (data.hex(), delta)
    assert set(delta) <= set(DROP_REASONS), delta


@given(datagrams=st.lists(datagram, min_size=1, max_size=4), origin=source,
       pending=st.booleans(), under_load=st.booleans())
@example(datagrams=[("response", [("index", "receiver", ("live", 0))])], origin="peer",
         pending=False, under_load=False)
@example(datagrams=[("cookie_to_b", [("flip", 40, 0)])], origin="peer", pending=False,
         under_load=False)
@example(datagrams=[("data", [("truncate", 31)])], origin="stranger", pending=True,
         under_load=False)
@example(datagrams=[("response", [("flip", 12, 0)])], origin="peer", pending=True,
         under_load=True)
def test_fuzzed_datagrams_are_counted_drops_and_the_session_survives(datagrams, origin, pending,
                                                                     under_load):
    session = Session()
    b = session.b
    b.device.force_under_load = under_load      # mac2 and cookie replies, too
    if pending:
        # B waits for a response to an initiation of its own (never delivered):
        # responses to it reach consume_response.
        session.clock.advance(REKEY_TIMEOUT + 1)
        send.send_handshake_initiation(b.device, b.device.peers[session.a.public_key],
                                       retry=False)
        session.network.in_flight.clear()
    address = session.a.conn.address if origin == "peer" else STRANGER
    for item in datagrams:
        if isinstance(item, tuple):
            name, mutations = item
            live = sorted(b.device.indices)
            data = mutate(session.messages[name], mutations, live)
        else:
            data = item
        feed_and_check_drop(session, b.device, data, address)
    # Nothing from a stranger authenticates, so nothing roams B's endpoint there.
    assert b.device.peers[session.a.public_key].endpoint == session.a.conn.address
    b.device.force_under_load = False
    session.still_carries_traffic()


# --- (b) inner packets -----------------------------------------------------------------

def ipv4_header(version: int, ihl: int, total_length: int, body: bytes, cut: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total_length, 0, 0, 64, 17, 0,
                         bytes([198, 51, 100, 1]), bytes([198, 51, 100, 2]))
    return (header + body)[:cut]


def ipv6_header(version: int, payload_length: int, body: bytes, cut: int) -> bytes:
    header = struct.pack("!IHBB16s16s", version << 28, payload_length, 17, 64,
                         bytes.fromhex("20010db8010000000000000000000001"),
                         bytes.fromhex("20010db8010000000000000000000002"))
    return (header + body)[:cut]


nibble = st.integers(0, 15)
cut = st.integers(0, 400)
plaintext = st.one_of(
    st.binary(max_size=300),
    st.builds(ipv4_header, st.one_of(st.just(4), nibble), st.one_of(st.just(5), nibble),
              st.integers(0, 65535), st.binary(max_size=120), cut),
    st.builds(ipv6_header, st.one_of(st.just(6), nibble), st.integers(0, 65535),
              st.binary(max_size=120), cut),
)


def seal_from_a(session: Session, inner: bytes) -> bytes:
    """A data message carrying exactly `inner` under A's current keypair."""
    keypair = session.a.device.peers[session.b.public_key].keypairs.current
    counter = keypair.send_counter
    keypair.send_counter += 1
    sealed = keypair.sending.encrypt(aead_nonce(counter), inner, None)
    return DATA_HEADER.pack(MESSAGE_DATA, keypair.remote_index, counter) + sealed


def declared_length(packet: bytes) -> int:
    if packet[0] >> 4 == 4:
        return int.from_bytes(packet[2:4], "big")
    return 40 + int.from_bytes(packet[4:6], "big")


@given(inners=st.lists(plaintext, min_size=1, max_size=4))
@example(inners=[b""])
@example(inners=[b"\x45"])
@example(inners=[ipv4_header(4, 5, 19, b"", 20)])
@example(inners=[ipv6_header(6, 0, b"", 39)])
@example(inners=[ipv4_header(6, 5, 20, b"x" * 40, 60)])
def test_fuzzed_inner_packets_are_delivered_or_counted(inners):
    session = Session()
    b = session.b
    for inner in inners:
        drops_before, received_before = dict(b.device.drops), len(b.tun.received)
        b.device.on_datagram(seal_from_a(session, inner), session.a.conn.address)
        delta = {r: n - drops_before.get(r, 0) for r, n in b.device.drops.items()
                 if n != drops_before.get(r, 0)}
        delivered = b.tun.received[received_before:]
        if not inner:                               # a keepalive
            assert not delta and not delivered
        elif delivered:
            assert not delta and len(delivered) == 1
            packet = delivered[0]
            assert packet[0] >> 4 in (4, 6) and packet == inner[:len(packet)]
            assert declared_length(packet) == len(packet)
        else:
            assert delta == {"malformed_inner": 1}
    session.still_carries_traffic()
