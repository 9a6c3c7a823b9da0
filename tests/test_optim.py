"""LR scaling (FlatCLR README table), schedules, and LARS against a per-tensor reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine.optim import LARS, build_optimizer, lr_schedule, param_groups, scaled_lr

# FlatCLR README "Quick Lookup": batch size -> (linear-scaling lr, sqrt-scaling lr)
FLATCLR_TABLE = {128: (0.15, 0.85), 256: (0.3, 1.20), 512: (0.6, 1.70), 1024: (1.2, 2.40),
                 2048: (2.4, 3.39), 4096: (4.8, 4.80), 8192: (9.6, 6.79)}


@pytest.mark.parametrize("bs", sorted(FLATCLR_TABLE))
def test_lr_scaling_reproduces_flatclr_quick_lookup(bs):
    linear, sqrt = FLATCLR_TABLE[bs]
    assert round(scaled_lr(0.3, bs, "linear"), 2) == linear
    assert round(scaled_lr(0.075, bs, "sqrt"), 2) == sqrt
    assert scaled_lr(0.6, bs, "none") == 0.6


@pytest.mark.parametrize("scaling, bs", [("linear", 4096), ("sqrt", 4096), ("sqrt", 256), ("none", 512)])
def test_the_default_lr_follows_the_scaling(scaling, bs):
    from main import resolve

    cfg, _, _ = resolve([f"--learning_rate_scaling={scaling}", f"--batch_size={bs}"])
    expected = {("linear", 4096): 4.8, ("sqrt", 4096): 4.8, ("sqrt", 256): 1.2, ("none", 512): 0.3}[scaling, bs]
    assert scaled_lr(cfg.lr, bs, scaling) == pytest.approx(expected)
    adamw, _, _ = resolve(["--optimizer=adamw", f"--learning_rate_scaling={scaling}"])
    assert adamw.lr == 1e-3


def test_schedule_warmup_then_cosine_to_zero():
    s = lr_schedule(1.0, total_steps=100, warmup_steps=10, kind="cosine")
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert s[10] == pytest.approx(1.0) and s[55] == pytest.approx(0.5, abs=1e-12)
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert np.all(np.diff(s[10:]) <= 0)
    assert np.all(lr_schedule(2.0, 50, 0, "constant") == 2.0)


def test_bias_and_norm_parameters_get_no_decay_and_no_adaptation():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    decay, no_decay = param_groups(net, 1e-4)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0 and not no_decay["lars_adapt"]
    _, decayed = param_groups(net, 1e-4, decay_bias_and_norm=True)  # --wd_bias_and_norm
    assert decayed["weight_decay"] == 1e-4 and not decayed["lars_adapt"]


@pytest.mark.parametrize("flag, expected", [([], 0.0), (["--wd_bias_and_norm"], 1e-4)])
def test_wd_bias_and_norm_reaches_the_run(tmp_path, flag, expected):
    from main import main
    from tests.conftest import TINY

    run = tmp_path / "run"
    assert main(TINY + ["--epochs=1", "--optimizer=sgd", "--weight_decay=1e-4", f"--log_dir={run}"] + flag) == 0
    groups = torch.load(run / "checkpoint_0001.pth.tar", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-4, expected]


def test_lars_matches_reference_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    bufs = {n: torch.zeros_like(p) for n, p in ref.items()}
    opt = build_optimizer("lars", net, lr=0.5, weight_decay=0.01, momentum=0.9)
    assert isinstance(opt, LARS)
    for _ in range(3):
        x = torch.randn(8, 5)
        net.zero_grad()
        net(x).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
        for n, w in ref.items():
            g = grads[n]
            if w.ndim > 1:  # adapted and decayed
                trust = 0.001 * w.norm() / (g.norm() + 0.01 * w.norm())
                g = (g + 0.01 * w) * trust
            bufs[n] = 0.9 * bufs[n] + g
            ref[n] = w - 0.5 * bufs[n]
        for n, p in net.named_parameters():
            assert torch.allclose(p, ref[n], atol=1e-6), n


def test_warmup_as_long_as_the_run_is_capped_at_a_tenth_and_said_once():
    from engine.optim import plan_schedule

    s, note = plan_schedule(peak_lr=0.6, kind="cosine", epochs=2, steps_per_epoch=50, warmup_epochs=10)
    assert (s.total_steps, s.warmup_steps, s.requested_warmup_steps) == (100, 10, 500)
    assert "warming up over 10 step(s) instead (10% of the run)" in note and "--no-cap_warmup" in note
    rates = s.rates()
    assert rates[9] == pytest.approx(0.6, abs=1e-12) and rates.max() == rates[9]
    kept, note = plan_schedule(peak_lr=0.6, kind="cosine", epochs=2, steps_per_epoch=50, warmup_epochs=10,
                               cap_warmup=False)
    assert kept.warmup_steps == 500 and note is None and kept.rates().max() < 0.6 * 0.21
    tiny, _ = plan_schedule(peak_lr=1.0, kind="constant", epochs=1, steps_per_epoch=2, warmup_epochs=1)
    assert tiny.warmup_steps == 1  # at least one step


def test_warmup_shorter_than_the_run_is_untouched():
    from engine.optim import plan_schedule

    s, note = plan_schedule(peak_lr=0.6, kind="cosine", epochs=100, steps_per_epoch=7, warmup_epochs=10)
    assert note is None and s.warmup_steps == 70
    assert np.array_equal(s.rates(), lr_schedule(0.6, 700, 70, "cosine"))  # bitwise the schedule of before


def test_a_resumed_run_keeps_the_warmup_it_started_with():
    from engine.optim import plan_schedule

    # the scheduler record of a checkpoint written before the cap existed: warmup 20 steps of a 10-step run
    old = {"kind": "cosine", "peak_lr": 0.3, "total_steps": 10, "warmup_steps": 20, "step": 4}
    s, note = plan_schedule(peak_lr=0.3, kind="cosine", epochs=5, steps_per_epoch=2, warmup_epochs=10, saved=old)
    assert s.warmup_steps == 20 and note is None
    # a resume that lengthens the run gets a schedule of its own
    longer, _ = plan_schedule(peak_lr=0.3, kind="cosine", epochs=50, steps_per_epoch=2, warmup_epochs=10, saved=old)
    assert longer.warmup_steps == 20 and longer.total_steps == 100


def test_a_resume_honours_a_changed_warmup_and_repeats_no_note():
    from engine.optim import plan_schedule

    first, note = plan_schedule(peak_lr=0.3, kind="cosine", epochs=2, steps_per_epoch=5, warmup_epochs=10)
    assert first.warmup_steps == 1 and note
    again, note = plan_schedule(peak_lr=0.3, kind="cosine", epochs=2, steps_per_epoch=5, warmup_epochs=10,
                                saved=first.record())
    assert again == first and note is None  # announced when the run started
    changed, _ = plan_schedule(peak_lr=0.3, kind="cosine", epochs=2, steps_per_epoch=5, warmup_epochs=1,
                               saved=first.record())
    assert changed.warmup_steps == 5  # an explicit --warmup_epochs on resume is taken
