"""The routing models' decisions that need no kernel: which leases they ignore, and the resync
period's knob."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannel_udp.backends.hostgw import plan_host_gw
from flannel_udp.backends.peerroutes import DEFAULT_RESYNC, RESYNC_ENV, resync_period
from flannel_udp.backends.vxlan.options import VxlanSettings
from flannel_udp.backends.vxlan.peers import plan_vxlan_peer
from flannel_udp.config import NO_IPV4, NO_PUBLIC_IP, parse_config
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease

SETTINGS = VxlanSettings(vni=1, port=8472, mtu=1450, vtep_mac=bytes(6), direct_routing=True)


def lease(backend_type: str, data: bytes | None = None) -> Lease:
    return Lease(IPv4Network("10.244.7.0/24"), IPv4Address("192.168.77.11"), backend_type, data)


@pytest.mark.parametrize("backend_type", ["", "vxlan", "wireguard"])
def test_host_gw_ignores_leases_of_other_types_as_flannel_does(backend_type):
    plan = plan_host_gw(lease(backend_type))
    assert plan.entries == () and plan.path == "ignored" and not plan.reachable
    assert "not host-gw" in (plan.problem or "")


@pytest.mark.parametrize("backend_type, data, why", [
    ("host-gw", None, "not vxlan"),
    ("vxlan", b'{"VNI":1,"VtepMAC":"bad"}', "malformed vxlan lease"),
    ("vxlan", b'{"VNI":2,"VtepMAC":"0e:fa:00:00:00:01"}', "VNI 2 is not ours"),
])
def test_vxlan_plans_skip_leases_they_cannot_reach_before_any_route_lookup(backend_type, data,
                                                                           why):
    plan = plan_vxlan_peer(lease(backend_type, data), SETTINGS, lambda _lease, _mac: ())
    assert plan.entries == () and why in (plan.problem or "")


def test_resync_period_defaults_to_flannels_10_s_and_refuses_nonsense(monkeypatch):
    monkeypatch.delenv(RESYNC_ENV, raising=False)
    assert resync_period() == DEFAULT_RESYNC == 10.0
    monkeypatch.setenv(RESYNC_ENV, "0.5")
    assert resync_period() == 0.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(RESYNC_ENV, bad)
        with pytest.raises(UserError, match=RESYNC_ENV) as err:
            resync_period()
        assert err.value.exit_code == 2


def test_host_gw_in_an_ipv6_only_network_plans_the_ipv6_route_alone():
    config = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd99::/56",'
                          '"Backend":{"Type":"host-gw"}}')
    v6 = Lease(NO_IPV4, NO_PUBLIC_IP, "host-gw", ipv6_subnet=IPv6Network("fd99:0:0:25::/64"),
               public_ipv6=None)
    # never a route for the lease's empty IPv4 side (0.0.0.0/0 via 0.0.0.0)
    plan = plan_host_gw(v6, config)
    assert plan.entries == () and not plan.reachable
    assert plan.shown["ipv6_path"] == "none: the lease has no PublicIPv6"
    foreign = Lease(NO_IPV4, NO_PUBLIC_IP, "host-gw", ipv6_subnet=IPv6Network("fd98::/64"),
                    public_ipv6=IPv6Address("fd77::3"))
    assert "not a subnet of IPv6Network" in plan_host_gw(foreign, config).shown["ipv6_path"]
