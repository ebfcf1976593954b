"""The tree stays ruff clean (the test extras install ruff)."""

import subprocess
import sys

from helpers import ROOT


def test_ruff_finds_nothing():
    # As a module of the interpreter running the tests: the test extras install it there,
    # and a venv's bin/ need not be on PATH.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
