"""The code passes ruff (pyproject.toml's [tool.ruff]): a lint failure fails CI like a test."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    beside = Path(sys.executable).parent / "ruff"  # the test extras' ruff, in the venv that runs pytest
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -e '.[test]'"
    out = subprocess.run([ruff, "check", "jaxgrok", "tests", "docs"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
