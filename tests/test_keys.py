"""wgebpf.wireguard.keys against RFC 7748 and against wg(8) itself."""

import base64
import subprocess

import pytest

from wgebpf.wireguard import keys

# RFC 7748 section 6.1, Alice.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")

WG = "/usr/bin/wg"


def wg(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([WG, *args], input=stdin, capture_output=True, text=True, timeout=10)


def test_rfc7748_public_key():
    assert keys.public_key(ALICE_PRIVATE) == ALICE_PUBLIC


def test_generated_private_keys_are_clamped():
    for _ in range(64):
        k = keys.generate_private_key()
        assert len(k) == 32
        assert k[0] & 7 == 0
        assert k[31] & 0x80 == 0
        assert k[31] & 0x40 == 0x40


def test_generated_keys_differ():
    assert len({keys.generate_private_key() for _ in range(16)}) == 16
    assert len({keys.generate_preshared_key() for _ in range(16)}) == 16
    assert all(len(keys.generate_preshared_key()) == 32 for _ in range(4))


def test_public_key_matches_wg_pubkey():
    for _ in range(5):
        private = keys.generate_private_key()
        result = wg("pubkey", stdin=keys.encode(private) + "\n")
        assert result.returncode == 0, result.stderr
        assert keys.decode(result.stdout.strip()) == keys.public_key(private)


def test_wg_genkey_is_read_and_already_clamped():
    for _ in range(3):
        text = wg("genkey").stdout.strip()
        private = keys.decode(text)
        assert keys.encode(private) == text
        assert private[0] & 7 == 0 and private[31] & 0xC0 == 0x40
        assert keys.encode(keys.public_key(private)) == wg("pubkey", stdin=text + "\n").stdout.strip()


def test_encode_decode_round_trip():
    for key in (bytes(32), bytes(range(32)), b"\xff" * 32, ALICE_PRIVATE):
        text = keys.encode(key)
        assert len(text) == 44 and text.endswith("=")
        assert keys.decode(text) == key


GOOD = base64.b64encode(bytes(range(32))).decode()          # ...Hh8=
NON_CANONICAL = GOOD[:42] + "9="                             # '9' has low bits set


@pytest.mark.parametrize("text, words", [
    ("", "got 0 characters"),
    (GOOD[:-1], "got 43 characters"),
    (GOOD + "=", "got 45 characters"),
    (GOOD[:-1] + "A", "last character is not '='"),
    (GOOD[:10] + "!" + GOOD[11:], "'!' at position 11"),
    (GOOD[:-2] + "==", "'=' at position 43"),
    (" " + GOOD[1:], "' ' at position 1"),
    (NON_CANONICAL, "not canonical"),
])
def test_decode_rejects_what_wg_rejects(text, words):
    with pytest.raises(keys.KeyFormatError) as err:
        keys.decode(text)
    assert words in str(err.value)
    assert isinstance(err.value, ValueError)
    # The same strings are refused by wg itself, so we are not stricter than it.
    assert wg("pubkey", stdin=text + "\n").returncode != 0


def test_error_does_not_echo_the_key():
    bad = GOOD[:-1]
    with pytest.raises(keys.KeyFormatError) as err:
        keys.decode(bad)
    assert bad not in str(err.value)


def test_hex():
    assert keys.to_hex(ALICE_PRIVATE) == ALICE_PRIVATE.hex()
    assert keys.to_hex(b"\xab" * 32) == "ab" * 32          # lowercase, as the UAPI writes
    assert keys.from_hex("ab" * 32) == b"\xab" * 32
    assert keys.from_hex("AB" * 32) == b"\xab" * 32


@pytest.mark.parametrize("text", ["", "ab" * 31, "ab" * 33, "zz" * 32, " " + "a" * 63,
                                  "a" * 63 + "\n"])
def test_from_hex_rejects(text):
    with pytest.raises(keys.KeyFormatError):
        keys.from_hex(text)


@pytest.mark.parametrize("func", [keys.encode, keys.to_hex, keys.public_key])
@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_wrong_length_keys_are_refused(func, key):
    with pytest.raises(keys.KeyFormatError, match="32 bytes"):
        func(key)
