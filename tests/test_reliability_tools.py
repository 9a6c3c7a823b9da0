"""The side tools under bad input: summary, resume over a damaged metrics.jsonl, run files that cannot be written,
export of a baseline, the side-by-side t-SNE and sweep files. Each mistake is one line (exit 2, nothing changed);
a damaged run in a summary is a row saying what is wrong."""
import hashlib
import json
import os
import re
import shutil
import threading

import pytest
import yaml

from main import main
from tests.conftest import TINY

ONE_RUN = TINY + ["--clr=simclr", "--width_multiplier=0.25", "--no-tsne", "--final_eval="]
NO_SPACE = (28, "No space left on device")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run (read only: the tests that change it copy it)."""
    run = tmp_path_factory.mktemp("tools") / "run"
    assert main(ONE_RUN + ["--epochs=2", f"--log_dir={run}"]) == 0
    return run


def _copy(run, to):
    shutil.copytree(run, to)
    return to


def _snapshot(root):
    """Every file's hash but the lock's (it names the last process that held the run)."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files if f != ".lock"}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _epochs(run):
    return [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")]


# ----------------------------------------------------------------------------- 1. summary over damaged runs
def _summary_rows(path, capsys):
    assert main(["--train_mode=summary", f"--checkpoint_dir={path}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "| run | method | dataset | arch | batch | epochs | loss | evals | state |"
    return {line.split(" | ")[0][2:]: line for line in out[2:]}


def test_summary_reports_a_half_written_metrics_line_and_lists_the_other_runs(finished, tmp_path, capsys):
    results = tmp_path / "results"
    good, torn = _copy(finished, results / "good"), _copy(finished, results / "torn")
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lo')  # a process killed while it wrote epoch 3's line
    before = _snapshot(results)
    rows = _summary_rows(results, capsys)
    assert rows[str(torn)].endswith("| 2/2 | " + rows[str(good)].split(" | ")[6] + " | - | metrics.jsonl line 3 is not "
                                    "valid json (half-written?); complete |")
    assert rows[str(good)].endswith("| complete |")
    assert _snapshot(results) == before  # a summary reads only


@pytest.mark.parametrize("text, state", [
    ("clr: [simclr\n", "config.yaml unreadable: while parsing a flow sequence"),
    ("- just\n- a list\n", "config.yaml unreadable: a list, not a mapping of settings"),
    ("clr: simclr\nepochs: abc\n", "config.yaml unreadable: epochs 'abc' is not a whole number"),
    ("clr: simclr\nepochs: [1, 2]\n", "config.yaml unreadable: epochs [1, 2] is not a whole number"),
    ("", "config.yaml unreadable: it is empty"),
])
def test_summary_reports_a_malformed_config_as_a_row_and_goes_on(finished, tmp_path, capsys, text, state):
    results = tmp_path / "results"
    _copy(finished, results / "a_good")
    bad = _copy(finished, results / "b_bad")
    (bad / "config.yaml").write_text(text)
    rows = _summary_rows(results, capsys)
    assert rows[str(bad)].endswith(f"| {state} |"), rows[str(bad)]
    assert "| 2/? |" in rows[str(bad)]  # the checkpoints still say how far it got
    assert rows[str(results / "a_good")].endswith("| complete |")


def test_summary_takes_paths_with_glob_characters_literally(finished, tmp_path, capsys):
    results = tmp_path / "exp[1]"
    run = _copy(finished, results / "run[2]")
    (run / "eval").mkdir()
    (run / "eval" / "knn_epoch0002.json").write_text(json.dumps({"top1": 12.5}))
    rows = _summary_rows(results, capsys)  # from the results directory: its runs found below it
    assert list(rows) == [str(run)] and "| knn_epoch0002 12.50% | complete |" in rows[str(run)]
    rows = _summary_rows(run, capsys)  # the run itself
    assert list(rows) == [str(run)] and "| knn_epoch0002 12.50% | complete |" in rows[str(run)]


def test_summary_names_unreadable_evaluation_records_and_broken_metrics_lines(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "knn_epoch0002.json").write_text('{"top1": 1')
    (run / "eval" / "linear_eval_epoch0002.json").write_text('{"top1": "high"}')
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    row = _summary_rows(run, capsys)[str(run)]
    assert ("| knn_epoch0002 unreadable (Expecting ',' delimiter: line 1 column 11 (char 10)), linear_eval_epoch0002 "
            "unreadable (its top1 is 'high') |") in row
    assert row.endswith("| metrics.jsonl line 1 is not valid json; delete or repair that line (the other lines are "
                        "the run's records), then run again; complete |")


# ----------------------------------------------------------------------------- 2. resume over metrics.jsonl
def test_a_resume_drops_a_half_written_last_metrics_line_with_one_warning(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "loss": 4.1, "pos_')
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 0
    assert _one_line(capsys) == (f"warning: {run / 'metrics.jsonl'} line 3 is not valid json (half-written by a run "
                                 "that was killed); this resume drops it")
    assert _epochs(run) == [1, 2, 3]


@pytest.mark.parametrize("line, message", [
    ('{"epoch": 1, "lo', "is not valid json; delete or repair that line (the other lines are the run's records), "
                         "then run again"),
    ("[1, 2]", "is not a record of this tool (a json object with its epoch); delete or repair that line, then run "
               "again"),
])
def test_a_broken_metrics_line_before_the_last_is_one_line_and_changes_nothing(finished, tmp_path, capsys, line,
                                                                               message):
    run = _copy(finished, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], line, lines[1]]) + "\n")
    before = _snapshot(run)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    assert _one_line(capsys) == f"error: {run / 'metrics.jsonl'} line 2 {message}"
    assert _snapshot(run) == before  # no events file, config.yaml and metrics.jsonl as they were


def test_metrics_log_keeps_the_records_up_to_the_resumed_epoch(tmp_path, capsys):
    from engine.runlog import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2.0}\n\n{"epoch": 2, "loss": 1.0}\n{"epoch": 3')
    log = MetricsLog(str(tmp_path), resume_epoch=1)
    assert capsys.readouterr().err.count("\n") == 1
    assert log.read() == [{"epoch": 1, "loss": 2.0}]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2.0}\n{"epo')
    with pytest.raises(Exception, match=r"metrics.jsonl line 2 is not valid json \(half-written\?\); resuming the run "
                                        r"\(--train_from latest\) drops it$"):
        MetricsLog(str(tmp_path), resume_epoch=None).read()  # a reader names it, changes nothing
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "loss": 2.0}\n{"epo'


# ----------------------------------------------------------------------------- 3. run files that cannot be written
def _full_disk_for(monkeypatch, suffix):
    """``open`` in engine.runlog fails with ENOSPC for files whose name ends with ``suffix``."""
    import builtins

    import engine.runlog as runlog

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith(suffix) and any(m in mode for m in "wa"):
            raise OSError(*NO_SPACE)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runlog, "open", full, raising=False)


def test_a_metrics_line_that_cannot_be_written_is_one_line_naming_the_file(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path / "run")
    _full_disk_for(monkeypatch, "metrics.jsonl")
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    assert _one_line(capsys) == (f"error: could not write {run / 'metrics.jsonl'} (No space left on device); make "
                                 "room, then resume with --train_from latest")
    assert (run / "checkpoint_0003.pth.tar").exists() and _epochs(run) == [1, 2]  # the epoch's checkpoint is saved


def test_curves_that_cannot_be_written_are_one_line_naming_the_file(finished, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    run = _copy(finished, tmp_path / "run")
    real = Figure.savefig

    def full(self, fname, *args, **kwargs):
        if str(fname).endswith(".png") and "curves" in str(fname):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG half")  # what a full disk leaves: a part of the file
            raise OSError(*NO_SPACE)
        return real(self, fname, *args, **kwargs)

    before = (run / "curves.png").read_bytes()
    monkeypatch.setattr(Figure, "savefig", full)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    assert _one_line(capsys) == (f"error: could not write {run / 'curves.png'} (No space left on device); make room, "
                                 "then resume with --train_from latest")
    assert (run / "curves.png").read_bytes() == before  # the old curves intact, no temporary file left
    assert sorted(p.name for p in run.glob("curves*")) == ["curves.png"]


def test_tensorboard_events_that_cannot_be_written_are_one_line_naming_the_file(finished, tmp_path, capsys,
                                                                                monkeypatch):
    from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

    run = _copy(finished, tmp_path / "run")
    thread_reports = []
    monkeypatch.setattr(threading, "excepthook", thread_reports.append)  # what Python would print for a thread

    def full(self, filename, file_content, binary_mode=False):  # the event file's writes after its first
        raise OSError(*NO_SPACE)

    monkeypatch.setattr(LocalFileSystem, "append", full)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    line = _one_line(capsys)  # the file is this invocation's own (given back when no checkpoint followed it)
    pattern = (re.escape(f"error: could not write {run / 'events.out.tfevents.'}") + rf"\d+\.[^ ]+\.{os.getpid()}\.\d+ "
               r"\(No space left on device\); make room, then resume with --train_from latest")
    assert re.fullmatch(pattern, line), line
    assert thread_reports == []  # TensorBoard's writer thread re-raises: no second report with a traceback


def test_a_config_that_cannot_be_written_leaves_the_run_as_it_was(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    _full_disk_for(monkeypatch, "config.yaml.tmp")
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    assert _one_line(capsys) == (f"error: could not write {run / 'config.yaml'} (No space left on device); make "
                                 "room, then run the same command again")
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------- 4. export of a baseline
@pytest.mark.parametrize("baseline", ["pca", "PCA", "none"])
def test_export_of_a_baseline_is_one_line(baseline, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--train_mode=export", f"--checkpoint_dir={baseline}"]) == 2
    assert _one_line(capsys) == (f"error: --train_mode=export needs --checkpoint_dir RUN_DIR (a pretraining run), not "
                                 f"{baseline} (an evaluation baseline, with no trained backbone to export)")
    assert os.listdir(tmp_path) == []


def test_a_run_directory_named_pca_is_exported_through_its_path(finished, tmp_path, capsys, monkeypatch):
    _copy(finished, tmp_path / "pca")
    monkeypatch.chdir(tmp_path)
    assert main(["--train_mode=export", "--checkpoint_dir=pca"]) == 2
    assert _one_line(capsys).endswith("(an evaluation baseline, with no trained backbone to export); for the run "
                                      "directory pca pass ./pca")
    assert not (tmp_path / "pca" / "export").exists()
    assert main(["--train_mode=export", "--checkpoint_dir=./pca"]) == 0
    assert sorted(p.name for p in (tmp_path / "pca" / "export").glob("*.json")) == ["resnet18_simclr_ep2.json"]


def test_an_export_description_that_cannot_be_written_is_one_line(finished, tmp_path, capsys, monkeypatch):
    import builtins

    import engine.export as export

    run = _copy(finished, tmp_path / "run")

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith(".json.tmp"):
            raise OSError(*NO_SPACE)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(export, "open", full, raising=False)
    assert main(["--train_mode=export", f"--checkpoint_dir={run}"]) == 2
    json_path = run / "export" / "resnet18_simclr_ep2.json"
    assert _one_line(capsys) == f"error: could not write {json_path} (No space left on device); make room, then " \
                                "export again"
    assert not json_path.exists() and not list((run / "export").glob("*.tmp"))


# ----------------------------------------------------------------------------- 5. side-by-side t-SNE
def _compare(args, capsys):
    from experiments.tsne_compare import main as compare

    code = compare([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def test_tsne_compare_of_paths_that_are_not_runs_is_one_line(finished, tmp_path, capsys):
    out = tmp_path / "figs" / "t.png"
    empty = tmp_path / "run[1]"
    empty.mkdir()
    (empty / "config.yaml").write_text("clr: simclr\ndataset_name: digits\n")
    cases = [
        ([tmp_path / "nowhere"], f"error: {tmp_path / 'nowhere'} does not exist; pass run directories "
                                 "(results/<dataset>/<bs>_<Method>/<date>)"),
        ([finished, empty], f"error: {empty} is not a run with checkpoints (config.yaml and checkpoint_NNNN.pth.tar)"),
        ([finished / "config.yaml"], f"error: {finished / 'config.yaml'} is not a directory; pass run directories "
                                     "(results/<dataset>/<bs>_<Method>/<date>)"),
    ]
    for runs, message in cases:
        assert _compare(runs + [f"--out={out}"], capsys) == (2, [message])
    assert not (tmp_path / "figs").exists()


def test_tsne_compare_of_a_damaged_run_is_one_line_naming_the_file(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    checkpoint = run / "checkpoint_0002.pth.tar"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100_000])  # cut short, as a copy that ran out of room
    code, err = _compare([run, f"--out={tmp_path / 't.png'}"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(checkpoint) in err[0], err
    (run / "config.yaml").write_text("clr: [simclr\n")
    code, err = _compare([run, f"--out={tmp_path / 't.png'}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {run / 'config.yaml'} is not readable yaml (while parsing a flow sequence"), err
    assert _compare([finished, f"--out={tmp_path}"], capsys) == (2, [
        f"error: --out {tmp_path} is a directory; pass the PNG file to write, e.g. {tmp_path / 'tsne.png'}"])
    code, err = _compare([finished, f"--out={tmp_path / 't.txt'}"], capsys)  # refused before any work
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --out {tmp_path / 't.txt'}: matplotlib does not "
                                                             "write .txt files; end it in .png (or "), err
    assert not (tmp_path / "t.png").exists()


def test_tsne_compare_takes_a_run_named_with_glob_characters(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run[1]")
    out = tmp_path / "t.png"
    assert _compare([run, f"--out={out}"], capsys) == (0, [])
    assert out.stat().st_size > 10_000 and sorted(os.listdir(tmp_path)) == ["run[1]", "t.png"]


# ----------------------------------------------------------------------------- 6. sweep files
# A dataset that is not there: should a check let a cell through, it fails at once instead of training.
BASE = {"dataset_name": "folder", "data": "/nonexistent/dataset", "arch": "resnet18", "width_multiplier": 0.25,
        "image_size": 16, "batch_size": 16, "epochs": 1, "workers": 0, "device": "cpu", "tsne": False}


def _sweep(tmp_path, capsys, spec, *extra):
    from experiments.sweep import main as sweep_main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    code = sweep_main([str(path), f"--out={out}", *extra])
    assert not out.exists()  # refused before anything is written
    return code, path, _one_line(capsys)


@pytest.mark.parametrize("change, message", [
    ({"base": ["epochs", 1]}, "base must be a mapping of flag names to values (as in a --config yaml), not a list"),
    ({"base": {**BASE, "epochs": [1, 2]}}, "base epochs: [1, 2] is a list, but --epochs takes one value; sweep several "
                                           "values as a grid axis"),
    ({"base": {**BASE, "final_eval": "knn"}}, "base: final_eval is not a setting of a sweep cell; list the evaluations "
                                              "under eval"),
    ({"base": {**BASE, "log_dir": "x"}}, "base: log_dir is not a setting of a sweep cell; the sweep sets it for each "
                                         "cell"),
    ({"grid": {"clr": "simclr"}}, "grid must map each swept flag to a non-empty list of values (or be a list of such "
                                  "maps, whose cells are joined)"),
    ({"grid": {"clr": ["simclr"], "lr": [[0.1, 0.2]]}}, "grid lr: [0.1, 0.2] is a list, but --lr takes one value"),
    ({"grid": {"clr": ["simclr"], "nosuch": [1]}}, "grid: 'nosuch' is not a flag name; keys are flag names as in "
                                                   "main.py --help"),
])
def test_a_wrongly_shaped_base_or_grid_is_one_line_naming_the_key(tmp_path, capsys, change, message):
    spec = {"name": "s", "base": BASE, "grid": {"clr": ["simclr"]}, "eval": ["knn"], **change}
    code, path, line = _sweep(tmp_path, capsys, spec)
    assert (code, line) == (2, f"error: {path}: {message}")


@pytest.mark.parametrize("change, message", [
    ({"eval": 5}, "eval must be a list of protocol names, e.g. [knn, linear_eval] (choose from {p}), not 5"),
    ({"eval": [{"knn": 1}]}, "eval must be a list of protocol names, e.g. [knn, linear_eval] (choose from {p}), not "
                             "[{'knn': 1}]"),
    ({"eval": []}, "eval must be a list of protocol names, e.g. [knn, linear_eval] (choose from {p}), not []"),
    ({"eval": ["knn", "nosuch"]}, "eval: unknown protocol nosuch; choose from {p}"),
    ({"table": ["clr"]}, "table must be a mapping {rows: AXIS, columns: AXIS}, not a list"),
    ({"table": {"rows": ["clr"]}}, "table rows ['clr'] is not an axis of the grid (clr, lr)"),
    ({"table": {"rows": "clr", "cols": "lr"}}, "unknown key(s) in table: cols; use rows and columns"),
    ({"table": {"rows": "clr", "columns": "clr"}}, "table rows and columns are both clr; pick two axes of the grid"),
    ({"name": ["a"]}, "name ['a'] is not a directory name (results/sweeps/<name>); give one, e.g. s"),
])
def test_a_wrongly_shaped_eval_table_or_name_is_one_line_naming_the_key(tmp_path, capsys, change, message):
    from engine.protocols import PROTOCOLS

    spec = {"name": "s", "base": BASE, "grid": {"clr": ["simclr"], "lr": [0.1]}, "eval": ["knn"], **change}
    code, path, line = _sweep(tmp_path, capsys, spec)
    assert (code, line) == (2, f"error: {path}: " + message.replace("{p}", ", ".join(PROTOCOLS)))


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must be a mapping, not a list"),
    ("clr: [simclr\n", "is not valid yaml (while parsing a flow sequence)"),
    (None, "not found"),
])
def test_a_preset_that_is_not_a_mapping_is_one_line(tmp_path, capsys, text, message):
    preset = tmp_path / "preset.yaml"
    if text is not None:
        preset.write_text(text)
    spec = {"name": "s", "config": str(preset), "base": BASE, "grid": {"clr": ["simclr"]}, "eval": ["knn"]}
    code, path, line = _sweep(tmp_path, capsys, spec)
    assert (code, line) == (2, f"error: {path}: config {preset} {message}")
    code, path, line = _sweep(tmp_path, capsys, {**spec, "config": 5})
    assert (code, line) == (2, f"error: {path}: config must be the path of a preset yaml (e.g. "
                               "configs/quickstart.yaml), not 5")


def test_bad_set_values_fail_before_any_cell_starts(tmp_path, capsys):
    spec = {"name": "s", "base": BASE, "grid": {"clr": ["simclr", "byol"]}, "eval": ["knn"]}
    code, path, line = _sweep(tmp_path, capsys, spec, "--set", "epochs=[1,2]")
    assert (code, line) == (2, "error: --set epochs=[1, 2] is a list, but --epochs takes one value; sweep several "
                               "values as a grid axis")
    code, path, line = _sweep(tmp_path, capsys, spec, "--set", "final_eval=knn")
    assert (code, line) == (2, "error: --set: final_eval is not a setting of a sweep cell; list the evaluations under "
                               "eval")
    code, path, line = _sweep(tmp_path, capsys, spec, "--set", "lr=abc")
    assert code == 2 and line.startswith(f"error: {path}: cell clr-simclr: ") and "lr" in line and "'abc'" in line
    assert "the same command again" not in line


def test_every_cell_is_checked_and_bad_grid_values_name_their_cell(tmp_path, capsys):
    spec = {"name": "s", "base": BASE, "grid": {"clr": ["simclr"], "lr": [0.1, 0.2, -1.0]}, "eval": ["knn"]}
    code, path, line = _sweep(tmp_path, capsys, spec)  # only the last cell is wrong
    assert (code, line) == (2, f"error: {path}: cell clr-simclr__lr--1.0: --lr must not be negative, got -1.0")
    code, path, line = _sweep(tmp_path, capsys, {**spec, "grid": {"clr": ["simclr"], "lr": [0.1, "x"]}})
    assert code == 2 and line.startswith(f"error: {path}: cell clr-simclr__lr-x: ") and "'x'" in line
    code, path, line = _sweep(tmp_path, capsys, {**spec, "grid": [{"clr": ["simclr"]}, {"clr": ["simclr"],
                                                                                         "accu_iter": [2, 16]}]})
    assert (code, line) == (2, f"error: {path}: cell clr-simclr__accu_iter-16: --accu_iter 16 leaves micro-batches "
                               "of 1 image(s) (a contrastive loss needs negatives, BN two samples); lower --accu_iter")


def test_values_of_the_wrong_type_for_their_flag_fail_before_any_cell_starts(tmp_path, capsys):
    """Relies on main.py's type check of --config values (a float, a boolean or null for an integer flag)."""
    spec = {"name": "s", "base": BASE, "grid": {"clr": ["simclr"], "epochs": [1.5]}, "eval": ["knn"]}
    for grid, cell in [({"epochs": [1.5]}, "epochs-1.5"), ({"epochs": [True]}, "epochs-True"),
                       ({"batch_size": [None]}, "batch_size-None")]:
        code, path, line = _sweep(tmp_path, capsys, {**spec, "grid": grid})
        key = next(iter(grid))
        assert code == 2 and line.startswith(f"error: {path}: cell {cell}: {key}: "), line
