"""The primitives of the WireGuard whitepaper, section 5.4, under its names.

HASH, MAC and HMAC are BLAKE2s (hashlib); DH is X25519 and AEAD is
ChaCha20-Poly1305 (the `cryptography` package); XAEAD is XChaCha20-Poly1305,
which only libsodium (PyNaCl) offers here.
"""

import hashlib
import hmac as _hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

__all__ = ["AuthenticationError", "HASH", "MAC", "HMAC", "KDF1", "KDF2", "KDF3",
           "DH", "DH_GENERATE", "DH_PUBKEY", "AEAD", "AEAD_OPEN", "XAEAD",
           "XAEAD_OPEN", "AEAD_NONCE", "aead_nonce", "ZERO_KEY"]

ZERO_KEY = bytes(32)


class AuthenticationError(Exception):
    """An AEAD tag did not verify."""


def HASH(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    """HMAC over unkeyed BLAKE2s-256, as the KDF needs (not keyed BLAKE2s)."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(key: bytes, data: bytes, count: int) -> tuple[bytes, ...]:
    # HKDF with BLAKE2s: t0 = HMAC(key, input); t_i = HMAC(t0, t_{i-1} || i)
    prk = HMAC(key, data)
    out, prev = [], b""
    for i in range(1, count + 1):
        prev = HMAC(prk, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def KDF1(key: bytes, data: bytes) -> bytes:
    return _kdf(key, data, 1)[0]


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    return _kdf(key, data, 2)


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    return _kdf(key, data, 3)


def DH_GENERATE() -> bytes:
    """A fresh private key, as raw (clamped on use by X25519) bytes."""
    return X25519PrivateKey.generate().private_bytes_raw()


def DH_PUBKEY(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def DH(private: bytes, public: bytes) -> bytes:
    """X25519; raises ValueError on a low-order public key (all-zero result)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public))


# The data messages' nonce: 32 zero bits then the 64-bit little-endian
# counter (whitepaper 5.4).
AEAD_NONCE = struct.Struct("<4xQ")


def aead_nonce(counter: int) -> bytes:
    return AEAD_NONCE.pack(counter)


def AEAD(key: bytes, counter: int, plaintext: bytes, authtext: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(aead_nonce(counter), plaintext, authtext or None)


def AEAD_OPEN(key: bytes, counter: int, ciphertext: bytes, authtext: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(aead_nonce(counter), ciphertext, authtext or None)
    except InvalidTag as exc:
        raise AuthenticationError("AEAD tag mismatch") from exc


def XAEAD(key: bytes, nonce: bytes, plaintext: bytes, authtext: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, authtext, nonce, key)


def XAEAD_OPEN(key: bytes, nonce: bytes, ciphertext: bytes, authtext: bytes) -> bytes:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, authtext, nonce, key)
    except CryptoError as exc:
        raise AuthenticationError("XAEAD tag mismatch") from exc


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
