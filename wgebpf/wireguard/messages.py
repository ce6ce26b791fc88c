"""Every WireGuard wire format and protocol constant, in one place.

Names follow the whitepaper (section 6 "Timers & Stateless UI") and kernel
WireGuard's messages.h, so a reader can check them against either.
"""

import struct

# --- Specification constants (whitepaper, section 6.1) -----------------------

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_SECRET_MAX_AGE = 120.0
COOKIE_SECRET_LATENCY = 5.0
# Not in the whitepaper's table but in every implementation: up to a third of
# a second of jitter on handshake retransmits, so peers that started together
# do not retry in lock-step.
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# --- Implementation constants ------------------------------------------------

MAX_STAGED_PACKETS = 128          # per peer, while a handshake is under way
# A bound on one Device's peer table. Not the limit of a running interface,
# which is lower: a peer's slot (its tag on the device's frames and its key
# in the kernel maps) is 16 bits, so at most 65535 (SLOT_MAX in
# wgebpf/kernel/bpfmaps.py), and the worker pool refuses the next one.
MAX_PEERS = 1 << 20
HANDSHAKES_PER_SECOND_UNDER_LOAD = 64  # above this the responder wants cookies
UNDER_LOAD_AFTER = 1.0            # seconds "under load" lasts after the burst
DEFAULT_MTU = 1420
DEFAULT_LISTEN_PORT = 51820

# --- Message types and sizes (little-endian on the wire) ---------------------

MESSAGE_HANDSHAKE_INITIATION = 1
MESSAGE_HANDSHAKE_RESPONSE = 2
MESSAGE_HANDSHAKE_COOKIE = 3
MESSAGE_DATA = 4

KEY_LEN = 32
NOISE_PUBLIC_KEY_LEN = 32
NOISE_TIMESTAMP_LEN = 12
AEAD_TAG_LEN = 16
COOKIE_LEN = 16
COOKIE_NONCE_LEN = 24
MAC_LEN = 16
MESSAGE_PADDING_MULTIPLE = 16

# type(1) reserved(3) sender(4) ephemeral(32) static(32+16) timestamp(12+16) mac1 mac2
HANDSHAKE_INITIATION = struct.Struct("<I I 32s 48s 28s 16s 16s")
# type reserved sender(4) receiver(4) ephemeral(32) empty(0+16) mac1 mac2
HANDSHAKE_RESPONSE = struct.Struct("<I I I 32s 16s 16s 16s")
# type reserved receiver(4) nonce(24) cookie(16+16)
HANDSHAKE_COOKIE = struct.Struct("<I I 24s 32s")
# type reserved receiver(4) counter(8), then the encrypted packet
DATA_HEADER = struct.Struct("<I I Q")

MESSAGE_HANDSHAKE_INITIATION_LEN = HANDSHAKE_INITIATION.size   # 148
MESSAGE_HANDSHAKE_RESPONSE_LEN = HANDSHAKE_RESPONSE.size       # 92
MESSAGE_HANDSHAKE_COOKIE_LEN = HANDSHAKE_COOKIE.size           # 64
MESSAGE_DATA_MIN_LEN = DATA_HEADER.size + AEAD_TAG_LEN          # 32 (a keepalive)

# mac1 covers everything before it; mac2 everything before mac2.
def macs_offset(message: bytes) -> int:
    """Offset of mac1 in a handshake message (mac2 follows it)."""
    return len(message) - 2 * MAC_LEN


def message_type(packet: bytes) -> int:
    """The message type, or 0 if the packet is too short to carry one.

    The type is one byte followed by three reserved zero bytes; reading it as
    a little-endian u32 rejects messages with nonzero reserved bytes.
    """
    if len(packet) < 4:
        return 0
    return int.from_bytes(packet[:4], "little")


EXPECTED_LENGTH = {
    MESSAGE_HANDSHAKE_INITIATION: MESSAGE_HANDSHAKE_INITIATION_LEN,
    MESSAGE_HANDSHAKE_RESPONSE: MESSAGE_HANDSHAKE_RESPONSE_LEN,
    MESSAGE_HANDSHAKE_COOKIE: MESSAGE_HANDSHAKE_COOKIE_LEN,
}


def is_well_formed(packet: bytes) -> bool:
    """Type known and length right for the type (the first check on receive)."""
    kind = message_type(packet)
    if kind == MESSAGE_DATA:
        return len(packet) >= MESSAGE_DATA_MIN_LEN
    return EXPECTED_LENGTH.get(kind) == len(packet)

# The responder refuses more than this many initiations a second from one
# peer, whatever their timestamps (a cheap guard against replayed floods).
INITIATIONS_PER_SECOND = 50
