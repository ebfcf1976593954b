"""Newer flanneld's rules and endpoints without a network: the nftables transaction as data,
`EnableNFTables` in the config, the flags' Go syntax, /readyz's answer, and which rules the
daemon asks for."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from ipaddress import IPv4Network

import pytest

from flannel_udp import cli, healthz
from flannel_udp.config import ConfigError, parse_config
from flannel_udp.daemon import RunOptions, open_rules
from flannel_udp.errors import UserError
from flannel_udp.nftrules import forward_script, masq_script, tables_script

NETWORK = IPv4Network("10.244.0.0/16")
SUBNET = IPv4Network("10.244.3.0/24")
T = "ip flannel-ipv4"


def test_nftables_transaction_is_flanneld_s_tables_chains_and_rules_in_order():
    assert tables_script() == ['add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }',
                               'add table ip6 flannel-ipv6 { comment "rules for flannel-ipv6" ; }']
    assert forward_script(NETWORK) == [
        f"add chain {T} forward {{ type filter hook forward priority filter ; "
        'comment "chain to accept flannel traffic" ; }',
        f"flush chain {T} forward",
        f"add rule {T} forward ip saddr 10.244.0.0/16 accept",
        f"add rule {T} forward ip daddr 10.244.0.0/16 accept"]
    assert masq_script(NETWORK, SUBNET, random_fully=True) == [
        f"add chain {T} postrtg {{ type nat hook postrouting priority srcnat ; "
        'comment "chain to manage traffic masquerading by flannel" ; }',
        f"flush chain {T} postrtg",
        f"add rule {T} postrtg meta mark 0x4000 return",
        f"add rule {T} postrtg ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return",
        f"add rule {T} postrtg ip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
        f"add rule {T} postrtg ip saddr != 10.244.3.0/24 ip daddr 10.244.0.0/16 return",
        f"add rule {T} postrtg ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 "
        "masquerade fully-random",
        f"add rule {T} postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 "
        "masquerade fully-random"]
    plain = masq_script(NETWORK, SUBNET, random_fully=False)
    assert [line.endswith(" masquerade") for line in plain] == [False] * 6 + [True] * 2


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (None, False)])
def test_enable_nftables_is_read_from_the_config(value, expected):
    raw = {"Network": "10.244.0.0/16"} | ({} if value is None else {"EnableNFTables": value})
    assert parse_config(json.dumps(raw)).enable_nftables is expected
    assert parse_config('{"Network": "10.244.0.0/16", "enablenftables": true}').enable_nftables


def test_enable_nftables_that_is_not_a_boolean_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r'^invalid network config: EnableNFTables: expected '
                                          r'true or false, got "yes"$'):
        parse_config('{"Network": "10.244.0.0/16", "EnableNFTables": "yes"}')


@pytest.mark.parametrize("argv, forward", [
    ([], True),
    (["--iptables-forward-rules=false"], False),
    (["-iptables-forward-rules=false"], False),
    (["-iptables-forward-rules=F"], False),
    (["-iptables-forward-rules=0"], False),
    (["-iptables-forward-rules"], True),
    (["--iptables-forward-rules=true"], True),
])
def test_iptables_forward_rules_is_on_by_default_and_off_with_go_s_false(argv, forward):
    parser = cli.build_parser()
    args = parser.parse_args(cli.go_style(["run", *argv], parser))
    assert args.iptables_forward_rules is forward


def test_fully_random_disable_and_blackhole_route_are_go_booleans():
    parser = cli.build_parser()
    args = parser.parse_args(cli.go_style(["run"], parser))
    assert (args.ip_masq_fully_random_disable, args.ip_blackhole_route) == (False, False)
    args = parser.parse_args(cli.go_style(
        ["run", "-ip-masq-fully-random-disable", "--ip-blackhole-route=true"], parser))
    assert (args.ip_masq_fully_random_disable, args.ip_blackhole_route) == (True, True)


def test_iptables_forward_rules_from_the_environment_and_a_bad_value_is_one_line():
    env = {**os.environ, "FLANNELD_IPTABLES_FORWARD_RULES": "false"}
    code = ("from flannel_udp import cli; p = cli.build_parser(); "
            "print(p.parse_args(['run']).iptables_forward_rules)")
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30).stdout == "False\n"
    env["FLANNELD_IPTABLES_FORWARD_RULES"] = "sometimes"
    result = subprocess.run([sys.executable, "-m", "flannel_udp", "run"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (
        2, "flannel-udp: FLANNELD_IPTABLES_FORWARD_RULES=sometimes: expected true or false\n")


@pytest.mark.parametrize("status, code, body", [
    ({"ready": True}, 200, b"ok\n"),
    ({"ready": False}, 503, b"not ready: lease, rules or subnet.env not in place yet\n"),
    ({}, 503, b"not ready: lease, rules or subnet.env not in place yet\n"),
])
def test_readyz_is_200_only_once_the_daemon_says_it_is_ready(status, code, body):
    assert healthz.respond("GET", "/readyz", lambda: status) == (code, "text/plain", body)


def _options(**kw: object) -> RunOptions:
    return RunOptions(store=None, store_name="test", iface=None, public_ip=None,  # type: ignore
                      subnet_file="/nonexistent", renew_margin_minutes=60,
                      net_config_path=None, control_socket="/nonexistent", **kw)


def test_no_rules_are_asked_without_ip_masq_and_with_forward_rules_off():
    config = parse_config('{"Network": "10.244.0.0/16"}')
    assert open_rules(config, _options(ip_masq=False, forward_rules=False)) is None


def test_forward_rules_alone_without_iptables_are_skipped_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    config = parse_config('{"Network": "10.244.0.0/16"}')
    with caplog.at_level(logging.WARNING, "flannel-udp"):
        assert open_rules(config, _options()) is None
    assert caplog.messages == [
        "--iptables-forward-rules needs the iptables command: install iptables (e.g. apt-get "
        "install iptables); no forward rules (--iptables-forward-rules=false silences this)"]
    nft = parse_config('{"Network": "10.244.0.0/16", "EnableNFTables": true}')
    with pytest.raises(UserError, match=r"^EnableNFTables needs the nft command: install "
                                        r"nftables \(e.g. apt-get install nftables\)$"):
        open_rules(nft, _options(ip_masq=True))
