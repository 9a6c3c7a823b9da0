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
