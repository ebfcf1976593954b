"""The scale harness at CI size: two udp daemons following a real etcd (v3) holding 2,000
flannel-style leases, churned while `status` and `/metrics` are read every second, then hit by
a burst of 20,000 lease puts at once and as many deletes (flannel issue 2251: a full event
channel deadlocked a 5,000-node cluster). What is checked is convergence and responsiveness:
every event followed reaches both tables, every read is answered, both tables end equal to
etcd's; no figure is judged (the machine is shared)."""

from __future__ import annotations

import pytest

from bench import scale
from flannel_udp import control
from flannel_udp.lab import EtcdCluster, etcd_problem

pytestmark = pytest.mark.netns

LEASES = 2000
BURST = 20000


def test_thousands_of_leases_converge_under_churn_and_a_burst_while_status_is_read(topology):
    if etcd_problem() is not None:
        pytest.skip(etcd_problem())
    topo = topology(2)
    etcd = EtcdCluster.in_topology(topo).start()
    lines: list[str] = []
    try:
        result = scale.run_size(topo, etcd, LEASES, rate=50, seconds=5, burst=BURST,
                                say=lines.append, check_status=_status_pages)
    finally:
        etcd.cleanup()
    log = "\n".join(lines)
    assert all(t is not None for t in result["ready_after_run_s"].values()), log
    assert result["quiet"]["lost"] == 0 and result["quiet"]["put_s"]["n"] == 40, log
    churn = result["churn"]
    assert churn["lost"] == 0 and churn["all_s"]["n"] >= 200, log
    assert churn["read_failures"] == 0 and churn["status_rtt_s"]["n"] > 0, log
    assert churn["metrics_rtt_s"]["n"] > 0, log
    burst = result["burst"]
    for kind in ("put", "delete"):
        assert None not in burst[kind]["in_tables_s"], (kind, log)
    assert burst["read_failures"] == 0 and burst["status_rtt_s"]["n"] > 0, log
    assert [d["equal"] for d in result["check"]["daemons"]] == [True, True], result["check"]
    assert result["status_pages"] == {"first": control.STATUS_PEERS, "count": LEASES + 1,
                                      "all": LEASES + 1}, log


def _status_pages(socket_path: str) -> dict[str, int]:
    """`status` as the CLI asks it: the first page by default, every peer page by page."""
    first = control.request(socket_path, {"cmd": "status"})
    every = control.status(socket_path, None)
    return {"first": len(first["peers"]), "count": first["peer_count"],
            "all": len({p["subnet"] for p in every["peers"]})}
