"""WireGuard keys: generation and the two text forms (base64 in files, hex in the UAPI).

Keys are raw 32-byte strings everywhere inside wgebpf; these helpers are the
only place that turns them into text and back. The base64 rules follow
wg(8): exactly 44 characters, one '=' of padding, and the unused low bits of
the last character must be zero, so every key has exactly one spelling.
"""

import base64
import binascii
import os
import re

from wgebpf.wireguard.crypto import DH_PUBKEY

__all__ = ["KEY_LEN", "KeyFormatError", "generate_private_key", "public_key",
           "generate_preshared_key", "encode", "decode", "to_hex", "from_hex"]

KEY_LEN = 32
KEY_LEN_BASE64 = 44
KEY_LEN_HEX = 64

_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")


class KeyFormatError(ValueError):
    """A key's text form is not a valid 32-byte key.

    The message never contains the key itself: the text may be a private key.
    """


def _clamp(key: bytes) -> bytes:
    # RFC 7748 clamping, as `wg genkey` does: clear the cofactor bits, clear
    # the top bit and set the second-highest. X25519 clamps again on use, but
    # storing the clamped form makes our keys byte-identical to wg's.
    k = bytearray(key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private_key() -> bytes:
    """A fresh, clamped Curve25519 private key (like `wg genkey`)."""
    return _clamp(os.urandom(KEY_LEN))


def public_key(private: bytes) -> bytes:
    """The Curve25519 public key of `private` (like `wg pubkey`)."""
    _check_len(private)
    return DH_PUBKEY(private)


def generate_preshared_key() -> bytes:
    """32 random bytes (like `wg genpsk`); a PSK is not a curve point, so no clamping."""
    return os.urandom(KEY_LEN)


def _check_len(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise KeyFormatError(f"a key is {KEY_LEN} bytes, got {got}")


def encode(key: bytes) -> str:
    """Base64 text of a 32-byte key, as in configuration files."""
    _check_len(key)
    return base64.b64encode(key).decode("ascii")


def decode(text: str) -> bytes:
    """The 32-byte key spelled by `text`; KeyFormatError unless it is a canonical base64 key."""
    if len(text) != KEY_LEN_BASE64:
        raise KeyFormatError(f"a key is {KEY_LEN_BASE64} base64 characters ending in '=', "
                             f"got {len(text)} characters")
    if text[-1] != "=":
        raise KeyFormatError(f"a key is {KEY_LEN_BASE64} base64 characters ending in '=', "
                             f"the last character is not '='")
    for pos, ch in enumerate(text[:-1], 1):
        if ch not in _BASE64_ALPHABET:
            raise KeyFormatError(f"invalid base64 character {ch!r} at position {pos}")
    # 43 characters carry 258 bits for 256 bits of key: the last character's
    # two low bits are padding and must be zero, else two spellings decode to
    # the same key (and wg(8) rejects it).
    if _BASE64_ALPHABET.index(text[-2]) & 0b11:
        raise KeyFormatError("not canonical base64: the character before '=' has its "
                             "unused low bits set (it was probably mistyped)")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:  # unreachable after the checks above; kept as a guard
        raise KeyFormatError(f"invalid base64: {exc}") from None


def to_hex(key: bytes) -> str:
    """Lowercase hex of a 32-byte key, as the cross-platform UAPI writes keys."""
    _check_len(key)
    return key.hex()


def from_hex(text: str) -> bytes:
    """The key spelled by 64 hex digits (the UAPI form); either case is read."""
    if not _HEX_RE.fullmatch(text):
        raise KeyFormatError(f"a hex key is {KEY_LEN_HEX} hex digits, got {len(text)} characters"
                             if len(text) != KEY_LEN_HEX else
                             "a hex key has only the characters 0-9 and a-f")
    return bytes.fromhex(text)
