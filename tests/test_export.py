"""Trained models that leave the tool: --train_mode=export, models.pretrained.load_pretrained, hubconf.py, and
--from_pretrained (a new run from another run's weights)."""
import json
import multiprocessing
import socket

import pytest
import torch
import torch.nn as nn
import torchvision

from engine.protocols import load_backbone
from main import main, resolve
from models.pretrained import load_pretrained
from tests.conftest import ROOT, TINY


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--width_multiplier=0.25", f"--log_dir={run}", "--no-tsne",
                        "--final_eval="]) == 0
    return run


def test_an_imagenet_stem_resnet50_export_loads_into_torchvision_strict(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--clr=byol", "--epochs=1", "--arch=ResNet50", "--no-cifar_stem", "--limit_train_batches=1",
                        f"--log_dir={run}", "--no-tsne", "--final_eval="]) == 0
    assert main(["--train_mode=export", f"--checkpoint_dir={run}"]) == 0
    (pth,) = (run / "export").glob("*.pth")
    assert pth.name == "resnet50_byol_ep1.pth"
    meta = json.loads(pth.with_suffix(".json").read_text())
    assert (meta["arch"], meta["cifar_stem"], meta["feat_dim"], meta["image_size"]) == ("resnet50", False, 2048, 16)
    assert meta["mean"] and meta["std"] and meta["torchvision"].startswith("torchvision.models.resnet50")
    weights = torch.load(pth, weights_only=True)
    assert not any(k.startswith("fc.") for k in weights)
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(weights, strict=True)
    inside, _ = load_backbone(str(run / "checkpoint_0001.pth.tar"), "resnet50", cifar_stem=False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(tv.eval()(x), inside.eval()(x), atol=1e-5)


def test_a_cifar_stem_export_reloads_through_the_api_and_hub(cifar_run):
    assert main(["--train_mode=export", f"--checkpoint_dir={cifar_run}"]) == 0
    (pth,) = (cifar_run / "export").glob("*.pth")
    meta = json.loads(pth.with_suffix(".json").read_text())
    assert meta["cifar_stem"] and "conv1: 3x3" in meta["differs_from_torchvision"][0]
    assert "every channel count x 0.25" in meta["differs_from_torchvision"][2]  # the width says why, too
    assert meta["torchvision"].startswith("does not load into torchvision as is; rebuild")
    inside, _ = load_backbone(str(cifar_run / "checkpoint_0001.pth.tar"), "resnet18", cifar_stem=True, width=0.25)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = inside.eval()(x)
    for path in (pth, cifar_run, cifar_run / "checkpoint_0001.pth.tar"):  # export, run directory, checkpoint
        backbone, meta = load_pretrained(str(path))
        assert meta["feat_dim"] == 128 and meta["width_multiplier"] == 0.25
        with torch.no_grad():
            assert torch.allclose(backbone(x), expected, atol=1e-6), path
    hub = torch.hub.load(ROOT, "backbone", source="local", path=str(pth))
    with torch.no_grad():
        assert torch.allclose(hub(x), expected, atol=1e-6)


def test_from_pretrained_starts_a_new_run_from_the_source_weights(cifar_run, tmp_path, capsys):
    from engine.pretrain import warm_start
    from models import build_method

    cfg, _, _ = resolve(TINY + ["--clr=byol", "--width_multiplier=0.25", f"--from_pretrained={cifar_run}"])
    torch.manual_seed(5)
    method = build_method(cfg, num_data=100, cifar_stem=True)
    warm_start(method, cfg.from_pretrained, False, cfg.arch)
    source, _ = load_pretrained(str(cifar_run))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the first step's features are the source's
        assert torch.allclose(method.backbone.eval()(x), source(x), atol=1e-6)
    run = tmp_path / "warm"
    assert main(TINY + ["--clr=byol", "--width_multiplier=0.25", "--epochs=1", f"--from_pretrained={cifar_run}",
                        f"--log_dir={run}", "--no-tsne", "--final_eval="]) == 0
    assert "warm start: backbone from" in capsys.readouterr().out
    assert (run / "checkpoint_0001.pth.tar").exists()


def test_from_pretrained_refuses_another_architecture_in_one_line(cifar_run, tmp_path, capsys):
    run = tmp_path / "wrong"
    assert main(TINY + ["--clr=simclr", "--arch=resnet34", "--width_multiplier=0.25", f"--from_pretrained={cifar_run}",
                        f"--log_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --from_pretrained {cifar_run} holds a resnet18 backbone") and "\n" not in err
    assert "pass the same --arch, --cifar_stem and --width_multiplier" in err and not run.exists()
    assert main(TINY + ["--from_pretrained_head", f"--log_dir={run}"]) == 2
    assert main(TINY + [f"--from_pretrained={tmp_path / 'nowhere'}", f"--log_dir={run}"]) == 2
    assert "does not exist" in capsys.readouterr().err and not run.exists()


def test_runs_and_evaluations_record_what_made_them(cifar_run):
    import subprocess

    import yaml

    saved = yaml.safe_load((cifar_run / "config.yaml").read_text())["provenance"]
    assert saved["command"].startswith("main.py --dataset_name=digits") and f"--log_dir={cifar_run}" in saved["command"]
    assert (saved["torch"], saved["world_size"]) == (str(torch.__version__), 1) and saved["device"].startswith("cpu")
    assert main(["--train_mode=eval", f"--checkpoint_dir={cifar_run}", "--transfer_mode=knn", "--no-tsne"]) == 0
    record = json.loads((cifar_run / "eval" / "knn_epoch0001.json").read_text())["provenance"]
    assert record["command"] == f"main.py --train_mode=eval --checkpoint_dir={cifar_run} --transfer_mode=knn --no-tsne"
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit, and whether tracked files had changes
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)


def _hold_lock(run: str, held, release) -> None:
    import os
    import socket

    from engine.rundir import lock_run_dir

    lock = lock_run_dir(run)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock.flush()
    held.set()
    release.wait(30)
    lock.close()


def test_summary_says_where_each_run_stands(cifar_run, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(TINY + ["--clr=byol", "--epochs=2", "--stop_after_epoch=1", "--width_multiplier=0.25",
                        f"--log_dir={results / 'digits' / '16_BYOL' / 'a'}", "--no-tsne"]) == 0
    capsys.readouterr()
    assert main(["--train_mode=summary", f"--checkpoint_dir={results}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | method | dataset | arch | batch | epochs | loss | evals | state |" and len(lines) == 3
    run = results / "digits" / "16_BYOL" / "a"
    assert lines[2].startswith(f"| {run} | byol | digits | resnet18 x0.25 | 16 | 1/2 | ")
    assert lines[2].endswith(f"| - | resumable from epoch 1: --log_dir {run} --train_from latest |")
    held, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(str(run), held, release))
    holder.start()  # another process still training in the run: the summary says so, not "resumable"
    try:
        assert held.wait(30)
        assert main(["--train_mode=summary", f"--checkpoint_dir={results}"]) == 0
        row = capsys.readouterr().out.strip().splitlines()[2]
        assert row.endswith(f"| running (pid {holder.pid} on {socket.gethostname()}) |"), row
    finally:
        release.set()
        holder.join(30)
    assert main(["--train_mode=eval", f"--checkpoint_dir={cifar_run}", "--transfer_mode=knn", "--no-tsne"]) == 0
    capsys.readouterr()
    assert main(["--train_mode=summary", f"--checkpoint_dir={cifar_run}"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[2]
    assert "| simclr | digits | resnet18 x0.25 | 16 | 1/1 |" in row and row.endswith("| complete |") and "knn_epoch0001" in row
    assert main(["--train_mode=summary", f"--checkpoint_dir={tmp_path / 'none'}"]) == 2
    assert main(["--train_mode=summary"]) == 2


def test_a_side_by_side_tsne_of_two_runs_and_the_projection_layer(cifar_run, tmp_path):
    import matplotlib.image

    from experiments.tsne_compare import main as compare

    other = tmp_path / "byol"
    assert main(TINY + ["--clr=byol", "--epochs=1", "--width_multiplier=0.25", f"--log_dir={other}",
                        "--final_eval="]) == 0
    out = tmp_path / "side.png"
    assert compare([str(cifar_run), str(other), "--layer=projection", f"--out={out}"]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
    assert image[..., :3].std() > 0.05 and (image[..., :3].reshape(-1, 3) < 0.5).any()  # points, not a blank page
    assert compare([str(tmp_path / "nowhere"), f"--out={tmp_path / 'x.png'}"]) == 2
    assert not (tmp_path / "x.png").exists()
    assert main(["--train_mode=eval", f"--checkpoint_dir={other}", "--transfer_mode=knn",
                 "--tsne_layer=projection"]) == 0
    assert (other / "eval" / "tsne_knn_projection_epoch0001.png").stat().st_size > 10_000


def _original_checkpoints(tmp_path):
    """A backbone, and checkpoints of it in the layouts the original FlatCLR and MetaContrastive code write."""
    import argparse

    from models.backbones import build_backbone

    torch.manual_seed(3)
    backbone, dim = build_backbone("resnet18", cifar_stem=True, width=1.0)
    weights = backbone.state_dict()
    head = {"fc.0.weight": torch.randn(dim, dim), "fc.2.weight": torch.randn(128, dim)}  # their ProjectionHead
    flat = {f"module.{k}": v for k, v in {**weights, **head, "normalize.mean": torch.zeros(3),
                                          "normalize.std": torch.ones(3)}.items()}  # DataParallel
    run = tmp_path / "results" / "cifar10" / "512_FlatCLR" / "15-05-2021-06-02-45"
    run.mkdir(parents=True)
    flatclr = run / "checkpoint_0004.pth.tar"
    torch.save({"batch_size": 512, "epoch": 100, "model": "res18", "model_state_dict": flat,
                "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7}}, flatclr)
    meta = tmp_path / "checkpoint-300.pth.tar"
    encoder = {**{f"convnet.{k}": v for k, v in weights.items()}, "convnet.fc.weight": torch.randn(1000, dim),
               "convnet.fc.bias": torch.zeros(1000), "projection.fc1.weight": torch.randn(dim, dim),
               "rot_head.weight": torch.randn(4, 128)}
    torch.save({"state_dict": encoder, "hparams": argparse.Namespace(arch="ResNet18", temperature=0.5),
                "opt_state_dict": {}, "iter": 300}, meta)
    return backbone.eval(), run, flatclr, meta


def test_checkpoints_of_the_original_flatclr_and_metacontrastive_code_load(tmp_path, capsys):
    source, run, flatclr, meta = _original_checkpoints(tmp_path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    expected = source(x)
    for path, layout in ((flatclr, "FlatCLR"), (meta, "MetaContrastive")):
        backbone, info = load_pretrained(str(path))
        assert (info["arch"], info["cifar_stem"]) == ("resnet18", True)
        with torch.no_grad():
            assert torch.allclose(backbone(x), expected, atol=1e-6), layout
        assert f"note: {path} is a {layout} checkpoint: mapped its resnet18 backbone" in capsys.readouterr().err
    eval_args = ["--train_mode=eval", f"--checkpoint_dir={run}", "--transfer_mode=knn", "--dataset_name=digits",
                 "--image_size=16", "--device=cpu", "--workers=0", "--no-tsne"]
    assert main(eval_args) == 0  # the original run directory, as FlatCLR writes it
    assert json.loads((run / "eval" / "knn_epoch0004.json").read_text())["top1"] > 10
    assert main(["--train_mode=export", f"--checkpoint_dir={run}", "--dataset_name=digits"]) == 0
    assert torch.load(run / "export" / "resnet18_flatclr_ep4.pth", weights_only=True).keys() == \
        source.state_dict().keys()
    warm = tmp_path / "warm"
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--from_pretrained={meta}", f"--log_dir={warm}",
                        "--no-tsne", "--final_eval="]) == 0
    assert main([f"--log_dir={run}", "--train_from=checkpoint_0004.pth.tar"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {flatclr} is a FlatCLR checkpoint, which has no state of this tool to resume; start a new run from "
        f"its weights with --from_pretrained {flatclr}")
