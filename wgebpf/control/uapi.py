"""The cross-platform userspace configuration API (UAPI), so stock wg(8) works.

wg(8) finds a userspace WireGuard by a unix stream socket at
/var/run/wireguard/NAME.sock and speaks a line protocol on it
(https://www.wireguard.com/xplatform/):

    get=1\\n\\n                 ->  key=value lines ... errno=0\\n\\n
    set=1\\n key=value ... \\n   ->  errno=N\\n\\n

Keys are lowercase hex. Set lines before the first public_key configure the
interface (private_key, listen_port, fwmark, replace_peers); each public_key
selects a peer, and the lines after it configure that peer (remove,
update_only, preshared_key, endpoint, persistent_keepalive_interval,
replace_allowed_ips, allowed_ip, protocol_version).

A set is all-or-nothing against bad input: every line is parsed and checked
before the first is applied, so a malformed key, value or line changes
nothing. (wireguard-go applies each line as it reads it and stops at the
first bad one, leaving the lines before it applied.) A refusal by the device itself while applying,
such as a listen port in use, still stops the set with the lines before it
applied, as in wireguard-go.

Framing follows wireguard-go's ipc code: a set ends at a blank line or at
end of input (a client that shuts down its sending side still gets its set
applied and answered), and a set line may carry one trailing CR, as
bufio.Scanner drops it. A get, or one of our extensions, must end with its
blank line; at end of input it is dropped unanswered. A line may be up to
MAX_LINE bytes (bufio.Scanner's 64 KiB buffer, newline included); a longer
one, or a request over MAX_REQUEST_BYTES, is answered errno=-EIO and the
connection closed, since the rest of the stream can no longer be framed.

errno on the wire is NEGATIVE (errno=-22), as wireguard-go sends it: wg(8)
reads it with fscanf and negates it before perror(), so a positive number
would print "Unknown error -22". apply_set() returns the positive errno
(errno.EINVAL) and the server negates it on the way out.

Secrets: values are never logged (a bad line is reported by its key only),
because a private or preshared key may be the value.
"""

from __future__ import annotations

import collections
import errno
import functools
import ipaddress
import logging
import os
import re
import select
import socket
import stat
import threading
import time
from typing import Any

from ..wireguard.crypto import DH_PUBKEY

log = logging.getLogger(__name__)

SOCKET_DIR = "/var/run/wireguard"

# Limits. A valid line is at most ~100 bytes (an allowed_ip or a zoned IPv6
# endpoint), but wireguard-go reads set lines with a bufio.Scanner, whose
# 64 KiB buffer must hold the line and its newline: lines up to 65535 bytes
# are lines there, so they are here (an overlong value then gets the errno
# its content earns). 8 MiB, our own bound, holds a set for some 20,000
# peers in one request; more go in several (`wg set` per batch of peers).
MAX_LINE = 64 * 1024 - 1
MAX_REQUEST_BYTES = 8 << 20
IDLE_TIMEOUT = 5.0          # seconds a client may stay silent mid-request
REQUEST_DEADLINE = 30.0     # seconds for one whole request
MAX_CONNECTIONS = 8         # concurrent clients; more are closed at once
IFNAMSIZ = 16

_ZERO_KEY = bytes(32)
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_UINT = re.compile(r"[0-9]+")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
# wireguard-go has no name for this one; it is what it sends for "unknown".
ENOANO = errno.ENOANO


class UAPIError(Exception):
    """A set line was refused; .errno is the positive errno to report."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


class SocketInUseError(RuntimeError):
    """Another live process already answers on the UAPI socket."""


def socket_path(name: str, directory: str = SOCKET_DIR) -> str:
    """/var/run/wireguard/NAME.sock; refuses names wg(8) could not use."""
    if not name or len(name) >= IFNAMSIZ or "/" in name or "\0" in name \
            or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    return os.path.join(directory, f"{name}.sock")


# ---------------------------------------------------------------- value parsers

def _parse_key(key: str, value: str) -> bytes:
    # bytes.fromhex alone would accept spaces, so check the shape first.
    if not _HEX_KEY.fullmatch(value):
        raise UAPIError(errno.EINVAL, f"{key}: not a 32-byte hex key")
    return bytes.fromhex(value)


def _bounded_uint(text: str, maximum: int) -> int | None:
    """Like strconv.ParseUint: ASCII digits, leading zeros allowed; None if
    it is no such number or above maximum."""
    # int() alone would accept "+5", " 5" and "5_0", and raises ValueError
    # beyond 4300 digits, which a 64 KiB line easily holds.
    if not _UINT.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)):
        return None
    number = int(digits)
    return number if number <= maximum else None


def _parse_uint(key: str, value: str, maximum: int) -> int:
    number = _bounded_uint(value, maximum)
    if number is None:
        raise UAPIError(errno.EINVAL, f"{key}: not an integer in 0..{maximum}")
    return number


def _parse_true(key: str, value: str) -> None:
    # The protocol has only "true" for these flags; anything else is a typo.
    if value != "true":
        raise UAPIError(errno.EINVAL, f"{key}: only 'true' is accepted")


def _parse_endpoint(value: str) -> tuple[str, int]:
    """Numeric a.b.c.d:port or [v6]:port (no DNS: wg(8) resolves names)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        version = 6
    else:
        host, sep, port = value.rpartition(":")
        version = 4
    port_number = _bounded_uint(port, 0xFFFF)
    if not sep or port_number is None:
        raise UAPIError(errno.EINVAL, "endpoint: expected ip:port or [ip6]:port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UAPIError(errno.EINVAL, "endpoint: not a numeric address") from None
    # ipaddress takes any zone text; ours is echoed back by get, so keep it
    # to what interface names and indexes are made of.
    if "%" in host and not _ZONE.fullmatch(host.partition("%")[2]):
        raise UAPIError(errno.EINVAL, "endpoint: bad IPv6 zone")
    if address.version != version:
        raise UAPIError(errno.EINVAL, "endpoint: IPv6 needs [brackets]")
    # str() normalises case and zeros, and keeps an IPv6 zone (%eth0),
    # which link-local endpoints need for sendto().
    return str(address), port_number


def _parse_allowed_ip(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address, sep, length = value.partition("/")
    prefix_length = _bounded_uint(length, 128)   # /33 for IPv4 is refused below
    # ip_network() would also take "a.b.c.d" (as /32) and netmask notation.
    if not sep or prefix_length is None or "%" in address:
        raise UAPIError(errno.EINVAL, "allowed_ip: expected address/prefixlen")
    try:
        # strict=False: host bits are masked off, as the kernel does.
        return ipaddress.ip_network((ipaddress.ip_address(address), prefix_length),
                                    strict=False)
    except ValueError:
        raise UAPIError(errno.EINVAL, "allowed_ip: invalid prefix") from None


def _format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ------------------------------------------------------------------------- get

def format_get(device: Any) -> str:
    """The full answer to get=1, ending "errno=0\\n\\n". Caller holds the lock."""
    out: list[str] = []
    if device.private_key and device.private_key != _ZERO_KEY:
        out.append(f"private_key={device.private_key.hex()}")
    # Zero means "unset" for both, and wireguard-go omits them then.
    if device.listen_port:
        out.append(f"listen_port={device.listen_port}")
    if device.fwmark:
        out.append(f"fwmark={device.fwmark}")
    for peer in device.peers.values():
        out.extend(_format_peer(device, peer))
    out.append("errno=0")
    return "\n".join(out) + "\n\n"


def _format_peer(device: Any, peer: Any) -> list[str]:
    seconds = int(peer.last_handshake_time)
    nanoseconds = min(999_999_999, round((peer.last_handshake_time - seconds) * 1e9))
    lines = [
        f"public_key={peer.public_key.hex()}",
        f"preshared_key={peer.preshared_key.hex()}",
        "protocol_version=1",
    ]
    if peer.endpoint is not None:
        lines.append(f"endpoint={_format_endpoint(peer.endpoint)}")
    lines += [
        f"last_handshake_time_sec={seconds}",
        f"last_handshake_time_nsec={nanoseconds}",
        f"tx_bytes={peer.tx_bytes}",
        f"rx_bytes={peer.rx_bytes}",
        f"persistent_keepalive_interval={peer.persistent_keepalive_interval}",
    ]
    lines += [f"allowed_ip={network}" for network in device.allowed_ips_of(peer)]
    return lines


# ------------------------------------------------------------------------- set

class _SetOperation:
    """One set=1 request, applied line by line from already parsed values.

    A peer that does not exist yet is created lazily, on its first line
    that changes it (or when its section ends), not on its public_key line
    as wireguard-go does. The visible result is the same, but update_only
    and remove on an unknown peer then never create (and at once destroy)
    a peer, which in wgebpf would claim and release a slot.
    """

    def __init__(self, device: Any):
        self.device = device
        self.in_peer_section = False
        self.peer: Any = None            # the selected, existing peer
        self.pending_key: bytes | None = None  # selected but not created yet
        self.created = False             # created by this request
        self.ignored = True              # lines for this peer are dropped

    def line(self, key: str, value: Any) -> None:
        """Applies one step of _parse_set(): a known key, a checked value."""
        if key == "public_key":
            self.end_peer()
            self.select_peer(value)
        elif self.in_peer_section:
            _PEER_KEYS[key][1](self, value)
        else:
            self.device_line(key, value)

    # -- interface

    def device_line(self, key: str, value: Any) -> None:
        device = self.device
        if key == "private_key":
            # An all-zero key removes the private key (wg set private-key /dev/null).
            device.set_private_key(None if value == _ZERO_KEY else value)
            # A peer that is now ourselves goes, as in the kernel and wireguard-go.
            own = self.own_public_key()
            if own is not None and own in device.peers:
                device.remove_peer(own)
        elif key == "listen_port":
            # The port in use already: nothing to do, as in the kernel's
            # set_port(); `wg syncconf` and `wg setconf` send it every time.
            if value == 0 or value != device.listen_port:
                _call_socket_op(device.set_listen_port, value, key)
        elif key == "fwmark":
            _call_socket_op(device.set_fwmark, value, key)
        elif key == "replace_peers":
            device.remove_all_peers()

    # -- peers

    def select_peer(self, public_key: bytes) -> None:
        self.in_peer_section = True
        self.peer, self.pending_key, self.created = None, None, False
        # Our own public key as a peer is silently ignored, as the kernel
        # and wireguard-go do (a handshake with ourselves is meaningless).
        self.ignored = public_key == self.own_public_key()
        if self.ignored:
            return
        self.peer = self.device.peers.get(public_key)
        if self.peer is None:
            self.pending_key = public_key

    def own_public_key(self) -> bytes | None:
        private_key = self.device.private_key
        if not private_key or private_key == _ZERO_KEY:
            return None
        return DH_PUBKEY(private_key)

    def target(self) -> Any:
        """The peer to change, created now if it is new; None if ignored."""
        if self.ignored:
            return None
        if self.peer is None:
            self.peer = self.device.add_peer(self.pending_key)
            self.pending_key, self.created = None, True
        return self.peer

    def end_peer(self) -> None:
        # "public_key=X" alone still creates X.
        if self.in_peer_section:
            self.target()

    def update_only(self, _: None) -> None:
        if self.ignored:
            return
        if self.created:                 # created by an earlier line of this section
            self.device.remove_peer(self.peer.public_key)
            self.ignored = True
        elif self.peer is None:
            self.ignored = True

    def remove(self, _: None) -> None:
        if self.peer is not None and not self.ignored:
            self.device.remove_peer(self.peer.public_key)
        self.ignored = True

    def preshared_key(self, psk: bytes) -> None:
        if (peer := self.target()) is not None:
            peer.set_preshared_key(psk)

    def endpoint(self, endpoint: tuple[str, int]) -> None:
        if (peer := self.target()) is not None:
            peer.set_endpoint(endpoint)

    def persistent_keepalive_interval(self, seconds: int) -> None:
        if (peer := self.target()) is not None:
            peer.set_persistent_keepalive(seconds)

    def replace_allowed_ips(self, _: None) -> None:
        if (peer := self.target()) is not None:
            self.device.clear_allowed_ips(peer)

    def allowed_ip(self, network: Any) -> None:
        if (peer := self.target()) is not None:
            self.device.add_allowed_ip(peer, network)

    def protocol_version(self, _: None) -> None:
        pass                             # checked by its parser; nothing to change


def _parse_u16(key: str, value: str) -> int:
    return _parse_uint(key, value, 0xFFFF)


def _parse_u32(key: str, value: str) -> int:
    return _parse_uint(key, value, 0xFFFFFFFF)


def _parse_protocol_version(key: str, value: str) -> None:
    if value != "1":
        raise UAPIError(errno.EINVAL, f"{key}: only 1 exists")


def _parse_endpoint_line(key: str, value: str) -> tuple[str, int]:
    return _parse_endpoint(value)


def _parse_allowed_ip_line(key: str, value: str) -> Any:
    return _parse_allowed_ip(value)


# key -> parser(key, value) for the lines before the first public_key.
_INTERFACE_PARSERS = {
    "private_key": _parse_key,
    "listen_port": _parse_u16,
    "fwmark": _parse_u32,
    "replace_peers": _parse_true,
}

# key -> (parser(key, value), _SetOperation method taking the parsed value).
_PEER_KEYS = {
    "update_only": (_parse_true, _SetOperation.update_only),
    "remove": (_parse_true, _SetOperation.remove),
    "preshared_key": (_parse_key, _SetOperation.preshared_key),
    "endpoint": (_parse_endpoint_line, _SetOperation.endpoint),
    "persistent_keepalive_interval": (_parse_u16, _SetOperation.persistent_keepalive_interval),
    "replace_allowed_ips": (_parse_true, _SetOperation.replace_allowed_ips),
    "allowed_ip": (_parse_allowed_ip_line, _SetOperation.allowed_ip),
    "protocol_version": (_parse_protocol_version, _SetOperation.protocol_version),
}
_PEER_PARSERS = {key: parser for key, (parser, _) in _PEER_KEYS.items()}


def _call_socket_op(method: Any, number: int, key: str) -> None:
    # Rebinding or re-marking sockets fails for reasons the caller must see
    # (port in use, permission); wireguard-go reports these as EADDRINUSE.
    try:
        method(number)
    except OSError as exc:
        raise UAPIError(exc.errno or errno.EADDRINUSE, f"{key}: {exc.strerror or exc}") from None


def _strip_line_end(raw: str) -> str:
    """The line without its newline and one CR before it: bufio.ScanLines,
    which wireguard-go reads set lines with, drops that CR too."""
    line = raw[:-1] if raw.endswith("\n") else raw
    return line[:-1] if line.endswith("\r") else line


def _parse_line(line: str, parsers: dict) -> tuple[str, Any]:
    key, sep, value = line.partition("=")
    if not sep:
        raise UAPIError(errno.EPROTO, "no '='")
    parser = _parse_key if key == "public_key" else parsers.get(key)
    if parser is None:
        # The key itself is not echoed: a secret pasted as a line of its
        # own (base64 ends in '=') would otherwise land in the log.
        section = "peer" if parsers is _PEER_PARSERS else "interface"
        raise UAPIError(errno.EINVAL, f"unknown {section} key")
    return key, parser(key, value)


def _parse_set(lines: list[str]) -> list[tuple[int, str, Any]]:
    """Parses and checks every line of a set before any is applied.

    Returns (line number, key, parsed value) steps up to the first blank
    line; raises UAPIError, naming the line, for the first bad one.
    """
    steps = []
    parsers = _INTERFACE_PARSERS
    for number, raw in enumerate(lines, 1):
        line = _strip_line_end(raw)
        if line == "":
            break
        try:
            key, value = _parse_line(line, parsers)
        except UAPIError as exc:
            raise UAPIError(exc.errno, f"line {number}: {exc}") from None
        if key == "public_key":
            parsers = _PEER_PARSERS
        steps.append((number, key, value))
    return steps


def apply_set(device: Any, lines: list[str]) -> int:
    """Apply the key=value lines of one set=1 request; returns a positive
    errno (0 when every line applied). Caller holds the device lock.

    `lines` excludes "set=1"; a blank line ends the request early. A bad
    line refuses the whole request before anything changes.
    """
    try:
        steps = _parse_set(lines)
    except UAPIError as exc:
        log.warning("UAPI set refused, nothing applied: %s", exc)
        return exc.errno
    operation = _SetOperation(device)
    for number, key, value in steps:
        code = _guarded(number, key, functools.partial(operation.line, key, value))
        if code:
            return code
    # The last peer section may still have to create its peer.
    return _guarded(len(lines) + 1, "end", operation.end_peer)


def _guarded(number: int, key: str, action: Any) -> int:
    """Runs one step of a set; any failure becomes an errno, never a raise.

    `key` is always a known key here, never client text, so it may be logged.
    """
    try:
        action()
    except UAPIError as exc:
        log.warning("UAPI set: line %d refused: %s", number, exc)
        return exc.errno
    except OSError as exc:
        log.warning("UAPI set: line %d (%s) failed: %s", number, key, exc.strerror or exc)
        return exc.errno or errno.EIO
    except ValueError as exc:
        log.warning("UAPI set: line %d (%s) rejected by the device: %s", number, key, exc)
        return errno.EINVAL
    except Exception:  # a device bug must not take the UAPI server down
        log.exception("UAPI set: line %d (%s) raised", number, key)
        return ENOANO
    return 0


# ---------------------------------------------------------------------- server

class _ClientGone(Exception):
    """The client closed, went silent, or broke the size bounds."""


class _EndOfInput(_ClientGone):
    """The client shut down its sending side (or closed) at this point."""


class _TooLarge(_ClientGone):
    """A line over MAX_LINE or a request over MAX_REQUEST_BYTES."""


class _LineReader:
    """Lines from a stream socket, with per-line and per-request bounds.

    Each chunk is split once as it arrives, so a multi-megabyte request
    costs linear time (slicing one growing buffer per line would not).
    """

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.lines: collections.deque[bytes] = collections.deque()
        self.tail = b""
        self.request_bytes = 0
        self.deadline = 0.0

    def start_request(self) -> None:
        self.request_bytes = 0
        self.deadline = time.monotonic() + REQUEST_DEADLINE

    def readline(self) -> str:
        """The next newline-terminated line, without its newline."""
        while not self.lines:
            self._receive()
        return self._counted(self.lines.popleft(), len(b"\n"))

    def unterminated(self) -> str:
        """After _EndOfInput: the bytes after the last newline, as a line."""
        tail, self.tail = self.tail, b""
        return self._counted(tail, 0)

    def _counted(self, line: bytes, newline: int) -> str:
        self.request_bytes += len(line) + newline
        if len(line) > MAX_LINE:
            raise _TooLarge("line too long")
        if self.request_bytes > MAX_REQUEST_BYTES:
            raise _TooLarge("request too large")
        # latin-1 never fails; a non-ASCII key or value is refused later.
        return line.decode("latin-1")

    def _receive(self) -> None:
        # Checked before reading more, so an endless line costs at most
        # MAX_LINE plus one chunk of memory.
        if len(self.tail) > MAX_LINE:
            raise _TooLarge("line too long")
        if time.monotonic() > self.deadline:
            raise _ClientGone("request deadline passed")
        try:
            chunk = self.conn.recv(65536)
        except OSError as exc:  # socket.timeout is an OSError
            raise _ClientGone(str(exc)) from None
        if not chunk:
            raise _EndOfInput("end of input")
        parts = (self.tail + chunk).split(b"\n")
        self.tail = parts.pop()
        self.lines.extend(parts)


class UAPIServer:
    """Serves get/set for one device on NAME.sock, in a daemon thread."""

    def __init__(self, name: str, device: Any, lock: threading.Lock,
                 directory: str = SOCKET_DIR):
        self.name = name
        self.device = device
        self.lock = lock
        self.directory = directory
        self.path = socket_path(name, directory)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self.extensions: dict = {}

    # -- lifecycle

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError(f"UAPI server for {self.name} already started")
        _make_socket_dir(self.directory)
        _remove_stale_socket(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind(listener)
            # Before listen(): nobody can connect until the mode is 0600, so
            # there is no window in which a non-root user can reach the API.
            os.chmod(self.path, 0o600)
            listener.listen(16)
            st = os.stat(self.path)
        except BaseException:
            listener.close()
            _unlink_quietly(self.path)
            raise
        self._listener = listener
        self._inode = (st.st_dev, st.st_ino)
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop,
                                        name=f"uapi-{self.name}", daemon=True)
        self._thread.start()
        log.info("UAPI listening on %s", self.path)

    def _bind(self, listener: socket.socket) -> None:
        try:
            listener.bind(self.path)
        except FileNotFoundError:
            # The shared directory went away after we made it (another
            # tool's clean-up): make it again, once.
            _make_socket_dir(self.directory)
            listener.bind(self.path)

    def stop(self) -> None:
        if self._listener is None:
            return
        assert self._wake is not None and self._thread is not None
        os.write(self._wake[1], b"x")
        self._thread.join(timeout=5.0)
        with self._clients_lock:
            for conn in self._clients:
                _shutdown_quietly(conn)
        self._listener.close()
        self._listener = None
        for fd in self._wake:
            os.close(fd)
        self._wake = None
        # Unlink only our own socket: after a restart race the path may
        # already belong to a newer process.
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        log.info("UAPI stopped on %s", self.path)

    # -- serving

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake is not None
        # poll, not select: a data plane with hundreds of queue fds easily
        # pushes our descriptors past select()'s limit of 1024.
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        listener, wake = self._listener, self._wake[0]
        while True:
            try:
                ready = poller.poll()
            except OSError:
                return
            if any(fd == wake for fd, _ in ready):
                return
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning.
                log.warning("UAPI accept failed: %s", exc)
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("UAPI: too many clients, dropping one")
                conn.close()
                continue
            threading.Thread(target=self._serve_client, args=(conn,),
                             name=f"uapi-{self.name}-client", daemon=True).start()

    def _serve_client(self, conn: socket.socket) -> None:
        with self._clients_lock:
            self._clients.add(conn)
        try:
            conn.settimeout(IDLE_TIMEOUT)
            reader = _LineReader(conn)
            while self._serve_request(conn, reader):
                pass
        except Exception:  # never let one client kill anything else
            log.exception("UAPI client handler failed")
        finally:
            with self._clients_lock:
                self._clients.discard(conn)
            conn.close()
            self._slots.release()

    def _serve_request(self, conn: socket.socket, reader: _LineReader) -> bool:
        """Answers one request; False when the connection should close."""
        reader.start_request()
        try:
            operation = reader.readline()
        except _ClientGone as exc:   # an overlong one is no operation we know either
            log.debug("UAPI client done: %s", exc)
            return False
        if operation not in ("get=1", "set=1") and operation not in self.extensions:
            if operation:
                # Not echoed: it may be anything, a pasted key included.
                log.warning("UAPI: unknown operation, closing the connection")
            return False
        try:
            body = _read_body(reader, operation)
        except _TooLarge as exc:
            # Like wireguard-go's "failed to read input" (bufio.ErrTooLong):
            # EIO, and nothing of the request applied. The stream cannot be
            # framed any more, so the connection ends after the answer.
            log.warning("UAPI: %s, request refused", exc)
            _send_quietly(conn, _errno_answer(errno.EIO))
            return False
        except _ClientGone as exc:
            log.debug("UAPI client done: %s", exc)
            return False
        if operation == "get=1":
            answer = self._get(body)
        elif operation == "set=1":
            answer = _errno_answer(self._set(body))
        else:
            answer = self._extension(operation, body)
        # After a set that ended at end of input, the next read ends the loop.
        return _send_quietly(conn, answer)

    def _get(self, body: list[str]) -> str:
        if body:  # get=1 takes no arguments
            return _errno_answer(errno.EINVAL)
        with self.lock:
            # The worker pool reports counters periodically; ask for fresh ones.
            refresh = getattr(getattr(self.device, "dataplane", None), "refresh", None)
            if refresh is not None:
                refresh()
            return format_get(self.device)

    def _set(self, body: list[str]) -> int:
        with self.lock:
            return apply_set(self.device, body)

    def _extension(self, operation: str, body: list[str]) -> str:
        """wgebpf's own operations (`wgebpf-*=1`), on the same root-only
        socket; wg(8) never sends them. The handler returns (text, errno);
        text must hold no blank line."""
        with self.lock:
            try:
                text, code = self.extensions[operation](body)
            except Exception:
                log.exception("UAPI: %s failed", operation)
                text, code = "", errno.EINVAL
        return (text + "\n" if text else "") + _errno_answer(code)


def _read_body(reader: _LineReader, operation: str) -> list[str]:
    """The lines after the operation, up to the blank line that ends it.

    A set may also end at end of input, as wireguard-go's bufio.Scanner
    stops there and applies what it read, an unterminated last line
    included. Any other request must be complete: wireguard-go drops a
    get=1 cut short, so _EndOfInput propagates for those.
    """
    is_set = operation == "set=1"
    lines = []
    while True:
        try:
            line = reader.readline()
        except _EndOfInput:
            if not is_set:
                raise
            last = reader.unterminated()
            return lines + [last] if last else lines
        # A lone CR ends a set too: bufio.ScanLines makes it a blank line.
        if (_strip_line_end(line) if is_set else line) == "":
            return lines
        lines.append(line)


def _send_quietly(conn: socket.socket, answer: str) -> bool:
    """Sends an answer; False when the client has gone."""
    try:
        conn.sendall(answer.encode("latin-1", errors="replace"))
    except OSError:
        return False
    return True


def _errno_answer(code: int) -> str:
    # Negative, as wireguard-go sends it (see the module docstring).
    return f"errno={-code}\n\n"


def _make_socket_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o755)
        os.chmod(directory, 0o755)   # makedirs' mode is filtered by the umask
    except FileExistsError:
        pass


def _remove_stale_socket(path: str) -> None:
    """Removes a socket nobody answers on; refuses a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not removing it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # The process that made it is gone (what wg(8) itself assumes).
        log.info("UAPI: removing stale socket %s", path)
        _unlink_quietly(path)
        return
    except (BlockingIOError, socket.timeout):
        pass  # a listener with a full backlog is alive
    finally:
        probe.close()
    raise SocketInUseError(
        f"{path} is in use by another live process (is another wgebpf or "
        f"wireguard-go running for this interface?)")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
