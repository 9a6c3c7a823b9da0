"""Diagnostics against direct computations on fixed batches, and the collapse warning on a collapsed model."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from losses import contrastive_logits, infonce_loss
from losses.diagnostics import contrastive_stats, effective_rank, embedding_stats
from main import main
from tests.conftest import TINY


def test_uniformity_and_alignment_of_known_sets():
    # the 4 points +-e1, +-e2 of the plane: squared distances 2 (four pairs each way) and 4 (two pairs each way)
    square = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    z = torch.cat([square, square])  # two identical views: alignment 0
    stats = embedding_stats(z, n_views=2)
    # within a view, ordered pairs of different images: 8 at squared distance 2, 4 at 4 (the two views agree)
    expected = math.log((8 * math.exp(-4) + 4 * math.exp(-8)) / 12)
    assert stats["uniformity"].item() == pytest.approx(expected, rel=1e-6)
    assert stats["alignment"].item() == pytest.approx(0.0, abs=1e-7)
    shifted = torch.cat([square, square.roll(1, dims=0)])  # each image's second view a quarter turn away
    assert embedding_stats(shifted, 2)["alignment"].item() == pytest.approx(2.0, rel=1e-6)
    assert stats["emb_std"].item() == pytest.approx(float(F.normalize(z).std(dim=0).mean()), rel=1e-6)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_effective_rank_of_a_matrix_with_r_equal_singular_values_is_r(rank):
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    m = q[:, :rank] @ torch.eye(rank, 16)  # 64 x 16, singular values r ones and zeros
    assert effective_rank(m).item() == pytest.approx(rank, rel=1e-4)
    m[0, 0] = float("nan")  # a diverged batch: NaN, not an exception before the step's own check
    assert math.isnan(effective_rank(m).item())


def test_log_s_gradient_ratio_and_the_mi_bound_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2 * 6, 8, generator=g)
    logits = contrastive_logits(z, n_views=2, temperature=0.5)
    infonce = infonce_loss(logits)
    stats = contrastive_stats(logits, infonce)
    v = F.normalize(z, dim=1)
    sim = v @ v.T / 0.5
    log_s = []
    for a in range(12):  # anchor a: positive is the other view of its image, negatives all but a and that view
        p = (a + 6) % 12
        negs = [k for k in range(12) if k not in (a, p)]
        log_s.append(math.log(sum(math.exp(sim[a, k] - sim[a, p]) for k in negs)))
    log_s = torch.tensor(log_s)
    assert stats["log_s"].item() == pytest.approx(log_s.mean().item(), rel=1e-5)
    assert stats["log_s_p50"].item() == pytest.approx(torch.quantile(log_s, 0.5).item(), rel=1e-5)
    assert stats["flat_grad_ratio"].item() == pytest.approx((1 + 1 / log_s.exp()).mean().item(), rel=1e-5)
    assert stats["log_k"].item() == pytest.approx(math.log(11))  # 10 negatives and the positive
    assert stats["mi_bound"].item() == pytest.approx(math.log(11) - infonce.item(), rel=1e-6)
    # a perfectly separated batch: InfoNCE -> 0 and the bound reaches its ceiling log K
    far = contrastive_logits(torch.eye(6).repeat(2, 1), n_views=2, temperature=0.01)
    assert contrastive_stats(far, infonce_loss(far))["mi_bound"].item() == pytest.approx(math.log(11), abs=1e-6)


def test_a_run_logs_the_diagnostics_per_epoch(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--clr=flatclr", "--epochs=1", f"--log_dir={run}"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("alignment", "uniformity", "emb_std", "erank", "grad_norm", "log_s", "log_s_p10", "log_s_p90",
                "flat_grad_ratio", "mi_bound", "log_k"):
        assert key in record and math.isfinite(record[key]), key
    assert record["log_k"] == pytest.approx(math.log(31))  # batch 16, two views: 30 negatives + 1
    assert 1 <= record["erank"] <= 32 and record["flat_grad_ratio"] > 1


def test_a_collapsed_model_triggers_the_warning_once(tmp_path, capsys, monkeypatch):
    from models.methods.base import SSLMethod

    real = SSLMethod.embed

    def collapsed(self, views):  # every image maps to (nearly) the same point
        z = real(self, views)
        return z * 1e-6 + torch.ones_like(z)

    monkeypatch.setattr(SSLMethod, "embed", collapsed)
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--limit_train_batches=4", f"--log_dir={tmp_path / 'r'}"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the embeddings look collapsed: effective rank 1.00 (under 2) for 3 logging "
                     "windows by step 3") == 1, err
