"""mac1, mac2 and cookie replies: the handshake's DoS defences (whitepaper 5.4.4, 5.4.7).

mac1 proves the sender knows our public key, so a responder never spends a
DH on a sender who does not. Under load a responder also wants mac2: a MAC
keyed by a cookie it handed out to the sender's IP and port, which proves the
sender can receive at that address. The cookie itself travels encrypted
(XChaCha20-Poly1305) with the mac1 it answers as additional data, so only the
host that sent that exact message can use it.
"""

import enum
import hmac
import os

from .crypto import HASH, MAC, XAEAD, XAEAD_OPEN, AuthenticationError
from .messages import (COOKIE_NONCE_LEN, COOKIE_SECRET_LATENCY, COOKIE_SECRET_MAX_AGE,
                       HANDSHAKE_COOKIE, LABEL_COOKIE, LABEL_MAC1, MAC_LEN,
                       MESSAGE_HANDSHAKE_COOKIE, macs_offset)


class MacState(enum.Enum):
    INVALID_MAC1 = 0
    VALID_MAC_BUT_NO_COOKIE = 1
    VALID_MAC_WITH_COOKIE_BUT_RATELIMITED = 2
    VALID_MAC_WITH_COOKIE = 3


def mac1_key(public_key: bytes) -> bytes:
    return HASH(LABEL_MAC1 + public_key)


def cookie_key(public_key: bytes) -> bytes:
    return HASH(LABEL_COOKIE + public_key)


def source_bytes(address: tuple) -> bytes:
    """The cookie binds the sender's IP and UDP port."""
    import ipaddress
    return ipaddress.ip_address(address[0]).packed + int(address[1]).to_bytes(2, "big")


class CookieChecker:
    """The responder side, one per interface."""

    def __init__(self, public_key: bytes | None, clock, rate_allow=lambda src: True):
        self.clock = clock
        self.rate_allow = rate_allow
        # Told each new secret and how long it lives (the XDP guard checks
        # mac2 with it): on_new_secret(secret, seconds).
        self.on_new_secret = lambda secret, lifetime: None
        self._secret = b""
        self._secret_birthdate = -1e18
        self.set_public_key(public_key)

    def set_public_key(self, public_key: bytes | None) -> None:
        self.mac1_key = mac1_key(public_key) if public_key else None
        self.encryption_key = cookie_key(public_key) if public_key else None

    def _current_secret(self) -> bytes:
        now = self.clock.monotonic()
        if now - self._secret_birthdate >= COOKIE_SECRET_MAX_AGE:
            self._secret = os.urandom(32)
            self._secret_birthdate = now
            self.on_new_secret(self._secret, COOKIE_SECRET_MAX_AGE)
        return self._secret

    def make_cookie(self, source: tuple) -> bytes:
        return MAC(self._current_secret(), source_bytes(source))

    def validate(self, message: bytes, source: tuple, under_load: bool) -> MacState:
        if self.mac1_key is None:
            return MacState.INVALID_MAC1
        off = macs_offset(message)
        mac1 = MAC(self.mac1_key, message[:off])
        if not hmac.compare_digest(mac1, message[off:off + MAC_LEN]):
            return MacState.INVALID_MAC1
        if not under_load:
            return MacState.VALID_MAC_BUT_NO_COOKIE
        mac2 = MAC(self.make_cookie(source), message[:off + MAC_LEN])
        if not hmac.compare_digest(mac2, message[off + MAC_LEN:off + 2 * MAC_LEN]):
            return MacState.VALID_MAC_BUT_NO_COOKIE
        if not self.rate_allow(source[0]):
            return MacState.VALID_MAC_WITH_COOKIE_BUT_RATELIMITED
        return MacState.VALID_MAC_WITH_COOKIE

    def create_reply(self, message: bytes, source: tuple) -> bytes:
        """A cookie reply to `message` (an initiation or response) from `source`."""
        sender_index = int.from_bytes(message[4:8], "little")
        off = macs_offset(message)
        nonce = os.urandom(COOKIE_NONCE_LEN)
        sealed = XAEAD(self.encryption_key, nonce, self.make_cookie(source),
                       bytes(message[off:off + MAC_LEN]))
        return HANDSHAKE_COOKIE.pack(MESSAGE_HANDSHAKE_COOKIE, sender_index, nonce, sealed)


class CookieGenerator:
    """The initiator side, one per peer: adds macs, keeps the latest cookie."""

    def __init__(self, remote_public_key: bytes, clock):
        self.clock = clock
        self.mac1_key = mac1_key(remote_public_key)
        self.decryption_key = cookie_key(remote_public_key)
        self.cookie = b""
        self.cookie_birthdate = -1e18
        self.last_mac1_sent = b""
        self.have_sent_mac1 = False

    def add_macs(self, message: bytearray) -> bytearray:
        off = macs_offset(message)
        mac1 = MAC(self.mac1_key, bytes(message[:off]))
        message[off:off + MAC_LEN] = mac1
        self.last_mac1_sent, self.have_sent_mac1 = mac1, True
        age = self.clock.monotonic() - self.cookie_birthdate
        if self.cookie and age < COOKIE_SECRET_MAX_AGE - COOKIE_SECRET_LATENCY:
            message[off + MAC_LEN:off + 2 * MAC_LEN] = MAC(self.cookie, bytes(message[:off + MAC_LEN]))
        else:
            message[off + MAC_LEN:off + 2 * MAC_LEN] = bytes(MAC_LEN)
        return message

    def consume_reply(self, message: bytes) -> bool:
        """Store the cookie of a reply to our latest message; False if it is not one."""
        if not self.have_sent_mac1:
            return False
        _, _, nonce, sealed = HANDSHAKE_COOKIE.unpack(message)
        try:
            cookie = XAEAD_OPEN(self.decryption_key, nonce, sealed, self.last_mac1_sent)
        except AuthenticationError:
            return False
        self.cookie, self.cookie_birthdate = cookie, self.clock.monotonic()
        self.have_sent_mac1 = False
        return True
