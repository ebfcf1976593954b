"""docs/flanneld.md lists every flag of flanneld (REFERENCE.md section 5) and says what
flannel-udp does with it; the command line must do what the page says."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from flannel_udp import cli

PAGE = Path(__file__).resolve().parents[2] / "docs" / "flanneld.md"
# flanneld v0.22.3's and v0.11.0's `-help`, and what later versions added.
FLANNELD_FLAGS = {
    "etcd-cafile", "etcd-certfile", "etcd-endpoints", "etcd-keyfile", "etcd-password",
    "etcd-prefix", "etcd-username", "healthz-ip", "healthz-port", "iface", "iface-can-reach",
    "iface-regex", "ip-masq", "iptables-forward-rules", "iptables-resync",
    "kube-annotation-prefix", "kube-api-url", "kube-subnet-mgr", "kubeconfig-file",
    "log_backtrace_at", "net-config-path", "public-ip", "public-ipv6",
    "set-node-network-unavailable", "subnet-file", "subnet-lease-renew-margin",
    "use-multi-cluster-cidr", "v", "version", "vmodule", "ip-masq-fully-random-disable",
    "ip-blackhole-route"}


def page_rows() -> dict[str, str]:
    rows = re.findall(r"^\| `-([\w-]+)` \| [^|]+ \| ([^|]+) \|$", PAGE.read_text(), re.M)
    return {flag: support.strip() for flag, support in rows}


def test_the_page_lists_every_flanneld_flag_once():
    rows = re.findall(r"^\| `-([\w-]+)` \|", PAGE.read_text(), re.M)
    assert sorted(rows) == sorted(FLANNELD_FLAGS)


@pytest.mark.parametrize(("flag", "support"), sorted(page_rows().items()))
def test_the_command_line_does_what_the_page_says(flag, support, tmp_path, capsys):
    parser = cli.build_parser()
    longs, booleans = cli._options(parser)
    known = f"--{flag}" in longs or flag == "v"
    if support.startswith(("taken", "accepted")):
        assert known, f"-{flag}: the page says {support!r}, the command line does not know it"
    elif support.startswith("refused in one line"):
        store = tmp_path / "store"
        value = [] if f"--{flag}" in booleans else ["x"]
        code = cli.main(["run", f"-{flag}", *value, "--local-store", str(store)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"flannel-udp: --{flag}"), err
        assert err.count("\n") == 1 and not store.exists(), err
    else:
        assert support.startswith("refused as unknown"), support
        assert not known, f"-{flag}: the page says it is refused, the command line takes it"


def test_the_page_names_every_own_flag_of_run():
    """flannel-udp's own flags of `run` (not flanneld's, nor an alias of one) are named on the
    page, e.g. --etcd-api."""
    run = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices["run"]
    own = set()
    for action in run._actions:
        names = [o for o in action.option_strings if o.startswith("--")]
        if not names or action.help == argparse.SUPPRESS or names[0] in ("--help", "--version"):
            continue
        if not any(n[2:] in FLANNELD_FLAGS for n in names):
            own.add(names[0])
    assert "--etcd-api" in own
    text = PAGE.read_text()
    assert [f for f in sorted(own) if f"`{f}`" not in text] == []
