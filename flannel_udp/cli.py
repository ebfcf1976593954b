"""The `flannel-udp` command: flanneld's flags (also as FLANNELD_<FLAG> variables, the command
line winning) and the subcommands run, status, trace, network (get, set), leases (list, delete,
reserve), docker-opts and demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flannel_udp import __version__, control
from flannel_udp.backends import DEFAULT_QUEUES, MAX_QUEUES
from flannel_udp.control import METRICS_PEER_LIMIT, STATUS_PEERS
from flannel_udp.errors import UserError
from flannel_udp.stores import StoreError
from flannel_udp.stores.keyspace import ETCD_APIS, StoreChoice
from flannel_udp.trace import trace_line

if TYPE_CHECKING:
    from flannel_udp.netlink import IfaceChoice

DEFAULT_LOCAL_STORE = "/var/lib/flannel-udp/leases"
EXAMPLE_CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}'
# strconv.ParseBool's spellings, which Go's flag package takes for `-flag=value`.
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")

log = logging.getLogger("flannel-udp")
T = TypeVar("T")


def _env(dest: str, default: object = None) -> object:
    return os.environ.get(f"FLANNELD_{dest.upper()}", default)


def _env_bool(dest: str, default: bool = False) -> bool:
    value = _env(dest)
    if value is None:
        return default
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off", ""):
        return False
    raise UserError(f"FLANNELD_{dest.upper()}={value}: expected true or false")


def _env_int(dest: str, default: int) -> int:
    value = _env(dest)
    if value is None:
        return default
    try:
        return int(str(value))
    except ValueError:
        raise UserError(f"FLANNELD_{dest.upper()}={value}: expected an integer") from None


def go_bool(text: str) -> bool:
    """A boolean flag's value as Go's flag package reads it (strconv.ParseBool)."""
    if text in GO_TRUE:
        return True
    if text in GO_FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}: give true or false")


class GoBool(argparse.Action):
    """A boolean flag as Go's flag package takes it: `--flag` or `--flag=true|false`, the last
    one given winning. go_style writes a bare `--flag` as `--flag=true`, so that the next word
    is never taken for its value (Go never does)."""

    def __init__(self, option_strings: list[str], dest: str, default: bool = False,
                 help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs="?", const=True, default=default,
                         type=go_bool, metavar="=true|false", help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)


class Repeatable(argparse.Action):
    """A flag that may be given several times, as flanneld's --iface: its values in order. The
    FLANNELD_<FLAG> default (one value, as flanneld reads it) counts only when the command line
    gives none."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest, None)
        earlier = [] if given is None or given is self.default else given
        setattr(namespace, self.dest, [*earlier, values])


def _add(group: argparse._ArgumentGroup | argparse.ArgumentParser, *names: str,
         default: object = None, **kw: object) -> None:
    """A flag whose default comes from FLANNELD_<FLAG> when set. Booleans (action
    "store_true") take Go's `--flag=true|false` too; action "append" makes a Repeatable."""
    dest = names[0].lstrip("-").replace("-", "_")
    if kw.get("action") == "store_true":
        kw["action"] = GoBool
        group.add_argument(*names, dest=dest, default=_env_bool(dest, bool(default)), **kw)
    elif kw.get("action") == "append":
        kw["action"] = Repeatable
        value = _env(dest)
        group.add_argument(*names, dest=dest, default=[value] if value else [], **kw)
    elif kw.get("type") is int:
        group.add_argument(*names, dest=dest, default=_env_int(dest, default), **kw)
    else:
        group.add_argument(*names, dest=dest, default=_env(dest, default), **kw)


def _store_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("lease store")
    _add(g, "--local-store", default=DEFAULT_LOCAL_STORE, metavar="PATH",
         help="the embedded lease store file, used when no --etcd-endpoints is given "
              "(default %(default)s)")
    _add(g, "--etcd-endpoints", "--endpoints", metavar="URLS",
         help="comma-separated etcd endpoints, e.g. https://10.0.0.1:2379; with them the "
              "leases live in etcd, as flanneld keeps them")
    _add(g, "--etcd-prefix", default="/coreos.com/network", help="etcd prefix")
    _add(g, "--etcd-api", default="auto", metavar="|".join(ETCD_APIS),
         help="etcd's keyspace: v3 (flanneld v0.18 and later), v2 (flanneld v0.11; etcd 3.4 "
              "serves it with --enable-v2=true), or auto: the one holding the network config, "
              "v3 when both do (default %(default)s)")
    _add(g, "--etcd-cafile", "--ca-file", metavar="FILE", help="etcd CA certificate")
    _add(g, "--etcd-certfile", "--cert-file", metavar="FILE", help="etcd client certificate")
    _add(g, "--etcd-keyfile", "--key-file", metavar="FILE", help="etcd client key")
    _add(g, "--etcd-username", help="etcd user name")
    _add(g, "--etcd-password", help="etcd password")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flannel-udp",
        description="A userspace overlay network for container hosts, compatible with flannel.")
    parser.add_argument("--version", action="version", version=f"flannel-udp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    control_socket = control.default_path()  # this network namespace's

    run = sub.add_parser("run", help="run the node daemon in the foreground",
                         description="Lease a subnet and carry pod traffic to the other hosts. "
                         "Every flag can also be set as FLANNELD_<FLAG> (e.g. FLANNELD_IFACE).")
    _store_flags(run)
    _add(run, "--net-config-path", metavar="FILE",
         help="network config JSON that seeds a store which has none yet")
    _add(run, "--public-ip", metavar="IP",
         help="IP address other hosts reach this one at (default: the underlay interface's "
              "address)")
    _add(run, "--public-ipv6", metavar="IPV6",
         help="IPv6 address other hosts reach this one at, with EnableIPv6 (default: the "
              "underlay interface's first global IPv6 address)")
    _add(run, "--iface", action="append", metavar="NAME|IP",
         help="underlay interface, by name or IPv4 address; repeatable, the first that exists "
              "with an IPv4 address wins (default: the interface holding --public-ip, else "
              "the default route's)")
    _add(run, "--iface-regex", action="append", metavar="REGEX",
         help="underlay interface whose IPv4 address, else name, the regex matches; "
              "repeatable, tried in order after every --iface")
    _add(run, "--iface-can-reach", metavar="IP",
         help="underlay interface (and address) of the route to IP, as `ip route get IP`; "
              "tried after --iface and --iface-regex")
    _add(run, "--subnet-file", default="/run/flannel/subnet.env", metavar="PATH",
         help="where to write the lease for the container runtime (default %(default)s)")
    _add(run, "--subnet-lease-renew-margin", type=int, default=60, metavar="MINUTES",
         help="renew the lease this long before it expires (default %(default)s)")
    _add(run, "--ip-masq", action="store_true",
         help="masquerade traffic from pods to outside the Network (flanneld's iptables "
              "rules; needs iptables)")
    _add(run, "--healthz-ip", default="0.0.0.0", metavar="IP",
         help="address of the /healthz and /metrics endpoint (default %(default)s)")
    _add(run, "--healthz-port", type=int, default=0, metavar="PORT",
         help="port of the /healthz and /metrics endpoint (default 0 = off)")
    _add(run, "--metrics-peer-limit", type=int, default=METRICS_PEER_LIMIT, metavar="N",
         help="/metrics has per-peer series while the table holds at most N peers, none "
              "beyond (0: never; the totals are always there; default %(default)s; not "
              "flanneld's)")
    _add(run, "--iptables-resync", type=int, default=5, metavar="SECONDS",
         help="re-check the masquerade and forward rules this often (default %(default)s)")
    _add(run, "--iptables-forward-rules", action="store_true", default=True,
         help="accept forwarded traffic from and to the Network (flanneld's FLANNEL-FWD chain, "
              "or nftables' forward chain with EnableNFTables); on by default, as in "
              "flanneld: --iptables-forward-rules=false turns it off")
    _add(run, "--ip-masq-fully-random-disable", action="store_true",
         help="masquerade without --random-fully (fully-random in nftables)")
    _add(run, "--ip-blackhole-route", action="store_true",
         help="add a blackhole route for this node's subnet, removed on stop")
    _add(run, "--no-source-check", action="store_true",
         help="forward datagrams from anyone, not only from lease holders with a source "
              "inside their subnet, as flanneld does (for debugging)")
    _add(run, "--busy-poll", type=int, default=0, metavar="USEC",
         help="after forwarding, keep a fast-path thread polling this long before it sleeps: "
              "lower latency for traffic with gaps shorter than USEC, at the cost of up to "
              "one CPU core while it polls (default 0 = sleep at once; not flanneld's)")
    _add(run, "--queues", type=int, default=DEFAULT_QUEUES, metavar="N",
         help="TUN queues of the udp backend and vxlan's userspace data plane, each with its "
              "own forwarding threads, flows spread over them by their addresses and ports "
              f"(1 to {MAX_QUEUES}; default %(default)s; not flanneld's)")
    _add(run, "--drop-log-interval", type=float, default=10.0, metavar="SECONDS",
         help="log the growth of the drop counters at most this often per reason (default "
              "%(default)s)")
    _add(run, "--etcd-wait", type=int, default=60, metavar="SECONDS",
         help="how long to wait at start for an unreachable etcd before exiting; 0 waits for "
              "ever, as flanneld (default %(default)s)")
    _add(run, "--control-socket", default=control_socket, metavar="PATH",
         help="unix socket for `flannel-udp status` (default %(default)s: each namespace "
              "named by `ip netns` has its own)")
    kube = run.add_argument_group(
        "flanneld's Kubernetes subnet manager (not supported: each is refused in one line)")
    for flag in KUBE_FLAGS:
        _add(kube, flag, action="store_true" if flag in KUBE_BOOLEANS else None,
             help=argparse.SUPPRESS)
    for flag in ("--vmodule", "--log_backtrace_at"):  # glog's, on every flanneld command line
        _add(run, flag, metavar="SPEC", help="accepted for flanneld's command lines; ignored")
    run.add_argument("--version", action="version", version=f"flannel-udp {__version__}")
    _add(run, "-v", type=int, default=0, metavar="LEVEL",
         help="log level: 0 info, 1 and above debug")

    status = sub.add_parser("status", help="show the running daemon's lease, peers, counters")
    _add(status, "--control-socket", default=control_socket, metavar="PATH")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--peers", type=_peers_shown, default=STATUS_PEERS, metavar="N|all",
                        help=f"show the first N peers (default {STATUS_PEERS}), or all of "
                             "them (asked page by page: the daemon is never held for long)")

    trace = sub.add_parser(
        "trace", help="print the fast path's per-packet decisions (sampled, rate limited)",
        description="Print one line per packet decision of the running daemon's userspace "
                    "data plane (udp backend, vxlan with the userspace Dataplane) until Ctrl-C. "
                    "Tracing is on only while a tracer is attached.")
    _add(trace, "--control-socket", default=control_socket, metavar="PATH")
    trace.add_argument("--every", type=int, default=1, metavar="N",
                       help="sample one decision in N per direction (default %(default)s)")
    trace.add_argument("--max-rate", type=int, default=100, metavar="R",
                       help="print at most R lines a second; the rest is counted (default "
                            "%(default)s)")
    trace.add_argument("--count", type=int, default=0, metavar="C",
                       help="exit after C lines (default 0: until Ctrl-C)")

    network = sub.add_parser("network", help="read or write the network config in the store")
    net_sub = network.add_subparsers(dest="network_command", required=True, metavar="ACTION")
    get = net_sub.add_parser("get", help="print the network config")
    _store_flags(get)
    put = net_sub.add_parser("set", help="validate and write the network config")
    _store_flags(put)
    put.add_argument("config", nargs="?", metavar="JSON",
                     help="the config as JSON text; - reads it from standard input")
    put.add_argument("--file", metavar="FILE", help="read the config from FILE (- for standard "
                     "input)")

    leases = sub.add_parser(
        "leases", help="list, delete or reserve leases in the store, as etcdctl does for flannel",
        description="The lease table by hand, for every store: flannel's keys (<net>-<len>) "
        "and lease JSON. A reservation is a lease without TTL: the host with its public IP "
        "takes that subnet, for ever.")
    lease_sub = leases.add_subparsers(dest="leases_command", required=True, metavar="ACTION")
    listing = lease_sub.add_parser("list", help="every lease: subnet, public IP, backend, "
                                   "expiry (or reserved)")
    _store_flags(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    delete = lease_sub.add_parser("delete", help="remove a lease: every peer drops its route")
    _store_flags(delete)
    delete.add_argument("subnet", metavar="SUBNET", help="e.g. 10.244.3.0/24 (or 10.244.3.0-24); "
                        "an IPv6-only lease by its IPv6 subnet")
    reserve = lease_sub.add_parser(
        "reserve", help="reserve a subnet for the host with a public IP (a lease without TTL)")
    _store_flags(reserve)
    reserve.add_argument("subnet", metavar="SUBNET", help="e.g. 10.244.3.0/24 (or 10.244.3.0-24)")
    reserve.add_argument("--public-ip", required=True, metavar="IP",
                         help="the public IP of the host that takes the subnet")
    reserve.add_argument("--backend", metavar="TYPE",
                         help="the lease's backend (default: the network config's, the only "
                         "one accepted)")

    opts = sub.add_parser(
        "docker-opts", help="write dockerd options from subnet.env, as mk-docker-opts.sh",
        description="What flannel's mk-docker-opts.sh writes: DOCKER_OPT_BIP, "
        "DOCKER_OPT_IPMASQ (only when FLANNEL_IPMASQ=true), DOCKER_OPT_MTU and the combined "
        "DOCKER_OPTS, from the subnet file into the docker env file.")
    opts.add_argument("-f", dest="subnet_file", default="/run/flannel/subnet.env",
                      metavar="FLANNEL-ENV-FILE", help="subnet file (default %(default)s)")
    opts.add_argument("-d", dest="output", default="/run/docker_opts.env",
                      metavar="DOCKER-ENV-FILE", help="file to write (default %(default)s)")
    opts.add_argument("-k", dest="key", default="DOCKER_OPTS", metavar="COMBINED-KEY",
                      help="name of the combined variable (default %(default)s)")
    opts.add_argument("-i", dest="individual", action="store_true",
                      help="write each option as its own variable (DOCKER_OPT_MTU=...)")
    opts.add_argument("-c", dest="combined", action="store_true",
                      help="write the combined variable (neither -i nor -c: both)")
    opts.add_argument("-m", dest="no_ipmasq", action="store_true",
                      help="do not write --ip-masq (for older Docker versions)")

    demo = sub.add_parser("demo", help="three hosts as namespaces on one machine, end to end")
    demo.add_argument("--iperf-seconds", type=int, default=3, metavar="N")
    return parser


def open_store(args: argparse.Namespace) -> StoreChoice:
    """The store the flags name (with etcd, the keyspaces --etcd-api allows)."""
    from flannel_udp.stores.keyspace import open_store as open_stores
    return open_stores(args.local_store, args.etcd_endpoints, args.etcd_api, args.etcd_prefix,
                       args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile,
                       args.etcd_username, args.etcd_password)


async def _closing(stores: StoreChoice, work: Awaitable[T]) -> T:
    """Await `work`, then release the stores' connections."""
    try:
        return await work
    finally:
        await stores.close()


# flanneld's flags for its Kubernetes subnet manager, and those of them that take no value.
KUBE_FLAGS = ("--kube-subnet-mgr", "--kube-api-url", "--kubeconfig-file",
              "--kube-annotation-prefix", "--set-node-network-unavailable",
              "--use-multi-cluster-cidr")
KUBE_BOOLEANS = {"--kube-subnet-mgr", "--set-node-network-unavailable",
                 "--use-multi-cluster-cidr"}


def cmd_run(args: argparse.Namespace) -> int:
    from flannel_udp.daemon import Daemon, RunOptions

    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname).1s %(message)s",
                        level=logging.INFO)
    log.setLevel(logging.DEBUG if args.v >= 1 else logging.INFO)
    for flag in KUBE_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            raise UserError(f"{flag}: flannel-udp has no Kubernetes subnet manager; it keeps the "
                            "leases in etcd (--etcd-endpoints) or in its embedded store")
    iface = _iface_choice(args)
    if args.subnet_lease_renew_margin < 1 or args.subnet_lease_renew_margin > 1439:
        raise UserError("--subnet-lease-renew-margin: must be 1..1439 minutes (the lease "
                        "lasts 24 h)")
    try:
        public_ip = IPv4Address(args.public_ip) if args.public_ip else None
    except ValueError:
        raise UserError(f"--public-ip {args.public_ip}: not an IPv4 address") from None
    if public_ip is not None and public_ip.is_loopback:
        raise UserError(f"--public-ip {public_ip}: a loopback address, which other hosts cannot "
                        "reach; give an address of the underlay interface")
    public_ipv6 = _public_ipv6(args.public_ipv6)
    if args.etcd_wait < 0:
        raise UserError("--etcd-wait: must be 0 (for ever) or more seconds")
    if not args.drop_log_interval > 0:
        raise UserError("--drop-log-interval: must be more than 0 seconds")
    if not 0 <= args.healthz_port <= 65535:
        raise UserError(f"--healthz-port {args.healthz_port}: must be 0 (off) to 65535")
    if args.metrics_peer_limit < 0:
        raise UserError(f"--metrics-peer-limit {args.metrics_peer_limit}: must be 0 (no "
                        "per-peer series) or more")
    from flannel_udp._fastpath import MAX_BUSY_POLL_US
    if not 0 <= args.busy_poll <= MAX_BUSY_POLL_US:
        raise UserError(f"--busy-poll {args.busy_poll}: must be 0 (off) to {MAX_BUSY_POLL_US} us")
    if not 1 <= args.queues <= MAX_QUEUES:
        raise UserError(f"--queues {args.queues}: must be 1 to {MAX_QUEUES}")
    if args.iptables_resync < 1:
        raise UserError("--iptables-resync: must be 1 second or more")
    stores = open_store(args)
    opts = RunOptions(store=stores.candidates[0], store_name=stores.where, stores=stores,
                      iface=iface, public_ip=public_ip,
                      subnet_file=args.subnet_file,
                      renew_margin_minutes=args.subnet_lease_renew_margin,
                      net_config_path=args.net_config_path, control_socket=args.control_socket,
                      ip_masq=args.ip_masq, store_wait=args.etcd_wait or None,
                      source_check=not args.no_source_check, busy_poll_us=args.busy_poll,
                      queues=args.queues,
                      drop_log_interval=args.drop_log_interval,
                      iptables_resync=args.iptables_resync, healthz_ip=args.healthz_ip,
                      healthz_port=args.healthz_port,
                      metrics_peer_limit=args.metrics_peer_limit,
                      forward_rules=args.iptables_forward_rules,
                      random_fully_disable=args.ip_masq_fully_random_disable,
                      blackhole_route=args.ip_blackhole_route, public_ipv6=public_ipv6)
    import uvloop
    return uvloop.run(_closing(stores, Daemon(opts).run()))


def _public_ipv6(text: str | None) -> IPv6Address | None:
    """--public-ipv6, checked; None when not given (an empty value too, as flanneld)."""
    if not text:
        return None
    try:
        address = IPv6Address(text)
    except ValueError:
        raise UserError(f"--public-ipv6 {text}: not an IPv6 address") from None
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        raise UserError(f"--public-ipv6 {address}: other hosts cannot reach it there; give an "
                        "IPv6 address of the underlay interface")
    if address.is_link_local:
        raise UserError(f"--public-ipv6 {address}: a link-local address, which needs an "
                        "interface to be reached; give a global (or unique local) IPv6 address")
    return address


def _iface_choice(args: argparse.Namespace) -> IfaceChoice:
    """--iface, --iface-regex and --iface-can-reach, checked. An empty value is left out: to
    flanneld it means the default route's interface, as no value does."""
    from flannel_udp.netlink import IfaceChoice

    regexes = []
    for text in filter(None, args.iface_regex):
        try:
            regexes.append(re.compile(text))
        except re.error as e:
            raise UserError(f"--iface-regex {text}: not a valid regular expression ({e})") \
                from None
    can_reach = None
    if args.iface_can_reach:
        try:
            can_reach = IPv4Address(args.iface_can_reach)
        except ValueError:
            raise UserError(f"--iface-can-reach {args.iface_can_reach}: not an IPv4 address"
                            + (" (IPv6 is not supported yet)" if ":" in args.iface_can_reach
                               else "")) from None
    return IfaceChoice(names=tuple(filter(None, args.iface)), regexes=tuple(regexes),
                       can_reach=can_reach)


def cmd_network(args: argparse.Namespace) -> int:
    from flannel_udp.config import parse_config

    stores = open_store(args)
    if args.network_command == "get":
        async def get() -> bytes | None:
            return await (await stores.choose()).get_config()
        raw = asyncio.run(_closing(stores, get()))
        if raw is None:
            raise UserError(f"no network config in {stores.none_found()}: set one with "
                            f"flannel-udp network set '{EXAMPLE_CONFIG}'", 1)
        print(raw.decode())
        return 0
    if args.config is None and args.file is None:
        raise UserError(f"network set: give the config as JSON text (e.g. '{EXAMPLE_CONFIG}'), "
                        "'-' to read it from standard input, or --file FILE")
    if args.config is not None and args.file is not None:
        raise UserError("network set: give the config as JSON text or with --file, not both")
    if "-" in (args.config, args.file):
        raw = sys.stdin.buffer.read()
    elif args.file is not None:
        try:
            raw = Path(args.file).read_bytes()
        except OSError as e:
            raise UserError(f"--file {args.file}: {e.strerror}") from None
    else:
        raw = args.config.encode()
    config = parse_config(raw)

    async def put() -> str:
        store = await stores.choose()  # auto: where a config is already, else v3
        await store.set_config(raw)
        return stores.describe(store)
    where = asyncio.run(_closing(stores, put()))
    print(f"network config written to {where}: Network {config.network}, "
          f"SubnetLen {config.subnet_len}, backend {config.backend_type}")
    return 0


def cmd_leases(args: argparse.Namespace) -> int:
    from flannel_udp import leaseadmin

    # The arguments first: a command refused for its input opens no store.
    subnet = None if args.leases_command == "list" else leaseadmin.parse_subnet_arg(
        args.subnet, ipv6=args.leases_command == "delete")
    public_ip = None
    if args.leases_command == "reserve":
        try:
            public_ip = IPv4Address(args.public_ip)
        except ValueError:
            raise UserError(f"--public-ip {args.public_ip}: not an IPv4 address") from None
    stores = open_store(args)

    async def work() -> tuple[Any, str]:
        store = await stores.choose()  # with etcd, the keyspace holding the config
        name = stores.describe(store)
        if args.leases_command == "list":
            return await leaseadmin.list_entries(store), name
        assert subnet is not None
        if args.leases_command == "delete":
            return await leaseadmin.delete(store, name, subnet), name
        assert public_ip is not None
        return await leaseadmin.reserve(store, name, subnet, public_ip, args.backend), name
    result, name = asyncio.run(_closing(stores, work()))
    if args.leases_command == "list":
        if args.json:
            print(json.dumps([e.as_json() for e in result], indent=2))
            return 0
        # Dual stack: two more columns, only when some lease has an IPv6 subnet
        v6 = any(e.lease is not None and e.lease.ipv6_subnet is not None for e in result)
        print(f"{'SUBNET':<20}{'PUBLIC IP':<17}"
              + (f"{'IPV6 SUBNET':<26}{'PUBLIC IPV6':<26}" if v6 else "")
              + f"{'BACKEND':<9}EXPIRY")
        for e in result:
            if e.lease is None:
                print(f"{e.key:<20}{'-':<17}" + (f"{'-':<26}{'-':<26}" if v6 else "")
                      + f"{'-':<9}not a lease: {e.problem}")
            else:
                cols6 = ""
                if v6:
                    cols6 = (f"{str(e.lease.ipv6_subnet or '-'):<26}"
                             f"{str(e.lease.public_ipv6 or '-'):<26}")
                v4 = e.lease.has_ipv4  # an IPv6-only lease has no IPv4 side
                print(f"{str(e.lease.subnet) if v4 else '-':<20}"
                      f"{str(e.lease.public_ip) if v4 else '-':<17}{cols6}"
                      f"{e.lease.backend:<9}{leaseadmin.describe_expiry(e.lease)}")
        if not result:
            print(f"(no leases in {name})")
        return 0
    if args.leases_command == "delete":
        holder = "" if result.lease is None else (
            f" of {result.lease.public_ip}" if result.lease.has_ipv4
            else f" of {result.lease.public_ipv6}")
        print(f"deleted the lease {subnet}{holder} from {name}")
        return 0
    done, lease = result
    what = {"reserved": "reserved", "converted": "its lease made a reservation:",
            "unchanged": "already reserved:"}[done]
    print(f"{what} {subnet} for {public_ip} in {name}")
    return 0


def _age(since: float) -> str:
    seconds = int(time.time() - since)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _peers_shown(text: str) -> int | None:
    """`status --peers`: a number of peers, or "all" (None)."""
    if text == "all":
        return None
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of peers (0 or more) or 'all'")
    return number


def cmd_status(args: argparse.Namespace) -> int:
    try:
        status = control.status(args.control_socket, args.peers)
    except UserError as e:
        if not args.json:
            raise
        print(json.dumps({"error": str(e)}))  # what a script reads, where it reads it
        return e.exit_code
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    lease = status["lease"]
    if lease:
        expiry = ("reserved (never expires)" if lease["expires"] is None
                  else f"expires in {(lease['expires'] - time.time()) / 3600:.1f} h")
        # '-': an IPv6-only network's lease has no IPv4 side
        print(f"lease    {lease['subnet'] or '-'}  public IP {lease['public_ip'] or '-'}  "
              f"backend {lease['backend']}  {expiry}")
        if lease.get("ipv6_subnet"):
            print(f"ipv6     {lease['ipv6_subnet']}  public IPv6 {lease['public_ipv6']}  "
                  f"network {status.get('ipv6_network')}")
    if status.get("keyspace"):
        print(f"store    {status['keyspace']}")
    if status.get("ip_forward") is False:
        print("WARNING  net.ipv4.ip_forward=0: this host's pods get no traffic "
              "(sysctl -w net.ipv4.ip_forward=1)")
    # IPv6-only: flannel-v6.<VNI>'s VtepMAC, the only one
    vtep = lease and (lease.get("vtep_mac") or lease.get("ipv6_vtep_mac"))
    vxlan = bool(vtep)
    if vxlan:
        print(f"vxlan    VNI {lease['vni']}  VtepMAC {vtep}"
              + (f"  dataplane {lease['dataplane']}" if lease.get("dataplane") else ""))
    c = status["counters"]
    print(f"traffic  tx {c.get('tx_packets', 0)} pkts / {c.get('tx_bytes', 0)} B   "
          f"rx {c.get('rx_packets', 0)} pkts / {c.get('rx_bytes', 0)} B   "
          f"icmp unreachable sent {c.get('icmp_sent', 0)}"
          + (f" (suppressed {c['icmp_suppressed']})" if c.get("icmp_suppressed") else ""))
    if c.get("csum_completed"):
        print(f"checksums completed {c['csum_completed']} (inner ones left partial, as by a "
              "kernel VXLAN sender on the same machine)")
    drops = {k: v for k, v in c.get("drops", {}).items() if v}
    print("drops    " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"))
    offloads = status.get("offloads") or {}
    if offloads:
        print("offloads " + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in offloads.items()))
    if status.get("source_check") is False:
        print("source check off (--no-source-check): datagrams from anyone are forwarded")
    if status.get("busy_poll_us"):
        print(f"busy-poll {status['busy_poll_us']} us, "
              f"{c.get('busy_poll_batches', 0)} batches handled while polling")
    if c.get("queues"):
        print(f"queues   {len(c['queues'])}, tx/rx pkts each: " + ", ".join(
            f"{q['tx_packets']}/{q['rx_packets']}" for q in c["queues"]))
    dual = bool(lease and lease.get("ipv6_subnet"))
    count = status.get("peer_count", len(status["peers"]))
    shown = len(status["peers"])
    print(f"peers    {count} in the lease table, {status.get('routes', '?')} in the data plane"
          + (f"; the first {shown} shown (--peers all for every one)" if shown < count else ""))
    print(f"\n{'PEER SUBNET':<20}{'PUBLIC IP':<17}"
          + (f"{'IPV6 SUBNET':<26}{'PUBLIC IPV6':<26}" if dual else "") + f"{'BACKEND':<9}"
          + (f"{'VTEP MAC':<19}" if vxlan else "") + f"{'SINCE':>6}"
          f"{'TX PKTS':>10}{'TX BYTES':>13}{'RX PKTS':>10}{'RX BYTES':>13}  PATH")
    for p in status["peers"]:
        # A peer's VtepMAC is shown once it has a route ("-": skipped, see the log).
        print(f"{p['subnet'] or '-':<20}{p['public_ip'] or '-':<17}"
              + (f"{p.get('ipv6_subnet') or '-':<26}{p.get('public_ipv6') or '-':<26}"
                 if dual else "")
              + f"{p['backend']:<9}"
              + (f"{p.get('vtep_mac') or p.get('ipv6_vtep_mac') or '-':<19}" if vxlan else "")
              + f"{_age(p['since']):>6}"
              f"{p.get('tx_packets', 0):>10}{p.get('tx_bytes', 0):>13}"
              f"{p.get('rx_packets', 0):>10}{p.get('rx_bytes', 0):>13}"
              # host-gw, direct, vxlan or unreachable, for the routing-model backends
              f"  {p.get('path', '-')}")
    if not count:
        print("(no peers)")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    if args.every < 1 or args.max_rate < 1 or args.count < 0:
        raise UserError("trace: --every and --max-rate must be >= 1, --count >= 0")
    printed = 0
    frames = control.stream(args.control_socket, {"cmd": "trace", "every": args.every,
                                                  "max_rate": args.max_rate})
    try:
        for frame in frames:
            if "error" in frame:
                raise UserError(f"daemon: {frame['error']}", 1)
            for record in frame.get("records", []):
                print(trace_line(record), flush=True)
                printed += 1
                if args.count and printed >= args.count:
                    return 0
            notes = []
            if frame.get("more"):
                notes.append(f"{frame['more']} more (over --max-rate)")
            if frame.get("lost"):
                notes.append(f"{frame['lost']} lost (trace buffer full)")
            if notes:
                print("… " + ", ".join(notes), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        frames.close()  # closes the connection: the daemon stops tracing
    return 0


def cmd_docker_opts(args: argparse.Namespace) -> int:
    from flannel_udp.dockeropts import DockerOptsOptions, write_docker_opts

    write_docker_opts(DockerOptsOptions(
        subnet_file=args.subnet_file, output=args.output, key=args.key,
        individual=args.individual, combined=args.combined, ipmasq=not args.no_ipmasq))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flannel_udp.demo import run_demo
    return run_demo(iperf_seconds=args.iperf_seconds)


COMMANDS = {"run": cmd_run, "network": cmd_network, "status": cmd_status, "demo": cmd_demo,
            "docker-opts": cmd_docker_opts, "trace": cmd_trace, "leases": cmd_leases}


def _long_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long option of the parser and its subcommands, and its action."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(_long_actions(sub))
            continue
        found.update((o, action) for o in action.option_strings if o.startswith("--"))
    return found


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """Every long option of the parser and its subcommands, and the booleans among them."""
    actions = _long_actions(parser)
    return set(actions), {o for o, a in actions.items() if a.nargs == 0 or isinstance(a, GoBool)}


def go_style(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """flanneld's command lines in argparse's terms. Go's flag package takes `-flag` as well as
    `--flag`, `-flag=value`, and booleans as `-flag=true|false`, the last one winning: the
    seed's unit mixes them."""
    actions = _long_actions(parser)
    longs = set(actions)
    flags = {o for o, a in actions.items() if a.nargs == 0}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[1:].partition("=")
            if f"--{name}" in longs:
                arg = f"--{arg[1:]}"
            elif len(name) == 1 and eq:  # -v=2
                out += [f"-{name}", value]
                continue
        name, eq, value = arg.partition("=")
        if isinstance(actions.get(name), GoBool):
            if not eq:
                arg = f"{name}=true"  # never `--flag value`: Go takes no value after a boolean
            elif value in GO_TRUE + GO_FALSE:
                arg = f"{name}={str(go_bool(value)).lower()}"
        elif eq and name in flags:
            if value.lower() in ("true", "t", "1"):
                arg = name
            elif value.lower() in ("false", "f", "0"):
                continue
        out.append(arg)
    return out


def flanneld_main() -> int:
    """`flanneld`: `flannel-udp run` under flanneld's name and command line."""
    return main(["run", *sys.argv[1:]])


def mk_docker_opts_main() -> int:
    """`mk-docker-opts.sh`: `flannel-udp docker-opts` under the script's name and options."""
    return main(["docker-opts", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(go_style(sys.argv[1:] if argv is None else argv, parser))
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe is seen by the handler below
        return code
    except UserError as e:
        print(f"flannel-udp: {e}", file=sys.stderr)
        return e.exit_code
    except StoreError as e:
        print(f"flannel-udp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `flannel-udp status | head -1`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
