"""The machines of a topology: a `Host` runs a flannel-udp daemon (its files, its process,
its `status`), a `Pod` sits behind a host on a veth; `ping_failures` pings every pod from every
other."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from flannel_udp import control, subnetenv
from flannel_udp.errors import UserError
from flannel_udp.lab.netns import FLANNEL_UDP, Netns, NetnsError, child_env, format_cmd, wait_until


def ping_failures(pods: Mapping[str, Pod], count: int = 3, ipv6: bool = False) -> list[str]:
    """Every namespace pings the `address` (with `ipv6`, the `address6`) of every other; one
    line per target that did not answer every echo (empty when all did). `pods` maps a label
    to each."""
    failures = []
    for label, pod in pods.items():
        targets = [p.address6 if ipv6 else p.address for p in pods.values() if p is not pod]
        for dst, result in pod.ping(*targets, count=count).items():
            if not result.ok:
                failures.append(f"{label} -> {dst}: {result.received}/{result.sent} answered "
                                f"{result.errors}")
    return failures


class Host(Netns):
    """A host namespace: underlay eth0, and the files and process of its flannel-udp daemon."""

    def __init__(self, name: str, index: int, directory: Path,
                 processes: list[subprocess.Popen], underlay_ip: str, segment: int = 0) -> None:
        super().__init__(name, processes)
        self.index = index
        self.segment = segment
        self.underlay_ip = underlay_ip
        self.underlay_ipv6: str | None = None  # on a dual-stack underlay
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
                      *extra: str, iface: str | None = "eth0",
                      env: dict[str, str] | None = None,
                      env_only: bool = False) -> subprocess.Popen:
        """Start `flannel-udp run` in the foreground of this host, logging to `log_path`;
        `extra` is appended to its arguments (e.g. "-v", "1"), `env` to its environment (e.g.
        NOTIFY_SOCKET); `iface` None gives no --iface (e.g. for --iface-regex in `extra`). With
        `env_only` the settings go as FLANNELD_* variables instead of flags, as a container
        entrypoint gets them."""
        if self.daemon is not None and self.daemon.poll() is None:
            raise NetnsError(f"{self.label}: a daemon runs already (pid {self.daemon.pid})")
        settings = {"local-store": str(store), "subnet-file": str(self.subnet_file),
                    "control-socket": str(self.control_socket)}
        if iface is not None:
            settings["iface"] = iface
        if net_config is not None:
            settings["net-config-path"] = str(net_config)
        environment = child_env()
        environment.update(env or {})
        if env_only:
            argv = ["run"]
            environment.update({f"FLANNELD_{k.upper().replace('-', '_')}": v
                                for k, v in settings.items()})
        else:
            argv = ["run", *(a for k, v in settings.items() for a in (f"--{k}", v))]
        argv += extra
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by Topology.cleanup
        shown = [f"{k}={v}" for k, v in environment.items() if k.startswith("FLANNELD_")]
        self._log.write(f"--- start: {format_cmd([*shown, 'flannel-udp', *argv])}\n".encode())
        self._log.flush()
        self.daemon = self.popen(*FLANNEL_UDP, *argv, stdin=subprocess.DEVNULL,
                                 stdout=self._log, stderr=subprocess.STDOUT, env=environment)
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
        return subnetenv.read(self.subnet_file)

    def status(self, peers: int | None = None) -> dict[str, Any]:
        """What `flannel-udp status --json --peers all` prints for this host's daemon (`peers`:
        only the first so many), asked over its control socket from this process (the socket
        is a file, reachable from any namespace): no process started per look, so a test can
        poll it every few ms."""
        self._check_daemon_alive()
        try:
            answer = control.status(str(self.control_socket), peers)
        except UserError as e:
            raise NetnsError(f"{self.label}: status: {e}") from None
        return json.loads(json.dumps(answer))  # as the CLI prints it: tuples become lists

    def routes(self, subnets: list[str] | None = None) -> dict[str, Any]:
        """The daemon's `routes` answer: {"peers": in its lease table, "routes": in its data
        plane, "present": for each of `subnets`, whether the data plane routes it}. Cheap at
        any table size."""
        self._check_daemon_alive()
        try:
            answer = control.request(str(self.control_socket),
                                     {"cmd": "routes", "subnets": subnets or []})
        except UserError as e:
            raise NetnsError(f"{self.label}: routes: {e}") from None
        if "error" in answer:
            raise NetnsError(f"{self.label}: routes: daemon: {answer['error']}")
        return answer

    def try_status(self) -> dict[str, Any] | None:
        """Like `status`, None while no daemon answers; raises if the daemon has died."""
        try:
            return self.status()
        except NetnsError:
            self._check_daemon_alive()
            return None

    def peer_subnets(self) -> set[str]:
        """Each peer's subnet as `status` names it: the IPv4 one, the IPv6 one if IPv6-only."""
        return {p["subnet"] or p["ipv6_subnet"] for p in self.status()["peers"]}

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


class Pod(Netns):
    """A pod namespace attached to a host by a veth; `address` is its eth0 address (None in an
    IPv6-only network), `address6` its IPv6 one (None without an IPv6 subnet)."""

    def __init__(self, name: str, index: int, host: Host, address: str | None,
                 gateway: str | None,
                 processes: list[subprocess.Popen]) -> None:
        super().__init__(name, processes)
        self.index = index
        self.host = host
        self.address = address
        self.gateway = gateway
        self.address6: str | None = None  # dual stack: its IPv6 address

    @property
    def label(self) -> str:
        return f"p{self.index}"

    def tcp_transfer(self, dst: Pod, port: int, size: int,
                     timeout: float = 60, ipv6: bool = False) -> dict[str, Any]:
        """`size` random bytes from this pod to a one-connection sink in `dst` on `port` (at its
        IPv6 address with `ipv6`): {"sent": bytes, "received": bytes, "intact": the SHA-256 of
        both ends agree}."""
        data = os.urandom(size)
        address = dst.address6 if ipv6 else dst.address
        if address is None:
            raise ValueError(f"{dst.label} has no IPv6 address")
        sink = dst.tcp_sink(address, port, timeout)
        sent = self.tcp_send(address, port, data, timeout)
        got = dst.tcp_sink_result(sink, timeout)
        return {"sent": sent["bytes"], "received": got["bytes"],
                "intact": got["sha256"] == hashlib.sha256(data).hexdigest()}

