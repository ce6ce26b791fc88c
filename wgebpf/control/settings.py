"""`wgebpf set NAME ...`: wgebpf's own live settings, beside what `wg set`
can change. Carried over the UAPI socket as the operation `wgebpf-set=1`
with key=value lines, the way wg's own set works:

    source_policy=fib             the interface's SourcePolicy
    public_key=<hex>              then, for that peer:
    source_policy=off|default     its override ("default": follow the interface)

parse_args turns the command line's words into those lines; apply runs them
on the device.
"""

import errno
import re

from ..wireguard import keys
from ..wireguard.sourcepolicy import SOURCE_POLICIES, nftables_mark_conflict

SET_WORDS = ("peer", "source-policy")


class SettingError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


def _shown(word: str) -> str:
    """`word` for an error message, unless it could be key material (a key
    typed where a setting's name belongs)."""
    if re.fullmatch(r"[a-z][a-z_-]{0,23}", word) or (len(word) < 8 and word.isprintable()):
        return repr(word)
    return "(a word that is not a setting)"


def parse_args(words: list[str]) -> list[str]:
    """The UAPI lines for `wgebpf set NAME WORDS...`: pairs of a setting and
    its value, `peer KEY` switching from the interface to that peer.

    SettingError (EINVAL) for any wrong word, before the socket is touched.
    Every value is checked against its few legal spellings, so none can carry
    a newline into the request; a key is re-encoded, and never echoed.
    """
    lines: list[str] = []
    rest = list(words)
    peer_named = False
    while rest:
        word = rest.pop(0)
        if word not in SET_WORDS:
            raise SettingError(errno.EINVAL, f"unknown setting {_shown(word)} "
                                             f"(known: {', '.join(SET_WORDS)})")
        if not rest:
            raise SettingError(errno.EINVAL, f"{word} needs a value")
        value = rest.pop(0)
        if word == "peer":
            lines.append(f"public_key={_peer_hex(value)}")
            peer_named = True
        else:
            allowed = SOURCE_POLICIES + (("default",) if peer_named else ())
            if value not in allowed:
                raise SettingError(errno.EINVAL, f"source-policy must be one of "
                                                 f"{', '.join(allowed)}")
            lines.append(f"source_policy={value}")
    if not lines:
        raise SettingError(errno.EINVAL, "nothing to set (try: source-policy POLICY)")
    return lines


def _peer_hex(value: str) -> str:
    try:
        return keys.to_hex(keys.decode(value))
    except keys.KeyFormatError as exc:   # its message never holds the key
        raise SettingError(errno.EINVAL, f"peer: {exc}") from None


def apply(device, lines: list[str]) -> None:
    """Apply every line, or none if any is wrong (checked first)."""
    steps = []
    peer = None
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingError(errno.EPROTO, f"no '=' in {line!r}")
        if key == "public_key":
            try:
                peer = device.peers[bytes.fromhex(value)]
            except (ValueError, KeyError):
                raise SettingError(errno.ENOENT, "no such peer") from None
        elif key == "source_policy":
            allowed = SOURCE_POLICIES + (("default",) if peer is not None else ())
            if value not in allowed:
                raise SettingError(errno.EINVAL, f"source_policy must be one of {', '.join(allowed)}")
            steps.append((peer, None if value == "default" else value))
        else:
            raise SettingError(errno.EINVAL, f"unknown setting {key!r}")
    mark_problem = nftables_mark_conflict(device, [policy for _, policy in steps])
    if mark_problem:
        raise SettingError(errno.EINVAL, mark_problem)
    for target, policy in steps:
        if target is None:
            device.source_policy = policy
        else:
            target.source_policy = policy
    if steps:
        device.dataplane.policy_changed()


def handler(device):
    def wgebpf_set(body: list[str]):
        try:
            apply(device, body)
        except SettingError as exc:
            return str(exc), exc.errno
        return "", 0
    return wgebpf_set
