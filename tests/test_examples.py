"""The runnable examples run as documented (offline)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, tmp_path):
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "SDTUNE_EXAMPLE_DIR": str(tmp_path / "work")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained" in result.stdout
