"""`run --queues N` end to end: both backends' daemons open N TUN queues, each flow goes to the
queue `steering.flow_queue` names, on the sender's TUN (the eBPF steering program) and on the
receiver's socket group (the reuseport program) alike; and a UDP flow beside TCP streams spread
over the queues arrives without one datagram out of order (iperf3's own sequence-number count),
the TCP retransmits of the load reported. What queues buy (throughput, latency) is the bench's
to show, not a test's."""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys

import pytest
from helpers import refused_run, userspace_config

from flannel_udp.backends.steering import flow_queue, reuseport_program, steering_program
from flannel_udp.lab import ping_failures

pytestmark = pytest.mark.netns

QUEUES = 4
SINK_PORT = 9999
DATAGRAMS = 50


def _udp_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The headers of a UDP packet (IPv4 or IPv6, as the addresses), as far as flow_queue
    reads."""
    ports = struct.pack("!HHHH", sport, dport, 8, 0)
    if ":" in src:
        return (struct.pack("!IHBB", 6 << 28, 8, 17, 64) + ipaddress.IPv6Address(src).packed
                + ipaddress.IPv6Address(dst).packed + ports)
    return (struct.pack("!BBHHHBBH", 0x45, 0, 28, 0, 0, 64, 17, 0)
            + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + ports)


def _queue_tx_rx(host) -> list[tuple[int, int]]:
    return [(q["tx_packets"], q["rx_packets"]) for q in host.status()["counters"]["queues"]]


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_each_flow_takes_the_queue_flow_queue_names_on_both_hosts(topology, backend):
    topo = topology(2, ipv6=True)
    config = {**userspace_config(backend), "EnableIPv6": True, "IPv6Network": "fd99::/56"}
    topo.start_daemons(config, None, "--queues", str(QUEUES))
    h1, h2 = topo.hosts
    pods = {f"p{i}": topo.add_pod(host) for i, host in enumerate(topo.hosts)}
    assert not ping_failures(pods)
    p0, p1 = pods["p0"], pods["p1"]
    assert p0.address6 is not None and p1.address6 is not None
    for src, dst, family in ((p0.address, p1.address, "AF_INET"),
                             (p0.address6, p1.address6, "AF_INET6")):
        # One source port per queue: the flows flow_queue puts on queue 0, 1, 2, 3.
        sports: dict[int, int] = {}
        for sport in range(20000, 21000):
            sports.setdefault(flow_queue(_udp_packet(src, dst, sport, SINK_PORT), QUEUES), sport)
        assert sorted(sports) == list(range(QUEUES))
        for queue, sport in sorted(sports.items()):
            before1, before2 = _queue_tx_rx(h1), _queue_tx_rx(h2)
            p0.run(sys.executable, "-c", "import socket, time\n"
                   f"s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n"
                   f"s.bind(('{src}', {sport}))\n"
                   f"for _ in range({DATAGRAMS}):\n"
                   f"    s.sendto(b'x' * 100, ('{dst}', {SINK_PORT}))\n"
                   "    time.sleep(0.001)\n")
            after1, after2 = _queue_tx_rx(h1), _queue_tx_rx(h2)
            sent = [a[0] - b[0] for a, b in zip(after1, before1, strict=True)]
            written = [a[1] - b[1] for a, b in zip(after2, before2, strict=True)]
            expected = [DATAGRAMS if q == queue else 0 for q in range(QUEUES)]
            assert sent == expected, (family, queue, sport, sent)  # h1's TUN steering program
            assert written == expected, (family, queue, sport, written)  # h2's reuseport one
    counters = h1.status()["counters"]
    assert sum(q["tx_packets"] for q in counters["queues"]) == counters["tx_packets"]
    text = h1.flannel("status", "--control-socket", h1.control_socket).stdout
    assert f"queues   {QUEUES}, tx/rx pkts each: " in text, text


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_a_udp_flow_beside_tcp_streams_over_queues_is_not_reordered(topology, backend):
    topo = topology(2)
    topo.start_daemons(userspace_config(backend), None, "--queues", str(QUEUES))
    pods = {f"p{i}": topo.add_pod(host) for i, host in enumerate(topo.hosts)}
    assert not ping_failures(pods)
    p0, p1 = pods["p0"], pods["p1"]
    # The receiver's report: iperf3 counts datagrams whose sequence number comes too late.
    server = p1.popen("iperf3", "-s", "-1", "-J", "-B", p1.address, "-p", "5202",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    load = p0.iperf3_start(p1, p1.address, "-P", "4", seconds=4)
    try:
        p0.run("iperf3", "-c", p1.address, "-p", "5202", "-u", "-b", "200M", "-l", "1200",
               "-t", "3", "--connect-timeout", "5000", timeout=40)
        udp = json.loads(server.communicate(timeout=30)[0])
    finally:
        server.kill()
    tcp = load.result()
    [stream] = udp["end"]["streams"]
    print(f"{backend}, {QUEUES} queues: UDP {stream['udp']['packets']} datagrams, "
          f"{stream['udp']['out_of_order']} out of order, {stream['udp']['lost_packets']} lost; "
          f"TCP 4 streams {tcp['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s, "
          f"{tcp['end']['sum_sent']['retransmits']} retransmits")
    assert stream["udp"]["packets"] > 0
    assert stream["udp"]["out_of_order"] == 0, stream["udp"]
    assert isinstance(tcp["end"]["sum_sent"]["retransmits"], int)
    assert len(topo.hosts[0].status()["counters"]["queues"]) == QUEUES


def test_the_steering_programs_are_built_for_the_queue_count():
    # Both programs end by taking the hash modulo the queue count (an immediate operand).
    for queues in (2, 3, 16):
        assert struct.pack("=i", queues) in steering_program(queues)
        assert struct.pack("=I", queues) in reuseport_program(queues, 0)


# Holds TUN flannel0 with two queues until killed, as another multi-queue daemon might.
HOLD_MQ_TUN = """
import pytun, time
flags = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_MULTI_QUEUE
tuns = [pytun.TunTapDevice(name="flannel0", flags=flags) for _ in range(2)]
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_multi_queue_daemon_joins_neither_the_port_nor_the_tun(topology):
    topo = topology(3)
    h1, h2, h3 = topo.hosts
    topo.start_daemons(userspace_config("udp"), [h1, h2], "--queues", "2")
    pods = {f"p{i}": topo.add_pod(host) for i, host in enumerate([h1, h2])}
    assert not ping_failures(pods)
    # Beside the running one: its port's SO_REUSEPORT group takes no one else in.
    line = refused_run(h1, "--queues", "2", "--local-store", topo.store_path, "--iface", "eth0",
                       "--subnet-file", h1.dir / "second.env", "--control-socket",
                       h1.dir / "second.sock", exit_code=None, timeout=30)
    assert "UDP port 8285 is already in use" in line, line
    assert not ping_failures(pods)
    assert len(h1.status()["counters"]["queues"]) == 2
    # A multi-queue TUN of that name held by another process: not joined as one more queue.
    holder = h3.popen(sys.executable, "-c", HOLD_MQ_TUN, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        line = refused_run(h3, "--queues", "2", "--local-store", topo.store_path, "--iface",
                           "eth0", "--subnet-file", h3.dir / "h3.env", "--control-socket",
                           h3.dir / "h3.sock", exit_code=None, timeout=30)
        assert "TUN flannel0 is in use" in line, line
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("queues", ["0", "17"])
def test_a_queue_count_out_of_range_is_refused_in_one_line(topology, queues):
    topo = topology(1)
    [host] = topo.hosts
    line = refused_run(host, "--queues", queues, "--local-store", topo.store_path)
    assert line.endswith(f"--queues {queues}: must be 1 to 16"), line
