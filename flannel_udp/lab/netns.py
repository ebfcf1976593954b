"""Network namespaces and the processes in them, the base of the lab: `Netns` runs commands
and probes inside one, `remove_stale` clears what a dead earlier run left, `wait_until` polls.
Every failure is a NetnsError whose message names the command, namespace and stderr.

Programs run inside a namespace through `ip netns exec`, which execs the program (no extra
process), so a tracked Popen's pid is the program itself and signals reach it directly. Children
get their own session so that a Ctrl-C at the terminal reaches only the harness, which then stops
them in order.

Every namespace and temp dir the lab makes is named `fu<pid>-...` after the process that made
it, so concurrent runs never collide and `remove_stale()` can tell the leftovers of a dead run by
its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

STALE_PATTERN = r"^fu(\d+)-"
IPERF_PORT = 5201
# `python -m flannel_udp` rather than the `flannel-udp` script: same interpreter as the harness,
# no dependence on PATH inside `ip netns exec`.
FLANNEL_UDP = (sys.executable, "-m", "flannel_udp")
PROBE = (sys.executable, "-m", "flannel_udp.lab.probes")
# Children import the same flannel_udp as the harness, installed or not (e.g. a source tree
# under pytest): its parent directory goes first on their PYTHONPATH, and is their working
# directory, because `python -m` puts the working directory before PYTHONPATH: started from a
# clone's root, the unbuilt source tree would shadow the installed package.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class NetnsError(RuntimeError):
    """A namespace operation or a command in a namespace failed; the message says which."""


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


def child_env() -> dict[str, str]:
    """The environment of a child: this one, with the package root first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                              if p and p != PACKAGE_ROOT]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def format_cmd(argv: Sequence[str]) -> str:
    """`argv` as one line for a message."""
    return " ".join(str(a) for a in argv)


def list_namespaces() -> list[str]:
    """The names of every network namespace `ip netns` knows, this run's and others'."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace(name: str) -> None:
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
    for name in list_namespaces():
        m = regex.match(name)
        if m and not _pid_alive(int(m.group(1))):
            kill_namespace(name)
            removed.append(name)
    for entry in Path(tempfile.gettempdir()).iterdir():
        m = regex.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


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
                                    text=text, start_new_session=True, env=child_env(),
                                    cwd=PACKAGE_ROOT)
        except subprocess.TimeoutExpired:
            if check:
                raise NetnsError(f"[{self.name}] {format_cmd(argv)}: timed out after "
                                 f"{timeout:g} s") from None
            raise
        if check and result.returncode != 0:
            err = result.stderr if text else result.stderr.decode(errors="replace")
            raise NetnsError(f"[{self.name}] {format_cmd(argv)}: exit {result.returncode}: "
                             f"{err.strip()}")
        return result

    def popen(self, *argv: str | os.PathLike, **kw: Any) -> subprocess.Popen:
        """Start a command in the namespace; it is tracked so that cleanup stops it."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("env", child_env())
        kw.setdefault("cwd", PACKAGE_ROOT)
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
        return self._listening_probe("tcp-sink", address, port, timeout)

    def tcp_echo(self, address: str, port: int, timeout: float = 60) -> subprocess.Popen:
        """Start a one-connection TCP echo server (for `tcp_rr`); returns once it listens."""
        return self._listening_probe("tcp-echo", address, port, timeout)

    def _listening_probe(self, probe: str, address: str, port: int,
                         timeout: float) -> subprocess.Popen:
        proc = self.popen(*PROBE, probe, "--bind", address, "--port", str(port),
                          "--timeout", str(timeout), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening"):
            proc.kill()
            _, err = proc.communicate()
            raise NetnsError(f"[{self.name}] {probe} on {address}:{port} did not start: "
                             f"{line.strip()} {err.strip()}")
        return proc

    def tcp_rr(self, address: str, port: int, count: int, size: int = 64,
               interval: float = 0.01) -> list[float]:
        """`count` TCP round trips of `size`-byte requests to a `tcp_echo` server, `interval` s
        apart, over one connection; their times in microseconds."""
        result = self.run(*PROBE, "tcp-rr", "--to", address, "--port", str(port), "--count",
                          str(count), "--size", str(size), "--interval", str(interval),
                          timeout=count * (interval + 1) + 30)
        return json.loads(result.stdout)["rtts_us"]

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
        return Iperf3Run(client, srv, f"[{self.name}] {format_cmd(argv)}", seconds + 30)

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


_SET_FEATURES = """
import json, sys
from pyroute2.ethtool import Ethtool
with Ethtool() as ethtool:
    features = ethtool.get_features(sys.argv[1])
    for name, enable in json.loads(sys.argv[2]).items():
        features.features[name].enable = enable
    ethtool.set_features(sys.argv[1], features)
"""

