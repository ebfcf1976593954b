"""Throwaway etcd clusters for the tests: one or more members of
Debian's etcd on free loopback ports, or inside the switch namespace of a `Topology`
(where the host namespaces reach it over the bridge); optionally TLS with client certificates
from a test PKI made with openssl. `cleanup()` stops every member and removes the data dirs,
also on failure; `remove_stale_etcd()` deals with what a killed run left.

API:
    etcd_problem() -> str | None            why etcd can't be run here, or None
    make_test_pki(directory, ips) -> TestPKI
    EtcdCluster(members=1, netns=None, address="127.0.0.1", pki=None, directory=None,
                enable_v2=False)
        a context manager; .start() .endpoints .endpoint_arg .client_flags()
        .stop_member(i, sig) .start_member(i) .etcdctl(*args, api=3) .member_log(i)
        .cleanup()
    EtcdCluster.in_topology(topo, members=1)  members on ETCD_ADDRESS in topo's switch
    remove_stale_etcd()                     kill etcd members of dead runs
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flannel_udp.lab.netns import STALE_PATTERN, Netns, NetnsError, wait_until
from flannel_udp.lab.topology import UNDERLAY_NET, Topology

ETCD_ADDRESS = str(UNDERLAY_NET.network_address + 2)  # in a topology: on the switch's bridge
HEALTHY_TIMEOUT = 20.0
_cluster_ids = itertools.count()


def etcd_problem() -> str | None:
    """Why an etcd cluster can't be started here, or None when it can."""
    missing = [b for b in ("etcd", "etcdctl") if shutil.which(b) is None]
    if missing:
        return (f"needs {' and '.join(missing)} (Debian: apt-get install etcd-server "
                "etcd-client)")
    return None


@dataclass(frozen=True)
class TestPKI:
    """A CA, a server and a client certificate signed by it, and a second, unrelated CA."""

    __test__ = False  # not a pytest test class, despite the name

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr.strip()}")


def make_test_pki(directory: Path, ips: list[str]) -> TestPKI:
    """Certificates for a test: the server's name every address in `ips` (and localhost)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = {name: str(directory / name) for name in (
        "ca.crt", "ca.key", "other-ca.crt", "other-ca.key", "server.crt", "server.key",
        "server.csr", "client.crt", "client.key", "client.csr", "server.ext", "client.ext")}
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    for ca, cn in (("ca", "flannel-udp test CA"), ("other-ca", "another CA")):
        _openssl("req", "-x509", *ec, "-keyout", d[f"{ca}.key"], "-out", d[f"{ca}.crt"],
                 "-days", "2", "-subj", f"/CN={cn}")
    sans = ",".join([f"IP:{ip}" for ip in dict.fromkeys([*ips, "127.0.0.1"])] +
                    ["DNS:localhost"])
    Path(d["server.ext"]).write_text(f"subjectAltName={sans}\n"
                                     "extendedKeyUsage=serverAuth,clientAuth\n")
    Path(d["client.ext"]).write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", d[f"{who}.key"], "-out", d[f"{who}.csr"],
                 "-subj", f"/CN=flannel-udp test {who}")
        _openssl("x509", "-req", "-in", d[f"{who}.csr"], "-CA", d["ca.crt"], "-CAkey",
                 d["ca.key"], "-CAcreateserial", "-out", d[f"{who}.crt"], "-days", "2",
                 "-extfile", d[f"{who}.ext"])
    return TestPKI(*(Path(d[n]) for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                           "client.key", "other-ca.crt")))


def _free_ports(count: int, address: str) -> list[int]:
    # All held open at once so that no port is handed out twice.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((address, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    """`members` etcd members on `address`: on free ports of the root namespace, or on fixed
    ones inside `netns` (whose owner stops the processes too). Data dirs and logs live in
    `directory` (default: a temp dir of its own, removed by cleanup). With `enable_v2` the
    members also serve etcd's v2 API (`--enable-v2=true`), as the seed's etcd does."""

    def __init__(self, members: int = 1, *, netns: Netns | None = None,
                 address: str = "127.0.0.1", pki: TestPKI | None = None,
                 directory: Path | None = None, enable_v2: bool = False) -> None:
        self.netns = netns
        self.address = address
        self.pki = pki
        self._own_dir = directory is None
        self.dir = directory or Path(tempfile.mkdtemp(prefix=f"fu{os.getpid()}-etcd-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        if netns is None:
            ports = _free_ports(2 * members, address)
        else:  # a namespace of our own: nothing else listens there
            ports = [p for i in range(members) for p in (2379 + 100 * i, 2380 + 100 * i)]
        scheme = "https" if pki else "http"
        self.names = [f"m{i}" for i in range(members)]
        self.endpoints = [f"{scheme}://{address}:{ports[2 * i]}" for i in range(members)]
        peers = [f"http://{address}:{ports[2 * i + 1]}" for i in range(members)]
        initial = ",".join(f"{n}={p}" for n, p in zip(self.names, peers, strict=True))
        token = f"fu{os.getpid()}-{next(_cluster_ids)}"
        self._argv = []
        for name, client, peer in zip(self.names, self.endpoints, peers, strict=True):
            argv = ["etcd", "--name", name, "--data-dir", str(self.dir / f"{name}.data"),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", token, "--logger", "zap",
                    "--log-outputs", "stderr",
                    # quick elections, so that a killed member is replaced within a second
                    "--heartbeat-interval", "50", "--election-timeout", "500"]
            if enable_v2:
                argv.append("--enable-v2=true")
            if pki:
                argv += ["--cert-file", str(pki.server_cert), "--key-file",
                         str(pki.server_key), "--trusted-ca-file", str(pki.ca),
                         "--client-cert-auth"]
            self._argv.append(argv)
        self.processes: list[subprocess.Popen | None] = [None] * members
        self._closed = False

    @classmethod
    def in_topology(cls, topo: Topology, members: int = 1, pki: TestPKI | None = None,
                    enable_v2: bool = False) -> EtcdCluster:
        """Members in `topo`'s switch namespace on ETCD_ADDRESS (added to its bridge), which
        every host reaches over its eth0; stopped and removed with the topology too."""
        addrs = topo.switch.ip_json("addr", "show", "dev", "br0")
        if not any(a.get("local") == ETCD_ADDRESS for link in addrs
                   for a in link.get("addr_info", [])):
            topo.switch.run("ip", "addr", "add", f"{ETCD_ADDRESS}/{UNDERLAY_NET.prefixlen}",
                            "dev", "br0")
        return cls(members, netns=topo.switch, address=ETCD_ADDRESS, pki=pki,
                   directory=topo.dir / f"etcd{next(_cluster_ids)}", enable_v2=enable_v2)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def endpoint_arg(self) -> str:
        """The --etcd-endpoints value naming every member."""
        return ",".join(self.endpoints)

    def client_flags(self, cafile: Path | None = None) -> list[str]:
        """The flannel-udp flags for this cluster (TLS files from the PKI; `cafile` instead of
        its CA, e.g. a wrong one)."""
        flags = ["--etcd-endpoints", self.endpoint_arg]
        if self.pki:
            flags += ["--etcd-cafile", str(cafile or self.pki.ca),
                      "--etcd-certfile", str(self.pki.client_cert),
                      "--etcd-keyfile", str(self.pki.client_key)]
        return flags

    def member_log(self, index: int) -> Path:
        return self.dir / f"{self.names[index]}.log"

    def start(self) -> EtcdCluster:
        """Start every member; returns once all are healthy."""
        try:
            for i in range(len(self.names)):
                self._spawn(i)
            for i in range(len(self.names)):
                self.wait_healthy(i)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _spawn(self, index: int) -> None:
        proc = self.processes[index]
        if proc is not None and proc.poll() is None:
            raise RuntimeError(f"etcd member {self.names[index]} runs already")
        log = open(self.member_log(index), "ab")  # noqa: SIM115 - the child holds it
        try:
            if self.netns is not None:
                proc = self.netns.popen(*self._argv[index], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT)
            else:
                proc = subprocess.Popen(self._argv[index], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        finally:
            log.close()
        self.processes[index] = proc

    def wait_healthy(self, index: int, timeout: float = HEALTHY_TIMEOUT) -> None:
        def healthy() -> bool:
            proc = self.processes[index]
            if proc is not None and proc.poll() is not None:
                tail = self.member_log(index).read_text(errors="replace").splitlines()[-3:]
                raise RuntimeError(f"etcd member {self.names[index]} exited with "
                                   f"{proc.returncode}: {' / '.join(tail)}")
            return self.etcdctl("endpoint", "health", member=index, check=False,
                                timeout=5).returncode == 0
        wait_until(healthy, timeout, f"etcd member {self.names[index]} to be healthy",
                   interval=0.1)

    def stop_member(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Stop one member (SIGKILL: as if its machine died) and wait until it is gone."""
        proc = self.processes[index]
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_member(self, index: int, wait: bool = True) -> None:
        """Start a stopped member again on its data dir."""
        self._spawn(index)
        if wait:
            self.wait_healthy(index)

    def etcdctl(self, *args: str, member: int | None = None, check: bool = True,
                timeout: float = 15, input: str | None = None, api: int = 3
                ) -> subprocess.CompletedProcess:
        """etcdctl against one member (default: all), with the cluster's TLS files; `api=2`
        runs `ETCDCTL_API=2 etcdctl` (the v2 keyspace: `set`, `get`, `rm`, `mk`, ...)."""
        endpoints = self.endpoint_arg if member is None else self.endpoints[member]
        if api == 2:
            argv = ["etcdctl", "--endpoints", endpoints, "--timeout", "2s",
                    "--total-timeout", f"{max(1, int(timeout) - 1)}s"]
            if self.pki:
                argv += ["--ca-file", str(self.pki.ca), "--cert-file",
                         str(self.pki.client_cert), "--key-file", str(self.pki.client_key)]
        else:
            argv = ["etcdctl", "--endpoints", endpoints, "--dial-timeout", "2s",
                    "--command-timeout", f"{max(1, int(timeout) - 1)}s"]
            if self.pki:
                argv += ["--cacert", str(self.pki.ca), "--cert", str(self.pki.client_cert),
                         "--key", str(self.pki.client_key)]
        argv += args
        env = {**os.environ, "ETCDCTL_API": str(api)}
        if self.netns is not None:
            cmd = self.netns.argv(*argv)
        else:
            cmd = argv
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                    input=input, env=env)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"etcdctl {' '.join(args)}: timed out after {timeout:g} s"
                             ) from None
        if check and result.returncode != 0:
            raise NetnsError(f"etcdctl {' '.join(args)}: exit {result.returncode}: "
                             f"{result.stderr.strip()}")
        return result

    def cleanup(self) -> None:
        """Stop every member and remove the data dirs (a topology's dir goes with it).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for name in self.names:
                shutil.rmtree(self.dir / f"{name}.data", ignore_errors=True)


def remove_stale_etcd(pattern: str = STALE_PATTERN) -> list[int]:
    """Kill the etcd members a dead earlier run left on loopback (their data dir is under a
    temp dir named after that run's pid); `netns.remove_stale` removes the dirs and the
    members inside namespaces. Returns the pids killed."""
    regex = re.compile(pattern)
    tmp = re.escape(tempfile.gettempdir())
    killed = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"etcd") or b"--data-dir" not in argv[:-1]:
            continue
        data_dir = argv[argv.index(b"--data-dir") + 1].decode(errors="replace")
        m = re.match(tmp + r"/(fu\d+-[^/]*)/", data_dir)
        owner = m and regex.match(m.group(1))
        if owner and not Path(f"/proc/{owner.group(1)}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc_dir.name), signal.SIGKILL)
                killed.append(int(proc_dir.name))
    return killed
