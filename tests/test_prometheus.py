"""A real Prometheus (Debian's `prometheus`) scrapes wgebpf while traffic flows.

    netns A: wgebpf (Metrics = 127.0.0.1:9586) <- prometheus (127.0.0.1:9090, scrape 1 s)
             |  tunnel over veth (wgebpf/lab/netns.py's TwoHosts)
    netns B: wireguard-go

The test asks Prometheus's HTTP API, from inside A, for each metric family
and checks the values moved as the traffic did; then it runs every PromQL
expression of dashboards/*.json, variables filled in, and wants data back.
A last test measures what a scrape every second costs the data plane
(printed, not asserted: the machine's noise is larger than the effect).
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

import pytest

from wgebpf.lab import netns
from wgebpf.control.metrics import DROP_REASONS, PEER_DROP_REASONS
from wgebpf.lab.netns import A_TUNNEL4, B_TUNNEL4

pytestmark = [pytest.mark.netns, pytest.mark.interop, pytest.mark.wgebpf_only]

METRICS = "127.0.0.1:9586"
PROMETHEUS = "127.0.0.1:9090"
SPOOFED = "203.0.113.9"            # not in B's AllowedIPs on A
DASHBOARDS = sorted((pathlib.Path(__file__).resolve().parent.parent / "dashboards").glob("*.json"))
# Families that appear only once the snapshot has their section ("policy",
# "xdp"): a dashboard query over them may come back empty until then.
OPTIONAL = ("wgebpf_source_policy_", "wgebpf_xdp_")

# Runs inside a namespace (the test itself stays in the root namespace):
# GETs each URL given on stdin, prints the bodies as a JSON list.
FETCH = """
import json, sys, urllib.request
out = []
for url in json.load(sys.stdin):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out.append(r.read().decode())
    except Exception as e:
        out.append(None)
print(json.dumps(out))
"""

# A scraper as light as can be, for the cost measurement: GET /metrics every
# second until killed; prints a line per scrape.
SCRAPER = """
import sys, time, urllib.request
while True:
    start = time.monotonic()
    urllib.request.urlopen(sys.argv[1], timeout=5).read()
    print("scraped", flush=True)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - start)))
"""


def fetch(ns: netns.Namespace, urls: list[str]) -> list[str | None]:
    out = ns.run([sys.executable, "-c", FETCH], input=json.dumps(urls), timeout=60)
    return json.loads(out.stdout)


class Prometheus:
    """`prometheus` in a namespace: generated config, TSDB in a temporary
    directory, web API on the namespace's loopback; stopped by its PID."""

    def __init__(self, ns: netns.Namespace, targets: list[str], interval: str = "1s"):
        self.ns = ns
        self.tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.config = self.tmpdir / "prometheus.yml"
        self.log_path = self.tmpdir / "log"
        self.config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: wgebpf\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "Prometheus":
        with open(self.log_path, "wb") as log:
            self.proc = self.ns.popen(
                ["prometheus", f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.tmpdir / 'data'}",
                 f"--web.listen-address={PROMETHEUS}"],
                stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            return fetch(self.ns, [f"http://{PROMETHEUS}/-/ready"])[0] is not None
        assert netns.wait_until(ready, timeout, 0.3), f"prometheus not ready:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        subprocess.run(["rm", "-rf", str(self.tmpdir)], check=False)

    def query(self, *exprs: str, at: float | None = None) -> list[list[dict]]:
        """Instant queries; each result is Prometheus's vector (a list of
        {"metric": labels, "value": [t, "v"]}), scalars as one sample."""
        urls = []
        for expr in exprs:
            params = {"query": expr}
            if at is not None:
                params["time"] = f"{at:.3f}"
            urls.append(f"http://{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode(params)}")
        results = []
        for expr, body in zip(exprs, fetch(self.ns, urls)):
            assert body is not None, f"query failed: {expr}"
            data = json.loads(body)
            assert data["status"] == "success", (expr, data)
            result = data["data"]["result"]
            if data["data"]["resultType"] == "scalar":
                result = [{"metric": {}, "value": result}]
            results.append(result)
        return results

    def value(self, expr: str, at: float | None = None) -> float:
        (result,) = self.query(expr, at=at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def scraped_after(self, moment: float) -> bool:
        """True once a scrape that started after `moment` is stored."""
        (result,) = self.query('timestamp(up{job="wgebpf"})')
        return bool(result) and float(result[0]["value"][1]) > moment


def wait_for_scrape(prometheus: Prometheus) -> None:
    moment = time.time()
    assert netns.wait_until(lambda: prometheus.scraped_after(moment + 0.2), 10, 0.3)


def start_pair(topo: netns.TwoHosts, extra: dict[str, str]):
    a_cfg, b_cfg = netns.side_configs()
    a_cfg.extra.update(extra)
    return netns.make_pair(topo, configs=(a_cfg, b_cfg))


def promql_regex(value: str) -> str:
    """A label value as Grafana puts a selected variable into `=~"..."`:
    regex-escaped, then escaped for a PromQL string."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", value).replace("\\", "\\\\")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query in every dashboard."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, panel["title"], target["expr"]))
    return out


def test_prometheus_sees_the_traffic(topo):
    a, b = start_pair(topo, {"Metrics": METRICS, "Workers": "2"})
    started = time.time()
    prometheus = Prometheus(topo.a, [METRICS]).start()
    try:
        check_idle(prometheus, a, b, since=started)
        check_families(topo, a, b, prometheus)
    except BaseException:
        print(f"===== prometheus log =====\n{prometheus.log()}")
        raise
    finally:
        prometheus.stop()


def check_idle(prometheus: Prometheus, a, b, since: float) -> None:
    """Right after the start, before any traffic: every known label set is
    there at 0, and every dashboard query has a series (issue 13)."""
    wait_for_scrape(prometheus)
    wait_for_scrape(prometheus)             # two samples: rate() has a value
    sel = f'job="wgebpf", interface="{a.ifname}"'
    peer = f'{sel}, public_key="{b.public_key}"'
    (drops,) = prometheus.query(f"wgebpf_dropped_packets_total{{{sel}}}")
    assert {r["metric"]["reason"] for r in drops} >= set(DROP_REASONS)
    (drops,) = prometheus.query(f"wgebpf_peer_dropped_packets_total{{{peer}}}")
    assert {r["metric"]["reason"]: float(r["value"][1]) for r in drops} == \
        {reason: 0 for reason in PEER_DROP_REASONS}
    (results,) = prometheus.query(f"wgebpf_peer_handshakes_total{{{peer}}}")
    assert sorted(r["metric"]["result"] for r in results) == ["completed", "failed"]
    assert prometheus.value(f"wgebpf_peer_sent_packets_total{{{peer}}}") == 0   # idle indeed
    (text,) = fetch(a.ns, [f"http://{METRICS}/metrics"])
    check_dashboards(prometheus, a.ifname, b.public_key, text, since=since, strict=True)


def check_families(topo, a, b, prometheus: Prometheus) -> None:
    iface, key_b = a.ifname, b.public_key
    sel = f'job="wgebpf", interface="{iface}"'
    peer = f'{sel}, public_key="{key_b}"'

    assert netns.ping(topo.a, B_TUNNEL4, count=3), "no traffic through the tunnel"
    wait_for_scrape(prometheus)
    before = time.time()
    sent_before = prometheus.value(f"wgebpf_peer_sent_bytes_total{{{peer}}}")
    received_before = prometheus.value(f"wgebpf_peer_received_bytes_total{{{peer}}}")

    # iperf3 both ways: A sends, then A receives.
    up, down = {}, {}
    netns.iperf3(topo.a, topo.b, B_TUNNEL4, seconds=3, result=up)
    netns.iperf3(topo.b, topo.a, A_TUNNEL4, seconds=3, port=5202, result=down)
    # A spoofing peer: B sends from an address A never gave it.
    b.ns.ip("addr", "add", f"{SPOOFED}/32", "dev", b.ifname)
    topo.b.run(["ping", "-n", "-c", "5", "-i", "0.2", "-w", "3", "-I", SPOOFED, A_TUNNEL4],
               check=False, timeout=15)
    wait_for_scrape(prometheus)

    # Bytes: WireGuard counts whole messages, so at least iperf3's payload.
    sent = prometheus.value(f"wgebpf_peer_sent_bytes_total{{{peer}}}") - sent_before
    received = prometheus.value(f"wgebpf_peer_received_bytes_total{{{peer}}}") - received_before
    assert sent >= up["end"]["sum_received"]["bytes"] > 0
    assert received >= down["end"]["sum_received"]["bytes"] > 0
    for name in ("received", "sent"):
        assert prometheus.value(f"wgebpf_peer_{name}_packets_total{{{peer}}}") > 1000

    # Handshakes: one completed within the last minute, and timed.
    assert prometheus.value(
        f'wgebpf_peer_handshakes_total{{{peer}, result="completed"}}') >= 1
    age = prometheus.value(f"time() - wgebpf_peer_latest_handshake_timestamp_seconds{{{peer}}}")
    assert -5 < age < 60
    assert prometheus.value(f"wgebpf_handshake_duration_seconds_count{{{sel}}}") >= 1
    assert 0 < prometheus.value(f"wgebpf_peer_keypair_age_seconds{{{peer}}}") < 120
    (info,) = prometheus.query(f"wgebpf_peer_info{{{peer}}}")
    assert info[0]["metric"]["endpoint"] == f"{netns.B_UNDERLAY4}:{netns.B_PORT}"
    assert prometheus.value(f"wgebpf_info{{{sel}}}") == 1

    # The spoofed pings were dropped by the source policy, and pinned on B.
    spoofed = 'reason="source_policy"'
    assert prometheus.value(f"wgebpf_dropped_packets_total{{{sel}, {spoofed}}}") >= 5
    assert prometheus.value(f"wgebpf_peer_dropped_packets_total{{{peer}, {spoofed}}}") >= 5
    (reasons,) = prometheus.query(f"wgebpf_dropped_packets_total{{{sel}}}")
    assert {r["metric"]["reason"] for r in reasons} >= set(DROP_REASONS)

    # Every worker reports; the one owning B did the crypto.
    (up_workers,) = prometheus.query(f"wgebpf_worker_up{{{sel}}} == 1")
    assert sorted(r["metric"]["worker"] for r in up_workers) == ["1", "2"]
    for family in ("wgebpf_worker_busy_seconds_total", "wgebpf_worker_queue_depth",
                   "wgebpf_worker_restarts_total", "wgebpf_worker_peers"):
        (result,) = prometheus.query(f"{family}{{{sel}}}")
        assert sorted(r["metric"]["worker"] for r in result) == ["1", "2"], family
    (busiest,) = prometheus.query(
        f'topk(1, wgebpf_worker_bytes_total{{{sel}, direction="sent"}})')
    assert float(busiest[0]["value"][1]) >= up["end"]["sum_received"]["bytes"]
    assert prometheus.value(
        f'sum(wgebpf_worker_busy_seconds_total{{{sel}}})') > 0.1

    # eBPF: the classifier steered A's packets to B's next hop.
    assert prometheus.value(f'wgebpf_classifier_packets_total{{{sel}, reason="peer"}}') > 1000
    assert prometheus.value(
        f'wgebpf_nexthop_bytes_total{{{sel}, nexthop="{B_TUNNEL4}", public_key="{key_b}"}}') \
        >= up["end"]["sum_received"]["bytes"]

    # No private key in anything served.
    (text,) = fetch(topo.a, [f"http://{METRICS}/metrics"])
    private = a.config.private_key
    for secret in (private, base64.b64decode(private).hex(), base64.b64decode(private).hex().upper()):
        assert secret not in text

    check_dashboards(prometheus, iface, key_b, text, since=before)


def check_dashboards(prometheus: Prometheus, iface: str, key_b: str, exposition: str,
                     since: float, strict: bool = False) -> None:
    """Every PromQL expression in dashboards/*.json returns data; strict:
    with no exception for the sections a snapshot may lack."""
    window = f"{int(time.time() - since) + 10}s"          # covers all the traffic above
    values = {"$instance": promql_regex(METRICS), "$interface": promql_regex(iface),
              "$peer": promql_regex(key_b), "$__rate_interval": window}
    queries = dashboard_queries()
    assert queries, "no dashboard queries found"
    exprs = []
    for _, _, expr in queries:
        for variable, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unfilled variable in {expr}"
        exprs.append(expr)
    empty = []
    for (name, title, _), expr, result in zip(queries, exprs, prometheus.query(*exprs)):
        if result:
            continue
        names = re.findall(r"\b(wgebpf_[a-z0-9_]+)", expr)
        waiting = not strict and all(n.startswith(OPTIONAL) and n not in exposition
                                     for n in names)
        empty.append((name, title, expr, "section not in the snapshot yet" if waiting else ""))
    moment = "right after the start" if strict else "after traffic"
    print(f"\ndashboard queries {moment}:", len(exprs), "returned data:", len(exprs) - len(empty))
    for name, title, expr, why in empty:
        print(f"  no data ({why or 'FAIL'}): {name} / {title}: {expr}")
    assert not [e for e in empty if not e[3]], "dashboard queries without data"


def test_scrape_cost_on_throughput(topo):
    """iperf3 A -> B with wgebpf scraped every second against not scraped,
    alternating, three runs each; prints the ratio of the medians."""
    a, b = start_pair(topo, {"Metrics": METRICS})
    assert netns.ping(topo.a, B_TUNNEL4, count=3)
    runs: dict[str, list[float]] = {"none": [], "scraped": []}
    scrapes = []
    for mode in ("none", "scraped") * 3:
        scraper = None
        if mode == "scraped":
            scraper = topo.a.popen([sys.executable, "-c", SCRAPER, f"http://{METRICS}/metrics"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(0.5)
        try:
            runs[mode].append(netns.iperf3(topo.a, topo.b, B_TUNNEL4, seconds=3))
        finally:
            if scraper is not None:
                scraper.send_signal(signal.SIGTERM)
                output = scraper.communicate(timeout=10)[0].decode()
                scrapes.append(output.count("scraped"))
    none, scraped = statistics.median(runs["none"]), statistics.median(runs["scraped"])
    print(f"\niperf3 A->B, Mbit/s: not scraped {[round(r / 1e6) for r in runs['none']]}, "
          f"scraped every 1 s {[round(r / 1e6) for r in runs['scraped']]} "
          f"({scrapes} scrapes); ratio of medians scraped/none = {scraped / none:.3f}")
    assert all(r > 0 for r in runs["none"] + runs["scraped"])
    assert all(n >= 3 for n in scrapes), scrapes
    print_cpu_per_scrape(topo, a)


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def print_cpu_per_scrape(topo, a, count: int = 200) -> None:
    """The direct measure, steadier than throughput on a busy machine: CPU
    time per scrape of the control plane and of the workers."""
    workers = [int(p) for p in pathlib.Path(
        f"/proc/{a.proc.pid}/task/{a.proc.pid}/children").read_text().split()]
    before = [cpu_seconds(p) for p in [a.proc.pid] + workers]
    script = ("import urllib.request\n"
              f"for _ in range({count}):\n"
              f"    urllib.request.urlopen('http://{METRICS}/metrics').read()\n")
    topo.a.run([sys.executable, "-c", script], timeout=120)
    after = [cpu_seconds(p) for p in [a.proc.pid] + workers]
    spent = [(y - x) / count * 1000 for x, y in zip(before, after)]
    print(f"CPU per scrape: control plane {spent[0]:.2f} ms, workers "
          f"{', '.join(f'{ms:.2f}' for ms in spent[1:])} ms")
