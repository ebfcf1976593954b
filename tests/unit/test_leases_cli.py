"""`flannel-udp leases list|delete|reserve` on the embedded store and on a real etcd (its v3 and
v2 keyspaces): flannel's keys and lease JSON (v0.11's on v2), a reservation as a key without TTL,
every refusal one line that changes nothing. On etcd, leases "by hand" are written with etcdctl
as flannel writes them; each test uses a prefix of its own on the module's etcd."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flannel_udp.lab.etcd import EtcdCluster, etcd_problem
from flannel_udp.stores.local import LocalStore

CONFIG = '{"Network": "10.5.0.0/16"}'
OTHER = "192.168.0.20"  # a host holding 10.5.2.0/24 with a 24 h TTL
ME = "192.168.0.30"
_prefixes = itertools.count()


def flannel_udp(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flannel_udp", *argv], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@dataclass
class StoreUnderTest:
    flags: list[str]
    put_by_hand: Callable[[str, bytes, int | None], None]  # key, value, TTL (None: none)
    dump: Callable[[], object]  # the whole store as it is held, to compare before and after
    raw: Callable[[], dict[str, tuple[bytes, bool]]]  # key -> (value, has a TTL)
    v011: bool = False  # etcd's v2 keyspace: flannel v0.11's lease JSON

    def udp_value(self, public_ip: str) -> bytes:
        """A udp lease's value as flannel writes it in this keyspace."""
        if self.v011:
            return f'{{"PublicIP":"{public_ip}"}}'.encode()
        return f'{{"PublicIP":"{public_ip}","PublicIPv6":null}}'.encode()

    def leases(self, *argv: str) -> subprocess.CompletedProcess:
        return flannel_udp("leases", *argv, *self.flags)


def embedded(tmp_path: Path) -> StoreUnderTest:
    path = tmp_path / "leases"
    store = LocalStore(path)

    def put(key: str, value: bytes, ttl: int | None) -> None:
        asyncio.run(store.put_lease(key, value, ttl))

    def raw() -> dict[str, tuple[bytes, bool]]:
        snapshot = asyncio.run(store.list_leases())
        return {r.key: (r.value, r.expiration is not None) for r in snapshot.records}

    return StoreUnderTest(["--local-store", str(path)], put,
                          lambda: path.read_bytes() if path.exists() else None, raw)


def on_etcd(etcd) -> StoreUnderTest:
    prefix = f"/leases-cli-{next(_prefixes)}/network"

    def put(key: str, value: bytes, ttl: int | None) -> None:
        lease = []
        if ttl is not None:
            out = etcd.etcdctl("lease", "grant", str(ttl)).stdout
            lease = [f"--lease={re.search(r'lease ([0-9a-f]+) granted', out).group(1)}"]
        etcd.etcdctl("put", *lease, f"{prefix}/subnets/{key}", input=value.decode())

    def kvs() -> dict[str, dict]:
        out = json.loads(etcd.etcdctl("get", "--prefix", f"{prefix}/", "-w", "json").stdout)
        return {base64.b64decode(kv["key"]).decode(): kv for kv in out.get("kvs", [])}

    def raw() -> dict[str, tuple[bytes, bool]]:
        return {k.removeprefix(f"{prefix}/subnets/"): (base64.b64decode(kv["value"]),
                                                       bool(kv.get("lease")))
                for k, kv in kvs().items() if k.startswith(f"{prefix}/subnets/")}

    return StoreUnderTest(["--etcd-endpoints", etcd.endpoint_arg, "--etcd-prefix", prefix],
                          put, kvs, raw)


def on_etcd_v2(etcd: EtcdCluster) -> StoreUnderTest:
    prefix = f"/leases-cli-{next(_prefixes)}/network"

    def put(key: str, value: bytes, ttl: int | None) -> None:
        etcd.etcdctl("set", *(["--ttl", str(ttl)] if ttl else []), f"{prefix}/subnets/{key}",
                     value.decode(), api=2)

    def nodes() -> dict[str, dict]:
        try:
            with urllib.request.urlopen(f"{etcd.endpoints[0]}/v2/keys{prefix}?recursive=true",
                                        timeout=10) as response:
                todo = [json.load(response)["node"]]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return {}
            raise
        found = {}
        while todo:
            node = todo.pop()
            todo += node.get("nodes", [])
            if not node.get("dir"):
                found[node["key"]] = {k: v for k, v in node.items() if k != "ttl"}
        return found

    def raw() -> dict[str, tuple[bytes, bool]]:
        return {k.removeprefix(f"{prefix}/subnets/"): (node["value"].encode(),
                                                       "expiration" in node)
                for k, node in nodes().items() if k.startswith(f"{prefix}/subnets/")}

    return StoreUnderTest(["--etcd-endpoints", etcd.endpoint_arg, "--etcd-prefix", prefix,
                           "--etcd-api", "v2"], put, nodes, raw, v011=True)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    """One etcd for the module, serving both keyspaces (as the seed's, run with v2 on)."""
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    with EtcdCluster(1, enable_v2=True) as cluster:
        yield cluster.start()


@pytest.fixture(params=["embedded", "etcd v3", "etcd v2"])
def store(request, tmp_path: Path) -> Iterator[StoreUnderTest]:
    """A store holding CONFIG and OTHER's lease on 10.5.2.0/24 (24 h TTL)."""
    if request.param == "embedded":
        s = embedded(tmp_path)
    else:
        open_etcd = on_etcd if request.param == "etcd v3" else on_etcd_v2
        s = open_etcd(request.getfixturevalue("etcd"))
    result = flannel_udp("network", "set", CONFIG, *s.flags)
    assert result.returncode == 0, result.stderr
    s.put_by_hand("10.5.2.0-24", s.udp_value(OTHER), 86400)
    yield s


def test_list_shows_subnet_public_ip_backend_and_expiry_or_reserved(store):
    vxlan = (b'{"PublicIP":"192.168.0.40","PublicIPv6":null,"BackendType":"vxlan",'
             b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    store.put_by_hand("10.5.10.0-24", vxlan, None)
    store.put_by_hand("10.5.9.0-24", b"not json", 600)
    result = store.leases("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "EXPIRY"]
    assert re.fullmatch(r"10\.5\.2\.0/24 +192\.168\.0\.20 +udp +expires in 2[34]h\d\dm",
                        lines[1]), lines[1]
    assert lines[2].split() == ["10.5.10.0/24", "192.168.0.40", "vxlan", "reserved"]
    assert lines[3].startswith("10.5.9.0-24 ") and "not a lease: not JSON" in lines[3]
    assert len(lines) == 4

    listed = json.loads(store.leases("list", "--json").stdout)
    assert [e["key"] for e in listed] == ["10.5.2.0-24", "10.5.10.0-24", "10.5.9.0-24"]
    first, second, bad = listed
    assert first["reserved"] is False and 86300 < first["expires"] - time.time()
    assert second == {"key": "10.5.10.0-24", "subnet": "10.5.10.0/24",
                      "public_ip": "192.168.0.40", "backend": "vxlan",
                      "backend_data": {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
                      "ipv6_subnet": None, "public_ipv6": None, "backend_v6_data": None,
                      "expires": None, "reserved": True}
    assert bad["key"] == "10.5.9.0-24" and bad["error"].startswith("not JSON")


# flanneld v0.22.3's dual-stack lease (REFERENCE.md section 5)
DUAL_KEY = "10.5.15.0-24&fd99:0:0:25::-64"
DUAL_VALUE = (b'{"PublicIP":"192.168.77.2","PublicIPv6":"fd77::2","BackendType":"vxlan",'
              b'"BackendData":{"VNI":1,"VtepMAC":"4a:ed:9d:55:a8:86"},'
              b'"BackendV6Data":{"VNI":1,"VtepMAC":"66:3c:4e:3e:2d:52"}}')


def test_list_shows_a_dual_stack_leases_ipv6_subnet_and_delete_takes_its_v4_subnet(store):
    store.put_by_hand(DUAL_KEY, DUAL_VALUE, 600)
    result = store.leases("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "IPV6", "SUBNET", "PUBLIC", "IPV6",
                                "BACKEND", "EXPIRY"]
    assert lines[1].split()[:5] == ["10.5.2.0/24", OTHER, "-", "-", "udp"]
    assert lines[2].split()[:5] == ["10.5.15.0/24", "192.168.77.2", "fd99:0:0:25::/64",
                                    "fd77::2", "vxlan"]
    listed = json.loads(store.leases("list", "--json").stdout)
    dual = next(e for e in listed if e["key"] == DUAL_KEY)
    assert (dual["ipv6_subnet"], dual["public_ipv6"]) == ("fd99:0:0:25::/64", "fd77::2")
    assert dual["backend_v6_data"] == {"VNI": 1, "VtepMAC": "66:3c:4e:3e:2d:52"}
    deleted = store.leases("delete", "10.5.15.0/24")
    assert deleted.returncode == 0, deleted.stderr
    assert DUAL_KEY not in store.raw() and "10.5.2.0-24" in store.raw()


def test_reserve_writes_flannels_key_and_lease_json_without_ttl(store):
    result = store.leases("reserve", "10.5.7.0/24", "--public-ip", ME)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"reserved 10.5.7.0/24 for {ME} in ")
    # flannel's UDP lease value, byte for byte, on a key with no TTL
    assert store.raw()["10.5.7.0-24"] == (store.udp_value(ME), False)
    again = store.leases("reserve", "10.5.7.0-24", "--public-ip", ME)
    assert again.returncode == 0 and again.stdout.startswith("already reserved: 10.5.7.0/24")


def test_reserving_a_hosts_own_lease_drops_its_ttl_and_keeps_its_value(store):
    value = store.raw()["10.5.2.0-24"][0]
    before = store.raw()
    result = store.leases("reserve", "10.5.2.0/24", "--public-ip", OTHER)
    assert result.returncode == 0, result.stderr
    assert "its lease made a reservation: 10.5.2.0/24" in result.stdout
    assert store.raw() == {**before, "10.5.2.0-24": (value, False)}


@pytest.mark.parametrize(("argv", "message"), [
    (["10.6.1.0/24"], "10.6.1.0/24 is outside the Network 10.5.0.0/16"),
    (["10.5.3.0/25"], "10.5.3.0/25 is not a /24 subnet (the config's SubnetLen)"),
    (["10.5.3.7/24"], "10.5.3.7/24: not a subnet address (host bits set): did you mean "
                      "10.5.3.0/24?"),
    (["10.5.0.0/24"], "10.5.0.0/24 is outside SubnetMin 10.5.1.0 .. SubnetMax 10.5.255.0"),
    (["10.5.2.0/24"], f"10.5.2.0/24 is held by another host, {OTHER} (expires in 2"),
    (["10.5.3.0/24", "--public-ip", OTHER],
     f"{OTHER} holds the lease 10.5.2.0/24 already (expires in 2"),
    (["10.5.3.0/24", "--backend", "vxlan"], "--backend vxlan: the Network runs the udp backend"),
    (["10.5.3.0/24", "--public-ip", "10.5.300.1"], "--public-ip 10.5.300.1: not an IPv4"),
    (["nonsense"], "nonsense: not a subnet (e.g. 10.244.3.0/24"),
])
def test_a_refused_reservation_is_one_line_and_changes_nothing(store, argv, message):
    if "--public-ip" not in argv:
        argv = [*argv, "--public-ip", ME]
    before = store.dump()
    result = store.leases("reserve", *argv)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith(f"flannel-udp: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert store.dump() == before


def test_delete_removes_the_lease_and_an_absent_one_is_a_one_line_error(store):
    result = store.leases("delete", "10.5.2.0/24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"deleted the lease 10.5.2.0/24 of {OTHER} from ")
    assert store.raw() == {}
    before = store.dump()
    for argv in (["10.5.2.0/24"], ["10.5.2.0-24"], ["10.5.2.1/24"]):
        again = store.leases("delete", *argv)
        assert again.returncode != 0 and again.stdout == ""
        assert again.stderr.count("\n") == 1, again.stderr
        assert again.stderr.startswith(("flannel-udp: no lease for 10.5.2.0/24 in ",
                                        "flannel-udp: 10.5.2.1/24: not a subnet address")), (
            again.stderr)
    assert store.dump() == before


def test_reserve_without_a_network_config_is_refused_in_one_line(tmp_path):
    s = embedded(tmp_path)
    result = s.leases("reserve", "10.5.7.0/24", "--public-ip", ME)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("flannel-udp: no network config in lease store ")
    assert result.stderr.count("\n") == 1
    assert s.dump() is None  # not even the store file was made


def test_reserve_in_a_dual_stack_network_is_refused_in_one_line(tmp_path):
    s = embedded(tmp_path)
    dual = ('{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd99::/56", '
            '"Backend": {"Type": "host-gw"}}')
    assert flannel_udp("network", "set", dual, *s.flags).returncode == 0
    before = s.dump()
    result = s.leases("reserve", "10.5.7.0/24", "--public-ip", ME)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("flannel-udp: leases reserve: not for a dual-stack network yet (its "
                             "leases need an IPv6 subnet and PublicIPv6 too); put the key with "
                             "etcdctl\n")
    assert s.dump() == before


def test_ipv6_only_leases_are_listed_deleted_by_their_ipv6_subnet_and_not_reserved(tmp_path):
    s = embedded(tmp_path)
    v6only = ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd99::/56", '
              '"Backend": {"Type": "host-gw"}}')
    assert flannel_udp("network", "set", v6only, *s.flags).returncode == 0
    value = b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd77::3","BackendType":"host-gw"}'
    s.put_by_hand("0.0.0.0-0&fd99:0:0:25::-64", value, 3600)
    listed = s.leases("list")
    assert listed.returncode == 0, listed.stderr
    row = listed.stdout.splitlines()[1].split()
    assert row[:5] == ["-", "-", "fd99:0:0:25::/64", "fd77::3", "host-gw"]
    as_json = json.loads(s.leases("list", "--json").stdout)
    assert [(e["subnet"], e["public_ip"], e["ipv6_subnet"]) for e in as_json] == [
        (None, None, "fd99:0:0:25::/64")]
    before = s.dump()
    refused = s.leases("reserve", "10.5.7.0/24", "--public-ip", ME)
    assert refused.returncode == 1 and refused.stderr.startswith(
        "flannel-udp: leases reserve: not for an IPv6-only network yet")
    assert s.dump() == before
    deleted = s.leases("delete", "fd99:0:0:25::-64")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith("deleted the lease fd99:0:0:25::/64 of fd77::3 from ")
    assert json.loads(s.leases("list", "--json").stdout) == []
