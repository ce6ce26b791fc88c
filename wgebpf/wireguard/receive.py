"""The receive path: UDP datagrams from peers to the TUN device.

Pipeline, stage by stage, and which process runs each:

  0. (kernel)            the XDP guard (bpf/xdp_guard.c) drops junk on the
                         underlay; the reuseport program (bpf/reuseport.c)
                         hands a data message to the socket of the worker
                         that owns its receiver index, anything else to the
                         control plane's socket.
  1. handle_datagram     (both) type and length check
                         (messages.is_well_formed); anything else is counted
                         as malformed and dropped.
  2. handle_handshake    (control plane) initiation / response / cookie
                         reply: mac1 always, mac2 (cookie) when under load,
                         rate limit per source, then the Noise step;
                         sessions are born here and handed to the worker.
  3. handle_data         (worker) receiver index -> keypair; reject counters
                         the replay window cannot accept BEFORE decrypting.
  4. decrypt             (worker) ChaCha20-Poly1305; only an authenticated
                         packet may move the replay window, roam the
                         endpoint, confirm a keypair or count for timers.
  5. deliver             (worker) a well-formed IPv4/IPv6 packet (padding
                         removed) is written to the worker's TAP queue
                         behind the peer's tag.
                         The source address check (SourcePolicy) follows in
                         the kernel: bpf/policy.c on the device's tc ingress.
"""

import logging

from cryptography.exceptions import InvalidTag

from . import send
from .cookie import MacState
from .crypto import AEAD_NONCE, aead_nonce
from .messages import (DATA_HEADER, MESSAGE_DATA, MESSAGE_HANDSHAKE_COOKIE,
                       MESSAGE_HANDSHAKE_INITIATION,
                       is_well_formed, message_type)
from .noise import HandshakeError, begin_session, consume_initiation, consume_response

log = logging.getLogger("wgebpf")


def handle_datagram(device, data: bytes, source: tuple) -> None:
    if not is_well_formed(data):
        device.drop("malformed")
        return
    kind = message_type(data)
    if kind == MESSAGE_DATA:
        handle_data(device, data, source)
    else:
        handle_handshake(device, kind, data, source)


# --- handshakes ---------------------------------------------------------------------

def handle_handshake(device, kind: int, data: bytes, source: tuple) -> None:
    if kind == MESSAGE_HANDSHAKE_COOKIE:
        handle_cookie_reply(device, data)
        return
    under_load = device.note_handshake_message()
    state = device.cookie_checker.validate(data, source, under_load)
    if state is MacState.INVALID_MAC1:
        device.drop("invalid_mac1")
        return
    if under_load and state is MacState.VALID_MAC_BUT_NO_COOKIE:
        device.drop("cookie_required")
        send.send_cookie_reply(device, data, source)
        return
    if state is MacState.VALID_MAC_WITH_COOKIE_BUT_RATELIMITED:
        device.drop("rate_limited")
        return
    try:
        if kind == MESSAGE_HANDSHAKE_INITIATION:
            handle_initiation(device, data, source)
        else:
            handle_response(device, data, source)
    except HandshakeError as exc:
        device.drop("handshake_failed")
        log.debug("%s: handshake from %s rejected: %s", device.name, source, exc)


def handle_initiation(device, data: bytes, source: tuple) -> None:
    handshake = consume_initiation(device.identity, data, device.peer_by_static,
                                   device.clock.monotonic())
    peer = device.peers[handshake.remote_static]
    peer.set_endpoint(source)                          # roaming
    peer.timers.any_authenticated_packet_received()
    peer.timers.any_authenticated_packet_traversal()
    send.send_handshake_response(device, peer)


def handle_response(device, data: bytes, source: tuple) -> None:
    receiver = int.from_bytes(data[8:12], "little")
    entry = device.indices.get(receiver)
    if entry is None or entry[1] is not entry[0].handshake:
        raise HandshakeError("response for an unknown index")
    peer = entry[0]
    consume_response(device.identity, peer.handshake, data)
    index = peer.handshake.local_index
    keypair = begin_session(peer.handshake, index, device.clock.monotonic(), peer)
    peer.set_endpoint(source)
    peer.sent_lastminute_handshake = False
    peer.stats.handshakes_completed += 1
    peer.keypair_installed_at = device.clock.monotonic()
    if peer.handshake_started is not None:
        device.handshake_durations.observe(peer.keypair_installed_at - peer.handshake_started)
        peer.handshake_started = None
    peer.timers.any_authenticated_packet_received()
    peer.timers.any_authenticated_packet_traversal()
    peer.timers.session_derived()
    peer.timers.handshake_complete()
    # Installing an initiator's keypair sends the staged packets, or a
    # keepalive if there are none: either confirms the session to the
    # responder, so it may send at once.
    device.install_keypair(peer, keypair)


def handle_cookie_reply(device, data: bytes) -> None:
    receiver = int.from_bytes(data[4:8], "little")
    entry = device.indices.get(receiver)
    if entry is None or not entry[0].cookie.consume_reply(data):
        device.drop("invalid_cookie")


# --- data -----------------------------------------------------------------------------

def handle_data(device, data: bytes, source: tuple) -> None:
    _, receiver, counter = DATA_HEADER.unpack_from(data)
    entry = device.indices.get(receiver)
    keypair = entry[1] if entry is not None else None
    if keypair is None or keypair is entry[0].handshake:
        device.drop("unknown_index")
        return
    now = device.clock.monotonic()
    peer = entry[0]
    if not keypair.can_receive(now):
        device.drop("expired_keypair", peer)
        return
    if not keypair.replay.would_accept(counter):
        device.drop("replay", peer)
        return
    try:
        plaintext = keypair.receiving.decrypt(aead_nonce(counter), data[DATA_HEADER.size:], None)
    except InvalidTag:          # only a tag that does not verify; anything else is a bug
        device.drop("auth_failed", peer)
        return
    with keypair.replay.locked():
        fresh = keypair.replay.accept(counter)
    if not fresh:                                  # a racing duplicate
        device.drop("replay", peer)
        return
    authenticated(device, peer, keypair, source, len(data), now)
    if plaintext:
        deliver(device, peer, plaintext)


def open_into(device, message, out, now: float, accept: bool = True):
    """The batched form of handle_data's checks and decryption: open the
    data message `message` (a well-formed one: type 4, at least 32 bytes)
    into `out`, exactly len(message) - 32 bytes long. Returns its keypair,
    or None when it was dropped (and counted). The caller then calls
    authenticated() once per keypair and batch, and delivers. With
    accept=False the caller records the counter in the replay window
    itself, after the tag verified (a window shared by workers: once per
    burst, under its lock)."""
    _, receiver, counter = DATA_HEADER.unpack_from(message)
    entry = device.indices.get(receiver)
    keypair = entry[1] if entry is not None else None
    if keypair is None or keypair is entry[0].handshake:
        device.drop("unknown_index")
        return None
    if not keypair.can_receive(now):
        device.drop("expired_keypair", entry[0])
        return None
    if not keypair.replay.would_accept(counter):
        device.drop("replay", entry[0])
        return None
    try:
        keypair.receiving.decrypt_into(AEAD_NONCE.pack(counter), message[DATA_HEADER.size:],
                                       None, out)
    except InvalidTag:
        device.drop("auth_failed", entry[0])
        return None
    if accept and not keypair.replay.accept(counter):
        device.drop("replay", entry[0])
        return None
    return keypair


def authenticated(device, peer, keypair, source: tuple, size: int, now: float,
                  messages: int = 1) -> None:
    """Everything authenticated data messages (`messages` of them, `size`
    bytes in all, the last from `source`) change besides delivery."""
    peer.set_endpoint(source)                              # roaming
    peer.rx_bytes += size
    peer.stats.rx_packets += messages
    if peer.keypairs.received_with(keypair):
        device.release_retired_keypairs(peer)
        peer.stats.handshakes_completed += 1
        peer.timers.handshake_complete()
        send.send_staged(device, peer)
    send.keep_key_fresh_on_receive(device, peer, now)
    peer.timers.any_authenticated_packet_received()
    peer.timers.any_authenticated_packet_traversal()


def inner_length(packet: bytes) -> int:
    """The IPv4/IPv6 packet's real length without padding; 0 if malformed."""
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        length = int.from_bytes(packet[2:4], "big")
        if 20 <= length <= len(packet):
            return length
    elif version == 6 and len(packet) >= 40:
        length = 40 + int.from_bytes(packet[4:6], "big")
        if length <= len(packet):
            return length
    return 0


def deliver(device, peer, plaintext: bytes) -> None:
    peer.timers.data_received()
    length = inner_length(plaintext)
    if not length:
        device.drop("malformed_inner", peer)
        return
    # The source address check (SourcePolicy) is not here: it runs in the
    # kernel, on the device's tc ingress (bpf/policy.c), which knows the
    # peer by the queue this write lands on.
    device.tun.write(plaintext[:length], peer.queue)
