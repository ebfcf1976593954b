"""The systemd units in contrib/ pass `systemd-analyze verify`, run against a root of the
test's own: this machine's systemd units (the targets a unit is ordered against), the unit, and
an executable at every path its Exec lines name, each a command this project installs. So the
unit is checked, not where this machine has flannel-udp installed; any line verify prints about
the unit (a warning it "ignores" too) fails the test."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "contrib").glob("*.service"))
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def console_scripts() -> set[str]:
    """The names under pyproject's [project.scripts] (tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r'^"?([\w.-]+)"?\s*=', section, re.M))


SCRIPTS = console_scripts()


def exec_paths(unit: Path) -> list[str]:
    """The program of every Exec*= line (systemd's -@:+! prefixes dropped)."""
    lines = re.findall(r"^Exec\w+=(.*)$", unit.read_text(), re.M)
    return [line.strip().lstrip("-@:+!").split()[0] for line in lines]


def test_contrib_has_the_units():
    assert {u.name for u in UNITS} == {"flannel-udp.service", "flanneld.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_unit_runs_commands_this_project_installs(unit: Path):
    paths = exec_paths(unit)
    assert paths, f"{unit.name} has no Exec line"
    for path in paths:
        assert path.startswith("/") and Path(path).name in SCRIPTS, (
            f"{unit.name}: {path} is not an absolute path to one of {sorted(SCRIPTS)}")


def verify(name: str, text: str, tmp_path: Path) -> tuple[int, str]:
    """`systemd-analyze verify` of a unit `name` holding `text`: its exit status and output."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"no {SYSTEM_UNITS}: systemd's own units are not installed")
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    unit = root / "etc/systemd/system" / name
    unit.write_text(text)
    for path in exec_paths(unit):
        program = root / path.lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={root}", name],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).strip()


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path):
    code, output = verify(unit.name, unit.read_text(), tmp_path)
    assert code == 0 and not output, f"systemd-analyze verify {unit.name}: exit {code}\n{output}"


def test_the_check_fails_on_a_misspelled_setting_and_a_missing_program(tmp_path: Path):
    text = (ROOT / "contrib" / "flannel-udp.service").read_text()
    code, output = verify("bad.service", text.replace("Type=notify", "Type=notfy"),
                          tmp_path / "a")
    assert "Failed to parse service type" in output  # a warning only: exit status 0
    code, output = verify("bad.service", text.replace("ExecStart=/usr/local/bin/flannel-udp",
                                                      "ExecStart=flannel-udp-nowhere"),
                          tmp_path / "b")
    assert code != 0 and "flannel-udp-nowhere" in output, output
