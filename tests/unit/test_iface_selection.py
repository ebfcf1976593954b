"""Underlay interface selection as flanneld v0.22.3 does it (--iface repeatable, first match
wins; then each --iface-regex, addresses before names; then --iface-can-reach; with none of
them the interface holding --public-ip, else the default route's), against real interfaces in
a host namespace: eth0 (192.168.77.11, default route), ens5 (a link-local address first, then
10.9.0.2; 10.50.0.0/16 routed through it), ens5p (no IPv4 address), lo."""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import pytest

from flannel_udp.errors import UserError
from flannel_udp.lab import Host
from flannel_udp.netlink import IfaceChoice, find_interface

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def host(module_topology) -> Host:
    h1 = module_topology(1).host(1)
    h1.run("ip", "link", "add", "ens5", "type", "veth", "peer", "name", "ens5p")
    h1.run("ip", "addr", "add", "169.254.3.3/16", "dev", "ens5")
    h1.run("ip", "addr", "add", "10.9.0.2/24", "dev", "ens5")
    for dev in ("ens5", "ens5p"):
        h1.run("ip", "link", "set", dev, "up")
    h1.run("ip", "route", "add", "default", "via", "192.168.77.1", "dev", "eth0")
    h1.run("ip", "route", "add", "10.50.0.0/16", "via", "10.9.0.1", "dev", "ens5")
    return h1


def pick(host: Host, *names: str, regexes: tuple[str, ...] = (), can_reach: str | None = None,
         public_ip: str | None = None) -> tuple[str, str]:
    choice = IfaceChoice(names=names, regexes=tuple(re.compile(r) for r in regexes),
                         can_reach=IPv4Address(can_reach) if can_reach else None)
    ext = find_interface(choice, IPv4Address(public_ip) if public_ip else None, netns=host.name)
    return ext.name, str(ext.address)


@pytest.mark.parametrize(("names", "chosen"), [
    (("nosuch", "ens5"), ("ens5", "10.9.0.2")),  # the first that exists wins
    (("ens5", "eth0"), ("ens5", "10.9.0.2")),  # ... not the last
    (("10.9.0.2",), ("ens5", "10.9.0.2")),  # by address
    (("169.254.3.3",), ("ens5", "169.254.3.3")),  # by address: that address
    (("10.9.9.9", "192.168.77.11"), ("eth0", "192.168.77.11")),
    (("ens5p", "eth0"), ("eth0", "192.168.77.11")),  # no IPv4 address: not a match
    (("lo", "127.0.0.1", "eth0"), ("eth0", "192.168.77.11")),  # loopback: not a match
])
def test_the_first_iface_that_exists_with_an_ipv4_address_wins(host, names, chosen):
    assert pick(host, *names) == chosen


@pytest.mark.parametrize(("regexes", "chosen"), [
    ((r"^10\.9\.",), ("ens5", "10.9.0.2")),
    ((r"^169\.254\.",), ("ens5", "169.254.3.3")),  # the matching address, not the first
    ((r"^ens5$",), ("ens5", "10.9.0.2")),  # by name: its global address before link-local
    ((r"^wlan", r"^eth"), ("eth0", "192.168.77.11")),  # the first regex that matches
    # Addresses are checked before names: eth0's name matches, ens5's address does too.
    ((r"^(eth0|10\.9\.0\.2)$",), ("ens5", "10.9.0.2")),
])
def test_an_iface_regex_matches_addresses_then_names(host, regexes, chosen):
    assert pick(host, regexes=regexes) == chosen


def test_iface_comes_before_iface_regex_which_comes_before_iface_can_reach(host):
    assert pick(host, "eth0", regexes=(r"^ens5$",), can_reach="10.50.1.1") == (
        "eth0", "192.168.77.11")
    assert pick(host, "nosuch", regexes=(r"^ens5$",), can_reach="192.168.77.99") == (
        "ens5", "10.9.0.2")
    assert pick(host, "nosuch", regexes=(r"^wlan",), can_reach="10.50.1.1") == (
        "ens5", "10.9.0.2")


@pytest.mark.parametrize(("target", "chosen"), [
    ("10.50.1.1", ("ens5", "10.9.0.2")),  # through the gateway on ens5: its source address
    ("192.168.77.99", ("eth0", "192.168.77.11")),  # on eth0's segment
    ("8.8.8.8", ("eth0", "192.168.77.11")),  # the default route
])
def test_iface_can_reach_takes_the_interface_and_source_of_ip_route_get(host, target, chosen):
    assert pick(host, can_reach=target) == chosen


@pytest.mark.parametrize(("public_ip", "chosen"), [
    (None, ("eth0", "192.168.77.11")),  # the default route's
    ("10.9.0.2", ("ens5", "10.9.0.2")),  # the interface holding --public-ip (flanneld v0.22)
    ("203.0.113.7", ("eth0", "192.168.77.11")),  # held by none (NAT): the default route's
])
def test_without_selection_flags_the_public_ip_or_the_default_route_decides(host, public_ip,
                                                                             chosen):
    assert pick(host, public_ip=public_ip) == chosen


def test_nothing_matching_is_one_error_naming_each_candidate(host):
    with pytest.raises(UserError) as raised:
        pick(host, "nosuch", "lo", "ens5p", regexes=(r"^wlan", r"^ens5p$"),
             can_reach="127.0.0.1")
    message = str(raised.value)
    assert "\n" not in message
    for part in ("--iface nosuch: no such interface", "--iface lo: lo is the loopback",
                 "--iface ens5p: interface ens5p has no IPv4 address",
                 "--iface-regex ^wlan: matches no interface's name or IPv4 address",
                 # flanneld takes the first name that matches, even without an address
                 "--iface-regex ^ens5p$: interface ens5p has no IPv4 address",
                 "--iface-can-reach 127.0.0.1: lo is the loopback"):
        assert part in message, message


def test_a_single_candidate_is_named_alone(host):
    with pytest.raises(UserError, match=r"^--iface nope0: no such interface$"):
        pick(host, "nope0")
    with pytest.raises(UserError, match=r"^--iface 10\.9\.9\.9: no interface has this address$"):
        pick(host, "10.9.9.9")


def test_an_ipv6_only_network_picks_the_ipv6_default_route_s_interface(module_topology):
    """As flanneld's GetDefaultV6GatewayInterface: the IPv6 default route's interface, which
    needs no IPv4 address, even where an IPv4 default route leaves by another one."""
    h1 = module_topology(1).host(1)
    h1.run("ip", "link", "add", "ens6", "type", "veth", "peer", "name", "ens6p")
    for dev in ("ens6", "ens6p"):
        h1.run("ip", "link", "set", dev, "up")
    h1.run("ip", "addr", "add", "fd66::2/64", "dev", "ens6", "nodad")
    h1.run("ip", "route", "add", "default", "via", "192.168.77.1", "dev", "eth0")
    with pytest.raises(UserError, match="^no IPv6 default route to pick the interface from"):
        find_interface(IfaceChoice(), None, netns=h1.name, need_ipv4=False)
    h1.run("ip", "-6", "route", "add", "default", "via", "fd66::1", "dev", "ens6")
    ext = find_interface(IfaceChoice(), None, netns=h1.name, need_ipv4=False)
    assert (ext.name, str(ext.address)) == ("ens6", "0.0.0.0")
    assert find_interface(IfaceChoice(), None, netns=h1.name).name == "eth0"  # dual stack, v4
