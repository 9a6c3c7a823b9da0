"""End-to-end pretraining through main.py on digits: checkpoints, resume, run directories."""
import hashlib
import json
import os

import pytest
import torch
import yaml

from engine.checkpoint import list_checkpoints
from main import main, resolve
from models import METHODS
from tests.conftest import SHARED_DATA, TINY


def run_dirs(results):
    return sorted(os.path.join(dp) for dp, _, files in os.walk(results) if "config.yaml" in files)


def final_state(run_dir, epoch):
    return torch.load(os.path.join(run_dir, f"checkpoint_{epoch:04d}.pth.tar"), weights_only=True)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """``two_epochs(clr)``: the run directory of a two-epoch tiny run of that method (kNN monitor at epoch 2), made
    once per module and shared by the generic test and the methods' own checks."""
    runs = {}

    def run(clr):
        if clr not in runs:
            results = tmp_path_factory.mktemp(f"two_epochs_{clr}") / "results"
            assert main(TINY + [f"--results_dir={results}", f"--clr={clr}", "--epochs=2",
                                "--eval_every_n_epochs=2"]) == 0
            (runs[clr],) = run_dirs(results)
        return runs[clr]

    return run


@pytest.mark.parametrize("clr", list(METHODS))
def test_two_epochs_write_checkpoints_in_the_flatclr_layout(clr, two_epochs):
    run = two_epochs(clr)
    assert os.path.basename(os.path.dirname(run)) == f"16_{METHODS[clr].display}"
    assert sorted(os.listdir(run)) == sorted(
        [".lock", "checkpoint_0001.pth.tar", "checkpoint_0001.pth.tar.sha256", "checkpoint_0002.pth.tar",
         "checkpoint_0002.pth.tar.sha256", "config.yaml", "curves.png", "metrics.jsonl"]
        + [f for f in os.listdir(run) if f.startswith("events.out.tfevents")])
    ckpt = final_state(run, 2)  # loads with weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4 and ckpt["clr"] == clr
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "args"}
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert any(k.startswith("backbone.") for k in ckpt["model"])
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["images_per_s"] > 0 for r in records)
    assert "knn_top1" not in records[0] and 0 <= records[1]["knn_top1"] <= 100  # --eval_every_n_epochs 2


def test_byols_target_ends_its_momentum_ramp_in_the_checkpoint(two_epochs):
    ckpt = final_state(two_epochs("byol"), 2)
    assert ckpt["model"]["target.momentum"].item() == pytest.approx(1.0)  # cosine ramp reached 1 at the end
    assert any(k.startswith("target.backbone.") for k in ckpt["model"])


def test_insdis_keeps_its_bank_and_normaliser_in_the_checkpoint(two_epochs):
    ckpt = final_state(two_epochs("insdis"), 2)
    assert ckpt["model"]["bank"].shape == (1437, 32) and torch.isfinite(ckpt["model"]["log_z"])


@pytest.mark.parametrize("clr", ["simclr", "flatclr"])
def test_simclr_and_flatclr_log_infonce_as_their_loss(clr, two_epochs):
    records = [json.loads(line) for line in open(os.path.join(two_epochs(clr), "metrics.jsonl"))]
    assert all(r["infonce"] == pytest.approx(r["loss"]) for r in records)  # FlatCLR logs InfoNCE


def _to_pre_plugin_layout(path):
    """Rename BYOL's target keys back to the layout before the reusable momentum target existed."""
    state = torch.load(path, weights_only=True)
    renamed = {}
    for key, value in state["model"].items():
        if key == "target.momentum":
            key = "momentum"
        key = key.replace("target.backbone.", "target_backbone.").replace("target.projector.", "target_projector.")
        renamed[key] = value
    assert "momentum" in renamed and any(k.startswith("target_backbone.") for k in renamed)
    state["model"] = renamed
    torch.save(state, path)
    os.remove(str(path) + ".sha256")  # that code wrote no checksum


LEGACY_LAYOUTS = {"byol": _to_pre_plugin_layout}


# BYOL's resume starts from its checkpoint rewritten as the code before the method plugins wrote it (commit
# ff24f9a, ``legacy``): an old checkpoint of a method whose state was renamed since still resumes bitwise.
@pytest.mark.parametrize("clr, extra, legacy", [
    (clr, [], LEGACY_LAYOUTS.get(clr)) if clr != "flatclr" else pytest.param(clr, [], None, marks=pytest.mark.slow)
    for clr in METHODS if clr != "simclr"] + [("simclr", ["--faster_version", "--channels_last"], None)])
def test_resumed_run_ends_with_the_same_weights_bitwise(clr, extra, legacy, tmp_path):
    common = TINY + [f"--clr={clr}", "--epochs=3"] + extra
    assert main(common + [f"--log_dir={tmp_path / 'straight'}"]) == 0
    assert main(common + [f"--log_dir={tmp_path / 'cut'}", "--stop_after_epoch=1"]) == 0
    assert sorted(list_checkpoints(str(tmp_path / "cut"))) == [1]
    if legacy is not None:
        legacy(tmp_path / "cut" / "checkpoint_0001.pth.tar")
    # resume the way FlatCLR's README does: run directory + checkpoint file name, nothing else
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=checkpoint_0001.pth.tar"]) == 0
    a, b = final_state(tmp_path / "straight", 3), final_state(tmp_path / "cut", 3)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert epochs == [1, 2, 3]


def test_flatclr_readme_commands_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = "results/imagenet/512_FlatCLR/01-06-2021-21-52-10"  # the path in FlatCLR's README
    args = TINY + ["--limit_train_batches=1", "--epochs=27", "--save_every_n_epochs=13", "--stop_after_epoch=26"]
    assert main(args + [f"--log_dir={run}"]) == 0
    assert sorted(list_checkpoints(run)) == [13, 26]
    assert main("--clr=flatclr --log_dir=results/imagenet/512_FlatCLR/01-06-2021-21-52-10 "
                "--train_from=checkpoint_0026.pth.tar".split()) == 0
    assert sorted(list_checkpoints(run)) == [13, 26, 27]
    assert main([f"--log_dir={run}", "--train_from=latest"]) == 0  # already complete: nothing to do
    # The README's evaluation commands: accepted as written, stopped only by the absent ImageNet ...
    for mode in ("linear_eval", "finetune"):
        cmd = f"--dataset_name=imagenet --train_mode=eval --transfer_mode={mode} --checkpoint_dir={run}".split()
        assert main(cmd) == 2
        assert capsys.readouterr().err.startswith("error: no image folder at ./datasets/imagenet/train;")
        # ... and run with the run's own data in its place
        fast = ["--fc_epochs=1", "--fc_batch_size=512", "--workers=0", "--no-tsne", "--device=cpu"]
        assert main([c.replace("imagenet", "digits") if c.startswith("--dataset") else c for c in cmd] + fast) == 0
    assert sorted(os.listdir(os.path.join(run, "eval"))) == [
        "finetune_epoch0027.json", "linear_eval_epoch0027.json", "tensorboard"]


def test_bad_resume_leaves_the_run_untouched(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny + ["--epochs=1", f"--log_dir={run}"]) == 0

    def snapshot():
        return {f: hashlib.sha256(open(run / f, "rb").read()).hexdigest() for f in sorted(os.listdir(run))}

    before = snapshot()
    capsys.readouterr()
    assert main([f"--log_dir={run}", "--train_from=checkpoint_0007.pth.tar"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: checkpoint checkpoint_0007.pth.tar not found in {run} (available: "
                           "checkpoint_0001.pth.tar); pass one of those to --train_from, or 'latest'")
    assert main([f"--log_dir={run}", "--train_from=latest", "--arch=resnet34"]) == 2
    assert "was trained with --arch=resnet18, not resnet34" in capsys.readouterr().err
    assert main(tiny + ["--epochs=1", f"--log_dir={run}"]) == 2  # would overwrite: refused
    assert "already holds checkpoints" in capsys.readouterr().err
    assert snapshot() == before


def test_a_short_run_with_the_default_warmup_reaches_the_peak_lr(tiny, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [a for a in tiny if not a.startswith("--warmup_epochs")]  # the default: 10 epochs of warmup
    run = tmp_path / "run"
    assert main(args + ["--clr=simclr", "--epochs=2", f"--log_dir={run}", "--stop_after_epoch=1"]) == 0
    assert main([f"--log_dir={run}", "--train_from=latest"]) == 0
    out = capsys.readouterr().out
    peak = 0.3 * 16 / 256
    assert out.count("note: --warmup_epochs 10 (20 steps) is as long as the run (4 steps)") == 1
    assert f"schedule: peak lr {peak:.6g}, 1 warmup step(s) of 4 (2 per epoch), then cosine" in out
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert abs(max(r["lr_max"] for r in records) - peak) < 1e-9
    events = EventAccumulator(str(run)).Reload()
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lr[1] == pytest.approx(peak, rel=1e-6)  # the logged lr of step 1, the end of the warmup
    ckpt = final_state(run, 2)
    assert ckpt["scheduler"]["warmup_steps"] == 1 and ckpt["scheduler"]["requested_warmup_steps"] == 20
    config = yaml.safe_load(open(run / "config.yaml"))
    assert config["schedule"]["warmup_steps"] == 1
    again, _, _ = resolve([f"--config={run / 'config.yaml'}"])  # the record does not stop --config
    assert (again.warmup_epochs, again.epochs, again.train_from) == (10, 2, None)


def test_non_finite_loss_stops_before_the_step(tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(tiny + ["--epochs=1", f"--log_dir={run}"]) == 0
    before = open(run / "checkpoint_0001.pth.tar", "rb").read()
    from engine.trainer import Trainer

    stepped = []
    monkeypatch.setattr(Trainer, "_judge_update", lambda self: stepped.append(self.step))
    from models.methods.contrastive import ContrastiveMethod

    real = ContrastiveMethod.forward

    def nan_loss(self, views, index):
        loss, logs, outputs = real(self, views, index)
        return loss * float("nan"), logs, outputs

    monkeypatch.setattr(ContrastiveMethod, "forward", nan_loss)
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=2"]) == 2
    assert "loss is not finite at epoch 2, step 1 on 1 rank(s); nothing was stepped" in capsys.readouterr().err
    assert stepped == []  # no optimizer step was taken
    assert open(run / "checkpoint_0001.pth.tar", "rb").read() == before
    assert sorted(list_checkpoints(str(run))) == [1]


def test_faster_version_refuses_datasets_that_do_not_fit(tmp_path, capsys):
    from PIL import Image

    for i, size in enumerate([(8, 8), (8, 8), (9, 8)]):
        os.makedirs(tmp_path / "imagenet" / "train" / "a", exist_ok=True)
        Image.new("RGB", size).save(tmp_path / "imagenet" / "train" / "a" / f"{i}.png")
    base = TINY[1:] + ["--batch_size=2", f"--results_dir={tmp_path / 'r'}", "--faster_version=True"]
    assert main(base + ["--dataset_name=imagenet", f"--data={tmp_path}"]) == 2
    assert "--faster_version keeps the dataset in memory, which imagenet does not fit" in capsys.readouterr().err
    os.rename(tmp_path / "imagenet", tmp_path / "folder")
    assert main(base + ["--dataset_name=folder", f"--data={tmp_path / 'folder'}"]) == 2
    assert "--faster_version needs images of one size" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not beside this checkout")
def test_folder_dataset_on_real_cifar10_images(tmp_path):
    args = [a for a in TINY if not a.startswith(("--dataset_name", "--image_size"))]
    assert main(args + ["--dataset_name=folder", f"--data={SHARED_DATA}", "--epochs=1", "--clr=simclr",
                        f"--log_dir={tmp_path / 'run'}"]) == 0
    ckpt = final_state(tmp_path / "run", 1)
    assert ckpt["args"]["dataset_name"] == "folder" and ckpt["model"]["backbone.conv1.weight"].shape[-1] == 3


@pytest.mark.slow  # 22 s; seed 002's commands run --iters in the default suite
def test_iters_cuts_the_last_epoch_and_its_resume_is_bitwise(tmp_path, capsys):
    """--iters 5 at two steps an epoch: three epochs, the last of one step, the schedule ending at step 5; the
    kNN monitor runs every --eval_freq steps; a resume from the first epoch ends where the straight run does."""
    common = TINY + ["--clr=simclr", "--iters=5", "--warmup_epochs=0", "--scheduler=cosine"]
    assert main(common + [f"--log_dir={tmp_path / 'straight'}", "--eval_freq=3"]) == 0
    out = capsys.readouterr().out
    assert out.count("step 3: kNN top-1") == 1 and "step 6" not in out
    records = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 4), (3, 5)]
    saved = yaml.safe_load(open(tmp_path / "straight" / "config.yaml"))
    assert (saved["epochs"], saved["iters"]) == (3, 5)
    state = torch.load(tmp_path / "straight" / "checkpoint_0003.pth.tar", weights_only=False)
    assert state["scheduler"]["total_steps"] == 5 and state["global_step"] == 5
    assert main(common + [f"--log_dir={tmp_path / 'cut'}", "--stop_after_epoch=1"]) == 0
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest"]) == 0
    a, b = final_state(tmp_path / "straight", 3), final_state(tmp_path / "cut", 3)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    capsys.readouterr()
    assert main([f"--log_dir={tmp_path / 'straight'}", "--train_from=latest", "--iters=7"]) == 2  # epoch 3 was cut
    assert "a cut epoch cannot be continued" in capsys.readouterr().err
    whole = [c for c in common if not c.startswith("--iters")] + ["--iters=4", f"--log_dir={tmp_path / 'more'}"]
    assert main(whole) == 0  # two whole epochs: a larger --iters continues them
    assert main([f"--log_dir={tmp_path / 'more'}", "--train_from=latest", "--iters=6"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "more" / "metrics.jsonl")]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 4), (3, 6)]
