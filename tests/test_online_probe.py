"""--online_probe: a linear classifier on the detached features during pretraining, its own optimizer, logged
like the kNN monitor, in the checkpoint, and without any effect on what the backbone learns."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from data.datasets import Split, TensorImages, dataset_labels, load_split, take
from engine.probe import OnlineProbe
from main import main
from tests.conftest import TINY, make_jpeg_folder


def _state(run_dir, epoch):
    return torch.load(os.path.join(run_dir, f"checkpoint_{epoch:04d}.pth.tar"), weights_only=True)


def test_the_probe_trains_beside_the_run_resumes_exactly_and_leaves_the_backbone_as_without_it(tmp_path, capsys):
    # InsDis: its noise comes from the global random generator every step, so any draw the probe made from it
    # (its initialisation, the test set's loader) would change the weights
    common = TINY + ["--clr=insdis", "--epochs=3"]
    probe = ["--online_probe", "--probe_lr=0.5"]
    assert main(common + [f"--log_dir={tmp_path / 'plain'}"]) == 0
    assert main(common + probe + [f"--log_dir={tmp_path / 'straight'}"]) == 0
    out = capsys.readouterr().out
    assert "epoch 3: online probe top-1 " in out
    assert main(common + probe + [f"--log_dir={tmp_path / 'cut'}", "--stop_after_epoch=1"]) == 0
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest"]) == 0
    plain, straight, cut = (_state(tmp_path / name, 3) for name in ("plain", "straight", "cut"))
    for key, value in plain["model"].items():  # its input is detached and its draws its own
        assert torch.equal(value, straight["model"][key]), key
    assert plain["probe"] is None and straight["probe"] is not None
    for key, value in straight["probe"]["head"].items():  # weights and BN statistics, continued exactly
        assert torch.equal(value, cut["probe"]["head"][key]), key
    for k, buf in straight["probe"]["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], cut["probe"]["optimizer"]["state"][k]["momentum_buffer"])
    assert not torch.equal(straight["probe"]["head"]["1.weight"], _state(tmp_path / "straight", 1)["probe"]["head"]["1.weight"])
    records = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(0 <= r["probe_acc"] <= 100 and 0 <= r["probe_top1"] <= 100 and r["probe_loss"] > 0 for r in records)
    assert "knn_top1" not in records[0]  # the probe alone does not start the kNN monitor


def test_a_step_uses_each_images_label_by_index_and_leaves_unlabelled_images_out():
    torch.manual_seed(0)
    labels = torch.tensor([3, -1, 0, 2, -1, 1, 3, 0])  # -1: unlabelled, as STL-10's unlabeled part
    split = Split(TensorImages(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), labels), 4, 4, (0.5,) * 3, (0.5,) * 3, True)
    probe = OnlineProbe(split, None, 6, lr=0.3, device=torch.device("cpu"))
    bn, linear = probe.head
    w, b = linear.weight.detach().clone().double(), linear.bias.detach().clone().double()
    feats, index = torch.randn(5, 6), torch.tensor([4, 0, 6, 1, 5])  # images 4 and 1 have no label
    logs = probe.step(feats, index, lr_fraction=0.5)
    # the reference, by hand in float64: standardise with the batch's (biased) statistics, a linear layer,
    # cross-entropy over the labelled rows only, one SGD step of lr 0.3 * 0.5
    x = feats.double()
    x = (x - x.mean(0)) / (x.var(0, unbiased=False) + bn.eps).sqrt()
    w.requires_grad_(), b.requires_grad_()
    known = torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)
    y = torch.tensor([3, 3, 1])
    loss = F.cross_entropy((x @ w.T + b)[known], y)
    loss.backward()
    assert float(logs["probe_loss"]) == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(linear.weight.double(), (w - 0.15 * w.grad).detach(), atol=1e-6)
    predicted = (x @ w.T + b).argmax(1)[known]
    assert float(logs["probe_acc"]) == pytest.approx(100.0 * float((predicted == y).float().mean()))


def test_the_labels_are_read_without_decoding_and_agree_with_the_images(tmp_path, monkeypatch):
    digits = load_split("digits", "", train=True)
    folder = load_split("folder", make_jpeg_folder(str(tmp_path / "jpeg")), train=True)
    subset = torch.utils.data.Subset(digits.dataset, [7, 3, 3])
    splits = (digits, take(digits, torch.tensor([5, 1, 900])), folder, take(folder, torch.tensor([0, 13, 20])))
    expected = [[int(ds[i][1]) for i in range(len(ds))] for ds in [s.dataset for s in splits] + [subset]]
    for ds in {type(s.dataset) for s in splits}:  # read from what the datasets hold, no image decoded
        monkeypatch.setattr(ds, "__getitem__", lambda self, i: pytest.fail("an image was read"))
    got = [dataset_labels(ds).tolist() for ds in [s.dataset for s in splits] + [subset]]
    assert got == expected


def test_the_probe_needs_labels(tmp_path, capsys):
    args = [a for a in TINY if not a.startswith(("--dataset_name", "--image_size"))]
    assert main(args + ["--dataset_name=images", f"--data={tmp_path}", "--online_probe",
                        f"--results_dir={tmp_path / 'results'}"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "error: --dataset_name images has no labels, which --online_probe needs; drop it")
    assert not (tmp_path / "results").exists()
