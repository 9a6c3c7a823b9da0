"""Backbones, heads (the BN ablation switches), datasets and the multi-view wrapper."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import MultiViewDataset, load_split, view_transform
from main import resolve
from models import METHODS, build_method
from models.methods import BYOL
from models.backbones import build_backbone
from tests.conftest import DEVICES


def test_cifar_stem_keeps_resolution_and_drops_maxpool():
    net, dim = build_backbone("res18", cifar_stem=True)
    assert dim == 512 and isinstance(net.maxpool, nn.Identity) and net.conv1.kernel_size == (3, 3)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    imagenet, _ = build_backbone("resnet18", cifar_stem=False)
    assert imagenet.conv1.kernel_size == (7, 7)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_1_is_torchvisions_resnet_weight_for_weight(arch):
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None)  # what this project built before the multiplier
    reference.fc = nn.Identity()
    torch.manual_seed(0)
    ours, dim = build_backbone(arch, cifar_stem=False)
    assert dim == (512 if arch == "resnet18" else 2048)
    theirs = reference.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("arch, width, dim", [("resnet18", 0.25, 128), ("resnet18", 0.5, 256), ("resnet50", 0.25, 512)])
def test_width_multiplier_scales_every_stage_and_the_feature_dim(arch, width, dim):
    net, feat_dim = build_backbone(arch, cifar_stem=True, width=width)
    assert feat_dim == dim and net(torch.zeros(2, 3, 16, 16)).shape == (2, dim)
    assert net.conv1.out_channels == round(64 * width)
    assert [layer[0].conv1.in_channels for layer in (net.layer2, net.layer3, net.layer4)] == \
        [round(c * width) * (4 if arch == "resnet50" else 1) for c in (64, 128, 256)]
    full = sum(p.numel() for p in build_backbone(arch, cifar_stem=True)[0].parameters())
    assert sum(p.numel() for p in net.parameters()) < full * width  # roughly width^2 of the weights


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm1d)]


def test_bn_ablation_flags_place_the_three_batch_norms():
    base = "--clr=byol --arch=resnet18 --proj_hidden_dim=32 --pred_hidden_dim=16 --proj_out_dim=8".split()
    full, _, _ = resolve(base + ["--proj_out_bn", "--no-proj_out_bn_affine"])  # "111", BN3 without affine
    m = build_method(full, num_data=10, cifar_stem=True)
    assert isinstance(m, BYOL)
    proj_bns, pred_bns = _bns(m.projector), _bns(m.predictor)
    assert [b.num_features for b in proj_bns] == [32, 8] and not proj_bns[1].affine
    assert [b.num_features for b in pred_bns] == [16]
    none, _, _ = resolve(base + ["--proj_bn=False", "--pred_bn=0", "--proj_out_bn=False"])  # "000"
    m = build_method(none, num_data=10, cifar_stem=True)
    assert _bns(m.projector) == [] and _bns(m.predictor) == []


def test_projection_head_modes():
    for mode, n_linear in (("nonlinear", 3), ("linear", 1), ("none", 0)):
        cfg, _, _ = resolve(["--clr=simclr", "--arch=resnet18", f"--proj_head_mode={mode}", "--num_proj_layers=3"])
        m = build_method(cfg, num_data=10, cifar_stem=True)
        assert sum(isinstance(x, nn.Linear) for x in m.projector.modules()) == n_linear
    assert m.embed([torch.zeros(2, 3, 16, 16)]).shape == (2, 512)


def test_digits_split_is_fixed_stratified_and_uint8():
    train, test = load_split("digits", "unused", train=True), load_split("digits", "unused", train=False)
    assert len(train.dataset) == 1437 and len(test.dataset) == 360
    img, label = train.dataset[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and 0 <= label < 10
    assert torch.bincount(test.dataset.labels).min() >= 35  # every class present in the test split


def test_views_are_fresh_per_epoch_and_reproducible_per_seed():
    split = load_split("digits", "unused", train=True)
    transforms = [view_transform(32, s, 0.5, 0.08, split.mean, split.std) for s in METHODS["byol"].views(2, False)]
    ds = MultiViewDataset(split.dataset, transforms, seed=0)
    (a1, a2), idx = ds[5]
    assert idx == 5 and a1.shape == (3, 32, 32) and a1.dtype == torch.float32
    assert not torch.equal(a1, a2)  # two views of one image differ
    again, _ = ds[5]
    assert torch.equal(again[0], a1)  # same (seed, epoch, index): same views, whatever the worker
    ds.set_epoch(1)
    fresh, _ = ds[5]
    assert not torch.equal(fresh[0], a1)  # next epoch: new views
    specs = METHODS["byol"].views(2, blur=True)
    assert (specs[0].blur_p, specs[0].solarize_p, specs[1].blur_p, specs[1].solarize_p) == (1.0, 0.0, 0.1, 0.2)


def test_persistent_workers_see_each_new_epoch():
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    from data.augment import EpochSampler

    split = load_split("digits", "unused", train=True)
    transforms = [view_transform(16, s, 0.5, 0.08, split.mean, split.std) for s in METHODS["simclr"].views(2, False)]
    ds = MultiViewDataset(Subset(split.dataset, range(24)), transforms, seed=0)
    sampler = EpochSampler(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0))
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([(views[0], idx) for views, idx in loader])
    for epoch, batches in enumerate(epochs):
        for first_view, idx in batches:
            # the workers were started once, in epoch 0; their views are still those of this epoch
            expected = torch.stack([ds[(epoch, int(i))][0][0] for i in idx])
            assert torch.equal(first_view, expected)
    assert ds.epoch == 0  # nothing but the sampler carried the epoch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clr", ["simclr", "insdis"])
def test_logits_stay_fp32_under_bf16_autocast(clr, device, monkeypatch):
    """The networks run in bf16; contrastive logits and InsDis's bank logits (and Z) in fp32."""
    import models.methods.contrastive as contrastive
    import models.methods.insdis as insdis

    seen = {}
    real_logits, real_nce = contrastive.contrastive_logits, insdis.insdis_nce_loss

    def logits(*args, **kwargs):
        out = real_logits(*args, **kwargs)
        seen["embedding"], seen["logits"] = args[0].dtype, out.neg.dtype
        return out

    def nce(pos, neg, n, log_z):
        seen["logits"], seen["log_z"] = neg.dtype, log_z.dtype
        return real_nce(pos, neg, n, log_z)

    monkeypatch.setattr(contrastive, "contrastive_logits", logits)
    monkeypatch.setattr(insdis, "insdis_nce_loss", nce)
    cfg, _, _ = resolve([f"--clr={clr}", "--arch=resnet18", "--proj_hidden_dim=32", "--proj_out_dim=16",
                         "--insdis_num_negatives=8"])
    method = build_method(cfg, num_data=8, cifar_stem=True).to(device)
    real_embed = method.embed

    def embed(views):
        z = real_embed(views)
        seen["net"] = z.dtype
        return z

    method.embed = embed
    views = [torch.randn(8, 3, 16, 16, device=device) for _ in range(2)]
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, _, _ = method(views, torch.arange(8, device=device))
    assert seen["net"] == torch.bfloat16 and seen["logits"] == torch.float32 and loss.dtype == torch.float32
    if clr == "insdis":
        assert seen["log_z"] == torch.float32


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_momentum_target_is_an_ema_of_the_online_networks(schedule):
    import math

    from models.momentum import MomentumTarget

    torch.manual_seed(0)
    online = {"backbone": nn.Linear(3, 4), "projector": nn.Linear(4, 2)}
    target = MomentumTarget(online, 0.9, schedule)
    x = torch.randn(5, 3)
    assert torch.equal(target(x), online["projector"](online["backbone"](x)))  # applied in order
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for net in online.values():
            for p in net.parameters():
                p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    target.update(online, step=1, total_steps=10)  # the first step uses the base momentum
    now = [p for net in online.values() for p in net.parameters()]
    for b, t, o in zip(before, target.parameters(), now):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-6)
    ramp = 1 - 0.1 * (math.cos(math.pi / 10) + 1) / 2
    assert target.momentum.item() == pytest.approx(ramp if schedule == "cosine" else 0.9)
    target.update(online, step=10, total_steps=10)
    assert target.momentum.item() == pytest.approx(1.0 if schedule == "cosine" else 0.9)
    with pytest.raises(ValueError, match="momentum target follows"):
        target.update({"projector": online["projector"], "backbone": online["backbone"], "x": nn.Linear(1, 1)}, 1, 10)


def test_insdis_sets_its_normaliser_once_from_the_first_batch_on_the_device():
    """Z = n * mean(exp(v.f/t)) of the first batch (Wu et al. 2018), then kept: later batches, and a restored
    value, leave it as it is; the decision is a device-side select, with no host flag to restore or capture."""
    cfg, _, _ = resolve(["--clr=insdis", "--arch=resnet18", "--proj_hidden_dim=32", "--proj_out_dim=16",
                         "--insdis_num_negatives=8"])
    torch.manual_seed(0)
    method = build_method(cfg, num_data=12, cifar_stem=True)
    assert torch.isnan(method.log_z)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    torch.manual_seed(1)
    method(views, torch.arange(4))
    torch.manual_seed(1)  # the same noise draw, by hand: the first batch's estimate
    v = F.normalize(method.embed(views).detach(), dim=1)
    noise = torch.randint(12, (8,))
    expected = torch.log((v @ method.bank[noise].T / cfg.temperature).exp().mean()) + math.log(12)
    first = method.log_z.clone()
    assert first.item() == pytest.approx(expected.item(), rel=1e-5)
    method([torch.randn(4, 3, 16, 16) for _ in range(2)], torch.arange(4, 8))
    assert torch.equal(method.log_z, first)


def test_an_unlabelled_folder_pretrains_and_evaluation_says_what_it_needs(tmp_path, capsys):
    """--dataset_name images: every image under --data at any depth, no classes, no split; pretraining only."""
    import numpy as np
    from PIL import Image

    from common.errors import UserError
    from main import main
    from tests.conftest import TINY

    rng = np.random.default_rng(0)
    for i, sub in enumerate(["", "a", "a/b/c", "d"] * 9):  # 36 images, four depths, one not an image
        os.makedirs(tmp_path / "pics" / sub, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "pics" / sub / f"{i}.png")
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    split = load_split("images", str(tmp_path / "pics"), train=True)
    assert len(split.dataset) == 36 and split.image_size == 24 and set(split.dataset.targets) == {0}
    assert split.dataset.samples == sorted(split.dataset.samples)
    image, label = split.dataset[5]
    assert image.size == (24, 24) and label == 0
    with pytest.raises(UserError, match="has no labels and no test split"):
        load_split("images", str(tmp_path / "pics"), train=False)
    args = [a for a in TINY if not a.startswith(("--dataset_name", "--image_size"))]
    for extra in ([], ["--faster_version"]):
        assert main(args + ["--dataset_name=images", f"--data={tmp_path / 'pics'}", "--clr=simclr", "--epochs=1",
                            f"--results_dir={tmp_path / 'results'}"] + extra) == 0
    assert len(list((tmp_path / "results" / "images" / "16_SimCLR").iterdir())) == 2
    capsys.readouterr()
    assert main(args + ["--dataset_name=images", f"--data={tmp_path / 'pics'}", "--final_eval=knn"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --dataset_name images has no labels, which --final_eval needs; drop it, and evaluate the run on a "
        "labelled folder: --train_mode eval --checkpoint_dir RUN --dataset_name folder --data DIR "
        "(DIR/train/<class>/, DIR/test/<class>/)")
