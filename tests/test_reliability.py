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


def _assert_refused(argv, message, root, capsys):
    """``main(argv)`` ends with exit 2 and one line holding ``message``, no traceback, and ``root`` unchanged
    (files and directories). argparse's own errors are returned as well, not raised."""
    before = _snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, (argv, err)
    assert _snapshot(root) == before, argv


def _copy(run, to):
    import shutil

    shutil.copytree(run, to)
    return to


def _fingerprint(path):
    """A small file's hash; a large one's size, inode and modification time (every write of this tool to a large
    file replaces it or appends to it, which changes those): the tables snapshot checkpoints many times."""
    st = os.stat(path)
    if st.st_size > 1 << 20:
        return (st.st_size, st.st_ino, st.st_mtime_ns)
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _snapshot(root):
    """Every file's fingerprint but the lock's (it names the last process that held the run), and every directory
    (a refused run must not leave an empty one behind)."""
    files = {os.path.relpath(os.path.join(d, f), root): _fingerprint(os.path.join(d, f))
             for d, _, names in os.walk(root) for f in names if f != ".lock"}
    return {**files, **{os.path.relpath(os.path.join(d, s), root) + "/": "dir" for d, subs, _ in os.walk(root)
                        for s in subs}}


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

    def poison(self, step, total, outputs):
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
    import engine.protocols as evaluate

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
        (ev + [f"--checkpoint_dir={run}", "--model=resnet50"], "was pretrained with --arch resnet18, not resnet50"),
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
        _assert_refused(argv, message, tmp_path, capsys)


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

    import cli.resolve as cli

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
    import engine.trainer as pre

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
    import models.checkpoint_file as ckpt_file

    run = _copy(two_epochs, tmp_path / "run")
    path = str(run / "checkpoint_0002.pth.tar")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    verified = ckpt.load_checkpoint(path)
    monkeypatch.setattr(ckpt_file, "sha256", lambda p: pytest.fail("verify=False must not read the file for a checksum"))
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


# ----------------------------------------------------------------------------- third round: typed files, every load
@pytest.fixture(scope="module")
def resnet34_run(tmp_path_factory):
    """A finished 1-epoch resnet34 run: a checkpoint of another architecture, with its own valid sidecar."""
    run = tmp_path_factory.mktemp("rel34") / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--arch=resnet34", f"--log_dir={run}"]) == 0
    return run


def _sidecar(path):
    """Writes ``path``'s checksum beside it, as this tool does: a file that passes the checksum."""
    from models.checkpoint_file import sha256

    open(f"{path}.sha256", "w").write(f"{sha256(path)}  {os.path.basename(path)}\n")


class _Payload:
    """A pickle whose loading would create the file ``MARK``: it must never run."""
    MARK = ""

    def __reduce__(self):
        return (open, (self.MARK, "w"))


def _malicious(path, mark, sidecar=True):
    _Payload.MARK = str(mark)
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "epoch": 1, "args": {"clr": "simclr"},
                "extra": _Payload()}, path)
    if sidecar:
        _sidecar(path)


def test_a_checkpoint_of_another_architecture_inside_the_run_is_refused_and_nothing_changes(
        two_epochs, resnet34_run, tmp_path, capsys):
    """The data-loss case: a resnet34 checkpoint with a valid sidecar as the newest file of a resnet18 run."""
    import shutil

    run = _copy(two_epochs, tmp_path / "run")
    for name in ("checkpoint_0003.pth.tar", "checkpoint_0002_step000001.pth.tar"):
        shutil.copy(resnet34_run / "checkpoint_0001.pth.tar", run / name)
        _sidecar(run / name)
        before = _snapshot(run)
        for train_from in ("latest", name):
            assert main([f"--log_dir={run}", f"--train_from={train_from}", "--epochs=5"]) == 2
            err = capsys.readouterr().err
            assert err == (f"error: {run / name} is not a checkpoint of this run: it was trained with --arch=resnet34, "
                           f"the run with --arch=resnet18 (its config.yaml); move that file out of {run}, then "
                           "resume\n"), err
            assert _snapshot(run) == before  # config.yaml, the other checkpoints, metrics.jsonl: untouched
        os.remove(run / name)
        os.remove(run / f"{name}.sha256")
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 0  # once it is gone, the run goes on


def test_a_malicious_pickle_never_runs_through_any_entry_point(two_epochs, tmp_path, capsys, monkeypatch):
    from models.pretrained import load_pretrained

    from tests.conftest import ROOT

    mark = tmp_path / "PAYLOAD_RAN"
    run = _copy(two_epochs, tmp_path / "run")
    evil_run = tmp_path / "evil_run"
    evil_run.mkdir()
    _malicious(evil_run / "checkpoint_0001.pth.tar", mark)
    _malicious(run / "checkpoint_0003.pth.tar", mark)
    export = tmp_path / "export" / "resnet18_simclr_ep1.pth"
    export.parent.mkdir()
    _malicious(export, mark)
    export.with_suffix(".json").write_text(json.dumps({"arch": "resnet18", "cifar_stem": True}))
    ev = ["--train_mode=eval", "--device=cpu", "--workers=0", "--no-tsne"]
    clis = [
        [f"--log_dir={run}", "--train_from=checkpoint_0003.pth.tar", "--epochs=4"],
        TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={evil_run}", f"--log_dir={tmp_path / 'w'}"],
        TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={export}", f"--log_dir={tmp_path / 'w'}"],
        ev + [f"--checkpoint_dir={evil_run}", "--transfer_mode=knn", "--dataset_name=digits", "--arch=resnet18"],
        ["--train_mode=export", f"--checkpoint_dir={evil_run}", "--dataset_name=digits"],
    ]
    for argv in clis:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "objects other than tensors" in err and "weights_only=False" not in err, err
    for path in (evil_run, evil_run / "checkpoint_0001.pth.tar", export):
        with pytest.raises(UserError, match="objects other than tensors") as caught:
            load_pretrained(str(path))
        assert "weights_only=False" not in str(caught.value)
        with pytest.raises(UserError, match="objects other than tensors"):
            torch.hub.load(ROOT, "backbone", source="local", path=str(path))
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 0  # moved aside, falls back to 2
    assert "checkpoint_0003.pth.tar is unusable" in capsys.readouterr().err
    assert not mark.exists()


def test_every_load_checks_the_checksum(two_epochs, tmp_path, capsys):
    """One flipped bit with the old sidecar: warm start, evaluation, export, load_pretrained, the hub and the
    projector all refuse it (before, all but resume and evaluation trained on or returned the weights)."""
    from models.pretrained import load_pretrained, load_projector

    from tests.conftest import ROOT

    run = _copy(two_epochs, tmp_path / "run")
    path = run / "checkpoint_0002.pth.tar"
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    first = next(v for k, v in state["model"].items() if k.endswith("bn1.running_var") and v.numel() >= 64)
    offset = data.find(first.numpy().tobytes()[:64])
    assert offset > 0 and data.find(first.numpy().tobytes()[:64], offset + 1) == -1
    data[offset + 3] ^= 0x80  # the sign bit of one weight
    path.write_bytes(bytes(data))
    corrupt = f"checkpoint {path} is corrupt: its content does not match the checksum"
    for argv in (TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={run}", f"--log_dir={tmp_path / 'w'}"],
                 TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={path}", f"--log_dir={tmp_path / 'w'}"],
                 ["--train_mode=eval", f"--checkpoint_dir={run}", "--transfer_mode=knn", "--device=cpu",
                  "--workers=0", "--no-tsne"],
                 ["--train_mode=export", f"--checkpoint_dir={run}"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and corrupt in err, err
        assert not (tmp_path / "w").exists() and not (run / "export").exists() and not (run / "eval").exists()
    for load in (load_pretrained, load_projector,
                 lambda p: torch.hub.load(ROOT, "backbone", source="local", path=p)):
        for target in (run, path):
            with pytest.raises(UserError, match="is corrupt"):
                load(str(target))


def test_run_paths_with_glob_characters_are_taken_literally(two_epochs, tmp_path, capsys):
    from models.pretrained import load_pretrained

    from tests.conftest import ROOT

    exp1 = _copy(two_epochs, tmp_path / "exp1")  # what 'exp[12]' matches as a pattern
    empty = tmp_path / "exp[12]"
    empty.mkdir()
    literal = _copy(two_epochs, tmp_path / "run[1]")
    with pytest.raises(UserError, match=re.escape(f"no checkpoint_NNNN.pth.tar in {empty}")):
        load_pretrained(str(empty))
    with pytest.raises(UserError, match="no checkpoint_NNNN.pth.tar in"):
        torch.hub.load(ROOT, "backbone", source="local", path=str(empty))
    backbone, meta = load_pretrained(str(literal))
    assert meta["source"] == str(literal / "checkpoint_0002.pth.tar") and meta["epoch"] == 2
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={empty}", f"--log_dir={tmp_path / 'w'}"]) == 2
    assert "no checkpoint_NNNN.pth.tar in" in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={literal}", "--no-tsne",
                        f"--log_dir={tmp_path / 'w2'}"]) == 0
    assert f"warm start: backbone from {literal / 'checkpoint_0002.pth.tar'}" in capsys.readouterr().out
    assert exp1.exists()


def _configs(tmp):
    """(file name, yaml text) of bad config files; each must be refused with the line that follows it."""
    return [
        ("list_int.yaml", "epochs: [1, 2]\n", "epochs: is a list ([1, 2]) but takes one value"),
        ("null_int.yaml", "epochs: null\n", "epochs: is null but needs a value"),
        ("float_int.yaml", "epochs: 2.5\n", "epochs: expected an integer, got 2.5"),
        ("bool_int.yaml", "epochs: true\n", "epochs: expected an integer, got True"),
        ("word_int.yaml", "batch_size: many\n", "batch_size: expected an integer, got 'many'"),
        ("inf_float.yaml", "lr: .inf\n", "lr: expected a finite number, got 'inf'"),
        ("nan_float.yaml", "temperature: .nan\n", "temperature: expected a finite number, got 'nan'"),
        ("word_float.yaml", "lr: fast\n", "lr: expected a number, got 'fast'"),
        ("bool_float.yaml", "weight_decay: false\n", "weight_decay: expected a number, got False"),
        ("nan_string.yaml", "momentum: nan\n", "momentum: expected a finite number, got 'nan'"),
        ("bad_bool.yaml", "faster_version: maybe\n", "faster_version: expected a boolean"),
        ("int_bool.yaml", "faster_version: 2\n", "faster_version: expected true or false, got 2"),
        ("list_bool.yaml", "blur: [true]\n", "blur: is a list ([True]) but takes one value"),
        ("int_choice.yaml", "clr: 5\n", "clr: '5' is not one of"),
        ("bad_choice.yaml", "optimizer: adam\n", "optimizer: 'adam' is not one of lars, sgd, adamw"),
        ("map_str.yaml", "data: {root: x}\n", "data: is a mapping ({'root': 'x'}) but takes one value"),
        ("null_choice.yaml", "dataset_name: null\n", "dataset_name: is null but needs a value"),
        ("list_arch.yaml", "arch: [resnet18]\n", "arch: is a list (['resnet18']) but takes one value"),
        ("bool_str.yaml", "clr: yes\n", "clr: expected a word, got True"),
        ("protocols.yaml", "final_eval: knn,bogus\n", "final_eval: unknown protocol bogus"),
        ("protocols_list.yaml", "final_eval: [knn, 3]\n", "final_eval: is a list (['knn', 3]) but takes one value"),
        ("nested_config.yaml", "config: other.yaml\nepochs: 3\n", "a config file cannot name another (config: "
                                                                  "other.yaml)"),
        ("method_flag.yaml", "clr: byol\nbyol_base_momentum: .inf\n", "byol_base_momentum: expected a finite number"),
        ("range.yaml", "color_jitter_strength: 3\n", "--color_jitter_strength must be in [0, 2.5]"),
        ("sthalles_shape.yaml", "model: {out_dim: 8}\ndataset: {input_shape: '(16,32,3)'}\n",
         "dataset.input_shape '(16,32,3)' is not a square image shape"),
        ("sthalles_bool.yaml", "loss: {use_cosine_similarity: perhaps}\n",
         "loss.use_cosine_similarity: expected true or false, got 'perhaps'"),
        ("sthalles_fp16.yaml", "model: {out_dim: 8}\nfp16_precision: [no]\n",
         "fp16_precision: expected true or false, got [False]"),
        ("sthalles_list.yaml", "model: {out_dim: [8]}\n", "proj_out_dim: is a list ([8]) but takes one value"),
        ("date.yaml", "seed: 2020-01-01\n", "seed: is a yaml date (datetime.date(2020, 1, 1)), not a value --seed "
                                            "takes"),
        ("date_float.yaml", "lr: 2020-01-01\n", "lr: is a yaml date"),
        ("binary.yaml", "temperature: !!binary aGVsbG8=\n", "temperature: is a yaml bytes"),
        ("huge_int.yaml", f"lr: {10 ** 400}\n", "lr: expected a finite number, got an integer too large for one"),
    ]


def _more_bad_invocations(run, tmp):
    """Third round: non-finite and out-of-range numbers, contradictions, misleading messages, checkpoints that are
    not this run's or not this tool's."""
    tiny = TINY + [f"--results_dir={tmp / 'results'}"]
    ev = ["--train_mode=eval", "--device=cpu", "--workers=0", "--no-tsne"]
    return [
        (tiny + ["--lr=nan"], "argument --lr: expected a finite number, got 'nan'"),
        (tiny + ["--lr=inf"], "argument --lr: expected a finite number, got 'inf'"),
        (tiny + ["--lr=-inf"], "argument --lr: expected a finite number, got '-inf'"),
        (tiny + ["--temperature=nan"], "argument --temperature: expected a finite number"),
        (tiny + ["--weight_decay=1e400"], "argument --weight_decay: expected a finite number"),
        (tiny + ["--clr=byol", "--byol_base_momentum=nan"], "argument --byol_base_momentum: expected a finite number"),
        (tiny + ["--min_crop_scale=nan"], "argument --min_crop_scale: expected a finite number"),
        (tiny + ["--lr=fast"], "argument --lr: expected a number, got 'fast'"),
        (tiny + ["--color_jitter_strength=-1"], "--color_jitter_strength must be in [0, 2.5]"),
        (tiny + ["--color_jitter_strength=3"], "--color_jitter_strength must be in [0, 2.5]"),
        (tiny + ["--color_jitter_strength=3", "--faster_version"], "--color_jitter_strength must be in [0, 2.5]"),
        (tiny + ["--valid_size=0.995"], "--valid_size 0.995 leaves 7 of 1437 images for pretraining, fewer than "
                                        "--batch_size 16"),
        ([f"--log_dir={run}", "--train_from=latest", f"--from_pretrained={run}"],
         "--train_from resumes a run with its own weights and --from_pretrained starts a new run"),
        (ev + [f"--checkpoint_dir={run / 'checkpoint_0002.pth.tar'}"], "is a file; pass its run directory"),
        ([f"--config={tmp}"], f"--config {tmp} is a directory; pass a yaml file"),
        (ev + [f"--checkpoint_dir={run}", "--transfer_mode=knn", "--fc_augment"],
         "--fc_augment trains a linear classifier on augmented images; it means nothing to --transfer_mode knn"),
        (ev + ["--checkpoint_dir=pca", "--transfer_mode=finetune", "--dataset_name=digits"],
         "--checkpoint_dir pca is a fixed projection of the pixels; evaluate it with linear_eval, knn or logistic"),
        (["--train_mode=export", "--checkpoint_dir=pca"], "export needs --checkpoint_dir RUN_DIR (a pretraining run), not pca"),
        ([f"--log_dir={run}", f"--train_from={tmp / 'argsless.pth.tar'}"], "is not a checkpoint of this tool (it "
                                                                           "lacks args.clr, args.arch"),
        ([f"--log_dir={run}", f"--train_from={tmp / 'no_epoch.pth.tar'}"], "is not a checkpoint of this tool (it "
                                                                           "lacks epoch)"),
        (ev + [f"--checkpoint_dir={tmp / 'argsless'}", "--transfer_mode=knn"], "is not a checkpoint of this tool"),
        ([f"--log_dir={run}", f"--train_from={tmp / 'evil.pth.tar'}"], "holds objects other than tensors"),
        ([f"--log_dir={run}", f"--train_from={tmp / 'other34' / 'checkpoint_0001.pth.tar'}"],
         "comes from another kind of run (--arch=resnet34)"),
        ([f"--log_dir={tmp / 'badconfig'}", "--train_from=latest"], "config.yaml must be a mapping of settings, not a list"),
    ] + [([f"--config={tmp / name}"] + tiny, message) for name, _, message in _configs(tmp)]


def test_the_third_round_of_bad_inputs_each_end_in_one_line_and_change_nothing(two_epochs, resnet34_run, tmp_path,
                                                                               capsys, monkeypatch):
    import shutil

    run = _copy(two_epochs, tmp_path / "run")
    _copy(resnet34_run, tmp_path / "other34")
    for name, text, _ in _configs(tmp_path):
        (tmp_path / name).write_text(text)
    state = torch.load(run / "checkpoint_0002.pth.tar", weights_only=True)
    torch.save({"model": state["model"], "epoch": 2}, tmp_path / "argsless.pth.tar")  # a foreign dict, sidecar and all
    _sidecar(tmp_path / "argsless.pth.tar")
    (tmp_path / "argsless").mkdir()
    shutil.copy(tmp_path / "argsless.pth.tar", tmp_path / "argsless" / "checkpoint_0002.pth.tar")
    _sidecar(tmp_path / "argsless" / "checkpoint_0002.pth.tar")
    torch.save({"model": state["model"], "args": state["args"]}, tmp_path / "no_epoch.pth.tar")
    _malicious(tmp_path / "evil.pth.tar", tmp_path / "PAYLOAD_RAN")
    _copy(run, tmp_path / "badconfig")
    (tmp_path / "badconfig" / "config.yaml").write_text("- not\n- a mapping\n")
    monkeypatch.chdir(tmp_path)
    cases = _more_bad_invocations(run, tmp_path)
    assert len(cases) >= 50
    for argv, message in cases:
        _assert_refused(argv, message, tmp_path, capsys)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


@pytest.mark.parametrize("text, expected", [
    ("faster_version: 'False'\n", {"faster_version": False}),  # the command line's --faster_version=False
    ("faster_version: 'yes'\nblur: 0\n", {"faster_version": True, "blur": False}),
    ("epochs: '7'\nlr: 1e-2\nweight_decay: 10e-6\n", {"epochs": 7, "lr": 0.01, "weight_decay": 1e-5}),
    ("epochs: 3.0\nbatch_size: 1e2\n", {"epochs": 3, "batch_size": 100}),
    ("lr: null\nfinal_eval: [knn, logistic]\n", {"lr": 0.3, "final_eval": ["knn", "logistic"]}),
    ("config: null\nepochs: 3\n", {"epochs": 3}),  # a run's config.yaml of older versions records config: null
    ("arch: ResNet18\n", {"arch": "resnet18"}),
    ("model: {out_dim: 8}\ndataset: {input_shape: '(3,16,16)'}\nloss: {use_cosine_similarity: 'False'}\n"
     "fp16_precision: 'False'\n", {"image_size": 16, "similarity": "dot", "precision": "fp32", "proj_out_dim": 8}),
    ("model: {out_dim: 8}\ndataset: {input_shape: [32, 32, 3]}\nfp16_precision: false\n",
     {"image_size": 32, "precision": "fp32"}),
])
def test_yaml_values_are_read_as_the_command_line_reads_them(text, expected, tmp_path):
    from main import resolve

    (tmp_path / "c.yaml").write_text(text)
    cfg, _, _ = resolve([f"--config={tmp_path / 'c.yaml'}"])
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert "help_all" not in vars(cfg)  # not a setting: never written to a run's config.yaml
    assert all(type(getattr(cfg, key)) is type(value) for key, value in expected.items())


# ----------------------------------------------------------------------------- the table, other doors
def _bad_api_calls(run, tmp):
    """(what, call, the one line of the UserError it must raise): load_pretrained, load_projector, torch.hub."""
    from models.pretrained import load_pretrained, load_projector

    from tests.conftest import ROOT

    def hub(entry, path):
        return lambda: torch.hub.load(ROOT, entry, source="local", path=str(path))

    return [
        ("missing path", lambda: load_pretrained(str(tmp / "nowhere")), "does not exist"),
        ("empty run", lambda: load_pretrained(str(tmp / "empty")), "no checkpoint_NNNN.pth.tar in"),
        ("glob pattern", lambda: load_pretrained(str(tmp / "run[12]")), "no checkpoint_NNNN.pth.tar in"),
        ("a tensor", lambda: load_pretrained(str(tmp / "tensor.pth.tar")), "is not a checkpoint of this tool"),
        ("text", lambda: load_pretrained(str(tmp / "text.pth.tar")), "cannot load checkpoint"),
        ("no args", lambda: load_pretrained(str(tmp / "argsless.pth.tar")), "lacks args.clr, args.arch"),
        ("corrupt", lambda: load_pretrained(str(tmp / "corrupt" / "checkpoint_0002.pth.tar")), "is corrupt"),
        ("malicious", lambda: load_pretrained(str(tmp / "evil.pth.tar")), "objects other than tensors"),
        ("export json", lambda: load_pretrained(str(tmp / "export" / "badjson.pth")), "is not readable json"),
        ("export meta", lambda: load_pretrained(str(tmp / "export" / "nometa.pth")), "does not describe an export"),
        ("export data", lambda: load_pretrained(str(tmp / "export" / "list.pth")), "is not an export of this tool"),
        ("foreign arch", lambda: load_pretrained(str(tmp / "flatclr.pth.tar")), "a backbone this tool does not build"),
        ("projector of export", lambda: load_projector(str(tmp / "export" / "list.pth")),
         "is not a checkpoint of this tool"),
        ("projector, no run", lambda: load_projector(str(tmp / "empty")), "no checkpoint_NNNN.pth.tar in"),
        ("hub missing", hub("backbone", tmp / "nowhere"), "does not exist"),
        ("hub empty", hub("backbone", tmp / "empty"), "no checkpoint_NNNN.pth.tar in"),
        ("hub tensor", hub("backbone", tmp / "tensor.pth.tar"), "is not a checkpoint of this tool"),
        ("hub no args", hub("backbone_and_meta", tmp / "argsless.pth.tar"), "lacks args.clr"),
        ("hub corrupt", hub("backbone_and_meta", tmp / "corrupt"), "is corrupt"),
    ]


def _bad_sweeps():
    """(sweep spec changes, --set values, what the one line says): refused before any cell starts."""
    return [
        ({"grid": {"clr": ["simclr"], "lr": [0.1, float("nan")]}}, [], "lr: expected a finite number, got 'nan'"),
        ({"grid": {"clr": ["simclr"], "temperature": [float("inf")]}}, [], "temperature: expected a finite number"),
        ({}, ["--set", "lr=.nan"], "lr: expected a finite number, got 'nan'"),
        ({}, ["--set", "epochs=2.5"], "epochs: expected an integer, got 2.5"),
        ({"grid": {"clr": ["simclr"], "faster_version": ["perhaps"]}}, [], "faster_version: expected a boolean"),
        ({"grid": {"clr": ["simclr"], "color_jitter_strength": [1.0, 3.0]}}, [], "--color_jitter_strength must be "
                                                                                "in [0, 2.5]"),
    ]


def test_the_table_of_bad_calls_sweeps_and_folders_each_end_in_one_line_or_one_exception(two_epochs, tmp_path,
                                                                                         capsys, monkeypatch):
    import shutil

    import yaml

    from experiments.sweep import main as sweep_main

    run = _copy(two_epochs, tmp_path / "run1")  # what the pattern run[12] would match
    (tmp_path / "run[12]").mkdir()
    (tmp_path / "empty").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor.pth.tar")
    (tmp_path / "text.pth.tar").write_text("clr: simclr\n")
    state = torch.load(run / "checkpoint_0002.pth.tar", weights_only=True)
    torch.save({"model": state["model"], "epoch": 2}, tmp_path / "argsless.pth.tar")
    _sidecar(tmp_path / "argsless.pth.tar")
    corrupt = _copy(two_epochs, tmp_path / "corrupt")
    data = bytearray((corrupt / "checkpoint_0002.pth.tar").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "checkpoint_0002.pth.tar").write_bytes(bytes(data))
    (corrupt / "checkpoint_0001.pth.tar").write_bytes(bytes(data))  # the run directory's newest epoch-end is 2
    _malicious(tmp_path / "evil.pth.tar", tmp_path / "PAYLOAD_RAN")
    export = tmp_path / "export"
    export.mkdir()
    weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    for name, json_text in (("badjson", "{not json"), ("nometa", "{}"), ("list", '{"arch": "resnet18", '
                                                                               '"cifar_stem": true}')):
        torch.save(weights if name != "list" else [1, 2], export / f"{name}.pth")
        _sidecar(export / f"{name}.pth")
        (export / f"{name}.json").write_text(json_text)
    torch.save({"model": "res999", "model_state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "flatclr.pth.tar")
    calls = _bad_api_calls(run, tmp_path)
    before = _snapshot(tmp_path)
    for what, call, message in calls:
        with pytest.raises(UserError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value), (what, str(caught.value))
        assert "weights_only=False" not in str(caught.value), what
    assert _snapshot(tmp_path) == before and not (tmp_path / "PAYLOAD_RAN").exists()

    base = {"dataset_name": "digits", "arch": "resnet18", "image_size": 16, "batch_size": 16, "epochs": 1,
            "limit_train_batches": 2, "workers": 0, "device": "cpu"}
    sweeps = _bad_sweeps()
    for change, sets, message in sweeps:
        spec = tmp_path / "sweep.yaml"
        spec.write_text(yaml.safe_dump({"name": "s", "base": base, "grid": {"clr": ["simclr"]}, "eval": ["knn"],
                                        **change}))
        before = _snapshot(tmp_path)
        assert sweep_main([str(spec), f"--out={tmp_path / 'out'}", *sets]) == 2, (change, sets)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "again" not in err, (change, sets, err)
        assert _snapshot(tmp_path) == before

    folders = tmp_path / "folders"
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(folders / split / c)
            for i in range(4):
                from PIL import Image

                Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folders / split / c / f"{i}.png")
    ev = ["--train_mode=eval", "--transfer_mode=knn", "--checkpoint_dir=none", "--dataset_name=folder",
          f"--data={folders}", "--arch=resnet18", "--device=cpu", "--workers=0", "--no-tsne",
          f"--results_dir={tmp_path / 'results'}"]
    os.symlink("..", folders / "train" / "a" / "loop")
    os.rename(folders / "test" / "b", folders / "test" / "B")
    monkeypatch.chdir(tmp_path)
    pretrain = TINY[1:] + ["--dataset_name=folder", f"--data={folders}", "--epochs=1", "--batch_size=4",
                           f"--results_dir={tmp_path / 'results'}"]
    cases = [(ev, "is a symbolic link back into"), (pretrain, "is a symbolic link back into")]
    for argv, message in cases:
        _assert_refused(argv, message, tmp_path, capsys)
    os.remove(folders / "train" / "a" / "loop")
    before = _snapshot(tmp_path)
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only in train: b; only in test: B" in err
    assert _snapshot(tmp_path) == before
    shutil.rmtree(folders)
    assert len(calls) + len(sweeps) + len(cases) + 1 >= 28


def test_a_failed_run_removes_only_the_directories_it_made_and_a_refused_resume_keeps_the_preempted_mark(
        two_epochs, tmp_path, capsys, monkeypatch):
    from models.methods.contrastive import ContrastiveMethod

    real = ContrastiveMethod.forward
    monkeypatch.setattr(ContrastiveMethod, "forward", lambda self, views, index: (_ for _ in ()).throw(
        UserError("simulated failure in the first step")))
    (tmp_path / "runs").mkdir()  # the user's, empty: a failed run inside it must not take it away
    monkeypatch.chdir(tmp_path)
    for log_dir in ("runs/exp1", "runs/a/b/exp2"):
        assert main(TINY + ["--clr=simclr", "--epochs=1", f"--log_dir={log_dir}"]) == 2
        assert sorted(os.listdir(tmp_path)) == ["runs"] and os.listdir(tmp_path / "runs") == []
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--results_dir=new/results"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # new/ and new/results/ were the run's: gone
    monkeypatch.setattr(ContrastiveMethod, "forward", real)
    run = _copy(two_epochs, tmp_path / "run")
    (run / ".preempted").write_text("stopped by SIGTERM\n")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("{half\n" + "\n".join(lines) + "\n")  # a broken line before the last
    before = _snapshot(run)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=3"]) == 2
    assert "metrics.jsonl line 1" in capsys.readouterr().err
    assert _snapshot(run) == before  # the requeue mark too
