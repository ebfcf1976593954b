"""The seed deployment's supervisord section, run for real: supervisord (from PyPI) in a host
namespace starts flannel-udp's `flanneld` with the seed's shell-script flags, restarts it after
kill -9 (the same lease back), and stops it with the section's `stopsignal=QUIT`, which must
clean up as SIGTERM does (flannel0 gone, exit 0, so `exitcodes=0,2` counts it as expected).

Two changes to the seed's section: `startsecs=3` instead of 30 (the test would wait 30 s for
RUNNING twice), and the embedded store instead of etcd's v2 keyspace (not supported yet)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flannel_udp import subnetenv
from flannel_udp.lab import (
    DEFAULT_NETWORK_CONFIG,
    Host,
    Topology,
    wait_until,
)

pytestmark = pytest.mark.netns

PROGRAM = "flanneld-68-21"
FLANNELD = (f"{sys.executable} -c 'import sys; from flannel_udp.cli import flanneld_main; "
            "sys.argv[0] = \"flanneld\"; raise SystemExit(flanneld_main())'")


def supervisor_files(host: Host, store: Path) -> Path:
    """The seed's flanneld.sh and supervisord section, in `host`'s directory."""
    d = host.dir
    script = d / "flanneld.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {FLANNELD} --public-ip={host.underlay_ip} --local-store={store} "
        f"--iface=eth0 --subnet-file=./subnet.env --healthz-port=2401 "
        f"-control-socket={d}/control.sock\n")
    script.chmod(0o755)
    conf = d / "supervisord.conf"
    conf.write_text(f"""\
[unix_http_server]
file={d}/supervisor.sock

[supervisord]
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{d}/supervisor.sock

[program:{PROGRAM}]
command={script}
directory={d}
startsecs=3
exitcodes=0,2
stopsignal=QUIT
stopwaitsecs=10
redirect_stderr=true
stdout_logfile={d}/flanneld.log
""")
    return conf


def ctl(host: Host, conf: Path, *args: str) -> str:
    return host.run(sys.executable, "-m", "supervisor.supervisorctl", "-c", conf, *args,
                    check=False).stdout


def state(host: Host, conf: Path) -> tuple[str, int | None]:
    """The program's supervisord state and pid."""
    out = ctl(host, conf, "status", PROGRAM)
    m = re.search(rf"{PROGRAM}\s+(\w+)(?:\s+pid (\d+))?", out)
    return (m.group(1), int(m.group(2)) if m.group(2) else None) if m else ("?", None)


def test_the_seeds_supervisord_section_runs_restarts_and_stops_flanneld(topology):
    topo: Topology = topology(1)
    host = topo.hosts[0]
    store = topo.dir / "store.msgpack"
    host.flannel("network", "set", "--local-store", store, json.dumps(DEFAULT_NETWORK_CONFIG))
    conf = supervisor_files(host, store)
    host.popen(sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = host.dir / "flanneld.log"

    def running() -> int | None:
        status, pid = state(host, conf)
        return pid if status == "RUNNING" else None

    first = wait_until(running, 30, f"{PROGRAM} RUNNING")
    subnet = subnetenv.read(host.dir / "subnet.env")["FLANNEL_SUBNET"]
    assert host.link("flannel0") is not None

    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: (pid := running()) != first and pid, 30,
                        f"{PROGRAM} restarted after kill -9")
    wait_until(lambda: host.link("flannel0") is not None, 10, "flannel0 back")
    assert subnetenv.read(host.dir / "subnet.env")["FLANNEL_SUBNET"] == subnet

    out = ctl(host, conf, "stop", PROGRAM)
    assert "stopped" in out, out
    assert state(host, conf)[0] == "STOPPED"
    assert not os.path.exists(f"/proc/{second}")
    assert host.link("flannel0") is None, "SIGQUIT left flannel0 behind"
    assert "signal received, shutting down" in log.read_text()
    ctl(host, conf, "shutdown")
