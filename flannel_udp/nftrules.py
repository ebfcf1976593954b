"""`EnableNFTables`: flanneld's masquerade and forward rules in nftables instead of iptables, in
the tables and chains later flanneld versions (pkg/trafficmngr/nftables) write: table
`ip flannel-ipv4` with chains `postrtg` (nat, hook postrouting, priority srcnat) and `forward`
(filter, hook forward, priority filter), and `ip6 flannel-ipv6`, empty but in dual stack
(EnableIPv6), where it holds the same two chains for the IPv6 network and subnet (`ip6 saddr`,
multicast ff00::/8).

Each write is one `nft -f -` transaction that declares the tables and chains, flushes our chains
and adds the rules, so a partial rewrite never shows. The check every `--iptables-resync`
seconds compares `nft list table` with what nft printed right after the last write (nft's own
spelling, e.g. `meta mark 0x00004000`): any rule, chain or table gone or changed is rewritten.
Shutdown deletes both tables, as flanneld's cleanUp does.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from ipaddress import IPv4Network, IPv6Network

from flannel_udp.errors import UserError
from flannel_udp.ipmasq import (
    KUBE_PROXY_MARK,
    MULTICAST,
    MULTICAST6,
    AnyNetwork,
    IptablesError,
    TrafficRules,
)

log = logging.getLogger("flannel-udp")

IPV4_TABLE = "flannel-ipv4"
IPV6_TABLE = "flannel-ipv6"
FORWARD_CHAIN = "forward"
MASQ_CHAIN = "postrtg"
TABLES = (("ip", IPV4_TABLE), ("ip6", IPV6_TABLE))
PROBE_CHAIN = "masqueradeTest"  # flanneld's check for `masquerade fully-random`


def _nft(*argv: str, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["nft", *argv] + (["-f", "-"] if script is not None else [])
    try:
        return subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise IptablesError("nft: not installed") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{' '.join(cmd)}: no answer within 30 s") from None


def _table(network: AnyNetwork) -> tuple[str, str]:
    """(the table, as nft names it, of the network's IP version; that version's match word)."""
    if network.version == 6:
        return f"ip6 {IPV6_TABLE}", "ip6"
    return f"ip {IPV4_TABLE}", "ip"


def forward_script(network: AnyNetwork) -> list[str]:
    """flanneld's forward chain: accept whatever comes from or goes to the Network (in
    flannel-ipv6 for the IPv6 network)."""
    t, ip = _table(network)
    return [f"add chain {t} {FORWARD_CHAIN} {{ type filter hook forward priority filter ; "
            'comment "chain to accept flannel traffic" ; }',
            f"flush chain {t} {FORWARD_CHAIN}",
            f"add rule {t} {FORWARD_CHAIN} {ip} saddr {network} accept",
            f"add rule {t} {FORWARD_CHAIN} {ip} daddr {network} accept"]


def masq_script(network: AnyNetwork, subnet: AnyNetwork, random_fully: bool) -> list[str]:
    """flanneld's postrtg chain for Network `network` and our lease `subnet`, in its order
    (in flannel-ipv6, with `ip6` matches, for the IPv6 network). Its fourth rule is flanneld's
    nftables one (`ip saddr != <subnet> ip daddr <Network>`), not the iptables chain's
    (`! -s <Network> -d <subnet>`)."""
    t, ip = _table(network)
    n, s = network, subnet
    multicast = MULTICAST6 if network.version == 6 else MULTICAST
    masq = "masquerade fully-random" if random_fully else "masquerade"
    mark = KUBE_PROXY_MARK.split("/")[0]  # flanneld matches the mark's value, no mask
    return [f"add chain {t} {MASQ_CHAIN} {{ type nat hook postrouting priority srcnat ; "
            'comment "chain to manage traffic masquerading by flannel" ; }',
            f"flush chain {t} {MASQ_CHAIN}",
            f"add rule {t} {MASQ_CHAIN} meta mark {mark} return",  # kube-proxy's: no double NAT
            f"add rule {t} {MASQ_CHAIN} {ip} saddr {s} {ip} daddr {n} return",  # pod to pod
            f"add rule {t} {MASQ_CHAIN} {ip} saddr {n} {ip} daddr {s} return",
            f"add rule {t} {MASQ_CHAIN} {ip} saddr != {s} {ip} daddr {n} return",
            f"add rule {t} {MASQ_CHAIN} {ip} saddr {n} {ip} daddr != {multicast} {masq}",
            f"add rule {t} {MASQ_CHAIN} {ip} saddr != {n} {ip} daddr {n} {masq}"]


def tables_script() -> list[str]:
    return [f'add table {family} {name} {{ comment "rules for {name}" ; }}'
            for family, name in TABLES]


class NftablesRules(TrafficRules):
    """flanneld's nftables rules of one node: `masq` the postrtg chain, `forward` the forward
    chain."""

    def __init__(self, network: IPv4Network, random_fully: bool, masq: bool = True,
                 forward: bool = True, ipv6_network: IPv6Network | None = None) -> None:
        super().__init__(network, random_fully, masq, forward, ipv6_network)
        self.script = ""
        self.written = ""  # `nft list table`s right after the last write

    @classmethod
    def probe(cls, network: IPv4Network, masq: bool, forward: bool,
              random_fully_disable: bool = False,
              ipv6_network: IPv6Network | None = None) -> NftablesRules:
        """Check that nft works here (UserError if not) and whether the kernel takes
        `masquerade fully-random`, the way flanneld checks it (a check-only transaction)."""
        if shutil.which("nft") is None:
            raise UserError("EnableNFTables needs the nft command: install nftables "
                            "(e.g. apt-get install nftables)", exit_code=1)
        t = f"ip {IPV4_TABLE}"
        check = _nft("-c", script="\n".join([
            f"add table {t}",
            f"add chain {t} {PROBE_CHAIN} {{ type nat hook postrouting priority srcnat ; }}",
            f"add rule {t} {PROBE_CHAIN} ip saddr != 127.0.0.1 masquerade fully-random"]) + "\n")
        random_fully = check.returncode == 0
        if not random_fully:
            plain = _nft("-c", script=f"add table {t}\n")
            if plain.returncode != 0:
                raise UserError(f"EnableNFTables: nft cannot write rules here: "
                                f"{plain.stderr.strip()}", exit_code=1)
            log.warning("nftables: masquerade fully-random unsupported")
        return cls(network, random_fully and not random_fully_disable, masq=masq,
                   forward=forward, ipv6_network=ipv6_network)

    def _chains(self) -> list[str]:
        return (([MASQ_CHAIN] if self.masq else []) + ([FORWARD_CHAIN] if self.forward else []))

    def setup(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> None:
        self.subnet = subnet
        self.ipv6_subnet = ipv6_subnet
        lines = tables_script()
        if self.forward and self.ipv4:
            lines += forward_script(self.network)
        if self.masq and self.ipv4:
            lines += masq_script(self.network, subnet, self.random_fully)
        v6 = self.ipv6_network is not None and ipv6_subnet is not None
        if v6 and self.forward:
            lines += forward_script(self.ipv6_network)
        if v6 and self.masq:
            lines += masq_script(self.ipv6_network, ipv6_subnet, self.random_fully)
        self.script = "\n".join(lines) + "\n"
        self._rewrite()
        log.info("nftables: table %s, chain(s) %s in place for %s%s%s", IPV4_TABLE,
                 " and ".join(self._chains()),
                 f"{subnet} in {self.network}" if self.ipv4 else "(no IPv4: IPv6-only)",
                 f"; table {IPV6_TABLE} for {ipv6_subnet} in {self.ipv6_network}" if v6 else "",
                 " (masquerade fully-random)" if self.masq and self.random_fully else "")

    def listing(self) -> str:
        """Our tables as nft prints them now; a table that is gone lists as nothing."""
        out = []
        for family, name in TABLES:
            result = _nft("list", "table", family, name)
            out.append(result.stdout if result.returncode == 0 else "")
        return "".join(out)

    def ensure(self) -> bool:
        if self.listing() == self.written:
            return False
        log.warning("nftables: table %s or %s is not as written (a rule, chain or table "
                    "changed or went missing); rewriting them", IPV4_TABLE, IPV6_TABLE)
        self._rewrite()
        return True

    def teardown(self) -> None:
        for family, name in TABLES:
            result = _nft("delete", "table", family, name)
            if result.returncode != 0 and "No such file" not in result.stderr:
                log.error("nftables: deleting table %s %s: %s", family, name,
                          result.stderr.strip())
        log.info("nftables: removed tables %s and %s", IPV4_TABLE, IPV6_TABLE)

    def _rewrite(self) -> None:
        result = _nft(script=self.script)
        if result.returncode != 0:
            raise IptablesError(f"nft -f: {result.stderr.strip()}")
        written = self.listing()
        # A table or chain deleted between the write and this listing must not become what
        # "as written" means: then the next check rewrites.
        wanted = [f"table {family} {name} " for family, name in TABLES] + [
            f"chain {chain} " for chain in self._chains()]
        self.written = written if all(w in written for w in wanted) else ""
