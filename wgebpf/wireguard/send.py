"""The send path: packets from the TUN device to peers over UDP.

Pipeline, stage by stage, and which process runs each:

  0. (kernel)            the FIB routes the packet into the device; tc egress
                         (bpf/nexthop.c) picks the peer by the route's next
                         hop, writes the peer's tag into the frame and picks
                         a worker; the steering program (bpf/tun_steer.c)
                         puts it on that worker's queue. No peer: queue 0.
  1. packet_for_peer     a worker reads its queue: each frame's tag names the
                         peer, nothing here looks anything up.
     no_peer             the control plane reads queue 0: drop, count, and
                         answer with ICMP destination unreachable.
  2. Peer.stage          (worker) without a usable session, queue the packet
                         on the peer, bounded (MAX_STAGED_PACKETS), and ask
                         the control plane for a handshake.
  3. send_staged         (worker) with a usable current keypair, encrypt every
                         staged packet in order: a keypair's counter has
                         exactly one owner, this worker.
  4. encrypt_and_send    (worker) pad to 16, ChaCha20-Poly1305 with the
                         counter as nonce, UDP from the worker's own socket
                         to the peer's endpoint; record the timer events for
                         the control plane; ask for a rekey when the keypair
                         is getting old.

Handshake messages (initiation, response, cookie reply) leave from here too,
sent by the control plane. select_peer (the classic destination rule) and
packet_from_tun serve a device without the kernel parts: the in-memory
test devices.
"""

import logging

from . import icmp
from .crypto import AEAD_NONCE, aead_nonce
from .messages import (AEAD_TAG_LEN, DATA_HEADER, MESSAGE_DATA, MESSAGE_PADDING_MULTIPLE,
                       REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES,
                       KEEPALIVE_TIMEOUT, REKEY_TIMEOUT)
from . import tai64n
from .noise import HandshakeError, begin_session, create_initiation, create_response

log = logging.getLogger("wgebpf")


def destination_of(packet: bytes) -> bytes | None:
    """The destination address of an IPv4/IPv6 packet (raw bytes), or None."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return packet[16:20]
    if version == 6 and len(packet) >= 40:
        return packet[24:40]
    return None


def is_multicast(address: bytes) -> bool:
    if len(address) == 4:
        return 224 <= address[0] <= 239 or address == b"\xff\xff\xff\xff"
    return address[0] == 0xFF


def select_peer(device, packet: bytes):
    """The peer that carries an outgoing packet: longest match of its
    destination in the peers' allowed-ips (classic WireGuard)."""
    destination = destination_of(packet)
    if destination is None:
        return None
    return device.allowed_ips.lookup(destination)


def packet_from_tun(device, packet: bytes) -> None:
    peer = select_peer(device, packet)
    if peer is None:
        no_peer(device, packet)
        return
    packet_for_peer(device, peer, packet)


def no_peer(device, packet: bytes) -> None:
    """Drop, count, and tell the sender (ICMP destination unreachable)."""
    destination = destination_of(packet)
    if destination is None:
        device.drop("malformed_outgoing")
        return
    if is_multicast(destination):
        # The kernel's own multicast (IPv6 MLD, say): no peer is expected
        # to take it, and no ICMP error may answer it (RFC 1812, RFC 4443).
        device.drop("multicast")
        return
    device.drop("no_peer")
    reply = icmp.unreachable(device, packet)
    if reply is not None:
        device.tun.write(reply, 0)


def packet_for_peer(device, peer, packet: bytes) -> None:
    """A packet whose peer is already known (by its TUN queue, in a worker)."""
    if peer.staged:
        peer.stage(packet)
        send_staged(device, peer)
        return
    keypair = peer.keypairs.current
    now = device.clock.monotonic()
    if (keypair is None or peer.endpoint is None or not keypair.can_send(now)
            or keypair.send_counter >= REJECT_AFTER_MESSAGES):
        peer.stage(packet)
        send_staged(device, peer)
        return
    encrypt_and_send(device, peer, keypair, packet)
    keep_key_fresh(device, peer, keypair, now)


def send_staged(device, peer) -> None:
    keypair = peer.keypairs.current
    now = device.clock.monotonic()
    if keypair is None or not keypair.can_send(now):
        device.actions.send_handshake_initiation(peer, retry=False)
        return
    if peer.endpoint is None:
        device.drop("no_endpoint", peer, len(peer.staged))
        peer.staged.clear()
        return
    while peer.staged:
        if keypair.send_counter >= REJECT_AFTER_MESSAGES:
            device.actions.send_handshake_initiation(peer, retry=False)
            return
        encrypt_and_send(device, peer, keypair, peer.staged.popleft())
    keep_key_fresh(device, peer, keypair, now)


def send_keepalive(device, peer) -> None:
    """An empty data message; only if nothing else is waiting to go."""
    if not peer.staged:
        peer.staged.append(b"")
    send_staged(device, peer)


def padded_length(size: int, mtu: int) -> int:
    """A multiple of 16 (hides exact lengths) but never beyond the MTU."""
    return min(-(-size // MESSAGE_PADDING_MULTIPLE) * MESSAGE_PADDING_MULTIPLE, max(mtu, size))


def pad(packet: bytes, mtu: int) -> bytes:
    size = len(packet)
    padded = padded_length(size, mtu)
    return packet + bytes(padded - size) if padded > size else packet


def encrypt_and_send(device, peer, keypair, packet: bytes) -> None:
    counter = keypair.take_counter()
    keypair.end_batch()
    sealed = keypair.sending.encrypt(aead_nonce(counter), pad(packet, device.mtu), None)
    message = DATA_HEADER.pack(MESSAGE_DATA, keypair.remote_index, counter) + sealed
    device.conn.send(message, peer.endpoint)
    peer.tx_bytes += len(message)
    peer.stats.tx_packets += 1
    timers = peer.timers
    timers.any_authenticated_packet_traversal()
    timers.any_authenticated_packet_sent()
    if packet:
        timers.data_sent()


# --- the batched form of encrypt_and_send, for workers ------------------------------------

def sendable_keypair(peer, now: float):
    """The keypair a packet for `peer` may be sealed with at once, or None
    when packet_for_peer would stage it (the same conditions)."""
    keypair = peer.keypairs.current
    if (peer.staged or keypair is None or peer.endpoint is None or not keypair.can_send(now)
            or keypair.send_counter >= REJECT_AFTER_MESSAGES):
        return None
    return keypair


def seal_into(keypair, plaintext, out) -> int:
    """Write the data message for `plaintext` (already padded) at the start
    of the writable buffer `out`, taking the keypair's next counter; return
    its length. Raises noise.KeypairExhausted when the keypair has no
    counter left; the caller ends the batch with keypair.end_batch()."""
    counter = keypair.take_counter()
    DATA_HEADER.pack_into(out, 0, MESSAGE_DATA, keypair.remote_index, counter)
    end = DATA_HEADER.size + len(plaintext) + AEAD_TAG_LEN
    keypair.sending.encrypt_into(AEAD_NONCE.pack(counter), plaintext, None,
                                 out[DATA_HEADER.size:end])
    return end


def sealed_batch(device, peer, keypair, messages: int, size: int, data: bool, now: float) -> None:
    """What `messages` data messages of `size` bytes in all, sent to peer
    with keypair, change besides the wire: counters, timer events (once a
    batch: they are flags), the rekey check."""
    peer.tx_bytes += size
    peer.stats.tx_packets += messages
    timers = peer.timers
    timers.any_authenticated_packet_traversal()
    timers.any_authenticated_packet_sent()
    if data:
        timers.data_sent()
    keep_key_fresh(device, peer, keypair, now)


def keep_key_fresh(device, peer, keypair, now: float) -> None:
    """The initiator of a session rekeys after REKEY_AFTER_TIME; either side
    after REKEY_AFTER_MESSAGES (whitepaper 6.2)."""
    if (keypair.send_counter > REKEY_AFTER_MESSAGES
            or (keypair.i_am_the_initiator
                and now - keypair.birthdate >= device.timing.rekey_after_time)):
        device.actions.send_handshake_initiation(peer, retry=False)


def keep_key_fresh_on_receive(device, peer, now: float) -> None:
    """If we initiated the current session and it nears REJECT_AFTER_TIME
    without a rekey, try once more before the keys die (kernel's
    "last minute" handshake)."""
    keypair = peer.keypairs.current
    if peer.sent_lastminute_handshake or keypair is None or not keypair.i_am_the_initiator:
        return
    if now - keypair.birthdate >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT:
        peer.sent_lastminute_handshake = True
        device.actions.send_handshake_initiation(peer, retry=False)


def send_handshake_initiation(device, peer, retry: bool) -> None:
    if not retry:
        peer.timers.handshake_attempts = 0
    now = device.clock.monotonic()
    if now - peer.last_sent_handshake < device.timing.rekey_timeout:
        return                      # one initiation per REKEY_TIMEOUT at most
    if peer.endpoint is None or device.identity.private_key is None:
        return
    device.forget_handshake_index(peer)         # a new initiation supersedes ours
    index = device.new_index(peer, peer.handshake)
    if index is None:
        # Refused and counted by the device (no room in the XDP guard's map):
        # as if this initiation were lost, the retransmit timer tries again.
        peer.handshake.clear()
        peer.last_sent_handshake = now
        peer.timers.handshake_initiated()
        return
    try:
        message = create_initiation(device.identity, peer.handshake, index,
                                    tai64n.now(device.clock.wall))
    except HandshakeError as exc:
        device.forget_index(index)
        log.warning("%s: cannot create handshake initiation for %s: %s", device.name, peer, exc)
        return
    peer.last_sent_handshake = now
    if peer.handshake_started is None:
        peer.handshake_started = now      # for the handshake-duration histogram
    peer.cookie.add_macs(message)
    peer.stats.handshakes_sent += 1
    peer.timers.any_authenticated_packet_traversal()
    peer.timers.any_authenticated_packet_sent()
    device.conn.send(bytes(message), peer.endpoint)
    peer.timers.handshake_initiated()


def send_handshake_response(device, peer) -> None:
    # The peer's initiation supersedes one of ours that crossed it (its
    # state is already overwritten): its index dies now, as in the kernel
    # and wireguard-go, or it would live on with nothing to free it.
    device.forget_handshake_index(peer)
    index = device.new_index(peer, peer.handshake)
    if index is None:
        peer.handshake.clear()                  # refused and counted: no answer
        return
    try:
        message = create_response(peer.handshake, index)
    except HandshakeError:
        device.forget_index(index)
        raise
    # A response is a handshake sent: data waiting here must not start a
    # second handshake right behind it (kernel, wireguard-go).
    peer.last_sent_handshake = device.clock.monotonic()
    peer.cookie.add_macs(message)
    keypair = begin_session(peer.handshake, index, device.clock.monotonic(), peer)
    peer.keypair_installed_at = keypair.birthdate
    device.install_keypair(peer, keypair)
    peer.timers.session_derived()
    peer.timers.any_authenticated_packet_traversal()
    peer.timers.any_authenticated_packet_sent()
    device.conn.send(bytes(message), peer.endpoint)


def send_cookie_reply(device, message: bytes, source: tuple) -> None:
    device.conn.send(device.cookie_checker.create_reply(message, source), source)
