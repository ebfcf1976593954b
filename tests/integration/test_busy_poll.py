"""`run --busy-poll USEC` end to end: daemons whose fast-path threads poll for 20 ms after each
packet carry pings and a TCP transfer intact, both backends, say so in `status`, count the
batches handled while polling, and still stop at once on SIGTERM. What it buys (latency) is
the bench's to show, not a test's."""

from __future__ import annotations

import time

import pytest
from helpers import userspace_config

from flannel_udp.lab import ping_failures

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_busy_polling_daemons_carry_traffic_and_stop(topology, backend):
    topo = topology(2)
    topo.start_daemons(userspace_config(backend), None, "--busy-poll", "20000")
    pods = {f"p{i}": topo.add_pod(host) for i, host in enumerate(topo.hosts)}
    failures = ping_failures(pods, count=20)
    assert not failures, "\n".join(failures)
    assert pods["p0"].tcp_transfer(pods["p1"], 7000, 20 << 20) == {
        "sent": 20 << 20, "received": 20 << 20, "intact": True}

    for host in topo.hosts:
        status = host.status()
        assert status["busy_poll_us"] == 20000
        counters = status["counters"]
        assert counters["busy_poll_batches"] > 0
        assert not any(counters["drops"].values()), counters["drops"]
    text = topo.hosts[0].flannel("status", "--control-socket",
                                 topo.hosts[0].control_socket).stdout
    assert "busy-poll 20000 us, " in text and " batches handled while polling" in text

    # Stop while a thread polls (traffic a moment ago): the stop signal ends the polling.
    pods["p0"].ping(pods["p1"].address, count=2)
    started = time.monotonic()
    assert topo.hosts[0].stop_flannel() == 0
    assert time.monotonic() - started < 5


def test_without_busy_poll_status_says_nothing_of_it(topology):
    topo = topology(2)
    topo.start_daemons()
    pods = {f"p{i}": topo.add_pod(host) for i, host in enumerate(topo.hosts)}
    assert not ping_failures(pods)
    status = topo.hosts[0].status()
    assert status["busy_poll_us"] == 0 and status["counters"]["busy_poll_batches"] == 0
    text = topo.hosts[0].flannel("status", "--control-socket",
                                 topo.hosts[0].control_socket).stdout
    assert "busy-poll" not in text


@pytest.mark.parametrize("backend, warning", [
    ({"Type": "host-gw"}, "--busy-poll: no effect on backend host-gw"),
    ({"Type": "vxlan", "Dataplane": "auto"},
     "--busy-poll: no effect on backend vxlan, which forwards in the kernel (Backend.Dataplane "
     '"userspace" has it)'),
], ids=["host-gw", "vxlan-auto-kernel"])
def test_busy_poll_on_a_kernel_dataplane_says_it_does_nothing(topology, backend, warning):
    topo = topology(2)
    topo.start_daemons({"Network": "10.244.0.0/16", "Backend": backend}, None,
                       "--busy-poll", "1000")
    pods = {f"p{i}": topo.add_pod(host) for i, host in enumerate(topo.hosts)}
    assert not ping_failures(pods)
    assert warning in topo.hosts[0].log_path.read_text()
