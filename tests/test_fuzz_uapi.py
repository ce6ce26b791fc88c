"""Property-based fuzzing of the UAPI text protocol (wgebpf/control/uapi.py).

Three targets, all against a real wgebpf Device on in-memory sockets
(tests/memnet.py), so the applier meets the real peer and allowed-IPs code:

- apply_set() with structured, mutated set=1 lines;
- the socket server with one structured set=1 request and every way it can
  end (blank line, end of input mid-line, extra blank lines, CRLF);
- the socket server with arbitrary byte streams.

Properties: every set gets exactly one well-formed errno answer; nothing
escapes the server (no ERROR log record, which is where the server's
last-resort handlers report); the server serves the next connection; a
refused set leaves the device's get=1 dump unchanged; an accepted one
survives a get -> set round trip; no key material from the input reaches
the log. Crashes found become @example regressions here.

Budget: the hypothesis profile (tests/conftest.py); a long run is
  pytest tests/test_fuzz_uapi.py --hypothesis-profile=long --hypothesis-show-statistics
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import re
import socket
import tempfile

from hypothesis import assume, event, example, given, strategies as st

from memnet import MemoryConn, MemoryNetwork
from wgebpf.control import uapi
from wgebpf.wireguard.crypto import DH_PUBKEY
from wgebpf.wireguard.device import Device
from wgebpf.wireguard.scheduler import FakeClock


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


DEVICE_KEY = _key("device private key")
PEER_KEYS = [_key(f"peer {i}") for i in range(3)]
# Secrets that only the fuzz input carries: none may ever reach the log.
INPUT_PRIVATE_KEY = _key("input private key")
INPUT_PSK = _key("input preshared key")
SECRETS = (INPUT_PRIVATE_KEY, INPUT_PSK)
ERRNO_ANSWER = re.compile(rb"errno=(0|-[1-9][0-9]{0,4})")
STATS = ("last_handshake_time_sec", "last_handshake_time_nsec", "tx_bytes", "rx_bytes", "errno")


# --------------------------------------------------------------- the device

def empty_device(private_key: bytes | None = None, port: int = 0) -> Device:
    """A real Device on an in-memory socket: no key, port or peers."""
    conn = MemoryConn(MemoryNetwork(), ("192.0.2.1", port))
    device = Device("wgefuzz", private_key, clock=FakeClock(), conn=conn)
    conn.device = device
    return device


def configured_device() -> Device:
    """A real Device with a key, a listen port, a fwmark and two peers."""
    device = empty_device(DEVICE_KEY, 51820)
    device.set_fwmark(0x1234)
    first = device.add_peer(PEER_KEYS[0])
    first.set_preshared_key(_key("existing psk"))
    first.set_endpoint(("198.51.100.7", 51820))
    device.add_allowed_ip(first, "198.51.100.0/24")
    device.add_allowed_ip(first, "2001:db8:1::/48")
    second = device.add_peer(PEER_KEYS[1])
    device.add_allowed_ip(second, "203.0.113.0/25")
    return device


def dump(device: Device) -> str:
    with device.lock:
        return uapi.format_get(device)


def config_lines(get_answer: str) -> list[str]:
    return [line for line in get_answer.split("\n") if line and line.split("=")[0] not in STATS]


class LogCapture(logging.Handler):
    """Every wgebpf log record, formatted with its traceback if any."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(logging.Formatter().format(record))


@contextlib.contextmanager
def captured_logs():
    logger = logging.getLogger("wgebpf")
    handler, level = LogCapture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def secret_windows() -> list[str]:
    """16-character pieces of every spelling of the input secrets."""
    windows = []
    for secret in SECRETS:
        for text in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()):
            windows += [text[:16], text[16:32], text[-16:]]
    return windows


def check_logs(logs: LogCapture) -> None:
    errors = [text for record, text in zip(logs.records, logs.texts)
              if record.levelno >= logging.ERROR]
    assert not errors, f"something escaped to a last-resort handler: {errors[0]}"
    text = "\n".join(logs.texts)
    for window in secret_windows():
        assert window not in text, "key material from the input reached the log"


# -------------------------------------------------------------- set lines

def _hex(key: bytes) -> str:
    return key.hex()


any_key = st.sampled_from([*PEER_KEYS, INPUT_PRIVATE_KEY, bytes(32), DH_PUBKEY(DEVICE_KEY)])
ports = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([51820, 65535, 0]))
v4 = st.sampled_from(["192.0.2.", "198.51.100.", "203.0.113."]).flatmap(
    lambda net: st.integers(0, 255).map(lambda host: f"{net}{host}"))
v6 = st.sampled_from(["2001:db8::", "2001:db8:1::", "2001:DB8:0:0::"]).flatmap(
    lambda net: st.integers(0, 0xFFFF).map(lambda host: f"{net}{host:x}"))
endpoints = st.one_of(
    st.builds(lambda a, p: f"{a}:{p}", v4, ports),
    st.builds(lambda a, p: f"[{a}]:{p}", v6, ports),
    ports.map(lambda p: f"[fe80::1%lo]:{p}"),
)
allowed_ips = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", v4, st.integers(0, 32)),
    st.builds(lambda a, n: f"{a}/{n}", v6, st.integers(0, 128)),
)

interface_lines = st.one_of(
    st.just(f"private_key={_hex(INPUT_PRIVATE_KEY)}"),
    st.just(f"private_key={_hex(bytes(32))}"),
    ports.map(lambda p: f"listen_port={p}"),
    st.integers(0, 0xFFFFFFFF).map(lambda m: f"fwmark={m}"),
    st.just("replace_peers=true"),
)
peer_lines = st.one_of(
    st.just(f"preshared_key={_hex(INPUT_PSK)}"),
    endpoints.map(lambda e: f"endpoint={e}"),
    st.integers(0, 0xFFFF).map(lambda s: f"persistent_keepalive_interval={s}"),
    st.just("replace_allowed_ips=true"),
    allowed_ips.map(lambda a: f"allowed_ip={a}"),
    st.sampled_from(["remove=true", "update_only=true", "protocol_version=1"]),
)
peer_sections = st.builds(lambda key, lines: [f"public_key={_hex(key)}", *lines],
                          any_key, st.lists(peer_lines, max_size=5))


@st.composite
def valid_requests(draw) -> list[str]:
    lines = draw(st.lists(interface_lines, max_size=4))
    for section in draw(st.lists(peer_sections, max_size=3)):
        lines += section
    return lines


# Text with no newline: a newline would only split it into more lines.
junk = st.text(st.characters(blacklist_characters="\n"), max_size=40)
KEY_NAMES = ["private_key", "listen_port", "fwmark", "replace_peers", "public_key",
             "preshared_key", "endpoint", "persistent_keepalive_interval",
             "replace_allowed_ips", "allowed_ip", "remove", "update_only", "protocol_version"]
bad_values = st.one_of(
    junk,
    st.sampled_from([
        "9" * 5000, "0" * 5000 + "1", "1" * 4301, "-1", "+5", " 5", "5_0", "0x10", "\u0663",
        base64.b64encode(INPUT_PRIVATE_KEY).decode(), _hex(INPUT_PSK)[:-1], _hex(INPUT_PSK) + "0",
        _hex(INPUT_PRIVATE_KEY)[:-2] + "zz", " ".join(_hex(INPUT_PSK)), _hex(INPUT_PSK).upper(),
        "192.0.2.1", "192.0.2.1:" + "5" * 5000, "[2001:db8::1]", "2001:db8::1:51820",
        "[fe80::1%" + "x" * 100 + "]:1", "[fe80::1%\x00]:1", "vpn.example.com:51820",
        "192.0.2.0/33", "192.0.2.0/" + "2" * 5000, "fe80::%lo/64", "192.0.2.0/255.255.255.0",
        "2001:db8::/129", "true\x00", "True", "1\r", "",
    ]),
)


def wire(text: str) -> bytes:
    # surrogatepass: lone surrogates go out as the invalid UTF-8 they make.
    return text.encode("utf-8", "surrogatepass")


def _replace_value(line: str, value: str) -> str:
    return line.partition("=")[0] + "=" + value


def _pad_to(line: str, length: int) -> str:
    """Grows a line to `length` bytes around MAX_LINE with zeros before the value."""
    key, _, value = line.partition("=")
    return f"{key}={'0' * max(0, length - len(wire(line)))}{value}"


@st.composite
def mutated_line(draw, line: str) -> str:
    kind = draw(st.sampled_from(["value", "key", "no_equals", "cr", "nul", "secret_alone",
                                 "known_key_junk", "blank", "huge"]))
    if kind == "value":
        return _replace_value(line, draw(bad_values))
    if kind == "key":
        return draw(junk) + "=" + line.partition("=")[2]
    if kind == "no_equals":
        return line.replace("=", "")
    if kind == "cr":
        return line + draw(st.sampled_from(["\r", "\r\r", "\r "]))
    if kind == "nul":
        at = draw(st.integers(0, len(line)))
        return line[:at] + "\x00" + line[at:]
    if kind == "secret_alone":
        return draw(st.sampled_from([_hex(INPUT_PRIVATE_KEY), base64.b64encode(INPUT_PSK).decode(),
                                     _hex(INPUT_PSK) + "=1"]))
    if kind == "known_key_junk":
        return draw(st.sampled_from(KEY_NAMES)) + "=" + draw(bad_values)
    if kind == "blank":
        return ""
    return _pad_to(line, draw(st.sampled_from([4097, 5000, uapi.MAX_LINE, uapi.MAX_LINE + 1, 70_000])))


@st.composite
def set_requests(draw) -> list[str]:
    """A valid request with a few of its lines (or new ones) mutated."""
    lines = draw(valid_requests())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines)))
        if at < len(lines) and draw(st.booleans()):
            lines[at] = draw(mutated_line(lines[at]))
        else:
            base = draw(st.one_of(interface_lines, peer_lines))
            lines.insert(at, draw(st.one_of(st.just(base), mutated_line(base))))
    return lines


# ------------------------------------------------------- target: apply_set

def check_round_trip(device: Device) -> None:
    """What get shows, set reproduces on a new device."""
    shown = config_lines(dump(device))
    copy = empty_device()
    with copy.lock:
        assert uapi.apply_set(copy, shown) == 0
    assert config_lines(dump(copy)) == shown


@given(set_requests())
@example(["listen_port=" + "9" * 5000])                      # int() beyond 4300 digits
@example([f"public_key={_hex(PEER_KEYS[2])}", "endpoint=192.0.2.1:" + "5" * 5000])
@example([f"public_key={_hex(PEER_KEYS[2])}", "allowed_ip=192.0.2.0/" + "2" * 5000])
@example([base64.b64encode(INPUT_PRIVATE_KEY).decode()])    # a pasted key parses as a key name
@example(["listen_port=5", f"public_key={_hex(PEER_KEYS[2])}", "allowed_ip=192.0.2.0/24",
          "endpoint=nonsense"])                              # refused whole, not half-applied
def test_fuzz_apply_set(lines):
    device = configured_device()
    before = dump(device)
    with captured_logs() as logs, device.lock:
        code = uapi.apply_set(device, lines)
    assert isinstance(code, int) and code >= 0
    event(f"errno {errno.errorcode.get(code, code) if code else 0}")
    check_logs(logs)
    if code:
        assert dump(device) == before, "a refused set changed the device"
    else:
        check_round_trip(device)


# --------------------------------------------------------- the socket server

@contextlib.contextmanager
def serving(device: Device):
    with tempfile.TemporaryDirectory(prefix="wgefuzz") as directory:
        server = uapi.UAPIServer("wgefuzz0", device, device.lock, directory=directory)
        server.start()
        try:
            yield server.path
        finally:
            server.stop()


def exchange(path: str, payload: bytes) -> bytes:
    """Sends payload, ends our side, returns all the server sent until it closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                 # the server may stop reading early (a line too long)
        data = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def answers_of(data: bytes) -> list[bytes]:
    """The answers in a stream; each ends in a blank line, so none may be cut."""
    *answers, rest = data.split(b"\n\n")
    assert rest == b"", f"an answer without its blank line: {rest[-80:]!r}"
    return answers


def is_get_dump(answer: bytes) -> bool:
    return answer.endswith(b"\nerrno=0") and b"\npublic_key=" in answer


def check_still_serving(path: str, device: Device) -> None:
    assert exchange(path, b"get=1\n\n").decode() == dump(device)


# How a set request may end: (line ending, what follows the last line,
# whether a get=1 sent after it should be answered).
ENDINGS = {
    "blank line": (b"\n", b"\n", True),
    "crlf": (b"\r\n", b"\r\n", True),                      # bufio.ScanLines drops the CRs
    "end of input after newline": (b"\n", b"", False),
    "end of input mid-line": (b"\n", None, False),          # the last newline left off too
    "two blank lines": (b"\n", b"\n\n", False),             # then an empty operation: close
}


def set_payload(body: list[bytes], ending: str) -> bytes:
    newline, after, get_follows = ENDINGS[ending]
    text = b"set=1\n" + b"".join(line + newline for line in body)
    if after is None:
        return text[:-len(newline)] if body else text
    return text + after + (b"get=1\n\n" if get_follows else b"")


def predicted_set_answer(body: list[bytes]) -> tuple[bytes | None, bool]:
    """(EIO answer if the set has a line over MAX_LINE else None, whether
    a blank line ends the set before the body does)."""
    for line in body:
        if len(line) > uapi.MAX_LINE:
            return f"errno=-{errno.EIO}".encode(), False
        if line in (b"", b"\r"):     # a lone CR is blank to bufio.ScanLines
            return None, True
    return None, False


@given(set_requests(), st.sampled_from(sorted(ENDINGS)))
@example(["listen_port=9", "fwmark=3"], "end of input mid-line")     # wireguard-go applies it
@example(["listen_port=" + "0" * 5000 + "9"], "blank line")          # a 5000-byte line is a line
@example(["listen_port=9", "fwmark=" + "1" * 70_000], "blank line")  # too long: EIO, none applied
@example([_pad_to("fwmark=1", uapi.MAX_LINE)], "end of input mid-line")
@example([_hex(INPUT_PRIVATE_KEY) + "=1"], "blank line")
@example([], "crlf")
def test_fuzz_server_set(lines, ending):
    body = [wire(line) for line in lines]
    assume(not any(line in (b"get=1", b"set=1") for line in body))
    device = configured_device()
    before = dump(device)
    with captured_logs() as logs, serving(device) as path:
        answers = answers_of(exchange(path, set_payload(body, ending)))
        check_still_serving(path, device)
    check_logs(logs)
    # The CR of a CRLF ending counts toward the line length, as in bufio.Scanner.
    sent_lines = [line + b"\r" for line in body] if ending == "crlf" else body
    too_long, ended_early = predicted_set_answer(sent_lines)
    assert answers, "the set got no answer"
    assert ERRNO_ANSWER.fullmatch(answers[0]), answers[0][:80]
    event(f"{ending}: {answers[0].decode()}")
    if too_long:
        assert answers == [too_long]
    elif ENDINGS[ending][2] and not ended_early:
        assert len(answers) == 2 and answers[1].decode() + "\n\n" == dump(device)
    else:
        assert len(answers) == 1
    if answers[0] != b"errno=0":
        assert dump(device) == before, "a refused set changed the device"


# ------------------------------------------------------- arbitrary streams

TOKENS = [b"set=1\n", b"get=1\n", b"\n", b"\r\n", b"=", b"\x00", "\u00e9\u2028".encode(),
          b"private_key=", INPUT_PRIVATE_KEY.hex().encode(), b"listen_port=", b"7", b"9" * 5000,
          b"public_key=" + PEER_KEYS[2].hex().encode(), b"allowed_ip=", b"192.0.2.0/24",
          b"endpoint=", b"[2001:db8::1]:1", b"remove=true", b"wgebpf-status=1\n",
          base64.b64encode(INPUT_PSK), b"preshared_key=" + INPUT_PSK.hex().encode()]
streams = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=16)), max_size=60).map(b"".join),
    st.text(max_size=500).map(lambda text: wire("set=1\n" + text)),
)


@given(streams)
@example(b"set=1\nlisten_port=7")
@example(b"get=1\n")
@example(b"set=1\n" + b"x" * (uapi.MAX_LINE + 1))
@example(b"a" * (uapi.MAX_LINE + 1))
@example(b"set=1\r\n\n")
def test_fuzz_server_stream(payload):
    device = configured_device()
    before = dump(device)
    with captured_logs() as logs, serving(device) as path:
        answers = answers_of(exchange(path, payload))
        check_still_serving(path, device)
    check_logs(logs)
    operations = payload.count(b"get=1\n") + payload.count(b"set=1\n")
    assert len(answers) <= operations
    if payload.startswith(b"set=1\n"):   # however it ends, a set is answered
        assert answers and ERRNO_ANSWER.fullmatch(answers[0])
    event(f"{len(answers)} answers")
    for answer in answers:
        assert ERRNO_ANSWER.fullmatch(answer) or is_get_dump(answer), answer[:80]
    if b"errno=0" not in answers:      # no set applied (a get dump is never this bare)
        assert dump(device) == before
