"""Network config: flannel's defaults, and one clear refusal naming the field for each mistake."""

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannel_udp.backends.vxlan.options import VxlanOptions, vxlan_options
from flannel_udp.config import ConfigError, backend_port, parse_config


def test_defaults_follow_flannel_for_a_slash_16():
    cfg = parse_config('{"Network": "10.244.0.0/16"}')
    assert cfg.network == IPv4Network("10.244.0.0/16")
    assert cfg.subnet_len == 24
    assert cfg.subnet_min == IPv4Address("10.244.1.0")
    assert cfg.subnet_max == IPv4Address("10.244.255.0")
    assert cfg.backend_type == "udp"  # a missing Backend means udp in flannel


@pytest.mark.parametrize("network, subnet_len", [
    ("10.0.0.0/8", 24), ("10.1.0.0/22", 24), ("10.1.0.0/23", 25), ("10.1.0.0/26", 28),
])
def test_default_subnet_len_is_24_up_to_slash_22_then_prefix_plus_two(network, subnet_len):
    assert parse_config(f'{{"Network": "{network}"}}').subnet_len == subnet_len


def test_keys_are_matched_case_insensitively():
    cfg = parse_config('{"network": "10.5.0.0/16", "subnetlen": 26, '
                       '"backend": {"type": "UDP", "port": 9000}}')
    assert cfg.subnet_len == 26
    assert backend_port(cfg, 8285) == 9000


def test_explicit_min_and_max_are_kept():
    cfg = parse_config('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.10.0", '
                       '"SubnetMax": "10.5.20.0"}')
    assert (cfg.subnet_min, cfg.subnet_max) == (IPv4Address("10.5.10.0"),
                                                IPv4Address("10.5.20.0"))


V6 = '{"Network": "10.5.0.0/16", "EnableIPv6": true, '


@pytest.mark.parametrize("text, field", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"SubnetLen": 24}', "Network: missing"),
    ('{"Network": "10.5.0.0/33"}', "Network:"),
    ('{"Network": "banana"}', "Network:"),
    ('{"Network": 5}', "is not an IPv4 CIDR"),
    ('{"Network": "10.5.0.0/16", "Backend": []}', "Backend:"),
    ('{"Network": "10.5.0.0/29"}', "Network:"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 40}', "SubnetLen:"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 12}', "SubnetLen:"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', "SubnetLen:"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.7"}', "SubnetMin:"),
    ('{"Network": "10.5.0.0/16", "SubnetMax": "10.6.1.0"}', "SubnetMax:"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.3.0"}',
     "SubnetMin:"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "carrier-pigeon"}}', "Backend.Type:"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "wireguard"}}', "not implemented"),
    ('{"Network": "10.5.0.0/16", "Backend": "udp"}', "Backend:"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "IPv6Network: missing"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": "yes"}', "EnableIPv6: expected true or false"),
    ('{"Network": "10.5.0.0/16", "EnableIPv4": 0}', "EnableIPv4: expected true or false"),
    ('{"Network": "10.5.0.0/16", "EnableIPv4": false}', "EnableIPv4: false with no EnableIPv6"),
    ('{"EnableIPv4": false, "EnableIPv6": true}', "IPv6Network: missing with EnableIPv6"),
    # flannel's JSON decoding refuses a Network that is not a CIDR, IPv6-only or not
    ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd99::/56", "Network": "x"}',
     'Network: "x" is not an IPv4 CIDR'),
    (V6 + '"IPv6Network": "10.6.0.0/16"}', "IPv6Network: \"10.6.0.0/16\" is not an IPv6 CIDR"),
    (V6 + '"IPv6Network": "fd99::/125"}', "IPv6Network: fd99::/125 is too small"),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetLen": 57}',
     "IPv6SubnetLen: 57 is out of range for IPv6Network fd99::/56 (must be 58..126)"),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetLen": 127}', "IPv6SubnetLen: 127"),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetLen": "64"}', "IPv6SubnetLen: expected an"),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetMin": "fd98::"}',
     "IPv6SubnetMin: fd98:: is outside IPv6Network fd99::/56"),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetMax": "fd99:0:0:5::1"}',
     "IPv6SubnetMax: fd99:0:0:5::1 is not aligned to IPv6SubnetLen /64"),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetMin": "10.5.0.0"}',
     'IPv6SubnetMin: "10.5.0.0" is not an IPv6 address'),
    (V6 + '"IPv6Network": "fd99::/56", "IPv6SubnetMin": "fd99:0:0:9::", '
     '"IPv6SubnetMax": "fd99:0:0:3::"}', "IPv6SubnetMin: fd99:0:0:9:: is above IPv6SubnetMax"),
])
def test_bad_config_is_refused_naming_the_field(text, field):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    message = str(err.value)
    assert field in message
    assert "\n" not in message
    assert err.value.exit_code == 2


def test_dual_stack_defaults_are_flannels():
    # REFERENCE.md section 5's flanneld v0.22.3 config: /64 subnets, the first one skipped
    cfg = parse_config('{"EnableIPv6":true,"Network":"10.99.0.0/16","IPv6Network":"fd99::/56",'
                       '"Backend":{"Type":"vxlan"}}')
    assert (cfg.enable_ipv4, cfg.enable_ipv6) == (True, True)
    assert cfg.ipv6_network == IPv6Network("fd99::/56")
    assert cfg.ipv6_subnet_len == 64
    assert cfg.ipv6_subnet_min == IPv6Address("fd99:0:0:1::")
    assert cfg.ipv6_subnet_max == IPv6Address("fd99:0:0:ff::")
    assert cfg.contains_ipv6_subnet(IPv6Network("fd99:0:0:25::/64"))
    assert not cfg.contains_ipv6_subnet(IPv6Network("fd99::/64"))  # below IPv6SubnetMin
    assert not cfg.contains_ipv6_subnet(IPv6Network("fd98:0:0:25::/64"))
    assert not cfg.contains_ipv6_subnet(IPv6Network("fd99:0:0:25::/80"))


def test_small_ipv6_network_gets_prefix_plus_two_and_keys_match_case_insensitively():
    cfg = parse_config('{"network":"10.5.0.0/16","enableipv6":true,"ipv6network":"fd99::/96",'
                       '"IPV6SUBNETMAX":"fd99::8000:0"}')
    assert cfg.ipv6_subnet_len == 98
    assert (cfg.ipv6_subnet_min, cfg.ipv6_subnet_max) == (IPv6Address("fd99::4000:0"),
                                                          IPv6Address("fd99::8000:0"))


def test_ipv6_only_config_has_flannels_empty_ipv4_side_and_ignores_the_ipv4_keys():
    # flannel's CheckNetworkConfig skips Network and its keys with EnableIPv4 false.
    for text in ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd99::/56", '
                 '"Backend": {"Type": "host-gw"}}',
                 '{"enableipv4": false, "EnableIPv6": true, "IPv6Network": "fd99::/56", '
                 '"Network": "10.5.0.0/16", "SubnetLen": 99, "SubnetMin": "1.2.3.4", '
                 '"Backend": {"Type": "vxlan"}}'):
        c = parse_config(text)
        assert (c.enable_ipv4, c.enable_ipv6) == (False, True)
        assert c.network == IPv4Network("0.0.0.0/0") and c.subnet_len == 0
        assert c.ipv6_network == IPv6Network("fd99::/56") and c.ipv6_subnet_len == 64
        assert c.ipv6_subnet_min == IPv6Address("fd99:0:0:1::")
        assert c.ipv6_subnet_max == IPv6Address("fd99:0:0:ff::")
        assert c.contains_subnet(IPv4Network("0.0.0.0/0"))
        assert not c.contains_subnet(IPv4Network("10.5.1.0/24"))


def test_ipv6_keys_without_enable_ipv6_are_ignored_as_flannel_does():
    cfg = parse_config('{"Network": "10.5.0.0/16", "IPv6Network": "banana"}')
    assert not cfg.enable_ipv6 and cfg.ipv6_network is None
    assert not cfg.contains_ipv6_subnet(IPv6Network("fd99:0:0:25::/64"))


@pytest.mark.parametrize("port, field", [
    (70000, "Backend.Port: 70000 is out of range (1..65535)"),
    (-1, "Backend.Port: -1 is out of range"),
    ("x", 'Backend.Port: expected an integer, got "x"'),
    ("8285", 'Backend.Port: expected an integer, got "8285"'),
    (True, "Backend.Port: expected an integer, got true"),
])
def test_bad_udp_port_is_refused_when_the_config_is_parsed(port, field):
    # As vxlan's options: `network set` refuses it, not every daemon at its start.
    text = json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": port}})
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert field in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


# --- vxlan options -------------------------------------------------------------------------


def vxlan(**options) -> str:
    return json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", **options}})


def test_vxlan_defaults_are_flannels():
    assert vxlan_options(parse_config(vxlan())) == VxlanOptions(vni=1, port=8472, mtu=None,
                                                                dataplane="auto")


def test_vxlan_options_are_read_case_insensitively():
    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"type": "VXLAN", "vni": 4096, '
                       '"port": 4789, "mtu": 9000, "dataplane": "Userspace"}}')
    assert cfg.backend_type == "vxlan"
    assert vxlan_options(cfg) == VxlanOptions(vni=4096, port=4789, mtu=9000,
                                              dataplane="userspace")


def test_vxlan_zero_port_and_mtu_mean_the_defaults_as_in_flannel():
    assert vxlan_options(parse_config(vxlan(Port=0, MTU=0))) == VxlanOptions(
        vni=1, port=8472, mtu=None, dataplane="auto")


@pytest.mark.parametrize("vni", [1, 16777215])
def test_vxlan_vni_range_ends_are_accepted(vni):
    assert vxlan_options(parse_config(vxlan(VNI=vni))).vni == vni


@pytest.mark.parametrize("options, field", [
    ({"VNI": 0}, "Backend.VNI: 0 is out of range"),
    ({"VNI": 16777216}, "Backend.VNI: 16777216 is out of range"),
    ({"VNI": -1}, "Backend.VNI:"),
    ({"VNI": "1"}, "Backend.VNI: expected an integer"),
    ({"VNI": 1.5}, "Backend.VNI: expected an integer"),
    ({"Port": 65536}, "Backend.Port: 65536 is out of range"),
    ({"Port": -5}, "Backend.Port:"),
    ({"Port": "8472"}, "Backend.Port: expected an integer"),
    ({"MTU": 117}, "Backend.MTU: 117 is too small"),
    ({"MTU": 65536}, "Backend.MTU: 65536 is out of range"),
    ({"MTU": "1500"}, "Backend.MTU: expected an integer"),
    ({"MTU": True}, "Backend.MTU: expected an integer"),
    ({"Dataplane": "ebpf"}, 'Backend.Dataplane: "ebpf" is not one of "auto", "userspace", '
                            '"kernel"'),
    ({"DirectRouting": "yes"}, "Backend.DirectRouting: expected true or false"),
    ({"Dataplane": ""}, "Backend.Dataplane:"),
    ({"Dataplane": 1}, "Backend.Dataplane:"),
])
def test_bad_vxlan_options_are_refused_naming_the_field(options, field):
    # parse_config refuses them, so `network set` does too, before any daemon starts.
    with pytest.raises(ConfigError) as err:
        parse_config(vxlan(**options))
    assert field in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("dataplane", ["auto", "userspace", "Kernel"])
def test_vxlan_dataplanes_and_direct_routing_are_read(dataplane):
    options = vxlan_options(parse_config(vxlan(Dataplane=dataplane, DirectRouting=True)))
    assert options.dataplane == dataplane.lower() and options.direct_routing


def test_smallest_vxlan_mtu_leaves_ipv4s_minimum_for_pods():
    assert vxlan_options(parse_config(vxlan(MTU=118))).mtu == 118


def test_vxlan_options_are_not_checked_for_other_backends():
    # Dataplane and VNI mean nothing to udp; flannel ignores options a backend does not read.
    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "VNI": 0, '
                       '"Dataplane": "kernel"}}')
    assert cfg.backend_type == "udp"
