"""A refused start changes nothing. A daemon runs in h1 (udp backend, /healthz on); a second one
is started beside it with what a copy-paste gives (the same --control-socket, the same
--subnet-file, the same ports) and must exit non-zero with one line, leaving the running node's
subnet.env byte for byte as it was, the embedded store without a new lease, and the running
node serving. The same for every other thing that can refuse a start: the health port, the UDP
port, a TUN name held by another process, the kernel VXLAN device of a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import fetch, refused_run, stored_leases

from flannel_udp import control
from flannel_udp.lab import FLANNEL_UDP, Host, Topology, wait_until
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

UDP_CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}
HEALTHZ = "http://127.0.0.1:9109/healthz"
# Holds TUN flannel0 until killed, as another program of the host might.
HOLD_TUN = """
import pytun, time
tun = pytun.TunTapDevice(name="flannel0", flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
print("held", flush=True)
time.sleep(120)
"""


@dataclass
class Running:
    topo: Topology
    host: Host  # h1, with a daemon
    spare: Host  # h2, no daemon


@pytest.fixture(scope="module")
def running(module_topology) -> Running:
    topo = module_topology(2)
    h1, h2 = topo.hosts
    topo.start_daemons(UDP_CONFIG, [h1], "--healthz-ip", "127.0.0.1", "--healthz-port", "9109")
    return Running(topo, h1, h2)


def start_second(host: Host, store: Path, *args: str | Path) -> str:
    """Start `flannel-udp run` with `args` in `host`; it must refuse: its one error line."""
    return refused_run(host, "--local-store", store, "--iface", "eth0", *args, exit_code=None,
                       timeout=30)


def check_nothing_changed(cluster: Running, before: tuple[bytes, dict[str, bytes], dict]) -> None:
    env, table, lease = before
    h1 = cluster.host
    assert h1.subnet_file.read_bytes() == env
    assert stored_leases(cluster.topo.store_path) == table
    assert h1.lease() == lease
    assert fetch(h1, HEALTHZ) == (200, "ok\n")


def snapshot(cluster: Running) -> tuple[bytes, dict[str, bytes], dict]:
    return (cluster.host.subnet_file.read_bytes(), stored_leases(cluster.topo.store_path),
            cluster.host.lease())


# Where the second daemon runs ("other": another namespace, as one daemon per namespace runs),
# its subnet file and control socket ("same": the running one's), more flags, what it must say.
SECOND = {
    # The copy-paste of issue 11: another namespace, the same files and flags.
    "copy-paste": ("other", "same", "same", ["--healthz-ip", "127.0.0.1", "--healthz-port",
                                             "9109"],
                   "subnet file {subnet_file} is in use by another running flannel-udp"),
    "same-subnet-file": ("other", "same", "other", [],
                         "subnet file {subnet_file} is in use by another running flannel-udp"),
    "same-control-socket": ("other", "other", "same", [],
                            "control socket {control_socket} is served by another running"),
    # Beside it in its namespace: what the namespace has once.
    "healthz-port": ("same", "other", "other", ["--healthz-ip", "127.0.0.1", "--healthz-port",
                                                "9109"],
                     "--healthz-port 9109: address 127.0.0.1:9109 is already in use"),
    "udp-port": ("same", "other", "other", [], "UDP port 8285 is already in use"),
}


@pytest.mark.parametrize("case", list(SECOND))
def test_a_second_daemon_beside_a_running_one_is_refused_and_changes_nothing(running, case):
    h1 = running.host
    where, subnet_file, control_socket, extra, expected = SECOND[case]
    host = h1 if where == "same" else running.spare
    other_env, other_sock = host.dir / "second.env", host.dir / "second.sock"
    before = snapshot(running)
    line = start_second(
        host, running.topo.store_path,
        "--subnet-file", h1.subnet_file if subnet_file == "same" else other_env,
        "--control-socket", h1.control_socket if control_socket == "same" else other_sock,
        *extra)
    check_nothing_changed(running, before)
    assert expected.format(subnet_file=h1.subnet_file,
                           control_socket=h1.control_socket) in line, line
    assert not other_env.exists() and not other_sock.exists()
    assert running.spare.link("flannel0") is None


def test_a_tun_name_held_by_another_process_refuses_the_start_and_changes_nothing(running):
    h2 = running.spare
    holder = h2.popen(sys.executable, "-c", HOLD_TUN, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(running)
        line = start_second(h2, running.topo.store_path, "--subnet-file", h2.subnet_file,
                            "--control-socket", h2.control_socket)
        assert "TUN flannel0 is in use" in line, line
        check_nothing_changed(running, before)
        assert not h2.subnet_file.exists() and not h2.control_socket.exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_kernel_vxlan_device_of_a_running_daemon_is_left_alone(topology):
    topo: Topology = topology(1)
    h1 = topo.hosts[0]
    topo.start_daemons({"Network": "10.244.0.0/16",
                        "Backend": {"Type": "vxlan", "Dataplane": "kernel"}}, [h1])
    device = h1.link("flannel.1")
    assert device is not None
    env, table = h1.subnet_file.read_bytes(), stored_leases(topo.store_path)
    for dataplane_config in ("kernel", "auto"):
        config = topo.write_net_config({"Network": "10.244.0.0/16", "Backend": {
            "Type": "vxlan", "Dataplane": dataplane_config}}, f"{dataplane_config}.json")
        store = topo.dir / f"{dataplane_config}-store"
        line = start_second(h1, store, "--net-config-path", config,
                            "--subnet-file", h1.dir / "second.env",
                            "--control-socket", h1.dir / "second.sock")
        assert "VXLAN device flannel.1 is in use by another running flannel-udp" in line, line
        assert stored_leases(store) == {}
    after = h1.link("flannel.1")
    assert after is not None and after["ifindex"] == device["ifindex"]
    assert h1.subnet_file.read_bytes() == env and stored_leases(topo.store_path) == table
    assert not (h1.dir / "second.env").exists()


def test_daemons_in_two_namespaces_get_their_own_control_socket_by_default(topology):
    """No --control-socket: each namespace named by `ip netns` has its own default, and
    `status` run in a namespace finds that namespace's daemon."""
    topo: Topology = topology(2)
    config = topo.write_net_config(UDP_CONFIG)
    run_dir = Path(control.DEFAULT_PATH).parent
    made_run_dir = not run_dir.exists()
    sockets = {h.label: run_dir / f"netns-{h.name}.sock" for h in topo.hosts}
    try:
        for host in topo.hosts:
            host.popen(*FLANNEL_UDP, "run", "--local-store", topo.store_path, "--iface", "eth0",
                       "--net-config-path", config, "--subnet-file", host.subnet_file,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subnets = {}
        for host in topo.hosts:
            def status(host: Host = host) -> dict | None:
                result = host.flannel("status", "--json", check=False)  # the default socket
                return json.loads(result.stdout) if result.returncode == 0 else None
            lease = wait_until(status, 15, f"{host.label}'s daemon to answer")["lease"]
            assert lease["public_ip"] == host.underlay_ip
            subnets[host.label] = lease["subnet"]
            flannel_subnet = ipaddress.ip_interface(host.subnet_env()["FLANNEL_SUBNET"])
            assert str(flannel_subnet.network) == lease["subnet"]
            assert sockets[host.label].is_socket()
        assert len(set(subnets.values())) == 2
    finally:
        topo.cleanup()  # SIGTERM: each daemon removes its socket
        if made_run_dir:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
    assert not any(path.exists() for path in sockets.values())


def test_a_refused_start_does_not_seed_an_empty_store_with_its_net_config(running, tmp_path):
    """--net-config-path seeds a store only once nothing can refuse the start: a start refused
    for the UDP port in use leaves an empty store empty."""
    h1 = running.host
    store = h1.dir / "empty-store.msgpack"
    seed_file = h1.dir / "seed.json"
    seed_file.write_text(json.dumps(UDP_CONFIG))
    line = start_second(h1, store, "--net-config-path", seed_file,
                        "--subnet-file", h1.dir / "third.env",
                        "--control-socket", h1.dir / "third.sock")
    assert "UDP port 8285 is already in use" in line, line
    assert asyncio.run(LocalStore(store).get_config()) is None, "the refused start seeded it"
