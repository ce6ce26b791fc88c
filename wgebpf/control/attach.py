"""`wgebpf attach`: bring an interface up from a config, carry traffic until
SIGINT/SIGTERM, and take down everything it created.

Order matters for cleanup after a crash: the runtime state file is written
before anything that outlives the process (routes, rules, later tc/XDP
programs and nftables tables) is created, and updated as each is added, so
`wgebpf detach NAME` can always find and remove them.
"""

import logging
import os
import selectors
import signal
import socket

from ..kernel import link
from ..wireguard import send
from . import settings, status
from .config import Config
from ..dataplane.udp import UDPConn
from ..wireguard.device import Device
from ..wireguard.messages import DEFAULT_MTU
from .state import RuntimeState
from ..wireguard.timers import Timing
from ..dataplane.tun import TUN_BATCH, Tun
from ..kernel.nexthop import NextHopClassifier
from ..kernel.nftables import NftSourceFilter
from ..kernel.policy import SourcePolicy
from ..kernel.reuseport import ReuseportSteering
from ..kernel.tun_steer import TunSteering
from .uapi import UAPIServer
from ..dataplane.pool import WorkerPool, default_workers
from ..kernel.xdp_guard import XdpGuard

log = logging.getLogger("wgebpf")

MAX_SLEEP = 1.0
DISHONEST_LOG_EVERY = 10.0


class AttachError(Exception):
    pass


def resolve_endpoint(host: str, port: int) -> tuple[str, int]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise AttachError(f"cannot resolve endpoint {host}:{port}: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    return address[0], address[1]


def configure_device(device: Device, config: Config) -> None:
    """Apply the [Peer] sections (the [Interface] keys are applied by attach)."""
    for pc in config.peers:
        peer = device.add_peer(pc.public_key)
        if pc.preshared_key:
            peer.set_preshared_key(pc.preshared_key)
        if pc.endpoint:
            peer.set_endpoint(resolve_endpoint(*pc.endpoint))
        for network in pc.allowed_ips:
            device.add_allowed_ip(peer, network)
        peer.source_policy = pc.source_policy
        if pc.persistent_keepalive:
            peer.set_persistent_keepalive(pc.persistent_keepalive)


def check_underlay(underlay: str) -> None:
    if not os.path.exists(f"/sys/class/net/{underlay}"):
        raise AttachError(f"underlay interface {underlay!r} does not exist")


def set_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Attachment:
    """One running interface: TUN, sockets, device, UAPI, routes, hooks."""

    def __init__(self, underlay: str, config: Config, name: str, xdp_mode: str = "auto",
                 force: bool = False):
        self.underlay = underlay
        self.xdp_mode = xdp_mode
        self.force = force
        self.xdp = None
        self.config = config
        self.name = name
        self.pool = None
        self.metrics = None
        self.policy = self.nft = None
        self.classifier = self.steering = self.reuseport = None
        self.tun = None
        self.conn = None
        self.uapi = None
        self.state = None
        self.routes: list = []
        self.device: Device | None = None
        self.selector = selectors.DefaultSelector()
        self._stop = False

    # --- bring up -------------------------------------------------------------------

    def up(self) -> None:
        iface = self.config.interface
        if self.underlay is not None:       # None: every address (wgebpf-go, control/quick.py)
            check_underlay(self.underlay)
        if link.link_exists(self.name):
            raise AttachError(f"interface {self.name} already exists "
                              f"(a running instance? try `wgebpf detach {self.name}`)")
        self.state = RuntimeState(name=self.name, pid=os.getpid(), underlay=self.underlay)
        self.state.save()
        link.run_hooks(iface.pre_up, self.name)
        workers = iface.workers or default_workers()
        # Queue 0 is the control plane's, queue k worker k's (pool.py).
        self.tun = Tun.create(self.name, queues=workers + 1, vnet_hdr=True, tap=True)
        mtu = iface.mtu or DEFAULT_MTU
        link.configure(self.name, iface.addresses, mtu)
        self._device_sysctls()
        self._load_bpf()
        self.conn = UDPConn(iface.listen_port or 0, self.underlay, iface.fwmark,
                            group=workers + 1, steering=self.reuseport)
        self.device = Device(self.name, iface.private_key, tun=self, conn=self.conn,
                             timing=Timing.from_environment(), addresses=iface.addresses, mtu=mtu)
        self.device.fwmark = iface.fwmark
        self.device.peer_mark = iface.peer_mark
        self.device.source_policy = iface.source_policy
        self.device.peer_selection = iface.peer_selection
        self.device.force_under_load = os.environ.get("WGEBPF_TEST_FORCE_UNDER_LOAD") == "1"
        self._guard_underlay()
        self.pool = WorkerPool(self.device, self.tun, self.conn, workers, self.classifier,
                               self.reuseport, self.selector, self.policy, self._nft_filter,
                               peer_spread=iface.peer_spread)
        self.device.attach_dataplane(self.pool)
        configure_device(self.device, self.config)
        self.pool.policy_changed()
        self.pool.start()
        self._dishonest: dict[int, tuple[int, float]] = {}
        self._policy_timer = self.device.scheduler.timer(self._watch_policy_drops)
        self._policy_timer.mod(1.0)
        self.conn.watch_rebind(self._sockets_changed)
        self.uapi = UAPIServer(self.name, self.device, self.device.lock)
        self.uapi.extensions["wgebpf-status=1"] = status.handler(self.device, self)
        self.uapi.extensions["wgebpf-set=1"] = settings.handler(self.device)
        self.uapi.start()
        self.state.socket_path = self.uapi.path
        self.state.save()
        self._add_routes()
        self._start_metrics()
        link.run_hooks(iface.post_up, self.name)
        self._register()

    def _device_sysctls(self) -> None:
        # accept_local: our ICMP errors come from our own address (icmp.py).
        # forwarding: bpf_fib_lookup on this device needs it (docs/platform-notes.md, item 1).
        base = f"/proc/sys/net/ipv4/conf/{self.name}"
        set_sysctl(f"{base}/accept_local", "1")
        link.enable_forwarding(self.name)

    def _load_bpf(self) -> None:
        """The next-hop classifier on tc egress (it tags each packet with its
        peer and picks a worker by flow) and the steering program that puts
        the packet on that worker's queue; the reuseport program that hands
        each data message to the worker that receives its session."""
        mode = self.config.interface.peer_selection
        self.classifier = NextHopClassifier(self.name, mode, queues=len(self.tun.fds))
        self.state.tc_filters.append(self.classifier.attach())
        self.state.save()
        self.steering = TunSteering(self.tun, self.classifier)
        self.steering.attach()
        iface = self.config.interface
        self.policy = SourcePolicy(self.classifier, iface.source_policy, iface.peer_mark)
        self.state.tc_filters.append(self.policy.attach())
        self.state.save()
        self.reuseport = ReuseportSteering()

    def _watch_policy_drops(self) -> None:
        """Log source-policy drops per peer, at most once per DISHONEST_LOG_EVERY
        seconds each: kernel WireGuard's rate-limited "dishonest peer"
        message, from the ingress program's counters."""
        policy_of = lambda p: p.source_policy or self.device.source_policy
        counts = self.policy.counters()
        now = self.device.clock.monotonic()
        for peer in self.device.peers.values():
            dropped = sum(counts.get(peer.queue, {}).get(reason, 0)
                          for reason in status.POLICY_DROPS)
            seen, logged = self._dishonest.get(peer.queue, (0, -1e18))
            seen = min(seen, dropped)           # a reused slot starts from zero
            if dropped > seen and now - logged >= DISHONEST_LOG_EVERY:
                log.warning("%s: %s sent %d packets with a source address its SourcePolicy "
                            "(%s) does not allow", self.name, peer, dropped - seen, policy_of(peer))
                self._dishonest[peer.queue] = (dropped, now)
        self._policy_timer.mod(1.0)

    def _nft_filter(self) -> NftSourceFilter:
        """The admin-visible nftables table, made when a peer's SourcePolicy
        first becomes `nftables` (recorded first, so detach finds it)."""
        nft = NftSourceFilter(self.name, self.config.interface.peer_mark)
        self.state.nft_tables.append(nft.record)
        self.state.save()
        nft.install()
        self.nft = nft
        return nft

    def _start_metrics(self) -> None:
        address = self.config.interface.metrics
        if not address:
            return
        from .metrics import MetricsServer
        def snapshot() -> dict:
            with self.device.lock:
                return status.snapshot(self.device, self)
        self.metrics = MetricsServer(address, snapshot,
                                     compat=self.config.interface.metrics_compat)
        self.metrics.start()
        log.info("%s: metrics on http://%s/metrics", self.name, address)

    def _guard_underlay(self) -> None:
        """XDP on the underlay: junk to the listen port dies in the driver,
        handshakes are rate-limited per source under load (xdp_guard.c).
        The guard mirrors the session indices and the cookie secret (for
        mac2) and feeds the under-load decision."""
        if self.xdp_mode == "off":
            return
        self.xdp = XdpGuard(self.underlay, self.conn.listen_port, mode=self.xdp_mode,
                            force=self.force, public_key=self.device.public_key)
        self.state.xdp = self.xdp.attach()
        self.state.save()
        if self.xdp.replaced:
            log.warning("%s: replaced XDP program %s on %s (--force)", self.name,
                        self.xdp.replaced, self.underlay)
        self.device.add_index_watcher(self.xdp)
        self.device.watch_external_load(self.xdp.under_load)
        self.device.cookie_checker.on_new_secret = self.xdp.set_cookie_secret
        self.device.watch_identity(lambda: self.xdp.set_public_key(self.device.public_key))
        log.info("%s: XDP guard on %s (%s mode)", self.name, self.underlay, self.xdp.mode)

    def _sockets_changed(self) -> None:
        if self.xdp is not None:
            self.xdp.set_port(self.conn.listen_port)
        self._register_sockets()
        self.pool.sockets_changed()

    def _add_routes(self) -> None:
        iface = self.config.interface
        networks = [n for pc in self.config.peers for n in pc.allowed_ips]
        self.routes = link.add_routes(self.name, networks, iface.table, iface.fwmark)
        self.state.routes = [r.to_dict() for r in self.routes]
        self.state.save()
        mark = link.fwmark_of(self.routes)
        if mark and not iface.fwmark:
            self.device.set_fwmark(mark)        # wg-quick's default-route recipe needs it

    def _register(self) -> None:
        self.selector.register(self.tun.fds[0], selectors.EVENT_READ, ("tun", 0))
        self._register_sockets()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    def _register_sockets(self) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data[0] == "udp":
                self.selector.unregister(key.fileobj)
        for sock in self.conn.sockets:
            self.selector.register(sock, selectors.EVENT_READ, ("udp", sock))

    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    # --- the device's TUN ("tun" handed to Device: it writes decrypted packets) ---

    def write(self, packet: bytes, slot: int = 0) -> None:
        # The control plane writes only its own packets (ICMP errors), on
        # its own queue 0; `slot` tags them (0: no peer).
        self.tun.write(packet, 0, slot)

    # --- run --------------------------------------------------------------------------------

    def run(self) -> None:
        device = self.device
        scheduler = device.scheduler
        log.info("%s: up, listening on UDP port %d on %s", self.name, self.conn.listen_port,
                 self.underlay or "every address")
        while not self._stop:
            with device.lock:
                timeout = scheduler.next_deadline()
            timeout = MAX_SLEEP if timeout is None else min(timeout, MAX_SLEEP)
            events = self.selector.select(timeout)
            with device.lock:
                for key, _ in events:
                    kind, arg = key.data
                    if kind == "tun":
                        self._drain_tun(arg)
                    elif kind == "worker":
                        self.pool.on_readable(arg)
                    elif kind == "udp":
                        for data, source in self.conn.receive(arg):
                            device.on_datagram(data, source)
                    else:
                        self._drain_wake()
                scheduler.run_due()

    def _drain_tun(self, queue: int) -> None:
        """Queue 0 holds what the classifier found no peer for."""
        for _ in range(TUN_BATCH):
            packet = self.tun.read(queue)
            if packet is None:
                return
            send.no_peer(self.device, packet)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 256):
                pass
        except BlockingIOError:
            pass

    # --- take down -----------------------------------------------------------------------

    def down(self) -> None:
        iface = self.config.interface
        steps = [
            ("PreDown hooks", lambda: link.run_hooks(iface.pre_down, self.name)),
            ("UAPI socket", lambda: self.uapi and self.uapi.stop()),
            ("metrics", lambda: self.metrics and self.metrics.stop()),
            ("workers", lambda: self.pool and self.pool.stop()),
            ("device", lambda: self.device and self.device.close()),
            ("nftables table", lambda: self.nft and self.nft.uninstall()),
            ("source policy", lambda: self.policy and self.policy.close()),
            ("classifier", lambda: self.classifier and self.classifier.close()),
            ("steering", lambda: self.steering and self.steering.close()),
            ("reuseport", lambda: self.reuseport and self.reuseport.close()),
            ("XDP guard", lambda: self.xdp and self.xdp.close()),
            ("routes", lambda: link.remove_routes(self.routes)),
            ("sockets", lambda: self.conn and self.conn.close()),
            ("TUN", lambda: self.tun and self.tun.close()),
            ("PostDown hooks", lambda: link.run_hooks(iface.post_down, self.name)),
            ("state", lambda: self.state and self.state.remove()),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:        # keep going: leave as little behind as we can
                log.error("%s: removing %s failed: %s", self.name, what, exc)


def attach(underlay: str, config: Config, name: str, xdp_mode: str = "auto",
           force: bool = False) -> None:
    attachment = Attachment(underlay, config, name, xdp_mode, force)
    # Signals during bring-up must still lead to a full take-down.
    previous = {sig: signal.signal(sig, attachment._on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        attachment.up()
        if not attachment._stop:
            attachment.run()
    finally:
        attachment.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
