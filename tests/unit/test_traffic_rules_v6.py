"""The IPv6 traffic rules as data, against flanneld's: masqIP6Rules and the IPv6 forward rules
in ip6tables (multicast ff00::/8), and the `ip6 flannel-ipv6` table's chains with
EnableNFTables (`ip6` matches)."""

from __future__ import annotations

from ipaddress import IPv6Network

from flannel_udp.ipmasq import forward_rules, masq_rules
from flannel_udp.nftrules import forward_script, masq_script

NETWORK6 = IPv6Network("fd99::/56")
SUBNET6 = IPv6Network("fd99:0:0:5c::/64")
C = '-m comment --comment "flanneld masq"'
F = '-m comment --comment "flanneld forward"'
T6 = "ip6 flannel-ipv6"


def test_ip6tables_masq_rules_are_flanneld_s_masqIP6Rules_in_order():
    rules = masq_rules(NETWORK6, SUBNET6, random_fully=True)
    assert {(r.table, r.version) for r in rules} == {("nat", 6)}
    assert [r.restore_line() for r in rules] == [
        f"-A POSTROUTING {C} -j FLANNEL-POSTRTG",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {C} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd99:0:0:5c::/64 -d fd99::/56 {C} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd99::/56 -d fd99:0:0:5c::/64 {C} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s fd99::/56 -d fd99:0:0:5c::/64 {C} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd99::/56 ! -d ff00::/8 {C} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s fd99::/56 -d fd99::/56 {C} -j MASQUERADE --random-fully"]


def test_ip6tables_forward_rules_accept_from_and_to_the_ipv6_network():
    rules = forward_rules(NETWORK6)
    assert {(r.table, r.version) for r in rules} == {("filter", 6)}
    assert [r.restore_line() for r in rules] == [
        f"-A FORWARD {F} -j FLANNEL-FWD",
        f"-A FLANNEL-FWD -s fd99::/56 {F} -j ACCEPT",
        f"-A FLANNEL-FWD -d fd99::/56 {F} -j ACCEPT"]


def test_nftables_v6_chains_go_into_ip6_flannel_ipv6_with_ip6_matches():
    assert forward_script(NETWORK6) == [
        f"add chain {T6} forward {{ type filter hook forward priority filter ; "
        'comment "chain to accept flannel traffic" ; }',
        f"flush chain {T6} forward",
        f"add rule {T6} forward ip6 saddr fd99::/56 accept",
        f"add rule {T6} forward ip6 daddr fd99::/56 accept"]
    assert masq_script(NETWORK6, SUBNET6, random_fully=False) == [
        f"add chain {T6} postrtg {{ type nat hook postrouting priority srcnat ; "
        'comment "chain to manage traffic masquerading by flannel" ; }',
        f"flush chain {T6} postrtg",
        f"add rule {T6} postrtg meta mark 0x4000 return",
        f"add rule {T6} postrtg ip6 saddr fd99:0:0:5c::/64 ip6 daddr fd99::/56 return",
        f"add rule {T6} postrtg ip6 saddr fd99::/56 ip6 daddr fd99:0:0:5c::/64 return",
        f"add rule {T6} postrtg ip6 saddr != fd99:0:0:5c::/64 ip6 daddr fd99::/56 return",
        f"add rule {T6} postrtg ip6 saddr fd99::/56 ip6 daddr != ff00::/8 masquerade",
        f"add rule {T6} postrtg ip6 saddr != fd99::/56 ip6 daddr fd99::/56 masquerade"]
