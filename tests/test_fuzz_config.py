"""Property-based fuzzing of the config parser and of `wgebpf set`'s words.

Properties:
- config.parse, on any text and on valid files with a few mutations, either
  parses or raises ConfigError. Every error names the file and a line (all
  but "no [Interface] section", which has none), is one printable line, and
  quotes no 8 characters in a row of any private or preshared key in the file.
- settings.parse_args, on any words, returns UAPI lines of the two known
  forms or raises SettingError, quoting no key it was given.
- settings.apply, on any lines, applies them or raises SettingError.

The budget comes from the hypothesis profile (tests/conftest.py): "ci" by
default, --hypothesis-profile=long for a long run.
"""

from __future__ import annotations

import random
import re

from hypothesis import example, given, strategies as st

from memnet import pair
from wgebpf.control import config, settings
from wgebpf.wireguard import keys
from wgebpf.control.config import ConfigError

PATH = "/etc/wgebpf/fuzz0.conf"

# Random-looking key bytes under hypothesis's control: all-zero keys would
# make "AAAAAAAA" a secret, and any inserted text a false leak.
key_bytes = st.integers(0, 2**64).map(lambda seed: random.Random(seed).randbytes(32))
b64_keys = key_bytes.map(keys.encode)


def pieces(secret: str) -> set[str]:
    return {secret[i:i + 8] for i in range(len(secret) - 7)}


def check_error(error: ConfigError, secrets: list[str]) -> None:
    text = str(error)
    assert text.startswith(f"{PATH}:" if error.line is not None else f"{PATH}: ")
    if error.line is None:
        assert error.message == "no [Interface] section"
    else:
        assert text.startswith(f"{PATH}:{error.line}: ")
    assert text.isprintable() and len(text) < 600, text
    for secret in secrets:
        leaked = [p for p in pieces(secret) if p in text]
        assert not leaked, f"{text!r} quotes key material {leaked[0]!r}"


def parse_or_clean_error(text: str, secrets: list[str]) -> None:
    try:
        config.parse(text, PATH)
    except ConfigError as err:
        for each in err.errors:
            check_error(each, secrets)


# ---------------------------------------------------------------- arbitrary text

config_alphabet = st.one_of(
    st.sampled_from(list("[]=#:, \t\n\r/.0123456789abcdefxXPIKeyLisnPort-+")),
    st.characters())
config_words = st.sampled_from(["[Interface]", "[Peer]", "PrivateKey", "PublicKey",
                                "PresharedKey", "ListenPort", "MTU", "FwMark", "Table",
                                "Endpoint", "AllowedIPs", "Address", "DNS", "Metrics",
                                "PeerMark", "Workers", " = ", "\n", "9" * 4301, "0x", "[",
                                "]", "::", "%", "\x00", "\ufeff", "\u2028"])


@given(st.text(config_alphabet, max_size=400))
@example("[Interface]\nListenPort = " + "9" * 4301)
@example("[Interface]\nMTU = 1\r2")
@example("[Interface]\nTable = " + "1" * 5000)
def test_fuzz_parse_any_text(text):
    parse_or_clean_error(text, [])


@given(st.lists(st.one_of(config_words, st.text(config_alphabet, max_size=12)), max_size=60))
def test_fuzz_parse_config_words(words):
    parse_or_clean_error("".join(words), [])


# ---------------------------------------------------------------- mutated valid files

@st.composite
def valid_files(draw) -> tuple[list[str], list[str]]:
    """The lines of a valid file, and its secrets (private key, psks)."""
    private = draw(b64_keys)
    lines = ["[Interface]", f"PrivateKey = {private}"]
    optional = {"ListenPort": "51820", "Address": "192.0.2.1/24, 2001:db8::1/64",
                "MTU": "1420", "FwMark": "0x1f", "Table": "1234", "DNS": "192.0.2.53",
                "PeerSelection": "allowedips", "SourcePolicy": "fib", "Workers": "2",
                "Metrics": "127.0.0.1:9586", "PeerMark": "0xff000000"}
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        lines.append(f"{name} = {optional[name]}")
    secrets = [private]
    for public in draw(st.lists(b64_keys, max_size=3, unique=True)):
        lines += ["", "[Peer]", f"PublicKey = {public}"]
        if draw(st.booleans()):
            psk = draw(b64_keys)
            secrets.append(psk)
            lines.append(f"PresharedKey = {psk}")
        lines += ["Endpoint = 198.51.100.2:51820", "AllowedIPs = 203.0.113.0/24",
                  "PersistentKeepalive = 25"]
    return lines, secrets


def _edit(text: str, data) -> str:
    """One random character deleted, inserted or replaced in `text`."""
    where = data.draw(st.integers(0, len(text)))
    char = data.draw(st.one_of(st.characters(), st.sampled_from("=:[] \t\x00")))
    how = data.draw(st.sampled_from(["delete", "insert", "replace"]))
    if how == "insert" or not text:
        return text[:where] + char + text[where:]
    where = min(where, len(text) - 1)
    return text[:where] + ("" if how == "delete" else char) + text[where + 1:]


def mutate(line: str, data) -> list[str]:
    """`line` after one mutation; a list, as some add or remove lines."""
    name, sep, value = line.partition(" = ")
    how = data.draw(st.sampled_from([
        "separator", "leading =", "bare value", "edit name", "edit value", "huge number",
        "random value", "random line", "duplicate", "drop", "header", "case", "unicode"]))
    if how == "separator" and sep:
        return [name + data.draw(st.sampled_from(["", " ", ":", ": ", "\t", " == ", "=="])) + value]
    if how == "leading =":
        return ["=" + line]
    if how == "bare value" and sep:
        return [value]
    if how == "edit name" and sep:
        return [_edit(name, data) + sep + value]
    if how == "edit value" and sep:
        return [name + sep + _edit(value, data)]
    if how == "huge number" and sep:
        digits = data.draw(st.sampled_from([4301, 5000, 20, 21, 100]))
        prefix = data.draw(st.sampled_from(["", ":", "0x", "192.0.2.1:", "[::1]:", "0"]))
        return [name + sep + prefix + "9" * digits]
    if how == "random value" and sep:
        return [name + sep + data.draw(st.text(max_size=30))]
    if how == "random line":
        return [line, data.draw(st.text(max_size=50))]
    if how == "duplicate":
        return [line, line]
    if how == "drop":
        return []
    if how == "header":
        return [f"[{data.draw(st.sampled_from([line, name, value, 'Peer', 'Interface']))}]"]
    if how == "case":
        return [line.swapcase()]
    if how == "unicode":
        return [line + data.draw(st.sampled_from(["\ufeff", "\u2028", "\x00", "é", "\r",
                                                  "\u0663", "\x1b[31m"]))]
    return [line]


@given(valid_files(), st.data())
def test_fuzz_parse_mutated_files(file, data):
    lines, secrets = file
    for _ in range(data.draw(st.integers(1, 4))):
        if not lines:
            break
        at = data.draw(st.integers(0, len(lines) - 1))
        lines = lines[:at] + mutate(lines[at], data) + lines[at + 1:]
    parse_or_clean_error("\n".join(lines) + "\n", secrets)


@given(valid_files())
def test_fuzz_valid_files_parse_and_round_trip(file):
    lines, _ = file
    cfg = config.parse("\n".join(lines) + "\n", PATH)
    again = config.parse(config.format_config(cfg), PATH)
    for peer in cfg.peers + again.peers:
        peer.line = 0                       # [Peer] headers move when written back
    assert again == cfg


# ---------------------------------------------------------------- single values

@given(st.text(max_size=60))
@example(":" + "9" * 4301)
@example("9" * 4301)
@example("[::1")
def test_fuzz_metrics_and_endpoint_values(value):
    for parser in (config.parse_metrics, config.parse_endpoint):
        try:
            parser(value)
        except ValueError as err:
            assert str(err).isprintable() and len(str(err)) < 400


# ---------------------------------------------------------------- wgebpf set

SET_LINE_RE = re.compile(r"public_key=[0-9a-f]{64}|source_policy=(allowedips|fib|nftables|off|default)")
set_words = st.one_of(st.sampled_from(["peer", "source-policy", "default", "fib", "off",
                                       "nftables", "allowedips", "", "9" * 4301]),
                      b64_keys, st.text(max_size=20))


@given(st.lists(set_words, max_size=8))
@example(["source-policy", "fib\npublic_key=00"])
@example(["peer"])
def test_fuzz_set_words(words):
    given_keys = [w for w in words if len(w) == 44]
    try:
        lines = settings.parse_args(words)
    except settings.SettingError as err:
        text = str(err)
        assert text.isprintable() and len(text) < 200, text
        for key in given_keys:
            assert not any(p in text for p in pieces(key)), text
        return
    assert lines and all(SET_LINE_RE.fullmatch(line) for line in lines)


_DEVICE = []


def device():
    """One in-memory device for every example (building one per example is slow)."""
    if not _DEVICE:
        clock, network, a, b = pair()
        _DEVICE.append((a.device, b.public_key))
    return _DEVICE[0]


@given(st.lists(st.one_of(
    st.sampled_from(["source_policy=fib", "source_policy=default", "source_policy=nftables",
                     "source_policy=off", "public_key=" + "00" * 32, "public_key=zz", "=",
                     "source_policy", "public_key=PEER"]),
    st.text(max_size=30)), max_size=6))
def test_fuzz_set_lines_on_a_device(lines):
    dev, peer_key = device()
    lines = [line.replace("PEER", peer_key.hex()) for line in lines]
    try:
        settings.apply(dev, lines)
    except settings.SettingError as err:
        assert err.errno > 0
    assert dev.source_policy in config.SOURCE_POLICIES
