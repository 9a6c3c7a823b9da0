"""The scripts under benchmarks/ run and produce what they promise."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_augment_grid_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "augment_grid.py"), "--clr=byol",
                           f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 20_000 and f"wrote {out}" in proc.stdout


@pytest.mark.slow
def test_throughput_quick_prints_a_table_and_the_speedup_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("augment_speedup_vs_pil: ")
    assert float(last.split()[-1]) >= 10, last  # the target: 10x PIL per core (a timing: run it on an idle machine)
    assert "| simclr | faster | 16 |" in proc.stdout and "| byol | standard (" in proc.stdout


def test_memory_format_comparison_prints_both_timings():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_format.py"), "--batch_size=4",
                           "--image_size=16", "--steps=1", "--rounds=1", "--device=cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.strip().splitlines()[-1]  # "| 1 | <NCHW ms> | <channels_last ms> |"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "1" and all(float(c.replace(",", "")) > 0 for c in cells[1:]), row
