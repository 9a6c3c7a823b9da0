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
