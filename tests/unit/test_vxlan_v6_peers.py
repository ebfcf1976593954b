"""The vxlan backend's IPv6 side as data, without a network: the IPv6 device's VtepMAC and
BackendV6Data, its MTU, and how a dual-stack peer's IPv6 half becomes flanneld's three entries
on flannel-v6.<VNI> (or is ignored, saying why)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, IPv6Network

from flannel_udp.backends.vxlan.options import vtep_mac_for, vxlan_settings
from flannel_udp.backends.vxlan.peers import V6Peer, plan_vxlan_v6_peer
from flannel_udp.config import parse_config
from flannel_udp.netlink import ExtIface, FdbEntry, Neighbour, Route

PUBLIC_IP = IPv4Address("192.168.77.11")
PUBLIC_IPV6 = IPv6Address("fd77::11")
CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
EXT = ExtIface(name="eth0", index=2, address=PUBLIC_IP, mtu=1500)
PEER_MAC = "66:3c:4e:3e:2d:52"


def settings(public_ipv6: IPv6Address | None = PUBLIC_IPV6):
    return vxlan_settings(CONFIG, EXT, PUBLIC_IP, public_ipv6)


def encapsulate(peer: V6Peer, mac: bytes):
    gateway = peer.subnet.network_address
    return (Neighbour(gateway, mac, 7), FdbEntry(mac, peer.public_ip, 7),
            Route(peer.subnet, gateway, 7, onlink=True))


def test_the_v6_device_has_its_own_vtep_mac_in_backend_v6_data_and_mtu_underlay_minus_70():
    s = settings()
    assert s.v6_vtep_mac == vtep_mac_for(PUBLIC_IPV6, 1) != s.vtep_mac
    assert s.v6_vtep_mac[0] & 0x03 == 0x02  # unicast, locally administered
    mac = ":".join(f"{b:02x}" for b in s.v6_vtep_mac)
    assert s.backend_v6_data == f'{{"VNI":1,"VtepMAC":"{mac}"}}'.encode()
    assert (s.mtu, s.v6_device_mtu) == (1450, 1430)
    assert settings(None).backend_v6_data is None


def test_a_dual_stack_peer_s_v6_half_is_flanneld_s_neighbour_fdb_and_onlink_route():
    peer = V6Peer(IPv6Network("fd99:0:0:25::/64"), IPv6Address("fd77::12"),
                  f'{{"VNI":1,"VtepMAC":"{PEER_MAC}"}}'.encode())
    plan = plan_vxlan_v6_peer(peer, settings(), encapsulate)
    mac = bytes.fromhex(PEER_MAC.replace(":", ""))
    gateway = IPv6Address("fd99:0:0:25::")
    assert plan.problem is None and plan.path == "vxlan"
    assert plan.entries == (Neighbour(gateway, mac, 7),
                            FdbEntry(mac, IPv6Address("fd77::12"), 7),
                            Route(peer.subnet, gateway, 7, onlink=True))
    assert plan.shown == {"vtep_mac": PEER_MAC}


def test_a_v6_half_without_public_ipv6_of_another_vni_or_malformed_is_ignored_saying_why():
    subnet = IPv6Network("fd99:0:0:25::/64")
    good = f'{{"VNI":1,"VtepMAC":"{PEER_MAC}"}}'.encode()
    cases = {V6Peer(subnet, None, good): "no PublicIPv6",
             V6Peer(subnet, IPv6Address("fd77::12"), b'{"VNI":2,"VtepMAC":"%s"}'
                    % PEER_MAC.encode()): "VNI 2 is not ours (1)",
             V6Peer(subnet, IPv6Address("fd77::12"), None): "BackendV6Data",
             V6Peer(subnet, IPv6Address("fd77::12"), b'{"VNI":1}'): "BackendV6Data"}
    for peer, why in cases.items():
        plan = plan_vxlan_v6_peer(peer, settings(), encapsulate)
        assert (plan.path, plan.entries) == ("ignored", ()), peer
        assert why in (plan.problem or ""), (peer, plan.problem)
    assert json.loads(good)["VtepMAC"] == PEER_MAC
