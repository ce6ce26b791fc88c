"""Shared fixtures, built from wgebpf.lab.netns.

Test tiers: unmarked tests need nothing special. Tests marked `netns` need
root, `ip netns` and the real kernel; `interop` ones also run Debian's
wireguard-go as the peer.

`pytest --a-impl=wireguard-go` runs the interop tests with wireguard-go on
host A as well. That checks the tests themselves against a known-good
implementation; tests marked `wgebpf_only` (they drive wgebpf's own CLI or
test-only overrides) are deselected in that mode, not skipped.

wgebpf on A runs in several data-plane variants (A_VARIANTS). Every interop
test runs under the default, `PeerSelection = allowedips` and `Workers = 1`;
tests marked `variants` run under every variant, as test_x[workers2], ...
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from wgebpf.lab import netns

# Property-based fuzz tests (tests/test_fuzz_*.py): a bounded budget by
# default, so CI stays short; a long run with
#   ./scripts/test.sh tests/ -k fuzz --hypothesis-profile=long --hypothesis-show-statistics --timeout=0
# (the statistics show how many inputs each target tried). Every crash a
# run finds becomes an explicit @example or regression test.
settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=50_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

IMPLEMENTATIONS = ("wgebpf", "wireguard-go")

# wgebpf's own [Interface] keys for each variant of host A.
A_VARIANTS: dict[str, dict[str, str]] = {
    "default": {},                                  # PeerSelection nexthop, a worker per CPU
    "allowedips": {"PeerSelection": "allowedips"},  # classic peer selection
    "workers1": {"Workers": "1"},
    "workers2": {"Workers": "2"},
}


def pytest_addoption(parser):
    parser.addoption("--a-impl", default="wgebpf", choices=IMPLEMENTATIONS,
                     help="implementation on host A in the interop tests "
                          "(wireguard-go = check the tests against a reference)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "wgebpf_only: exercises wgebpf itself; deselected with --a-impl=wireguard-go")
    config.addinivalue_line(
        "markers", "variants: run once per wgebpf variant of host A (conftest.A_VARIANTS)")


# The whole interop suite runs under these; the `variants` subset also under
# the rest (Workers = 2 is the default on a 2-CPU machine anyway).
FULL_SUITE_VARIANTS = ("default", "allowedips", "workers1")


def pytest_generate_tests(metafunc):
    # wireguard-go on A has no variants.
    if ("a_variant" not in metafunc.fixturenames
            or metafunc.config.getoption("--a-impl") != "wgebpf"):
        return
    if metafunc.definition.get_closest_marker("variants"):
        metafunc.parametrize("a_variant", list(A_VARIANTS), indirect=True)
    elif metafunc.module.__name__ == "test_interop":
        metafunc.parametrize("a_variant", FULL_SUITE_VARIANTS, indirect=True)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--a-impl") == "wgebpf":
        return
    keep, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("wgebpf_only") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item so fixtures can see a failure.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def a_impl(request) -> str:
    """Session scope. Which implementation runs on host A (--a-impl)."""
    return request.config.getoption("--a-impl")


@pytest.fixture
def a_variant(request) -> str:
    """Function scope. The wgebpf variant on host A, a key of A_VARIANTS:
    "default" unless the test is marked `variants` and parametrized."""
    return getattr(request, "param", "default")


@pytest.fixture(scope="session")
def root() -> None:
    """Session scope. Fails (does not skip) when not root: netns tests need it."""
    assert os.geteuid() == 0, "network-namespace tests must run as root (sudo ./scripts/test.sh)"


@pytest.fixture
def topo(request, root) -> netns.TwoHosts:
    """Function scope; needs root. A fresh two-host topology (A and B joined
    by veth, see wgebpf/lab/netns.py), torn down after the test. When the test
    fails, every daemon's log is printed with the report."""
    hosts = netns.TwoHosts()
    try:
        yield hosts
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(hosts.logs())
        hosts.close()


@pytest.fixture
def make_pair(topo, a_impl, a_variant):
    """Function scope; needs `topo`. A factory: make_pair(**kwargs) starts A
    (the --a-impl implementation, in the `a_variant` variant) and B
    (wireguard-go) as each other's peer and returns (a, b). kwargs are those
    of wgebpf.lab.netns.make_pair: endpoints=a|b|both|none, family=4|6, psk=...,
    a_env={...}, configs=(...), a_extra={...}."""
    def factory(**kwargs):
        kwargs.setdefault("a_impl", a_impl)
        kwargs.setdefault("a_extra", A_VARIANTS[a_variant])
        a, b = netns.make_pair(topo, **kwargs)
        if a_variant != "default" and kwargs["a_impl"] == "wgebpf":
            _check_variant(a, A_VARIANTS[a_variant])
        return a, b
    return factory


def _check_variant(a: netns.Wgebpf, keys: dict[str, str]) -> None:
    # A variant that silently did not apply would pass as the default one.
    status = a.status()
    if "PeerSelection" in keys:
        assert status["peer_selection"] == keys["PeerSelection"], status
    if "Workers" in keys:
        assert len(status["workers"]) == int(keys["Workers"]), status["workers"]


@pytest.fixture
def host_c(topo) -> netns.Namespace:
    """Function scope; needs `topo`. A third namespace C routed behind B
    (203.0.113.3, 2001:db8:2::3), for roaming and extra-peer tests."""
    return topo.add_host_behind_b()
