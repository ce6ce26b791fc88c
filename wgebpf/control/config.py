"""The wg-quick configuration file: parse, validate, and write back.

The format is wg(8)'s INI dialect plus wg-quick(8)'s additions, read the way
those tools read it: section and key names are case-insensitive, '#' starts a
comment anywhere on a line, a key is split from its value at the first '='
(base64 keys end in '='), and list keys (Address, AllowedIPs, DNS) and the
hook keys (PreUp, PostUp, PreDown, PostDown) may repeat and accumulate.

We are stricter than wg in two places, because both are almost always
mistakes and would otherwise be silently "last one wins": a second
[Interface] section (wg(8) says there may be only one) and a single-valued
key given twice in one section.

wgebpf adds its own [Interface] keys: PeerSelection, SourcePolicy, PeerMark,
Workers, PeerSpread, Metrics and MetricsCompat; and a per-peer
SourcePolicy override in [Peer].

PeerMark is the mask of skb->mark bits where the nftables source policy puts
the sending peer's slot (1..65535) on each received packet: one contiguous
run of at least 8 bits (hex or decimal; default 0xffff0000, 16 bits: room
for every slot; a narrower mask holds fewer). The eBPF program
keeps every bit outside it. It must not share a bit with FwMark when the
nftables policy is in use (by the interface or any peer): FwMark marks the
tunnel's own UDP packets, and routing rules on it (wg-quick's `not fwmark`
rule) would then take some peer's inner packets for the tunnel's own. With
no nftables policy no packet is marked, and an overlap is harmless, so it is
not refused; switching to nftables at run time must check it
(peer_mark_conflict).

The whole file is read and every error collected before one is raised, so
the reported error is the first in the file (ConfigError.errors has them all).
"""

from __future__ import annotations

import difflib
import glob
import ipaddress
import os
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Callable

from ..wireguard.sourcepolicy import (PEER_MARK_DEFAULT, SOURCE_POLICIES, peer_mark_conflict,
                                      peer_mark_error)

from ..wireguard import keys

__all__ = ["ConfigError", "PeerConfig", "InterfaceConfig", "Config", "parse", "load",
           "format_config", "parse_endpoint", "parse_metrics", "route_table_id", "redact_keys",
           "PEER_SELECTIONS", "SOURCE_POLICIES", "MAX_WORKERS", "PEER_MARK_DEFAULT",
           "peer_mark_error", "peer_mark_conflict"]

PEER_SELECTIONS = ("nexthop", "allowedips")
# A TAP queue per worker plus the control plane's queue 0, and the kernel's
# limit of 256 queues per device.
MAX_WORKERS = 255
MTU_MIN_IPV4 = 576
MTU_MIN_IPV6 = 1280   # RFC 8200: a link carrying IPv6 must take 1280 bytes
MTU_MAX = 65535
# Beyond any legitimate file (about 100 000 peers), and a bound on what a
# mistaken --config /dev/zero reads before it is refused.
MAX_CONFIG_BYTES = 16 << 20

# Where iproute2 looks up table names (newer versions fall back to /usr/share).
RT_TABLES_FILES = ("/etc/iproute2/rt_tables", "/etc/iproute2/rt_tables.d/*.conf",
                   "/usr/share/iproute2/rt_tables", "/usr/share/iproute2/rt_tables.d/*.conf")
# ip(8) knows these names even with no rt_tables file.
_BUILTIN_TABLES = {"default": 253, "main": 254, "local": 255}


class ConfigError(Exception):
    """A configuration problem, located as precisely as we can.

    str(e) reads "path:line: key: message"; parts we do not know are left
    out. `errors` lists every problem found in the file, this one first.
    """

    def __init__(self, path: str, line: int | None, key: str | None, message: str):
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        self.errors: list[ConfigError] = [self]
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = f"{self.key}: " if self.key else ""
        return f"{where}: {what}{self.message}"


@dataclass
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None     # (host, port); IPv6 host without []
    allowed_ips: list[IPv4Network | IPv6Network] = field(default_factory=list)
    persistent_keepalive: int = 0               # seconds; 0 = off
    source_policy: str | None = None            # None = the interface's SourcePolicy
    line: int = 0                               # line of this peer's [Peer] header


@dataclass
class InterfaceConfig:
    """The [Interface] section.

    `dns` is parsed and kept so the file round-trips, but wgebpf does not
    apply it (wg-quick hands it to resolvconf; use PostUp for that).
    `save_config` is accepted and ignored.
    """

    private_key: bytes
    listen_port: int | None = None              # None (or 0 in the file) = random at attach
    addresses: list[IPv4Interface | IPv6Interface] = field(default_factory=list)
    mtu: int | None = None
    fwmark: int = 0                             # 0 = off
    table: str = "auto"                         # 'auto', 'off', a number or an rt_tables name
    dns: list[str] = field(default_factory=list)
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    save_config: bool = False
    # wgebpf's own keys
    peer_selection: str = "nexthop"
    source_policy: str = "allowedips"
    peer_mark: int = PEER_MARK_DEFAULT          # mask of the peer's slot in skb->mark
    workers: int | None = None                  # None = one per CPU
    metrics: str | None = None                  # 'ADDR:PORT' / '[v6]:PORT' / ':PORT'
    metrics_compat: bool = False                # also the wireguard_* names
    peer_spread: bool = False                   # one peer's flows and data over every worker

    @property
    def public_key(self) -> bytes:
        return keys.public_key(self.private_key)


@dataclass
class Config:
    path: str
    interface: InterfaceConfig
    peers: list[PeerConfig]


class _Invalid(Exception):
    """A value is wrong; the caller knows the path, line and key."""


# ---------------------------------------------------------------- values

# Longest value an error message quotes in full.
QUOTE_MAX = 60


# A run of base64 characters this long, in both cases, is taken for (part
# of) a key: keys get pasted into the wrong line or argument.
_KEYLIKE_RE = re.compile(r"[A-Za-z0-9+/]{16,}")
KEY_HIDDEN = "(key-like text hidden)"


def redact_keys(text: str) -> str:
    """`text` with every run that may be a base64 key replaced by KEY_HIDDEN."""
    def hide(match: re.Match) -> str:
        run = match.group(0)
        mixed = any(c.isupper() for c in run) and any(c.islower() for c in run)
        return KEY_HIDDEN if mixed else run
    return _KEYLIKE_RE.sub(hide, text)


def _printable(value: str) -> str:
    """`value` cut to QUOTE_MAX characters, unprintable ones escaped: an
    error must stay one readable line, even for a 5000-digit port."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value[:QUOTE_MAX])
    return shown + ("..." if len(value) > QUOTE_MAX else "")


def _quote(value: str) -> str:
    """`value` for an error message, anything key-like hidden.

    Never pass a private or preshared key even so: a key with a typo may
    break into runs too short to look like one.
    """
    return f"'{_printable(redact_keys(value))}'"


def _quote_public_key(value: str) -> str:
    """A public key (or what should be one) is not secret: shown in full."""
    return f"'{_printable(value)}'"


# More digits than any range we check; int() refuses over 4300 digits with a
# ValueError, so longer numbers must never reach it.
_DECIMAL_DIGITS_MAX = 20


def _decimal(digits: str) -> int:
    """The value of an ASCII digit string; anything over 20 significant
    digits comes back as 10**20, which is out of every range we check."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > _DECIMAL_DIGITS_MAX:
        return 10 ** _DECIMAL_DIGITS_MAX
    return int(significant)


def _uint(value: str, lo: int, hi: int, words: str = "") -> int:
    """A decimal number in lo..hi; `words` names the other spellings accepted."""
    # Python's int() also takes '+5', '1_000' and non-ASCII digits; wg does not.
    if not re.fullmatch(r"[0-9]+", value):
        raise _Invalid(f"{_quote(value)} is not {words}a whole number")
    number = _decimal(value)
    if not lo <= number <= hi:
        raise _Invalid(f"{_quote(value)} is out of range {lo}..{hi}")
    return number


def _items(value: str) -> list[str]:
    """A comma-separated list; an empty value is an empty list."""
    if not value:
        return []
    items = [item.strip() for item in value.split(",")]
    if "" in items:
        raise _Invalid(f"{_quote(value)} has an empty item between commas")
    return items


def _key(value: str) -> bytes:
    # Never quote a private or preshared key: error messages end up in logs.
    try:
        return keys.decode(value)
    except keys.KeyFormatError as exc:
        raise _Invalid(f"bad key: {exc}") from None


def _public_key(value: str) -> bytes:
    try:
        return keys.decode(value)
    except keys.KeyFormatError as exc:
        raise _Invalid(f"bad key {_quote_public_key(value)}: {exc}") from None


def _listen_port(value: str) -> int | None:
    return _uint(value, 0, 65535) or None


def _fwmark(value: str) -> int:
    if value.lower() == "off":
        return 0
    return _u32(value, "'off', ")


def _u32(value: str, words: str = "") -> int:
    """A 32-bit number in decimal or 0x hex; `words` names other spellings."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", value):
        number = int(value, 16)
    elif re.fullmatch(r"0[0-9]+", value):
        # wg(8) reads a leading 0 as octal; refuse rather than guess.
        raise _Invalid(f"{_quote(value)} has a leading zero (wg would read it as octal); "
                       f"write it in decimal or as 0x hex")
    elif re.fullmatch(r"[0-9]+", value):
        number = _decimal(value)
    else:
        raise _Invalid(f"{_quote(value)} is not {words}a number or 0x hex")
    if number > 0xFFFFFFFF:
        raise _Invalid(f"{_quote(value)} does not fit in 32 bits")
    return number


def _peer_mark(value: str) -> int:
    mask = _u32(value)
    problem = peer_mark_error(mask)
    if problem:
        raise _Invalid(f"{_quote(value)} {problem}")
    return mask


def _addresses(value: str) -> list[IPv4Interface | IPv6Interface]:
    out = []
    for item in _items(value):
        if "%" in item:
            raise _Invalid(f"{_quote(item)}: an interface address takes no %scope")
        try:
            out.append(ipaddress.ip_interface(item))
        except ValueError:
            raise _Invalid(f"{_quote(item)} is not an IP address with optional /prefix, "
                           f"e.g. 192.0.2.1/24 or 2001:db8::1/64") from None
    return out


def _allowed_ips(value: str) -> list[IPv4Network | IPv6Network]:
    out = []
    for item in _items(value):
        if "%" in item:
            raise _Invalid(f"{_quote(item)}: allowed IPs take no %scope")
        try:
            # Host bits are masked off, as wg does: 192.0.2.1/24 means 192.0.2.0/24.
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Invalid(f"{_quote(item)} is not a network in CIDR form, "
                           f"e.g. 192.0.2.0/24 or 2001:db8::/32") from None
    return out


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _check_hostname(host: str) -> None:
    """A host is an IPv4 literal or a DNS name; names resolve at attach, not here."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(f"{_quote(host)} is not a valid IPv4 address") from None
        return
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise _Invalid(f"{_quote(host)} is not an IPv4 address or a host name")


def _split_host_port(value: str, allow_empty_host: bool) -> tuple[str, int]:
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise _Invalid(f"{_quote(value)} has '[' without ']'")
        host, rest = value[1:close], value[close + 1:]
        if not rest.startswith(":"):
            raise _Invalid(f"{_quote(value)}: expected ':PORT' after ']'")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)   # a %scope (fe80::1%eth0) is allowed
        except ValueError:
            raise _Invalid(f"{_quote(host)} in brackets is not an IPv6 address") from None
    else:
        if ":" not in value:
            raise _Invalid(f"{_quote(value)} has no port: expected HOST:PORT")
        host, port = value.rsplit(":", 1)
        if ":" in host:
            raise _Invalid(f"{_quote(value)}: write an IPv6 address in brackets, "
                           f"e.g. [2001:db8::1]:51820")
        if host:
            _check_hostname(host)
        elif not allow_empty_host:
            raise _Invalid(f"{_quote(value)} has no host: expected HOST:PORT")
    if not re.fullmatch(r"[0-9]+", port):
        raise _Invalid(f"{_quote(value)}: port {_quote(port)} is not a number")
    number = _decimal(port)
    if not 1 <= number <= 65535:
        raise _Invalid(f"{_quote(value)}: port {_quote(port)} is out of range 1..65535")
    return host, number


def parse_endpoint(value: str) -> tuple[str, int]:
    """(host, port) from 'HOST:PORT' or '[IPv6]:PORT'; ValueError when malformed."""
    try:
        return _endpoint(value)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _endpoint(value: str) -> tuple[str, int]:
    return _split_host_port(value, allow_empty_host=False)


def _keepalive(value: str) -> int:
    if value.lower() == "off":
        return 0
    return _uint(value, 0, 65535, words="'off' or ")


def _mtu(value: str) -> int:
    return _uint(value, MTU_MIN_IPV4, MTU_MAX)


def _rt_table_names() -> dict[str, int]:
    names = dict(_BUILTIN_TABLES)
    for pattern in RT_TABLES_FILES:
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and re.fullmatch(r"[0-9]+", fields[0]):
                    names.setdefault(fields[1], int(fields[0]))
    return names


def route_table_id(table: str) -> int | None:
    """The numeric routing table for a Table value; None for 'auto' and 'off'."""
    if table in ("auto", "off"):
        return None
    if table.isdigit():
        return int(table)
    try:
        return _rt_table_names()[table]
    except KeyError:
        raise ValueError(f"unknown routing table name {_quote(table)}") from None


def _table(value: str) -> str:
    if value.lower() in ("auto", "off"):
        return value.lower()
    if re.fullmatch(r"[0-9]+", value):
        if _decimal(value) == 0:
            raise _Invalid("table 0 is 'unspec' and holds no routes")
        return str(_uint(value, 1, 0xFFFFFFFF))
    names = _rt_table_names()
    if value in names and names[value] != 0:
        return value
    raise _Invalid(f"{_quote(value)} is not 'auto', 'off', a table number or a name "
                   f"from /etc/iproute2/rt_tables")


def _dns(value: str) -> list[str]:
    out = []
    for item in _items(value):
        # wg-quick takes IP addresses as servers and anything else as search domains.
        try:
            ipaddress.ip_address(item)
        except ValueError:
            if not _HOSTNAME_RE.fullmatch(item) or len(item) > 253:
                raise _Invalid(f"{_quote(item)} is not an IP address or a domain name") from None
        out.append(item)
    return out


def _hook(value: str) -> list[str]:
    return [value] if value else []


def _bool(value: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _Invalid(f"{_quote(value)} is not 'true' or 'false'")


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse_choice(value: str) -> str:
        if value.lower() in options:
            return value.lower()
        raise _Invalid(f"{_quote(value)} is not one of: {', '.join(options)}")
    return parse_choice


def _workers(value: str) -> int | None:
    if value.lower() == "auto":
        return None
    return _uint(value, 1, MAX_WORKERS, words="'auto' or ")


def _metrics(value: str) -> str:
    if re.fullmatch(r"[0-9]+", value):
        port = value if len(value) <= 5 else "PORT"
        raise _Invalid(f"{_quote(value)} has no address: write ':{port}' to listen on "
                       f"every address or '127.0.0.1:{port}' for this host only")
    _split_host_port(value, allow_empty_host=True)
    return value


def parse_metrics(value: str) -> str:
    """A Metrics address ('ADDR:PORT', '[v6]:PORT', ':PORT'); ValueError when malformed."""
    try:
        return _metrics(value)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------- keys

@dataclass(frozen=True)
class _Key:
    name: str                         # canonical spelling, as written back
    attr: str                         # dataclass field it fills
    parse: Callable[[str], object]
    repeats: bool = False             # list keys accumulate; others may appear once


_INTERFACE_KEYS = [
    _Key("PrivateKey", "private_key", _key),
    _Key("ListenPort", "listen_port", _listen_port),
    _Key("FwMark", "fwmark", _fwmark),
    _Key("Address", "addresses", _addresses, repeats=True),
    _Key("DNS", "dns", _dns, repeats=True),
    _Key("MTU", "mtu", _mtu),
    _Key("Table", "table", _table),
    _Key("PreUp", "pre_up", _hook, repeats=True),
    _Key("PostUp", "post_up", _hook, repeats=True),
    _Key("PreDown", "pre_down", _hook, repeats=True),
    _Key("PostDown", "post_down", _hook, repeats=True),
    _Key("SaveConfig", "save_config", _bool),
    _Key("PeerSelection", "peer_selection", _choice(PEER_SELECTIONS)),
    _Key("SourcePolicy", "source_policy", _choice(SOURCE_POLICIES)),
    _Key("PeerMark", "peer_mark", _peer_mark),
    _Key("Workers", "workers", _workers),
    _Key("Metrics", "metrics", _metrics),
    _Key("MetricsCompat", "metrics_compat", _bool),
    _Key("PeerSpread", "peer_spread", _bool),
]

_PEER_KEYS = [
    _Key("PublicKey", "public_key", _public_key),
    _Key("PresharedKey", "preshared_key", _key),
    _Key("Endpoint", "endpoint", _endpoint),
    _Key("AllowedIPs", "allowed_ips", _allowed_ips, repeats=True),
    _Key("PersistentKeepalive", "persistent_keepalive", _keepalive),
    _Key("SourcePolicy", "source_policy", _choice(SOURCE_POLICIES)),
]

_SECTIONS = {
    "interface": ("Interface", {k.name.lower(): k for k in _INTERFACE_KEYS}),
    "peer": ("Peer", {k.name.lower(): k for k in _PEER_KEYS}),
}
_ALL_KEYS = {**_SECTIONS["peer"][1], **_SECTIONS["interface"][1]}

# What the user wrote where a key or section name belongs is echoed only when
# it cannot be key material: base64 keys end in '=', so on a line like
# `PrivateKey yAnz...=` or a bare key everything before the '=' is 43 of the
# key's 44 characters. Echoed are: names too short to give a key away, and
# known names or close misspellings of them.
_SHORT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9 _.-]{0,6}")
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z _-]{0,31}")


def _echoable(name: str, known) -> bool:
    """Whether `name`, found where a name from `known` (lowercase) belongs,
    may appear in an error message."""
    if _SHORT_NAME_RE.fullmatch(name):
        return True
    if not _WORDS_RE.fullmatch(name):
        return False
    return bool(difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6))


def _leading_key(line: str) -> _Key | None:
    """The known key a malformed line starts with ('PrivateKey: ...'), if any."""
    word = re.match(r"[A-Za-z]*", line).group(0)
    return _ALL_KEYS.get(word.lower())


# ---------------------------------------------------------------- parsing

@dataclass
class _Entry:
    line: int
    key: _Key
    value: str


@dataclass
class _Section:
    kind: str                         # 'interface' or 'peer'
    line: int
    entries: list[_Entry] = field(default_factory=list)


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.errors: list[tuple[bool, ConfigError]] = []   # (late, error)

    def error(self, line: int | None, key: str | None, message: str,
              late: bool = False) -> None:
        """Record a problem; `late` ones (something missing) sort after the
        line-level ones, which usually explain them (a misspelt PrivateKey)."""
        self.errors.append((late, ConfigError(self.path, line, key, message)))

    # Pass 1: lines into sections of known keys.
    def split(self, text: str) -> list[_Section]:
        sections: list[_Section] = []
        current: _Section | None = None
        seen: dict[str, int] = {}
        first_interface: int | None = None
        if text.startswith("\ufeff"):
            text = text[1:]
        # split("\n"), not splitlines(): form feeds and the like must not
        # shift line numbers away from what an editor shows.
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                current = self._header(line, number, first_interface)
                if current is not None:
                    sections.append(current)
                    if current.kind == "interface" and first_interface is None:
                        first_interface = number
                seen = {}
                continue
            entry = self._entry(line, number, current)
            if entry is None:
                continue
            if not entry.key.repeats and entry.key.name in seen:
                self.error(number, entry.key.name,
                           f"given twice in one section (first on line {seen[entry.key.name]})")
                continue
            seen[entry.key.name] = number
            current.entries.append(entry)
        return sections

    def _header(self, line: str, number: int, first_interface: int | None) -> _Section | None:
        match = re.fullmatch(r"\[\s*([A-Za-z]+)\s*\]", line)
        if not match:
            inner = line.strip("[] \t")
            shown = f"{_quote(line)} is" if _echoable(inner, _SECTIONS) else "this line is"
            self.error(number, None, f"{shown} not a section header like [Peer]")
            return None
        name = match.group(1).lower()
        if name not in _SECTIONS:
            hint = difflib.get_close_matches(name, _SECTIONS, n=1)
            also = f"; did you mean [{_SECTIONS[hint[0]][0]}]?" if hint else ""
            shown = (f" {_quote('[' + match.group(1) + ']')}"
                     if _echoable(match.group(1), _SECTIONS) else "")
            self.error(number, None, f"unknown section{shown}"
                                     f" (known: [Interface], [Peer]){also}")
            return None
        if name == "interface" and first_interface is not None:
            self.error(number, None, f"a second [Interface] section (the first is on line "
                                     f"{first_interface}); there may be only one")
            return None
        return _Section(name, number)

    def _entry(self, line: str, number: int, section: _Section | None) -> _Entry | None:
        # Neither the line nor its value is quoted here: either may be a key.
        if "=" not in line:
            self._not_key_value(line, number, "no '='")
            return None
        name, value = (part.strip() for part in line.split("=", 1))
        if not name:
            self.error(number, None, "not a 'Key = Value' line: no key before '='")
            return None
        if name.lower() not in _ALL_KEYS and not _echoable(name, _ALL_KEYS):
            self._not_key_value(line, number, "the text before '=' is not a key name")
            return None
        if section is None:
            self.error(number, name, "key outside a section; put it under [Interface] or [Peer]")
            return None
        key = _SECTIONS[section.kind][1].get(name.lower())
        if key is None:
            self.error(number, name, self._unknown_key(name, section.kind))
            return None
        return _Entry(number, key, value)

    def _not_key_value(self, line: str, number: int, why: str) -> None:
        key = _leading_key(line)
        if key is None:
            self.error(number, None, f"not a 'Key = Value' line: {why}")
        else:
            self.error(number, key.name, f"not a 'Key = Value' line: {why} "
                                         f"(write '{key.name} = ...')")

    @staticmethod
    def _unknown_key(name: str, kind: str) -> str:
        title, known = _SECTIONS[kind]
        other_kind = "peer" if kind == "interface" else "interface"
        other_title, other_known = _SECTIONS[other_kind]
        if name.lower() in other_known:
            return f"belongs in [{other_title}], not [{title}]"
        hint = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
        also = f"; did you mean {known[hint[0]].name}?" if hint else ""
        return f"unknown key in [{title}]{also}"

    # Pass 2: values.
    def values(self, section: _Section) -> dict[str, object]:
        out: dict[str, object] = {}
        for entry in section.entries:
            try:
                value = entry.key.parse(entry.value)
            except _Invalid as exc:
                self.error(entry.line, entry.key.name, str(exc))
                continue
            if entry.key.repeats:
                out.setdefault(entry.key.attr, []).extend(value)
            else:
                out[entry.key.attr] = value
        return out

    def line_of(self, section: _Section, attr: str) -> int:
        for entry in section.entries:
            if entry.key.attr == attr:
                return entry.line
        return section.line

    def interface(self, sections: list[_Section]) -> InterfaceConfig | None:
        found = [s for s in sections if s.kind == "interface"]
        if not found:
            self.error(None, None, "no [Interface] section", late=True)
            return None
        section = found[0]
        fields = self.values(section)
        if "private_key" not in fields:
            if not any(e.key.attr == "private_key" for e in section.entries):
                self.error(section.line, "PrivateKey",
                           "missing from [Interface] (make one with `wg genkey`)", late=True)
            return None
        iface = InterfaceConfig(**fields)
        has_ipv6 = any(a.version == 6 for a in iface.addresses)
        if iface.mtu is not None and has_ipv6 and iface.mtu < MTU_MIN_IPV6:
            self.error(self.line_of(section, "mtu"), "MTU",
                       f"'{iface.mtu}' is below {MTU_MIN_IPV6}, the minimum for IPv6 "
                       f"(the interface has an IPv6 address)")
        return iface

    def peer(self, section: _Section) -> PeerConfig | None:
        fields = self.values(section)
        if "public_key" not in fields:
            if not any(e.key.attr == "public_key" for e in section.entries):
                self.error(section.line, "PublicKey", "missing from [Peer]", late=True)
            return None
        return PeerConfig(**fields, line=section.line)

    def check_peer_keys(self, iface: InterfaceConfig | None,
                        peers: list[tuple[_Section, PeerConfig]]) -> None:
        own = iface.public_key if iface is not None else None
        first: dict[bytes, int] = {}
        for section, peer in peers:
            line = self.line_of(section, "public_key")
            shown = _quote_public_key(keys.encode(peer.public_key))
            if peer.public_key == own:
                self.error(line, "PublicKey", f"{shown} is this interface's own public key")
            elif peer.public_key in first:
                self.error(line, "PublicKey", f"{shown} is also the key of the peer on "
                                              f"line {first[peer.public_key]}")
            else:
                first[peer.public_key] = section.line

    def check_peer_mark(self, sections: list[_Section], iface: InterfaceConfig | None,
                        peers: list[PeerConfig]) -> None:
        """PeerMark against FwMark, only where it matters: the nftables policy."""
        if iface is None:
            return
        policies = {iface.source_policy} | {p.source_policy for p in peers}
        problem = peer_mark_conflict(iface.peer_mark, iface.fwmark)
        if "nftables" not in policies or problem is None:
            return
        section = next(s for s in sections if s.kind == "interface")
        given = any(e.key.attr == "peer_mark" for e in section.entries)
        key, attr = ("PeerMark", "peer_mark") if given else ("FwMark", "fwmark")
        if not given:
            problem += f" (PeerMark is not set: {PEER_MARK_DEFAULT:#x} is the default)"
        self.error(self.line_of(section, attr), key, problem)

    def run(self, text: str) -> Config:
        sections = self.split(text)
        iface = self.interface(sections)
        peers = []
        for section in sections:
            if section.kind == "peer":
                peer = self.peer(section)
                if peer is not None:
                    peers.append((section, peer))
        self.check_peer_keys(iface, peers)
        self.check_peer_mark(sections, iface, [peer for _, peer in peers])
        if self.errors:
            # File order, but what is missing after what is wrong.
            ordered = [e for _, e in sorted(
                self.errors, key=lambda le: (le[0], le[1].line is None, le[1].line or 0))]
            ordered[0].errors = ordered
            raise ordered[0]
        assert iface is not None
        return Config(self.path, iface, [peer for _, peer in peers])


def parse(text: str, path: str = "<string>") -> Config:
    """Parse wg-quick configuration text; ConfigError on the first problem in the file."""
    return _Parser(path).run(text)


def load(path: str | os.PathLike) -> Config:
    """Read and parse a configuration file; unreadable files raise ConfigError too."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(name, None, None, f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(name, None, None, f"larger than {MAX_CONFIG_BYTES >> 20} MiB; "
                                            f"not a configuration file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(name, line, None, "not valid UTF-8 text") from None
    return parse(text, name)


# ---------------------------------------------------------------- writing

def _format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_config(cfg: Config) -> str:
    """wg-quick text for `cfg`, private key included; defaults are left out."""
    i = cfg.interface
    defaults = InterfaceConfig(private_key=i.private_key)
    out = ["[Interface]", f"PrivateKey = {keys.encode(i.private_key)}"]
    if i.listen_port:
        out.append(f"ListenPort = {i.listen_port}")
    if i.fwmark:
        out.append(f"FwMark = {i.fwmark:#x}")
    if i.addresses:
        out.append(f"Address = {', '.join(str(a) for a in i.addresses)}")
    if i.dns:
        out.append(f"DNS = {', '.join(i.dns)}")
    if i.mtu is not None:
        out.append(f"MTU = {i.mtu}")
    if i.table != defaults.table:
        out.append(f"Table = {i.table}")
    for name, commands in (("PreUp", i.pre_up), ("PostUp", i.post_up),
                           ("PreDown", i.pre_down), ("PostDown", i.post_down)):
        out.extend(f"{name} = {command}" for command in commands)
    if i.save_config:
        out.append("SaveConfig = true")
    if i.peer_selection != defaults.peer_selection:
        out.append(f"PeerSelection = {i.peer_selection}")
    if i.source_policy != defaults.source_policy:
        out.append(f"SourcePolicy = {i.source_policy}")
    if i.peer_mark != defaults.peer_mark:
        out.append(f"PeerMark = {i.peer_mark:#x}")
    if i.workers is not None:
        out.append(f"Workers = {i.workers}")
    if i.metrics is not None:
        out.append(f"Metrics = {i.metrics}")
    if i.metrics_compat:
        out.append("MetricsCompat = true")
    if i.peer_spread:
        out.append("PeerSpread = true")
    for peer in cfg.peers:
        out += ["", "[Peer]", f"PublicKey = {keys.encode(peer.public_key)}"]
        if peer.preshared_key is not None:
            out.append(f"PresharedKey = {keys.encode(peer.preshared_key)}")
        if peer.endpoint is not None:
            out.append(f"Endpoint = {_format_endpoint(peer.endpoint)}")
        if peer.allowed_ips:
            out.append(f"AllowedIPs = {', '.join(str(n) for n in peer.allowed_ips)}")
        if peer.persistent_keepalive:
            out.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
        if peer.source_policy is not None:
            out.append(f"SourcePolicy = {peer.source_policy}")
    return "\n".join(out) + "\n"
