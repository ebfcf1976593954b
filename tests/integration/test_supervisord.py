"""The seed deployment's supervisord section, run for real: supervisord (from PyPI) in a host
namespace starts flannel-udp's `flanneld` from the seed's flanneld.sh, with its flags as written
(`--public-ip= --endpoints=https://... --ca-file= --cert-file= --key-file= --iface=
--subnet-file=./subnet.env --healthz-port=2401`) against an etcd 3.4 with v2 on and client
certificates, the config written as the seed writes it (`ETCDCTL_API=2 etcdctl set
/coreos.com/network/config '...'`, host-gw). supervisord restarts it after kill -9 (the same
lease back) and stops it with the section's `stopsignal=QUIT`, which must stop it as SIGTERM
does (exit 0, so `exitcodes=0,2` counts it as expected).

One change to the seed's section: `startsecs=3` instead of 30 (the test would wait 30 s for
RUNNING twice); and the script adds `-control-socket`, as hosts here share one filesystem."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from flannel_udp import subnetenv
from flannel_udp.lab import EtcdCluster, Host, Topology, make_test_pki, wait_until
from flannel_udp.lab.etcd import ETCD_ADDRESS

pytestmark = pytest.mark.netns

PROGRAM = "flanneld-68-21"
FLANNELD = (f"{sys.executable} -c 'import sys; from flannel_udp.cli import flanneld_main; "
            "sys.argv[0] = \"flanneld\"; raise SystemExit(flanneld_main())'")


SEED_CONFIG = '{"Network": "172.68.0.0/16", "Backend": {"Type": "host-gw"}}'


def supervisor_files(host: Host, etcd: EtcdCluster) -> Path:
    """The seed's flanneld.sh and supervisord section, in `host`'s directory."""
    d = host.dir
    pki = etcd.pki
    assert pki is not None
    script = d / "flanneld.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {FLANNELD} --public-ip={host.underlay_ip} --endpoints={etcd.endpoint_arg} "
        f"--ca-file={pki.ca} --cert-file={pki.client_cert} --key-file={pki.client_key} "
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
    etcd = EtcdCluster.in_topology(topo, pki=make_test_pki(topo.dir / "pki", [ETCD_ADDRESS]),
                                   enable_v2=True).start()
    etcd.etcdctl("set", "/coreos.com/network/config", SEED_CONFIG, api=2)
    conf = supervisor_files(host, etcd)
    host.popen(sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = host.dir / "flanneld.log"

    def running() -> int | None:
        status, pid = state(host, conf)
        return pid if status == "RUNNING" else None

    first = wait_until(running, 30, f"{PROGRAM} RUNNING")
    env = wait_until(lambda: subnetenv.read(host.dir / "subnet.env"), 10, "subnet.env")
    subnet = env["FLANNEL_SUBNET"]
    assert env["FLANNEL_NETWORK"] == "172.68.0.0/16"
    key = "/coreos.com/network/subnets/" + str(IPv4Interface(subnet).network).replace("/", "-")
    # flanneld v0.11's host-gw lease, in the v2 keyspace where the seed's config is
    assert etcd.etcdctl("get", key, api=2).stdout.strip() == (
        f'{{"PublicIP":"{host.underlay_ip}","BackendType":"host-gw"}}')
    assert "etcd v2" in (host.dir / "flanneld.log").read_text()

    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: (pid := running()) != first and pid, 30,
                        f"{PROGRAM} restarted after kill -9")
    wait_until(lambda: (host.try_status() or {}).get("lease"), 15,
               "the restarted daemon's lease")
    assert subnetenv.read(host.dir / "subnet.env")["FLANNEL_SUBNET"] == subnet

    out = ctl(host, conf, "stop", PROGRAM)
    assert "stopped" in out, out
    assert state(host, conf)[0] == "STOPPED"
    assert not os.path.exists(f"/proc/{second}")
    assert f"stopped: {PROGRAM} (exit status 0)" in (host.dir / "supervisord.log").read_text()
    assert "signal received, shutting down" in log.read_text()
    ctl(host, conf, "shutdown")
