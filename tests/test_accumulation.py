"""Gradient accumulation (--accu_iter): k micro-batches of B/k make the update of one batch of B for methods
without cross-sample terms (BN-free networks here, in float64), and InsDis's bank takes every micro-batch."""
import copy

import pytest
import torch
import torch.nn as nn

from engine.trainer import StepParts, Trainer
from main import main
from models.heads import mlp
from models.methods import BYOL, InsDis
from tests.conftest import TINY


def _bn_free_backbone():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _byol():
    torch.manual_seed(0)
    return BYOL(_bn_free_backbone(), mlp(4, 8, 6, hidden_bn=False), mlp(6, 8, 6, hidden_bn=False), n_views=2,
                base_momentum=0.9, temperature=0.1).double()


def _insdis():
    torch.manual_seed(0)
    return InsDis(_bn_free_backbone(), mlp(4, 8, 6, hidden_bn=False), n_views=2, num_data=40, dim=6,
                  temperature=0.1, num_negatives=8, bank_momentum=0.5, loss="softmax").double()


def _train(method, accu_iter, steps=2):
    trainer = Trainer(StepParts(method, method, torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9),
                                torch.full((steps,), 0.5), torch.device("cpu"), accu_iter=accu_iter))
    g = torch.Generator().manual_seed(1)
    logs = []
    for i in range(steps):
        views = [torch.randn(12, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(2)]
        logs.append(trainer.train_step(views, torch.arange(12) + 12 * i, epoch=0, i=i))
    return method, logs


@pytest.mark.parametrize("build", [_byol, _insdis], ids=["byol", "insdis_softmax"])
def test_micro_batches_make_the_update_of_the_whole_batch(build):
    whole, whole_logs = _train(build(), 1)
    for k in (2, 3):
        split, split_logs = _train(build(), k)
        for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
            assert torch.allclose(a, b, rtol=0, atol=1e-12, equal_nan=True), (k, name)  # log_z: NaN unused
        assert split_logs[-1]["loss"].item() == pytest.approx(whole_logs[-1]["loss"].item(), abs=1e-6)  # logged in fp32
    assert not torch.equal(whole.state_dict()["backbone.0.weight"], build().state_dict()["backbone.0.weight"])


def test_the_bank_takes_every_micro_batch():
    method, _ = _train(_insdis(), 3, steps=1)
    fresh = _insdis()
    changed = (method.bank - fresh.bank).abs().sum(dim=1) > 0
    assert changed[:12].all() and not changed[12:].any()


def test_accumulation_that_does_not_divide_the_batch_is_one_line(tmp_path, capsys):
    assert main(TINY + ["--accu_iter=3", f"--log_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --batch_size 16 over 1 process(es) is 16 images a process, "
                                               "which --accu_iter 3 does not divide into equal micro-batches; pick a "
                                               "batch size or --accu_iter that does")
    assert not (tmp_path / "run").exists()
    assert main(TINY + ["--accu_iter=16", f"--log_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --accu_iter 16 leaves micro-batches of 1 image(s) (a "
                                               "contrastive loss needs negatives, BN two samples); lower --accu_iter")
    assert not (tmp_path / "run").exists()


def test_simclr_negatives_stay_within_the_micro_batch():
    """The documented difference: with accumulation a contrastive loss is the mean of its micro-batches' losses,
    each over the negatives of its own micro-batch (the first B/k images of every view, then the next)."""
    from models.methods import ContrastiveMethod

    torch.manual_seed(0)
    method = ContrastiveMethod(_bn_free_backbone(), mlp(4, 8, 6, hidden_bn=False), 2, 0.2, "infonce").double()
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(12, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    reference = copy.deepcopy(method)
    halves = [reference.objective([v[h * 6:(h + 1) * 6] for v in views], torch.arange(6))[0] for h in (0, 1)]
    whole = reference.objective(views, torch.arange(12))[0]
    trainer = Trainer(StepParts(method, method, torch.optim.SGD(method.parameters(), lr=0.1), torch.full((1,), 0.1),
                                torch.device("cpu"), accu_iter=2))
    logged = trainer.train_step(views, torch.arange(12), epoch=0, i=0)["loss"]
    assert logged.item() == pytest.approx(((halves[0] + halves[1]) / 2).item(), abs=1e-6)  # logged in fp32
    assert abs(logged.item() - whole.item()) > 1e-3
