"""Shared fixtures: namespace topologies and etcd clusters that are always removed, and the
skip of the `netns`-marked tests on machines without root, /dev/net/tun or `ip netns`.

Under CI (`CI=true`) or with `FLANNEL_UDP_NO_SKIP=1` a skipped test fails instead, naming why
it would have skipped: a green run there means every test ran."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flannel_udp.lab import (
    EtcdCluster,
    Topology,
    check_environment,
    etcd_problem,
    remove_stale,
    remove_stale_etcd,
)

NETNS_PROBLEM = check_environment()
NO_SKIP = (os.environ.get("CI", "").lower() == "true"
           or os.environ.get("FLANNEL_UDP_NO_SKIP", "") not in ("", "0"))

# Topologies alive right now, so that a failing test's report carries the daemon logs (they are
# deleted with the topology's temp dir at teardown).
_live_topologies: list[Topology] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if NETNS_PROBLEM is None:
        return
    skip = pytest.mark.skip(reason=f"integration test: {NETNS_PROBLEM}")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped, which fails the run under CI=true or "
                           f"FLANNEL_UDP_NO_SKIP=1: {reason}")
    if report.failed and _live_topologies:
        logs = "\n".join(t.log_tails(40) for t in _live_topologies).strip()
        if logs:
            report.sections.append(("flannel-udp daemon logs", logs))


@pytest.fixture(scope="session")
def netns_session() -> Iterator[None]:
    """Once per session: skip without namespaces, and clear what dead earlier runs left."""
    if NETNS_PROBLEM is not None:
        pytest.skip(NETNS_PROBLEM)
    remove_stale()
    yield


def _topologies() -> Iterator[Callable[..., Topology]]:
    made: list[Topology] = []

    def make(hosts: int = 3, **kwargs: Any) -> Topology:
        topo = Topology(hosts, **kwargs)
        made.append(topo)
        _live_topologies.append(topo)
        return topo

    try:
        yield make
    finally:
        for topo in made:
            topo.cleanup()
            _live_topologies.remove(topo)
        leftovers = [n for topo in made for n in topo.leftovers()]
        assert not leftovers, f"cleanup left namespaces behind: {leftovers}"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """A one-member etcd on free loopback ports for one module's tests; its process and data
    dir are removed afterwards. Skips where etcd is not installed."""
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    remove_stale_etcd()
    with EtcdCluster(1) as cluster:
        yield cluster.start()


@pytest.fixture
def topology(netns_session: None) -> Iterator[Callable[..., Topology]]:
    """A factory `topology(hosts=3) -> Topology`; everything it made is removed after the test,
    passed or failed."""
    yield from _topologies()


@pytest.fixture(scope="module")
def module_topology(netns_session: None) -> Iterator[Callable[..., Topology]]:
    """Like `topology`, for a topology shared by the tests of one module."""
    yield from _topologies()
