"""Every command, as a real subprocess, with bad input: one line on stderr,
exit code 2, never a traceback, never key material.

Nothing here creates an interface. attach always names an underlay that does
not exist (UNDERLAY), so even an argument that slipped through validation
would stop at the underlay check, before anything is created; each case also
checks its error names the right argument. bench and demo run as nobody: a
bad option that slipped through would end in "needs root", not a benchmark.

Each command is a fresh interpreter (about a second on a busy machine), so
every case is started at once by the `ran` fixture, a few at a time, and the
tests only look at the results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from wgebpf.wireguard import keys

WGEBPF = str(Path(sys.executable).with_name("wgebpf"))
UNDERLAY = "wgtnosuch0"          # must not exist in the root namespace
NOBODY = 65534

KEY = keys.encode(keys.generate_private_key())
PSK = keys.encode(keys.generate_preshared_key())
PUB = keys.encode(keys.public_key(keys.generate_private_key()))
HUGE = "9" * 4301                # one digit past int()'s limit
GOOD_CONFIG = f"[Interface]\nPrivateKey = {KEY}\nAddress = 192.0.2.1/24\n"


def run(args: list[str], stdin: bytes = b"", as_nobody: bool = False):
    """The finished command; a hang (--config /dev/zero read whole) fails
    only its own test: returncode None and "timed out" on stderr."""
    extra = dict(user=NOBODY, group=NOBODY, extra_groups=[], cwd="/") if as_nobody else {}
    try:
        return subprocess.run([WGEBPF, *args], input=stdin, capture_output=True, timeout=60,
                              **extra)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, None, b"", b"timed out")


# Every run the tests below look at: (args, stdin, as_nobody) -> result.
# Arguments may hold "{tmp}", the module's scratch directory (see `ran`).
PLANNED: list[tuple[tuple[str, ...], bytes, bool]] = []


def plan(args: list[str], stdin: bytes = b"", as_nobody: bool = False):
    """Register a run for the `ran` fixture; returns its key."""
    key = (tuple(args), stdin, as_nobody)
    PLANNED.append(key)
    return key


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    """Module scope. Runs every planned command, eight at a time."""
    tmp = tmp_path_factory.mktemp("cli")
    write_config_files(tmp)
    def one(key):
        args, stdin, as_nobody = key
        return key, run([a.replace("{tmp}", str(tmp)) for a in args], stdin, as_nobody)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(pool.map(one, dict.fromkeys(PLANNED)))
    results["tmp"] = str(tmp)
    return results


def assert_refused(result, words: list[str], tmp: str = "") -> None:
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert "Traceback" not in out + err
    assert result.returncode == 2, (result.returncode, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert len(err) < 400, err
    for word in words:
        assert word.replace("{tmp}", tmp) in err, err
    for secret in (KEY, PSK):
        for start in range(len(secret) - 7):
            assert secret[start:start + 8] not in err, f"key material in {err!r}"


def test_underlay_used_by_these_tests_does_not_exist():
    assert not os.path.exists(f"/sys/class/net/{UNDERLAY}")


# ---------------------------------------------------------------- config files

CONFIGS = [
    ("huge ListenPort", f"ListenPort = {HUGE}", ":4: ListenPort: "),
    ("huge MTU", f"MTU = {HUGE}", ":4: MTU: "),
    ("huge FwMark", f"FwMark = {HUGE}", ":4: FwMark: "),
    ("huge Table", f"Table = {HUGE}", ":4: Table: "),
    ("huge Workers", f"Workers = {HUGE}", ":4: Workers: "),
    ("huge Metrics port", f"Metrics = :{HUGE}", ":4: Metrics: "),
    ("huge PersistentKeepalive",
     f"[Peer]\nPublicKey = {PUB}\nPersistentKeepalive = {HUGE}", ":6: PersistentKeepalive: "),
    ("huge Endpoint port", f"[Peer]\nPublicKey = {PUB}\nEndpoint = 192.0.2.2:{HUGE}",
     ":6: Endpoint: "),
    ("bad address", "Address = 192.0.2.300/24", ":4: Address: "),
    ("private key without =", f"PrivateKey {KEY}", ":4: PrivateKey: "),
    ("private key after colon", f"PrivateKey: {KEY}", ":4: PrivateKey: "),
    ("bare key line", KEY, ":4: not a 'Key = Value' line"),
    ("psk with leading =", f"[Peer]\nPublicKey = {PUB}\n=PresharedKey = {PSK}", ":6: "),
    ("psk truncated", f"[Peer]\nPublicKey = {PUB}\nPresharedKey = {PSK[:-2]}=", ":6: "),
    ("psk as an endpoint", f"[Peer]\nPublicKey = {PUB}\nEndpoint = {PSK}", ":6: Endpoint: "),
    ("NUL in a value", "MTU = 14\x0020", ":4: MTU: "),
]


def config_file(case_id: str) -> str:
    return "{tmp}/" + case_id.replace(" ", "_") + ".conf"


def write_config_files(tmp: Path) -> None:
    """The files the attach cases name, in the module's scratch directory."""
    (tmp / "good.conf").write_text(GOOD_CONFIG)
    for case_id, lines, _ in CONFIGS:
        Path(config_file(case_id).replace("{tmp}", str(tmp))).write_text(
            GOOD_CONFIG + lines + "\n")
    (tmp / "unreadable.conf").write_text(GOOD_CONFIG)
    (tmp / "unreadable.conf").chmod(0)
    (tmp / "not-utf8.conf").write_bytes(GOOD_CONFIG.encode() + b"DNS = \xff\n")


GOOD = "{tmp}/good.conf"


@pytest.mark.parametrize("key, where", [
    (plan(["attach", UNDERLAY, "-c", config_file(case_id)]), config_file(case_id) + where)
    for case_id, _, where in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_attach_bad_config(ran, key, where):
    assert_refused(ran[key], [where], ran["tmp"])


FILES = [
    ("missing", ["attach", UNDERLAY, "-c", "{tmp}/nosuch.conf"], False,
     ["{tmp}/nosuch.conf", "No such file"]),
    ("a directory", ["attach", UNDERLAY, "-c", "{tmp}"], False, ["{tmp}: ", "directory"]),
    # As root every file is readable: ask as nobody, whom the mode refuses.
    ("unreadable", ["attach", UNDERLAY, "-c", "{tmp}/unreadable.conf"], True,
     ["{tmp}/unreadable.conf", "Permission denied"]),
    ("read fails", ["attach", UNDERLAY, "-c", "/proc/self/mem"], False, ["cannot read"]),
    ("endless", ["attach", UNDERLAY, "-c", "/dev/zero"], False, ["/dev/zero", "larger than"]),
    ("not utf-8", ["attach", UNDERLAY, "-c", "{tmp}/not-utf8.conf"], False,
     ["{tmp}/not-utf8.conf:4: not valid UTF-8"]),
    ("no config", ["attach", UNDERLAY], False, ["--config"]),
]


@pytest.mark.parametrize("key, words", [(plan(args, b"", nobody), words)
                                        for _, args, nobody, words in FILES],
                         ids=[c[0] for c in FILES])
def test_attach_bad_config_file(ran, key, words):
    assert_refused(ran[key], words, ran["tmp"])


# ---------------------------------------------------------------- attach arguments

ATTACH_ARGS = [
    ("metrics port only", ["--metrics", "9586"], ["--metrics", "':9586'"]),
    ("metrics port too big", ["--metrics", ":99999"], ["--metrics", "out of range"]),
    ("metrics huge port", ["--metrics", ":" + HUGE], ["--metrics", "out of range"]),
    ("metrics huge number", ["--metrics", HUGE], ["--metrics", "no address"]),
    ("metrics unclosed bracket", ["--metrics", "[::1"], ["--metrics", "without ']'"]),
    ("metrics port 0", ["--metrics", "[::1]:0"], ["--metrics"]),
    ("metrics no port", ["--metrics", "localhost"], ["--metrics", "no port"]),
    ("metrics empty", ["--metrics", ""], ["--metrics"]),
    ("metrics newline", ["--metrics", "127.0.0.1:1\n2"], ["--metrics"]),
    ("metrics a key", ["--metrics", KEY], ["--metrics"]),
    ("xdp mode", ["--xdp", "fast"], ["--xdp", "'fast'"]),
    ("xdp a key", ["--xdp", PSK], ["--xdp"]),
    ("name too long", ["--name", "wgtest0123456789"], ["--name", "15 bytes"]),
    ("name with slash", ["--name", "../../etc/x"], ["--name", "'/'"]),
    ("name dot dot", ["--name", ".."], ["--name"]),
    ("name empty", ["--name", ""], ["--name"]),
    ("name with space", ["--name", "wg 0"], ["--name", "white space"]),
    ("name with colon", ["--name", "wg0:1"], ["--name"]),
    ("name a key", ["--name", KEY], ["--name"]),
    ("unknown option", ["--colour", "blue"], ["--colour"]),
]


@pytest.mark.parametrize("key, words", [
    (plan(["attach", UNDERLAY, "-c", GOOD, *extra]), words) for _, extra, words in ATTACH_ARGS],
    ids=[c[0] for c in ATTACH_ARGS])
def test_attach_bad_arguments(ran, key, words):
    assert_refused(ran[key], words)


UNDERLAYS = [
    ("slashes", "../../..", ["underlay", "'/'"]),
    ("empty", "", ["underlay"]),
    ("space", "eth0 eth1", ["underlay", "white space"]),
    ("too long", "x" * 16, ["underlay", "15 bytes"]),
    ("a key", KEY, ["underlay"]),
    ("missing", UNDERLAY, ["underlay", UNDERLAY, "does not exist"]),
]


@pytest.mark.parametrize("key, words", [
    (plan(["attach", underlay, "-c", GOOD]), words) for _, underlay, words in UNDERLAYS],
    ids=[c[0] for c in UNDERLAYS])
def test_attach_bad_underlay(ran, key, words):
    assert_refused(ran[key], words)


# ---------------------------------------------------------------- interface names

BAD_NAMES = [("slash", "../x"), ("dot dot", ".."), ("too long", "wgtest0123456789"),
             ("space", "wg 0"), ("colon", "wg0:1"), ("empty", ""), ("newline", "wg\n0"),
             ("a key", KEY)]
NAME_CASES = [(f"{command} {case_id}", [command, name] + extra)
              for command, extra in (("detach", []), ("show", []), ("status", []),
                                     ("set", ["source-policy", "fib"]))
              for case_id, name in BAD_NAMES]


@pytest.mark.parametrize("key", [plan(args) for _, args in NAME_CASES],
                         ids=[c[0] for c in NAME_CASES])
def test_bad_interface_names(ran, key):
    assert_refused(ran[key], ["interface name"])


@pytest.mark.parametrize("key", [plan([command]) for command in ("detach", "status", "set")],
                         ids=["detach", "status", "set"])
def test_missing_interface_name(ran, key):
    assert_refused(ran[key], ["Missing argument"])


UNREACHABLE = plan(["status", "wgtnosuch0"])


def test_unreachable_interface_is_one_line_exit_1(ran):
    # A well-formed name with nothing behind it is not a usage error: like
    # `wg show nosuch`, exit 1, still one line.
    result = ran[UNREACHABLE]
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "wgtnosuch0" in err


# ---------------------------------------------------------------- set

SET_ARGS = [
    ("no settings", [], ["Missing argument"]),
    ("unknown setting", ["mtu", "1280"], ["unknown setting 'mtu'"]),
    ("setting without value", ["source-policy"], ["needs a value"]),
    ("peer without key", ["peer"], ["needs a value"]),
    ("bad policy", ["source-policy", "sideways"], ["source-policy must be one of"]),
    ("default without peer", ["source-policy", "default"], ["must be one of"]),
    ("newline in policy", ["source-policy", "fib\npublic_key=00"], ["must be one of"]),
    ("peer key not base64", ["peer", "hunter2", "source-policy", "off"], ["peer:"]),
    ("peer key with a typo", ["peer", KEY[:20] + "!" + KEY[21:], "source-policy", "off"],
     ["peer:", "position 21"]),
    ("peer key truncated", ["peer", PSK[:-2], "source-policy", "off"], ["peer:"]),
    ("a key as the setting", [KEY, "source-policy"], ["unknown setting"]),
    ("a psk as the setting", [PSK[:-1], "off"], ["unknown setting"]),
    ("huge words", [HUGE, HUGE], ["unknown setting"]),
]


# wgtnosuch0 has no socket: refusing must not need one.
@pytest.mark.parametrize("key, expected", [
    (plan(["set", "wgtnosuch0", *words]), expected) for _, words, expected in SET_ARGS],
    ids=[c[0] for c in SET_ARGS])
def test_set_bad_arguments(ran, key, expected):
    assert_refused(ran[key], expected)


# ---------------------------------------------------------------- keys

PUBKEY_STDIN = [
    ("empty", b"", ["got 0 characters"]),
    ("short", b"hunter2\n", ["got 7 characters"]),
    ("not utf-8", b"\xff\xfe\x00garbage", ["pubkey"]),
    ("typo", (KEY[:10] + "*" + KEY[11:]).encode(), ["'*' at position 11"]),
    ("truncated", KEY[:-2].encode() + b"=\n", ["43 characters"]),
    ("three keys", PSK.encode() * 3, ["pubkey"]),
    ("huge", b"A" * 100_000, ["pubkey"]),
]


@pytest.mark.parametrize("key, words", [(plan(["pubkey"], stdin), words)
                                        for _, stdin, words in PUBKEY_STDIN],
                         ids=[c[0] for c in PUBKEY_STDIN])
def test_pubkey_bad_stdin(ran, key, words):
    assert_refused(ran[key], words)


# `wgebpf pubkey KEY` instead of piping the key in is an easy mistake.
KEY_ARGS = [(f"{command} {what}", [command, secret])
            for command in ("genkey", "genpsk", "pubkey")
            for what, secret in (("key", KEY), ("part of a psk", PSK[:30]))]


@pytest.mark.parametrize("key", [plan(args) for _, args in KEY_ARGS],
                         ids=[c[0] for c in KEY_ARGS])
def test_key_commands_refuse_arguments_without_echoing_a_key(ran, key):
    assert_refused(ran[key], ["unexpected extra argument"])


# ---------------------------------------------------------------- demo, bench, the rest

OTHERS = [
    ("demo extra", ["demo", "now"], ["unexpected extra argument"]),
    ("demo option", ["demo", "--fast"], ["--fast"]),
    ("repeats 0", ["bench", "--repeats", "0"], ["--repeats"]),
    ("repeats huge", ["bench", "--repeats", HUGE], ["--repeats"]),
    ("repeats words", ["bench", "--repeats", "many"], ["--repeats"]),
    ("seconds nan", ["bench", "--seconds", "nan"], ["--seconds"]),
    ("seconds inf", ["bench", "--seconds", "inf"], ["--seconds"]),
    ("seconds 1e999", ["bench", "--seconds", "1e999"], ["--seconds"]),
    ("seconds -1", ["bench", "--seconds", "-1"], ["--seconds"]),
    ("seconds 0", ["bench", "--seconds", "0"], ["--seconds"]),
    ("seconds 1e9", ["bench", "--seconds", "1e9"], ["--seconds"]),
    ("seconds words", ["bench", "--seconds", "soon"], ["--seconds"]),
    ("workers 0", ["bench", "--workers", "0"], ["Workers"]),
    ("workers words", ["bench", "--workers", "1,x"], ["--workers"]),
    ("workers huge", ["bench", "--workers", HUGE], ["--workers"]),
    ("selections unknown", ["bench", "--selections", "nexthop,bgp"], ["PeerSelection", "bgp"]),
    ("selections junk", ["bench", "--selections", "a;b"], ["--selections"]),
    ("selections huge", ["bench", "--selections", HUGE], ["--selections"]),
    ("output a file", ["bench", "--output", "/etc/passwd"], ["--output", "not a directory"]),
    ("output under a file", ["bench", "--output", "/etc/passwd/bench-out"],
     ["--output", "not a directory"]),
    ("unknown command", ["attack"], ["No such command"]),
    ("unknown option", ["--colour"], ["--colour"]),
]


# As nobody: a bad option that slipped through must not start a benchmark.
@pytest.mark.parametrize("key, words", [(plan(args, b"", True), words)
                                        for _, args, words in OTHERS],
                         ids=[c[0] for c in OTHERS])
def test_other_bad_arguments(ran, key, words):
    assert_refused(ran[key], words)
