"""A checkpoint you load is the one you saved; one run per directory; bad input ends in one line."""
import hashlib
import json
import math
import os
import re
import stat

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from engine.checkpoint import all_checkpoints
from engine.knn import knn_scores
from main import main
from tests.conftest import TINY


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished 2-epoch run, copied by the tests that change it."""
    run = tmp_path_factory.mktemp("rel") / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=2", f"--log_dir={run}"]) == 0
    return run


def _copy(run, to):
    import shutil

    shutil.copytree(run, to)
    return to


def _snapshot(root):
    """Every file's hash but the lock's (it names the last process that held the run)."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files if f != ".lock"}


def test_a_corrupt_checkpoint_is_named_and_latest_falls_back_to_the_one_before(two_epochs, tmp_path, capsys):
    run = _copy(two_epochs, tmp_path / "run")
    path = run / "checkpoint_0002.pth.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)  # 4 KiB overwritten inside the file
    path.write_bytes(bytes(data))
    before = _snapshot(run)
    assert main([f"--log_dir={run}", "--train_from=checkpoint_0002.pth.tar", "--epochs=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint {path} is corrupt: its content does not match the checksum in {path}.sha256; "
                   "resume from an earlier checkpoint"]
    assert _snapshot(run) == before
    assert main(["--train_mode=eval", "--transfer_mode=knn", f"--checkpoint_dir={run}", "--no-tsne",
                 "--workers=0", "--device=cpu"]) == 2
    assert "is corrupt" in capsys.readouterr().err
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 0  # resumes from epoch 1
    err = capsys.readouterr().err
    assert err.count("warning: checkpoint_0002.pth.tar is unusable (checkpoint") == 1
    assert "moved to checkpoint_0002.pth.tar.corrupt, trying the one before" in err
    assert (run / "checkpoint_0002.pth.tar.corrupt").exists()  # kept for a look, no longer a checkpoint
    assert torch.load(run / "checkpoint_0003.pth.tar", weights_only=True)["epoch"] == 3


def test_files_that_are_not_checkpoints_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(torch.zeros(3), run / "tensor.pth.tar")
    torch.save({"epoch": 1}, run / "dict.pth.tar")
    (run / "text.pth.tar").write_text("clr: simclr\n")
    for name, message in [("tensor.pth.tar", "is not a checkpoint of this tool"),
                          ("dict.pth.tar", "is not a checkpoint of this tool"),
                          ("text.pth.tar", "cannot load checkpoint")]:
        assert main([f"--log_dir={run}", f"--train_from={name}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "weights_only=False" not in err, err


def test_checkpoints_get_the_run_files_mode_and_stale_temp_files_go(two_epochs, tmp_path):
    run = _copy(two_epochs, tmp_path / "run")
    assert stat.S_IMODE(os.stat(run / "checkpoint_0002.pth.tar").st_mode) == 0o666 & ~_umask()
    (run / ".tmp_abc123.pth.tar").write_bytes(b"half a checkpoint")
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 0
    assert not (run / ".tmp_abc123.pth.tar").exists()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_process_on_a_run_directory_is_refused(two_epochs, tmp_path, capsys):
    import subprocess
    import sys

    run = _copy(two_epochs, tmp_path / "run")
    (run / ".lock").write_text("pid 4242 on node-7")  # as a live run leaves it
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(run)
    try:
        assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert capsys.readouterr().err.strip() == (f"error: {run} is in use by pid 4242 on node-7; wait for that run to "
                                               "end or choose another --log_dir")
    assert _snapshot(run) == before


def test_nothing_to_do_writes_nothing(two_epochs, tmp_path, capsys):
    run = _copy(two_epochs, tmp_path / "run")
    before = _snapshot(run)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=1"]) == 0
    assert "nothing to do: the run has completed 2 of 1 epochs" in capsys.readouterr().out
    assert _snapshot(run) == before


def test_non_finite_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    from models.methods.contrastive import ContrastiveMethod

    def poison(self, step, total):
        if step == total:  # after the last step, whose loss was finite
            with torch.no_grad():
                self.projector[0].weight[0, 0] = float("nan")

    monkeypatch.setattr(ContrastiveMethod, "after_step", poison)
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--log_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith("error: weights are not finite after epoch 1, step 2; nothing was saved")
    assert all_checkpoints(str(tmp_path / "run")) == {}


@pytest.mark.parametrize("limit, caught_by", [("2", "the next step's check"), ("1", "the save")])
def test_a_runaway_update_stops_the_run_before_anything_is_saved(tmp_path, capsys, limit, caught_by):
    """--lr 1e30 leaves a finite loss (normalised embeddings hide the weights' scale), so only the growth of
    the weights' norm stops it: at the next step's check, or at the save when the update was the last."""
    for lr, what in [("1e12", r"grew the weights' norm \d\.\d+e\+\d\d-fold \(more than 10-fold is a runaway\)"),
                     ("1e30", r"grew the weights' norm past the float32 range \(a runaway\)")]:
        run = tmp_path / f"run{lr}"
        assert main(TINY + ["--clr=simclr", "--epochs=1", f"--lr={lr}", "--learning_rate_scaling=none",
                            f"--limit_train_batches={limit}", f"--log_dir={run}"]) == 2, caught_by
        err = capsys.readouterr().err
        assert re.fullmatch(f"error: the update of step 1 of the run {what}; nothing was saved: lower --lr or "
                            r"use --precision fp32, then rerun\n", err), err
        assert not run.exists()  # nothing saved, and the run directory taken back


@pytest.mark.parametrize("args, message", [
    (["--train_from="], "--train_from is empty (an unset shell variable?)"),
    (["--lr=-0.1"], "--lr must not be negative, got -0.1"),
    (["--weight_decay=-1e-4"], "--weight_decay must not be negative"),
    (["--knn_temperature=0"], "--knn_temperature must be positive, got 0.0"),
    (["--seed=-1"], "--seed must be in [0, 2**32), got -1"),
    (["--byol_base_momentum=1.5", "--clr=byol"], "--byol_base_momentum must be in [0, 1], got 1.5"),
    (["--epoch=3"], "unrecognized arguments: --epoch=3"),  # no abbreviations: --epoch is not --epochs
    (["--save_every_n_steps=-1"], "--save_every_n_steps must not be negative"),
])
def test_silent_mistakes_are_one_line_errors(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(TINY + [f"--results_dir={tmp_path / 'r'}"] + args)  # argparse's errors too: no SystemExit
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == []  # nothing created


def test_knn_small_temperatures_do_not_overflow():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    for t in (0.005, 0.001):
        scores = knn_scores(train, labels, test, 5, k=20, temperature=t)
        assert torch.isfinite(scores).all()
        # reference: each class's log-sum-exp of sim/T over the 20 neighbours, in float64
        sim, idx = (F.normalize(test.double(), dim=1) @ F.normalize(train.double(), dim=1).T).topk(20, dim=1)
        lse = torch.stack([torch.logsumexp(torch.where(labels[idx] == c, sim / t, -math.inf), dim=1)
                           for c in range(5)], dim=1)
        assert torch.equal(scores.argmax(1), lse.argmax(1))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    from models.methods.contrastive import ContrastiveMethod

    def broken(self, views, index):
        raise UserError("simulated failure in the first step")

    monkeypatch.setattr(ContrastiveMethod, "forward", broken)
    results = tmp_path / "results"
    results.mkdir()
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--results_dir={results}"]) == 2
    assert os.listdir(results) == []  # neither the run directory nor the parents it made
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--log_dir={existing}"]) == 2
    assert os.listdir(existing) == ["notes.txt"]


def test_a_failed_evaluation_leaves_no_eval_files(two_epochs, tmp_path, capsys, monkeypatch):
    import engine.evaluate as evaluate

    run = _copy(two_epochs, tmp_path / "run")

    def broken(*args, **kwargs):
        raise UserError("simulated failure in the probe")

    monkeypatch.setattr(evaluate, "fit_linear_on_features", broken)
    monkeypatch.setitem(evaluate.PROTOCOLS, "linear_eval", evaluate.linear_protocol)
    assert main(["--train_mode=eval", "--transfer_mode=linear_eval", f"--checkpoint_dir={run}", "--no-tsne",
                 "--workers=0", "--device=cpu", "--fc_epochs=1"]) == 2
    assert not (run / "eval").exists()


def test_a_run_directory_with_another_runs_records_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 5.0}\n')
    before = _snapshot(run)
    assert main(TINY + ["--epochs=1", f"--log_dir={run}"]) == 2
    assert "holds another run's metrics.jsonl but no checkpoint to continue" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_checkpoint_of_another_kind_of_run_is_refused(two_epochs, tmp_path, capsys):
    run = _copy(two_epochs, tmp_path / "run")
    other = tmp_path / "other"
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--arch=resnet34", f"--log_dir={other}"]) == 0
    before = _snapshot(run)
    assert main([f"--log_dir={run}", f"--train_from={other / 'checkpoint_0001.pth.tar'}", "--epochs=3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {other / 'checkpoint_0001.pth.tar'} comes from another kind of run (--arch=resnet34) than {run} "
        "(--arch=resnet18); resume a run from its own checkpoints or start a new one")
    assert _snapshot(run) == before


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_checkpoint_that_cannot_be_written_leaves_the_run_as_it_was(wrapped, two_epochs, tmp_path, capsys,
                                                                      monkeypatch):
    import engine.checkpoint as ckpt

    run = _copy(two_epochs, tmp_path / "run")
    before = _snapshot(run)

    def disk_full(obj, f):
        f.write(b"partial")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            if wrapped:  # what torch.save makes of a real ENOSPC: a RuntimeError, the OSError as its context
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
            raise

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not write checkpoint {run / 'checkpoint_0003.pth.tar'} "
                                               "(No space left on device); it needs about ")
    assert _snapshot(run) == before  # no record of epoch 3, no new events file, config.yaml as it was
    assert [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("text, message", [("clr: !!python/object/apply:os.system ['true']\n", "is not valid yaml"),
                                           ("- just\n- a list\n", "must be a mapping")])
def test_unsafe_or_malformed_yaml_is_one_line(text, message, tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text(text)
    assert main([f"--config={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_log_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(TINY + ["--epochs=1", f"--log_dir={target}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the run directory" in err and target.read_text() == "x"


# ----------------------------------------------------------------------------- the table of bad invocations
def _bad_invocations(run, tmp):
    """(argv, what the one line must say). ``run`` is a finished 2-epoch run, ``tmp`` a scratch folder."""
    tiny = TINY + [f"--results_dir={tmp / 'results'}"]
    ev = ["--train_mode=eval", "--device=cpu", "--workers=0", "--no-tsne"]
    return [
        (["--clr=moco"], "invalid choice: 'moco'"),
        (tiny + ["--dataset_name=cifar10", "--data=/nonexistent/ds"], "cifar10 not found in /nonexistent/ds"),
        (tiny + ["--dataset_name=folder", "--data=/nonexistent/ds"], "no image folder at /nonexistent/ds/train"),
        (tiny + ["--dataset_name=folder", "--data=/nonexistent/ds", "--download"], "--download is not available"),
        (tiny + ["--batch_size=1"], "--batch_size must be at least 2"),
        (tiny + ["--batch_size=4096"], "larger than the dataset (1437 images)"),
        (["--faster_version=maybe"], "expected a boolean"),
        (["--train_from=checkpoint_0001.pth.tar"], "--train_from needs --log_dir"),
        (["--train_from="], "--train_from is empty"),
        (tiny + ["--lr=-1"], "--lr must not be negative"),
        (tiny + ["--weight_decay=-1"], "--weight_decay must not be negative"),
        (tiny + ["--momentum=-0.9"], "--momentum must not be negative"),
        (tiny + ["--fc_lr=-1"], "--fc_lr must not be negative"),
        (tiny + ["--temperature=0"], "--temperature must be positive"),
        (tiny + ["--knn_temperature=-0.1"], "--knn_temperature must be positive"),
        (tiny + ["--seed=-1"], "--seed must be in [0, 2**32)"),
        (tiny + ["--seed=4294967296"], "--seed must be in [0, 2**32)"),
        (tiny + ["--epoch=3"], "unrecognized arguments: --epoch=3"),
        (tiny + ["--epochs=0"], "--epochs must be at least 1"),
        (tiny + ["--clr=simclr", "--n_views=1"], "--n_views must be at least 2 for simclr"),
        (tiny + ["--min_crop_scale=0"], "--min_crop_scale must be in (0, 1]"),
        (tiny + ["--min_crop_scale=1.5"], "--min_crop_scale must be in (0, 1]"),
        (tiny + ["--clr=insdis", "--insdis_num_negatives=0"], "--insdis_num_negatives must be at least 1"),
        (tiny + ["--clr=insdis", "--insdis_bank_momentum=2"], "--insdis_bank_momentum must be in [0, 1]"),
        (tiny + ["--clr=byol", "--byol_base_momentum=1.5"], "--byol_base_momentum must be in [0, 1]"),
        (tiny + ["--semi_ratio=1.5"], "--semi_ratio must be a fraction in (0, 1)"),
        (tiny + ["--fc_epochs=0"], "--fc_epochs must be at least 1"),
        (tiny + ["--knn_k=0"], "--knn_k must be at least 1"),
        (tiny + ["--workers=-1"], "must not be negative"),
        (tiny + ["--warmup_epochs=-1"], "must not be negative"),
        (tiny + ["--save_every_n_steps=-1"], "--save_every_n_steps must not be negative"),
        (tiny + ["--save_every_n_minutes=-5"], "--save_every_n_minutes must not be negative"),
        (tiny + ["--keep_mid_epoch_checkpoints=0"], "--keep_mid_epoch_checkpoints must be at least 1"),
        (tiny + ["--proj_out_dim=0"], "--proj_out_dim must be at least 1"),
        (tiny + ["--image_size=0"], "--image_size must be at least 1"),
        (tiny + ["--limit_train_batches=0"], "--limit_train_batches must be at least 1"),
        (tiny + ["--precision=fp16"], "--precision fp16 needs a CUDA device"),
        (["--config=/nonexistent/c.yaml"], "config file /nonexistent/c.yaml not found"),
        ([f"--config={tmp / 'unknown.yaml'}"], "unknown key(s) in"),
        ([f"--config={tmp / 'python.yaml'}"], "is not valid yaml"),
        (ev, "--train_mode=eval needs --checkpoint_dir"),
        (ev + ["--checkpoint_dir=/nonexistent/run"], "--checkpoint_dir /nonexistent/run does not exist"),
        (ev + [f"--checkpoint_dir={tmp / 'empty'}"], "no checkpoint_*.pth.tar in"),
        (ev + [f"--checkpoint_dir={run}", "--transfer_from_epoch=7"], "no checkpoint for epoch 7"),
        (ev + [f"--checkpoint_dir={run}", "--model=resnet50"], "was pretrained with --model resnet18, not resnet50"),
        ([f"--log_dir={run}", "--train_from=checkpoint_0007.pth.tar"], "checkpoint checkpoint_0007.pth.tar not found"),
        ([f"--log_dir={run}", "--train_from=latest", "--arch=resnet34"], "was trained with --arch=resnet18"),
        ([f"--log_dir={run}", f"--train_from={tmp / 'tensor.pth.tar'}"], "is not a checkpoint of this tool"),
        (["--log_dir=/nonexistent/run", "--train_from=latest"], "--log_dir /nonexistent/run does not exist"),
        (tiny + ["--epochs=1", f"--log_dir={run}"], "already holds checkpoints"),
        (tiny + ["--epochs=1", f"--log_dir={tmp / 'afile'}"], "cannot write the run directory"),
    ]


def test_forty_bad_invocations_each_end_in_one_line_and_change_nothing(two_epochs, tmp_path, capsys, monkeypatch):
    run = _copy(two_epochs, tmp_path / "run")
    (tmp_path / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "python.yaml").write_text("clr: !!python/object/apply:os.system ['true']\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a directory")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth.tar")
    monkeypatch.chdir(tmp_path)
    cases = _bad_invocations(run, tmp_path)
    assert len(cases) >= 40
    for argv, message in cases:
        before = _snapshot(tmp_path)
        code = main(argv)  # argparse's own errors are returned as well, not raised
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (argv, err)
        assert _snapshot(tmp_path) == before, argv


def _folder_with_a_bad_image(root, size=(8, 8)):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(8):
                Image.new("RGB", size, color=(i * 30, 0, 0) if c == "a" else (0, i * 30, 0)).save(
                    root / split / c / f"{i}.png")
    bad = root / "train" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return bad


@pytest.mark.parametrize("extra", [[], ["--faster_version"]])
def test_an_unreadable_image_is_named_or_skipped(extra, tmp_path, capsys):
    bad = _folder_with_a_bad_image(tmp_path / "data")
    args = [a for a in TINY if not a.startswith(("--dataset_name", "--image_size", "--batch_size", "--limit"))] + [
        "--dataset_name=folder", f"--data={tmp_path / 'data'}", "--batch_size=4", "--epochs=1", "--clr=simclr",
        f"--results_dir={tmp_path / 'results'}"] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read image {bad} (") and "--skip_bad_images" in err[0]
    assert not (tmp_path / "results").exists() or not any(files for _, _, files in os.walk(tmp_path / "results"))
    assert main(args + ["--skip_bad_images", f"--log_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(bad) in err
    assert main(["--train_mode=eval", "--transfer_mode=knn", f"--checkpoint_dir={tmp_path / 'run'}", "--no-tsne",
                 "--workers=0", "--device=cpu", "--skip_bad_images"]) == 0


def test_an_error_from_a_dataloader_worker_keeps_its_one_line():
    from torch._utils import ExceptionWrapper

    from common.errors import BadImage, worker_message

    try:
        raise BadImage("cannot read image x/3.png (image file is truncated); replace or remove it")
    except BadImage:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(BadImage) as caught:
        wrapped.reraise()
    assert "Original Traceback" in str(caught.value)  # what torch makes of it
    assert worker_message(str(caught.value)) == "cannot read image x/3.png (image file is truncated); replace or " \
                                                "remove it"


def test_latest_is_checked_again_once_the_run_directory_is_locked(two_epochs, tmp_path, capsys, monkeypatch):
    import shutil

    import main as cli

    run = _copy(two_epochs, tmp_path / "run")
    real = cli.load_latest

    def then_another_process_saves(run_dir, verify=True):  # between choosing the checkpoint and taking the lock
        chosen = real(run_dir, verify)
        shutil.copy(run / "checkpoint_0002.pth.tar", run / "checkpoint_0003.pth.tar")
        return chosen

    monkeypatch.setattr(cli, "load_latest", then_another_process_saves)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=4"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run / 'checkpoint_0003.pth.tar'} appeared after this run chose checkpoint_0002.pth.tar (did another "
        "process write to the run?); resume again with --train_from latest")


# ----------------------------------------------------------------------------- retention and background writes
def test_epoch_end_pruning_keeps_the_newest_and_the_milestones_and_nothing_after_the_current(tmp_path):
    from engine.checkpoint import list_checkpoints, prune_epoch_ends

    for epoch in range(1, 13):
        (tmp_path / f"checkpoint_{epoch:04d}.pth.tar").write_bytes(b"x")
        (tmp_path / f"checkpoint_{epoch:04d}.pth.tar.sha256").write_text("x\n")
    prune_epoch_ends(str(tmp_path), keep=3, milestone_every=4, current=10)
    assert sorted(list_checkpoints(str(tmp_path))) == [4, 8, 9, 10, 11, 12]  # 11, 12: another line, after 10
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [f"checkpoint_{e:04d}.pth.tar.sha256"
                                                                   for e in (4, 8, 9, 10, 11, 12)]
    prune_epoch_ends(str(tmp_path), keep=0, milestone_every=0, current=12)  # 0: keep every one
    assert sorted(list_checkpoints(str(tmp_path))) == [4, 8, 9, 10, 11, 12]
    prune_epoch_ends(str(tmp_path), keep=1, milestone_every=0, current=12)
    assert sorted(list_checkpoints(str(tmp_path))) == [12]


def test_retention_keeps_exactly_what_it_says_across_a_resume(tmp_path):
    run = tmp_path / "run"
    keep = ["--keep_checkpoints=1", "--milestone_every_n_epochs=2"]
    assert main(TINY + ["--clr=simclr", "--epochs=5", "--stop_after_epoch=3", f"--log_dir={run}"] + keep) == 0
    assert sorted(all_checkpoints(str(run))) == [(2, 0), (3, 0)]  # 1 pruned; 2 a milestone, 3 the newest
    assert main([f"--log_dir={run}", "--train_from=latest"]) == 0  # the retention settings come from the run
    assert sorted(all_checkpoints(str(run))) == [(2, 0), (4, 0), (5, 0)]  # 3 pruned, 4 a milestone
    assert sorted(f for f in os.listdir(run) if f.endswith(".sha256")) == [
        f"checkpoint_{e:04d}.pth.tar.sha256" for e in (2, 4, 5)]


def test_a_failed_background_write_stops_the_run_on_the_next_step_with_one_line(tmp_path, monkeypatch, capsys):
    import engine.checkpoint as ckpt
    import engine.pretrain as pre

    real_save, steps = ckpt.torch.save, []

    def full_at_epoch_one(obj, f):
        if obj["epoch"] == 1:
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    real_step = pre.Trainer.train_step
    monkeypatch.setattr(pre.Trainer, "train_step", lambda self, *a, **k: steps.append(self.step) or real_step(
        self, *a, **k))
    monkeypatch.setattr(ckpt.torch, "save", full_at_epoch_one)
    run = tmp_path / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=3", f"--log_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not write checkpoint {run / 'checkpoint_0001.pth.tar'} "
                                               "(No space left on device); it needs about ")
    assert steps == [0, 1, 2]  # epoch 1's two steps, then the first step of epoch 2 finds the failure and stops
    assert not os.path.exists(run)  # nothing was saved, so the run gives its directory back


def test_a_checkpoint_is_mapped_not_read_and_its_tensors_never_write_back(two_epochs, tmp_path, monkeypatch):
    import engine.checkpoint as ckpt

    run = _copy(two_epochs, tmp_path / "run")
    path = str(run / "checkpoint_0002.pth.tar")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    verified = ckpt.load_checkpoint(path)
    monkeypatch.setattr(ckpt, "_sha256", lambda p: pytest.fail("verify=False must not read the file for a checksum"))
    state = ckpt.load_checkpoint(path, verify=False)
    for key, value in state["model"].items():
        assert torch.equal(value, verified["model"][key])
        if value.is_floating_point():
            value.add_(1.0)  # copy-on-write: a resumed optimizer's in-place updates stay in memory
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest


def test_a_run_from_before_retention_keeps_every_checkpoint_when_resumed(two_epochs, tmp_path):
    import engine.checkpoint as ckpt

    run = _copy(two_epochs, tmp_path / "run")
    for epoch in (1, 2):  # as this tool wrote them before --keep_checkpoints existed
        path = str(run / f"checkpoint_{epoch:04d}.pth.tar")
        state = torch.load(path, weights_only=True)
        del state["args"]["keep_checkpoints"], state["args"]["milestone_every_n_epochs"]
        ckpt.atomic_save(state, path)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=5"]) == 0
    assert sorted(all_checkpoints(str(run))) == [(e, 0) for e in range(1, 6)]  # the default would keep 3, 4, 5
