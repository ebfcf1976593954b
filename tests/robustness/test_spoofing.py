"""Forged frames never reach the pod network: live daemons, a pod listening, forgers on the
underlay. Both backends.

Four hosts on one bridge: h1 (the target, with a pod listening on a UDP port) and h2 run
daemons; h3 holds a lease put by hand (no daemon: it sends by hand, as a lease holder may);
h4 holds no lease. Forged frames come from h4 (no lease, claiming h2's pod as source or any
other) and from h2 and h3 (lease holders claiming sources outside their own subnet); what the
listener in h1's pod hears is checked, and the drop counters name each forgery. A frame from
h3 with a source inside its own subnet is the control: it must arrive.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import subprocess
import sys

import pytest
from helpers import NETFUZZ, USERSPACE_PORTS, userspace_config
from netfuzz import udp_packet, vxlan_frame

from flannel_udp.lab import Host, Pod, Topology, wait_until
from flannel_udp.lease import LEASE_TTL, subnet_key
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

LISTEN_PORT = 9999
HAND_SUBNET = "10.244.200.0/24"  # h3's lease, put by hand
LISTENER = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.2)
print("bound", flush=True)
heard = []
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        data, addr = s.recvfrom(65535)
    except TimeoutError:
        continue
    heard.append([addr[0], data.decode(errors="replace")])
    if data == b"stop":
        break
print(json.dumps(heard))
"""
HAND_MAC = "0e:fa:c0:a8:4d:0d"


def hand_lease(host: Host, backend: str) -> bytes:
    if backend == "udp":
        return f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null}}'.encode()
    return (f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{HAND_MAC}"}}}}').encode()


def listen(pod: Pod, seconds: float) -> subprocess.Popen:
    proc = pod.popen(sys.executable, "-c", LISTENER, pod.address, str(LISTEN_PORT),
                     str(seconds), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "bound"
    return proc


def send(host: Host, to: Host, backend: str, vtep_mac: str, packets: list[bytes],
         repeat: int = 1) -> None:
    """Send `packets` (IPv4), encapsulated for `backend`, from `host` to `to`'s port."""
    if backend == "vxlan":
        packets = [vxlan_frame(p, 1, bytes.fromhex(vtep_mac.replace(":", ""))) for p in packets]
    out = host.run(sys.executable, NETFUZZ, "hex", "--to", to.underlay_ip, "--port",
                   str(USERSPACE_PORTS[backend]), "--count", str(len(packets) * repeat),
                   *[p.hex() for p in packets]).stdout
    assert json.loads(out)["errors"] == 0


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_forged_frames_never_reach_the_pod_and_are_counted_by_reason(topology, backend):
    topo: Topology = topology(4)
    h1, h2, h3, h4 = topo.hosts
    leases = topo.start_daemons(userspace_config(backend), [h1, h2], "--drop-log-interval", "1")
    asyncio.run(LocalStore(topo.store_path).put_lease(
        subnet_key(ipaddress.IPv4Network(HAND_SUBNET)), hand_lease(h3, backend), LEASE_TTL))
    wait_until(lambda: HAND_SUBNET in h1.peer_subnets(), 5, "h1 to list h3's hand-put lease")
    pod = topo.add_pod(h1)
    h2_net = ipaddress.IPv4Network(leases["h2"]["subnet"])
    h1_net = ipaddress.IPv4Network(leases["h1"]["subnet"])
    h3_net = ipaddress.IPv4Network(HAND_SUBNET)
    vtep_mac = h1.lease().get("vtep_mac", "")
    before = h1.status()["counters"]["drops"]

    def forged(src: object, n: int) -> bytes:
        return udp_packet(str(src), pod.address, LISTEN_PORT, f"forged-{n}".encode())

    listener = listen(pod, 20)
    # No lease: h4 as h2's pod, as h3's network address, as itself.
    strangers = [forged(h2_net.network_address + 2, 1), forged(h3_net.network_address, 2),
                 forged(h4.underlay_ip, 3)]
    # Lease holders claiming what is not theirs: h2 as h3's subnet, as h1's own, as an unleased
    # subnet, as an address outside the Network; h3 as h2's subnet.
    h2_lies = [forged(h3_net.network_address + 5, 4), forged(h1_net.network_address + 9, 5),
               forged("10.244.250.9", 6), forged("8.8.8.8", 7)]
    h3_lies = [forged(h2_net.network_address + 2, 8)]
    send(h4, h1, backend, vtep_mac, strangers, repeat=10)
    send(h2, h1, backend, vtep_mac, h2_lies, repeat=10)
    send(h3, h1, backend, vtep_mac, h3_lies, repeat=10)
    # The control: h3 from inside its own subnet, then the listener's stop word.
    send(h3, h1, backend, vtep_mac, [
        udp_packet(str(h3_net.network_address + 5), pod.address, LISTEN_PORT, b"legit"),
        udp_packet(str(h3_net.network_address + 5), pod.address, LISTEN_PORT, b"stop")])
    out, _ = listener.communicate(timeout=30)
    heard = json.loads(out)
    assert [payload for _, payload in heard] == ["legit", "stop"], heard

    def counted() -> dict[str, int] | None:
        drops = h1.status()["counters"]["drops"]
        got = {reason: drops[reason] - before[reason]
               for reason in ("unknown_sender", "spoofed_inner_source")}
        return got if got == {"unknown_sender": 30, "spoofed_inner_source": 50} else None

    wait_until(counted, 3, "h1 to count 30 unknown_sender and 50 spoofed_inner_source drops")
    # The drop log reports every one of them (in one or more lines, a second apart at least).
    def logged() -> bool:
        text = h1.log_path.read_text()
        return (sum(map(int, re.findall(r"unknown_sender \+(\d+)", text))) == 30
                and sum(map(int, re.findall(r"spoofed_inner_source \+(\d+)", text))) == 50)

    wait_until(logged, 5, "h1's log to report the 30 + 50 drops")


def test_no_source_check_lets_a_stranger_in_as_flanneld_would(topology):
    topo: Topology = topology(2)
    h1, h2 = topo.hosts
    net_config = topo.write_net_config(userspace_config("udp"))
    h1.start_flannel(topo.store_path, net_config, "--no-source-check")
    h1.wait_ready()
    pod = topo.add_pod(h1)
    assert "source check off" in h1.log_path.read_text()
    listener = listen(pod, 20)
    send(h2, h1, "udp", "", [udp_packet("10.244.250.9", pod.address, LISTEN_PORT, b"in"),
                             udp_packet("10.244.250.9", pod.address, LISTEN_PORT, b"stop")])
    out, _ = listener.communicate(timeout=30)
    assert [payload for _, payload in json.loads(out)] == ["in", "stop"]
    assert h1.status()["counters"]["drops"]["unknown_sender"] == 0
