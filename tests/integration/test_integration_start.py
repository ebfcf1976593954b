"""What `run` refuses and warns of at its start, and what `status` then says, with real daemons
in host namespaces: a loopback underlay or public IP refused before any lease, forwarding off
(net.ipv4.ip_forward=0) warned of and shown, a udp node's drop reasons, the store's name in the
log."""

from __future__ import annotations

import json
import subprocess

import pytest

from flannel_udp.lab import Host, Topology, wait_until

pytestmark = pytest.mark.netns

NETWORK = "10.244.0.0/16"


def set_config(host: Host, store: str, backend: dict) -> None:
    host.flannel("network", "set", json.dumps({"Network": NETWORK, "Backend": backend}),
                 "--local-store", store)


def exit_code(host: Host, timeout: float = 15) -> int:
    assert host.daemon is not None
    try:
        return host.daemon.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run was not refused; its log ends:\n{host.log_tail(5)}")


@pytest.mark.parametrize("iface, extra, named", [
    ("lo", (), "--iface lo"),
    ("127.0.0.1", (), "--iface 127.0.0.1"),
    ("eth0", ("--public-ip", "127.0.0.1"), "--public-ip 127.0.0.1"),
])
def test_a_loopback_underlay_or_public_ip_is_refused_before_any_lease(topology, iface, extra,
                                                                       named):
    topo: Topology = topology(1)
    h1 = topo.host(1)
    set_config(h1, str(topo.store_path), {"Type": "udp"})
    store_before = topo.store_path.read_bytes()
    h1.start_flannel(topo.store_path, None, *extra, iface=iface)
    assert exit_code(h1) == 2
    log = h1.log_path.read_text()
    assert "Traceback" not in log
    last = h1.log_tail(1)
    assert named in last and "loopback" in last, last
    # Refused: no lease taken, no subnet file, no device.
    assert topo.store_path.read_bytes() == store_before
    assert not h1.subnet_file.exists()
    assert h1.link("flannel0") is None


@pytest.mark.parametrize("backend", [{"Type": "udp"}, {"Type": "vxlan"}, {"Type": "host-gw"}],
                         ids=["udp", "vxlan", "host-gw"])
def test_forwarding_off_is_warned_of_at_start_and_shown_by_status_not_refused(topology, backend):
    topo: Topology = topology(1)
    h1 = topo.host(1)
    h1.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    topo.start_daemons({"Network": NETWORK, "Backend": backend})  # it runs
    warnings = [line for line in h1.log_path.read_text().splitlines()
                if " W " in line and "net.ipv4.ip_forward" in line]
    assert len(warnings) == 1, h1.log_tail(20)
    assert "sysctl -w net.ipv4.ip_forward=1" in warnings[0]
    assert h1.status()["ip_forward"] is False
    text = h1.flannel("status", "--control-socket", h1.control_socket).stdout
    assert "net.ipv4.ip_forward=0" in text, text
    # status reads it when asked: turned on later, it says so.
    h1.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert h1.status()["ip_forward"] is True
    text = h1.flannel("status", "--control-socket", h1.control_socket).stdout
    assert "ip_forward" not in text, text


def test_a_udp_node_lists_only_the_drop_reasons_udp_can_count(topology):
    topo: Topology = topology(2)
    h1, h2 = topo.hosts
    udp_store, vxlan_store = str(topo.dir / "udp.msgpack"), str(topo.dir / "vxlan.msgpack")
    set_config(h1, udp_store, {"Type": "udp"})
    set_config(h2, vxlan_store, {"Type": "vxlan", "Dataplane": "userspace"})
    h1.start_flannel(udp_store)
    h2.start_flannel(vxlan_store)
    h1.wait_ready()
    h2.wait_ready()
    udp, vxlan = h1.status()["counters"], h2.status()["counters"]
    for key in ("drops", "ingress_drops", "egress_drops"):
        assert [r for r in udp[key] if r.startswith("vxlan_")] == [], udp[key]
        assert {"unknown_sender", "no_route", "ttl_expired"} <= set(udp[key])
        # The userspace vxlan node still counts them, under the same names.
        assert {"vxlan_short", "vxlan_wrong_vni", "unknown_sender"} <= set(vxlan[key])


def test_the_start_log_names_the_store_once_and_so_do_store_errors(topology):
    topo: Topology = topology(1)
    h1 = topo.host(1)
    topo.start_daemons()
    log = h1.log_path.read_text()
    assert str(topo.store_path) in log
    # A store that goes bad while the daemon runs: its error is logged, the daemon forwards on.
    topo.store_path.write_bytes(b"\x00garbage")
    wait_until(lambda: "corrupt" in h1.log_path.read_text(), 10, "the corrupt store logged")
    log = h1.log_path.read_text()
    assert "lease store: lease store" not in log, log
