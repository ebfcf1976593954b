"""flanneld's traffic rules in iptables: `--ip-masq`'s masquerade chain FLANNEL-POSTRTG (nat)
and `--iptables-forward-rules`' FLANNEL-FWD (filter, on by default as in flanneld), installed
after the lease is taken, re-checked every `--iptables-resync` seconds and removed on shutdown.
`TrafficRules` is what the daemon asks of them; nftrules.py is the nftables twin
(`EnableNFTables`).

It drives the `iptables` and `iptables-restore` commands, as flanneld does (through
go-iptables): they work with both kernel back ends (nf_tables and legacy) and take the xtables
lock (`-w`) that other rule writers (kube-proxy, docker) also take. python-iptables binds
libiptc, which knows only the legacy back end, so on a Debian host (iptables-nft) its rules would
land in tables nobody reads.

The rules and their order are flannel's; the check is flannel's too: every rule is looked up with
`iptables -C`, and if any is missing the chains are rewritten in one `iptables-restore --noflush`
transaction (declaring a chain there empties it), because the RETURN rules only work in front of
the MASQUERADE ones.

With an IPv6 network (EnableIPv6) the same chains go into ip6tables, as flanneld's masqIP6Rules
and forward rules for the IPv6 network: the same rules with the IPv6 network and subnet, and
multicast ff00::/8 instead of 224.0.0.0/4.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from flannel_udp.config import NO_IPV4
from flannel_udp.errors import UserError

log = logging.getLogger("flannel-udp")

MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
# kube-proxy marks what it masquerades itself; flannel leaves it alone (no double NAT).
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = "224.0.0.0/4"
MULTICAST6 = "ff00::/8"
AnyNetwork = IPv4Network | IPv6Network
# The commands for each IP version's tables.
IPTABLES = {4: "iptables", 6: "ip6tables"}
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
RANDOM_FULLY_SINCE = (1, 6, 2)  # iptables version that knows MASQUERADE --random-fully
LOCK_WAIT = "5"  # seconds to wait for the xtables lock


class IptablesError(Exception):
    """An iptables (or nft) command failed; the message quotes it and its stderr."""


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]
    version: int = 4  # 6: an ip6tables rule

    def restore_line(self, action: str = "-A") -> str:
        """The rule as a line of iptables-restore input."""
        return " ".join([action, self.chain, *(_quote(a) for a in self.spec)])


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def masq_rules(network: AnyNetwork, subnet: AnyNetwork, random_fully: bool) -> list[Rule]:
    """flanneld's nat rules for Network `network` and our lease `subnet`, in order; the first
    is the jump from POSTROUTING. IPv6 ones (flanneld's masqIP6Rules) for an IPv6 network."""
    n, s = str(network), str(subnet)
    v = network.version
    multicast = MULTICAST6 if v == 6 else MULTICAST
    comment = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")

    def rule(*spec: str) -> Rule:
        return Rule("nat", MASQ_CHAIN, spec, v)

    return [
        Rule("nat", "POSTROUTING", (*comment, "-j", MASQ_CHAIN), v),
        rule("-m", "mark", "--mark", KUBE_PROXY_MARK, *comment, "-j", "RETURN"),
        rule("-s", s, "-d", n, *comment, "-j", "RETURN"),  # pod to pod: no NAT
        rule("-s", n, "-d", s, *comment, "-j", "RETURN"),
        # outside traffic to our pods arriving through a node that owns the pod address
        rule("!", "-s", n, "-d", s, *comment, "-j", "RETURN"),
        rule("-s", n, "!", "-d", multicast, *comment, *masq),  # pods to the world
        rule("!", "-s", n, "-d", n, *comment, *masq),  # the host to remote pods
    ]


def forward_rules(network: AnyNetwork) -> list[Rule]:
    """flanneld's filter rules: forward whatever comes from or goes to the Network (IPv4 or
    IPv6: the rules go into that version's tables)."""
    comment = ("-m", "comment", "--comment", FORWARD_COMMENT)
    v = network.version
    return [
        Rule("filter", "FORWARD", (*comment, "-j", FORWARD_CHAIN), v),
        Rule("filter", FORWARD_CHAIN, ("-s", str(network), *comment, "-j", "ACCEPT"), v),
        Rule("filter", FORWARD_CHAIN, ("-d", str(network), *comment, "-j", "ACCEPT"), v),
    ]


def restore_input(rules: Sequence[Rule], present: Sequence[Rule] = ()) -> str:
    """iptables-restore --noflush input that puts `rules` in place exactly once and in order:
    our chains are declared (created, or emptied); the rules in built-in chains that are
    `present` already (our jumps) are deleted first."""
    text = []
    for table in dict.fromkeys(r.table for r in rules):
        mine = [r for r in rules if r.table == table]
        chains = dict.fromkeys(r.chain for r in mine if r.chain.startswith("FLANNEL-"))
        text.append(f"*{table}")
        text += [f":{chain} - [0:0]" for chain in chains]
        text += [r.restore_line("-D") for r in present
                 if r.table == table and r.chain not in chains]
        text += [r.restore_line() for r in mine]
        text.append("COMMIT")
    return "\n".join(text) + "\n"


def _run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{' '.join(argv)}: no answer within 30 s") from None


def iptables_version(flag: str = "--ip-masq", ipv6: bool = False) -> tuple[int, ...]:
    """The iptables version, e.g. (1, 8, 9); UserError naming `flag` when iptables (with
    `ipv6` ip6tables too) is missing or broken."""
    for tool in ("iptables", "iptables-restore") + (("ip6tables", "ip6tables-restore")
                                                    if ipv6 else ()):
        if shutil.which(tool) is None:
            raise UserError(f"{flag} needs the {tool} command: install iptables "
                            "(e.g. apt-get install iptables)", exit_code=1)
    result = _run("iptables", "--version")
    match = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", result.stdout)
    if result.returncode != 0 or match is None:
        raise UserError(f"{flag}: `iptables --version` failed: "
                        f"{(result.stderr or result.stdout).strip()}", exit_code=1)
    return tuple(int(g or 0) for g in match.groups())


class TrafficRules(ABC):
    """A node's masquerade and forward rules (IptablesRules here, NftablesRules in
    nftrules.py): the masquerade ones (`masq`) and the forward ones (`forward`), either or
    both; for the IPv4 `network` and, in dual stack, the IPv6 `ipv6_network` too. Each method
    blocks on the rule commands: call them from a worker thread."""

    def __init__(self, network: IPv4Network, random_fully: bool, masq: bool = True,
                 forward: bool = True, ipv6_network: IPv6Network | None = None) -> None:
        self.network = network
        self.random_fully = random_fully
        self.masq = masq
        self.forward = forward
        self.ipv6_network = ipv6_network
        self.subnet: IPv4Network | None = None
        self.ipv6_subnet: IPv6Network | None = None

    @property
    def ipv4(self) -> bool:
        """False in an IPv6-only network (its Network is flannel's empty 0.0.0.0/0): no IPv4
        rules at all, never ones for 0.0.0.0/0."""
        return self.network != NO_IPV4

    @abstractmethod
    def setup(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> None:
        """Install the rules for our lease `subnet` (and its `ipv6_subnet` in dual stack),
        replacing those of an earlier lease."""

    @abstractmethod
    def ensure(self) -> bool:
        """Put the rules back if any went missing; True when it had to."""

    @abstractmethod
    def teardown(self) -> None:
        """Remove every rule and chain (or table) of ours; what is already gone is no error."""


class IptablesRules(TrafficRules):
    """flanneld's iptables rules of one node (and its ip6tables rules in dual stack)."""

    def __init__(self, network: IPv4Network, random_fully: bool, masq: bool = True,
                 forward: bool = True, ipv6_network: IPv6Network | None = None) -> None:
        super().__init__(network, random_fully, masq, forward, ipv6_network)
        self.rules: list[Rule] = []  # IPv4 and IPv6 ones, each version's in order

    @classmethod
    def probe(cls, network: IPv4Network, masq: bool, forward: bool,
              random_fully_disable: bool = False,
              ipv6_network: IPv6Network | None = None) -> IptablesRules:
        """Check that iptables (and ip6tables with an IPv6 network) is usable here (UserError
        naming the flag that asked for it if not) and what it supports."""
        flag = "--ip-masq" if masq else "--iptables-forward-rules"
        version = iptables_version(flag, ipv6=ipv6_network is not None)
        rules = cls(network, version >= RANDOM_FULLY_SINCE and not random_fully_disable,
                    masq=masq, forward=forward, ipv6_network=ipv6_network)
        # A harmless lookup proves we may read the table (root, modules, a working back end).
        table, chain = ("nat", "POSTROUTING") if masq else ("filter", "FORWARD")
        for v in rules._versions():
            result = _run(IPTABLES[v], "-w", LOCK_WAIT, "-t", table, "-S", chain)
            if result.returncode != 0:
                raise UserError(f"{flag}: {IPTABLES[v]} cannot read the {table} table: "
                                f"{result.stderr.strip()}", exit_code=1)
        return rules

    def _versions(self) -> tuple[int, ...]:
        v4 = (4,) if self.ipv4 else ()
        return (*v4, 6) if self.ipv6_network is not None else v4

    def _chains(self) -> list[str]:
        return ([MASQ_CHAIN] if self.masq else []) + ([FORWARD_CHAIN] if self.forward else [])

    def setup(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> None:
        self.subnet = subnet
        self.ipv6_subnet = ipv6_subnet
        self.rules = [] if not self.ipv4 else (
            (masq_rules(self.network, subnet, self.random_fully) if self.masq else [])
            + (forward_rules(self.network) if self.forward else []))
        if self.ipv6_network is not None and ipv6_subnet is not None:
            self.rules += ((masq_rules(self.ipv6_network, ipv6_subnet, self.random_fully)
                            if self.masq else [])
                           + (forward_rules(self.ipv6_network) if self.forward else []))
        for v in self._versions():
            self._rewrite(v)
        log.info("iptables: %s in place for %s%s%s", " and ".join(self._chains()),
                 f"{subnet} in {self.network}" if self.ipv4 else "(no IPv4: IPv6-only)",
                 f", ip6tables for {ipv6_subnet} in {self.ipv6_network}"
                 if self.ipv6_network is not None and ipv6_subnet is not None else "",
                 " (MASQUERADE --random-fully)" if self.masq and self.random_fully else "")

    def missing(self) -> list[Rule]:
        """The rules that are not there now."""
        return [r for r in self.rules if not self._exists(r)]

    def ensure(self) -> bool:
        gone = self.missing()
        if not gone:
            return False
        log.warning("iptables: %d rule(s) missing (e.g. %s in %s%s); rewriting %s", len(gone),
                    gone[0].restore_line(), gone[0].table,
                    " of ip6tables" if gone[0].version == 6 else "", " and ".join(self._chains()))
        for v in dict.fromkeys(r.version for r in gone):
            self._rewrite(v)
        return True

    def teardown(self) -> None:
        for v in self._versions():
            for table, parent, chain, comment in (("nat", "POSTROUTING", MASQ_CHAIN,
                                                   MASQ_COMMENT),
                                                  ("filter", "FORWARD", FORWARD_CHAIN,
                                                   FORWARD_COMMENT)):
                if chain not in self._chains():
                    continue
                jump = ("-m", "comment", "--comment", comment, "-j", chain)
                while _run(IPTABLES[v], "-w", LOCK_WAIT, "-t", table, "-D", parent,
                           *jump).returncode == 0:
                    pass  # a jump added twice by hand goes too
                _run(IPTABLES[v], "-w", LOCK_WAIT, "-t", table, "-F", chain)
                _run(IPTABLES[v], "-w", LOCK_WAIT, "-t", table, "-X", chain)
        log.info("%s: removed %s", " and ".join(IPTABLES[v] for v in self._versions()),
                 " and ".join(self._chains()))

    def _exists(self, rule: Rule) -> bool:
        tool = IPTABLES[rule.version]
        result = _run(tool, "-w", LOCK_WAIT, "-t", rule.table, "-C", rule.chain, *rule.spec)
        if result.returncode in (0, 1):  # 1: no such rule (or chain)
            return result.returncode == 0
        if "does not exist" in result.stderr:  # the jump's target chain is gone (nf_tables)
            return False
        raise IptablesError(f"{tool} -t {rule.table} -C {rule.restore_line()[3:]}: "
                            f"{result.stderr.strip()}")

    def _rewrite(self, version: int = 4) -> None:
        rules = [r for r in self.rules if r.version == version]
        if not rules:
            return
        # Jumps already present are deleted first so that the transaction adds each once.
        present = [r for r in rules if not r.chain.startswith("FLANNEL-") and self._exists(r)]
        text = restore_input(rules, present)
        result = _run(RESTORE[version], "-w", LOCK_WAIT, "--noflush", input=text)
        if result.returncode != 0:
            raise IptablesError(f"{RESTORE[version]} --noflush: {result.stderr.strip()}")


async def resync_forever(rules: TrafficRules, period: float) -> None:
    """Every `period` seconds put back what went missing; failures are logged and retried."""
    while True:
        await asyncio.sleep(period)
        try:
            await asyncio.to_thread(rules.ensure)
        except IptablesError as e:
            log.error("traffic rules: %s; retrying in %g s", e, period)
