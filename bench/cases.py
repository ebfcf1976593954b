"""The dataplanes the bench compares. Each is set up on the same two-host topology and torn down
again, so that the next finds the hosts as they were (and its UDP port free): the bare underlay,
kernel VXLAN as flanneld programs it, flannel-udp's udp and vxlan backends, and a mixed pair (a
kernel VXLAN node sending to a flannel-udp vxlan node)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from flannel_udp import config
from flannel_udp.lab import UNDERLAY_MTU, Host, KernelVxlanNode, Netns, Topology
from flannel_udp.lease import LEASE_TTL, subnet_key
from flannel_udp.stores.local import LocalStore

REFERENCE = "kernel-vxlan"
FLANNEL_NETWORK = "10.244.0.0/16"
# flanneld would lease these; the kernel case has no daemon, so the bench plays its part.
KERNEL_SUBNETS = ("10.244.1.0/24", "10.244.2.0/24")
VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
# --busy-poll of the "-busypoll" cases: twice the bench's ping interval, so that a thread is
# still polling when the next echo request comes.
BUSY_POLL_US = 20_000


@dataclass
class Endpoints:
    """Where a case's traffic goes: from `client` to `address` in `server`."""

    client: Netns
    server: Netns
    address: str
    mtu: int  # of the client's interface
    path: str  # for people: what the packets cross
    daemons: list[Host] = field(default_factory=list)  # hosts whose flannel-udp daemon forwards


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
                         f"{h1.label} -> {h2.label} on the underlay (veth, bridge, veth)")


class KernelVxlan(Case):
    name = REFERENCE
    title = "kernel VXLAN (as flanneld)"

    def __init__(self) -> None:
        self.nodes: list[KernelVxlanNode] = []

    def setup(self, topo: Topology) -> Endpoints:
        for host, subnet in zip(topo.hosts, KERNEL_SUBNETS, strict=True):
            self.nodes.append(KernelVxlanNode(host, subnet))
        for node in self.nodes:
            for peer in self.nodes:
                if peer is not node:
                    node.add_peer(str(peer.subnet), peer.host.underlay_ip, peer.mac)
        mtu = UNDERLAY_MTU - VXLAN_OVERHEAD
        pods = [topo.add_pod(node.host, f"{node.subnet.network_address + 1}/"
                             f"{node.subnet.prefixlen}", mtu) for node in self.nodes]
        return Endpoints(pods[0], pods[1], pods[1].address, mtu,
                         f"pod {pods[0].address} -> pod {pods[1].address} over flannel.1")

    def teardown(self, topo: Topology) -> None:
        for pod in list(topo.pods):
            topo.remove_pod(pod)
        for node in self.nodes:
            node.remove()
        self.nodes.clear()


class FlannelUdp(Case):
    """A flannel-udp daemon on each host with `Backend.Type` = `backend`, one pod behind each;
    with `busy_poll_us`, run with --busy-poll."""

    kernel = False

    def __init__(self, backend: str, busy_poll_us: int = 0) -> None:
        self.name = f"{backend}-busypoll" if busy_poll_us else backend
        self.title = f"flannel-udp {backend} backend" + (
            f", --busy-poll {busy_poll_us}" if busy_poll_us else "")
        self.backend = backend
        self.extra = ("--busy-poll", str(busy_poll_us)) if busy_poll_us else ()

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
        topo.start_daemons({"Network": FLANNEL_NETWORK, "Backend": backend}, None, *self.extra,
                           store=topo.dir / f"store-{self.name}.msgpack")
        pods = [topo.add_pod(host) for host in topo.hosts]
        mtu = int(topo.hosts[0].subnet_env()["FLANNEL_MTU"])
        return Endpoints(pods[0], pods[1], pods[1].address, mtu,
                         f"pod {pods[0].address} -> pod {pods[1].address} through the daemons",
                         list(topo.hosts))

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
        self.node = KernelVxlanNode(h1, KERNEL_SUBNETS[0])
        asyncio.run(LocalStore(store).put_lease(subnet_key(self.node.subnet),
                                                self.node.lease_value(), LEASE_TTL))
        backend = {"Type": "vxlan", "Dataplane": "userspace"}
        [ours] = topo.start_daemons({"Network": FLANNEL_NETWORK, "Backend": backend}, [h2],
                                    store=store).values()
        self.node.add_peer(ours["subnet"], h2.underlay_ip, ours["vtep_mac"])
        mtu = UNDERLAY_MTU - VXLAN_OVERHEAD
        sender = topo.add_pod(h1, f"{self.node.subnet.network_address + 1}/"
                              f"{self.node.subnet.prefixlen}", mtu)
        receiver = topo.add_pod(h2)
        return Endpoints(sender, receiver, receiver.address, mtu,
                         f"pod {sender.address} -> pod {receiver.address}, kernel VXLAN on "
                         f"{h1.label} to the daemon on {h2.label}", [h2])

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
}
