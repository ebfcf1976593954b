"""The one network-namespace harness of flannel-udp, shared by the integration tests, the demo and
the benchmark: it builds hosts on a private bridge, runs daemons and pods in them, and removes
every namespace, process and file it made, also when something fails.

Layout of a `Topology` (nothing is created in the root namespace; `ip netns add` only leaves a
mount file under /run/netns):

    <prefix>-sw   switch: bridge br0 with one port h<i> per host (br<k> per extra segment k)
    <prefix>-rt   router, only with several segments: eth<k> = 192.168.(77+k).1 on br<k>
    <prefix>-h<i> host i: eth0 = 192.168.77.(10+i)/24, MTU 1500, ip_forward on; runs a daemon
    <prefix>-p<i> pod on a host: eth0 = second address of the host's flannel subnet, default
                  route via the host's side of the veth (pod<i>, which holds FLANNEL_SUBNET)

`prefix` is `fu<pid>-<n>`, so concurrent runs never collide and `remove_stale()` can tell the
leftovers of a dead run by its pid. Each topology has a temp dir for the store, the network
config, and per host its subnet.env, control socket and daemon log.

API (every failure is a NetnsError whose message names the command, namespace and stderr):
    check_environment() -> str | None      why namespaces can't be used here, or None
    remove_stale(pattern)                   delete namespaces/temp dirs of dead earlier runs
    wait_until(predicate, timeout, what)    poll until truthy, else NetnsError naming `what`
    read_subnet_env(path) -> dict
    sigterm_as_interrupt()                  context: SIGTERM unwinds like Ctrl-C (cleanup runs)
    Netns   .run(*argv) .popen(*argv) .ip_json(*args) .link(dev) .sysctl(key)
            .ping(*dsts) -> {dst: PingResult} .tcp_sink/.tcp_sink_result/.tcp_send/.tcp_connect
            .set_features(dev, {name: on})  ethtool features, e.g. {"rx-gro": False}
            .iperf3(server, address, *args) -> iperf3's JSON report; .iperf3_start -> Iperf3Run
    Host    (a Netns) .underlay_ip .subnet_file .control_socket .log_path .daemon
            .start_flannel(store, net_config, *extra) .stop_flannel(sig) .wait_ready()
            .flannel(*args) .status() .try_status() .lease() .peer_subnets() .subnet_env()
            .log_tail()
    Pod     (a Netns) .host .address .gateway
    KernelVxlanNode(host, subnet)           flanneld's kernel VXLAN: .add_peer .remove_peer .remove
    Topology(hosts=3, segments=None), a context manager: .switch .router .segments .hosts
            .host(i) .pods .dir .store_path
            .write_net_config(config) .start_daemons(config, store=None) .wait_peers()
            .add_pod(host, flannel_subnet=None, mtu=None) .remove_pod(pod) .log_tails()
            .leftovers() .cleanup()

Programs run inside a namespace through `ip netns exec`, which execs the program (no extra
process), so a tracked Popen's pid is the program itself and signals reach it directly. Children
get their own session so that a Ctrl-C at the terminal reaches only the harness, which then stops
them in order.

`python -m flannel_udp.lab.netns ping|tcp-sink|tcp-send|tcp-connect ...` are the small probes run
inside the namespaces: an ICMP pinger (so no ping binary is needed, and an ICMP error is reported
as such), a TCP sink/sender that check a transfer by its SHA-256, and a TCP connect that reports
how it ended (e.g. ENETUNREACH: flannel answers no ICMP with ICMP, so a ping to an unleased
address just times out, while a TCP SYN gets net unreachable).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from flannel_udp import control, subnetenv
from flannel_udp.errors import UserError
from flannel_udp.packet import checksum as inet_checksum

T = TypeVar("T")

UNDERLAY_NET = ipaddress.IPv4Network("192.168.77.0/24")  # segment 0; segment k is 192.168.77+k


def segment_net(segment: int) -> ipaddress.IPv4Network:
    """The underlay subnet of segment `segment` (bridge br<segment>; the router is .1)."""
    return ipaddress.IPv4Network((int(UNDERLAY_NET.network_address) + (segment << 8), 24))
UNDERLAY_MTU = 1500
DEFAULT_NETWORK_CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}
STALE_PATTERN = r"^fu(\d+)-"
# The docs' promise: a lease put, deleted or expired in the store is in (or out of) every
# daemon's route table within a second.
LEASE_EVENT_BOUND = 1.0
IPERF_PORT = 5201
# `python -m flannel_udp` rather than the `flannel-udp` script: same interpreter as the harness,
# no dependence on PATH inside `ip netns exec`.
FLANNEL_UDP = (sys.executable, "-m", "flannel_udp")
PROBE = (sys.executable, "-m", "flannel_udp.lab.netns")
# Children import the same flannel_udp as the harness, installed or not (e.g. a source tree
# under pytest): its parent directory goes first on their PYTHONPATH, and is their working
# directory, because `python -m` puts the working directory before PYTHONPATH: started from a
# clone's root, the unbuilt source tree would shadow the installed package.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

_topology_ids = itertools.count()


class NetnsError(RuntimeError):
    """A namespace operation or a command in a namespace failed; the message says which."""


# -- helpers --------------------------------------------------------------------------------


def check_environment() -> str | None:
    """Why network namespaces can't be used on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def seconds_until(predicate: Callable[[], object], timeout: float, what: str,
                  interval: float = 0.02) -> float:
    """How long `predicate` took to become truthy, from this call (NetnsError naming `what`
    after `timeout`): a test asserts a promised bound on it and says what it measured."""
    started = time.monotonic()
    wait_until(predicate, timeout, what, interval)
    return time.monotonic() - started


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy and return that. Raises NetnsError
    naming `what` after `timeout` seconds; an exception from `predicate` aborts the wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise NetnsError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def ping_failures(pods: Mapping[str, Pod], count: int = 3) -> list[str]:
    """Every namespace pings the `address` of every other; one line per target that did not
    answer every echo (empty when all did). `pods` maps a label to each."""
    failures = []
    for label, pod in pods.items():
        targets = [p.address for p in pods.values() if p is not pod]
        for dst, result in pod.ping(*targets, count=count).items():
            if not result.ok:
                failures.append(f"{label} -> {dst}: {result.received}/{result.sent} answered "
                                f"{result.errors}")
    return failures


def read_subnet_env(path: str | os.PathLike) -> dict[str, str]:
    """The variables of a subnet.env file; empty when it does not exist (yet)."""
    return subnetenv.read(path)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let a SIGTERM unwind like Ctrl-C (KeyboardInterrupt), so that a Topology's cleanup runs
    either way. Only the main thread can set signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                               if p and p != _PACKAGE_ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _format_cmd(argv: Sequence[str]) -> str:
    return " ".join(str(a) for a in argv)


def _list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace(name: str) -> None:
    """SIGKILL whatever still runs in namespace `name`, then delete it; quiet if it is gone."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(pattern: str = STALE_PATTERN) -> list[str]:
    """Delete the namespaces and temp dirs left by earlier runs that died without cleaning up:
    those whose name matches `pattern` and whose group 1 (the creator's pid) is no longer alive.
    Returns the names removed."""
    regex = re.compile(pattern)
    removed = []
    for name in _list_namespaces():
        m = regex.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace(name)
            removed.append(name)
    for entry in Path(tempfile.gettempdir()).iterdir():
        m = regex.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


# -- namespaces -----------------------------------------------------------------------------


@dataclass
class PingResult:
    """What `Netns.ping` saw for one destination; RTTs in milliseconds."""

    dst: str
    sent: int
    received: int
    rtts_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # e.g. "net unreachable from 10.244.3.0"
    # [n, t] per answered echo: the n-th echo to this destination (from 1) was answered at
    # time.monotonic() t (CLOCK_MONOTONIC: the same clock in every process of the machine).
    answered: list[list[float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def avg_rtt_ms(self) -> float | None:
        return sum(self.rtts_ms) / len(self.rtts_ms) if self.rtts_ms else None


@dataclass
class Iperf3Run:
    """An iperf3 test under way: the client and its one-shot server (`Netns.iperf3_start`)."""

    client: subprocess.Popen
    server: subprocess.Popen
    what: str  # names the test in errors, e.g. "[fu12-0-p1] iperf3 -c 10.244.3.2 -P 4"
    timeout: float

    def result(self) -> dict[str, Any]:
        """Wait for the test; iperf3's JSON report (`-J`). NetnsError, carrying iperf3's own
        message, when it failed or outlived `timeout`."""
        try:
            out, err = self.client.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.client.kill()
            self.client.communicate()
            raise NetnsError(f"{self.what}: timed out after {self.timeout:g} s") from None
        finally:
            # A `-1` server exits after its one test; one whose client never came is stopped.
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        try:
            report = json.loads(out)
        except json.JSONDecodeError:
            report = {}
        if "error" in report or self.client.returncode != 0 or "end" not in report:
            reason = report.get("error") or err.strip() or f"exit {self.client.returncode}"
            raise NetnsError(f"{self.what}: {reason}")
        return report


class Netns:
    """One network namespace; processes started with `popen` are stopped by the owner's cleanup."""

    def __init__(self, name: str, processes: list[subprocess.Popen] | None = None) -> None:
        self.name = name
        self._processes = processes if processes is not None else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def argv(self, *argv: str | os.PathLike) -> list[str]:
        """`argv` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *(str(a) for a in argv)]

    def run(self, *argv: str | os.PathLike, check: bool = True, timeout: float = 30,
            input: str | bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the namespace and capture its output. With `check`, a non-zero exit
        or a timeout raises NetnsError quoting the command and its stderr."""
        cmd = self.argv(*argv)
        try:
            result = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input,
                                    text=text, start_new_session=True, env=_child_env(),
                                    cwd=_PACKAGE_ROOT)
        except subprocess.TimeoutExpired:
            if check:
                raise NetnsError(f"[{self.name}] {_format_cmd(argv)}: timed out after "
                                 f"{timeout:g} s") from None
            raise
        if check and result.returncode != 0:
            err = result.stderr if text else result.stderr.decode(errors="replace")
            raise NetnsError(f"[{self.name}] {_format_cmd(argv)}: exit {result.returncode}: "
                             f"{err.strip()}")
        return result

    def popen(self, *argv: str | os.PathLike, **kw: Any) -> subprocess.Popen:
        """Start a command in the namespace; it is tracked so that cleanup stops it."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("env", _child_env())
        kw.setdefault("cwd", _PACKAGE_ROOT)
        proc = subprocess.Popen(self.argv(*argv), **kw)
        self._processes.append(proc)
        return proc

    def ip_json(self, *args: str) -> Any:
        """`ip -j ARGS` in the namespace, parsed."""
        out = self.run("ip", "-j", *args).stdout
        return json.loads(out) if out.strip() else []

    def link(self, dev: str) -> dict[str, Any] | None:
        """`ip -j -d addr show dev DEV` (link and addresses), or None when there is no DEV."""
        result = self.run("ip", "-j", "-d", "addr", "show", "dev", dev, check=False)
        if result.returncode != 0:
            return None
        links = json.loads(result.stdout)
        return links[0] if links else None

    def sysctl(self, key: str) -> str:
        return self.run("sysctl", "-n", key).stdout.strip()

    def set_features(self, dev: str, features: Mapping[str, bool]) -> None:
        """Turn ethtool features of `dev` on or off by their kernel names, as `ethtool -k`
        lists them (e.g. "tx-checksum-ip-generic", "rx-gro")."""
        self.run(sys.executable, "-c", _SET_FEATURES, dev, json.dumps(dict(features)))

    def ping(self, *dsts: str, count: int = 3, interval: float = 0.05,
             timeout: float = 1.0) -> dict[str, PingResult]:
        """ICMP-echo each destination `count` times (`interval` s apart, all destinations at
        once); an echo is lost when no answer came `timeout` s after the last send. An ICMP
        error in answer (e.g. net unreachable) ends the wait for that echo at once."""
        result = self.run(*PROBE, "ping", "--count", str(count), "--interval", str(interval),
                          "--timeout", str(timeout), *dsts,
                          timeout=count * interval * len(dsts) + timeout + 15)
        return {d["dst"]: PingResult(**d) for d in json.loads(result.stdout)}

    def tcp_sink(self, address: str, port: int, timeout: float = 60) -> subprocess.Popen:
        """Start a one-connection TCP sink; returns once it listens. Its stdout's last line is
        JSON {"bytes": n, "sha256": hex} of what it received (see `tcp_sink_result`)."""
        proc = self.popen(*PROBE, "tcp-sink", "--bind", address, "--port", str(port),
                          "--timeout", str(timeout), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening"):
            proc.kill()
            _, err = proc.communicate()
            raise NetnsError(f"[{self.name}] tcp-sink on {address}:{port} did not start: "
                             f"{line.strip()} {err.strip()}")
        return proc

    @staticmethod
    def tcp_sink_result(proc: subprocess.Popen, timeout: float = 60) -> dict[str, Any]:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise NetnsError(f"tcp-sink failed (exit {proc.returncode}): {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])

    def tcp_connect(self, address: str, port: int, timeout: float = 5) -> dict[str, Any]:
        """Try one TCP connect; JSON {"connected": bool, "error": errno name or None,
        "seconds": s}. A refused, unreachable or timed-out connect is a result, not an error."""
        result = self.run(*PROBE, "tcp-connect", "--to", address, "--port", str(port),
                          "--timeout", str(timeout), timeout=timeout + 15)
        return json.loads(result.stdout)

    def iperf3_start(self, server: Netns, address: str, *args: str, seconds: int = 3,
                     port: int = IPERF_PORT) -> Iperf3Run:
        """Start a one-shot iperf3 server on `address` in `server`, wait until it listens, then
        an iperf3 client here for `seconds` with extra `args` (e.g. "-u", "-P", "4");
        `.result()` waits for iperf3's JSON report."""
        srv = server.popen("iperf3", "-s", "-1", "-B", address, "-p", str(port),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: srv.poll() is not None
                   or server.run("ss", "-Hltn", f"sport = :{port}").stdout
                   .strip(), 5, f"iperf3 server in {server.name} to listen on {address}:{port}")
        if srv.poll() is not None:
            raise NetnsError(f"[{server.name}] iperf3 -s -B {address} -p {port}: exited with "
                             f"status {srv.returncode}")
        # --connect-timeout: a path that drops the SYN fails in seconds, not minutes.
        argv = ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J",
                "--connect-timeout", "5000", *args]
        client = self.popen(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        return Iperf3Run(client, srv, f"[{self.name}] {_format_cmd(argv)}", seconds + 30)

    def iperf3(self, server: Netns, address: str, *args: str, seconds: int = 3,
               port: int = IPERF_PORT) -> dict[str, Any]:
        """Run one iperf3 test from here to a one-shot server on `address` in `server`; iperf3's
        JSON report. See `iperf3_start`."""
        return self.iperf3_start(server, address, *args, seconds=seconds, port=port).result()

    def tcp_send(self, address: str, port: int, data: bytes, timeout: float = 60) -> dict:
        """Send `data` over one TCP connection; JSON {"bytes": n, "seconds": s} of the send."""
        result = self.run(*PROBE, "tcp-send", "--to", address, "--port", str(port),
                          input=data, text=False, timeout=timeout)
        return json.loads(result.stdout.decode())


class Host(Netns):
    """A host namespace: underlay eth0, and the files and process of its flannel-udp daemon."""

    def __init__(self, name: str, index: int, directory: Path,
                 processes: list[subprocess.Popen], segment: int = 0) -> None:
        super().__init__(name, processes)
        self.index = index
        self.segment = segment
        self.underlay_ip = str(segment_net(segment).network_address + 10 + index)
        self.dir = directory
        self.subnet_file = directory / "subnet.env"
        self.control_socket = directory / "control.sock"
        self.log_path = directory / "daemon.log"
        self.daemon: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def label(self) -> str:
        return f"h{self.index}"

    def flannel(self, *args: str | os.PathLike, check: bool = True,
                timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a `flannel-udp` subcommand in this host."""
        return self.run(*FLANNEL_UDP, *args, check=check, timeout=timeout)

    def start_flannel(self, store: str | os.PathLike, net_config: str | os.PathLike | None = None,
                      *extra: str, iface: str = "eth0", env: dict[str, str] | None = None,
                      env_only: bool = False) -> subprocess.Popen:
        """Start `flannel-udp run` in the foreground of this host, logging to `log_path`;
        `extra` is appended to its arguments (e.g. "-v", "1"), `env` to its environment (e.g.
        NOTIFY_SOCKET). With `env_only` the settings go as FLANNELD_* variables instead of
        flags, as a container entrypoint gets them."""
        if self.daemon is not None and self.daemon.poll() is None:
            raise NetnsError(f"{self.label}: a daemon runs already (pid {self.daemon.pid})")
        settings = {"local-store": str(store), "iface": iface,
                    "subnet-file": str(self.subnet_file),
                    "control-socket": str(self.control_socket)}
        if net_config is not None:
            settings["net-config-path"] = str(net_config)
        child_env = _child_env()
        child_env.update(env or {})
        if env_only:
            argv = ["run"]
            child_env.update({f"FLANNELD_{k.upper().replace('-', '_')}": v
                              for k, v in settings.items()})
        else:
            argv = ["run", *(a for k, v in settings.items() for a in (f"--{k}", v))]
        argv += extra
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by Topology.cleanup
        shown = [f"{k}={v}" for k, v in child_env.items() if k.startswith("FLANNELD_")]
        self._log.write(f"--- start: {_format_cmd([*shown, 'flannel-udp', *argv])}\n".encode())
        self._log.flush()
        self.daemon = self.popen(*FLANNEL_UDP, *argv, stdin=subprocess.DEVNULL,
                                 stdout=self._log, stderr=subprocess.STDOUT, env=child_env)
        return self.daemon

    def stop_flannel(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the daemon and wait for it; its exit status (negative: killed by a signal)."""
        if self.daemon is None:
            raise NetnsError(f"{self.label}: no daemon was started")
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
        try:
            return self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"{self.label}: daemon did not exit within {timeout:g} s of "
                             f"signal {sig}") from None

    def _check_daemon_alive(self) -> None:
        if self.daemon is not None and self.daemon.poll() is not None:
            # The last log line is the daemon's reason; the whole log is in log_path.
            raise NetnsError(f"{self.label}: daemon exited with status {self.daemon.returncode}"
                             f": {self.log_tail(1)}")

    def subnet_env(self) -> dict[str, str]:
        return read_subnet_env(self.subnet_file)

    def status(self) -> dict[str, Any]:
        """What `flannel-udp status --json` prints for this host's daemon, asked over its
        control socket from this process (the socket is a file, reachable from any
        namespace): no process started per look, so a test can poll it every few ms."""
        self._check_daemon_alive()
        try:
            answer = control.request(str(self.control_socket), {"cmd": "status"})
        except UserError as e:
            raise NetnsError(f"{self.label}: status: {e}") from None
        if "error" in answer:
            raise NetnsError(f"{self.label}: status: daemon: {answer['error']}")
        return json.loads(json.dumps(answer))  # as the CLI prints it: tuples become lists

    def try_status(self) -> dict[str, Any] | None:
        """Like `status`, None while no daemon answers; raises if the daemon has died."""
        try:
            return self.status()
        except NetnsError:
            self._check_daemon_alive()
            return None

    def peer_subnets(self) -> set[str]:
        return {p["subnet"] for p in self.status()["peers"]}

    def lease(self) -> dict[str, Any]:
        """The daemon's own lease as `status` reports it (subnet, public_ip, backend, expires)."""
        return self.status()["lease"]

    def wait_ready(self, timeout: float = 15) -> dict[str, str]:
        """Wait until the daemon has written subnet.env and answers on its control socket;
        returns subnet.env. Fails at once, with the log, if the daemon exits."""
        def ready() -> dict[str, str] | None:
            self._check_daemon_alive()
            env = self.subnet_env()
            return env if env and self.try_status() is not None else None
        return wait_until(ready, timeout, f"{self.label}'s daemon to write {self.subnet_file} "
                          "and answer on its control socket", interval=0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


_SET_FEATURES = """
import json, sys
from pyroute2.ethtool import Ethtool
with Ethtool() as ethtool:
    features = ethtool.get_features(sys.argv[1])
    for name, enable in json.loads(sys.argv[2]).items():
        features.features[name].enable = enable
    ethtool.set_features(sys.argv[1], features)
"""


class KernelVxlanNode:
    """A host's kernel VXLAN device programmed exactly as flanneld's vxlan backend programs it:
    `flannel.<VNI>` with `nolearning`, MTU = underlay - 50, the lease's network address /32,
    and per remote lease a permanent neighbour entry, a permanent FDB entry and an onlink route.
    The reference that flannel-udp must interoperate with (tests) and be measured against
    (bench). `lease_value()` is the lease flanneld would write for it."""

    def __init__(self, host: Host, subnet: str, *, vni: int = 1, port: int = 8472,
                 mac: str | None = None, underlay_dev: str = "eth0",
                 udp_csum: bool | None = None) -> None:
        """`udp_csum` True/False: `udpcsum`/`noudpcsum` on the device (UDP checksums set or
        zero in the frames it sends); None leaves the kernel's default (set).

        The underlay keeps its offloads as they come: over a veth the frames reach the next
        namespace with inner checksums partial and as 64 KB GSO frames, as from nodes that are
        containers on one machine."""
        self.host = host
        self.subnet = ipaddress.IPv4Network(subnet)
        self.vni = vni
        self.port = port
        self.dev = f"flannel.{vni}"
        # locally administered, unicast, derived from the host so that it is stable
        self.mac = mac or "0e:fa:" + ":".join(
            f"{b:02x}" for b in ipaddress.IPv4Address(host.underlay_ip).packed)
        csum = [] if udp_csum is None else ["udpcsum" if udp_csum else "noudpcsum"]
        host.run("ip", "link", "add", self.dev, "type", "vxlan", "id", str(vni),
                 "local", host.underlay_ip, "dev", underlay_dev, "dstport", str(port),
                 "nolearning", *csum)
        host.run("ip", "link", "set", self.dev, "address", self.mac,
                 "mtu", str(UNDERLAY_MTU - 50))
        host.run("ip", "addr", "add", f"{self.subnet.network_address}/32", "dev", self.dev)
        host.run("ip", "link", "set", self.dev, "up")

    def lease_value(self) -> bytes:
        """The lease JSON flanneld writes for this node, byte for byte."""
        return (f'{{"PublicIP":"{self.host.underlay_ip}","PublicIPv6":null,'
                f'"BackendType":"vxlan","BackendData":{{"VNI":{self.vni},'
                f'"VtepMAC":"{self.mac}"}}}}').encode()

    def add_peer(self, subnet: str, public_ip: str, vtep_mac: str) -> None:
        """What flanneld does when a remote vxlan lease appears."""
        net = ipaddress.IPv4Network(subnet)
        gateway = str(net.network_address)
        self.host.run("ip", "neigh", "replace", gateway, "lladdr", vtep_mac, "dev", self.dev,
                      "nud", "permanent")
        self.host.run("bridge", "fdb", "replace", vtep_mac, "dev", self.dev, "dst", public_ip,
                      "self", "permanent")
        self.host.run("ip", "route", "replace", str(net), "via", gateway, "dev", self.dev,
                      "onlink")

    def remove_peer(self, subnet: str, vtep_mac: str) -> None:
        """What flanneld does when a remote vxlan lease goes away."""
        net = ipaddress.IPv4Network(subnet)
        for argv in (("ip", "route", "del", str(net)),
                     ("ip", "neigh", "del", str(net.network_address), "dev", self.dev),
                     ("bridge", "fdb", "del", vtep_mac, "dev", self.dev, "self")):
            self.host.run(*argv, check=False)

    def remove(self) -> None:
        """Delete the device (its neighbours, FDB entries and routes go with it), e.g. to free
        its UDP port for the next dataplane on the same host."""
        self.host.run("ip", "link", "del", self.dev, check=False)


class Pod(Netns):
    """A pod namespace attached to a host by a veth; `address` is its eth0 address."""

    def __init__(self, name: str, index: int, host: Host, address: str, gateway: str,
                 processes: list[subprocess.Popen]) -> None:
        super().__init__(name, processes)
        self.index = index
        self.host = host
        self.address = address
        self.gateway = gateway

    @property
    def label(self) -> str:
        return f"p{self.index}"

    def tcp_transfer(self, dst: Pod, port: int, size: int,
                     timeout: float = 60) -> dict[str, Any]:
        """`size` random bytes from this pod to a one-connection sink in `dst` on `port`:
        {"sent": bytes, "received": bytes, "intact": the SHA-256 of both ends agree}."""
        data = os.urandom(size)
        sink = dst.tcp_sink(dst.address, port, timeout)
        sent = self.tcp_send(dst.address, port, data, timeout)
        got = dst.tcp_sink_result(sink, timeout)
        return {"sent": sent["bytes"], "received": got["bytes"],
                "intact": got["sha256"] == hashlib.sha256(data).hexdigest()}


class Topology:
    """Hosts on one bridge, plus pods added later; a context manager that always cleans up."""

    def __init__(self, hosts: int = 3, prefix: str | None = None,
                 segments: Sequence[int] | None = None) -> None:
        """`segments`: the underlay segment of each host (default all 0); with more than one
        segment a router namespace `<prefix>-rt` joins them and every host routes the other
        segments through it, so hosts on different segments reach each other only via a
        gateway."""
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be between 1 and 200")
        self.prefix = prefix or f"fu{os.getpid()}-{next(_topology_ids)}"
        self.processes: list[subprocess.Popen] = []
        self.hosts: list[Host] = []
        self.pods: list[Pod] = []
        # Pod indexes are never reused, so a new pod's names can't meet a removed one's remains.
        self._pod_ids = itertools.count(1)
        self._namespaces: list[str] = []  # in creation order; deleted in reverse
        self._closed = False
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.store_path = self.dir / "store.msgpack"
        self.switch = Netns(f"{self.prefix}-sw", self.processes)
        try:
            self._build(hosts, list(segments or [0] * hosts))
        except BaseException:
            self.cleanup()
            raise

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def _add_namespace(self, name: str) -> None:
        # Recorded before creation so that a half-made namespace is still removed.
        self._namespaces.append(name)
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if result.returncode != 0:
            raise NetnsError(f"ip netns add {name}: {result.stderr.strip()}")

    def _ip(self, ns: str, *args: str) -> None:
        cmd = ["ip", "-n", ns, *args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise NetnsError(f"{_format_cmd(cmd)}: {result.stderr.strip()}")

    def _build(self, count: int, segments: list[int]) -> None:
        if len(segments) != count:
            raise ValueError(f"segments names {len(segments)} hosts' segments, not {count}")
        sw = self.switch.name
        self._add_namespace(sw)
        self._ip(sw, "link", "set", "lo", "up")
        self.segments = sorted(set(segments) | {0})
        for segment in self.segments:
            self._ip(sw, "link", "add", f"br{segment}", "type", "bridge")
            self._ip(sw, "link", "set", f"br{segment}", "up")
        self.router: Netns | None = None
        if len(self.segments) > 1:
            self._add_router()
        for i in range(1, count + 1):
            self.add_host(i, segments[i - 1])

    def _add_router(self) -> None:
        """A namespace forwarding between the segments: leg eth<k> = .1 of segment k."""
        self.router = Netns(f"{self.prefix}-rt", self.processes)
        self._add_namespace(self.router.name)
        sw, rt = self.switch.name, self.router.name
        self._ip(rt, "link", "set", "lo", "up")
        for segment in self.segments:
            net = segment_net(segment)
            self._ip(sw, "link", "add", f"rt{segment}", "mtu", str(UNDERLAY_MTU), "type", "veth",
                     "peer", "name", f"eth{segment}", "mtu", str(UNDERLAY_MTU), "netns", rt)
            self._ip(sw, "link", "set", f"rt{segment}", "master", f"br{segment}", "up")
            self._ip(rt, "addr", "add", f"{net.network_address + 1}/{net.prefixlen}",
                     "dev", f"eth{segment}")
            self._ip(rt, "link", "set", f"eth{segment}", "up")
        self.router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    def add_host(self, index: int, segment: int = 0) -> Host:
        if segment not in self.segments:
            raise NetnsError(f"no segment {segment} (this topology has {self.segments})")
        directory = self.dir / f"h{index}"
        directory.mkdir()
        host = Host(f"{self.prefix}-h{index}", index, directory, self.processes, segment)
        self._add_namespace(host.name)
        self.hosts.append(host)
        sw = self.switch.name
        # The veth is made inside the switch namespace, its far end moved straight into the
        # host: it never exists in the root namespace.
        self._ip(sw, "link", "add", f"h{index}", "mtu", str(UNDERLAY_MTU), "type", "veth",
                 "peer", "name", "eth0", "mtu", str(UNDERLAY_MTU), "netns", host.name)
        self._ip(sw, "link", "set", f"h{index}", "master", f"br{segment}", "up")
        self._ip(host.name, "link", "set", "lo", "up")
        net = segment_net(segment)
        self._ip(host.name, "addr", "add", f"{host.underlay_ip}/{net.prefixlen}", "dev", "eth0")
        self._ip(host.name, "link", "set", "eth0", "up")
        for other in self.segments if self.router is not None else ():
            if other != segment:
                self._ip(host.name, "route", "add", str(segment_net(other)),
                         "via", str(net.network_address + 1))
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        return host

    def host(self, index: int) -> Host:
        """Host by its 1-based index (h1 is `host(1)`)."""
        return self.hosts[index - 1]

    def write_net_config(self, config: dict[str, Any] | str,
                         name: str = "net-conf.json") -> Path:
        """Write a network config file into the temp dir (a dict as JSON, a str verbatim)."""
        path = self.dir / name
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        return path

    def add_pod(self, host: Host, flannel_subnet: str | None = None,
                mtu: int | None = None) -> Pod:
        """A pod namespace on `host`: the host's side of the veth gets `flannel_subnet` (the
        FLANNEL_SUBNET form, e.g. 10.244.3.1/24), the pod the next address with a default route
        via it, both MTU `mtu`. Both default to the host's subnet.env. One pod per host."""
        if any(p.host is host for p in self.pods):
            raise NetnsError(f"{host.label} has a pod already (one pod per host)")
        env = host.subnet_env() if flannel_subnet is None or mtu is None else {}
        if flannel_subnet is None:
            flannel_subnet = env.get("FLANNEL_SUBNET")
        if mtu is None:
            mtu = int(env["FLANNEL_MTU"]) if "FLANNEL_MTU" in env else None
        if flannel_subnet is None or mtu is None:
            raise NetnsError(f"{host.label} has no subnet.env yet: pass flannel_subnet and mtu")
        gateway = ipaddress.IPv4Interface(flannel_subnet)
        address = ipaddress.IPv4Interface(f"{gateway.ip + 1}/{gateway.network.prefixlen}")
        index = next(self._pod_ids)
        pod = Pod(f"{self.prefix}-p{index}", index, host, str(address.ip), str(gateway.ip),
                  self.processes)
        self._add_namespace(pod.name)
        self.pods.append(pod)
        veth = f"pod{index}"
        self._ip(host.name, "link", "add", veth, "mtu", str(mtu), "type", "veth",
                 "peer", "name", "eth0", "mtu", str(mtu), "netns", pod.name)
        self._ip(host.name, "addr", "add", str(gateway), "dev", veth)
        self._ip(host.name, "link", "set", veth, "up")
        self._ip(pod.name, "link", "set", "lo", "up")
        self._ip(pod.name, "addr", "add", str(address), "dev", "eth0")
        self._ip(pod.name, "link", "set", "eth0", "up")
        self._ip(pod.name, "route", "add", "default", "via", str(gateway.ip))
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Delete a pod: whatever runs in it, its namespace and its veth (with the host's
        FLANNEL_SUBNET address), so that its host can take another pod."""
        # Deleting the host's end removes the pair at once; a deleted namespace's devices are
        # only torn down later by the kernel.
        self._ip(pod.host.name, "link", "del", f"pod{pod.index}")
        _kill_namespace(pod.name)
        self._namespaces.remove(pod.name)
        self.pods.remove(pod)

    def start_daemons(self, config: dict[str, Any] | str = DEFAULT_NETWORK_CONFIG,
                      hosts: Sequence[Host] | None = None, *extra: str,
                      timeout: float = 20, store: str | os.PathLike | None = None
                      ) -> dict[str, dict[str, Any]]:
        """Start a daemon in each host (default: all) on the shared store (default
        `store_path`), seeded with `config`; wait until each has its lease and sees every other
        as a peer. Returns each host's lease (by label)."""
        hosts = list(self.hosts if hosts is None else hosts)
        net_config = self.write_net_config(config)
        for host in hosts:
            host.start_flannel(self.store_path if store is None else store, net_config, *extra)
        for host in hosts:
            host.wait_ready(timeout)
        return self.wait_peers(hosts, timeout)

    def wait_peers(self, hosts: Sequence[Host] | None = None,
                   timeout: float = 10) -> dict[str, dict[str, Any]]:
        """Wait until every host's daemon lists every other one's subnet as a peer; returns
        each host's lease (by label)."""
        hosts = list(self.hosts if hosts is None else hosts)
        leases = {h.label: h.lease() for h in hosts}
        for host in hosts:
            others = {leases[h.label]["subnet"] for h in hosts if h is not host}
            wait_until(lambda h=host, o=others: o <= h.peer_subnets(), timeout,
                       f"{host.label}'s daemon to list {', '.join(sorted(others))} as peers")
        return leases

    def log_tails(self, lines: int = 30) -> str:
        """The end of every daemon log, for a failure report."""
        parts = []
        for host in self.hosts:
            if host.log_path.exists():
                parts.append(f"== {host.label} ({host.name}) {host.log_path}\n"
                             f"{host.log_tail(lines)}")
        return "\n".join(parts)

    def leftovers(self) -> list[str]:
        """Namespaces of this topology that still exist (none after `cleanup`)."""
        return [n for n in _list_namespaces() if n.startswith(f"{self.prefix}-")]

    def cleanup(self) -> None:
        """Stop every tracked process (SIGTERM, 5 s, SIGKILL), kill anything else left in the
        namespaces, delete them and the temp dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        running = [p for p in self.processes if p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.processes:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for host in self.hosts:
            host.close_log()
        for name in reversed(self._namespaces):
            _kill_namespace(name)
        self._namespaces.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- probes run inside the namespaces (python -m flannel_udp.lab.netns ...) ---------------------

_ICMP_ECHO_REPLY, _ICMP_UNREACH, _ICMP_ECHO, _ICMP_TIME_EXCEEDED = 0, 3, 8, 11
_UNREACH_CODES = {0: "net unreachable", 1: "host unreachable", 2: "protocol unreachable",
                  3: "port unreachable", 4: "fragmentation needed", 13: "administratively "
                  "prohibited"}


def _echo_request(ident: int, seq: int) -> bytes:
    payload = b"flannel-udp-probe"
    header = struct.pack("!BBHHH", _ICMP_ECHO, 0, 0, ident, seq)
    checksum = inet_checksum(header + payload)
    return struct.pack("!BBHHH", _ICMP_ECHO, 0, checksum, ident, seq) + payload


def _parse_icmp(packet: bytes, ident: int) -> tuple[int, str | None] | None:
    """(seq, error or None) when `packet` (IP header included) answers one of our echoes."""
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    icmp_type, code = packet[ihl], packet[ihl + 1]
    if icmp_type == _ICMP_ECHO_REPLY:
        pkt_ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
        return (seq, None) if pkt_ident == ident else None
    if icmp_type in (_ICMP_UNREACH, _ICMP_TIME_EXCEEDED):
        inner = ihl + 8  # the offending packet's IP header follows the 8-byte ICMP header
        if len(packet) < inner + 20:
            return None
        inner_icmp = inner + (packet[inner] & 0x0F) * 4
        if len(packet) < inner_icmp + 8 or packet[inner_icmp] != _ICMP_ECHO:
            return None
        pkt_ident, seq = struct.unpack_from("!HH", packet, inner_icmp + 4)
        if pkt_ident != ident:
            return None
        source = socket.inet_ntoa(packet[12:16])
        if icmp_type == _ICMP_UNREACH:
            what = _UNREACH_CODES.get(code, f"unreachable (code {code})")
        else:
            what = "time exceeded"
        return seq, f"{what} from {source}"
    return None


def _ping_main(dsts: list[str], count: int, interval: float, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    results = [{"dst": d, "sent": 0, "received": 0, "rtts_ms": [], "errors": [], "answered": []}
               for d in dsts]
    pending: dict[int, tuple[int, float]] = {}  # seq -> (destination index, send time)
    numbers: dict[int, int] = {}  # seq -> the echo's number for its destination
    probes = [(i, d) for _ in range(count) for i, d in enumerate(dsts)]
    seq = 0
    next_send = time.monotonic()
    last_send = next_send
    while probes or pending:
        now = time.monotonic()
        if probes and now >= next_send:
            index, dst = probes.pop(0)
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(_echo_request(ident, seq), (dst, 0))
                pending[seq] = (index, now)
                numbers[seq] = results[index]["sent"] + 1
            except OSError as e:  # e.g. no route in this namespace
                results[index]["errors"].append(e.strerror or str(e))
            results[index]["sent"] += 1
            last_send = now
            next_send = now + interval / max(1, len(dsts))
            continue
        if not probes and now >= last_send + timeout:
            break
        wait = (next_send if probes else last_send + timeout) - now
        readable, _, _ = select.select([sock], [], [], max(0.0, wait))
        if not readable:
            continue
        packet, _ = sock.recvfrom(65535)
        answer = _parse_icmp(packet, ident)
        if answer is None or answer[0] not in pending:
            continue
        index, sent_at = pending.pop(answer[0])
        if answer[1] is None:
            now = time.monotonic()
            results[index]["received"] += 1
            results[index]["rtts_ms"].append(round((now - sent_at) * 1000, 3))
            results[index]["answered"].append([numbers[answer[0]], now])
        else:
            results[index]["errors"].append(answer[1])
    print(json.dumps(results))
    return 0


def _tcp_sink_main(bind: str, port: int, timeout: float) -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((bind, port))
    server.listen(1)
    server.settimeout(timeout)
    print(f"listening {bind}:{port}", flush=True)
    conn, _ = server.accept()
    conn.settimeout(timeout)
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        digest.update(chunk)
        total += len(chunk)
    conn.close()
    print(json.dumps({"bytes": total, "sha256": digest.hexdigest()}))
    return 0


def _tcp_connect_main(to: str, port: int, timeout: float) -> int:
    started = time.monotonic()
    error = None
    try:
        socket.create_connection((to, port), timeout=timeout).close()
    except TimeoutError:
        error = "ETIMEDOUT"
    except OSError as e:
        error = errno.errorcode.get(e.errno or 0, str(e))
    print(json.dumps({"connected": error is None, "error": error,
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


def _tcp_send_main(to: str, port: int, timeout: float) -> int:
    data = sys.stdin.buffer.read()
    started = time.monotonic()
    with socket.create_connection((to, port), timeout=timeout) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes once it has everything
    print(json.dumps({"bytes": len(data), "seconds": round(time.monotonic() - started, 3)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_udp.lab.netns",
                                     description="probes run inside test namespaces")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ping = sub.add_parser("ping", help="ICMP echo; prints JSON results")
    ping.add_argument("dsts", nargs="+")
    ping.add_argument("--count", type=int, default=3)
    ping.add_argument("--interval", type=float, default=0.05)
    ping.add_argument("--timeout", type=float, default=1.0)
    sink = sub.add_parser("tcp-sink", help="receive one TCP connection; print size and sha256")
    sink.add_argument("--bind", required=True)
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--timeout", type=float, default=60)
    connect = sub.add_parser("tcp-connect", help="try one TCP connect; print the outcome")
    connect.add_argument("--to", required=True)
    connect.add_argument("--port", type=int, required=True)
    connect.add_argument("--timeout", type=float, default=5)
    send = sub.add_parser("tcp-send", help="send stdin over one TCP connection")
    send.add_argument("--to", required=True)
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    if args.cmd == "ping":
        return _ping_main(args.dsts, args.count, args.interval, args.timeout)
    if args.cmd == "tcp-sink":
        return _tcp_sink_main(args.bind, args.port, args.timeout)
    if args.cmd == "tcp-connect":
        return _tcp_connect_main(args.to, args.port, args.timeout)
    return _tcp_send_main(args.to, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
