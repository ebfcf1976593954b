"""What a backend offers the daemon is declared: a `Network` or `UserspaceDataplane` that leaves
a member out can't be constructed, so a wrapper (vxlan's "auto") can't lose a feature quietly.
No devices: only classes are built."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address

import pytest

from flannel_udp.backends import (
    BACKENDS,
    DataplaneSettings,
    Network,
    UserspaceDataplane,
    make_network,
)
from flannel_udp.backends.userspace import TunNetwork
from flannel_udp.backends.vxlan.auto import AutoVxlanNetwork
from flannel_udp.backends.vxlan.userspace import VxlanNetwork
from flannel_udp.config import parse_config
from flannel_udp.netlink import ExtIface

PUBLIC_IP = IPv4Address("192.168.77.13")
EXT = ExtIface(name="eth0", index=2, address=PUBLIC_IP, mtu=1500)


def test_every_feature_the_daemon_uses_is_an_abstract_member():
    assert Network.__abstractmethods__ == {
        "open", "start", "accepts", "add_peer", "remove_peer", "stats", "peer_stats",
        "route_count", "userspace", "close"}
    assert UserspaceDataplane.__abstractmethods__ == {
        "source_check", "busy_poll_us", "running", "counters", "offloads", "set_trace",
        "trace_drain", "trace_info"}


def test_a_wrapper_that_leaves_out_userspace_cannot_be_constructed():
    class Forgetful(Network):
        """A wrapper passing on everything but the userspace data plane."""

        def __init__(self, inner: Network) -> None:
            self.inner = inner

        def open(self) -> None: self.inner.open()
        def start(self, lease, peers) -> None: self.inner.start(lease, peers)
        def accepts(self, lease) -> bool: return self.inner.accepts(lease)
        def add_peer(self, lease) -> None: self.inner.add_peer(lease)
        def remove_peer(self, subnet) -> None: self.inner.remove_peer(subnet)
        def stats(self) -> dict: return self.inner.stats()
        def peer_stats(self, ident) -> dict | None: return self.inner.peer_stats(ident)
        def route_count(self) -> int: return self.inner.route_count()
        def close(self) -> None: self.inner.close()

    with pytest.raises(TypeError, match="userspace"):
        Forgetful(make_network(parse_config('{"Network": "10.244.0.0/16"}'), EXT, PUBLIC_IP,
                               DataplaneSettings()))


def test_a_userspace_dataplane_that_leaves_out_trace_cannot_be_constructed():
    class NoTrace(TunNetwork):
        set_trace = UserspaceDataplane.set_trace  # the abstract one, not TunNetwork's

    with pytest.raises(TypeError, match="set_trace"):
        NoTrace(parse_config('{"Network": "10.244.0.0/16"}'), EXT, DataplaneSettings())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_gets_the_settings_and_is_a_network(backend):
    config = parse_config(json.dumps({"Network": "10.244.0.0/16",
                                      "Backend": {"Type": backend}}))
    settings = DataplaneSettings(source_check=False, busy_poll_us=300)
    network = make_network(config, EXT, PUBLIC_IP, settings)
    assert isinstance(network, Network)
    if backend == "udp":
        assert network.userspace() is network
        assert (network.source_check, network.busy_poll_us) == (False, 300)
    if backend == "vxlan":  # "auto": the userspace candidate has them before open() chooses
        assert isinstance(network, AutoVxlanNetwork)
        candidate = network._userspace
        assert isinstance(candidate, VxlanNetwork)
        assert (candidate.source_check, candidate.busy_poll_us) == (False, 300)


@pytest.mark.parametrize("dataplane", ["kernel", "auto", "userspace"])
def test_vxlan_on_every_dataplane_takes_enable_ipv6_and_publishes_backend_v6_data(dataplane):
    config = parse_config(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True,
                                      "IPv6Network": "fd99::/56",
                                      "Backend": {"Type": "vxlan", "Dataplane": dataplane}}))
    network = make_network(config, EXT, PUBLIC_IP, DataplaneSettings(),
                           IPv6Address("fd77::11"))
    data = json.loads(network.backend_v6_data or b"null")
    assert data["VNI"] == 1 and data["VtepMAC"] != json.loads(network.backend_data)["VtepMAC"]
    if dataplane == "auto":  # whichever open() takes, the lease is the same
        assert network._userspace.backend_v6_data == network._kernel.backend_v6_data


def test_userspace_vxlan_has_the_ipv6_vtep_mac_kernel_vxlan_would_have():
    """So a node whose Dataplane "auto" falls back to userspace publishes, and answers to, the
    BackendV6Data it would have with flannel-v6.<VNI>."""
    from flannel_udp.backends.vxlan.kernel import KernelVxlanNetwork
    from flannel_udp.lease import format_mac

    config = parse_config(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True,
                                      "IPv6Network": "fd99::/56", "Backend": {"Type": "vxlan"}}))
    public_ipv6 = IPv6Address("fd77::11")
    ours = VxlanNetwork(config, EXT, PUBLIC_IP, DataplaneSettings(), public_ipv6)
    kernel = KernelVxlanNetwork(config, EXT, PUBLIC_IP, public_ipv6)
    assert ours.backend_v6_data == kernel.backend_v6_data
    assert ours.vtep_mac6 == kernel.settings.v6_vtep_mac
    assert json.loads(ours.backend_v6_data)["VtepMAC"] == format_mac(ours.vtep_mac6)


def test_userspace_vxlan_publishes_its_own_ipv6_vtep_and_reads_the_peers():
    """Dual stack: BackendV6Data holds our VNI and an IPv6 VtepMAC of its own (as a flannel-v6
    device has), stable per node; a peer's IPv6 route goes to its BackendV6Data's VtepMAC, and
    a malformed or foreign one is refused."""
    from ipaddress import IPv4Network, IPv6Address, IPv6Network

    from flannel_udp.backends import Unreachable
    from flannel_udp.lease import Lease, format_mac

    config = parse_config(json.dumps({
        "Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd99::/56",
        "Backend": {"Type": "vxlan", "Dataplane": "userspace"}}))
    network = VxlanNetwork(config, EXT, PUBLIC_IP, DataplaneSettings(), IPv6Address("fd77::11"))
    data = json.loads(network.backend_v6_data)
    assert data["VNI"] == 1 and data["VtepMAC"] == format_mac(network.vtep_mac6)
    assert network.vtep_mac6 != network.vtep_mac
    assert VxlanNetwork(config, EXT, PUBLIC_IP, DataplaneSettings(),
                        IPv6Address("fd77::11")).vtep_mac6 == network.vtep_mac6
    v4_only = VxlanNetwork(parse_config(json.dumps({"Network": "10.244.0.0/16",
                                                    "Backend": {"Type": "vxlan"}})),
                           EXT, PUBLIC_IP, DataplaneSettings())
    assert v4_only.backend_v6_data is None

    def peer(v6_data: bytes | None) -> Lease:
        return Lease(IPv4Network("10.244.7.0/24"), IPv4Address("192.168.77.12"), "vxlan",
                     b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}',
                     ipv6_subnet=IPv6Network("fd99:0:0:7::/64"),
                     public_ipv6=IPv6Address("fd77::c"), backend_v6_data=v6_data)

    assert network._route_args6(peer(b'{"VNI":1,"VtepMAC":"0e:00:00:00:00:07"}')) == (
        bytes.fromhex("0e0000000007"),)
    for bad in (None, b'{"VNI":2,"VtepMAC":"0e:00:00:00:00:07"}', b'{"VNI":1}', b"nope"):
        with pytest.raises(Unreachable):
            network._route_args6(peer(bad))
