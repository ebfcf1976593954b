"""A `Topology`: hosts on a private bridge, pods behind them, optionally several underlay
segments joined by a router; a context manager that removes everything it made.

Layout (nothing is created in the root namespace; `ip netns add` only leaves a mount file under
/run/netns):

    <prefix>-sw   switch: bridge br0 with one port h<i> per host (br<k> per extra segment k)
    <prefix>-rt   router, only with several segments: eth<k> = 192.168.(77+k).1 on br<k>
                  (with `ipv6` also fd77:0:0:k::1)
    <prefix>-h<i> host i: eth0 = 192.168.77.(10+i)/24, MTU 1500, ip_forward on; runs a daemon;
                  with `ipv6`, also fd77::(10+i)/64 (hex; fd77:0:0:k::(10+i) on segment k)
                  and IPv6 forwarding on (dual stack)
    <prefix>-p<i> pod on a host: eth0 = second address of the host's flannel subnet, default
                  route via the host's side of the veth (pod<i>, which holds FLANNEL_SUBNET);
                  dual stack (FLANNEL_IPV6_SUBNET in subnet.env) the same in IPv6

`prefix` is `fu<pid>-<n>` (see `netns`). Each topology has a temp dir for the store, the network
config, and per host its subnet.env, control socket and daemon log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flannel_udp.lab.hosts import Host, Pod
from flannel_udp.lab.netns import (
    Netns,
    NetnsError,
    format_cmd,
    kill_namespace,
    list_namespaces,
    wait_until,
)

UNDERLAY_NET = ipaddress.IPv4Network("192.168.77.0/24")  # segment 0; segment k is 192.168.77+k
UNDERLAY_NET6 = ipaddress.IPv6Network("fd77::/64")  # segment 0's IPv6, with `ipv6`
UNDERLAY_MTU = 1500
DEFAULT_NETWORK_CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}
# The docs' promise: a lease put, deleted or expired in the store is in (or out of) every
# daemon's route table within a second.
LEASE_EVENT_BOUND = 1.0

_topology_ids = itertools.count()


def segment_net(segment: int) -> ipaddress.IPv4Network:
    """The underlay subnet of segment `segment` (bridge br<segment>; the router is .1)."""
    return ipaddress.IPv4Network((int(UNDERLAY_NET.network_address) + (segment << 8), 24))


def segment_net6(segment: int) -> ipaddress.IPv6Network:
    """The IPv6 underlay subnet of segment `segment` (with `ipv6`): fd77:0:0:<segment>::/64."""
    return ipaddress.IPv6Network((int(UNDERLAY_NET6.network_address) + (segment << 64), 64))


class Topology:
    """Hosts on one bridge, plus pods added later; a context manager that always cleans up."""

    def __init__(self, hosts: int = 3, prefix: str | None = None,
                 segments: Sequence[int] | None = None, ipv6: bool = False) -> None:
        """`segments`: the underlay segment of each host (default all 0); with more than one
        segment a router namespace `<prefix>-rt` joins them and every host routes the other
        segments through it, so hosts on different segments reach each other only via a
        gateway. `ipv6`: a dual-stack underlay (the router too)."""
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be between 1 and 200")
        self.ipv6 = ipv6
        self.prefix = prefix or f"fu{os.getpid()}-{next(_topology_ids)}"
        self.processes: list[subprocess.Popen] = []
        self.hosts: list[Host] = []
        self.pods: list[Pod] = []
        # Pod indexes are never reused, so a new pod's names can't meet a removed one's remains.
        self._pod_ids = itertools.count(1)
        self._namespaces: list[str] = []  # in creation order; deleted in reverse
        self._closed = False
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.store_path = self.dir / "store.msgpack"
        self.switch = Netns(f"{self.prefix}-sw", self.processes)
        try:
            self._build(hosts, list(segments or [0] * hosts))
        except BaseException:
            self.cleanup()
            raise

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def _add_namespace(self, name: str) -> None:
        # Recorded before creation so that a half-made namespace is still removed.
        self._namespaces.append(name)
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if result.returncode != 0:
            raise NetnsError(f"ip netns add {name}: {result.stderr.strip()}")
        if self.ipv6:
            # No DAD on the devices made here: their link-local addresses would stay tentative
            # for a second or two, and neighbour discovery through them with, losing the
            # first IPv6 packets of a fresh topology.
            Netns(name).run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0",
                            "net.ipv6.conf.all.accept_dad=0")

    def _ip(self, ns: str, *args: str) -> None:
        cmd = ["ip", "-n", ns, *args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise NetnsError(f"{format_cmd(cmd)}: {result.stderr.strip()}")

    def _build(self, count: int, segments: list[int]) -> None:
        if len(segments) != count:
            raise ValueError(f"segments names {len(segments)} hosts' segments, not {count}")
        sw = self.switch.name
        self._add_namespace(sw)
        self._ip(sw, "link", "set", "lo", "up")
        self.segments = sorted(set(segments) | {0})
        for segment in self.segments:
            self._ip(sw, "link", "add", f"br{segment}", "type", "bridge")
            self._ip(sw, "link", "set", f"br{segment}", "up")
        self.router: Netns | None = None
        if len(self.segments) > 1:
            self._add_router()
        for i in range(1, count + 1):
            self.add_host(i, segments[i - 1])

    def _add_router(self) -> None:
        """A namespace forwarding between the segments: leg eth<k> = .1 of segment k."""
        self.router = Netns(f"{self.prefix}-rt", self.processes)
        self._add_namespace(self.router.name)
        sw, rt = self.switch.name, self.router.name
        self._ip(rt, "link", "set", "lo", "up")
        for segment in self.segments:
            net = segment_net(segment)
            self._ip(sw, "link", "add", f"rt{segment}", "mtu", str(UNDERLAY_MTU), "type", "veth",
                     "peer", "name", f"eth{segment}", "mtu", str(UNDERLAY_MTU), "netns", rt)
            self._ip(sw, "link", "set", f"rt{segment}", "master", f"br{segment}", "up")
            self._ip(rt, "addr", "add", f"{net.network_address + 1}/{net.prefixlen}",
                     "dev", f"eth{segment}")
            if self.ipv6:
                self._ip(rt, "addr", "add", f"{segment_net6(segment).network_address + 1}/64",
                         "dev", f"eth{segment}", "nodad")
            self._ip(rt, "link", "set", f"eth{segment}", "up")
        self.router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        if self.ipv6:
            self.router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def add_host(self, index: int, segment: int = 0) -> Host:
        if segment not in self.segments:
            raise NetnsError(f"no segment {segment} (this topology has {self.segments})")
        directory = self.dir / f"h{index}"
        directory.mkdir()
        underlay_ip = str(segment_net(segment).network_address + 10 + index)
        host = Host(f"{self.prefix}-h{index}", index, directory, self.processes, underlay_ip,
                    segment)
        if self.ipv6:
            host.underlay_ipv6 = str(segment_net6(segment).network_address + 10 + index)
        self._add_namespace(host.name)
        self.hosts.append(host)
        sw = self.switch.name
        # The veth is made inside the switch namespace, its far end moved straight into the
        # host: it never exists in the root namespace.
        self._ip(sw, "link", "add", f"h{index}", "mtu", str(UNDERLAY_MTU), "type", "veth",
                 "peer", "name", "eth0", "mtu", str(UNDERLAY_MTU), "netns", host.name)
        self._ip(sw, "link", "set", f"h{index}", "master", f"br{segment}", "up")
        self._ip(host.name, "link", "set", "lo", "up")
        net = segment_net(segment)
        self._ip(host.name, "addr", "add", f"{host.underlay_ip}/{net.prefixlen}", "dev", "eth0")
        self._ip(host.name, "link", "set", "eth0", "up")
        for other in self.segments if self.router is not None else ():
            if other != segment:
                self._ip(host.name, "route", "add", str(segment_net(other)),
                         "via", str(net.network_address + 1))
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        if self.ipv6:
            # nodad: the address is usable at once (no tentative phase to wait out)
            self._ip(host.name, "addr", "add", f"{host.underlay_ipv6}/{UNDERLAY_NET6.prefixlen}",
                     "dev", "eth0", "nodad")
            host.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            for other in self.segments if self.router is not None else ():
                if other != segment:
                    self._ip(host.name, "-6", "route", "add", str(segment_net6(other)),
                             "via", str(segment_net6(segment).network_address + 1))
        return host

    def host(self, index: int) -> Host:
        """Host by its 1-based index (h1 is `host(1)`)."""
        return self.hosts[index - 1]

    def write_net_config(self, config: dict[str, Any] | str,
                         name: str = "net-conf.json") -> Path:
        """Write a network config file into the temp dir (a dict as JSON, a str verbatim)."""
        path = self.dir / name
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        return path

    def add_pod(self, host: Host, flannel_subnet: str | None = None,
                mtu: int | None = None, flannel_ipv6_subnet: str | None = None) -> Pod:
        """A pod namespace on `host`: the host's side of the veth gets `flannel_subnet` (the
        FLANNEL_SUBNET form, e.g. 10.244.3.1/24), the pod the next address with a default route
        via it, both MTU `mtu`. Both default to the host's subnet.env. One pod per host. Dual
        stack: the same in IPv6 with `flannel_ipv6_subnet` (FLANNEL_IPV6_SUBNET's form, e.g.
        fd99:0:0:5c::1/64), by default subnet.env's when that is read. IPv6-only (a subnet.env
        with no FLANNEL_SUBNET): the IPv6 side alone."""
        if any(p.host is host for p in self.pods):
            raise NetnsError(f"{host.label} has a pod already (one pod per host)")
        env = host.subnet_env() if flannel_subnet is None or mtu is None else {}
        if flannel_ipv6_subnet is not None:
            env["FLANNEL_IPV6_SUBNET"] = flannel_ipv6_subnet
        if flannel_subnet is None:
            flannel_subnet = env.get("FLANNEL_SUBNET")
        if mtu is None:
            mtu = int(env["FLANNEL_MTU"]) if "FLANNEL_MTU" in env else None
        if (flannel_subnet is None and not env.get("FLANNEL_IPV6_SUBNET")) or mtu is None:
            raise NetnsError(f"{host.label} has no subnet.env yet: pass flannel_subnet and mtu")
        gateway = address = None
        if flannel_subnet is not None:
            gateway = ipaddress.IPv4Interface(flannel_subnet)
            address = ipaddress.IPv4Interface(f"{gateway.ip + 1}/{gateway.network.prefixlen}")
        index = next(self._pod_ids)
        pod = Pod(f"{self.prefix}-p{index}", index, host,
                  None if address is None else str(address.ip),
                  None if gateway is None else str(gateway.ip), self.processes)
        self._add_namespace(pod.name)
        self.pods.append(pod)
        veth = f"pod{index}"
        self._ip(host.name, "link", "add", veth, "mtu", str(mtu), "type", "veth",
                 "peer", "name", "eth0", "mtu", str(mtu), "netns", pod.name)
        if gateway is not None:
            self._ip(host.name, "addr", "add", str(gateway), "dev", veth)
        self._ip(host.name, "link", "set", veth, "up")
        self._ip(pod.name, "link", "set", "lo", "up")
        if address is not None:
            self._ip(pod.name, "addr", "add", str(address), "dev", "eth0")
        self._ip(pod.name, "link", "set", "eth0", "up")
        if gateway is not None:
            self._ip(pod.name, "route", "add", "default", "via", str(gateway.ip))
        if env.get("FLANNEL_IPV6_SUBNET"):  # dual stack: the same in IPv6
            gateway6 = ipaddress.IPv6Interface(env["FLANNEL_IPV6_SUBNET"])
            address6 = ipaddress.IPv6Interface(f"{gateway6.ip + 1}/{gateway6.network.prefixlen}")
            self._ip(host.name, "addr", "add", str(gateway6), "dev", veth, "nodad")
            self._ip(pod.name, "addr", "add", str(address6), "dev", "eth0", "nodad")
            self._ip(pod.name, "-6", "route", "add", "default", "via", str(gateway6.ip))
            pod.address6 = str(address6.ip)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Delete a pod: whatever runs in it, its namespace and its veth (with the host's
        FLANNEL_SUBNET address), so that its host can take another pod."""
        # Deleting the host's end removes the pair at once; a deleted namespace's devices are
        # only torn down later by the kernel.
        self._ip(pod.host.name, "link", "del", f"pod{pod.index}")
        kill_namespace(pod.name)
        self._namespaces.remove(pod.name)
        self.pods.remove(pod)

    def start_daemons(self, config: dict[str, Any] | str = DEFAULT_NETWORK_CONFIG,
                      hosts: Sequence[Host] | None = None, *extra: str,
                      timeout: float = 20, store: str | os.PathLike | None = None
                      ) -> dict[str, dict[str, Any]]:
        """Start a daemon in each host (default: all) on the shared store (default
        `store_path`), seeded with `config`; wait until each has its lease and sees every other
        as a peer. Returns each host's lease (by label)."""
        hosts = list(self.hosts if hosts is None else hosts)
        net_config = self.write_net_config(config)
        for host in hosts:
            host.start_flannel(self.store_path if store is None else store, net_config, *extra)
        for host in hosts:
            host.wait_ready(timeout)
        return self.wait_peers(hosts, timeout)

    def wait_peers(self, hosts: Sequence[Host] | None = None,
                   timeout: float = 10) -> dict[str, dict[str, Any]]:
        """Wait until every host's daemon lists every other one's subnet as a peer; returns
        each host's lease (by label)."""
        hosts = list(self.hosts if hosts is None else hosts)
        leases = {h.label: h.lease() for h in hosts}
        for host in hosts:
            others = {leases[h.label]["subnet"] or leases[h.label]["ipv6_subnet"]
                      for h in hosts if h is not host}
            wait_until(lambda h=host, o=others: o <= h.peer_subnets(), timeout,
                       f"{host.label}'s daemon to list {', '.join(sorted(others))} as peers")
        return leases

    def log_tails(self, lines: int = 30) -> str:
        """The end of every daemon log, for a failure report."""
        parts = []
        for host in self.hosts:
            if host.log_path.exists():
                parts.append(f"== {host.label} ({host.name}) {host.log_path}\n"
                             f"{host.log_tail(lines)}")
        return "\n".join(parts)

    def leftovers(self) -> list[str]:
        """Namespaces of this topology that still exist (none after `cleanup`)."""
        return [n for n in list_namespaces() if n.startswith(f"{self.prefix}-")]

    def cleanup(self) -> None:
        """Stop every tracked process (SIGTERM, 5 s, SIGKILL), kill anything else left in the
        namespaces, delete them and the temp dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        running = [p for p in self.processes if p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.processes:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for host in self.hosts:
            host.close_log()
        for name in reversed(self._namespaces):
            kill_namespace(name)
        self._namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

