"""The lab: throwaway hosts, pods, flanneld imitations and etcd clusters on one machine, as
network namespaces. The tests, `flannel-udp demo` and the bench build their networks with it;
the daemon never imports it (wireguard-go keeps `tun/tuntest/` apart the same way). Everything
it makes is removed, also when something fails, and what a killed run left is removed by the
next (`remove_stale`, `remove_stale_etcd`).

    netns         `Netns` (commands and probes inside one namespace), `wait_until`,
                  `remove_stale`, `check_environment`
    hosts         `Host` (a flannel-udp daemon, its files and `status`), `Pod`, `ping_failures`
    topology      `Topology`: hosts on a bridge (or on segments joined by a router), pods
    kernel_vxlan  `KernelVxlanNode`: a kernel VXLAN device and entries as flanneld programs them
    etcd          `EtcdCluster`: etcd members on loopback or inside a topology, a test PKI
    flanneld011   `python -m flannel_udp.lab.flanneld011 ...`: a stand-in for flanneld v0.11 on
                  etcd's v2 keyspace (host-gw, vxlan, udp), run inside a host namespace
    probes        `python -m flannel_udp.lab.probes ...`: ping, TCP sink, sender and connect,
                  run inside the namespaces

API (every failure is a NetnsError whose message names the command, namespace and stderr):
    check_environment() -> str | None      why namespaces can't be used here, or None
    remove_stale(pattern)                   delete namespaces/temp dirs of dead earlier runs
    list_namespaces()                       every namespace `ip netns` knows
    wait_until(predicate, timeout, what)    poll until truthy, else NetnsError naming `what`
    seconds_until(predicate, timeout, what) how long that took
    sigterm_as_interrupt()                  context: SIGTERM unwinds like Ctrl-C (cleanup runs)
    child_env()                             the environment a child gets (PACKAGE_ROOT first)
    Netns   .run(*argv) .popen(*argv) .ip_json(*args) .link(dev) .sysctl(key)
            .ping(*dsts) -> {dst: PingResult} .tcp_sink/.tcp_sink_result/.tcp_send/.tcp_connect
            .set_features(dev, {name: on})  ethtool features, e.g. {"rx-gro": False}
            .iperf3(server, address, *args) -> iperf3's JSON report; .iperf3_start -> Iperf3Run
    Host    (a Netns) .underlay_ip .subnet_file .control_socket .log_path .daemon
            .start_flannel(store, net_config, *extra) .stop_flannel(sig) .wait_ready()
            .flannel(*args) .status() .try_status() .lease() .peer_subnets() .subnet_env()
            .log_tail()
    Pod     (a Netns) .host .address .gateway .tcp_transfer(dst, port, size)
    KernelVxlanNode(host, subnet)           flanneld's kernel VXLAN: .add_peer .remove_peer .remove
    Topology(hosts=3, segments=None), a context manager: .switch .router .segments .hosts
            .host(i) .pods .dir .store_path
            .write_net_config(config) .start_daemons(config, store=None) .wait_peers()
            .add_pod(host, flannel_subnet=None, mtu=None) .remove_pod(pod) .log_tails()
            .leftovers() .cleanup()
    EtcdCluster, etcd_problem, make_test_pki, TestPKI, remove_stale_etcd: see `etcd`
"""

from flannel_udp.lab.etcd import (
    EtcdCluster,
    TestPKI,
    etcd_problem,
    make_test_pki,
    remove_stale_etcd,
)
from flannel_udp.lab.hosts import Host, Pod, ping_failures
from flannel_udp.lab.kernel_vxlan import KernelVxlanNode
from flannel_udp.lab.netns import (
    FLANNEL_UDP,
    PACKAGE_ROOT,
    STALE_PATTERN,
    Iperf3Run,
    Netns,
    NetnsError,
    PingResult,
    check_environment,
    child_env,
    list_namespaces,
    remove_stale,
    seconds_until,
    sigterm_as_interrupt,
    wait_until,
)
from flannel_udp.lab.topology import (
    DEFAULT_NETWORK_CONFIG,
    LEASE_EVENT_BOUND,
    UNDERLAY_MTU,
    UNDERLAY_NET,
    Topology,
)

__all__ = [
    "DEFAULT_NETWORK_CONFIG", "FLANNEL_UDP", "LEASE_EVENT_BOUND", "PACKAGE_ROOT", "STALE_PATTERN",
    "UNDERLAY_MTU", "UNDERLAY_NET", "EtcdCluster", "Host", "Iperf3Run", "KernelVxlanNode", "Netns",
    "NetnsError", "PingResult", "Pod", "TestPKI", "Topology", "check_environment", "child_env",
    "etcd_problem", "list_namespaces", "make_test_pki", "ping_failures", "remove_stale",
    "remove_stale_etcd", "seconds_until", "sigterm_as_interrupt", "wait_until",
]
