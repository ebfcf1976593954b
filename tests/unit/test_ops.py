"""Operations without a network: flanneld's ip-masq rules as data, mk-docker-opts' output, the
sd_notify datagrams (to sockets of the test's own), the health answer and the Prometheus text,
and the HTTP endpoint on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from helpers import ROOT
from prometheus_client.parser import text_string_to_metric_families

from flannel_udp import healthz, metrics, sdnotify
from flannel_udp.cli import main
from flannel_udp.dockeropts import DockerOptsOptions, render, write_docker_opts
from flannel_udp.errors import UserError
from flannel_udp.ipmasq import forward_rules, masq_rules, restore_input

NETWORK = IPv4Network("10.244.0.0/16")
SUBNET = IPv4Network("10.244.3.0/24")
SUBNET_ENV = {"FLANNEL_NETWORK": "10.244.0.0/16", "FLANNEL_SUBNET": "10.244.3.1/24",
              "FLANNEL_MTU": "1472", "FLANNEL_IPMASQ": "true"}

# -- ip-masq --------------------------------------------------------------------------------

# flanneld's rules as `iptables -S` prints them (checked against iptables 1.8.9 here).
MASQ_LINES = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" '
    '-j RETURN',
    '-A FLANNEL-POSTRTG -s 10.244.3.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" '
    '-j RETURN',
    '-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.3.0/24 -m comment --comment "flanneld masq" '
    '-j RETURN',
    '-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.3.0/24 -m comment --comment '
    '"flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
    '-j MASQUERADE --random-fully',
    '-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment '
    '"flanneld masq" -j MASQUERADE --random-fully',
]
FORWARD_LINES = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
]


def test_masq_rules_are_flanneld_s_six_behind_the_postrouting_jump_in_order():
    rules = masq_rules(NETWORK, SUBNET, random_fully=True)
    assert [r.table for r in rules] == ["nat"] * 7
    assert [r.restore_line() for r in rules] == MASQ_LINES


def test_masq_rules_without_random_fully_where_iptables_lacks_it():
    lines = [r.restore_line() for r in masq_rules(NETWORK, SUBNET, random_fully=False)]
    assert [line.replace(" --random-fully", "") for line in MASQ_LINES] == lines


def test_forward_rules_accept_from_and_to_the_network():
    rules = forward_rules(NETWORK)
    assert [r.table for r in rules] == ["filter"] * 3
    assert [r.restore_line() for r in rules] == FORWARD_LINES


def test_restore_input_declares_our_chains_and_deletes_jumps_already_there_first():
    rules = masq_rules(NETWORK, SUBNET, True) + forward_rules(NETWORK)
    text = restore_input(rules, present=[rules[0]])
    assert text == "\n".join([
        "*nat", ":FLANNEL-POSTRTG - [0:0]", "-D" + MASQ_LINES[0][2:], *MASQ_LINES, "COMMIT",
        "*filter", ":FLANNEL-FWD - [0:0]", *FORWARD_LINES, "COMMIT"]) + "\n"


# -- docker-opts ------------------------------------------------------------------------------


def test_docker_opts_default_writes_individual_then_combined_as_mk_docker_opts():
    out = render(SUBNET_ENV, DockerOptsOptions(), environ={})
    assert out == ('DOCKER_OPT_BIP="--bip=10.244.3.1/24"\n'
                   'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
                   'DOCKER_OPT_MTU="--mtu=1472"\n'
                   'DOCKER_OPTS=" --bip=10.244.3.1/24 --ip-masq=false --mtu=1472 "\n')


def test_docker_opts_in_dual_stack_give_docker_the_ipv6_subnet():
    env = {"FLANNEL_NETWORK": "10.99.0.0/16", "FLANNEL_SUBNET": "10.99.15.1/24",
           "FLANNEL_IPV6_NETWORK": "fd99::/56", "FLANNEL_IPV6_SUBNET": "fd99:0:0:5c::1/64",
           "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "true"}
    out = render(env, DockerOptsOptions(), environ={})
    assert out == ('DOCKER_OPT_BIP="--bip=10.99.15.1/24"\n'
                   'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
                   'DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=fd99:0:0:5c::1/64"\n'
                   'DOCKER_OPT_MTU="--mtu=1450"\n'
                   'DOCKER_OPTS=" --bip=10.99.15.1/24 --ip-masq=false '
                   '--ipv6 --fixed-cidr-v6=fd99:0:0:5c::1/64 --mtu=1450 "\n')


def test_docker_opts_without_flannel_masquerading_leaves_ip_masq_to_docker():
    env = {**SUBNET_ENV, "FLANNEL_IPMASQ": "false"}
    out = render(env, DockerOptsOptions(), environ={})
    assert "IPMASQ" not in out and "ip-masq" not in out
    assert out.endswith('DOCKER_OPTS=" --bip=10.244.3.1/24 --mtu=1472 "\n')


def test_docker_opts_i_c_k_m_and_an_existing_combined_variable():
    assert render(SUBNET_ENV, DockerOptsOptions(individual=True), environ={}).count("\n") == 3
    assert "DOCKER_OPTS" not in render(SUBNET_ENV, DockerOptsOptions(individual=True),
                                       environ={})
    only = render(SUBNET_ENV, DockerOptsOptions(combined=True, key="OPTS", ipmasq=False),
                  environ={"OPTS": "--debug"})
    assert only == 'OPTS="--debug --bip=10.244.3.1/24 --mtu=1472 "\n'


def test_docker_opts_command_reads_f_and_writes_d(tmp_path: Path):
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("".join(f"{k}={v}\n" for k, v in SUBNET_ENV.items()))
    out = tmp_path / "docker_opts.env"
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_OPTS"}
    result = subprocess.run([sys.executable, "-m", "flannel_udp", "docker-opts", "-f",
                             str(subnet_env), "-d", str(out), "-c"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == 'DOCKER_OPTS=" --bip=10.244.3.1/24 --ip-masq=false --mtu=1472 "\n'
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_docker_opts_without_a_subnet_file_is_one_line_and_exit_1(tmp_path: Path, capsys):
    code = main(["docker-opts", "-f", str(tmp_path / "none.env"), "-d", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "none.env" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError):
        write_docker_opts(DockerOptsOptions(subnet_file=str(tmp_path), key="not a name"))


@pytest.mark.parametrize("content", ["", "# nothing here\nOTHER=1\n",
                                     "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_IPMASQ=true\n"])
def test_docker_opts_refuses_a_subnet_file_with_no_options_in_it_and_writes_nothing(
        tmp_path: Path, capsys, content):
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text(content)
    out = tmp_path / "docker_opts.env"
    out.write_text("KEPT=1\n")
    code = main(["docker-opts", "-f", str(subnet_env), "-d", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert str(subnet_env) in err and "FLANNEL_SUBNET" in err
    assert out.read_text() == "KEPT=1\n"


# -- sd_notify --------------------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()


def test_notify_sends_one_datagram_of_lines_to_a_path(notify_socket):
    sock, path = notify_socket
    assert sdnotify.notify("READY=1", "STATUS=lease 10.244.3.0/24", environ={
        "NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=lease 10.244.3.0/24"


def test_notify_reaches_an_abstract_socket_named_with_at():
    name = f"flannel-udp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_socket_or_with_a_dead_one_does_nothing_and_never_raises(tmp_path):
    assert not sdnotify.notify("READY=1", environ={})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})


# -- health and metrics -----------------------------------------------------------------------

STATUS = {
    "lease": {"subnet": "10.244.3.0/24", "public_ip": "192.168.77.11", "backend": "udp",
              "expires": 1900000000.0},
    "network": "10.244.0.0/16", "started": 1800000000.0,
    "peers": [{"subnet": "10.244.7.0/24", "public_ip": "192.168.77.12", "backend": "udp",
               "since": 1800000001.0, "tx_packets": 5, "tx_bytes": 500, "rx_packets": 4,
               "rx_bytes": 400}],
    "counters": {"tx_packets": 9, "tx_bytes": 900, "rx_packets": 8, "rx_bytes": 800,
                 "icmp_sent": 1, "drops": {"short": 2, "no_route": 0}},
    "offloads": {"tso": True, "uso": False},
    "health": {"lease": True, "dataplane": True},
    "store_errors": 3,
    "peer_count": 1, "routes": 1,
    "programming_latency": {"buckets": [[0.01, 2], [0.1, 3], [1.0, 3]], "count": 4,
                            "sum": 2.03},
}


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus-client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


def test_metrics_carry_the_status_counters_per_direction_peer_reason_and_offload():
    got = samples(metrics.render(STATUS))
    peer = (("direction", "tx"), ("peer", "10.244.7.0/24"), ("public_ip", "192.168.77.12"))
    expected = {
        ("flannel_udp_packets_total", (("direction", "tx"),)): 9,
        ("flannel_udp_bytes_total", (("direction", "rx"),)): 800,
        ("flannel_udp_peer_packets_total", peer): 5,
        ("flannel_udp_peer_bytes_total", peer): 500,
        ("flannel_udp_drops_total", (("reason", "short"),)): 2,
        ("flannel_udp_drops_total", (("reason", "no_route"),)): 0,
        ("flannel_udp_peers", ()): 1,
        ("flannel_udp_lease_expiry_timestamp_seconds", ()): 1900000000.0,
        ("flannel_udp_store_errors_total", ()): 3,
        ("flannel_udp_offload_active", (("offload", "tso"),)): 1,
        ("flannel_udp_offload_active", (("offload", "uso"),)): 0,
        ("flannel_udp_healthy", (("check", "all"),)): 1,
        ("flannel_udp_icmp_unreachable_sent_total", ()): 1,
    }
    assert {k: got.get(k) for k in expected} == expected


def test_metrics_info_carries_the_dual_stack_lease():
    status = {**STATUS, "ipv6_network": "fd99::/56",
              "lease": {**STATUS["lease"], "ipv6_subnet": "fd99:0:0:25::/64",
                        "public_ipv6": "fd77::b"}}
    info = [(labels, value) for (name, labels), value in samples(metrics.render(status)).items()
            if name == "flannel_udp_info"]
    assert info == [((("backend", "udp"), ("ipv6_network", "fd99::/56"),
                      ("ipv6_subnet", "fd99:0:0:25::/64"), ("network", "10.244.0.0/16"),
                      ("public_ip", "192.168.77.11"), ("public_ipv6", "fd77::b"),
                      ("subnet", "10.244.3.0/24")), 1.0)]


def test_metrics_carry_a_peers_ipv6_route_as_a_peer_of_its_own():
    ipv6 = {"subnet": "fd99:0:0:7::/64", "peer": "fd77::c", "tx_packets": 6, "tx_bytes": 600,
            "rx_packets": 3, "rx_bytes": 300}
    status = {**STATUS, "peers": [{**STATUS["peers"][0], "ipv6": ipv6}]}
    got = samples(metrics.render(status))
    peer6 = (("direction", "rx"), ("peer", "fd99:0:0:7::/64"), ("public_ip", "fd77::c"))
    assert got[("flannel_udp_peer_packets_total", peer6)] == 3
    assert got[("flannel_udp_peer_bytes_total", peer6)] == 300
    peer = (("direction", "tx"), ("peer", "10.244.7.0/24"), ("public_ip", "192.168.77.12"))
    assert got[("flannel_udp_peer_packets_total", peer)] == 5
    assert got[("flannel_udp_peers", ())] == 1


def test_metrics_of_an_ipv6_only_node_have_empty_ipv4_labels_and_peers_by_ipv6_subnet():
    # status's IPv6-only shape: null IPv4 subnet, public IP and network
    status = {**STATUS, "network": None, "ipv6_network": "fd99::/56",
              "lease": {**STATUS["lease"], "subnet": None, "public_ip": None,
                        "backend": "host-gw", "ipv6_subnet": "fd99:0:0:25::/64",
                        "public_ipv6": "fd77::b"},
              "peers": [{**STATUS["peers"][0], "subnet": None, "public_ip": None,
                         "ipv6_subnet": "fd99:0:0:7::/64", "public_ipv6": "fd77::c"}]}
    got = samples(metrics.render(status))
    info = [labels for (name, labels) in got if name == "flannel_udp_info"]
    assert info == [(("backend", "host-gw"), ("ipv6_network", "fd99::/56"),
                     ("ipv6_subnet", "fd99:0:0:25::/64"), ("network", ""), ("public_ip", ""),
                     ("public_ipv6", "fd77::b"), ("subnet", ""))]
    peer = (("direction", "tx"), ("peer", "fd99:0:0:7::/64"), ("public_ip", "fd77::c"))
    assert got[("flannel_udp_peer_packets_total", peer)] == 5


def test_metrics_carry_the_source_check_drops_and_the_suppressed_icmp_errors():
    status = {**STATUS, "counters": {**STATUS["counters"], "icmp_suppressed": 7,
                                     "drops": {"unknown_sender": 5, "spoofed_inner_source": 6}}}
    got = samples(metrics.render(status))
    assert got[("flannel_udp_drops_total", (("reason", "unknown_sender"),))] == 5
    assert got[("flannel_udp_drops_total", (("reason", "spoofed_inner_source"),))] == 6
    assert got[("flannel_udp_icmp_unreachable_suppressed_total", ())] == 7


def test_metrics_carry_the_partial_checksums_completed():
    status = {**STATUS, "counters": {**STATUS["counters"], "csum_completed": 11}}
    assert samples(metrics.render(status))[("flannel_udp_csum_completed_total", ())] == 11
    assert samples(metrics.render(STATUS))[("flannel_udp_csum_completed_total", ())] == 0


def test_metrics_of_a_status_without_offloads_or_lease_still_render():
    got = samples(metrics.render({"lease": None, "peers": [], "counters": {},
                                  "health": {"lease": False, "dataplane": False}}))
    assert got[("flannel_udp_healthy", (("check", "all"),))] == 0
    assert got[("flannel_udp_peers", ())] == 0
    assert not any(name.startswith("flannel_udp_offload") for name, _ in got)


def test_every_metric_the_documentation_names_is_one_metrics_serves():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    named = {m for doc in docs for m in re.findall(r"\bflannel_udp_[a-z_]+\b", doc.read_text())}
    text = metrics.render(STATUS).decode()
    served = ({name for name, _ in samples(text.encode())}
              | {family.name for family in text_string_to_metric_families(text)})
    assert named and sorted(named - served) == []


def test_the_programming_latency_is_a_histogram_and_per_peer_series_follow_the_status():
    got = samples(metrics.render(STATUS))
    name = "flannel_udp_network_programming_duration_seconds"
    assert got[(f"{name}_bucket", (("le", "0.01"),))] == 2
    assert got[(f"{name}_bucket", (("le", "1.0"),))] == 3
    assert got[(f"{name}_bucket", (("le", "+Inf"),))] == 4
    assert got[(f"{name}_count", ())] == 4 and got[(f"{name}_sum", ())] == 2.03
    # A daemon over --metrics-peer-limit sends no peers' rows: the totals stay.
    big = {**STATUS, "peers": [], "peer_count": 20000, "routes": 19999}
    got = samples(metrics.render(big))
    assert got[("flannel_udp_peers", ())] == 20000 and got[("flannel_udp_routes", ())] == 19999
    assert not any(n.startswith("flannel_udp_peer_") for n, _ in got)


@pytest.mark.parametrize("checks, code, body", [
    ({"lease": True, "dataplane": True}, 200, b"ok\n"),
    ({"lease": False, "dataplane": True}, 503, b"failing: lease\n"),
    ({"lease": True, "dataplane": False}, 503, b"failing: dataplane\n"),
    ({}, 503, b"starting\n"),
])
def test_healthz_is_200_only_with_the_lease_held_and_the_data_plane_running(checks, code, body):
    status = {**STATUS, "health": checks}
    for path in ("/healthz", "/"):
        assert healthz.respond("GET", path, lambda s=status: s) == (code, "text/plain", body)


def _http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_healthz_server_answers_http_on_loopback_and_a_taken_port_is_one_user_error():
    async def scenario() -> list[bytes]:
        server = await healthz.serve("127.0.0.1", 0, lambda: STATUS)
        port = server.sockets[0].getsockname()[1]
        try:
            replies = [await asyncio.to_thread(_http, port, req) for req in (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /metrics HTTP/1.0\r\n\r\n",
                b"GET /nope HTTP/1.0\r\n\r\n",
                b"POST / HTTP/1.0\r\n\r\n",
                b"garbage\r\n\r\n")]
            with pytest.raises(UserError, match=f"--healthz-port {port}: .*in use"):
                await healthz.serve("127.0.0.1", port, lambda: STATUS)
            return replies
        finally:
            server.close()
            await server.wait_closed()

    ok, prom, missing, post, bad = asyncio.run(scenario())
    assert ok.startswith(b"HTTP/1.0 200 OK\r\n") and ok.endswith(b"\r\n\r\nok\n")
    assert prom.startswith(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4")
    assert b"\nflannel_udp_peers 1.0\n" in prom
    assert missing.startswith(b"HTTP/1.0 404 ")
    assert post.startswith(b"HTTP/1.0 405 ")
    assert bad.startswith(b"HTTP/1.0 400 ")


# -- configuration from the environment alone -----------------------------------------------


def test_a_bad_flanneld_variable_is_one_line_and_exit_2():
    env = {**os.environ, "FLANNELD_HEALTHZ_PORT": "eighty"}
    result = subprocess.run([sys.executable, "-m", "flannel_udp", "run"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr == "flannel-udp: FLANNELD_HEALTHZ_PORT=eighty: expected an integer\n"
