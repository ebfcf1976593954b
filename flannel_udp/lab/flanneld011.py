"""A stand-in for flanneld v0.11.0 on etcd's v2 keyspace, run inside a host namespace:

    python3 -m flannel_udp.lab.flanneld011 --etcd-endpoints http://192.168.77.2:2379 \
        --iface eth0 --subnet-file /run/flannel/subnet.env

It stands for the other implementation in the interop tests, so it shares nothing with
flannel-udp's daemon, stores or lease code: the v2 HTTP API with urllib, the kernel with `ip`
(the vxlan entries through `KernelVxlanNode`, the lab's imitation of flanneld's vxlan backend),
and flannel v0.11's behaviour as REFERENCE.md section 5 records it:

- reads `<prefix>/config`; acquires a lease in v0.11's order (a lease holding our PublicIP, else
  the subnet of the old subnet file if free, else one at random among the first 100 free) with
  `PUT prevExist=false ttl=86400` and v0.11's value JSON; writes the four lines of subnet.env;
- lists `<prefix>/subnets`, then watches it (`wait=true&recursive=true&waitIndex=`), listing
  again on errorCode 401, retrying every second while etcd is away; renews its lease an hour
  before expiry; exits when its own lease is deleted or expires ("Lease has been revoked");
- host-gw: `route <subnet> via <PublicIP>` for host-gw leases; vxlan: flannel.<VNI> (dstport
  8472, nolearning, the underlay's offloads untouched) with an onlink route, neighbour and FDB
  entry per vxlan lease, or with DirectRouting a plain route when the peer is on our segment;
  udp: TUN flannel0 and a userspace TUN<->UDP loop on port 8285 (bare inner IP packets, TTL
  decremented both ways, as flannel's C proxy), routing every lease whatever its type.

What it leaves out: --ip-masq (refused), healthz, host-gw's 10 s route re-check, the udp proxy's
ICMP "net unreachable" replies. It exits on SIGTERM/SIGINT without removing what it set up (so
does flanneld v0.11); the lab deletes the namespace.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from flannel_udp.lab.kernel_vxlan import KernelVxlanNode

LEASE_TTL = 86400  # seconds, flannel v0.11's subnet lease
RENEW_MARGIN = 3600  # seconds before expiry (-subnet-lease-renew-margin 60)
UDP_PORT = 8285
VXLAN_PORT = 8472  # v0.11 leaves the port to the kernel: Linux's 8472
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
HTTP_TIMEOUT = 5.0
WATCH_TIMEOUT = 60.0  # a silent watch is asked again after this


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} flanneld011: {message}", file=sys.stderr, flush=True)


class V2Error(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('message', body)}")
        self.status = status
        self.code = body.get("errorCode")
        self.index = int(body.get("index") or 0)  # etcd's index when it answered


class V2Client:
    """etcd's v2 keys API over plain HTTP, each call tried on every endpoint in turn."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints

    def call(self, method: str, key: str, params: dict[str, str] | None = None,
             form: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT
             ) -> tuple[dict[str, Any], int]:
        """The JSON answer and the X-Etcd-Index; V2Error for an etcd error, OSError when no
        endpoint answers."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        failure: OSError | None = None
        for endpoint in self.endpoints:
            request = urllib.request.Request(f"{endpoint}/v2/keys{key}{query}", data=data,
                                             method=method)
            if data is not None:
                request.add_header("Content-Type", "application/x-www-form-urlencoded")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    return json.loads(answer.read()), int(answer.headers.get("X-Etcd-Index", 0))
            except urllib.error.HTTPError as e:
                body = e.read()
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = {"message": body.decode(errors="replace")}
                raise V2Error(e.code, parsed) from None
            except (OSError, ValueError, http.client.HTTPException) as e:
                # refused, reset, timed out, cut short (etcd killed mid-answer)
                failure = e if isinstance(e, OSError) else OSError(f"{type(e).__name__}: {e}")
        assert failure is not None
        raise failure


@dataclass(frozen=True)
class Config:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend: dict[str, Any]  # keys in lower case: Go's json matches them so

    @property
    def backend_type(self) -> str:
        return str(self.backend.get("type", "udp")).lower()


def parse_config(text: str) -> Config:
    """flannel v0.11's ParseConfig and its defaults (case-insensitive keys, as Go's json)."""
    raw = {k.lower(): v for k, v in json.loads(text).items()}
    network = IPv4Network(raw["network"])
    subnet_len = raw.get("subnetlen") or (24 if network.prefixlen <= 22 else network.prefixlen + 2)
    size = 1 << (32 - subnet_len)
    first = int(network.network_address)
    low = raw.get("subnetmin")
    high = raw.get("subnetmax")
    subnet_min = IPv4Network((int(IPv4Address(low)) if low else first + size, subnet_len))
    subnet_max = IPv4Network((int(IPv4Address(high)) if high
                              else int(network.broadcast_address) + 1 - size, subnet_len))
    backend = {k.lower(): v for k, v in (raw.get("backend") or {}).items()}
    return Config(network, subnet_len, subnet_min, subnet_max, backend)


def subnet_key(subnet: IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_key(key: str) -> IPv4Network | None:
    addr, _, length = key.rsplit("/", 1)[-1].rpartition("-")
    try:
        return IPv4Network(f"{addr}/{length}")
    except ValueError:
        return None


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    public_ip: str
    backend_type: str
    backend_data: dict[str, Any] | None


def parse_lease(key: str, value: str) -> Lease | None:
    subnet = parse_key(key)
    try:
        attrs = json.loads(value)
        public_ip = str(IPv4Address(attrs["PublicIP"]))
    except (ValueError, KeyError, TypeError) as e:
        log(f"Ignoring bad subnet node {key}: {e}")
        return None
    if subnet is None:
        log(f"Ignoring bad subnet node {key}: not a subnet key")
        return None
    return Lease(subnet, public_ip, attrs.get("BackendType", ""), attrs.get("BackendData"))


class Here:
    """Commands in the namespace this program runs in (KernelVxlanNode's host)."""

    def __init__(self, underlay_ip: str) -> None:
        self.underlay_ip = underlay_ip
        self.underlay_ipv6: str | None = None  # v0.11 knows no IPv6

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return result


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


# -- backends: what each does with the leases of the others -----------------------------------


class HostGw:
    mtu_overhead = 0

    def __init__(self, node: Node) -> None:
        self.node = node

    def lease_attrs(self) -> str:
        return f'{{"PublicIP":"{self.node.public_ip}","BackendType":"host-gw"}}'

    def start(self, subnet: IPv4Network) -> None:
        pass

    def add(self, lease: Lease) -> None:
        if lease.backend_type != "host-gw":
            log(f"Ignoring non-host-gw subnet: type={lease.backend_type}")
            return
        self.node.here.run("ip", "route", "replace", str(lease.subnet), "via", lease.public_ip,
                           "dev", self.node.iface)

    def remove(self, lease: Lease) -> None:
        if lease.backend_type == "host-gw":
            self.node.here.run("ip", "route", "del", str(lease.subnet), "via", lease.public_ip,
                               "dev", self.node.iface, check=False)


class Vxlan:
    mtu_overhead = 50

    def __init__(self, node: Node) -> None:
        self.node = node
        self.vni = int(node.config.backend.get("vni", 1))
        self.port = int(node.config.backend.get("port", 0)) or VXLAN_PORT
        self.direct_routing = bool(node.config.backend.get("directrouting", False))
        # the kernel's random MAC, as flanneld v0.11 gets it: random, unicast, local
        self.mac = ":".join(f"{b:02x}" for b in bytes([random.randrange(256) & 0xFC | 0x02])
                            + os.urandom(5))
        self.device: KernelVxlanNode | None = None
        self.direct: set[IPv4Network] = set()

    def lease_attrs(self) -> str:
        return (f'{{"PublicIP":"{self.node.public_ip}","BackendType":"vxlan",'
                f'"BackendData":{{"VtepMAC":"{self.mac}"}}}}')

    def start(self, subnet: IPv4Network) -> None:
        self.node.here.run("ip", "link", "del", f"flannel.{self.vni}", check=False)
        self.device = KernelVxlanNode(self.node.here, str(subnet), vni=self.vni, port=self.port,
                                      mac=self.mac, underlay_dev=self.node.iface,
                                      mtu=self.node.iface_mtu - self.mtu_overhead)

    def _on_our_segment(self, public_ip: str) -> bool:
        routes = ip_json("route", "get", public_ip)
        return bool(routes) and "gateway" not in routes[0] and routes[0].get("dev") == \
            self.node.iface

    def add(self, lease: Lease) -> None:
        if lease.backend_type != "vxlan":
            log(f"Ignoring non-vxlan subnet: type={lease.backend_type}")
            return
        mac = (lease.backend_data or {}).get("VtepMAC")
        if not isinstance(mac, str):
            log(f"Ignoring vxlan subnet {lease.subnet}: no VtepMAC")
            return
        assert self.device is not None
        if self.direct_routing and self._on_our_segment(lease.public_ip):
            self.node.here.run("ip", "route", "replace", str(lease.subnet), "via",
                               lease.public_ip, "dev", self.node.iface)
            self.direct.add(lease.subnet)
            return
        self.device.add_peer(str(lease.subnet), lease.public_ip, mac)

    def remove(self, lease: Lease) -> None:
        if lease.backend_type != "vxlan" or self.device is None:
            return
        if lease.subnet in self.direct:
            self.direct.discard(lease.subnet)
            self.node.here.run("ip", "route", "del", str(lease.subnet), check=False)
            return
        mac = (lease.backend_data or {}).get("VtepMAC")
        self.device.remove_peer(str(lease.subnet), mac if isinstance(mac, str) else "")


class Udp:
    mtu_overhead = 28

    def __init__(self, node: Node) -> None:
        self.node = node
        self.port = int(node.config.backend.get("port", 0)) or UDP_PORT
        self.routes: dict[IPv4Network, str] = {}  # replaced whole, read without a lock

    def lease_attrs(self) -> str:
        return f'{{"PublicIP":"{self.node.public_ip}"}}'

    def start(self, subnet: IPv4Network) -> None:
        self.tun = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(self.tun, TUNSETIFF, struct.pack("16sH", b"flannel0", IFF_TUN | IFF_NO_PI))
        here = self.node.here
        here.run("ip", "link", "set", "flannel0", "mtu",
                 str(self.node.iface_mtu - self.mtu_overhead), "up")
        here.run("ip", "addr", "add", f"{subnet.network_address}/32", "dev", "flannel0")
        here.run("ip", "route", "replace", str(self.node.config.network), "dev", "flannel0")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((self.node.public_ip, self.port))
        for loop in (self._tun_to_udp, self._udp_to_tun):
            threading.Thread(target=loop, daemon=True).start()

    @staticmethod
    def _decrement_ttl(packet: bytearray) -> bool:
        """flannel's proxy: TTL - 1 with the header checksum redone; False when it hits 0."""
        if len(packet) < 20 or packet[8] <= 1:
            return False
        packet[8] -= 1
        packet[10:12] = b"\0\0"
        ihl = (packet[0] & 0x0F) * 4
        total = sum(struct.unpack(f"!{ihl // 2}H", bytes(packet[:ihl])))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        packet[10:12] = struct.pack("!H", ~total & 0xFFFF)
        return True

    def _tun_to_udp(self) -> None:
        while True:
            packet = bytearray(os.read(self.tun, 65535))
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue
            dst = IPv4Address(bytes(packet[16:20]))
            peer = next((ip for net, ip in self.routes.items() if dst in net), None)
            if peer is None or not self._decrement_ttl(packet):
                continue
            try:
                self.sock.sendto(packet, (peer, self.port))
            except OSError:
                pass

    def _udp_to_tun(self) -> None:
        while True:
            packet = bytearray(self.sock.recv(65535))
            if self._decrement_ttl(packet):
                try:
                    os.write(self.tun, packet)
                except OSError:
                    pass

    def add(self, lease: Lease) -> None:
        self.routes = {**self.routes, lease.subnet: lease.public_ip}

    def remove(self, lease: Lease) -> None:
        self.routes = {k: v for k, v in self.routes.items() if k != lease.subnet}


BACKENDS = {"host-gw": HostGw, "vxlan": Vxlan, "udp": Udp}


# -- the node: lease, subnet.env, watch -------------------------------------------------------


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.etcd = V2Client([e.strip().rstrip("/") for e in args.etcd_endpoints.split(",")
                              if e.strip()])
        self.prefix = "/" + args.etcd_prefix.strip("/")
        self.iface = args.iface or ip_json("route", "show", "default")[0]["dev"]
        link = ip_json("addr", "show", "dev", self.iface)[0]
        self.iface_mtu = int(link["mtu"])
        self.public_ip = args.public_ip or next(a["local"] for a in link["addr_info"]
                                                if a["family"] == "inet")
        self.here = Here(self.public_ip)
        self.subnet_file = Path(args.subnet_file)
        self.config = self._wait_for_config()
        backend = BACKENDS.get(self.config.backend_type)
        if backend is None:
            raise SystemExit(f"flanneld011: backend {self.config.backend_type} not supported")
        self.backend = backend(self)
        self.value = self.backend.lease_attrs()
        self.known: dict[str, Lease] = {}

    def _wait_for_config(self) -> Config:
        while True:
            try:
                answer, _ = self.etcd.call("GET", f"{self.prefix}/config")
                return parse_config(answer["node"]["value"])
            except V2Error as e:
                log(f"Couldn't fetch network config: {e}")
            except OSError as e:
                log(f"Couldn't fetch network config: {e}")
            time.sleep(1)

    def _list(self) -> tuple[dict[str, str], int]:
        """key -> value of every lease, and the index to watch after."""
        try:
            answer, index = self.etcd.call("GET", f"{self.prefix}/subnets",
                                           {"recursive": "true", "quorum": "true"})
        except V2Error as e:
            if e.code == 100:  # the directory does not exist yet
                return {}, e.index
            raise
        nodes = answer["node"].get("nodes", [])
        return {n["key"]: n.get("value", "") for n in nodes if not n.get("dir")}, index

    def _previous_subnet(self) -> IPv4Network | None:
        try:
            for line in self.subnet_file.read_text().splitlines():
                if line.startswith("FLANNEL_SUBNET="):
                    return ipaddress.IPv4Interface(line.split("=", 1)[1]).network
        except (OSError, ValueError):
            pass
        return None

    def acquire(self) -> tuple[IPv4Network, float]:
        while True:
            leases, _ = self._list()
            parsed = [lease for k, v in leases.items() if (lease := parse_lease(k, v))]
            mine = next((lease for lease in parsed if lease.public_ip == self.public_ip
                         and lease.subnet.subnet_of(self.config.network)), None)
            if mine is not None:
                self._put(mine.subnet, {"prevExist": "true"})
                log(f"Found lease ({mine.subnet}) for current IP ({self.public_ip}), reusing")
                return mine.subnet, time.time() + LEASE_TTL
            taken = {lease.subnet for lease in parsed}
            previous = self._previous_subnet()
            if (previous is not None and previous.subnet_of(self.config.network)
                    and previous.prefixlen == self.config.subnet_len and previous not in taken):
                subnet = previous
            else:
                free = []
                addr = int(self.config.subnet_min.network_address)
                step = 1 << (32 - self.config.subnet_len)
                while addr <= int(self.config.subnet_max.network_address) and len(free) < 100:
                    candidate = IPv4Network((addr, self.config.subnet_len))
                    if candidate not in taken:
                        free.append(candidate)
                    addr += step
                if not free:
                    raise SystemExit("flanneld011: out of subnets")
                subnet = random.choice(free)
            try:
                self._put(subnet, {"prevExist": "false"})
            except V2Error as e:
                if e.code == 105:  # Key already exists: lost a race
                    continue
                raise
            log(f"Allocated lease ({subnet}) to current node ({self.public_ip})")
            return subnet, time.time() + LEASE_TTL

    def _put(self, subnet: IPv4Network, extra: dict[str, str]) -> None:
        self.etcd.call("PUT", f"{self.prefix}/subnets/{subnet_key(subnet)}",
                       form={"value": self.value, "ttl": str(LEASE_TTL), **extra})

    def write_subnet_env(self, subnet: IPv4Network) -> None:
        text = (f"FLANNEL_NETWORK={self.config.network}\n"
                f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}\n"
                f"FLANNEL_MTU={self.iface_mtu - self.backend.mtu_overhead}\n"
                "FLANNEL_IPMASQ=false\n")
        self.subnet_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.subnet_file.with_name(self.subnet_file.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.rename(self.subnet_file)

    def _renew(self, subnet: IPv4Network, expiration: float) -> None:
        while True:
            time.sleep(max(0.0, expiration - RENEW_MARGIN - time.time()))
            try:
                self._put(subnet, {})
                expiration = time.time() + LEASE_TTL
                log(f"Lease renewed, new expiration: {time.ctime(expiration)}")
            except (V2Error, OSError) as e:
                log(f"Error renewing lease (trying again in 1 min): {e}")
                time.sleep(60)

    def _apply(self, kind: str, key: str, value: str) -> None:
        if kind == "put":
            lease = parse_lease(key, value)
            if lease is None or lease.subnet == self.subnet:
                return
            old = self.known.get(key)
            if old is not None and old != lease:
                self.backend.remove(old)
            self.known[key] = lease
            log(f"Subnet added: {lease.subnet} via {lease.public_ip}")
            self.backend.add(lease)
        else:
            lease = self.known.pop(key, None)
            if parse_key(key) == self.subnet:
                log("Lease has been revoked. Shutting down daemon.")
                os._exit(1)
            if lease is not None:
                log(f"Subnet removed: {lease.subnet}")
                self.backend.remove(lease)

    def _sync(self, leases: dict[str, str]) -> None:
        for key in list(self.known):
            if key not in leases:
                self._apply("delete", key, "")
        for key, value in leases.items():
            self._apply("put", key, value)

    def watch(self) -> None:
        index: int | None = None
        while True:
            try:
                if index is None:
                    leases, index = self._list()
                    self._sync(leases)
                answer, _ = self.etcd.call("GET", f"{self.prefix}/subnets", {
                    "wait": "true", "recursive": "true", "waitIndex": str(index + 1)},
                    timeout=WATCH_TIMEOUT)
            except V2Error as e:
                if e.code == 401:  # the event at that index is cleared: list again
                    log(f"Watch of subnets: {e}; listing again")
                    index = None
                    continue
                log(f"Watch of subnets failed: {e}")
                time.sleep(1)
                continue
            except OSError as e:
                if "timed out" not in str(e):
                    log(f"Watch of subnets failed: {e}")
                    time.sleep(1)
                continue
            node = answer.get("node", {})
            index = node.get("modifiedIndex", index + 1)
            if node.get("dir"):
                continue
            if answer["action"] in ("set", "create", "update", "compareAndSwap"):
                self._apply("put", node["key"], node.get("value", ""))
            elif answer["action"] in ("delete", "expire", "compareAndDelete"):
                self._apply("delete", node["key"], "")

    def run(self) -> None:
        log(f"Using interface with name {self.iface} and address {self.public_ip}")
        self.subnet, expiration = self.acquire()
        self.backend.start(self.subnet)
        self.write_subnet_env(self.subnet)
        log(f"Wrote subnet file to {self.subnet_file}")
        threading.Thread(target=self._renew, args=(self.subnet, expiration),
                         daemon=True).start()
        self.watch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flanneld011", description=__doc__.splitlines()[0])
    parser.add_argument("--etcd-endpoints", default="http://127.0.0.1:4001,"
                        "http://127.0.0.1:2379")
    parser.add_argument("--etcd-prefix", default="/coreos.com/network")
    parser.add_argument("--iface")
    parser.add_argument("--public-ip")
    parser.add_argument("--subnet-file", default="/run/flannel/subnet.env")
    parser.add_argument("--ip-masq", action="store_true")
    args = parser.parse_args(argv)
    if args.ip_masq:
        parser.error("--ip-masq is not imitated by this stand-in")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        Node(args).run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
