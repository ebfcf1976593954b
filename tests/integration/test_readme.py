"""The README's two commands are what a newcomer runs first: the test command is the one CI
runs, and the demo command works as written from the root of a fresh clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

DEBIAN_PYTHON = Path("/usr/bin/python3")
DEMO_TIMEOUT = 900  # apt-get, a venv, the Cython build, downloads from PyPI, then the demo


def readme_commands(readme: Path = ROOT / "README.md") -> tuple[str, str]:
    """The README's first two ```sh blocks: the demo command and the test command."""
    blocks = re.findall(r"^```sh\n(.*?)^```", readme.read_text(), re.S | re.M)
    assert len(blocks) >= 2, "the README must open with the demo and the test command"
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f".ci/run does not run the README's test command:\n{test_command}"


def _interpreters() -> list:
    """python3 as PATH finds it, and Debian's own where that is another one (PEP 668)."""
    params = [pytest.param(None, id="python3-on-path")]
    on_path = shutil.which("python3")
    if DEBIAN_PYTHON.exists() and (on_path is None
                                   or Path(on_path).resolve() != DEBIAN_PYTHON.resolve()):
        params.append(pytest.param(DEBIAN_PYTHON, id="debian-python3"))
    return params


@pytest.mark.netns
@pytest.mark.parametrize("python", _interpreters())
def test_readme_demo_command_from_a_fresh_clone(tmp_path: Path, python: Path | None,
                                                netns_session: None) -> None:
    """Clone the repository, stand at the clone's root and run the demo command as written."""
    demo_command, _ = readme_commands()
    clone = tmp_path / "flannel-udp"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if python is not None:  # Debian's python3 first on PATH, as on a fresh Debian machine
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    else:  # the interpreter running the tests, as `python3` (a venv's may not be on PATH)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["bash", "-c", demo_command], cwd=clone, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL)
    tail = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, f"the demo command failed ({result.returncode}):\n{tail}"
    assert "No module named" not in result.stdout, tail
    # flanneld's names, for units and scripts that call them by path
    for script in ("flannel-udp", "flanneld", "mk-docker-opts.sh"):
        assert (clone / ".venv" / "bin" / script).exists(), script
