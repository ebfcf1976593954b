"""The vxlan backend without a kernel: what it publishes, its MTU, which peers it takes."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_udp.backends import DataplaneSettings, make_network
from flannel_udp.backends.vxlan.options import vtep_mac_for
from flannel_udp.backends.vxlan.userspace import VxlanNetwork
from flannel_udp.config import parse_config
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, VxlanLeaseData, encode_lease_value
from flannel_udp.netlink import ExtIface

PUBLIC_IP = IPv4Address("192.168.77.13")


def network(mtu: int = 1500, **options) -> VxlanNetwork:
    options.setdefault("Dataplane", "userspace")
    config = parse_config(json.dumps({"Network": "10.244.0.0/16",
                                      "Backend": {"Type": "vxlan", **options}}))
    ext = ExtIface(name="eth0", index=2, address=PUBLIC_IP, mtu=mtu)
    made = make_network(config, ext, PUBLIC_IP, DataplaneSettings())
    assert isinstance(made, VxlanNetwork)
    return made


def peer(data: bytes | None, backend_type: str = "vxlan") -> Lease:
    return Lease(IPv4Network("10.244.7.0/24"), IPv4Address("192.168.77.11"), backend_type, data)


def test_vtep_mac_is_stable_unicast_locally_administered_and_differs_by_node_and_vni():
    mac = vtep_mac_for(PUBLIC_IP, 1)
    assert len(mac) == 6 and mac == vtep_mac_for(PUBLIC_IP, 1)
    assert mac[0] & 0x01 == 0 and mac[0] & 0x02
    others = {vtep_mac_for(IPv4Address("192.168.77.14"), 1), vtep_mac_for(PUBLIC_IP, 2)}
    assert mac not in others and len(others) == 2


def test_the_lease_published_is_flannels_vxlan_lease():
    net = network()
    mac = ":".join(f"{b:02x}" for b in vtep_mac_for(PUBLIC_IP, 1))
    assert net.backend_type == "vxlan"
    assert encode_lease_value(PUBLIC_IP, net.backend_type, net.backend_data) == (
        b'{"PublicIP":"192.168.77.13","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"' + mac.encode() + b'"}}')


@pytest.mark.parametrize("iface_mtu, options, mtu", [
    (1500, {}, 1450),
    (9000, {}, 8950),
    (9000, {"MTU": 1500}, 1450),
    (1500, {"MTU": 118}, 68),
])
def test_pod_mtu_is_the_underlay_mtu_minus_50(iface_mtu, options, mtu):
    assert network(iface_mtu, **options).mtu == mtu


def test_an_interface_too_small_for_vxlan_is_refused_naming_it():
    with pytest.raises(UserError, match="eth0's MTU 117 is too small"):
        network(117)


def test_an_mtu_option_above_the_interface_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="flannel-udp"):
        assert network(1500, MTU=9000).mtu == 8950
    assert "Backend.MTU 9000 is above eth0's MTU 1500" in caplog.text


def test_tun_name_is_flvx_and_the_vni_and_the_port_flannels_default():
    net = network(VNI=16777215)
    assert net.tun_name == "flvx.16777215" and len(net.tun_name) <= 15  # IFNAMSIZ - 1
    assert net.port == 8472
    assert network(Port=4789).port == 4789


def test_only_well_formed_vxlan_leases_of_our_vni_are_reachable():
    net = network()
    good = VxlanLeaseData(1, bytes.fromhex("0efac0a84d0b")).encode()
    assert net.accepts(peer(good))
    assert net._route_args(peer(good)) == (bytes.fromhex("0efac0a84d0b"),)
    assert not net.accepts(peer(None, ""))  # flannel's udp
    assert not net.accepts(peer(b'{"VNI":1,"VtepMAC":"0e:fa"}'))
    assert not net.accepts(peer(None))
    assert not net.accepts(peer(VxlanLeaseData(2, bytes(6)).encode()))
    assert not net.accepts(peer(good, "host-gw"))


def test_a_v011_vxlan_lease_without_vni_is_a_peer_on_the_configs_vni():
    v011 = b'{"VtepMAC":"5a:28:a0:26:72:83"}'
    for vni in (1, 4096):
        net = network(VNI=vni)
        assert net.accepts(peer(v011))
        assert net._route_args(peer(v011)) == (bytes.fromhex("5a28a0267283"),)
