"""What tests of several files share, in one place: the tree's paths, the daemon's one-line
errors, the leases in a store file, clients run inside namespaces (an HTTP fetch, `flannel-udp
trace`), kernel VXLAN nodes publishing and following leases as flanneld does, and the fast-path
tests' builders and hypothesis strategies (the C fast path against `flannel_udp.packet`).

The namespaces, hosts and daemons themselves are the lab's (`flannel_udp.lab`), which the demo
and the bench use too; this module holds only what the tests alone need.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from flannel_udp import _fastpath
from flannel_udp.lab import FLANNEL_UDP, Host, KernelVxlanNode, Netns, list_namespaces, wait_until
from flannel_udp.lease import LEASE_TTL, decode_lease, parse_lease_key, subnet_key
from flannel_udp.packet import Action, Result, Vtep, VxlanRoute, checksum, prefix_mask
from flannel_udp.stores.local import LocalStore

ROOT = Path(__file__).resolve().parent.parent  # the repository
TESTS = ROOT / "tests"  # conftest.py, this module, netfuzz.py, golden/
NETFUZZ = TESTS / "netfuzz.py"  # run inside namespaces as a script

# -- daemons and their output ------------------------------------------------------------------

USERSPACE_PORTS = {"udp": 8285, "vxlan": 8472}  # each backend's port on its userspace data plane
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # the daemon's log format


def userspace_config(backend: str) -> dict[str, Any]:
    """A network config whose daemons forward on `backend`'s userspace data plane, the one with
    a fast path (vxlan's default, "auto", would take the kernel's VXLAN device)."""
    return {"Network": "10.244.0.0/16", "Backend": {"Type": backend, "Dataplane": "userspace"}}


def one_error_line(result: subprocess.CompletedProcess, exit_code: int | None = 2) -> str:
    """The one line a refused command wrote besides its log lines, checking that it exited with
    `exit_code` (None: anything but 0) and wrote no traceback."""
    if exit_code is None:
        assert result.returncode != 0, f"it was not refused:\n{result.stderr}"
    else:
        assert result.returncode == exit_code, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(errors) == 1, f"expected one error line:\n{result.stderr}"
    return errors[0]


def refused_run(host: Host, *args: str | os.PathLike, exit_code: int | None = 2,
                wrapper: Sequence[str] = (), timeout: float = 20) -> str:
    """`flannel-udp run ARGS` (under `wrapper`, if any) in `host`, which must refuse to start;
    its one error line (see `one_error_line`)."""
    result = host.run(*wrapper, *FLANNEL_UDP, "run", *args, check=False, timeout=timeout)
    return one_error_line(result, exit_code)


def lease_key(subnet: str) -> str:
    """The store key of the lease on `subnet` as `status` shows it ('10.244.3.0/24')."""
    return subnet_key(ipaddress.IPv4Network(subnet))


def stored_leases(store: str | os.PathLike) -> dict[str, bytes]:
    """The live leases in a store file: key -> value as stored."""
    snapshot = asyncio.run(LocalStore(store).list_leases())
    return {r.key: r.value for r in snapshot.records}


def namespaces_of(pid: int) -> list[str]:
    """The namespaces the lab made in process `pid` that still exist."""
    return [n for n in list_namespaces() if n.startswith(f"fu{pid}-")]


FETCH = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
sys.stdout.write(f"{code}\\n" + body.decode())
"""


def fetch(host: Netns, url: str) -> tuple[int, str]:
    """`url` fetched over HTTP from inside `host`: (status, body)."""
    code, _, body = host.run(sys.executable, "-c", FETCH, url).stdout.partition("\n")
    return int(code), body


def trace(host: Host, *args: str, ping: Callable[[], object], timeout: float = 10) -> list[str]:
    """Run `flannel-udp trace *args` in `host` until it exits, calling `ping` meanwhile."""
    proc = host.popen(*FLANNEL_UDP, "trace", "--control-socket", host.control_socket, *args,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    # Tracing is on once the daemon lists us: only then do the pings count.
    wait_until(lambda: host.status()["trace"]["every"] > 0, 5, "the tracer to attach")
    while proc.poll() is None and time.monotonic() < deadline:
        ping()
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, f"trace exited {proc.returncode}: {err}\n{out}"
    return out.splitlines()


# -- flanneld's kernel VXLAN nodes ------------------------------------------------------------

# A vxlan lease as real flanneld v0.22.3 writes it (REFERENCE.md section 5, verbatim but for
# the three values): Go's json.Marshal of its lease attributes, field order and all.
FLANNELD_VXLAN_LEASE = ('{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan",'
                        '"BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}')


def flanneld_lease(public_ip: str, vni: int, mac: str) -> bytes:
    return FLANNELD_VXLAN_LEASE.format(ip=public_ip, vni=vni, mac=mac).encode()


def publish(node: KernelVxlanNode, store: Path) -> None:
    """The kernel node's lease, written as flanneld writes it (its dual-stack key and value
    when the node has an IPv6 subnet)."""
    if node.ipv6_subnet is not None:
        key, value = node.lease_key(), node.lease_value()
    else:
        key = subnet_key(node.subnet)
        value = flanneld_lease(node.host.underlay_ip, node.vni, node.mac)
    asyncio.run(LocalStore(store).put_lease(key, value, LEASE_TTL))


def program_from_store(node: KernelVxlanNode, store: Path) -> None:
    """What flanneld does with the vxlan leases it sees: a neighbour, FDB entry and route for
    each remote one, the VtepMAC read from the lease's BackendData."""
    for key, value in stored_leases(store).items():
        parsed = parse_lease_key(key)
        assert parsed is not None
        lease = decode_lease(parsed[0], value, ipv6_subnet=parsed[1])
        if lease.backend == "vxlan" and lease.subnet != node.subnet:
            vtep_mac = json.loads(lease.backend_data or b"{}").get("VtepMAC")
            if vtep_mac:
                node.add_peer(str(lease.subnet), str(lease.public_ip), vtep_mac)
            # flanneld's dual-stack node: the same over IPv6 on flannel-v6.<VNI>
            v6_mac = json.loads(lease.backend_v6_data or b"{}").get("VtepMAC")
            if (node.ipv6_subnet is not None and lease.ipv6_subnet is not None
                    and lease.public_ipv6 is not None and v6_mac):
                node.add_peer6(str(lease.ipv6_subnet), str(lease.public_ipv6), v6_mac)


# -- the fast path against its reference, flannel_udp.packet ----------------------------------

FastPath = _fastpath.FastPath

PORT = 8285
OUR_MAC = bytes.fromhex("0e0000000001")
PEER_MAC = bytes.fromhex("c6d2326f8f44")
addresses = st.integers(0, 0xFFFFFFFF)
macs = st.binary(min_size=6, max_size=6)


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def dotted(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def make_fastpath(routes: dict[int, int], subnet_len: int, tun_addr: int) -> FastPath:
    fastpath = FastPath(-1, -1, PORT, dotted(tun_addr), subnet_len)
    for subnet, peer in routes.items():
        fastpath.set_route(dotted(subnet), dotted(peer))
    return fastpath


def as_tuple(result: Result) -> tuple:
    """The reference result in the shape of the FastPath test hooks (the last item: the sender
    socket of a SEND, else where the packet's partial checksum is)."""
    peer = "" if result.action != Action.SEND else (
        dotted(result.peer) if isinstance(result.peer, int) else str(result.peer))
    last = result.sender if result.action == Action.SEND else result.csum_at
    return (int(result.action), result.data, peer, int(result.drop or 0), last)


def make_packet(src: int, dst: int, ttl: int = 64, proto: int = 17, payload: bytes = b"") -> bytes:
    total = 20 + len(payload)
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            7,
            0,
            ttl,
            proto,
            0,
            src.to_bytes(4, "big"),
            dst.to_bytes(4, "big"),
        )
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def make_vxlan_fastpath(routes: dict[int, VxlanRoute], subnet_len: int, tun_addr: int,
                        vtep: Vtep) -> FastPath:
    fastpath = FastPath(-1, -1, 8472, dotted(tun_addr), subnet_len, mode="vxlan", vni=vtep.vni,
                        vtep_mac=vtep.mac, send_fds=[-1] * vtep.senders)
    for subnet, route in routes.items():
        fastpath.set_route(dotted(subnet), dotted(route.peer), route.mac)
    return fastpath


def l4_with_checksum(header: bytes, l4: bytes, at: int) -> bytes:
    """`header` + `l4` with the L4 checksum at offset `at` computed from scratch."""
    pseudo = header[12:20] + bytes([0, header[9]]) + len(l4).to_bytes(2, "big")
    l4 = l4[:at] + b"\x00\x00" + l4[at + 2 :]
    return header + l4[:at] + checksum(pseudo + l4).to_bytes(2, "big") + l4[at + 2 :]


def ip_header(total: int, proto: int, src: int, dst: int, ident: int = 7, frag: int = 0x4000,
              ttl: int = 64, tos: int = 0, options: bytes = b"") -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45 + len(options) // 4, tos, total,
                                   ident, frag, ttl, proto, 0, src.to_bytes(4, "big"),
                                   dst.to_bytes(4, "big")) + options)
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header)


def as_partial(pkt: bytes) -> bytes:
    """A TCP/UDP packet as a kernel sender with checksum offload leaves it: the folded
    pseudo-header sum in the checksum field."""
    ihl = (pkt[0] & 0x0F) * 4
    at = ihl + (16 if pkt[9] == 6 else 6)
    pseudo = pkt[12:20] + bytes([0, pkt[9]]) + (len(pkt) - ihl).to_bytes(2, "big")
    return pkt[:at] + (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big") + pkt[at + 2 :]


@st.composite
def route_tables(draw: st.DrawFn) -> tuple[int, dict[int, int]]:
    subnet_len = draw(st.one_of(st.sampled_from([0, 16, 24, 32]), st.integers(0, 32)))
    mask = prefix_mask(subnet_len)
    subnets = draw(st.lists(addresses.map(lambda a: a & mask), max_size=12, unique=True))
    return subnet_len, {subnet: draw(addresses) for subnet in subnets}


@st.composite
def ipv4_packets(draw: st.DrawFn, routes: dict[int, int], subnet_len: int) -> bytes:
    """Mostly well-formed IPv4 packets; some with a bad checksum, odd lengths or trailers."""
    ihl = draw(st.one_of(st.just(5), st.integers(5, 15)))
    options = draw(st.binary(min_size=(ihl - 5) * 4, max_size=(ihl - 5) * 4))
    payload = draw(st.binary(max_size=40))
    ttl = draw(st.one_of(st.sampled_from([0, 1, 2, 255]), st.integers(0, 255)))
    proto = draw(st.one_of(st.sampled_from([1, 6, 17]), st.integers(0, 255)))
    frag = draw(st.one_of(st.sampled_from([0, 0x2000, 0x4000]), st.integers(0, 0xFFFF)))
    host_bits = ~prefix_mask(subnet_len) & 0xFFFFFFFF
    if routes and draw(st.booleans()):
        dst = draw(st.sampled_from(sorted(routes))) | (draw(addresses) & host_bits)
    else:
        dst = draw(addresses)
    total = ihl * 4 + len(payload)
    if draw(st.integers(0, 9)) == 9:  # Hypothesis favours small draws: rare = the large one
        total = draw(st.integers(0, 0xFFFF))
    header = bytearray(
        bytes([0x40 | ihl, draw(st.integers(0, 255))])
        + total.to_bytes(2, "big")
        + draw(st.binary(min_size=2, max_size=2))
        + frag.to_bytes(2, "big")
        + bytes([ttl, proto, 0, 0])
        + draw(addresses).to_bytes(4, "big")
        + dst.to_bytes(4, "big")
        + options
    )
    if draw(st.booleans()):
        header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    else:
        header[10:12] = draw(st.binary(min_size=2, max_size=2))
    return bytes(header) + payload + draw(st.binary(max_size=8))


@st.composite
def case_with_packet(draw: st.DrawFn) -> tuple[int, dict[int, int], int, bytes]:
    subnet_len, routes = draw(route_tables())
    return subnet_len, routes, draw(addresses), draw(ipv4_packets(routes, subnet_len))


@st.composite
def case_with_bytes(draw: st.DrawFn) -> tuple[int, dict[int, int], int, bytes]:
    subnet_len, routes = draw(route_tables())
    data = draw(st.binary(max_size=80))
    if data and draw(st.booleans()):
        data = bytes([0x40 | (data[0] & 0x0F)]) + data[1:]  # get past the version check more
    return subnet_len, routes, draw(addresses), data


@st.composite
def vteps(draw: st.DrawFn) -> Vtep:
    vni = draw(st.one_of(st.sampled_from([1, 0xFFFFFF]), st.integers(1, 0xFFFFFF)))
    return Vtep(vni, draw(macs), draw(st.one_of(st.just(8), st.integers(1, 64))))


# -- lease stores of namespace tests ----------------------------------------------------------

FLANNEL_PREFIX = "/coreos.com/network"
StoreAccess = tuple[list[str], Callable, Callable, Callable, Callable]


def lease_store(topo: Any, kind: str) -> StoreAccess:
    """The lease store of a topology's daemons, `kind` "embedded" (topo.store_path) or
    "etcd v3" (an etcd in the topology, read back with etcdctl as an operator would): the
    daemons' extra flags, stored() (key under <prefix>/subnets/ -> value), put(key, value) with
    a 24 h TTL, delete(key), and cleanup()."""
    if kind == "embedded":
        store = LocalStore(topo.store_path)
        return ([], lambda: {r.key: r.value for r in asyncio.run(store.list_leases()).records},
                lambda key, value: asyncio.run(store.put_lease(key, value, LEASE_TTL)),
                lambda key: asyncio.run(store.delete_lease(key)), lambda: None)
    import pytest

    from flannel_udp.lab import EtcdCluster, etcd_problem
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    etcd = EtcdCluster.in_topology(topo).start()
    subnets = f"{FLANNEL_PREFIX}/subnets/"

    def stored() -> dict[str, bytes]:
        out = json.loads(etcd.etcdctl("get", "--prefix", subnets, "-w", "json").stdout)
        return {base64.b64decode(kv["key"]).decode().removeprefix(subnets):
                base64.b64decode(kv["value"]) for kv in out.get("kvs", [])}

    def put(key: str, value: bytes) -> None:
        lease_id = etcd.etcdctl("lease", "grant", "86400").stdout.split()[1]
        etcd.etcdctl("put", f"--lease={lease_id}", f"{subnets}{key}", value.decode())

    return (etcd.client_flags(), stored, put,
            lambda key: etcd.etcdctl("del", f"{subnets}{key}"), etcd.cleanup)
