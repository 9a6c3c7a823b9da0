"""Each loss against a naive per-anchor loop written from the papers' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (ContrastiveLogits, byol_loss, contrastive_logits, flatnce_loss, infonce_loss, insdis_nce_loss,
                    insdis_softmax_loss)



@pytest.fixture(autouse=True)
def float64():
    """References in float64 so that tolerances are about the formulas, not rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def naive_infonce(z: torch.Tensor, n_views: int, t: float) -> torch.Tensor:
    """Mean over (anchor, positive) of -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{neg} e^{s_an/t}))."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // n_views
    terms = []
    for a in range(z.shape[0]):
        positives = [j for j in range(z.shape[0]) if j % n == a % n and j != a]
        negatives = [j for j in range(z.shape[0]) if j % n != a % n]
        neg = sum(torch.exp(z[a] @ z[j] / t) for j in negatives)
        for p in positives:
            pos = torch.exp(z[a] @ z[p] / t)
            terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


def naive_flatnce(z: torch.Tensor, t: float) -> torch.Tensor:
    """FlatCLR's formula, two views: mean_i exp(v_i - v_i.detach()), v_i = log sum_k e^{(s_ik - s_ip)/t}."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    out = []
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        v = torch.logsumexp(torch.stack([(z[a] @ z[k] - z[a] @ z[p]) / t for k in range(2 * n)
                                         if k % n != a % n]), dim=0)
        out.append(torch.exp(v - v.detach()))
    return torch.stack(out).mean() - 1


@pytest.mark.parametrize("n_views", [2, 3])
def test_infonce_matches_naive_loop(n_views):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n_views * 5, 7, generator=g)
    got = infonce_loss(contrastive_logits(z, n_views, 0.3))
    assert torch.allclose(got, naive_infonce(z, n_views, 0.3), atol=1e-10)


def test_infonce_of_identical_views_has_analytic_value():
    # N images with orthonormal embeddings, both views identical: the positive has cos 1, all
    # 2N-2 negatives cos 0, so the loss is log(1 + (2N - 2) e^{-1/t}).
    n, t = 6, 0.5
    z = torch.eye(n, 16)
    got = infonce_loss(contrastive_logits(torch.cat([z, z]), 2, t))
    assert got.item() == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / t)), abs=1e-12)
    # total collapse (every embedding equal): log(2N - 1), chance level over 2N - 1 candidates
    same = torch.ones(2 * n, 16)
    assert infonce_loss(contrastive_logits(same, 2, t)).item() == pytest.approx(math.log(2 * n - 1), abs=1e-12)


def test_flatnce_value_is_detached_infonce_and_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, generator=g, requires_grad=True)
    logits = contrastive_logits(z, 2, 0.2)
    loss = flatnce_loss(logits)
    assert loss.item() == pytest.approx(infonce_loss(logits).item(), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, z)
    (ref,) = torch.autograd.grad(naive_flatnce(z, 0.2), z)
    assert torch.allclose(grad, ref, atol=1e-10)


def test_flatnce_gradient_is_infonce_gradient_times_one_plus_s_over_s():
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(10, 1, generator=g, requires_grad=True)
    neg = torch.randn(10, 18, generator=g, requires_grad=True)
    logits = ContrastiveLogits(pos=pos, neg=neg, temperature=0.1)
    g_flat = torch.autograd.grad(flatnce_loss(logits), (pos, neg))
    g_info = torch.autograd.grad(infonce_loss(logits), (pos, neg))
    s = torch.exp(neg - pos).sum(dim=1, keepdim=True)  # per-anchor S
    for flat, info in zip(g_flat, g_info):
        assert torch.allclose(flat, info * (1 + s) / s, atol=1e-12)


def naive_dcl(z: torch.Tensor, n_views: int, t: float) -> torch.Tensor:
    """The decoupled contrastive loss (Yeh et al. 2022), from its formula: InfoNCE with the positive removed from
    the denominator, -s_ap/t + log sum_{neg} e^{s_an/t}, averaged over (anchor, positive) pairs."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // n_views
    terms = []
    for a in range(z.shape[0]):
        negatives = torch.stack([z[a] @ z[j] / t for j in range(z.shape[0]) if j % n != a % n])
        for p in (j for j in range(z.shape[0]) if j % n == a % n and j != a):
            terms.append(-(z[a] @ z[p]) / t + torch.logsumexp(negatives, dim=0))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("n_views", [2, 3])
def test_flatnce_gradient_equals_the_decoupled_contrastive_loss_gradient(n_views):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n_views * 6, 5, generator=g, requires_grad=True)
    logits = contrastive_logits(z, n_views, 0.2)
    loss = flatnce_loss(logits)
    (grad,) = torch.autograd.grad(loss, z)
    (dcl,) = torch.autograd.grad(naive_dcl(z, n_views, 0.2), z)
    assert torch.allclose(grad, dcl, atol=1e-10)
    (info,) = torch.autograd.grad(naive_infonce(z, n_views, 0.2), z)
    assert not torch.allclose(grad, info, atol=1e-3)  # not InfoNCE's: the positive in the denominator differs
    assert loss.item() == pytest.approx(infonce_loss(logits).item(), abs=1e-12)  # the logged value stays InfoNCE


def test_gathered_keys_with_offset_equal_the_full_batch():
    # A rank holding rows 4..7 of an 8-image batch, with keys from all ranks, sees the same per-anchor
    # losses as the one-process computation for those rows.
    g = torch.Generator().manual_seed(3)
    views = torch.randn(2, 8, 6, generator=g)  # (V, N_global, D)
    full = contrastive_logits(views.reshape(16, 6), 2, 0.5)
    ranks = [views[:, r * 4:(r + 1) * 4].reshape(8, 6) for r in range(2)]
    keys = torch.cat(ranks)
    part = contrastive_logits(ranks[1], 2, 0.5, keys=keys, offset=8)
    rows = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
    assert torch.allclose(part.infonce_per_pair(), full.infonce_per_pair()[rows], atol=1e-12)


def test_byol_loss_matches_naive_and_stops_target_gradient():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(5, 3, generator=g, requires_grad=True)
    z = torch.randn(5, 3, generator=g, requires_grad=True)
    ref = sum(2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(5)) / 5
    loss = byol_loss(p, z)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    loss.backward()
    assert z.grad is None and p.grad is not None


def test_insdis_nce_matches_naive_formula():
    g = torch.Generator().manual_seed(5)
    pos, neg = torch.randn(4, generator=g), torch.randn(4, 6, generator=g)
    n, log_z = 100, torch.tensor(3.0)
    pn, m = 1 / n, 6
    total = 0.0
    for b in range(4):
        p = math.exp(pos[b]) / math.exp(log_z)
        total += -math.log(p / (p + m * pn))
        for k in range(m):
            q = math.exp(neg[b, k]) / math.exp(log_z)
            total += -math.log(1 - q / (q + m * pn))
    assert insdis_nce_loss(pos, neg, n, log_z).item() == pytest.approx(total / 4, rel=1e-10)


def test_insdis_softmax_matches_naive():
    g = torch.Generator().manual_seed(6)
    logits, index = torch.randn(3, 9, generator=g), torch.tensor([2, 7, 0])
    ref = sum(-logits[b, index[b]] + torch.logsumexp(logits[b], 0) for b in range(3)) / 3
    assert insdis_softmax_loss(logits, index).item() == pytest.approx(ref.item(), abs=1e-12)
