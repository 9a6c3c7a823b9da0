"""Seed 001 (UnsupervisedLearningCodes): its three command lines run through main.py as written, with the
script name replaced by ``main.py --clr=...``, cifar100 swapped for the bundled digits and tiny limits added."""
import os

import pytest
import torch

from engine.checkpoint import list_checkpoints
from main import main, resolve
from tests.conftest import ROOT

# The seed's lines (../shared/seeds/001_*.txt), quotes as there.
SEED_001 = [
    ("run.py", "insdis", "--data './data/' --cudaenv '0,1,2,3' --gpus '0,1,2,3' --exp 'your_exp_path' --dataset "
                         "cifar100 --batch_size 128 --lr 0.03 --network resnet18_cifar --t 0.30 --loss insd"),
    ("simclr.py", "simclr", "--data './data/' --cudaenv '0,1,2,3' --gpus '0,1,2,3' --exp 'your_exp_path' "
                            "--dataset 'cifar100' --batch_size 1024 --lr 0.3 --network 'resnet18_cifar' --blur "
                            "--mlpbn 1 --t 0.50"),
    ("byol.py", "byol", "--data './data/' --cudaenv '0,1,2,3' --gpus '0,1,2,3' --exp 'your_exp_path' --dataset "
                        "cifar100 --batch_size 512 --lr 0.12 --network resnet18_cifar"),
]
TINY_LIMITS = ["--epochs=1", "--limit_train_batches=1", "--image_size=16", "--width_multiplier=0.25", "--workers=0",
               "--device=cpu", "--save_every_n_epochs=1", "--proj_hidden_dim=64", "--pred_hidden_dim=64"]


def _argv(line: str, exp: str) -> list[str]:
    import shlex

    argv = shlex.split(line.replace("your_exp_path", exp))
    return [a if a != "cifar100" else "digits" for a in argv]


def test_the_lines_are_the_seeds():
    seeds = os.path.join(ROOT, "..", "shared", "seeds")
    if not os.path.isdir(seeds):
        pytest.skip("../shared/seeds is not beside this checkout")
    (text,) = [open(os.path.join(seeds, f)).read() for f in os.listdir(seeds) if f.startswith("001_")]
    for script, _, line in SEED_001:
        assert f"python {script} {line}" in text


@pytest.mark.parametrize("script, clr, line", SEED_001, ids=[s for s, _, _ in SEED_001])
def test_seed_001_commands_run_end_to_end(script, clr, line, tmp_path, capsys):
    exp = str(tmp_path / "exp")
    assert main([f"--clr={clr}"] + _argv(line, exp) + TINY_LIMITS) == 0
    assert sorted(list_checkpoints(exp)) == [1]
    args = torch.load(os.path.join(exp, "checkpoint_0001.pth.tar"), weights_only=True)["args"]
    assert (args["arch"], args["cifar_stem"], args["dataset_name"]) == ("resnet18", True, "digits")
    expected = {"insdis": {"temperature": 0.3, "insdis_loss": "softmax"}, "simclr": {"temperature": 0.5,
                "proj_bn": True, "blur": True}, "byol": {"batch_size": 512, "lr": 0.12}}[clr]
    assert {k: args[k] for k in expected} == expected
    assert "note: --cudaenv/--gpus are accepted" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--network=resnet18_cifar", "--arch=resnet50"], "--network resnet18_cifar means --arch=resnet18, not resnet50"),
    (["--network=resnet18", "--cifar_stem"], "--network resnet18 means --cifar_stem=False, not True"),
    (["--mlpbn=0", "--proj_bn"], "--mlpbn 0 contradicts --proj_bn=True"),
    (["--loss=insd", "--clr=simclr"], "--loss insd is InsDis's loss, not simclr's; pass --clr insdis"),
])
def test_contradicting_seed_spellings_are_one_line(argv, message):
    from common.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve(argv)


@pytest.mark.parametrize("preset, index, extra", [("insdis", 0, []), ("simclr", 1, []), ("byol", 2, []),
                                                  ("byol_aug", 2, ["--blur"])])
def test_the_ulc_presets_hold_what_the_seeds_command_lines_set(preset, index, extra):
    """configs/ulc_cifar100_*.yaml against the seed's line read through main.py (its lr taken as the rate)."""
    import shlex

    _, clr, line = SEED_001[index]
    cfg, _, _ = resolve([f"--config={os.path.join(ROOT, 'configs', f'ulc_cifar100_{preset}.yaml')}"])
    seed, _, _ = resolve([f"--clr={clr}", "--learning_rate_scaling=none"] + shlex.split(line) + extra)
    for key in ("clr", "arch", "cifar_stem", "batch_size", "lr", "learning_rate_scaling", "temperature",
                "insdis_loss", "proj_bn", "blur"):
        if key == "temperature" and clr == "byol":
            continue  # not BYOL's
        mine, theirs = getattr(cfg, key), getattr(seed, key)
        if key == "blur":  # unset means off at 32 px (default_blur)
            mine, theirs = bool(mine), bool(theirs)
        assert mine == theirs, key
    assert cfg.dataset_name == seed.dataset_name == "cifar100"


# Seed 002 (MetaContrastive): its README's lines, `python train.py --config configs/<x>.yaml` replaced as the
# README of this tool says; ImageNet swapped for digits and tiny limits appended (later flags win).
SEED_002_TRAIN = [
    "--dist_address '127.0.0.1:1672' --n_supp 1 --n_query 1 --multiplier 2 --arch ResNet50 --seed 1234 --run_id "
    "000001 --head contrastive --accu_iter 1 --batch_size 256 --lr 2.4 --iters 1000800 --eval_freq 100080 "
    "--save_freq 12510 --temperature 10.",
    "--dist_address '127.0.0.1:1672' --n_supp 1 --n_query 1 --multiplier 2 --arch ResNet50 --seed 1234 --run_id "
    "000001 --head R2D2 --accu_iter 1 --batch_size 256 --lr 2.4 --iters 1000800 --eval_freq 100080 --save_freq "
    "12510 --temperature 0.1",
]
SEED_002_EVAL = [
    ("imagenet_eval", "--encoder_ckpt logs/exman-configs/imagenet_train_epochs100_bs512.yaml/runs/000001/"
                      "checkpoint-1000800.pth.tar --run_id 000001"),
    ("imagenet_semi_eval", "--train_size 1 --encoder_ckpt logs/exman-configs/imagenet_train_epochs100_bs512.yaml/"
                           "runs/000005/checkpoint-1000800.pth.tar --eval_freq 100 --log_freq 100 --run_id 000001 "
                           "--iters 3000 --lr 0.05"),
    ("imagenet_semi_eval", "--encoder_ckpt logs/exman-configs/imagenet_train_epochs100_bs512.yaml/runs/000001/"
                           "checkpoint-1000800.pth.tar --eval_freq 100 --log_freq 100 --run_id 000001 --iters 60000 "
                           "--train_size 10 --lr 0.1"),
]
TINY_002 = ["--dataset_name=digits", "--image_size=16", "--width_multiplier=0.25", "--workers=0", "--device=cpu",
            "--batch_size=32", "--limit_train_batches=1", "--proj_hidden_dim=64", "--no-tsne", "--final_eval="]


def test_the_seed_002_lines_are_the_seeds():
    seeds = os.path.join(ROOT, "..", "shared", "seeds")
    if not os.path.isdir(seeds):
        pytest.skip("../shared/seeds is not beside this checkout")
    (text,) = [open(os.path.join(seeds, f)).read() for f in os.listdir(seeds) if f.startswith("002_")]
    for line in SEED_002_TRAIN:
        assert f"python train.py --config configs/imagenet_train_epochs100_bs512.yaml {line}" in text
    for config, line in SEED_002_EVAL:
        assert f"python train.py --config configs/{config}.yaml {line}" in text


def test_seed_002_commands_run_end_to_end(tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)
    argv = ["--dataset_name=imagenet"] + shlex.split(SEED_002_TRAIN[1]) + TINY_002 + ["--iters=2"]
    cfg, _, _ = resolve(argv)
    assert (cfg.arch, cfg.head, cfg.n_views, cfg.iters, cfg.eval_every_n_steps, cfg.save_every_n_steps) == (
        "resnet50", "R2D2", 2, 2, 100080, 12510)
    assert main(argv) == 0
    run = tmp_path / "results" / "digits" / "32_FlatCLR" / "000001"  # the tool's default --clr
    assert sorted(list_checkpoints(str(run))) == [2]  # --iters 2 at one step an epoch: two epochs
    err = capsys.readouterr().err
    assert "note: --dist_address is accepted for seed 002's commands and not used" in err
    first = ["--dataset_name=imagenet"] + shlex.split(SEED_002_TRAIN[0]) + TINY_002 + ["--iters=1", "--run_id=2"]
    assert main(first) == 0
    assert "its --temperature 10 is 0.1 here" in capsys.readouterr().err
    ckpt = str(run / "checkpoint_0002.pth.tar")
    for config, line in SEED_002_EVAL:
        mode = "linear_eval" if config == "imagenet_eval" else "finetune"
        words = [ckpt if w.endswith("checkpoint-1000800.pth.tar") else w for w in shlex.split(line)]
        words = [w for w in words if w not in ("3000", "60000")]  # --iters's values: two steps here
        words = [w if w != "--iters" else "--iters=2" for w in words]
        assert main(["--train_mode=eval", f"--transfer_mode={mode}", "--workers=0", "--device=cpu", "--no-tsne",
                     "--fc_batch_size=64"] + words) == 0, line
        out = capsys.readouterr()
        assert "note: --run_id names pretraining runs" in out.err
        if mode == "finetune":
            ratio = 0.01 if "--train_size 1 " in line else 0.1
            import json
            record = json.load(open(run / "eval" / f"finetune_semi{ratio}_epoch0002.json"))
            assert record["fc_lr"] == (0.05 if ratio == 0.01 else 0.1)


@pytest.mark.parametrize("argv, message", [
    (["--train_mode=eval", "--train_size=50", "--semi_ratio=0.1", "--checkpoint_dir=none"],
     "--train_size 50 means --semi_ratio 0.5, not 0.1; pass one of them"),
    (["--train_mode=eval", "--train_size=100", "--checkpoint_dir=none"],
     "--train_size is a percentage of the labels in (0, 100) (or -1: all), got 100"),
    (["--encoder_ckpt=x.pth.tar"], "--encoder_ckpt is the checkpoint an evaluation reads; pass --train_mode=eval"),
    (["--train_mode=eval", "--encoder_ckpt=nowhere/x.pth.tar"],
     "--encoder_ckpt nowhere/x.pth.tar is not an epoch-end checkpoint of a run of this tool"),
    (["--run_id=1", "--log_dir=elsewhere"], "--run_id and --log_dir both name the run directory; pass one of them"),
    (["--iters=5", "--epochs=3"], "--iters and --epochs both set the length of the run; pass one of them"),
    (["--train_mode=eval", "--lr=0.1", "--fc_lr=0.2", "--checkpoint_dir=none"],
     "in eval mode --lr is the classifier's rate (--fc_lr); --lr 0.1 and --fc_lr 0.2 disagree: pass one of them"),
])
def test_contradicting_seed_002_spellings_are_one_line(argv, message):
    from common.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(argv)


def test_a_runs_iters_is_not_an_evaluations_and_the_command_lines_epochs_win():
    preset = os.path.join(ROOT, "configs", "cifar10_protonet.yaml")
    cfg, _, _ = resolve([f"--config={preset}", "--epochs=1"])
    assert (cfg.iters, cfg.epochs) == (None, 1)
    cfg, _, _ = resolve([f"--config={preset}", "--train_mode=eval", "--checkpoint_dir=none"])
    assert cfg.iters is None and cfg.fc_iters is None  # the preset's 48,000 pretraining steps stay there
    cfg, _, _ = resolve(["--train_mode=eval", "--checkpoint_dir=none", "--iters=30"])
    assert cfg.fc_iters == 30


# Seed 004 (sthalles/SimCLR): its config.yaml in the repository's nested form (the seed's copy lost its indentation).
STHALLES_CONFIG = """batch_size: 512
epochs: 40
eval_every_n_epochs: 1
fine_tune_from: 'resnet-18_80-epochs'
log_every_n_steps: 50
weight_decay: 10e-6
fp16_precision: False
model:
  out_dim: 256
  base_model: "resnet18"
dataset:
  s: 1
  input_shape: (96,96,3)
  num_workers: 0
  valid_size: 0.05
loss:
  temperature: 0.5
  use_cosine_similarity: True
"""


def test_the_sthalles_config_runs_as_written_then_logistic_and_pca(tmp_path, monkeypatch, capsys):
    import json

    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(STHALLES_CONFIG)
    cfg, _, _ = resolve(["--config=config.yaml"])
    assert (cfg.clr, cfg.arch, cfg.proj_out_dim, cfg.color_jitter_strength, cfg.image_size, cfg.workers) == (
        "simclr", "resnet18", 256, 1, 96, 0)
    assert (cfg.weight_decay, cfg.temperature, cfg.similarity, cfg.valid_size, cfg.valid_every_n_epochs,
            cfg.precision, cfg.from_pretrained) == (1e-5, 0.5, "cosine", 0.05, 1, "fp32", None)
    assert "fine_tune_from 'resnet-18_80-epochs' names no run or checkpoint here; training from scratch" in \
        capsys.readouterr().err
    run = tmp_path / "run"
    tiny = ["--dataset_name=digits", "--image_size=16", "--batch_size=32", "--epochs=1", "--limit_train_batches=2",
            "--width_multiplier=0.25", "--device=cpu", "--no-tsne"]
    assert main(["--config=config.yaml", *tiny, f"--log_dir={run}", "--final_eval=logistic"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: held-out contrastive top-1" in out
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["valid_top1"] <= record["valid_top5"] <= 100 and record["valid_loss"] > 0
    logistic = json.loads((run / "eval" / "logistic_epoch0001.json").read_text())
    assert logistic["mode"] == "logistic" and 10 < logistic["top1"] <= 100 and logistic["n_iter"] >= 1
    for mode in ("logistic", "knn"):  # the table's "PCA Features" rows
        assert main(["--train_mode=eval", "--checkpoint_dir=pca", "--dataset_name=digits", "--image_size=16",
                     f"--transfer_mode={mode}", "--device=cpu", "--workers=0", "--no-tsne",
                     f"--results_dir={tmp_path / 'results'}"]) == 0
    records = sorted((tmp_path / "results" / "digits").glob("0_pca-256/*/eval/*_epoch0000.json"))
    assert sorted(json.loads(p.read_text())["mode"] for p in records) == ["knn", "logistic"]
    assert all(json.loads(p.read_text())["arch"] == "pca-256" and json.loads(p.read_text())["top1"] > 50
               for p in records)
    (tmp_path / "extra.yaml").write_text(STHALLES_CONFIG + "  dropout: 0.1\n")  # a key with no meaning here
    resolve(["--config=extra.yaml"])
    assert "loss.dropout mean nothing here and are ignored" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["similarity"] == "cosine"


def test_dot_product_similarity_is_the_raw_dot_product():
    from losses import contrastive_logits

    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = contrastive_logits(z, 2, 0.5, cosine=False)
    assert torch.allclose(logits.pos[:, 0], (z[:4] * z[4:]).sum(1).repeat(2) / 0.5)
    assert not torch.allclose(contrastive_logits(z, 2, 0.5).pos, logits.pos)
