"""Sweeps: a grid of ordinary runs, their table, and an interrupted sweep that finishes as an uninterrupted one."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from experiments.sweep import main as sweep_main
from tests.conftest import ROOT

BASE = {"dataset_name": "digits", "arch": "resnet18", "width_multiplier": 0.25, "image_size": 16, "epochs": 2,
        "limit_train_batches": 2, "save_every_n_epochs": 1, "warmup_epochs": 1, "log_every_n_steps": 1,
        "workers": 0, "device": "cpu", "proj_hidden_dim": 32, "proj_out_dim": 16, "tsne": False,
        "knn_k": 20}


def _write(tmp_path, grid, name="tiny"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": BASE, "grid": grid, "eval": ["knn"],
                                    "table": {"rows": "batch_size", "columns": "clr"}}, sort_keys=False))
    return path


def _rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_a_sweep_writes_a_table_of_means_over_seeds_and_skips_done_cells(tmp_path, capsys):
    spec = _write(tmp_path, {"clr": ["flatclr"], "batch_size": [16], "seed": [0, 1]})
    out = tmp_path / "out"
    assert sweep_main([str(spec), f"--out={out}", "--grid", "seed=1"]) == 0  # one seed now, the other later
    assert "2 cells, 0 done, 1 to run (seed=1)" in capsys.readouterr().out
    assert [r["seed"] for r in _rows(out)] == ["1"]
    assert sweep_main([str(spec), f"--out={out}"]) == 0
    rows = _rows(out)
    assert [(r["clr"], r["seed"]) for r in rows] == [("flatclr", "0"), ("flatclr", "1")]
    for row in rows:  # each row carries its run's last training diagnostics
        last = [json.loads(line) for line in (out / row["run_dir"] / "metrics.jsonl").read_text().splitlines()][-1]
        assert float(row["mi_bound"]) == pytest.approx(last["mi_bound"], rel=1e-5)
        assert float(row["log_k"]) == pytest.approx(math.log(2 * 16 - 1), rel=1e-5)
        assert float(row["flat_grad_ratio"]) > 1
    table = (out / "table.md").read_text()
    top1 = [float(r["knn_top1"]) for r in rows]  # the table's cell: mean and sample std of the csv's two seeds
    mean, std = sum(top1) / 2, abs(top1[0] - top1[1]) / 2 ** 0.5
    assert f"| 16 | {mean:.2f} ± {std:.2f} (n=2) |" in table, table
    assert (out / "knn.png").stat().st_size > 5_000
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint_*.pth.tar")}
    assert sweep_main([str(spec), f"--out={out}"]) == 0  # everything done: nothing runs again
    assert "2 cells, 2 done, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint_*.pth.tar")} == before


def test_sweep_mistakes_are_one_line(tmp_path, capsys):
    bad = _write(tmp_path, {"clr": ["simclr", "nosuch"], "batch_size": [16]}, name="bad")
    assert sweep_main([str(bad), f"--out={tmp_path / 'o1'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad}: cell clr-nosuch__batch_size-16: clr: 'nosuch' is not "
                                               "one of simclr, flatclr, byol, insdis; fix the value (as --clr takes "
                                               "it) or leave the key out")
    assert not (tmp_path / "o1").exists()
    good = _write(tmp_path, {"clr": ["simclr"], "batch_size": [16]}, name="good")
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "sweep.yaml").write_text("name: other\n")
    assert sweep_main([str(good), f"--out={tmp_path / 'o2'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'o2'} holds another sweep (its sweep.yaml and "
                                               f"--set values differ from {good} and these); pass --out elsewhere, "
                                               "or delete that directory")
    assert sweep_main([str(good), f"--out={tmp_path / 'o3'}", "--set", "batch_size=8"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --set batch_size: batch_size is an axis of the grid of {good}; "
                                               "edit the grid instead")
    for item, message in (("lr=0.1", "lr is not an axis of this sweep's grid (clr, batch_size)"),
                          ("clr=byol", "'byol' is not a value of the axis clr (simclr)"),
                          ("seed", "write it as AXIS=V1,V2, e.g. --grid seed=0")):
        assert sweep_main([str(good), f"--out={tmp_path / 'o3'}", "--grid", item]) == 2
        assert capsys.readouterr().err.strip() == f"error: --grid {item}: {message}"
    assert sweep_main([str(good), f"--out={tmp_path / 'o3'}", "--set", "epochs"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set epochs: write it as KEY=VALUE, e.g. --set device=cuda"
    assert sweep_main([str(good), f"--out={tmp_path / 'o3'}", "--set", "epochs=zero"]) == 2
    assert capsys.readouterr().err.strip() == ("error: good.yaml: cell clr-simclr__batch_size-16: epochs: expected an "
                                               "integer, got 'zero'; fix the value (as --epochs takes it) or leave "
                                               "the key out").replace("good.yaml", str(good))
    assert not (tmp_path / "o3").exists()


def test_set_replaces_a_base_flag_of_every_cell_and_is_kept_with_the_sweep(tmp_path, capsys):
    spec = _write(tmp_path, {"clr": ["flatclr"], "batch_size": [16]})
    out = tmp_path / "out"
    assert sweep_main([str(spec), f"--out={out}", "--set", "epochs=1", "--set", "temperature=0.3"]) == 0
    cell = out / "cells" / "clr-flatclr__batch_size-16"
    settings = yaml.safe_load((cell / "config.yaml").read_text())
    assert (settings["epochs"], settings["temperature"]) == (1, 0.3)
    assert sorted(p.name for p in cell.glob("checkpoint_*.pth.tar")) == ["checkpoint_0001.pth.tar"]
    capsys.readouterr()
    assert sweep_main([str(spec), f"--out={out}"]) == 2  # the same yaml without the same --set: another sweep
    assert "holds another sweep" in capsys.readouterr().err
    assert sweep_main([str(spec), f"--out={out}", "--set", "temperature=0.3", "--set", "epochs=1"]) == 0
    assert "1 cells, 1 done, 0 to run" in capsys.readouterr().out


def test_a_sweep_stops_at_a_first_cell_refused_for_a_reason_all_cells_share(tmp_path, capsys):
    spec = _write(tmp_path, {"clr": ["simclr", "flatclr"], "batch_size": [16]})
    out, missing = tmp_path / "out", tmp_path / "nowhere"
    assert sweep_main([str(spec), f"--out={out}", "--set", "dataset_name=folder", "--set", f"data={missing}"]) == 2
    first = out / "cells" / "clr-simclr__batch_size-16.log"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cell clr-simclr__batch_size-16 was refused (no image folder at {missing}/train; --data must hold "
        "train/<class>/<image> (and test/<class>/<image> for evaluation)); the sweep stopped there, since the first "
        f"cell to end was refused and the others most likely would be too (its log: {first}); fix that and run the "
        "same command again")
    assert not (out / "cells" / "clr-flatclr__batch_size-16.log").exists()  # never started
    diverging = tmp_path / "diverging"  # a cell that fails in its own run does not stop the others
    assert sweep_main([str(spec), f"--out={diverging}", "--set", "lr=1.0e+30"]) == 1
    assert "2 cell(s) did not finish" in capsys.readouterr().err
    assert (diverging / "cells" / "clr-flatclr__batch_size-16.log").exists()


@pytest.mark.slow
def test_a_killed_sweep_reruns_to_the_table_of_an_uninterrupted_one(tmp_path):
    """2x2 grid x 2 seeds on digits; the sweep and its cell are killed (SIGKILL to the process group, as a
    lost node) while a cell is half-trained; the rerun resumes that cell from its checkpoint."""
    spec = _write(tmp_path, {"clr": ["simclr", "flatclr"], "batch_size": [16, 32], "seed": [0, 1]})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = [sys.executable, "-m", "experiments.sweep", str(spec)]
    subprocess.run(cmd + [f"--out={whole}"], cwd=ROOT, check=True, capture_output=True, timeout=1200)
    proc = subprocess.Popen(cmd + [f"--out={cut}"], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    third = cut / "cells" / "clr-simclr__batch_size-32__seed-0"
    deadline = time.monotonic() + 600
    while not (third / "checkpoint_0001.pth.tar").exists():  # mid-cell: one epoch of two saved
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (third / "eval").exists()
    rerun = subprocess.run(cmd + [f"--out={cut}"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "8 cells, 2 done, 6 to run" in rerun.stdout
    assert "--train_from=latest" in (cut / "cells" / "clr-simclr__batch_size-32__seed-0.log").read_text()
    assert (cut / "table.md").read_text() == (whole / "table.md").read_text()
    assert _rows(cut) == _rows(whole)


@pytest.mark.parametrize("preset", sorted(p for p in os.listdir(os.path.join(ROOT, "experiments"))
                                          if p.endswith(".yaml")))
def test_every_preset_is_a_valid_sweep(preset, tmp_path):
    from experiments.sweep import load_sweep

    sweep = load_sweep(os.path.join(ROOT, "experiments", preset), str(tmp_path))  # main.py accepts every cell
    assert sweep.cells() and set(sweep.evals) <= {"knn", "linear_eval", "finetune"}
    if preset.endswith("_cpu.yaml"):
        assert all(c.settings()["device"] == "cpu" and c.settings()["width_multiplier"] < 1 for c in sweep.cells())
