"""wgebpf/control/metrics.py, unit tier: a status snapshot -> exposition text, read
back with prometheus_client's own parser; the HTTP server on loopback; the
snapshot of two real in-memory devices. No root, no namespaces.
(tests/test_prometheus.py scrapes a live interface with a real Prometheus.)"""

from __future__ import annotations

import ast
import base64
import pathlib
import re
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memnet import ipv4_packet, pair
from wgebpf import __version__
from wgebpf.control import status
from wgebpf.control.metrics import (DROP_REASONS, PEER_DROP_REASONS, ZERO_SERIES_PEERS,
                                    MetricsServer, SnapshotCollector, parse_address)

KEY_B = base64.b64encode(bytes(range(32))).decode()
KEY_C = base64.b64encode(bytes(range(1, 33))).decode()

SNAPSHOT = {
    "interface": "wg0",
    "peer_selection": "nexthop",
    "source_policy": "allowedips",
    "listen_port": 51820,
    "peers": {
        KEY_B: {"slot": 1, "endpoint": "192.0.2.2:51821",
                "rx_bytes": 1000, "tx_bytes": 2000, "rx_packets": 10, "tx_packets": 20,
                "handshakes_completed": 3, "handshakes_failed": 1, "handshakes_sent": 4,
                "last_handshake_time": 1700000000.25, "keypair_age_seconds": 12.5,
                "source_policy": "allowedips",
                "allowed_ips": ["198.51.100.2/32", "2001:db8:100::2/128"],
                "drops": {"source_policy": 2, "no_session": 0}},
        KEY_C: {"slot": 2, "endpoint": None,
                "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0,
                "handshakes_completed": 0, "handshakes_failed": 0, "handshakes_sent": 0,
                "last_handshake_time": 0.0, "keypair_age_seconds": None,
                "source_policy": "off", "allowed_ips": [], "drops": {}},
    },
    "drops": {"no_peer": 5, "replay": 1, "something_new": 7},
    "handshake_duration_seconds": {"buckets": [[0.001, 0], [0.0025, 2], [0.005, 3],
                                               ["+Inf", 3]],
                                   "sum": 0.009, "count": 3},
    "workers": [
        {"worker": 1, "pid": 100, "peers": 2, "restarts": 0, "busy_seconds": 1.5,
         "queue_depth": 4, "rx_bytes": 1000, "tx_bytes": 2000, "rx_packets": 10,
         "tx_packets": 20, "alive": True, "packets_by_slot": {1: 30}},
        {"worker": 2, "pid": None, "peers": 2, "restarts": 3, "busy_seconds": 0.25,
         "queue_depth": 0, "alive": False, "packets_by_slot": {}},   # never reported traffic
    ],
    "classifier": {"peer": 30, "no_peer": 5, "fib_unreachable": 1},
    "classifier_route": {"mode": "route", "mode_reason": None, "dst": 28,
                         "fallbacks": {"no_dst": 2}},
    "nexthops": {"198.51.100.2": {"packets": 30, "bytes": 3000, "public_key": KEY_B},
                 "2001:db8:100::9": {"packets": 1, "bytes": 80, "public_key": None}},
    "policy": {"1": {"accept": 10, "drop": 2}, 2: {"accept": 1}, "9": {"drop": 4}},
    "xdp": {"pass": 50, "bad_size": 3},
}


def scrape(snapshot: dict, compat: bool = False) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot, compat))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, frozenset of label items): value} from exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def L(**labels) -> frozenset:
    return frozenset(labels.items())


@pytest.fixture(scope="module")
def exposed() -> dict:
    return samples(scrape(SNAPSHOT))


B, C = dict(interface="wg0", public_key=KEY_B), dict(interface="wg0", public_key=KEY_C)
W1, W2 = dict(interface="wg0", worker="1"), dict(interface="wg0", worker="2")

EXPECTED = [
    ("wgebpf_info", L(interface="wg0", version=__version__, peer_selection="nexthop",
                      source_policy="allowedips", listen_port="51820"), 1),
    ("wgebpf_peer_received_bytes_total", L(**B), 1000),
    ("wgebpf_peer_sent_bytes_total", L(**B), 2000),
    ("wgebpf_peer_received_packets_total", L(**B), 10),
    ("wgebpf_peer_sent_packets_total", L(**B), 20),
    ("wgebpf_peer_sent_packets_total", L(**C), 0),
    ("wgebpf_peer_handshake_initiations_total", L(**B), 4),
    ("wgebpf_peer_handshakes_total", L(**B, result="completed"), 3),
    ("wgebpf_peer_handshakes_total", L(**B, result="failed"), 1),
    ("wgebpf_peer_latest_handshake_timestamp_seconds", L(**B), 1700000000.25),
    ("wgebpf_peer_latest_handshake_timestamp_seconds", L(**C), 0),      # never
    ("wgebpf_peer_keypair_age_seconds", L(**B), 12.5),
    ("wgebpf_peer_info", L(**B, endpoint="192.0.2.2:51821", slot="1",
                           allowed_ips="198.51.100.2/32,2001:db8:100::2/128",
                           source_policy="allowedips"), 1),
    ("wgebpf_peer_info", L(**C, endpoint="", slot="2", allowed_ips="",
                           source_policy="off"), 1),
    ("wgebpf_peer_dropped_packets_total", L(**B, reason="source_policy"), 2),
    ("wgebpf_peer_dropped_packets_total", L(**B, reason="no_session"), 0),
    ("wgebpf_dropped_packets_total", L(interface="wg0", reason="no_peer"), 5),
    ("wgebpf_dropped_packets_total", L(interface="wg0", reason="replay"), 1),
    ("wgebpf_dropped_packets_total", L(interface="wg0", reason="auth_failed"), 0),  # known, 0
    ("wgebpf_dropped_packets_total", L(interface="wg0", reason="something_new"), 7),
    ("wgebpf_worker_packets_total", L(**W1, direction="received"), 10),
    ("wgebpf_worker_packets_total", L(**W1, direction="sent"), 20),
    ("wgebpf_worker_bytes_total", L(**W1, direction="received"), 1000),
    ("wgebpf_worker_bytes_total", L(**W1, direction="sent"), 2000),
    ("wgebpf_worker_bytes_total", L(**W2, direction="sent"), 0),
    ("wgebpf_worker_busy_seconds_total", L(**W1), 1.5),
    ("wgebpf_worker_queue_depth", L(**W1), 4),
    ("wgebpf_worker_restarts_total", L(**W2), 3),
    ("wgebpf_worker_up", L(**W1), 1),
    ("wgebpf_worker_up", L(**W2), 0),
    ("wgebpf_worker_peers", L(**W1), 2),          # every worker serves every peer
    ("wgebpf_worker_peers", L(**W2), 2),
    ("wgebpf_classifier_packets_total", L(interface="wg0", reason="peer"), 30),
    ("wgebpf_classifier_packets_total", L(interface="wg0", reason="fib_unreachable"), 1),
    ("wgebpf_classifier_info", L(interface="wg0", mode="route"), 1),
    ("wgebpf_nexthop_route_reads_total", L(interface="wg0"), 28),
    ("wgebpf_nexthop_fallbacks_total", L(interface="wg0", reason="no_dst"), 2),
    ("wgebpf_nexthop_fallbacks_total", L(interface="wg0", reason="other_device"), 0),
    ("wgebpf_nexthop_packets_total", L(interface="wg0", nexthop="198.51.100.2",
                                       public_key=KEY_B), 30),
    ("wgebpf_nexthop_bytes_total", L(interface="wg0", nexthop="198.51.100.2",
                                     public_key=KEY_B), 3000),
    ("wgebpf_nexthop_bytes_total", L(interface="wg0", nexthop="2001:db8:100::9",
                                     public_key=""), 80),
    ("wgebpf_source_policy_packets_total", L(**B, verdict="accept"), 10),
    ("wgebpf_source_policy_packets_total", L(**B, verdict="drop"), 2),
    ("wgebpf_source_policy_packets_total", L(**C, verdict="accept"), 1),     # int slot key
    ("wgebpf_source_policy_packets_total", L(interface="wg0", public_key="",
                                             verdict="drop"), 4),          # slot of no peer
    ("wgebpf_xdp_packets_total", L(interface="wg0", reason="bad_size"), 3),
    ("wgebpf_handshake_duration_seconds_bucket", L(interface="wg0", le="0.0025"), 2),
    ("wgebpf_handshake_duration_seconds_bucket", L(interface="wg0", le="+Inf"), 3),
    ("wgebpf_handshake_duration_seconds_count", L(interface="wg0"), 3),
    ("wgebpf_handshake_duration_seconds_sum", L(interface="wg0"), 0.009),
]


@pytest.mark.parametrize("name, labels, value", EXPECTED,
                         ids=[f"{n}{dict(l).get('reason') or dict(l).get('result') or ''}"
                              for n, l, _ in EXPECTED])
def test_sample(exposed, name, labels, value):
    assert exposed[name, labels] == pytest.approx(value)


def test_types_follow_the_naming_rules():
    kinds = types(scrape(SNAPSHOT))
    for name, kind in kinds.items():
        assert name.startswith("wgebpf_"), name
        # the parser strips _total from counter family names
        if name.endswith(("_bytes", "_packets", "_seconds_total")) or kind == "counter":
            assert kind == "counter", (name, kind)
    assert kinds["wgebpf_handshake_duration_seconds"] == "histogram"
    assert kinds["wgebpf_peer_latest_handshake_timestamp_seconds"] == "gauge"
    text = scrape(SNAPSHOT)
    counters = {n for n, k in kinds.items() if k == "counter"}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            if name.removesuffix("_total") in counters:
                assert name.endswith("_total"), line


def test_endpoint_only_on_the_info_metric(exposed):
    with_endpoint = {name for name, labels in exposed if "endpoint" in dict(labels)}
    assert with_endpoint == {"wgebpf_peer_info"}


def test_no_keypair_no_age_sample(exposed):
    assert ("wgebpf_peer_keypair_age_seconds", L(**C)) not in exposed


def test_every_known_drop_reason_is_exported_from_the_start():
    text = scrape({"interface": "wg0", "peers": {}, "drops": {}})
    reasons = {dict(labels)["reason"] for name, labels in samples(text)
               if name == "wgebpf_dropped_packets_total"}
    assert reasons == set(DROP_REASONS)


def test_every_fallback_reason_is_exported_from_the_start():
    text = scrape({"interface": "wg0", "peers": {}, "drops": {},
                   "classifier_route": {"mode": "lookup", "dst": 0, "fallbacks": {}}})
    reasons = {dict(labels)["reason"]: value for (name, labels), value in
               samples(text).items() if name == "wgebpf_nexthop_fallbacks_total"}
    assert reasons == {"no_dst": 0, "foreign_dst": 0, "other_device": 0, "read_failed": 0}


def test_show_says_the_classifier_mode_and_its_fallbacks():
    from wgebpf.control.show import render
    extra = dict(SNAPSHOT, peers={})
    text = render("wg0", {"peers": []}, now=0, extra=extra)
    assert ("  classifier: route (next hop read from the kernel's route); "
            "fallbacks: 2 no_dst\n") in text
    extra["classifier_route"] = {"mode": "lookup", "mode_reason": "no BTF", "fallbacks": {}}
    assert "  classifier: lookup (FIB lookup per packet): no BTF\n" in \
        render("wg0", {"peers": []}, now=0, extra=extra)


def test_optional_sections_are_absent_when_the_snapshot_lacks_them():
    kinds = types(scrape({"interface": "wg0", "peers": {}, "drops": {}}))
    for family in ("wgebpf_classifier_packets", "wgebpf_nexthop_packets",
                   "wgebpf_nexthop_fallbacks", "wgebpf_classifier",
                   "wgebpf_source_policy_packets", "wgebpf_xdp_packets",
                   "wireguard_sent_bytes"):
        assert family not in kinds


ROOT = pathlib.Path(__file__).resolve().parent.parent / "wgebpf"


def drop_calls() -> list[tuple[str, str, int]]:
    """(reason, file:line, number of arguments) for every drop("...", ...)
    or x.drop("...", ...) call in wgebpf/ whose reason is a string literal."""
    calls = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "drop" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                calls.append((node.args[0].value, where, len(node.args) + len(node.keywords)))
    return calls


def test_drop_reasons_cover_the_source():
    """Every reason the code counts a drop for is in DROP_REASONS (so it is
    exported at 0 from the start, and documented)."""
    calls = drop_calls()
    assert len(calls) > 20, "the scan found few drop() calls: did the code change shape?"
    missing = {(reason, where) for reason, where, _ in calls if reason not in DROP_REASONS}
    assert not missing, f"drop reasons missing from metrics.DROP_REASONS: {sorted(missing)}"
    # The ones not counted through drop(): drops["..."], the worker's send and
    # TUN write errors, the kernel's tx_dropped (status.tun_queue_drops).
    counted = set()
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        counted |= set(re.findall(r"drops\[\"([a-z_0-9]+)\"\]", text))
        counted |= set(re.findall(r"\(\"([a-z_0-9]+)\", self\.(?:conn|tun)\.take_", text))
        counted |= set(re.findall(r"\{\"([a-z_0-9]+)\": int\(f\.read\(\)\)\}", text))
    assert {"udp_send_failed", "tun_write_failed", "queue_full"} <= counted, \
        "the worker-only reasons were not found: did the code change shape?"
    assert counted <= set(DROP_REASONS), counted - set(DROP_REASONS)
    readme = (ROOT.parent / "README.md").read_text()
    readme = readme[readme.index("\n## Metrics\n"):]
    readme = readme[:readme.index("\n## ", 1)]
    for reason in DROP_REASONS:
        assert f"`{reason}`" in readme, f"README's Metrics section lacks drop reason {reason}"


def test_peer_drop_reasons_cover_the_source():
    """Every drop("...", peer) reason is in PEER_DROP_REASONS, so each peer
    has its series from the start; and PEER_DROP_REASONS names no reason that
    never belongs to a peer."""
    with_peer = {reason for reason, _, arguments in drop_calls() if arguments >= 2}
    assert "replay" in with_peer and "malformed" not in with_peer
    with_peer.add("source_policy")           # status.add_policy_counters
    assert with_peer == set(PEER_DROP_REASONS), \
        (with_peer - set(PEER_DROP_REASONS), set(PEER_DROP_REASONS) - with_peer)
    assert len(set(PEER_DROP_REASONS)) == len(PEER_DROP_REASONS)


def test_every_known_label_set_is_exported_from_the_start():
    """A snapshot as a fresh interface gives it (no traffic, nothing
    counted): every peer has every peer drop reason, every handshake result
    and its host AllowedIPs as next hops, at 0; every worker each direction."""
    idle = {"interface": "wg0", "drops": {},
            "peers": {KEY_B: {"slot": 1, "drops": {},
                              "allowed_ips": ["198.51.100.2/32", "2001:db8:100::2/128",
                                              "198.51.100.0/24"]},
                      KEY_C: {"slot": 2, "allowed_ips": []}},
            "workers": [{"worker": 1, "alive": True}, {"worker": 2, "alive": True}],
            "nexthops": {}}
    exposed = samples(scrape(idle))
    for key in (KEY_B, KEY_C):
        for reason in PEER_DROP_REASONS:
            assert exposed["wgebpf_peer_dropped_packets_total",
                           L(interface="wg0", public_key=key, reason=reason)] == 0
        for result in ("completed", "failed"):
            assert exposed["wgebpf_peer_handshakes_total",
                           L(interface="wg0", public_key=key, result=result)] == 0
    for worker in ("1", "2"):
        for direction in ("received", "sent"):
            assert exposed["wgebpf_worker_packets_total",
                           L(interface="wg0", worker=worker, direction=direction)] == 0
    nexthops = {dict(labels)["nexthop"]: (dict(labels)["public_key"], value)
                for (name, labels), value in exposed.items()
                if name == "wgebpf_nexthop_packets_total"}
    assert nexthops == {"198.51.100.2": (KEY_B, 0), "2001:db8:100::2": (KEY_B, 0)}
    peer_reasons = {dict(labels)["reason"] for name, labels in exposed
                    if name == "wgebpf_peer_dropped_packets_total"}
    assert peer_reasons == set(PEER_DROP_REASONS)


def test_at_scale_per_peer_zeros_are_left_out_and_the_rest_stays():
    """Above ZERO_SERIES_PEERS peers a scrape carries no per-peer series that
    are 0 (drops by reason, next hops without traffic, source-policy
    verdicts), keeps every peer's traffic and handshake series, and keeps
    what is not 0."""
    many = ZERO_SERIES_PEERS + 1
    peers = {f"key{i}": {"slot": i + 1, "rx_bytes": 0, "drops": {},
                         "allowed_ips": [f"2001:db8:100::{i:x}/128"]} for i in range(many)}
    peers["key0"]["drops"] = {"replay": 3}
    status = {"interface": "wg0", "drops": {}, "peers": peers, "workers": [],
              "nexthops": {"2001:db8:100::1": {"packets": 7, "bytes": 700, "public_key": "key1"}},
              "policy": {"1": {"accepted": 5, "dropped_allowedips": 0},
                         "2": {"accepted": 0, "dropped_allowedips": 0}}}
    exposed = samples(scrape(status))
    drops = {(dict(labels)["public_key"], dict(labels)["reason"]): value
             for (name, labels), value in exposed.items()
             if name == "wgebpf_peer_dropped_packets_total"}
    assert drops == {("key0", "replay"): 3}
    nexthops = [labels for name, labels in exposed if name == "wgebpf_nexthop_packets_total"]
    assert len(nexthops) == 1
    verdicts = {dict(labels)["public_key"]: value for (name, labels), value in exposed.items()
                if name == "wgebpf_source_policy_packets_total"}
    assert verdicts == {"key0": 5}
    received = [labels for name, labels in exposed
                if name == "wgebpf_peer_received_bytes_total"]
    assert len(received) == many


def test_counted_next_hops_replace_their_zero():
    exposed = samples(scrape(dict(SNAPSHOT)))
    assert exposed["wgebpf_nexthop_packets_total", L(interface="wg0", nexthop="198.51.100.2",
                                                     public_key=KEY_B)] == 30
    assert exposed["wgebpf_nexthop_packets_total",
                   L(interface="wg0", nexthop="2001:db8:100::2", public_key=KEY_B)] == 0


# ---- compatibility names (MindFlavor's prometheus_wireguard_exporter) ---------

def test_compat_names_only_when_asked():
    assert "wireguard_sent_bytes" not in types(scrape(SNAPSHOT))
    exposed = samples(scrape(SNAPSHOT, compat=True))
    compat = dict(interface="wg0", public_key=KEY_B,
                  allowed_ips="198.51.100.2/32,2001:db8:100::2/128")
    assert exposed["wireguard_sent_bytes_total", L(**compat)] == 2000
    assert exposed["wireguard_received_bytes_total", L(**compat)] == 1000
    # A Unix timestamp in whole seconds, as that exporter writes it.
    assert exposed["wireguard_latest_handshake_seconds", L(**compat)] == 1700000000


# ---- a real device's snapshot ------------------------------------------------

def test_real_device_snapshot_counts_and_hides_the_private_key():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    replayed = [d for d, _, t in network.sent_log if d[0] == 4 and t == b.conn.address][-1]
    b.device.on_datagram(replayed, a.conn.address)                        # a replay
    text = scrape(status.collect(b.device), compat=True)
    exposed = samples(text)
    key_a = base64.b64encode(a.public_key).decode()
    peer = L(interface="mem", public_key=key_a)
    assert exposed["wgebpf_dropped_packets_total", L(interface="mem", reason="replay")] == 1
    assert exposed["wgebpf_peer_dropped_packets_total", L(**dict(peer), reason="replay")] == 1
    assert exposed["wgebpf_peer_received_packets_total", peer] == 2
    assert exposed["wgebpf_peer_handshakes_total", L(**dict(peer), result="completed")] == 1
    assert exposed["wgebpf_handshake_duration_seconds_count", L(interface="mem")] == 0
    # A, the initiator, timed its handshake.
    exposed_a = samples(scrape(status.collect(a.device)))
    assert exposed_a["wgebpf_handshake_duration_seconds_count", L(interface="mem")] == 1
    for host in (a, b):
        for secret in (base64.b64encode(host.private_key).decode(), host.private_key.hex(),
                       host.private_key.hex().upper()):
            assert secret not in text
            assert secret not in scrape(status.collect(host.device), compat=True)


# ---- the HTTP server -----------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9586", ("127.0.0.1", 9586)),
    ("[::1]:9586", ("::1", 9586)),
    ("[2001:db8::1]:1", ("2001:db8::1", 1)),
    (":9586", ("", 9586)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9586", "::1:9586", "127.0.0.1:x", "127.0.0.1:70000",
                                  "[::1]9586"])
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


def fetch(host: str, port: int) -> str:
    url_host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{url_host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def refused(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) != 0


@pytest.mark.parametrize("address, reach", [
    ("127.0.0.1:0", ["127.0.0.1"]),
    ("[::1]:0", ["::1"]),
    (":0", ["127.0.0.1", "::1"]),          # every address, both families
])
def test_server_serves_each_scrape_fresh_and_stops(address, reach):
    calls = []

    def snapshot():
        calls.append(1)
        return dict(SNAPSHOT, drops={"no_peer": len(calls)})

    server = MetricsServer(address, snapshot)
    server.start()
    port = server.bound[1]
    try:
        for n, host in enumerate(reach, start=1):
            exposed = samples(fetch(host, port))
            # snapshot() runs at scrape time, once per scrape
            assert exposed["wgebpf_dropped_packets_total",
                           L(interface="wg0", reason="no_peer")] == n
            # its own registry: no process_* or python_* collectors
            assert not any(name.startswith(("process_", "python_")) for name, _ in exposed)
    finally:
        server.stop()
    assert all(refused(host, port) for host in reach)
    server.stop()                          # twice is harmless (take-down may repeat)


def test_a_failing_snapshot_fails_the_scrape_not_the_server(caplog):
    state = {"fail": True}

    def snapshot():
        if state["fail"]:
            raise RuntimeError("worker round trip failed")
        return SNAPSHOT

    server = MetricsServer("127.0.0.1:0", snapshot)
    server.start()
    try:
        host, port = server.bound
        with pytest.raises(urllib.error.HTTPError) as error:
            fetch(host, port)
        assert error.value.code == 500
        assert "scrape failed: RuntimeError: worker round trip failed" in caplog.text
        state["fail"] = False
        assert "wgebpf_info" in fetch(host, port)
    finally:
        server.stop()


# ---- the Grafana dashboard (structure; tests/test_prometheus.py runs its queries) ----

DASHBOARDS = sorted((pathlib.Path(__file__).resolve().parent.parent / "dashboards").glob("*.json"))
METRIC = re.compile(r"\b((?:wgebpf|wireguard)_[a-z0-9_]+)\b")


def walk(node, path=()):
    """(path, key, value) for every key of every dict in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, path + (i,))


def expressions(dashboard: dict) -> list[str]:
    return [value for _, key, value in walk(dashboard) if key == "expr"]


def panel(dashboard: dict, title: str) -> dict:
    (found,) = [p for p in dashboard["panels"] if p.get("title") == title]
    return found


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request) -> dict:
    import json
    return json.loads(request.param.read_text())


def test_there_is_a_dashboard():
    assert [p.name for p in DASHBOARDS] == ["wgebpf.json"]


def test_dashboard_imports_anywhere(dashboard):
    assert dashboard["id"] is None
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    (ds_input,) = dashboard["__inputs"]
    assert (ds_input["name"], ds_input["type"], ds_input["pluginId"]) == \
        ("DS_PROMETHEUS", "datasource", "prometheus")
    sources = [value for _, key, value in walk(dashboard) if key == "datasource"]
    assert sources and all(value == "${DS_PROMETHEUS}" for value in sources)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["instance", "interface", "peer"]
    for variable in variables.values():
        assert variable["query"]["query"].startswith("label_values(")
    assert variables["peer"]["query"]["query"].endswith(", public_key)")
    for expr in expressions(dashboard):
        if "wgebpf_" in expr:
            assert 'instance=~"$instance"' in expr and 'interface=~"$interface"' in expr, expr


def test_dashboard_queries_name_exported_metrics(dashboard):
    exported = {name for name, _ in samples(scrape(SNAPSHOT))}
    for expr in expressions(dashboard):
        for name in METRIC.findall(expr):
            assert name in exported, (name, expr)


def test_dashboard_counters_go_through_rate_or_increase(dashboard):
    counters = re.compile(r"\b(wgebpf_[a-z0-9_]+_total)\b")
    for expr in expressions(dashboard):
        for match in counters.finditer(expr):
            before = expr[:match.start()]
            assert re.search(r"(rate|increase)\($", before), expr


def test_dashboard_throughput_and_handshake_panels(dashboard):
    received, sent = [t["expr"] for t in panel(dashboard, "Throughput per peer")["targets"]]
    assert "received_bytes_total" in received and not received.startswith("-")
    assert "sent_bytes_total" in sent and sent.startswith("-")        # below the axis
    handshake = panel(dashboard, "Time since the latest handshake")
    assert handshake["targets"][0]["expr"].startswith("time() - ")
    steps = handshake["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["color"], s["value"]) for s in steps] == \
        [("green", None), ("orange", 135), ("red", 180)]
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Drops by reason", "Traffic per next hop", "ECMP members: share of packets per peer",
            "Worker busy", "Worker queue depth", "Worker restarts", "Classifier verdicts",
            "Source policy verdicts", "XDP underlay guard"} <= titles
