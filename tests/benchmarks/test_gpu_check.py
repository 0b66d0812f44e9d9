"""scripts/gpu_check.sh on a machine without a GPU: one "no GPU" line, in its report file too, exit 0."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run in earnest")
def test_without_a_gpu_the_check_says_so_in_one_line_and_exits_0(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path,
                            env=os.environ | {"OUT": str(tmp_path / "out")}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no GPU" in result.stdout and not result.stderr
    assert (tmp_path / "out" / "gpu_check.txt").read_text() == result.stdout
