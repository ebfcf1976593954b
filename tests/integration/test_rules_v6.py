"""The IPv6 traffic rules driven directly in a namespace: `IptablesRules` and `NftablesRules`
with an IPv6 network put flanneld's ip6tables chains (and the `ip6 flannel-ipv6` table's) in
place beside the IPv4 ones, put back what is deleted behind their back, and remove all of it."""

from __future__ import annotations

import json
import sys

import pytest

from flannel_udp.lab import Host

pytestmark = pytest.mark.netns

# Runs in a host namespace: probe, setup, then one command per stdin line: "ensure" (prints
# whether it rewrote) or EOF (teardown).
DRIVER = r"""
import sys
from ipaddress import ip_network
from flannel_udp.ipmasq import IptablesRules
from flannel_udp.nftrules import NftablesRules
kind = NftablesRules if sys.argv[1] == "nft" else IptablesRules
rules = kind.probe(ip_network("10.244.0.0/16"), masq=True, forward=True,
                   ipv6_network=ip_network("fd99::/56"))
rules.setup(ip_network("10.244.3.0/24"), ip_network("fd99:0:0:5c::/64"))
print("ready", flush=True)
for line in sys.stdin:
    print(rules.ensure(), flush=True)
rules.teardown()
"""


class Driver:
    def __init__(self, host: Host, kind: str) -> None:
        self.proc = host.popen(sys.executable, "-c", DRIVER, kind, stdin=-1, stdout=-1,
                               stderr=-1, text=True)
        line = self.proc.stdout.readline()
        assert line == "ready\n", self.proc.communicate()[1]

    def ensure(self) -> bool:
        self.proc.stdin.write("ensure\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline().lower())

    def stop(self) -> None:
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err


def ip6tables(host: Host, table: str) -> list[str]:
    return [line for line in host.run("ip6tables", "-t", table, "-S").stdout.splitlines()
            if "flannel" in line.lower()]


def test_ip6tables_chains_are_flanneld_s_come_back_and_go(topology):
    host = topology(1, ipv6=True).hosts[0]
    driver = Driver(host, "iptables")
    try:
        nat = ip6tables(host, "nat")
        assert nat == [
            "-N FLANNEL-POSTRTG",
            '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
            '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment '
            '"flanneld masq" -j RETURN',
            '-A FLANNEL-POSTRTG -s fd99:0:0:5c::/64 -d fd99::/56 -m comment --comment '
            '"flanneld masq" -j RETURN',
            '-A FLANNEL-POSTRTG -s fd99::/56 -d fd99:0:0:5c::/64 -m comment --comment '
            '"flanneld masq" -j RETURN',
            '-A FLANNEL-POSTRTG ! -s fd99::/56 -d fd99:0:0:5c::/64 -m comment --comment '
            '"flanneld masq" -j RETURN',
            '-A FLANNEL-POSTRTG -s fd99::/56 ! -d ff00::/8 -m comment --comment '
            '"flanneld masq" -j MASQUERADE --random-fully',
            '-A FLANNEL-POSTRTG ! -s fd99::/56 -d fd99::/56 -m comment --comment '
            '"flanneld masq" -j MASQUERADE --random-fully']
        assert ip6tables(host, "filter") == [
            "-N FLANNEL-FWD",
            '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
            '-A FLANNEL-FWD -s fd99::/56 -m comment --comment "flanneld forward" -j ACCEPT',
            '-A FLANNEL-FWD -d fd99::/56 -m comment --comment "flanneld forward" -j ACCEPT']
        assert "-A FLANNEL-POSTRTG -s 10.244.3.0/24 -d 10.244.0.0/16" in host.run(
            "iptables", "-t", "nat", "-S").stdout  # the IPv4 ones are there too
        assert driver.ensure() is False
        host.run("ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", "fd99::/56", "!",
                 "-d", "ff00::/8", "-m", "comment", "--comment", "flanneld masq", "-j",
                 "MASQUERADE", "--random-fully")
        host.run("ip6tables", "-D", "FORWARD", "-m", "comment", "--comment",
                 "flanneld forward", "-j", "FLANNEL-FWD")
        assert driver.ensure() is True
        assert ip6tables(host, "nat") == nat
        assert len(ip6tables(host, "filter")) == 4
    finally:
        driver.stop()
    assert ip6tables(host, "nat") == [] and ip6tables(host, "filter") == []
    assert "FLANNEL" not in host.run("iptables-save").stdout


def test_nftables_ip6_table_holds_flanneld_s_chains_comes_back_and_goes(topology):
    host = topology(1, ipv6=True).hosts[0]
    driver = Driver(host, "nft")
    try:
        table = host.run("nft", "list", "table", "ip6", "flannel-ipv6").stdout
        for line in ("ip6 saddr fd99:0:0:5c::/64 ip6 daddr fd99::/56 return",
                     "ip6 saddr != fd99:0:0:5c::/64 ip6 daddr fd99::/56 return",
                     "ip6 saddr fd99::/56 ip6 daddr != ff00::/8 masquerade fully-random",
                     "ip6 saddr != fd99::/56 ip6 daddr fd99::/56 masquerade fully-random",
                     "ip6 saddr fd99::/56 accept", "ip6 daddr fd99::/56 accept",
                     "type nat hook postrouting priority srcnat",
                     "type filter hook forward priority filter"):
            assert line in table, (line, table)
        assert driver.ensure() is False
        host.run("nft", "flush", "chain", "ip6", "flannel-ipv6", "postrtg")
        assert driver.ensure() is True
        assert host.run("nft", "list", "table", "ip6", "flannel-ipv6").stdout == table
    finally:
        driver.stop()
    assert host.run("nft", "list", "tables").stdout.strip() == ""
