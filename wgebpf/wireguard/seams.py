"""What the protocol core needs from the layers above it, declared.

A Device (device.py) owns no socket, TUN queue, process or BPF map. It is
handed objects that do that work, and calls them only through the
Protocols below, so the same protocol code runs in one process (unit tests:
LocalDataplane and the in-memory fakes of tests/memnet.py), in a crypto
worker (dataplane/worker.py) and in the control plane with its worker pool
(dataplane/pool.py, control/attach.py). tests/test_seams.py checks that each
implementation still has every method with a compatible signature, so a
renamed method fails the tests instead of a tunnel at run time.

Parameters before `/` are passed by position: an implementation may name
them as it likes. Parameters after it are passed by keyword.
"""

from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .noise import Keypair
    from .peer import Peer

# The XDP guard's under-load view: True while the kernel sees a handshake flood.
LoadProbe = Callable[[], bool]

# Told that the interface's static identity (private key) changed.
IdentityListener = Callable[[], None]


@runtime_checkable
class Dataplane(Protocol):
    """Where a peer's sessions live and its packets are encrypted.

    LocalDataplane (device.py): in this process. WorkerPool
    (dataplane/pool.py): in worker processes, reached by messages.
    WorkerDataplane (dataplane/worker.py): a worker's own, reporting to the
    control plane.
    """

    def install_keypair(self, peer: "Peer", keypair: "Keypair", /) -> None:
        """A handshake derived a session: it now carries the peer's data."""

    def send_keepalive(self, peer: "Peer", /) -> None:
        """Send an empty data message with the peer's current session."""

    def zero_keys(self, peer: "Peer", /) -> None:
        """Forget every session key of the peer."""

    def endpoint_changed(self, peer: "Peer", /) -> None:
        """The peer's endpoint was set (config, UAPI or roaming)."""

    def purge_staged(self, peer: "Peer", /) -> None:
        """Drop the packets queued while waiting for a handshake."""

    def peer_added(self, peer: "Peer", /) -> None:
        """A new peer; may raise (e.g. DeviceError) to refuse it."""

    def peer_removed(self, peer: "Peer", /) -> None:
        """A peer is going: called before its indices are forgotten."""

    def allowed_ips_changed(self, peer=None) -> None:
        """`peer`'s AllowedIPs changed (None: any peer's); routing and source
        checks follow. A prefix it took from another peer changed that one's too."""

    def policy_changed(self) -> None:
        """SourcePolicy changed, for the interface or a peer (control/settings.py)."""

    def refresh(self) -> None:
        """Bring counters up to date before they are shown (control/uapi.py)."""


@runtime_checkable
class TimerActions(Protocol):
    """What a peer's Timers (timers.py) do when one fires.

    device._Actions in one process; dataplane/worker.py's WorkerActions in a
    worker, which asks the control plane instead of handshaking itself.
    """

    def send_handshake_initiation(self, peer: "Peer", /, retry: bool) -> None:
        """Start (or, with retry, repeat) a handshake with the peer."""

    def send_keepalive(self, peer: "Peer", /) -> None:
        """Send a keepalive to the peer."""

    def zero_key_material(self, peer: "Peer", /) -> None:
        """Erase every key of the peer (3 x REJECT_AFTER_TIME without a handshake)."""

    def handshake_gave_up(self, peer: "Peer", /) -> None:
        """REKEY_ATTEMPT_TIME passed without an answer."""


@runtime_checkable
class IndexWatcher(Protocol):
    """Mirrors the device's live receiver indices elsewhere: the XDP guard's
    map (kernel/xdp_guard.py), or a worker's list of released indices
    (dataplane/worker.py)."""

    def add_index(self, index: int, /) -> None:
        """A new live index. OSError or KeyError (a full BPF map) refuses it:
        the device then starts no session with that index."""

    def remove_index(self, index: int, /) -> None:
        """The index died; absent indices are no error."""


@runtime_checkable
class DatagramSender(Protocol):
    """Sends UDP datagrams: all send.py needs. dataplane/udp.py's UDPConn,
    a worker's WorkerConn, tests/memnet.py's MemoryConn."""

    def send(self, data: bytes, endpoint: tuple, /) -> None:
        """Send one datagram; a failure is a lost packet, not an exception."""


@runtime_checkable
class ListenSocket(DatagramSender, Protocol):
    """A DatagramSender that also owns the listen port: what the Device's
    ListenPort and FwMark settings need (UDPConn, MemoryConn; a worker's
    WorkerConn does not, since workers never change settings)."""

    listen_port: int

    def rebind(self, port: int, /) -> None:
        """Move to another port (0: any free one), or raise and stay."""

    def set_mark(self, mark: int, /) -> None:
        """Mark every datagram sent from now on with SO_MARK."""


@runtime_checkable
class PacketSink(Protocol):
    """Takes decrypted inner packets: the TUN device, one queue per peer.
    control/attach.py's Runner (queue 0), a worker's WorkerTun,
    tests/memnet.py's MemoryTun."""

    def write(self, packet: bytes, queue: int, /) -> None:
        """Deliver one inner packet on the given TUN queue."""
