"""The fast path's threads on real fds: a TUN in a throwaway network namespace and UDP sockets
on its loopback, both modes, busy-polling, ICMP net unreachable through the TUN, flows spread
over the sender ports, partial inner checksums."""

from __future__ import annotations

import errno
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    OUR_MAC,
    PEER_MAC,
    FastPath,
    as_partial,
    ip,
    ip_header,
    l4_with_checksum,
    make_packet,
)

from flannel_udp import packet
from flannel_udp.backends.tun import enable_tun_offloads
from flannel_udp.packet import Vtep, checksum

IP_RECVERR = 11  # <linux/in.h>; not exported by the socket module
TUN_NAME = "fptun0"
NETWORK = "10.5.0.0/16"
TUN_ADDR = "10.5.1.0"
REMOTE_SUBNET = "10.5.2.0"
REMOTE_POD = "10.5.2.7"


@dataclass
class TunRig:
    netns: str
    tun: object  # pytun.TunTapDevice
    fastpath_sock: socket.socket  # the fast path's own UDP socket
    peer_sock: socket.socket  # stands in for the remote node
    app_sock: socket.socket  # an application in the namespace, talking through the TUN
    sender_socks: list[socket.socket]  # VXLAN egress: a pool to send from, one port per socket
    vnet_hdr: bool  # the TUN has IFF_VNET_HDR and offloads


def ip_cmd(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def tun_rig(request) -> Iterator[TunRig]:
    """The rig; parametrized indirectly with True, its TUN has IFF_VNET_HDR and offloads."""
    vnet_hdr = getattr(request, "param", False)
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        pytest.skip("needs root, /dev/net/tun and ip")
    pytun = pytest.importorskip("pytun")
    from pyroute2 import netns

    # "fu<pid>-" is the project's pattern for namespaces whose dead creator's leftovers the
    # session fixture of conftest.py sweeps away.
    name = f"fu{os.getpid()}-fastpath-{secrets.token_hex(3)}"
    ip_cmd("netns", "add", name)
    opened: list = []
    try:
        ip_cmd("-n", name, "link", "set", "lo", "up")
        netns.pushns(name)
        try:  # everything made here belongs to the namespace for good
            tun = pytun.TunTapDevice(name=TUN_NAME, flags=pytun.IFF_TUN | pytun.IFF_NO_PI
                                     | (pytun.IFF_VNET_HDR if vnet_hdr else 0))
            opened.append(tun)
            if vnet_hdr:
                enable_tun_offloads(tun)
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(7)]
            opened.extend(socks)
        finally:
            netns.popns()
        fastpath_sock, peer_sock, app_sock, *sender_socks = socks
        for sock in sender_socks:
            sock.bind(("127.0.0.1", 0))
        fastpath_sock.bind(("127.0.0.1", 0))
        peer_sock.bind(("127.0.0.1", 0))
        app_sock.bind(("0.0.0.0", 0))
        for sock in (peer_sock, app_sock):
            sock.settimeout(3)
        os.set_blocking(tun.fileno(), False)
        ip_cmd("-n", name, "addr", "add", f"{TUN_ADDR}/32", "dev", TUN_NAME)
        ip_cmd("-n", name, "link", "set", TUN_NAME, "up", "mtu", "1472")
        ip_cmd("-n", name, "route", "add", NETWORK, "dev", TUN_NAME)
        yield TunRig(name, tun, fastpath_sock, peer_sock, app_sock, sender_socks, vnet_hdr)
    finally:
        for thing in opened:
            thing.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.netns
def test_threads_forward_between_a_real_tun_and_real_udp_sockets(tun_rig):
    rig = tun_rig
    peer_port = rig.peer_sock.getsockname()[1]
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24)
    fastpath.start()
    try:
        fastpath.start()  # idempotent
        # Routes are live: added after the threads started.
        fastpath.set_route(REMOTE_SUBNET, "127.0.0.1")

        # Egress: an app datagram to a remote pod leaves the TUN as a bare IPv4 packet in a UDP
        # datagram to the peer's port, TTL decremented.
        rig.app_sock.sendto(b"egress-payload", (REMOTE_POD, 4242))
        datagram, source = rig.peer_sock.recvfrom(65536)
        assert source == rig.fastpath_sock.getsockname()
        assert datagram[0] == 0x45
        assert datagram[8] == 63  # the kernel sent TTL 64
        assert checksum(datagram[:20]) == 0
        assert datagram[12:16] == socket.inet_aton(TUN_ADDR)
        assert datagram[16:20] == socket.inet_aton(REMOTE_POD)
        assert datagram[28:] == b"egress-payload"

        # Ingress: a datagram from the peer is written into the TUN and delivered to the app.
        app_port = rig.app_sock.getsockname()[1]
        payload = b"ingress-payload"
        udp = struct.pack("!HHHH", 4242, app_port, 8 + len(payload), 0) + payload  # no UDP csum
        inner = make_packet(ip(REMOTE_POD), ip(TUN_ADDR), ttl=5, payload=udp)
        rig.peer_sock.sendto(inner, rig.fastpath_sock.getsockname())
        data, source = rig.app_sock.recvfrom(65536)
        assert (data, source) == (payload, (REMOTE_POD, 4242))

        # Garbage and expired packets from the peer are counted, not written.
        rig.peer_sock.sendto(b"\x45short", rig.fastpath_sock.getsockname())
        rig.peer_sock.sendto(
            make_packet(ip(REMOTE_POD), ip(TUN_ADDR), ttl=1, payload=udp),
            rig.fastpath_sock.getsockname(),
        )

        def settled() -> bool:
            drops = fastpath.counters()["drops"]
            # tx counters are bumped after sendmmsg returns, maybe after the peer has the packet.
            # rx likewise after the TUN write, maybe after the app has read the packet.
            counters = fastpath.counters()
            done = counters["tx_packets"] == 1 and counters["rx_packets"] == 1
            return done and drops["short"] == 1 and drops["ttl_expired"] == 1

        assert wait_for(settled)
        counters = fastpath.counters()
        assert counters["tx_packets"] == 1
        assert counters["tx_bytes"] == len(datagram)
        assert counters["rx_packets"] == 1
        assert counters["rx_bytes"] == len(inner)
        ((subnet, peer, _, stats),) = fastpath.routes()
        assert (subnet, peer) == (REMOTE_SUBNET, "127.0.0.1")
        # rx is charged to the lease of the inner source address.
        assert stats == {
            "tx_packets": 1,
            "tx_bytes": len(datagram),
            "rx_packets": 1,
            "rx_bytes": len(inner),
        }
        fastpath.stop()
        assert not fastpath.running
        # Restartable: the stop signal is re-armed.
        fastpath.start()
        rig.app_sock.sendto(b"after restart", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"after restart"
    finally:
        fastpath.stop()
        fastpath.stop()
    assert not fastpath.running


@pytest.mark.netns
def test_packet_too_big_for_a_udp_datagram_is_counted_and_later_packets_still_go_out(tun_rig):
    rig = tun_rig
    ip_cmd("-n", rig.netns, "link", "set", TUN_NAME, "mtu", "65535")
    peer_port = rig.peer_sock.getsockname()[1]
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24)
    fastpath.set_route(REMOTE_SUBNET, "127.0.0.1")
    fastpath.start()
    try:
        # 65,528 bytes of IPv4 fit the TUN but not a UDP payload (65,507 at most): EMSGSIZE.
        rig.app_sock.sendto(b"x" * 65500, (REMOTE_POD, 4242))
        rig.app_sock.sendto(b"small", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"small"
        # Counters are bumped after sendmmsg returns, possibly after the peer has the packet.
        assert wait_for(lambda: fastpath.counters()["tx_packets"] == 1)
        assert fastpath.counters()["drops"]["too_big"] == 1
    finally:
        fastpath.stop()


@pytest.mark.netns
def test_a_busy_polling_thread_forwards_both_ways_and_stops_when_asked(tun_rig):
    rig = tun_rig
    peer_port = rig.peer_sock.getsockname()[1]
    # A second of polling after each packet: every exchange below is carried by a polling
    # thread, the other one parked, with the turns of the two halves interleaved.
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24,
                        busy_poll_us=1_000_000)
    fastpath.set_route(REMOTE_SUBNET, "127.0.0.1")
    app_port = rig.app_sock.getsockname()[1]
    rounds = 200
    fastpath.start()
    try:
        for i in range(rounds):
            out = b"out %d" % i
            rig.app_sock.sendto(out, (REMOTE_POD, 4242))
            assert rig.peer_sock.recv(65536)[28:] == out
            back = b"back %d" % i
            udp = struct.pack("!HHHH", 4242, app_port, 8 + len(back), 0) + back
            rig.peer_sock.sendto(make_packet(ip(REMOTE_POD), ip(TUN_ADDR), payload=udp),
                                 rig.fastpath_sock.getsockname())
            assert rig.app_sock.recvfrom(65536) == (back, (REMOTE_POD, 4242))

        def settled() -> bool:
            counters = fastpath.counters()
            return counters["tx_packets"] == counters["rx_packets"] == rounds
        assert wait_for(settled)
        counters = fastpath.counters()
        # The kernel's own IPv6 chatter on a new TUN (not_ipv4) is all that may be dropped.
        assert not any(v for k, v in counters["drops"].items() if k != "not_ipv4")
        # Most exchanges came while a thread was polling (the first one woke a sleeper), in
        # each direction: the poller took packets from the TUN and datagrams from the socket.
        polled = (counters["busy_poll_egress_batches"], counters["busy_poll_ingress_batches"])
        assert min(polled) >= rounds // 2, f"(egress, ingress) batches polled: {polled}"
        assert counters["busy_poll_batches"] == sum(polled)
        # Stop while the poller is a second from its deadline: the stop signal ends it.
        rig.app_sock.sendto(b"last", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"last"
        stopping = time.monotonic()
    finally:
        fastpath.stop()
    took = time.monotonic() - stopping
    assert took < 0.5, f"stop() took {took:.3f} s with a 1 s busy-poll window"
    assert not fastpath.running
    # Off (the default), nothing is forwarded by polling.
    plain = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24)
    plain.set_route(REMOTE_SUBNET, "127.0.0.1")
    plain.start()
    try:
        rig.app_sock.sendto(b"plain", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"plain"
        assert wait_for(lambda: plain.counters()["tx_packets"] == 1)
        assert plain.counters()["busy_poll_batches"] == 0
    finally:
        plain.stop()


@pytest.mark.netns
def test_dropping_a_running_fastpath_stops_its_threads(tun_rig):
    rig = tun_rig
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), 1, TUN_ADDR, 24)
    fastpath.start()
    assert fastpath.running
    del fastpath  # __dealloc__ joins the threads; a leftover thread would read the TUN
    # No thread of it is left: none in this process reads the TUN any more.
    names = {Path(f"/proc/self/task/{t}/comm").read_text().strip()
             for t in os.listdir("/proc/self/task")}
    assert not names & {"flannel-egress", "flannel-ingress"}, names
    rig.app_sock.sendto(b"to the kernel side", (REMOTE_POD, 4242))
    assert wait_for(lambda: b"to the kernel side" in read_tun(rig.tun))


def read_tun(tun) -> bytes:
    """One packet from the nonblocking TUN, or b"" if there is none."""
    try:
        return os.read(tun.fileno(), 65536)
    except BlockingIOError:
        return b""


@pytest.mark.netns
def test_unrouted_destination_gets_icmp_net_unreachable_through_the_real_tun(tun_rig):
    rig = tun_rig
    # The reply's source is the TUN's own address: the kernel takes it as martian unless
    # accept_local is on for the TUN.
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            rig.netns,
            "sysctl",
            "-qw",
            f"net.ipv4.conf.{TUN_NAME}.accept_local=1",
        ],
        check=True,
        timeout=10,
    )
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), 1, TUN_ADDR, 24)
    fastpath.start()
    try:
        rig.app_sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        rig.app_sock.connect(("10.5.9.9", 4242))
        rig.app_sock.send(b"nobody home")
        poller = select.poll()
        poller.register(rig.app_sock, select.POLLERR)
        assert poller.poll(3000), "no ICMP error reached the socket"
        _, ancillary, _, _ = rig.app_sock.recvmsg(1024, 1024, socket.MSG_ERRQUEUE)
        ((level, kind, ee),) = ancillary
        assert (level, kind) == (socket.IPPROTO_IP, IP_RECVERR)
        ee_errno, ee_origin, ee_type, ee_code = struct.unpack_from("=IBBB", ee)
        # SO_EE_ORIGIN_ICMP, destination unreachable / net unreachable
        assert (ee_errno, ee_origin, ee_type, ee_code) == (errno.ENETUNREACH, 2, 3, 0)
        assert wait_for(lambda: fastpath.counters()["icmp_sent"] == 1)
        assert fastpath.counters()["drops"]["no_route"] == 1
    finally:
        fastpath.stop()


@pytest.mark.netns
def test_vxlan_threads_spread_flows_over_the_sender_ports_and_deliver_frames(tun_rig):
    rig = tun_rig
    peer_port = rig.peer_sock.getsockname()[1]
    sender_ports = [sock.getsockname()[1] for sock in rig.sender_socks]
    vtep = Vtep(vni=42, mac=OUR_MAC, senders=len(rig.sender_socks))
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24,
                        mode="vxlan", vni=vtep.vni, vtep_mac=vtep.mac,
                        send_fds=[sock.fileno() for sock in rig.sender_socks])
    fastpath.set_route(REMOTE_SUBNET, "127.0.0.1", PEER_MAC)
    fastpath.start()
    try:
        # Egress: 24 flows (destination ports), 2 datagrams each; each frame is the reference's
        # encapsulation of what the TUN read, and leaves from the socket its flow hashes to.
        seen: dict[int, set[int]] = {}
        for _ in range(2):
            for flow in range(24):
                rig.app_sock.sendto(b"flow", (REMOTE_POD, 5000 + flow))
        for _ in range(48):
            frame, (_, src_port) = rig.peer_sock.recvfrom(65536)
            inner = frame[22:]
            assert frame[:22] == packet.vxlan_encap(b"", 42, PEER_MAC, OUR_MAC)
            assert inner[8] == 64  # no TTL decrement in VXLAN mode
            assert inner[28:] == b"flow"
            expected = sender_ports[packet.sender_index(packet.flow_hash(inner), 4)]
            assert src_port == expected
            seen.setdefault(int.from_bytes(inner[22:24], "big"), set()).add(src_port)
        assert all(len(ports) == 1 for ports in seen.values()), "a flow changed its port"
        assert len({port for ports in seen.values() for port in ports}) >= 2, "no spreading"

        # Ingress: a frame for us reaches the app with the TTL it had; one for another MAC is
        # counted and dropped.
        app_port = rig.app_sock.getsockname()[1]
        udp = struct.pack("!HHHH", 4242, app_port, 8 + 7, 0) + b"ingress"
        inner = make_packet(ip(REMOTE_POD), ip(TUN_ADDR), ttl=1, payload=udp)
        frame = packet.vxlan_encap(inner, 42, OUR_MAC, PEER_MAC)
        rig.peer_sock.sendto(packet.vxlan_encap(inner, 42, PEER_MAC, OUR_MAC),
                             rig.fastpath_sock.getsockname())
        rig.peer_sock.sendto(frame, rig.fastpath_sock.getsockname())
        assert rig.app_sock.recvfrom(65536) == (b"ingress", (REMOTE_POD, 4242))
        assert wait_for(lambda: fastpath.counters()["drops"]["vxlan_wrong_mac"] == 1)
        assert wait_for(lambda: fastpath.counters()["tx_packets"] == 48)
        # The ingress thread counts after its write returns: the app may see the packet first.
        assert wait_for(lambda: fastpath.counters()["rx_packets"] == 1)
        counters = fastpath.counters()
        assert counters["rx_packets"] == 1 and counters["rx_bytes"] == len(inner)
        ((_, _, mac, stats),) = fastpath.routes()
        assert mac == PEER_MAC
        assert stats["tx_packets"] == 48 and stats["rx_packets"] == 1
    finally:
        fastpath.stop()


@pytest.mark.netns
@pytest.mark.parametrize("tun_rig", [False, True], indirect=True, ids=["plain-tun", "vnet-tun"])
def test_a_partial_inner_checksum_reaches_the_app_and_a_wrong_one_does_not(tun_rig):
    rig = tun_rig
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), 1, TUN_ADDR, 24,
                        mode="vxlan", vni=42, vtep_mac=OUR_MAC, vnet_hdr=rig.vnet_hdr, mtu=1472)
    fastpath.start()
    try:
        app_port = rig.app_sock.getsockname()[1]

        def datagram(payload: bytes, kind: str) -> bytes:
            udp = struct.pack("!HHHH", 4242, app_port, 8 + len(payload), 0) + payload
            inner = l4_with_checksum(ip_header(20 + len(udp), 17, ip(REMOTE_POD), ip(TUN_ADDR)),
                                     udp, 6)
            if kind == "partial":
                inner = as_partial(inner)
            elif kind == "wrong":
                inner = inner[:26] + bytes([inner[26] ^ 0x10]) + inner[27:]
            elif kind == "none":
                inner = inner[:26] + b"\0\0" + inner[28:]
            return packet.vxlan_encap(inner, 42, OUR_MAC, PEER_MAC)

        for kind in ("wrong", "partial", "none", "right"):
            rig.peer_sock.sendto(datagram(kind.encode(), kind), rig.fastpath_sock.getsockname())
        got = [rig.app_sock.recvfrom(65536)[0] for _ in range(3)]
        assert got == [b"partial", b"none", b"right"]  # the wrong one went first: dropped
        assert wait_for(lambda: fastpath.counters()["rx_packets"] == 4)
        assert fastpath.counters()["csum_completed"] == 1
    finally:
        fastpath.stop()
