"""The etcd v3 store against a real etcd (Debian's etcd 3.4, started on free loopback ports):
flannel's keys and values byte for byte, the create-only transaction, renewal, leases written
by flannel nodes, the watch across an etcd restart and a compaction, a dead endpoint, TLS with
client certificates, user and password, and the command line's one-line errors.

Tests on the shared etcd each use a prefix of their own, so that they do not see each other."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from helpers import one_error_line

from flannel_udp.config import parse_config
from flannel_udp.lab import EtcdCluster, TestPKI, etcd_problem, make_test_pki
from flannel_udp.lease import LEASE_TTL
from flannel_udp.manager import LeaseManager
from flannel_udp.stores import Snapshot, StoreError, etcdcommon
from flannel_udp.stores.etcd import EtcdOptions, EtcdStore

CFG = parse_config('{"Network": "10.5.0.0/16"}')
ME = IPv4Address("192.168.0.10")


def run(coro):
    return asyncio.run(coro)


def store_for(cluster: EtcdCluster, prefix: str, endpoints: str | None = None,
              **flags: str | None) -> EtcdStore:
    return EtcdStore(EtcdOptions.from_flags(endpoints or cluster.endpoint_arg, prefix, **flags))


async def closing(store: EtcdStore, work):
    try:
        return await work
    finally:
        await store.close()


def etcd_kvs(cluster: EtcdCluster, prefix: str) -> dict[bytes, dict]:
    """Every key under `prefix` as etcd holds it (etcdctl's JSON, key and value decoded)."""
    out = json.loads(cluster.etcdctl("get", "--prefix", prefix, "-w", "json").stdout)
    kvs = {}
    for kv in out.get("kvs", []):
        kv["value"] = base64.b64decode(kv.get("value", ""))
        kvs[base64.b64decode(kv["key"])] = kv
    return kvs


def granted_ttl(cluster: EtcdCluster, lease_id: int) -> int:
    out = cluster.etcdctl("lease", "timetolive", f"{lease_id:x}").stdout
    return int(re.search(r"granted with TTL\((\d+)s\)", out).group(1))


def etcd_lease_count(cluster: EtcdCluster) -> int:
    out = cluster.etcdctl("lease", "list").stdout
    return int(re.search(r"found (\d+) leases", out).group(1))


def grant(cluster: EtcdCluster, ttl: int) -> str:
    """`etcdctl lease grant`: the new lease's id (hex, as etcdctl takes it)."""
    out = cluster.etcdctl("lease", "grant", str(ttl)).stdout
    return re.search(r"lease ([0-9a-f]+) granted", out).group(1)


def flannel_udp(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flannel_udp", *argv], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- flannel's layout -----------------------------------------------------------------------


def test_keys_values_and_etcd_leases_are_flannels_byte_for_byte(etcd):
    store = store_for(etcd, "/coreos.com/network")

    async def scenario():
        await store.set_config(b'{"Network": "10.5.0.0/16"}')
        return await LeaseManager(store, CFG, ME, "", None, renew_margin=3600).acquire(None)

    lease = run(closing(store, scenario()))
    kvs = etcd_kvs(etcd, "/coreos.com/network/")
    key = f"/coreos.com/network/subnets/{lease.subnet.network_address}-24".encode()
    assert set(kvs) == {b"/coreos.com/network/config", key}
    assert kvs[b"/coreos.com/network/config"]["value"] == b'{"Network": "10.5.0.0/16"}'
    assert kvs[b"/coreos.com/network/config"].get("lease", 0) == 0
    assert kvs[key]["value"] == b'{"PublicIP":"192.168.0.10","PublicIPv6":null}'
    assert granted_ttl(etcd, kvs[key]["lease"]) == 24 * 3600
    assert lease.expiration == pytest.approx(time.time() + LEASE_TTL, abs=5)


def test_a_trailing_slash_in_the_prefix_changes_no_key(etcd):
    run(closing(s := store_for(etcd, "/slash/network/"), s.set_config(b"{}")))
    assert set(etcd_kvs(etcd, "/slash/")) == {b"/slash/network/config"}


def test_create_is_a_transaction_that_fails_when_the_key_exists(etcd):
    first, second = store_for(etcd, "/t-create"), store_for(etcd, "/t-create")
    leases_before = etcd_lease_count(etcd)

    async def scenario():
        a = await first.create_lease("10.5.1.0-24", b"first", 3600)
        b = await second.create_lease("10.5.1.0-24", b"second", 3600)
        await first.close()
        await second.close()
        return a, b

    a, b = run(scenario())
    assert a is not None and b is None
    assert etcd_kvs(etcd, "/t-create/")[b"/t-create/subnets/10.5.1.0-24"]["value"] == b"first"
    # the loser's fresh etcd lease was given back, not left to run out
    assert etcd_lease_count(etcd) == leases_before + 1


def test_renewal_binds_the_key_to_a_fresh_etcd_lease(etcd):
    store = store_for(etcd, "/t-renew")
    key = b"/t-renew/subnets/10.5.2.0-24"
    run(closing(store, store.create_lease("10.5.2.0-24", b"v", LEASE_TTL)))
    before = etcd_kvs(etcd, "/t-renew/")[key]
    store = store_for(etcd, "/t-renew")
    expiration = run(closing(store, store.put_lease("10.5.2.0-24", b"v", LEASE_TTL)))
    after = etcd_kvs(etcd, "/t-renew/")[key]
    assert after["lease"] != before["lease"]
    assert after["value"] == b"v"
    assert granted_ttl(etcd, after["lease"]) == 24 * 3600
    assert expiration == pytest.approx(time.time() + LEASE_TTL, abs=5)


def test_leases_written_by_flannel_nodes_are_read_and_a_bad_value_is_skipped_by_name(
        etcd, caplog):
    prefix = "/t-flannel/subnets"
    udp = b'{"PublicIP":"192.168.0.7","PublicIPv6":null}'
    vxlan = (b'{"PublicIP":"192.168.0.8","PublicIPv6":null,"BackendType":"vxlan",'
             b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    reserved = b'{"PublicIP":"192.168.0.10","PublicIPv6":null}'
    lease_id = grant(etcd, 86400)
    etcd.etcdctl("put", f"--lease={lease_id}", f"{prefix}/10.5.7.0-24", input=udp.decode())
    etcd.etcdctl("put", f"--lease={lease_id}", f"{prefix}/10.5.8.0-24", input=vxlan.decode())
    etcd.etcdctl("put", f"{prefix}/10.5.10.0-24", input=reserved.decode())  # a reservation
    etcd.etcdctl("put", f"{prefix}/10.5.66.0-24", "definitely not json")

    async def scenario():
        store = store_for(etcd, "/t-flannel")
        # ME is the reservation's PublicIP: it is ours, and stays a reservation
        manager = LeaseManager(store, CFG, ME, "", None, renew_margin=3600)
        with caplog.at_level(logging.WARNING, logger="flannel-udp"):
            mine = await manager.acquire(None)
            peers = await manager.load_peers()
        await store.close()
        return mine, sorted(peers, key=lambda p: p.subnet)

    mine, peers = run(scenario())
    assert mine.subnet == IPv4Network("10.5.10.0/24") and mine.expiration is None
    assert etcd_kvs(etcd, prefix)[f"{prefix}/10.5.10.0-24".encode()].get("lease", 0) == 0
    assert [str(p.subnet) for p in peers] == ["10.5.7.0/24", "10.5.8.0/24"]
    assert (peers[0].public_ip, peers[0].backend) == (IPv4Address("192.168.0.7"), "udp")
    assert peers[0].expiration == pytest.approx(time.time() + 86400, abs=5)
    assert (peers[1].backend, peers[1].backend_data) == (
        "vxlan", b'{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}')
    assert "10.5.66.0-24" in caplog.text


# -- the watch ------------------------------------------------------------------------------


async def collect(store: EtcdStore, since: Snapshot, seen: list) -> None:
    async for events in store.watch(since):
        seen.extend((e.kind, e.record.key, e.record.value) for e in events)


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_watch_reports_puts_changes_deletes_and_expiry_with_their_values(etcd):
    prefix = "/t-watch/subnets"
    etcd.etcdctl("put", f"{prefix}/10.5.9.0-24", "old")

    async def scenario():
        store = store_for(etcd, "/t-watch")
        since = await store.list_leases()
        seen: list = []
        task = asyncio.create_task(collect(store, since, seen))
        short = grant(etcd, 1)
        etcd.etcdctl("put", f"{prefix}/10.5.1.0-24", "v1")
        etcd.etcdctl("put", f"--lease={short}", f"{prefix}/10.5.2.0-24", "dies")
        etcd.etcdctl("put", f"{prefix}/10.5.1.0-24", "v2")
        etcd.etcdctl("del", f"{prefix}/10.5.9.0-24")
        await until(lambda: ("delete", "10.5.2.0-24", b"dies") in seen, 5, "the expiry")
        task.cancel()
        await store.close()
        return seen

    seen = run(scenario())
    assert seen == [("put", "10.5.1.0-24", b"v1"), ("put", "10.5.2.0-24", b"dies"),
                    ("put", "10.5.1.0-24", b"v2"), ("delete", "10.5.9.0-24", b"old"),
                    ("delete", "10.5.2.0-24", b"dies")]


def test_watch_resumes_from_the_next_revision_after_etcd_restarts(etcd, caplog, monkeypatch):
    # The watch waits longer than etcd takes to restart and be changed, so the changes made in
    # between can only arrive by watching again from the last revision seen + 1.
    monkeypatch.setattr(etcdcommon, "WATCH_RETRY_MIN", 2.5)
    prefix = "/t-restart/subnets"

    async def scenario():
        store = store_for(etcd, "/t-restart")
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        etcd.etcdctl("put", f"{prefix}/10.5.1.0-24", "a")
        await until(lambda: len(seen) == 1, 5, "the first put")
        with caplog.at_level(logging.INFO, logger="flannel-udp"):
            await asyncio.to_thread(etcd.stop_member, 0)
            await asyncio.to_thread(etcd.start_member, 0)
            etcd.etcdctl("put", f"{prefix}/10.5.2.0-24", "b")
            etcd.etcdctl("del", f"{prefix}/10.5.1.0-24")
            await until(lambda: len(seen) == 3, 10, "the changes made while not watching")
        task.cancel()
        await store.close()
        return seen

    seen = run(scenario())
    assert seen == [("put", "10.5.1.0-24", b"a"), ("put", "10.5.2.0-24", b"b"),
                    ("delete", "10.5.1.0-24", b"a")]
    assert "etcd watch interrupted" in caplog.text
    assert "etcd watch resumed" in caplog.text


def test_watch_after_compaction_lists_again_and_reports_the_difference(etcd, caplog):
    prefix = "/t-compact/subnets"
    etcd.etcdctl("put", f"{prefix}/10.5.1.0-24", "stays")
    etcd.etcdctl("put", f"{prefix}/10.5.2.0-24", "goes")
    etcd.etcdctl("put", f"{prefix}/10.5.3.0-24", "old")

    async def scenario():
        store = store_for(etcd, "/t-compact")
        since = await store.list_leases()
        etcd.etcdctl("del", f"{prefix}/10.5.2.0-24")
        etcd.etcdctl("put", f"{prefix}/10.5.3.0-24", "new")
        etcd.etcdctl("put", f"{prefix}/10.5.4.0-24", "added")
        revision = json.loads(etcd.etcdctl("get", "x", "-w", "json").stdout)["header"]["revision"]
        etcd.etcdctl("compaction", str(revision))
        seen: list = []
        task = asyncio.create_task(collect(store, since, seen))
        await until(lambda: len(seen) >= 3, 5, "the difference")
        await asyncio.sleep(0.2)
        task.cancel()
        await store.close()
        return seen

    with caplog.at_level(logging.WARNING, logger="flannel-udp"):
        seen = run(scenario())
    assert sorted(seen) == [("delete", "10.5.2.0-24", b"goes"), ("put", "10.5.3.0-24", b"new"),
                            ("put", "10.5.4.0-24", b"added")]
    assert "compacted" in caplog.text


# -- endpoints, TLS, auth -------------------------------------------------------------------


def test_a_dead_endpoint_is_passed_over_for_a_live_one(etcd):
    endpoints = f"http://127.0.0.1:{closed_port()},{etcd.endpoint_arg}"
    store = store_for(etcd, "/t-failover", endpoints=endpoints)

    async def scenario():
        await store.set_config(b"cfg")
        created = await store.create_lease("10.5.1.0-24", b"v", 60)
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        etcd.etcdctl("put", "/t-failover/subnets/10.5.2.0-24", "w")
        await until(lambda: seen, 5, "the watch on the live endpoint")
        task.cancel()
        return await store.get_config(), created, seen

    config, created, seen = run(closing(store, scenario()))
    assert config == b"cfg" and created is not None
    assert seen == [("put", "10.5.2.0-24", b"w")]


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory) -> Iterator[tuple[EtcdCluster, TestPKI]]:
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    pki = make_test_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])
    with EtcdCluster(1, pki=pki) as cluster:
        yield cluster.start(), pki


def test_tls_with_client_certificates_works(tls_etcd):
    cluster, pki = tls_etcd
    done = flannel_udp("network", "set", '{"Network":"10.5.0.0/16"}', *cluster.client_flags())
    assert done.returncode == 0, done.stderr
    store = store_for(cluster, "/coreos.com/network", cafile=str(pki.ca),
                      certfile=str(pki.client_cert), keyfile=str(pki.client_key))

    async def scenario():
        created = await store.create_lease("10.5.1.0-24", b"v", 60)
        return await store.get_config(), created, await store.list_leases()

    config, created, snapshot = run(closing(store, scenario()))
    assert config == b'{"Network":"10.5.0.0/16"}' and created is not None
    assert [r.key for r in snapshot.records] == ["10.5.1.0-24"]


def test_a_wrong_ca_is_refused_at_once_with_a_clear_line(tls_etcd):
    cluster, pki = tls_etcd
    started = time.monotonic()
    done = flannel_udp("network", "get", *cluster.client_flags(cafile=pki.other_ca))
    assert done.returncode == 1
    assert time.monotonic() - started < 10
    line = one_error_line(done, exit_code=None)
    assert "TLS handshake failed" in line and "CERTIFICATE_VERIFY_FAILED" in line, line
    assert "--etcd-cafile" in line


def test_a_daemon_with_a_wrong_ca_exits_without_waiting_for_etcd(tls_etcd):
    cluster, pki = tls_etcd
    started = time.monotonic()
    # --iface names no interface: had TLS wrongly succeeded, it stops there, before any device
    done = flannel_udp("run", *cluster.client_flags(cafile=pki.other_ca), "--etcd-wait", "60",
                       "--iface", "fu-no-such-if", "--subnet-file", "/nonexistent/subnet.env")
    assert done.returncode == 1
    assert time.monotonic() - started < 10, "a TLS failure is no outage to wait out"
    assert "TLS handshake failed" in one_error_line(done, exit_code=None)


def test_without_a_client_certificate_etcd_refuses_and_it_is_said(tls_etcd):
    cluster, pki = tls_etcd
    done = flannel_udp("network", "get", "--etcd-endpoints", cluster.endpoint_arg,
                       "--etcd-cafile", str(pki.ca))
    assert done.returncode == 1
    assert "TLS handshake failed" in one_error_line(done, exit_code=None)


def test_a_key_that_is_not_the_certificates_exits_2_before_any_connection(tls_etcd):
    cluster, pki = tls_etcd
    done = flannel_udp("network", "get", "--etcd-endpoints", cluster.endpoint_arg,
                       "--etcd-cafile", str(pki.ca), "--etcd-certfile", str(pki.client_cert),
                       "--etcd-keyfile", str(pki.server_key))
    assert done.returncode == 2
    assert "KEY_VALUES_MISMATCH" in one_error_line(done, exit_code=None)


def test_user_and_password(tmp_path):
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    with EtcdCluster(1) as cluster:
        cluster.start()
        cluster.etcdctl("user", "add", "root", "--new-user-password", "s3cret",
                        "--interactive=false")
        cluster.etcdctl("auth", "enable")
        ok = store_for(cluster, "/auth", username="root", password="s3cret")
        assert run(closing(ok, ok.set_config(b"cfg"))) is True
        wrong = store_for(cluster, "/auth", username="root", password="nope")
        with pytest.raises(StoreError, match="authentication failed"):
            run(closing(wrong, wrong.get_config()))
        done = flannel_udp("network", "get", "--etcd-endpoints", cluster.endpoint_arg,
                           "--etcd-prefix", "/auth", "--etcd-username", "root",
                           "--etcd-password", "s3cret")
        assert (done.returncode, done.stdout) == (0, "cfg\n"), done.stderr


# -- the command line -----------------------------------------------------------------------


def test_network_set_and_get_against_etcd(etcd):
    flags = ["--etcd-endpoints", etcd.endpoint_arg, "--etcd-prefix", "/t-cli/network"]
    config = '{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}'
    done = flannel_udp("network", "set", config, *flags)
    assert done.returncode == 0, done.stderr
    assert etcd_kvs(etcd, "/t-cli/")[b"/t-cli/network/config"]["value"] == config.encode()
    got = flannel_udp("network", "get", *flags)
    assert (got.returncode, got.stdout) == (0, config + "\n"), got.stderr


@pytest.mark.parametrize("endpoints", ["ftp://127.0.0.1:2379", "http://127.0.0.1:port",
                                       "http://127.0.0.1:2379/v2/keys", "http://", ","])
def test_a_bad_endpoint_url_exits_2_naming_it(endpoints):
    done = flannel_udp("network", "get", "--etcd-endpoints", endpoints)
    assert done.returncode == 2, done.stderr
    assert "--etcd-endpoints" in one_error_line(done, exit_code=None)


@pytest.mark.parametrize("flags, named", [
    (["--etcd-certfile", "/etc/hostname"], "--etcd-keyfile"),
    (["--etcd-cafile", "/nonexistent/ca.crt"], "/nonexistent/ca.crt"),
    (["--etcd-cafile", "/etc/hostname"], "not a PEM file"),
    (["--etcd-username", "root"], "--etcd-password"),
])
def test_bad_tls_or_auth_flags_exit_2_naming_them(flags, named):
    done = flannel_udp("network", "get", "--etcd-endpoints", "https://127.0.0.1:2379", *flags)
    assert done.returncode == 2, done.stderr
    assert named in one_error_line(done, exit_code=None)


@pytest.mark.parametrize("missing", ["--etcd-certfile", "--etcd-keyfile"])
def test_a_missing_client_certificate_or_key_file_is_named(tmp_path, missing):
    present = tmp_path / "present.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    files = {"--etcd-certfile": str(present), "--etcd-keyfile": str(present),
             missing: str(tmp_path / "absent.pem")}
    done = flannel_udp("network", "get", "--etcd-endpoints", "https://127.0.0.1:2379",
                       *(a for flag, path in files.items() for a in (flag, path)))
    assert done.returncode == 2, done.stderr
    line = one_error_line(done, exit_code=None)
    assert f"{missing} {tmp_path / 'absent.pem'}: No such file or directory" in line, line
    assert "None" not in line


def test_an_unreachable_etcd_fails_a_command_at_once_in_one_line():
    done = flannel_udp("network", "get", "--etcd-endpoints", f"127.0.0.1:{closed_port()}")
    assert done.returncode == 1
    line = one_error_line(done, exit_code=None)
    assert "etcd unreachable" in line and "connection refused" in line, line


def test_a_daemon_waits_for_an_unreachable_etcd_as_long_as_told_then_exits():
    started = time.monotonic()
    done = flannel_udp("run", "--etcd-endpoints", f"http://127.0.0.1:{closed_port()}",
                       "--etcd-wait", "2", "--iface", "fu-no-such-if",
                       "--subnet-file", "/nonexistent/subnet.env")
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert 2 <= took < 10, took
    line = one_error_line(done, exit_code=None)
    assert "etcd unreachable" in line and "gave up after waiting 2 s" in line, line
    assert "trying again" in done.stderr  # it said what it was doing meanwhile
