"""Prometheus metrics, built from the `wgebpf status` snapshot at scrape time.

Nothing here sits on the packet path. A scrape calls snapshot() (attach.py
takes the device lock and asks the workers for fresh counters, exactly as
`wgebpf status` does) and turns the dict into metric families; between
scrapes this module does nothing. So metrics and `wgebpf status` can never
disagree, and prometheus-client is not imported by any protocol module.

Naming, after Prometheus' conventions (prometheus.io/docs/practices/naming):
prefix `wgebpf_`, base units (bytes, seconds), `_total` on counters, `_info`
for metadata, timestamps as `_timestamp_seconds`, labels `interface` and
`public_key` (base64). The
endpoint is only a label of `wgebpf_peer_info`: on a counter, every roam
would start new series. Only public keys appear; the snapshot holds no
private or preshared key, and tests/test_metrics.py checks a scrape for the
interface's private key.

Every label set known in advance is exported from the first scrape, at 0,
as Prometheus' instrumentation guidelines advise (so rate() and every
dashboard panel have a series on a healthy, idle host): each drop reason of
DROP_REASONS, each peer with each reason of PEER_DROP_REASONS, each worker
with each direction, each handshake result, each classifier, XDP, fallback
and source-policy verdict, and each host address (/32, /128) in a peer's
AllowedIPs as a next hop. Except at scale: above ZERO_SERIES_PEERS peers
the per-peer series that are 0 (drops by reason, source-policy verdicts,
next hops without traffic) are left out, as a scrape of 10,000 peers with
every zero was 38 MB and took 2.8 s; the per-peer traffic and handshake
series stay.

The families, by snapshot key:

  peers        wgebpf_peer_{received,sent}_{bytes,packets}_total,
               wgebpf_peer_handshakes_total{result}, ..._handshake_initiations_total,
               wgebpf_peer_latest_handshake_timestamp_seconds (0 = never),
               wgebpf_peer_keypair_age_seconds, wgebpf_peer_info,
               wgebpf_peer_dropped_packets_total{reason} (PEER_DROP_REASONS and any
               other reason the peer has)
  drops        wgebpf_dropped_packets_total{reason}
  workers      wgebpf_worker_{packets,bytes}_total{direction}, ..._busy_seconds_total,
               ..._queue_depth, ..._restarts_total, ..._up, ..._peers
  classifier   wgebpf_classifier_packets_total{reason}
  classifier_route
               wgebpf_classifier_info{mode} (route or lookup),
               wgebpf_nexthop_route_reads_total (next hop read from the route),
               wgebpf_nexthop_fallbacks_total{reason} (looked up instead;
               every reason of FALLBACK_REASONS from the start)
  nexthops     wgebpf_nexthop_{packets,bytes}_total{nexthop, public_key} (the
               peers' host AllowedIPs at 0 until traffic)
  policy       wgebpf_source_policy_packets_total{public_key, verdict}
  xdp          wgebpf_xdp_packets_total{reason}
  handshake_duration_seconds   wgebpf_handshake_duration_seconds (histogram)
  (interface)  wgebpf_info{version, peer_selection, source_policy, listen_port}

With compat=True also the names community WireGuard dashboards query, with
the labels of MindFlavor's prometheus_wireguard_exporter (interface,
public_key, allowed_ips): wireguard_{sent,received}_bytes_total and
wireguard_latest_handshake_seconds (a Unix timestamp despite the name, 0 =
never, as that exporter writes it).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import socketserver
import threading
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily, Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..kernel.bpfmaps import FALLBACK_REASONS

log = logging.getLogger("wgebpf")

# Every reason the code counts a drop for, with what it means. Exported at 0
# until the first drop, so rate() and the dashboard have a series from the
# start; a reason the snapshot has and this table lacks is exported too.
# tests/test_metrics.py checks this table against the source.
DROP_REASONS: dict[str, str] = {
    # outgoing (kernel -> peer)
    "no_peer": "no peer's AllowedIPs hold the packet's next hop (answered with ICMP unreachable)",
    "multicast": "multicast the kernel sends into the interface (IPv6 MLD, ...): no peer takes it",
    "malformed_outgoing": "a packet from the kernel with no readable IPv4/IPv6 destination",
    "no_endpoint": "the peer has no endpoint yet (it has never reached us and none is configured)",
    "no_session": "queued while waiting for a handshake, then dropped: the queue (128 packets) "
                  "overflowed or the handshake gave up",
    "queue_full": "dropped by the kernel on the way to a worker: the worker's TAP queue was "
                  "full (the interface's tx_dropped)",
    "unknown_peer": "the classifier named a peer the worker does not serve: one added or "
                    "removed a moment before",
    "udp_send_failed": "sending the encrypted datagram failed (socket buffer full, no route)",
    # incoming (underlay -> kernel)
    "malformed": "a datagram on the listen port that is no well-formed WireGuard message",
    "invalid_mac1": "a handshake message with a wrong mac1 (not meant for this interface's key)",
    "cookie_required": "under load, a handshake message without a valid cookie (a cookie reply "
                       "was sent)",
    "rate_limited": "a handshake message over its source's rate limit",
    "handshake_failed": "a handshake message that failed (unknown peer, bad decryption, "
                        "replayed or too frequent initiation)",
    "invalid_cookie": "a cookie reply that matches no handshake of ours or does not decrypt",
    "unknown_index": "a data message for a receiver index no current session has",
    "expired_keypair": "a data message for a session past REJECT_AFTER_TIME",
    "replay": "a data message whose counter was already seen or is too old",
    "auth_failed": "a data message that failed authentication (AEAD tag)",
    "malformed_inner": "a decrypted packet that is no valid IPv4/IPv6 packet",
    "index_refused": "a handshake not sent or answered because a kernel map of session "
                     "indices is full (the XDP guard's, or receive steering's)",
    "source_policy": "the inner source address was refused by SourcePolicy",
    "tun_write_failed": "writing a decrypted packet to the worker's TAP queue failed",
}

# The reasons above that can belong to a peer (Device.drop(reason, peer),
# and source_policy, which status.py pins on the peer whose slot it is):
# wgebpf_peer_dropped_packets_total has each of them for each peer from the
# start. tests/test_metrics.py checks this against the source too.
PEER_DROP_REASONS: tuple[str, ...] = (
    "no_endpoint", "no_session", "index_refused",
    "expired_keypair", "replay", "auth_failed", "malformed_inner",
    "source_policy",
)
assert set(PEER_DROP_REASONS) <= set(DROP_REASONS)

Snapshot = Callable[[], dict]

# Up to this many peers every per-peer label set is exported at 0; above it
# only those with something to say (see the module doc).
ZERO_SERIES_PEERS = 1000


# ---------------------------------------------------------------- families

def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    # prometheus-client adds the `_total` suffix to the sample itself.
    return CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)


def _number(value) -> float:
    return float(value or 0)


# (metric name, snapshot key, help) for the per-peer counters.
PEER_COUNTERS = (
    ("wgebpf_peer_received_bytes_total", "rx_bytes",
     "Bytes of WireGuard messages received from the peer (as wg(8) counts them)."),
    ("wgebpf_peer_sent_bytes_total", "tx_bytes",
     "Bytes of WireGuard messages sent to the peer (as wg(8) counts them)."),
    ("wgebpf_peer_received_packets_total", "rx_packets",
     "Authenticated data messages received from the peer (keepalives included)."),
    ("wgebpf_peer_sent_packets_total", "tx_packets",
     "Data messages sent to the peer (keepalives included)."),
    ("wgebpf_peer_handshake_initiations_total", "handshakes_sent",
     "Handshake initiations sent to the peer."),
)


def peer_families(interface: str, peers: dict, zeros: bool = True) -> Iterator[Metric]:
    labels = ["interface", "public_key"]
    for name, key, doc in PEER_COUNTERS:
        family = _counter(name, doc, labels)
        for public_key, peer in peers.items():
            family.add_metric([interface, public_key], _number(peer.get(key)))
        yield family

    handshakes = _counter("wgebpf_peer_handshakes_total",
                          "Handshakes with the peer: completed (a new session), or failed "
                          "(gave up after REKEY_ATTEMPT_TIME).", labels + ["result"])
    latest = GaugeMetricFamily("wgebpf_peer_latest_handshake_timestamp_seconds",
                               "Unix time of the latest completed handshake; 0 = never.",
                               labels=labels)
    age = GaugeMetricFamily("wgebpf_peer_keypair_age_seconds",
                            "Age of the current session's keypair (absent without one).",
                            labels=labels)
    info = InfoMetricFamily("wgebpf_peer", "The peer's endpoint, slot (its tag on the "
                            "device's frames), AllowedIPs and source policy.",
                            labels=["interface", "public_key", "endpoint", "slot",
                                    "allowed_ips", "source_policy"])
    dropped = _counter("wgebpf_peer_dropped_packets_total",
                       "Packets dropped for a reason that belongs to this peer "
                       "(see wgebpf_dropped_packets_total).", labels + ["reason"])
    for public_key, peer in peers.items():
        for result in ("completed", "failed"):
            handshakes.add_metric([interface, public_key, result],
                                  _number(peer.get(f"handshakes_{result}")))
        latest.add_metric([interface, public_key], _number(peer.get("last_handshake_time")))
        if peer.get("keypair_age_seconds") is not None:
            age.add_metric([interface, public_key], float(peer["keypair_age_seconds"]))
        info.add_metric([interface, public_key, _text(peer.get("endpoint")),
                         _text(peer.get("slot")),
                         ",".join(peer.get("allowed_ips") or ()),
                         _text(peer.get("source_policy"))], {})
        drops = peer.get("drops") or {}
        for reason in sorted(set(PEER_DROP_REASONS if zeros else ()) | set(drops)):
            dropped.add_metric([interface, public_key, reason], _number(drops.get(reason)))
    yield from (handshakes, latest, age, info, dropped)


def _text(value) -> str:
    return "" if value is None else str(value)


def drop_family(interface: str, drops: dict) -> Metric:
    family = _counter("wgebpf_dropped_packets_total",
                      "Packets (or datagrams) dropped, by reason; the README lists the "
                      "reasons.", ["interface", "reason"])
    for reason in sorted(set(DROP_REASONS) | set(drops)):
        family.add_metric([interface, reason], _number(drops.get(reason)))
    return family


# (metric suffix, snapshot key, direction) for the per-worker traffic.
WORKER_TRAFFIC = (
    ("packets", "rx_packets", "received"), ("packets", "tx_packets", "sent"),
    ("bytes", "rx_bytes", "received"), ("bytes", "tx_bytes", "sent"),
)


def worker_families(interface: str, workers: list) -> Iterator[Metric]:
    labels = ["interface", "worker"]
    traffic = {
        "packets": _counter("wgebpf_worker_packets_total",
                            "Data messages the worker received (decrypted) or sent "
                            "(encrypted).", labels + ["direction"]),
        "bytes": _counter("wgebpf_worker_bytes_total",
                          "Bytes of the data messages the worker received or sent.",
                          labels + ["direction"]),
    }
    busy = _counter("wgebpf_worker_busy_seconds_total",
                    "CPU time the worker process used, summed over its restarts.", labels)
    depth = GaugeMetricFamily("wgebpf_worker_queue_depth",
                              "Packets the worker holds waiting for a session.", labels=labels)
    restarts = _counter("wgebpf_worker_restarts_total",
                        "Times the worker process died and was restarted.", labels)
    up = GaugeMetricFamily("wgebpf_worker_up", "1 if the worker process is running.",
                           labels=labels)
    owned = GaugeMetricFamily("wgebpf_worker_peers",
                              "Peers whose packets the worker handles: those it is the own "
                              "worker of, or every peer under PeerSpread.",
                              labels=labels)
    for worker in workers:
        position = _text(worker.get("worker"))
        for kind, key, direction in WORKER_TRAFFIC:
            traffic[kind].add_metric([interface, position, direction], _number(worker.get(key)))
        busy.add_metric([interface, position], _number(worker.get("busy_seconds")))
        depth.add_metric([interface, position], _number(worker.get("queue_depth")))
        restarts.add_metric([interface, position], _number(worker.get("restarts")))
        up.add_metric([interface, position], 1.0 if worker.get("alive") else 0.0)
        owned.add_metric([interface, position], float(worker.get("peers") or 0))
    yield from (traffic["packets"], traffic["bytes"], busy, depth, restarts, up, owned)


def known_nexthops(peers: dict) -> Iterator[tuple[str, dict]]:
    """A zero entry for every host address (/32, /128) in a peer's
    AllowedIPs (its tunnel address: what a route through the interface
    names as its gateway, or an on-link destination), so the next-hop
    series exist before the classifier's map has an entry, which it makes
    on a next hop's first packet. Other next hops appear with traffic."""
    for public_key, peer in peers.items():
        for text in peer.get("allowed_ips") or ():
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                continue
            if net.prefixlen == net.max_prefixlen:
                yield str(net.network_address), {"packets": 0, "bytes": 0,
                                                 "public_key": public_key}


def ebpf_families(interface: str, status: dict, slots: dict[str, str],
                  peers: dict | None = None, zeros: bool = True) -> Iterator[Metric]:
    if "classifier" in status:
        family = _counter("wgebpf_classifier_packets_total",
                          "Packets the tc egress classifier saw, by verdict: `peer` (a peer "
                          "took it) or why none did (no_peer, fib_*, ...).",
                          ["interface", "reason"])
        for reason, count in sorted(status["classifier"].items()):
            family.add_metric([interface, reason], _number(count))
        yield family
    if "classifier_route" in status:
        yield from route_families(interface, status["classifier_route"])
    if "nexthops" in status:
        nexthops = dict(known_nexthops(peers or {})) if zeros else {}
        nexthops.update(status["nexthops"])
        labels = ["interface", "nexthop", "public_key"]
        packets = _counter("wgebpf_nexthop_packets_total",
                           "Packets the classifier sent to each next hop (an ECMP route's "
                           "members are its next hops); public_key is the peer holding it.",
                           labels)
        size = _counter("wgebpf_nexthop_bytes_total", "Bytes sent to each next hop.", labels)
        for nexthop, stats in sorted(nexthops.items()):
            key = [interface, nexthop, _text(stats.get("public_key"))]
            packets.add_metric(key, _number(stats.get("packets")))
            size.add_metric(key, _number(stats.get("bytes")))
        yield from (packets, size)
    if "policy" in status:
        family = _counter("wgebpf_source_policy_packets_total",
                          "Received packets the source policy judged, by peer and verdict.",
                          ["interface", "public_key", "verdict"])
        totals: dict[tuple[str, str], float] = {}
        for slot, verdicts in status["policy"].items():
            public_key = slots.get(str(slot), "")     # "" = a slot no peer holds now
            for verdict, count in verdicts.items():
                if count or zeros:
                    totals[public_key, verdict] = totals.get((public_key, verdict), 0.0) \
                        + _number(count)
        for (public_key, verdict), count in sorted(totals.items()):
            family.add_metric([interface, public_key, verdict], count)
        yield family
    if "xdp" in status:
        family = _counter("wgebpf_xdp_packets_total",
                          "Packets the XDP underlay guard saw, by verdict.",
                          ["interface", "reason"])
        for reason, count in sorted(status["xdp"].items()):
            family.add_metric([interface, reason], _number(count))
        yield family


def histogram_family(interface: str, snapshot: dict) -> Metric:
    family = HistogramMetricFamily("wgebpf_handshake_duration_seconds",
                                   "Time from sending a handshake initiation to the "
                                   "session it made (retries included).",
                                   labels=["interface"])
    buckets = [(floatToGoString(float(bound)), float(count))
               for bound, count in snapshot.get("buckets", [])]
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", float(snapshot.get("count", 0))))
    family.add_metric([interface], buckets, float(snapshot.get("sum", 0.0)))
    return family


def route_families(interface: str, route: dict) -> Iterator[Metric]:
    """Where the classifier's next hops came from (status "classifier_route")."""
    info = InfoMetricFamily("wgebpf_classifier",
                            "How the classifier finds a packet's next hop: `route` reads the "
                            "route the kernel attached to the packet, `lookup` asks the FIB.",
                            labels=["interface", "mode"])
    info.add_metric([interface, _text(route.get("mode"))], {})
    reads = _counter("wgebpf_nexthop_route_reads_total",
                     "Packets whose next hop was read from the route the kernel attached.",
                     ["interface"])
    reads.add_metric([interface], _number(route.get("dst")))
    fallbacks = _counter("wgebpf_nexthop_fallbacks_total",
                         "Packets whose route could not be read, so the FIB was asked "
                         "instead, by reason: no_dst (none attached: AF_PACKET, tc redirect), "
                         "foreign_dst (not a route of the packet's family), other_device "
                         "(the route's device is not ours), read_failed.",
                         ["interface", "reason"])
    counts = {reason: 0 for reason in FALLBACK_REASONS}
    counts.update(route.get("fallbacks") or {})
    for reason, count in sorted(counts.items()):
        fallbacks.add_metric([interface, reason], _number(count))
    yield from (info, reads, fallbacks)


def info_family(status: dict) -> Metric:
    family = InfoMetricFamily("wgebpf", "The interface's wgebpf version and settings.",
                              labels=["interface", "version", "peer_selection",
                                      "source_policy", "listen_port"])
    family.add_metric([status["interface"], __version__, _text(status.get("peer_selection")),
                       _text(status.get("source_policy")), _text(status.get("listen_port"))],
                      {})
    return family


def compat_families(interface: str, peers: dict) -> Iterator[Metric]:
    """The names and labels of MindFlavor's prometheus_wireguard_exporter."""
    labels = ["interface", "public_key", "allowed_ips"]
    sent = _counter("wireguard_sent_bytes_total", "Bytes sent to the peer", labels)
    received = _counter("wireguard_received_bytes_total", "Bytes received from the peer",
                        labels)
    latest = GaugeMetricFamily("wireguard_latest_handshake_seconds",
                               "Seconds from the last handshake (a Unix timestamp, 0 = never)",
                               labels=labels)
    for public_key, peer in peers.items():
        key = [interface, public_key, ",".join(peer.get("allowed_ips") or ())]
        sent.add_metric(key, _number(peer.get("tx_bytes")))
        received.add_metric(key, _number(peer.get("rx_bytes")))
        latest.add_metric(key, float(int(_number(peer.get("last_handshake_time")))))
    yield from (sent, received, latest)


def families(status: dict, compat: bool = False) -> Iterator[Metric]:
    """Every metric family for one status snapshot (status.snapshot's dict)."""
    interface = status["interface"]
    peers = status.get("peers") or {}
    slots = {str(peer.get("slot")): key for key, peer in peers.items()}
    zeros = len(peers) <= ZERO_SERIES_PEERS
    yield info_family(status)
    yield from peer_families(interface, peers, zeros)
    yield drop_family(interface, status.get("drops") or {})
    yield from worker_families(interface, status.get("workers") or [])
    yield from ebpf_families(interface, status, slots, peers, zeros)
    if "handshake_duration_seconds" in status:
        yield histogram_family(interface, status["handshake_duration_seconds"])
    if compat:
        yield from compat_families(interface, peers)


class SnapshotCollector(Collector):
    """Reads the snapshot once per scrape."""

    def __init__(self, snapshot: Snapshot, compat: bool = False):
        self.snapshot = snapshot
        self.compat = compat

    def collect(self) -> Iterable[Metric]:
        return list(families(self.snapshot(), self.compat))


# ---------------------------------------------------------------- the server

def parse_address(address: str) -> tuple[str, int]:
    """'ADDR:PORT', '[v6]:PORT' or ':PORT' (every address) -> (host, port).
    Port 0 picks a free port (tests); config.py refuses it in files."""
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            raise ValueError(f"{address!r} has no port: expected ADDR:PORT or :PORT")
        if ":" in host:
            raise ValueError(f"{address!r}: write an IPv6 address in brackets, [v6]:PORT")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r}: expected ADDR:PORT, [v6]:PORT or :PORT")
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:     # noqa: A002 (the base's name)
        pass        # one line per scrape on stderr would drown the real log


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True          # a hung client must not hold up take-down
    allow_reuse_address = True
    dual_stack = False

    def server_bind(self) -> None:
        if self.dual_stack:
            # ':PORT' means IPv4 too, whatever net.ipv6.bindv6only says.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _server_class(family: int, dual_stack: bool) -> type[_Server]:
    return type("MetricsHTTPServer", (_Server,),
                {"address_family": family, "dual_stack": dual_stack})


def _app(registry: CollectorRegistry):
    """prometheus-client's WSGI app; a failed snapshot is one log line and
    a 500 (Prometheus then records up=0), not a traceback per scrape."""
    inner = make_wsgi_app(registry)

    def app(environ, start_response):
        try:
            return inner(environ, start_response)
        except Exception as exc:
            log.warning("metrics: scrape failed: %s: %s", type(exc).__name__, exc)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"scrape failed\n"]
    return app


def _bind(host: str, port: int, app) -> _Server:
    if not host:
        try:
            return make_server("::", port, app, _server_class(socket.AF_INET6, True),
                               handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            host = "0.0.0.0"            # no IPv6 here: IPv4 alone
    family = socket.AF_INET6 if ipaddress.ip_address(host.split("%")[0]).version == 6 \
        else socket.AF_INET
    return make_server(host, port, app, _server_class(family, False),
                       handler_class=_QuietHandler)


class MetricsServer:
    """Serves /metrics for one interface on its own registry (no process or
    platform collectors: only what the snapshot says)."""

    def __init__(self, address: str, snapshot: Snapshot, compat: bool = False):
        self.host, self.port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot, compat))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> tuple[str, int]:
        """(host, port) actually bound: port 0 becomes the port picked."""
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> None:
        self._server = _bind(self.host, self.port, _app(self.registry))
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="wgebpf-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()         # returns once serve_forever has left its loop
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None
