"""Network config: flannel's defaults, and one clear refusal naming the field for each mistake."""

from ipaddress import IPv4Address, IPv4Network

import pytest

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


@pytest.mark.parametrize("text, field", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"SubnetLen": 24}', "Network: missing"),
    ('{"Network": "10.5.0.0/33"}', "Network:"),
    ('{"Network": "banana"}', "Network:"),
    ('{"Network": "10.5.0.0/29"}', "Network:"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 40}', "SubnetLen:"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 12}', "SubnetLen:"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', "SubnetLen:"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.1.7"}', "SubnetMin:"),
    ('{"Network": "10.5.0.0/16", "SubnetMax": "10.6.1.0"}', "SubnetMax:"),
    ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.3.0"}',
     "SubnetMin:"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "carrier-pigeon"}}', "Backend.Type:"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}', "not implemented"),
    ('{"Network": "10.5.0.0/16", "Backend": "udp"}', "Backend:"),
    ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "EnableIPv6:"),
])
def test_bad_config_is_refused_naming_the_field(text, field):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    message = str(err.value)
    assert field in message
    assert "\n" not in message
    assert err.value.exit_code == 2


def test_backend_port_out_of_range_is_refused():
    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}')
    with pytest.raises(ConfigError, match="Backend.Port"):
        backend_port(cfg, 8285)
