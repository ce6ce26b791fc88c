"""What the control plane (pool.py) and a crypto worker (worker.py) say to
each other over their channel (channel.py): one frozen dataclass per kind.

Named `commands`, not `messages`, because wireguard/messages.py is
WireGuard's own wire format; nothing here ever leaves the host. Most of it
goes one way: commands from the control plane to a worker, and reports from
a worker back. Fields are plain values (ints, bytes, str, tuples, lists,
dicts) and keypair state as Keypair.export() makes it, so each side can
rebuild what it needs; file descriptors travel beside a message, never in it
(channel.send's `fds`).
"""

from dataclasses import dataclass

Endpoint = tuple | None
KeypairState = dict              # noise.Keypair.export()


# --- control plane -> worker ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Init:
    """The first message; fds: the worker's TAP queue, then its UDP sockets
    (IPv4, IPv6)."""
    worker_id: int                  # 1..workers: its TAP queue and socket position
    name: str
    mtu: int
    mac: bytes                      # the TAP's address: frames the worker writes go to it
    workers: int = 1                # how many workers share every peer's sessions
    counter_hints: bool = False     # fds then carry the shared counter hints (counters.py)
    replay_windows: bool = False    # and then the shared replay windows (PeerSpread)


@dataclass(frozen=True, slots=True)
class PeerAdd:
    """Serve this peer from now on (every worker serves every peer)."""
    slot: int
    public_key: bytes
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class PeerRemove:
    slot: int


@dataclass(frozen=True, slots=True)
class InstallKeypair:
    slot: int
    state: KeypairState


@dataclass(frozen=True, slots=True)
class SendKeepalive:
    slot: int


@dataclass(frozen=True, slots=True)
class ZeroKeys:
    slot: int


@dataclass(frozen=True, slots=True)
class PurgeStaged:
    slot: int


@dataclass(frozen=True, slots=True)
class ConfirmKeypair:
    """Another worker saw the peer's `next` session (index) confirmed by
    data: make it current here too."""
    slot: int
    index: int


@dataclass(frozen=True, slots=True)
class SetEndpoint:
    slot: int
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class ReplaceSockets:
    """fds: the new UDP sockets; answered with SocketsDone."""


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Report counters now; answered with Stats."""


@dataclass(frozen=True, slots=True)
class Stop:
    pass


# --- worker -> control plane ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HandshakeConfirmed:
    """A session the peer initiated (our `next`) was confirmed by data."""
    slot: int
    index: int = 0                   # the session's receiver index


@dataclass(frozen=True, slots=True)
class EndpointLearned:
    """The peer roamed: authenticated data came from a new address."""
    slot: int
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class NeedHandshake:
    slot: int


@dataclass(frozen=True, slots=True)
class TimerEvents:
    """Timer events per slot since the last batch, as worker.EVENT_ORDER bits."""
    flags_by_slot: dict[int, int]


@dataclass(frozen=True, slots=True)
class ReleasedIndices:
    """Session indices that died in the worker (unmap them from steering)."""
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SocketsDone:
    pass


@dataclass(frozen=True, slots=True)
class PeerTraffic:
    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Counters since the last report (the control plane adds them up),
    except `busy_seconds`: the worker's CPU time so far."""
    traffic_by_slot: dict[int, PeerTraffic]
    drops: dict[str, int]
    busy_seconds: float
    queue_depth: int
    drops_by_slot: dict[int, dict[str, int]]


TO_WORKER = (Init, PeerAdd, PeerRemove, InstallKeypair, ConfirmKeypair, SendKeepalive, ZeroKeys,
             PurgeStaged, SetEndpoint, ReplaceSockets, StatsRequest, Stop)
TO_CONTROL = (HandshakeConfirmed, EndpointLearned, NeedHandshake, TimerEvents, ReleasedIndices,
              SocketsDone, Stats)
