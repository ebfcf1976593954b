"""Under CI a skipped test fails the run, naming why (conftest.py): a green CI run means that
the end-to-end half ran too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TESTS


@pytest.mark.parametrize(("env", "outcome"), [({"CI": "true"}, "1 failed"),
                                              ({"FLANNEL_UDP_NO_SKIP": "1"}, "1 failed"),
                                              ({}, "1 skipped")])
def test_a_skip_fails_the_run_under_ci(tmp_path: Path, env: dict[str, str], outcome: str):
    (tmp_path / "test_skipping.py").write_text(
        "import pytest\n\ndef test_it():\n    pytest.skip('no widget on this machine')\n")
    child_env = {k: v for k, v in os.environ.items() if k not in ("CI", "FLANNEL_UDP_NO_SKIP")}
    child_env.update(env)
    child_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_skipping.py")],
        capture_output=True, text=True, cwd=tmp_path, env=child_env)
    assert outcome in result.stdout, result.stdout + result.stderr
    if env:
        assert "no widget on this machine" in result.stdout, result.stdout
        assert result.returncode == 1
