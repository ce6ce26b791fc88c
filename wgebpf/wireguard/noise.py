"""The Noise_IKpsk2 handshake and the session keypairs it yields.

Whitepaper section 5.4. A peer's handshake moves through HandshakeState and
only the functions named for a step (create/consume initiation/response,
begin_session) change it. mac1/mac2 are added and checked by cookie.py, not
here: they guard the handshake against DoS, they are not part of Noise.

Who may send with a fresh keypair: the initiator at once (it has seen the
responder's reply); the responder only after the first data packet from the
initiator proves the initiator derived the same keys. Until then the
responder's keypair waits in Keypairs.next.
"""

import enum
import hmac
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import tai64n
from .crypto import (AEAD, AEAD_OPEN, DH, DH_GENERATE, DH_PUBKEY, HASH, KDF1, KDF2, KDF3,
                     AuthenticationError, ZERO_KEY)
from .messages import (CONSTRUCTION, HANDSHAKE_INITIATION, HANDSHAKE_RESPONSE, IDENTIFIER,
                       INITIATIONS_PER_SECOND, MESSAGE_HANDSHAKE_INITIATION,
                       MESSAGE_HANDSHAKE_RESPONSE, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME)
from .replay import ReplayWindow

INITIAL_CHAINING_KEY = HASH(CONSTRUCTION)
INITIAL_HASH = HASH(INITIAL_CHAINING_KEY + IDENTIFIER)


class HandshakeState(enum.Enum):
    ZEROED = 0
    CREATED_INITIATION = 1
    CONSUMED_INITIATION = 2
    CREATED_RESPONSE = 3
    CONSUMED_RESPONSE = 4


class HandshakeError(Exception):
    """A handshake message that does not authenticate or does not fit our state."""


class StaticIdentity:
    """The interface's own static key pair."""

    def __init__(self, private_key: bytes | None = None):
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        if private_key is not None:
            self.set(private_key)

    def set(self, private_key: bytes | None) -> None:
        self.private_key = private_key
        self.public_key = DH_PUBKEY(private_key) if private_key else None


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return HASH(h + data)


@dataclass(eq=False)
class Handshake:
    """Per-peer handshake state (kernel: struct noise_handshake)."""

    remote_static: bytes
    preshared_key: bytes = ZERO_KEY
    state: HandshakeState = HandshakeState.ZEROED
    precomputed_static_static: bytes = ZERO_KEY
    hash: bytes = b""
    chaining_key: bytes = b""
    ephemeral_private: bytes = b""
    remote_ephemeral: bytes = b""
    local_index: int = 0
    remote_index: int = 0
    latest_timestamp: bytes = bytes(12)
    last_initiation_consumption: float = -1e9

    def precompute(self, identity: StaticIdentity) -> None:
        """DH(S_priv, S_pub_remote) is the same for every handshake: do it once."""
        try:
            self.precomputed_static_static = (
                DH(identity.private_key, self.remote_static) if identity.private_key else ZERO_KEY)
        except ValueError:
            self.precomputed_static_static = ZERO_KEY

    def clear(self) -> None:
        self.state = HandshakeState.ZEROED
        self.hash = self.chaining_key = self.ephemeral_private = self.remote_ephemeral = b""
        self.local_index = self.remote_index = 0

    def wipe(self) -> None:
        """Forget every secret, the static ones too (the peer is removed)."""
        self.clear()
        self.precomputed_static_static = self.preshared_key = ZERO_KEY

    def _start(self, responder_static: bytes) -> None:
        self.chaining_key = INITIAL_CHAINING_KEY
        self.hash = _mix_hash(INITIAL_HASH, responder_static)


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return DH(private, public)
    except ValueError as exc:         # low-order point: all-zero shared secret
        raise HandshakeError("invalid public key") from exc


def create_initiation(identity: StaticIdentity, hs: Handshake, local_index: int,
                      timestamp: bytes | None = None) -> bytearray:
    """Build an initiation with zeroed macs (cookie.py fills them)."""
    if identity.private_key is None or hs.precomputed_static_static == ZERO_KEY:
        raise HandshakeError("no usable static keys")
    hs._start(hs.remote_static)
    hs.ephemeral_private = DH_GENERATE()
    ephemeral = DH_PUBKEY(hs.ephemeral_private)
    hs.chaining_key = KDF1(hs.chaining_key, ephemeral)
    hs.hash = _mix_hash(hs.hash, ephemeral)
    hs.chaining_key, key = KDF2(hs.chaining_key, _dh(hs.ephemeral_private, hs.remote_static))
    encrypted_static = AEAD(key, 0, identity.public_key, hs.hash)
    hs.hash = _mix_hash(hs.hash, encrypted_static)
    hs.chaining_key, key = KDF2(hs.chaining_key, hs.precomputed_static_static)
    encrypted_timestamp = AEAD(key, 0, timestamp or tai64n.now(), hs.hash)
    hs.hash = _mix_hash(hs.hash, encrypted_timestamp)
    hs.local_index = local_index
    hs.state = HandshakeState.CREATED_INITIATION
    return bytearray(HANDSHAKE_INITIATION.pack(
        MESSAGE_HANDSHAKE_INITIATION, local_index, ephemeral, encrypted_static,
        encrypted_timestamp, bytes(16), bytes(16)))


def consume_initiation(identity: StaticIdentity, message: bytes, find_handshake, now: float):
    """Authenticate an initiation; return the sender's Handshake (now
    CONSUMED_INITIATION) or raise HandshakeError.

    `find_handshake(static_public)` maps the decrypted static key to the
    peer's Handshake (None: unknown peer). `now` is monotonic seconds.
    """
    if identity.private_key is None:
        raise HandshakeError("no private key")
    _, sender, ephemeral, encrypted_static, encrypted_timestamp, _, _ = \
        HANDSHAKE_INITIATION.unpack(message)
    chaining_key = KDF1(INITIAL_CHAINING_KEY, ephemeral)
    h = _mix_hash(_mix_hash(INITIAL_HASH, identity.public_key), ephemeral)
    chaining_key, key = KDF2(chaining_key, _dh(identity.private_key, ephemeral))
    try:
        remote_static = AEAD_OPEN(key, 0, encrypted_static, h)
    except AuthenticationError as exc:
        raise HandshakeError("initiation does not decrypt") from exc
    h = _mix_hash(h, encrypted_static)
    hs = find_handshake(remote_static)
    if hs is None:
        raise HandshakeError("initiation from an unknown public key")
    if hs.precomputed_static_static == ZERO_KEY:
        raise HandshakeError("peer's public key is unusable")
    chaining_key, key = KDF2(chaining_key, hs.precomputed_static_static)
    try:
        timestamp = AEAD_OPEN(key, 0, encrypted_timestamp, h)
    except AuthenticationError as exc:
        raise HandshakeError("initiation timestamp does not decrypt") from exc
    h = _mix_hash(h, encrypted_timestamp)
    # Replay: the timestamp must grow. Flood: at most INITIATIONS_PER_SECOND.
    if not tai64n.after(timestamp, hs.latest_timestamp):
        raise HandshakeError("replayed or stale initiation timestamp")
    if now - hs.last_initiation_consumption < 1.0 / INITIATIONS_PER_SECOND:
        raise HandshakeError("initiations arriving too fast")
    hs.latest_timestamp = timestamp
    hs.last_initiation_consumption = now
    hs.remote_ephemeral = ephemeral
    hs.remote_index = sender
    hs.hash, hs.chaining_key = h, chaining_key
    hs.state = HandshakeState.CONSUMED_INITIATION
    return hs


def create_response(hs: Handshake, local_index: int) -> bytearray:
    if hs.state is not HandshakeState.CONSUMED_INITIATION:
        raise HandshakeError("no initiation to respond to")
    hs.ephemeral_private = DH_GENERATE()
    ephemeral = DH_PUBKEY(hs.ephemeral_private)
    hs.chaining_key = KDF1(hs.chaining_key, ephemeral)
    hs.hash = _mix_hash(hs.hash, ephemeral)
    hs.chaining_key = KDF1(hs.chaining_key, _dh(hs.ephemeral_private, hs.remote_ephemeral))
    hs.chaining_key = KDF1(hs.chaining_key, _dh(hs.ephemeral_private, hs.remote_static))
    hs.chaining_key, tau, key = KDF3(hs.chaining_key, hs.preshared_key)
    hs.hash = _mix_hash(hs.hash, tau)
    empty = AEAD(key, 0, b"", hs.hash)
    hs.hash = _mix_hash(hs.hash, empty)
    hs.local_index = local_index
    hs.state = HandshakeState.CREATED_RESPONSE
    return bytearray(HANDSHAKE_RESPONSE.pack(
        MESSAGE_HANDSHAKE_RESPONSE, local_index, hs.remote_index, ephemeral, empty,
        bytes(16), bytes(16)))


def consume_response(identity: StaticIdentity, hs: Handshake, message: bytes) -> None:
    """Authenticate a response to our initiation (hs found by receiver index)."""
    if hs.state is not HandshakeState.CREATED_INITIATION:
        raise HandshakeError("response without a pending initiation")
    _, sender, _, ephemeral, empty, _, _ = HANDSHAKE_RESPONSE.unpack(message)
    chaining_key = KDF1(hs.chaining_key, ephemeral)
    h = _mix_hash(hs.hash, ephemeral)
    chaining_key = KDF1(chaining_key, _dh(hs.ephemeral_private, ephemeral))
    chaining_key = KDF1(chaining_key, _dh(identity.private_key, ephemeral))
    chaining_key, tau, key = KDF3(chaining_key, hs.preshared_key)
    h = _mix_hash(h, tau)
    try:
        AEAD_OPEN(key, 0, empty, h)
    except AuthenticationError as exc:
        raise HandshakeError("response does not authenticate") from exc
    hs.hash = _mix_hash(h, empty)
    hs.chaining_key = chaining_key
    hs.remote_index = sender
    hs.state = HandshakeState.CONSUMED_RESPONSE


class KeypairExhausted(Exception):
    """No send counter is left below REJECT_AFTER_MESSAGES for this worker."""


# Counters a worker takes from its share at once, for one batch of packets.
TAKE_CHUNK = 64


class Keypair:
    """One session: keys, counters and the replay window (kernel: noise_keypair).

    In one process (LocalDataplane) the keypair owns its counter. In a worker
    pool every worker holds a copy: each takes counters from its own share
    of the counter space (share_counters, counters.SendCounter), so no
    counter is used twice, and keeps its own replay window for the counters
    the receive steering sends it (every duplicate of a counter goes to
    the same worker).
    """

    __slots__ = ("sending", "receiving", "sending_key", "receiving_key", "send_counter",
                 "replay", "birthdate", "i_am_the_initiator", "local_index", "remote_index",
                 "peer", "valid", "share", "_next", "_end")

    def __init__(self, sending_key: bytes, receiving_key: bytes, initiator: bool,
                 local_index: int, remote_index: int, birthdate: float, peer=None):
        self.sending_key = sending_key
        self.receiving_key = receiving_key
        self.sending = ChaCha20Poly1305(sending_key)
        self.receiving = ChaCha20Poly1305(receiving_key)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.birthdate = birthdate
        self.i_am_the_initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer
        self.valid = True
        self.share = None              # a counters.SendCounter, in a worker pool
        self._next = self._end = 0     # counters taken from the share, not yet used

    def share_counters(self, share) -> None:
        """Take send counters from `share` (a counters.SendCounter) from now on."""
        self.share = share

    def take_counter(self) -> int:
        """The next send counter; send_counter follows it (the rekey checks
        read that). Raises KeypairExhausted when none is left."""
        if self.share is None:
            counter = self.send_counter
            if counter >= REJECT_AFTER_MESSAGES:
                raise KeypairExhausted
        else:
            counter = self._next
            if counter >= self._end:
                counter, count = self.share.take(TAKE_CHUNK)
                if not count:
                    raise KeypairExhausted
                self._end = counter + count
            self._next = counter + 1
        self.send_counter = counter + 1
        return counter

    def end_batch(self) -> None:
        """Give up the counters taken and not used: a worker that idles must
        not come back with counters the others have left far behind (the
        receivers' replay windows would refuse them)."""
        self._next = self._end = 0

    def export(self) -> dict:
        """Everything a keypair is, for handing it to another process (the
        monotonic clock is system-wide, so the birthdate travels as is)."""
        return {"sending_key": self.sending_key, "receiving_key": self.receiving_key,
                "initiator": self.i_am_the_initiator, "local_index": self.local_index,
                "remote_index": self.remote_index, "birthdate": self.birthdate,
                "send_counter": self.send_counter, "replay": self.replay}

    @classmethod
    def restore(cls, state: dict, peer=None) -> "Keypair":
        keypair = cls(state["sending_key"], state["receiving_key"], state["initiator"],
                      state["local_index"], state["remote_index"], state["birthdate"], peer)
        keypair.send_counter = state["send_counter"]
        keypair.replay = state["replay"]
        return keypair

    def can_send(self, now: float) -> bool:
        return (self.valid and self.send_counter < REJECT_AFTER_MESSAGES
                and (self.share is None or self._next < self._end or not self.share.exhausted())
                and now - self.birthdate < REJECT_AFTER_TIME)

    def can_receive(self, now: float) -> bool:
        return self.valid and now - self.birthdate < REJECT_AFTER_TIME

    def zero(self) -> None:
        """Forget the keys (the objects may still be referenced by a queue)."""
        self.valid = False
        self.sending_key = self.receiving_key = ZERO_KEY
        self.sending = self.receiving = None


def begin_session(hs: Handshake, local_index: int, now: float, peer=None) -> Keypair:
    """Derive transport keys from a completed handshake and zero the handshake."""
    if hs.state is HandshakeState.CONSUMED_RESPONSE:
        initiator = True
        sending, receiving = KDF2(hs.chaining_key, b"")
    elif hs.state is HandshakeState.CREATED_RESPONSE:
        initiator = False
        receiving, sending = KDF2(hs.chaining_key, b"")
    else:
        raise HandshakeError(f"cannot begin a session from {hs.state.name}")
    keypair = Keypair(sending, receiving, initiator, local_index, hs.remote_index, now, peer)
    hs.clear()
    return keypair


@dataclass(eq=False)
class Keypairs:
    """previous / current / next, with the kernel's rotation rules."""

    previous: Keypair | None = None
    current: Keypair | None = None
    next: Keypair | None = None
    retired: list = field(default_factory=list)   # dropped keypairs, for index cleanup

    def _retire(self, kp: Keypair | None) -> None:
        if kp is not None:
            kp.zero()
            self.retired.append(kp)

    def add(self, kp: Keypair) -> None:
        if kp.i_am_the_initiator:
            if self.next is not None:
                # A responder keypair never confirmed: the peer's view is now ours.
                self._retire(self.previous)
                self.previous, self.next = self.next, None
                self._retire(self.current)
            else:
                self._retire(self.previous)
                self.previous = self.current
            self.current = kp
        else:
            self._retire(self.next)
            self.next = kp
            self._retire(self.previous)
            self.previous = None

    def received_with(self, kp: Keypair) -> bool:
        """A packet authenticated under kp; True if that confirmed `next`."""
        if kp is not self.next:
            return False
        self._retire(self.previous)
        self.previous, self.current, self.next = self.current, kp, None
        return True

    def clear(self) -> None:
        for kp in (self.previous, self.current, self.next):
            self._retire(kp)
        self.previous = self.current = self.next = None

    def take_retired(self) -> list:
        out, self.retired = self.retired, []
        return out


def same_key(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
