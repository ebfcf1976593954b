"""The dataplanes the bench compares. Each is set up on the same two-host topology and torn down
again, so that the next finds the hosts as they were (and its UDP port free): the bare underlay,
kernel VXLAN as flanneld programs it, flannel-udp's udp and vxlan backends, and a mixed pair (a
kernel VXLAN node sending to a flannel-udp vxlan node)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from flannel_udp import config
from flannel_udp.lab import UNDERLAY_MTU, Host, KernelVxlanNode, Netns, Topology, wait_until
from flannel_udp.lease import LEASE_TTL
from flannel_udp.stores.local import LocalStore

REFERENCE = "kernel-vxlan"
FLANNEL_NETWORK = "10.244.0.0/16"
FLANNEL_IPV6_NETWORK = "fd99::/56"
# flanneld would lease these; the kernel case has no daemon, so the bench plays its part.
KERNEL_SUBNETS = ("10.244.1.0/24", "10.244.2.0/24")
KERNEL_SUBNETS6 = ("fd99:0:0:1::/64", "fd99:0:0:2::/64")
VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
# --busy-poll of the "-busypoll" cases: twice the bench's ping interval, so that a thread is
# still polling when the next echo request comes.
BUSY_POLL_US = 20_000
# The `-qN` cases: the daemons with --queues N.
QUEUE_SETTINGS = (1, 2, 4)


@dataclass
class Endpoints:
    """Where a case's traffic goes: from `client` to `address` in `server`."""

    client: Netns
    server: Netns
    address: str
    mtu: int  # of the client's interface
    path: str  # for people: what the packets cross
    daemons: list[Host] = field(default_factory=list)  # hosts whose flannel-udp daemon forwards
    address6: str | None = None  # the server's IPv6 address (dual stack), for tcp1v6
    no_v6: str = "this case carries no IPv6"  # why, when address6 is None


def dual_stack_config(backend: dict) -> dict:
    """The cases' flannel network config: dual stack, as flanneld's EnableIPv6."""
    return {"Network": FLANNEL_NETWORK, "EnableIPv6": True, "IPv6Network": FLANNEL_IPV6_NETWORK,
            "Backend": backend}


def _wait_v6_peers(hosts: list[Host], peers: int) -> None:
    """Wait until each host's daemon has the IPv6 route of `peers` peers."""
    for host in hosts:
        wait_until(lambda h=host: len([p for p in h.status()["peers"] if "ipv6" in p]) >= peers,
                   20, f"{host.label}'s daemon to list {peers} IPv6 peer(s)")


class Case:
    """One dataplane: `setup` builds it on the topology, `teardown` removes it again."""

    name = ""
    title = ""
    kernel = True  # no daemon of ours: CPU and RSS are "n/a"

    def unavailable(self) -> str | None:
        """Why this case can't run in this tree, or None."""
        return None

    def setup(self, topo: Topology) -> Endpoints:
        raise NotImplementedError

    def teardown(self, topo: Topology) -> None:
        """Undo `setup`, also after it failed half-way."""


class Underlay(Case):
    name = "underlay"
    title = "bare underlay"

    def setup(self, topo: Topology) -> Endpoints:
        h1, h2 = topo.hosts
        return Endpoints(h1, h2, h2.underlay_ip, UNDERLAY_MTU,
                         f"{h1.label} -> {h2.label} on the underlay (veth, bridge, veth)",
                         address6=h2.underlay_ipv6)


class KernelVxlan(Case):
    name = REFERENCE
    title = "kernel VXLAN (as flanneld)"

    def __init__(self) -> None:
        self.nodes: list[KernelVxlanNode] = []

    def setup(self, topo: Topology) -> Endpoints:
        # Dual stack as flanneld with EnableIPv6: flannel.1, and flannel-v6.1 on the v6 underlay.
        for host, subnet, subnet6 in zip(topo.hosts, KERNEL_SUBNETS, KERNEL_SUBNETS6,
                                         strict=True):
            self.nodes.append(KernelVxlanNode(host, subnet, ipv6_subnet=subnet6))
        for node in self.nodes:
            for peer in self.nodes:
                if peer is not node:
                    node.add_peer(str(peer.subnet), peer.host.underlay_ip, peer.mac)
                    node.add_peer6(str(peer.ipv6_subnet), peer.host.underlay_ipv6, peer.mac6)
        mtu = UNDERLAY_MTU - VXLAN_OVERHEAD
        pods = [topo.add_pod(node.host, f"{node.subnet.network_address + 1}/"
                             f"{node.subnet.prefixlen}", mtu,
                             f"{node.ipv6_subnet.network_address + 1}/{node.ipv6_subnet.prefixlen}")
                for node in self.nodes]
        return Endpoints(pods[0], pods[1], pods[1].address, mtu,
                         f"pod {pods[0].address} -> pod {pods[1].address} over flannel.1 "
                         "(v6: flannel-v6.1)", address6=pods[1].address6)

    def teardown(self, topo: Topology) -> None:
        for pod in list(topo.pods):
            topo.remove_pod(pod)
        for node in self.nodes:
            node.remove()
        self.nodes.clear()


class FlannelUdp(Case):
    """A flannel-udp daemon on each host with `Backend.Type` = `backend`, one pod behind each;
    with `busy_poll_us`, run with --busy-poll; with `queues`, with --queues (else the
    default)."""

    kernel = False

    def __init__(self, backend: str, busy_poll_us: int = 0, queues: int | None = None) -> None:
        self.name = backend + ("-busypoll" if busy_poll_us else "") + (
            f"-q{queues}" if queues else "")
        self.title = f"flannel-udp {backend} backend" + (
            f", --busy-poll {busy_poll_us}" if busy_poll_us else "") + (
            f", --queues {queues}" if queues else "")
        self.backend = backend
        self.extra: tuple[str, ...] = ("--busy-poll", str(busy_poll_us)) if busy_poll_us else ()
        if queues:
            self.extra += ("--queues", str(queues))

    def unavailable(self) -> str | None:
        # Picked up by itself once `flannel-udp run` accepts the backend.
        if self.backend not in config.IMPLEMENTED_BACKENDS:
            return (f"flannel-udp run does not accept Backend.Type {self.backend!r} yet "
                    "(config.IMPLEMENTED_BACKENDS)")
        return None

    def setup(self, topo: Topology) -> Endpoints:
        # A store of its own, so that no lease or config of an earlier case is in the way.
        # Dataplane userspace: "auto" would measure the kernel's VXLAN device again.
        backend = {"Type": self.backend, "Dataplane": "userspace"}
        topo.start_daemons(dual_stack_config(backend), None, *self.extra,
                           store=topo.dir / f"store-{self.name}.msgpack")
        _wait_v6_peers(topo.hosts, len(topo.hosts) - 1)
        pods = [topo.add_pod(host) for host in topo.hosts]
        mtu = int(topo.hosts[0].subnet_env()["FLANNEL_MTU"])
        return Endpoints(pods[0], pods[1], pods[1].address, mtu,
                         f"pod {pods[0].address} -> pod {pods[1].address} through the daemons",
                         list(topo.hosts), address6=pods[1].address6)

    def teardown(self, topo: Topology) -> None:
        for pod in list(topo.pods):
            topo.remove_pod(pod)
        for host in topo.hosts:
            if host.daemon is not None:  # stop_flannel only signals one that still runs
                host.stop_flannel()


class KernelToVxlan(FlannelUdp):
    """A kernel VXLAN node as flanneld programs it (h1, offloads as they come: its frames reach
    h2 with inner checksums partial and as GSO frames) sending to a flannel-udp vxlan node (h2,
    userspace dataplane): the stream a mixed cluster on one machine carries."""

    def __init__(self) -> None:
        super().__init__("vxlan")
        self.name = "kernel-to-vxlan"
        self.title = "kernel VXLAN node -> flannel-udp vxlan node"
        self.node: KernelVxlanNode | None = None

    def setup(self, topo: Topology) -> Endpoints:
        h1, h2 = topo.hosts
        store = topo.dir / f"store-{self.name}.msgpack"
        node = self.node = KernelVxlanNode(h1, KERNEL_SUBNETS[0], ipv6_subnet=KERNEL_SUBNETS6[0])
        asyncio.run(LocalStore(store).put_lease(node.lease_key(), node.lease_value(), LEASE_TTL))
        backend = {"Type": "vxlan", "Dataplane": "userspace"}
        [ours] = topo.start_daemons(dual_stack_config(backend), [h2], store=store).values()
        _wait_v6_peers([h2], 1)
        node.add_peer(ours["subnet"], h2.underlay_ip, ours["vtep_mac"])
        node.add_peer6(ours["ipv6_subnet"], h2.underlay_ipv6, ours["ipv6_vtep_mac"])
        mtu = UNDERLAY_MTU - VXLAN_OVERHEAD
        sender = topo.add_pod(h1, f"{node.subnet.network_address + 1}/{node.subnet.prefixlen}",
                              mtu, f"{node.ipv6_subnet.network_address + 1}/"
                              f"{node.ipv6_subnet.prefixlen}")
        receiver = topo.add_pod(h2)
        return Endpoints(sender, receiver, receiver.address, mtu,
                         f"pod {sender.address} -> pod {receiver.address}, kernel VXLAN on "
                         f"{h1.label} to the daemon on {h2.label}", [h2],
                         address6=receiver.address6)

    def teardown(self, topo: Topology) -> None:
        super().teardown(topo)
        if self.node is not None:
            self.node.remove()
            self.node = None


# In the order they run and are shown: the reference before the cases measured against it.
CASES: dict[str, Callable[[], Case]] = {
    "underlay": Underlay,
    REFERENCE: KernelVxlan,
    "udp": lambda: FlannelUdp("udp"),
    "vxlan": lambda: FlannelUdp("vxlan"),
    "kernel-to-vxlan": KernelToVxlan,
    "udp-busypoll": lambda: FlannelUdp("udp", BUSY_POLL_US),
    "vxlan-busypoll": lambda: FlannelUdp("vxlan", BUSY_POLL_US),
    # Each queue setting (run --queues N), named; "udp" and "vxlan" run the default.
    **{f"{backend}-q{n}": (lambda b=backend, q=n: FlannelUdp(b, queues=q))
       for n in QUEUE_SETTINGS for backend in ("udp", "vxlan")},
    **{f"{backend}-busypoll-q{n}": (lambda b=backend, q=n: FlannelUdp(b, BUSY_POLL_US, q))
       for n in QUEUE_SETTINGS for backend in ("udp", "vxlan")},
}
