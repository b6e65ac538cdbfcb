"""benchmarks/gpu_check.py's sections at toy sizes on the CPU: the GPU check's own code works before a GPU
machine runs it (benchmarks/gpu_check.sh), and what it reports can be read."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section(name: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), name, "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_sdpa_section_names_a_kernel_for_each_call():
    rows = [line for line in section("kernels").splitlines() if line.startswith("| ") and "mask" in line]
    assert len(rows) == 3
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] in ("flash", "memory-efficient", "cuDNN", "math") and float(cells[2]) > 0


def test_the_flex_section_reports_the_skipped_tiles_of_real_masks():
    rows = [line for line in section("flex").splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["17", "33"]
    for row in rows:
        shares = [float(cell.strip().rstrip("%")) for cell in row.strip("|").split("|")[1:5]]
        assert all(0 <= share < 100 for share in shares)


@pytest.mark.slow
def test_the_fsdp_section_round_trips_a_sharded_checkpoint():
    out = section("fsdp")
    assert "| off |" in out and "| on |" in out
    assert "- PASS sharded checkpoint round trip" in out
