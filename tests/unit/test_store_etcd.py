"""The etcd stores against a real etcd (Debian's etcd 3.4 with --enable-v2=true, started on free
loopback ports): the v3 store and the v2 store pass the same tests (the `ks` parameter: flannel's
keys and values, the create-only write, renewal, leases written by flannel nodes, the watch
across an etcd restart, a dead endpoint, TLS with client certificates, user and password, the
command line's one-line errors), and each its own (v3: etcd leases and compaction; v2: the
errorCode 401 relist, TTL expiry, directories where a key belongs, a member without v2).

Tests on the shared etcd each use a prefix of their own, so that they do not see each other
(and v2 and v3 keys live apart in etcd)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from helpers import one_error_line

from flannel_udp.config import parse_config
from flannel_udp.lab import EtcdCluster, TestPKI, etcd_problem, make_test_pki
from flannel_udp.lease import LEASE_TTL
from flannel_udp.manager import LeaseManager
from flannel_udp.stores import UNKNOWN_EXPIRY, Snapshot, StoreError, etcdcommon
from flannel_udp.stores.etcd import EtcdOptions, EtcdStore
from flannel_udp.stores.etcd2 import Etcd2Store

CFG = parse_config('{"Network": "10.5.0.0/16"}')
ME = IPv4Address("192.168.0.10")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """One etcd for the module, serving both keyspaces (the seed's etcd runs with v2 on)."""
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    with EtcdCluster(1, enable_v2=True) as cluster:
        yield cluster.start()


def v2_nodes(cluster: EtcdCluster, key: str, member: int = 0) -> dict[str, dict]:
    """key -> node for every key under `key` in the v2 keyspace (etcd's v2 HTTP API)."""
    url = f"{cluster.endpoints[member]}/v2/keys{key}?recursive=true"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return {}
        raise
    nodes, todo = {}, [body["node"]]
    while todo:
        node = todo.pop()
        if node.get("dir"):
            todo += node.get("nodes", [])
        else:
            nodes[node["key"]] = node
    return nodes


@dataclass(frozen=True)
class Keyspace:
    """One of etcd's keyspaces, with what a test does there by hand (as flannel does)."""

    api: str  # 'v3' or 'v2'

    def store(self, cluster: EtcdCluster, prefix: str, endpoints: str | None = None,
              **flags: str | None) -> EtcdStore | Etcd2Store:
        options = EtcdOptions.from_flags(endpoints or cluster.endpoint_arg, prefix, **flags)
        return EtcdStore(options) if self.api == "v3" else Etcd2Store(options)

    @property
    def flags(self) -> list[str]:
        return ["--etcd-api", self.api]

    def put(self, cluster: EtcdCluster, key: str, value: str, ttl: int | None = None) -> None:
        """As flanneld writes a key: v3 bound to an etcd lease of `ttl`, v2 with a TTL."""
        if self.api == "v3":
            lease = [f"--lease={grant(cluster, ttl)}"] if ttl else []
            cluster.etcdctl("put", *lease, key, input=value)
        else:
            cluster.etcdctl("set", *(["--ttl", str(ttl)] if ttl else []), key, value, api=2)

    def delete(self, cluster: EtcdCluster, key: str) -> None:
        if self.api == "v3":
            cluster.etcdctl("del", key)
        else:
            cluster.etcdctl("rm", key, api=2)

    def values(self, cluster: EtcdCluster, prefix: str) -> dict[bytes, bytes]:
        """Every key under `prefix` and its value, as etcd holds them."""
        if self.api == "v3":
            return {k: kv["value"] for k, kv in etcd_kvs(cluster, prefix).items()}
        return {k.encode(): n["value"].encode()
                for k, n in v2_nodes(cluster, prefix.rstrip("/") or "/").items()}

    def ttl(self, cluster: EtcdCluster, key: str) -> int | None:
        """The TTL the key was given (v3: its etcd lease's; v2: what is left), None: none."""
        if self.api == "v3":
            lease = etcd_kvs(cluster, key)[key.encode()].get("lease", 0)
            return granted_ttl(cluster, lease) if lease else None
        return v2_nodes(cluster, key)[key].get("ttl")


@pytest.fixture(params=["v3", "v2"])
def ks(request) -> Keyspace:
    return Keyspace(request.param)


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


def test_keys_values_and_ttls_are_flannels(etcd, ks):
    store = ks.store(etcd, "/coreos.com/network")

    async def scenario():
        await store.set_config(b'{"Network": "10.5.0.0/16"}')
        return await LeaseManager(store, CFG, ME, "", None, renew_margin=3600).acquire(None)

    lease = run(closing(store, scenario()))
    values = ks.values(etcd, "/coreos.com/network/")
    key = f"/coreos.com/network/subnets/{lease.subnet.network_address}-24"
    assert set(values) == {b"/coreos.com/network/config", key.encode()}
    assert values[b"/coreos.com/network/config"] == b'{"Network": "10.5.0.0/16"}'
    assert ks.ttl(etcd, "/coreos.com/network/config") is None
    if ks.api == "v3":  # v2's lease JSON is flannel v0.11's: the lease layer's choice
        assert values[key.encode()] == b'{"PublicIP":"192.168.0.10","PublicIPv6":null}'
    assert json.loads(values[key.encode()])["PublicIP"] == "192.168.0.10"
    assert ks.ttl(etcd, key) == pytest.approx(24 * 3600, abs=5)
    assert lease.expiration == pytest.approx(time.time() + LEASE_TTL, abs=5)


def test_a_trailing_slash_in_the_prefix_changes_no_key(etcd, ks):
    run(closing(s := ks.store(etcd, "/slash/network/"), s.set_config(b"{}")))
    assert set(ks.values(etcd, "/slash/")) == {b"/slash/network/config"}


def test_create_only_config_is_written_once(etcd, ks):
    store = ks.store(etcd, "/t-config-once")

    async def scenario():
        return (await store.set_config(b"first", create_only=True),
                await store.set_config(b"second", create_only=True), await store.get_config())

    assert run(closing(store, scenario())) == (True, False, b"first")


def test_create_is_atomic_and_fails_when_the_key_exists(etcd, ks):
    first, second = ks.store(etcd, "/t-create"), ks.store(etcd, "/t-create")
    leases_before = etcd_lease_count(etcd)

    async def scenario():
        a = await first.create_lease("10.5.1.0-24", b"first", 3600)
        b = await second.create_lease("10.5.1.0-24", b"second", 3600)
        await first.close()
        await second.close()
        return a, b

    a, b = run(scenario())
    assert a is not None and b is None
    assert ks.values(etcd, "/t-create/")[b"/t-create/subnets/10.5.1.0-24"] == b"first"
    assert ks.ttl(etcd, "/t-create/subnets/10.5.1.0-24") == pytest.approx(3600, abs=5)
    if ks.api == "v3":  # the loser's fresh etcd lease was given back, not left to run out
        assert etcd_lease_count(etcd) == leases_before + 1


def test_renewal_gives_the_key_a_fresh_ttl_and_a_reservation_none(etcd, ks):
    store = ks.store(etcd, "/t-renew")
    key = "/t-renew/subnets/10.5.2.0-24"
    run(closing(store, store.create_lease("10.5.2.0-24", b"v", 60)))
    before = etcd_kvs(etcd, "/t-renew/")[key.encode()] if ks.api == "v3" else None
    store = ks.store(etcd, "/t-renew")
    expiration = run(closing(store, store.put_lease("10.5.2.0-24", b"v", LEASE_TTL)))
    assert ks.values(etcd, "/t-renew/")[key.encode()] == b"v"
    assert ks.ttl(etcd, key) == pytest.approx(24 * 3600, abs=5)
    assert expiration == pytest.approx(time.time() + LEASE_TTL, abs=5)
    if ks.api == "v3":  # a fresh etcd lease, as flannel renews
        assert etcd_kvs(etcd, "/t-renew/")[key.encode()]["lease"] != before["lease"]
    store = ks.store(etcd, "/t-renew")
    assert run(closing(store, store.put_lease("10.5.2.0-24", b"r", None))) is None
    assert ks.ttl(etcd, key) is None
    store = ks.store(etcd, "/t-renew")
    assert run(closing(store, store.list_leases())).records[0].expiration is None


def test_delete_removes_the_key_and_an_absent_one_is_no_error(etcd, ks):
    ks.put(etcd, "/t-delete/subnets/10.5.3.0-24", "v")
    store = ks.store(etcd, "/t-delete")

    async def scenario():
        await store.delete_lease("10.5.3.0-24")
        await store.delete_lease("10.5.3.0-24")
        return await store.list_leases()

    assert run(closing(store, scenario())).records == ()
    assert ks.values(etcd, "/t-delete/") == {}


# Lease values as each flanneld writes them: v0.22 (v3) and v0.11 (v2, no PublicIPv6 nor VNI).
FLANNEL_VALUES = {
    "v3": ('{"PublicIP":"192.168.0.7","PublicIPv6":null}',
           '{"PublicIP":"192.168.0.8","PublicIPv6":null,"BackendType":"vxlan",'
           '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
           '{"PublicIP":"192.168.0.10","PublicIPv6":null}'),
    "v2": ('{"PublicIP":"192.168.0.7"}',
           '{"PublicIP":"192.168.0.8","BackendType":"vxlan",'
           '"BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}',
           '{"PublicIP":"192.168.0.10"}'),
}


def test_leases_written_by_flannel_nodes_are_read_and_a_bad_value_is_skipped_by_name(
        etcd, ks, caplog):
    prefix = "/t-flannel/subnets"
    udp, vxlan, reserved = FLANNEL_VALUES[ks.api]
    ks.put(etcd, f"{prefix}/10.5.7.0-24", udp, ttl=86400)
    ks.put(etcd, f"{prefix}/10.5.8.0-24", vxlan, ttl=86400)
    ks.put(etcd, f"{prefix}/10.5.10.0-24", reserved)  # a reservation
    ks.put(etcd, f"{prefix}/10.5.66.0-24", "definitely not json")

    async def scenario():
        store = ks.store(etcd, "/t-flannel")
        # ME is the reservation's PublicIP: it is ours, and stays a reservation
        manager = LeaseManager(store, CFG, ME, "", None, renew_margin=3600)
        with caplog.at_level(logging.WARNING, logger="flannel-udp"):
            mine = await manager.acquire(None)
            peers = await manager.load_peers()
        await store.close()
        return mine, sorted(peers, key=lambda p: p.subnet)

    mine, peers = run(scenario())
    assert mine.subnet == IPv4Network("10.5.10.0/24") and mine.expiration is None
    assert ks.ttl(etcd, f"{prefix}/10.5.10.0-24") is None
    assert [str(p.subnet) for p in peers] == ["10.5.7.0/24", "10.5.8.0/24"]
    assert (peers[0].public_ip, peers[0].backend) == (IPv4Address("192.168.0.7"), "udp")
    if ks.api == "v3":  # one call per key to ask: a daemon does not, it routes all the same
        assert peers[0].expiration == UNKNOWN_EXPIRY
    else:  # a v2 node carries it
        assert peers[0].expiration == pytest.approx(time.time() + 86400, abs=5)
    assert peers[1].backend == "vxlan"
    assert json.loads(peers[1].backend_data)["VtepMAC"] == "c6:d2:32:6f:8f:44"
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


def test_watch_reports_puts_changes_deletes_and_expiry_with_their_values(etcd, ks):
    prefix = "/t-watch/subnets"
    ks.put(etcd, f"{prefix}/10.5.9.0-24", "old")

    async def scenario():
        store = ks.store(etcd, "/t-watch")
        since = await store.list_leases()
        seen: list = []
        task = asyncio.create_task(collect(store, since, seen))
        ks.put(etcd, f"{prefix}/10.5.1.0-24", "v1")
        ks.put(etcd, f"{prefix}/10.5.2.0-24", "dies", ttl=1)
        ks.put(etcd, f"{prefix}/10.5.1.0-24", "v2")
        ks.delete(etcd, f"{prefix}/10.5.9.0-24")
        await until(lambda: ("delete", "10.5.2.0-24", b"dies") in seen, 5, "the expiry")
        task.cancel()
        await store.close()
        return seen

    seen = run(scenario())
    assert seen == [("put", "10.5.1.0-24", b"v1"), ("put", "10.5.2.0-24", b"dies"),
                    ("put", "10.5.1.0-24", b"v2"), ("delete", "10.5.9.0-24", b"old"),
                    ("delete", "10.5.2.0-24", b"dies")]


def test_watch_loses_nothing_when_etcd_restarts(etcd, ks, caplog, monkeypatch):
    # The watch waits longer than etcd takes to restart and be changed, so the changes made in
    # between can only arrive by watching again from the last position seen + 1 (or, in v2,
    # by listing again if etcd's history no longer holds it).
    monkeypatch.setattr(etcdcommon, "WATCH_RETRY_MIN", 2.5)
    prefix = "/t-restart/subnets"

    async def scenario():
        store = ks.store(etcd, "/t-restart")
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        ks.put(etcd, f"{prefix}/10.5.1.0-24", "a")
        await until(lambda: len(seen) == 1, 5, "the first put")
        with caplog.at_level(logging.INFO, logger="flannel-udp"):
            await asyncio.to_thread(etcd.stop_member, 0)
            await asyncio.to_thread(etcd.start_member, 0)
            ks.put(etcd, f"{prefix}/10.5.2.0-24", "b")
            ks.delete(etcd, f"{prefix}/10.5.1.0-24")
            await until(lambda: len(seen) == 3, 10, "the changes made while not watching")
            await asyncio.sleep(0.3)  # nothing more comes
        task.cancel()
        await store.close()
        return seen

    seen = run(scenario())
    assert seen[0] == ("put", "10.5.1.0-24", b"a")
    assert sorted(seen[1:]) == [("delete", "10.5.1.0-24", b"a"), ("put", "10.5.2.0-24", b"b")]
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


def test_a_dead_endpoint_is_passed_over_for_a_live_one(etcd, ks):
    endpoints = f"http://127.0.0.1:{closed_port()},{etcd.endpoint_arg}"
    store = ks.store(etcd, "/t-failover", endpoints=endpoints)

    async def scenario():
        await store.set_config(b"cfg")
        created = await store.create_lease("10.5.1.0-24", b"v", 60)
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        ks.put(etcd, "/t-failover/subnets/10.5.2.0-24", "w")
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
    with EtcdCluster(1, pki=pki, enable_v2=True) as cluster:
        yield cluster.start(), pki


def test_tls_with_client_certificates_works(tls_etcd, ks):
    cluster, pki = tls_etcd
    done = flannel_udp("network", "set", '{"Network":"10.5.0.0/16"}', *cluster.client_flags(),
                       *ks.flags)
    assert done.returncode == 0, done.stderr
    store = ks.store(cluster, "/coreos.com/network", cafile=str(pki.ca),
                     certfile=str(pki.client_cert), keyfile=str(pki.client_key))

    async def scenario():
        created = await store.create_lease("10.5.1.0-24", b"v", 60)
        return await store.get_config(), created, await store.list_leases()

    config, created, snapshot = run(closing(store, scenario()))
    assert config == b'{"Network":"10.5.0.0/16"}' and created is not None
    assert [r.key for r in snapshot.records] == ["10.5.1.0-24"]


def test_a_wrong_ca_is_refused_at_once_with_a_clear_line(tls_etcd, ks):
    cluster, pki = tls_etcd
    started = time.monotonic()
    done = flannel_udp("network", "get", *cluster.client_flags(cafile=pki.other_ca), *ks.flags)
    assert done.returncode == 1
    assert time.monotonic() - started < 10
    line = one_error_line(done, exit_code=None)
    assert "TLS handshake failed" in line and "CERTIFICATE_VERIFY_FAILED" in line, line
    assert "--etcd-cafile" in line


def own_files(tmp_path: Path) -> list[str]:
    """A daemon's --subnet-file and --control-socket of its own: not another daemon's on this
    machine (another test run's, say), and not outside the test's directory."""
    return ["--subnet-file", str(tmp_path / "run" / "subnet.env"),
            "--control-socket", str(tmp_path / "run" / "control.sock")]


def test_a_daemon_with_a_wrong_ca_exits_without_waiting_for_etcd(tls_etcd, ks, tmp_path):
    cluster, pki = tls_etcd
    started = time.monotonic()
    # --iface names no interface: had TLS wrongly succeeded, it stops there, before any device
    done = flannel_udp("run", *cluster.client_flags(cafile=pki.other_ca), *ks.flags,
                       "--etcd-wait", "60", "--iface", "fu-no-such-if", *own_files(tmp_path))
    assert done.returncode == 1
    assert time.monotonic() - started < 10, "a TLS failure is no outage to wait out"
    assert "TLS handshake failed" in one_error_line(done, exit_code=None)


def test_without_a_client_certificate_etcd_refuses_and_it_is_said(tls_etcd, ks):
    cluster, pki = tls_etcd
    done = flannel_udp("network", "get", "--etcd-endpoints", cluster.endpoint_arg,
                       "--etcd-cafile", str(pki.ca), *ks.flags)
    assert done.returncode == 1
    assert "TLS handshake failed" in one_error_line(done, exit_code=None)


def test_a_key_that_is_not_the_certificates_exits_2_before_any_connection(tls_etcd):
    cluster, pki = tls_etcd
    done = flannel_udp("network", "get", "--etcd-endpoints", cluster.endpoint_arg,
                       "--etcd-cafile", str(pki.ca), "--etcd-certfile", str(pki.client_cert),
                       "--etcd-keyfile", str(pki.server_key))
    assert done.returncode == 2
    assert "KEY_VALUES_MISMATCH" in one_error_line(done, exit_code=None)


def test_user_and_password(tmp_path, ks):
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    with EtcdCluster(1, enable_v2=True) as cluster:
        cluster.start()
        if ks.api == "v3":
            cluster.etcdctl("user", "add", "root", "--new-user-password", "s3cret",
                            "--interactive=false")
            cluster.etcdctl("auth", "enable")
        else:  # v2 has its own users
            cluster.etcdctl("user", "add", "root:s3cret", api=2)
            cluster.etcdctl("auth", "enable", api=2)
        ok = ks.store(cluster, "/auth", username="root", password="s3cret")
        assert run(closing(ok, ok.set_config(b"cfg"))) is True
        wrong = ks.store(cluster, "/auth", username="root", password="nope")
        with pytest.raises(StoreError, match="authentication failed"):
            run(closing(wrong, wrong.get_config()))
        done = flannel_udp("network", "get", "--etcd-endpoints", cluster.endpoint_arg,
                           "--etcd-prefix", "/auth", "--etcd-username", "root",
                           "--etcd-password", "s3cret", *ks.flags)
        assert (done.returncode, done.stdout) == (0, "cfg\n"), done.stderr


# -- the command line -----------------------------------------------------------------------


def test_network_set_and_get_against_etcd(etcd, ks):
    flags = ["--etcd-endpoints", etcd.endpoint_arg, "--etcd-prefix", "/t-cli/network", *ks.flags]
    config = '{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}'
    done = flannel_udp("network", "set", config, *flags)
    assert done.returncode == 0, done.stderr
    assert ks.values(etcd, "/t-cli/")[b"/t-cli/network/config"] == config.encode()
    assert f"etcd {ks.api} keyspace" in done.stdout
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


@pytest.mark.parametrize("api", ["auto", "v3", "v2"])
def test_a_ca_file_without_a_certificate_exits_2_naming_it(tmp_path, api):
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n")
    done = flannel_udp("network", "get", "--etcd-endpoints", "https://127.0.0.1:2379",
                       "--etcd-cafile", str(bad), "--etcd-api", api)
    line = one_error_line(done, exit_code=2)
    assert f"--etcd-cafile {bad}: a PEM file, but no certificate could be read" in line, line


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


@pytest.mark.parametrize("api", ["auto", "v3", "v2"])
def test_an_unreachable_etcd_fails_a_command_at_once_in_one_line(api):
    done = flannel_udp("network", "get", "--etcd-endpoints", f"127.0.0.1:{closed_port()}",
                       "--etcd-api", api)
    assert done.returncode == 1
    line = one_error_line(done, exit_code=None)
    assert "etcd unreachable" in line and "connection refused" in line, line


def test_a_daemon_waits_for_an_unreachable_etcd_as_long_as_told_then_exits(ks, tmp_path):
    started = time.monotonic()
    done = flannel_udp("run", "--etcd-endpoints", f"http://127.0.0.1:{closed_port()}", *ks.flags,
                       "--etcd-wait", "2", "--iface", "fu-no-such-if", *own_files(tmp_path))
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert 2 <= took < 10, took
    line = one_error_line(done, exit_code=None)
    assert "etcd unreachable" in line and "gave up after waiting 2 s" in line, line
    assert "trying again" in done.stderr  # it said what it was doing meanwhile


# -- the v2 store's own -----------------------------------------------------------------------

V2 = Keyspace("v2")


def v2_write_many(cluster: EtcdCluster, key: str, count: int) -> None:
    """`count` writes to one v2 key, straight over etcd's v2 HTTP API (etcdctl: 20 ms each)."""
    url = f"{cluster.endpoints[0]}/v2/keys{key}"
    for i in range(count):
        request = urllib.request.Request(url, data=f"value={i}".encode(), method="PUT")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        urllib.request.urlopen(request, timeout=10).close()


def test_v2_watch_from_an_index_etcd_no_longer_holds_lists_again_and_reports_the_difference(
        etcd, caplog):
    prefix = "/t-cleared/subnets"
    V2.put(etcd, f"{prefix}/10.5.1.0-24", "stays")
    V2.put(etcd, f"{prefix}/10.5.2.0-24", "goes")
    V2.put(etcd, f"{prefix}/10.5.3.0-24", "old")

    async def scenario():
        store = V2.store(etcd, "/t-cleared")
        since = await store.list_leases()
        V2.delete(etcd, f"{prefix}/10.5.2.0-24")
        V2.put(etcd, f"{prefix}/10.5.3.0-24", "new")
        V2.put(etcd, f"{prefix}/10.5.4.0-24", "added")
        # etcd v2 keeps the last 1000 events: these push the ones above out of its history
        await asyncio.to_thread(v2_write_many, etcd, "/t-cleared-elsewhere", 1010)
        seen: list = []
        task = asyncio.create_task(collect(store, since, seen))
        await until(lambda: len(seen) >= 3, 10, "the difference")
        V2.put(etcd, f"{prefix}/10.5.5.0-24", "after")  # and the watch goes on from there
        await until(lambda: len(seen) >= 4, 5, "the put after the listing")
        await asyncio.sleep(0.2)
        task.cancel()
        await store.close()
        return seen

    with caplog.at_level(logging.WARNING, logger="flannel-udp"):
        seen = run(scenario())
    assert sorted(seen[:3]) == [("delete", "10.5.2.0-24", b"goes"),
                                ("put", "10.5.3.0-24", b"new"),
                                ("put", "10.5.4.0-24", b"added")]
    assert seen[3:] == [("put", "10.5.5.0-24", b"after")]
    assert "history no longer holds index" in caplog.text
    assert "listing the leases again" in caplog.text


def test_v2_a_key_whose_ttl_runs_out_is_a_delete_within_two_seconds(etcd):
    prefix = "/t-expire/subnets"

    async def scenario():
        store = V2.store(etcd, "/t-expire")
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        await asyncio.sleep(0.2)
        V2.put(etcd, f"{prefix}/10.5.1.0-24", "short", ttl=1)
        put_at = time.monotonic()
        await until(lambda: ("delete", "10.5.1.0-24", b"short") in seen, 10, "the expiry")
        task.cancel()
        await store.close()
        return time.monotonic() - put_at

    # a correctness bound (etcd's TTL plus its once-a-500-ms expiry sweep), not a speed test
    assert run(scenario()) < 1 + 2


def v2_watch_silence(etcd: EtcdCluster, monkeypatch, caplog, prefix: str,
                     reissue: float) -> list:
    """A v2 watch with a request timeout of 0.3 s and waits asked again after `reissue` s,
    left 1.2 s without an event, then a put: what it saw."""
    from flannel_udp.stores import etcd2
    monkeypatch.setattr(etcd2, "RPC_TIMEOUT", 0.3)
    monkeypatch.setattr(etcd2, "WATCH_REISSUE", reissue)

    async def scenario():
        store = V2.store(etcd, prefix)
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        await asyncio.sleep(1.2)
        V2.put(etcd, f"{prefix}/subnets/10.5.1.0-24", "a")
        await until(lambda: seen, 5, "the put")
        task.cancel()
        await store.close()
        return seen

    with caplog.at_level(logging.DEBUG, logger="flannel-udp"):
        return run(scenario())


def test_v2_a_long_poll_is_not_cut_by_the_request_timeout(etcd, caplog, monkeypatch):
    seen = v2_watch_silence(etcd, monkeypatch, caplog, "/t-longpoll", reissue=30)
    assert seen == [("put", "10.5.1.0-24", b"a")]
    assert "asking again" not in caplog.text and "interrupted" not in caplog.text, caplog.text


def test_v2_a_silent_long_poll_is_asked_again_and_misses_nothing(etcd, caplog, monkeypatch):
    seen = v2_watch_silence(etcd, monkeypatch, caplog, "/t-reissue", reissue=0.3)
    assert seen == [("put", "10.5.1.0-24", b"a")]
    assert caplog.text.count("asking again") >= 2, caplog.text
    assert "interrupted" not in caplog.text and "listing" not in caplog.text, caplog.text


def test_v2_a_directory_where_a_lease_key_belongs_is_skipped_with_a_warning_naming_it(
        etcd, caplog):
    prefix = "/t-dir/subnets"
    V2.put(etcd, f"{prefix}/10.5.1.0-24", "not json at all")  # the lease layer's to refuse
    etcd.etcdctl("mkdir", f"{prefix}/10.5.2.0-24", api=2)
    etcd.etcdctl("set", f"{prefix}/10.5.3.0-24/inner", "x", api=2)

    async def scenario():
        store = V2.store(etcd, "/t-dir")
        snapshot = await store.list_leases()
        seen: list = []
        task = asyncio.create_task(collect(store, snapshot, seen))
        etcd.etcdctl("mkdir", f"{prefix}/10.5.4.0-24", api=2)
        V2.put(etcd, f"{prefix}/10.5.5.0-24", "v")
        await until(lambda: seen, 5, "the put after the directory")
        etcd.etcdctl("rmdir", f"{prefix}/10.5.4.0-24", api=2)
        V2.put(etcd, f"{prefix}/10.5.6.0-24", "w")
        await until(lambda: len(seen) >= 2, 5, "the put after the rmdir")
        task.cancel()
        await store.close()
        return snapshot, seen

    with caplog.at_level(logging.WARNING, logger="flannel-udp"):
        snapshot, seen = run(scenario())
    assert [(r.key, r.value) for r in snapshot.records] == [("10.5.1.0-24", b"not json at all")]
    assert seen == [("put", "10.5.5.0-24", b"v"), ("put", "10.5.6.0-24", b"w")]
    for key in ("10.5.2.0-24", "10.5.3.0-24", "10.5.4.0-24"):
        assert f"'{prefix}/{key}': a v2 directory where a lease key belongs" in caplog.text


def test_v2_tls_with_client_certificates_fails_over_between_members(tmp_path):
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    pki = make_test_pki(tmp_path / "pki", ["127.0.0.1"])
    with EtcdCluster(3, pki=pki, enable_v2=True) as cluster:
        cluster.start()
        cluster.etcdctl("set", "/tls/config", "cfg", api=2)
        store = V2.store(cluster, "/tls", cafile=str(pki.ca), certfile=str(pki.client_cert),
                         keyfile=str(pki.client_key))

        async def scenario():
            created = await store.create_lease("10.5.1.0-24", b"v", 60)
            seen: list = []
            task = asyncio.create_task(collect(store, await store.list_leases(), seen))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(cluster.stop_member, 0)  # the one the store talks to
            cluster.etcdctl("set", "/tls/subnets/10.5.2.0-24", "w", member=1, api=2)
            await until(lambda: seen, 10, "the watch on another member")
            first = list(seen)
            after = (await store.get_config(), await store.create_lease("10.5.3.0-24", b"x", 60))
            task.cancel()
            return created, first, after

        created, seen, (config, created_after) = run(closing(store, scenario()))
        assert created is not None and created_after is not None
        assert seen == [("put", "10.5.2.0-24", b"w")]
        assert config == b"cfg"


def test_v2_a_member_without_the_v2_api_is_said_in_one_line_and_changes_nothing():
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    with EtcdCluster(1) as cluster:  # etcd 3.4's default: no v2
        cluster.start()
        base = ["--etcd-endpoints", cluster.endpoint_arg]
        line = one_error_line(flannel_udp("network", "get", *base, "--etcd-api", "v2"),
                              exit_code=1)
        assert line == (f"flannel-udp: etcd at {cluster.endpoints[0]} does not serve the v2 API "
                        "(start it with --enable-v2=true)")
        refused = flannel_udp("network", "set", '{"Network":"10.7.0.0/16"}', *base,
                              "--etcd-api", "v2")
        assert "does not serve the v2 API" in one_error_line(refused, exit_code=1)
        assert etcd_kvs(cluster, "/") == {}
        # auto: no v2 counts as no config there; a v3 config is found as before
        done = flannel_udp("network", "set", '{"Network":"10.7.0.0/16"}', *base)
        assert done.returncode == 0 and "etcd v3 keyspace" in done.stdout, done.stderr
        got = flannel_udp("network", "get", *base)
        assert (got.returncode, got.stdout) == (0, '{"Network":"10.7.0.0/16"}\n'), got.stderr


# -- which keyspace ---------------------------------------------------------------------------


def config_flags(etcd: EtcdCluster, prefix: str) -> list[str]:
    return ["--etcd-endpoints", etcd.endpoint_arg, "--etcd-prefix", prefix]


def test_auto_finds_a_config_only_in_v2_as_the_seed_writes_it(etcd):
    seed = '{"Network": "172.68.0.0/16", "Backend": {"Type": "host-gw"}}'
    etcd.etcdctl("set", "/t-only-v2/network/config", seed, api=2)
    got = flannel_udp("network", "get", *config_flags(etcd, "/t-only-v2/network"))
    assert (got.returncode, got.stdout, got.stderr) == (0, seed + "\n", "")
    v3 = flannel_udp("network", "get", *config_flags(etcd, "/t-only-v2/network"),
                     "--etcd-api", "v3")
    assert "no network config" in one_error_line(v3, exit_code=1)


def test_with_a_config_in_both_keyspaces_auto_takes_v3_with_a_warning_and_v2_can_be_forced(
        etcd):
    etcd.etcdctl("set", "/t-both/config", '{"Network": "10.2.0.0/16"}', api=2)
    etcd.etcdctl("put", "/t-both/config", '{"Network": "10.3.0.0/16"}')
    got = flannel_udp("network", "get", *config_flags(etcd, "/t-both"))
    assert (got.returncode, got.stdout) == (0, '{"Network": "10.3.0.0/16"}\n'), got.stderr
    assert "both etcd keyspaces hold a network config; using etcd v3's" in got.stderr
    assert "--etcd-api v2" in got.stderr
    forced = flannel_udp("network", "get", *config_flags(etcd, "/t-both"), "--etcd-api", "v2")
    assert (forced.returncode, forced.stdout) == (0, '{"Network": "10.2.0.0/16"}\n')
    env = subprocess.run([sys.executable, "-m", "flannel_udp", "network", "get",
                          *config_flags(etcd, "/t-both")], capture_output=True, text=True,
                         env={**os.environ, "FLANNELD_ETCD_API": "v2"}, timeout=30)
    assert (env.returncode, env.stdout) == (0, '{"Network": "10.2.0.0/16"}\n'), env.stderr


def test_network_set_with_etcd_api_v2_writes_the_v2_keyspace(etcd):
    config = '{"Network":"10.8.0.0/16","Backend":{"Type":"host-gw"}}'
    done = flannel_udp("network", "set", config, *config_flags(etcd, "/t-set-v2"),
                       "--etcd-api", "v2")
    assert done.returncode == 0, done.stderr
    assert "etcd v2 keyspace" in done.stdout
    assert etcd.etcdctl("get", "/t-set-v2/config", api=2).stdout == config + "\n"
    assert etcd_kvs(etcd, "/t-set-v2/") == {}  # v3: untouched


def test_network_set_with_auto_writes_where_the_config_is_else_v3(etcd):
    etcd.etcdctl("set", "/t-set-auto/config", '{"Network": "10.2.0.0/16"}', api=2)
    done = flannel_udp("network", "set", '{"Network":"10.4.0.0/16"}',
                       *config_flags(etcd, "/t-set-auto"))
    assert done.returncode == 0 and "etcd v2 keyspace" in done.stdout, done.stderr
    assert etcd.etcdctl("get", "/t-set-auto/config", api=2).stdout == '{"Network":"10.4.0.0/16"}\n'
    assert etcd_kvs(etcd, "/t-set-auto/") == {}
    fresh = flannel_udp("network", "set", '{"Network":"10.4.0.0/16"}',
                        *config_flags(etcd, "/t-set-new"))
    assert fresh.returncode == 0 and "etcd v3 keyspace" in fresh.stdout, fresh.stderr
    assert V2.values(etcd, "/t-set-new/") == {}


def test_a_refused_network_set_changes_neither_keyspace(etcd):
    etcd.etcdctl("set", "/t-set-bad/config", '{"Network": "10.2.0.0/16"}', api=2)
    done = flannel_udp("network", "set", '{"Network":"not a network"}',
                       *config_flags(etcd, "/t-set-bad"), "--etcd-api", "v2")
    one_error_line(done, exit_code=None)
    assert V2.values(etcd, "/t-set-bad/") == {b"/t-set-bad/config": b'{"Network": "10.2.0.0/16"}'}
    assert etcd_kvs(etcd, "/t-set-bad/") == {}


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_bad_etcd_api_exits_2_in_one_line(how):
    argv = ["network", "get", "--etcd-endpoints", "http://127.0.0.1:2379"]
    env = dict(os.environ)
    if how == "flag":
        argv += ["--etcd-api", "v4"]
    else:
        env["FLANNELD_ETCD_API"] = "v4"
    done = subprocess.run([sys.executable, "-m", "flannel_udp", *argv], capture_output=True,
                          text=True, env=env, timeout=30)
    assert "--etcd-api" in one_error_line(done, exit_code=2)


def run_until_the_interface(etcd: EtcdCluster, prefix: str, *flags: str
                            ) -> subprocess.CompletedProcess:
    """`run` on `prefix`, stopped by an --iface that names no interface: what it logged up to
    there (the store and keyspace it chose)."""
    with tempfile.TemporaryDirectory() as tmp:
        return flannel_udp("run", *config_flags(etcd, prefix), *flags, "--iface",
                           "fu-no-such-if", *own_files(Path(tmp)), "--etcd-wait", "5")


def test_the_daemon_logs_the_keyspace_it_chose(etcd):
    etcd.etcdctl("set", "/t-run-v2/config", '{"Network": "172.68.0.0/16"}', api=2)
    only_v2 = run_until_the_interface(etcd, "/t-run-v2")
    assert "fu-no-such-if" in one_error_line(only_v2, exit_code=None)
    assert "(prefix /t-run-v2), etcd v2 keyspace" in only_v2.stderr

    etcd.etcdctl("put", "/t-run-v2/config", '{"Network": "10.3.0.0/16"}')
    both = run_until_the_interface(etcd, "/t-run-v2")
    assert "(prefix /t-run-v2), etcd v3 keyspace" in both.stderr
    assert re.search(r" W .*both etcd keyspaces hold a network config; using etcd v3's",
                     both.stderr), both.stderr
    forced = run_until_the_interface(etcd, "/t-run-v2", "--etcd-api", "v2")
    assert "etcd v2 keyspace" in forced.stderr and "both" not in forced.stderr

    neither = run_until_the_interface(etcd, "/t-run-none")
    line = one_error_line(neither, exit_code=None)
    assert "no network config" in line and "neither the etcd v3 nor the v2 keyspace" in line


def test_v2_every_write_and_removal_action_is_a_put_or_a_delete(etcd):
    prefix = "/t-actions/subnets"

    async def scenario():
        store = V2.store(etcd, "/t-actions")
        seen: list = []
        task = asyncio.create_task(collect(store, await store.list_leases(), seen))
        await asyncio.sleep(0.2)
        key = f"{prefix}/10.5.1.0-24"
        etcd.etcdctl("mk", key, "created", api=2)  # create
        etcd.etcdctl("update", key, "updated", api=2)  # update
        etcd.etcdctl("set", "--swap-with-value", "updated", key, "swapped", api=2)
        etcd.etcdctl("rm", "--with-value", "swapped", key, api=2)  # compareAndDelete
        await until(lambda: len(seen) >= 4, 5, "four events")
        task.cancel()
        await store.close()
        return seen

    assert run(scenario()) == [("put", "10.5.1.0-24", b"created"),
                               ("put", "10.5.1.0-24", b"updated"),
                               ("put", "10.5.1.0-24", b"swapped"),
                               ("delete", "10.5.1.0-24", b"swapped")]


def etcd_calls(cluster: EtcdCluster) -> dict[str, int]:
    """How many calls of each gRPC method etcd has served so far, from its own /metrics."""
    with urllib.request.urlopen(f"{cluster.endpoints[0]}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    calls: dict[str, int] = {}
    for m in re.finditer(r'^grpc_server_handled_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)$',
                         text, re.MULTILINE):
        calls[m.group(1)] = calls.get(m.group(1), 0) + int(float(m.group(2)))
    return calls


def test_a_starting_daemon_reads_the_leases_once_and_asks_no_peers_expiry(etcd):
    """Start-up on etcd v3: one Range of the lease table (acquire's listing serves the peers
    too), no LeaseTimeToLive call per peer; the watch starts from that Range's revision, so a
    lease put meanwhile arrives as an event. Our own lease's expiry is known (the renewal needs
    it), the store still gives every key's when asked (`leases list`)."""
    prefix = "/t-once"
    lease = grant(etcd, 86400)
    for i in range(1, 21):
        etcd.etcdctl("put", f"--lease={lease}", f"{prefix}/subnets/10.5.{i}.0-24",
                     input=f'{{"PublicIP":"192.168.1.{i}"}}')

    async def scenario():
        store = store_for(etcd, prefix)
        manager = LeaseManager(store, CFG, ME, "", None, renew_margin=3600)
        before = etcd_calls(etcd)
        mine = await manager.acquire(None)
        peers = await manager.load_peers(reuse_acquired=True)
        during = etcd_calls(etcd)
        added: list = []
        watch = asyncio.create_task(manager.watch(lambda lease, at: added.append(lease),
                                                  lambda ident, at: None, _never_lost))
        etcd.etcdctl("put", f"--lease={lease}", f"{prefix}/subnets/10.5.99.0-24",
                     input='{"PublicIP":"192.168.1.99"}')
        deadline = time.monotonic() + 10
        while not any(str(a.subnet) == "10.5.99.0/24" for a in added):
            assert time.monotonic() < deadline, "the lease put after start never arrived"
            await asyncio.sleep(0.05)
        watch.cancel()
        listed = await store.list_leases()
        await store.close()
        return mine, peers, {k: during.get(k, 0) - before.get(k, 0) for k in during}, listed

    mine, peers, calls, listed = run(scenario())
    assert len(peers) == 20
    assert calls.get("Range", 0) == 1, calls
    assert calls.get("LeaseTimeToLive", 0) == 0, calls
    assert all(p.expiration == UNKNOWN_EXPIRY for p in peers)
    assert mine.expiration == pytest.approx(time.time() + LEASE_TTL, abs=5)
    assert all(r.expiration == pytest.approx(time.time() + 86400, abs=10)
               for r in listed.records if r.key.startswith("10.5.") and r.key != "10.5.99.0-24"
               and r.key != f"{mine.subnet.network_address}-24")


async def _never_lost() -> None:
    raise AssertionError("our lease was lost")
