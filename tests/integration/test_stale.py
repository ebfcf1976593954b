"""Leftovers of a killed run are removed by the next: a harness process that built a topology
with running daemons and an etcd member, then died by SIGKILL without cleaning up, leaves
namespaces, processes, an etcd and temp dirs; the lab's `remove_stale` and `remove_stale_etcd`
(called at the start of every test session, demo and bench run) remove exactly those, and
nothing of a run that is still alive."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flannel_udp.lab import (
    child_env,
    etcd_problem,
    list_namespaces,
    remove_stale,
    remove_stale_etcd,
    wait_until,
)

pytestmark = pytest.mark.netns

# A harness run that builds two hosts with daemons and one etcd member on loopback, says what
# it made, and waits to be killed.
KILLED_RUN = """
import sys
from flannel_udp.lab import EtcdCluster, Topology
topo = Topology(2)
topo.start_daemons()
etcd = EtcdCluster(1).start()
pids = [h.daemon.pid for h in topo.hosts] + [p.pid for p in etcd.processes]
print(topo.prefix, topo.dir, etcd.dir, *pids, flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_runs_namespaces_processes_etcd_and_dirs_are_removed_by_the_next(topology):
    problem = etcd_problem()
    assert problem is None, problem
    live = topology(1)  # this run's own topology: must survive the sweep
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=child_env(),
                           start_new_session=True)
    try:
        line = run.stdout.readline().split()
        assert line, f"the run to be killed did not start (exit {run.poll()})"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    prefix, topo_dir, etcd_dir, *pids = line
    left = [n for n in list_namespaces() if n.startswith(f"{prefix}-")]
    assert len(left) == 3, left  # switch and two hosts
    assert all(_alive(int(p)) for p in pids), "daemons and etcd outlive the killed run"
    assert Path(topo_dir).is_dir() and Path(etcd_dir).is_dir()

    killed = remove_stale_etcd()
    removed = remove_stale()

    assert int(pids[-1]) in killed
    assert set(left) | {topo_dir, etcd_dir} <= set(removed), removed
    assert not [n for n in list_namespaces() if n.startswith(f"{prefix}-")]
    # SIGKILL is delivered at once, but a process takes a moment to be gone.
    wait_until(lambda: not any(_alive(int(p)) for p in pids), 5,
               "the killed run's daemons and etcd to be gone")
    assert not Path(topo_dir).exists() and not Path(etcd_dir).exists()
    assert set(live.namespaces) <= set(list_namespaces()), "a live run's namespaces went"
