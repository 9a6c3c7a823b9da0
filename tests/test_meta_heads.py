"""Meta-learning heads (losses/meta.py): ProtoNet and R2D2 on the task of the global batch, against independent
references (a per-query loop, the primal ridge solution, finite differences, one process for two)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import flatnce_loss, infonce_loss
from losses.meta import head_logits, query_accuracy, ridge_weights, task_embeddings
from main import main
from tests.conftest import TINY

T = 0.3


def _views(n_views, n=5, d=7, seed=0):
    """(V*N, D) view-major projections of N images: each image's views are noisy copies of one vector."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.cat([base + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(n_views)])


def _naive_pn(z, n_supp, n_views, t):
    """A loop over queries and classes, written from the definition: the prototype of image c is the mean of
    its first n_supp views (normalised, / sqrt t); a logit is minus the squared distance."""
    n = z.shape[0] // n_views
    e = [[F.normalize(z[v * n + i], dim=0) / t ** 0.5 for i in range(n)] for v in range(n_views)]
    protos = [sum(e[v][c] for v in range(n_supp)) / n_supp for c in range(n)]
    logits, losses = [], []
    for v in range(n_supp, n_views):
        for i in range(n):
            row = torch.stack([-((e[v][i] - protos[c]) ** 2).sum() for c in range(n)])
            logits.append(row)
            losses.append(torch.logsumexp(row, 0) - row[i])
    return torch.stack(logits), torch.stack(losses).mean()


def _full(logits):
    """(Q, C) class logits back from positives/negatives: the positive sits at the query's own class."""
    q = logits.pos.shape[0]
    c = logits.neg.shape[1] + 1
    n = c
    labels = torch.arange(n).repeat(q // n)
    out = torch.empty(q, c, dtype=logits.pos.dtype)
    for r in range(q):
        others = [k for k in range(c) if k != labels[r]]
        out[r, labels[r]] = logits.pos[r, 0]
        out[r, others] = logits.neg[r]
    return out


@pytest.mark.parametrize("n_supp, n_query", [(1, 1), (2, 1), (1, 3)])
def test_protonet_equals_a_per_query_loop(n_supp, n_query):
    v = n_supp + n_query
    z = _views(v)
    logits = head_logits("PN", z, n_supp, v, T, reg=50.0)
    ref_logits, ref_loss = _naive_pn(z, n_supp, v, T)
    assert torch.allclose(_full(logits), ref_logits, rtol=0, atol=1e-12)
    assert torch.allclose(infonce_loss(logits), ref_loss, rtol=0, atol=1e-12)


def test_protonet_with_one_support_view_is_minus_2_minus_2cos_over_t():
    z = _views(2)
    logits = _full(head_logits("PN", z, 1, 2, T, reg=50.0))
    q = F.normalize(z[5:], dim=1)
    s = F.normalize(z[:5], dim=1)
    assert torch.allclose(logits, -(2 - 2 * q @ s.T) / T, rtol=0, atol=1e-12)


def _primal(support, reg):
    """(X^T X + reg I)^-1 X^T Y by an explicit inverse in float64: independent of ridge_weights' solves."""
    s, c, d = support.shape
    x = support.reshape(s * c, d).double()
    y = torch.eye(c, dtype=torch.float64).repeat(s, 1)
    return torch.linalg.inv(x.T @ x + reg * torch.eye(d, dtype=torch.float64)) @ x.T @ y


@pytest.mark.parametrize("n_supp, n, d", [(1, 5, 7), (2, 5, 7), (1, 12, 4)])  # dual (S*C <= D) and primal
def test_r2d2_solution_equals_the_primal_ridge_solution(n_supp, n, d):
    g = torch.Generator().manual_seed(1)
    support = torch.randn(n_supp, n, d, generator=g, dtype=torch.float64)
    for reg in (50.0, 0.3):
        assert torch.allclose(ridge_weights(support, reg), _primal(support, reg), rtol=0, atol=1e-10)


def test_r2d2_gradient_matches_finite_differences():
    z = _views(3, n=4, d=5).requires_grad_(True)
    for head_n_supp in (1, 2):  # 4 support rows of width 5: the dual; 8: the primal
        torch.autograd.gradcheck(lambda x: infonce_loss(head_logits("R2D2", x, head_n_supp, 3, T, reg=0.7)), (z,))


def test_r2d2_logits_are_queries_times_ridge_weights():
    z = _views(2, n=6, d=4)
    logits = _full(head_logits("R2D2", z, 1, 2, T, reg=2.0))
    e = task_embeddings(z, 2, T)
    assert torch.allclose(logits, e[1] @ _primal(e[:1], 2.0), rtol=0, atol=1e-10)


def test_query_accuracy_counts_queries_whose_own_class_wins():
    z = _views(2, n=6)
    logits = head_logits("PN", z, 1, 2, T, reg=50.0)
    full = _full(logits)
    expected = (full.argmax(1) == torch.arange(6)).double().mean()
    assert query_accuracy(logits).item() == pytest.approx(expected.item()) and 0 < expected < 1


# ----------------------------------------------------------------------------- two processes
WORLD = 2


def _head_worker(rank, store, out_dir, head, n_supp, n_views, loss_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    n = 3
    z_all = _views(n_views, n=WORLD * n, d=5, seed=2).view(n_views, WORLD * n, 5)
    z = z_all[:, rank * n:(rank + 1) * n].reshape(-1, 5).clone().requires_grad_(True)
    logits = head_logits(head, z, n_supp, n_views, T, 0.5)  # gathers the support sets of both ranks
    loss = {"infonce": infonce_loss, "flatnce": flatnce_loss}[loss_name](logits)
    (grad,) = torch.autograd.grad(loss, z)
    torch.save({"loss": loss.detach(), "grad": grad}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("head, n_supp, n_views, loss_name", [
    ("PN", 1, 2, "infonce"), pytest.param("R2D2", 2, 3, "infonce", marks=pytest.mark.slow),
    pytest.param("R2D2", 1, 2, "flatnce", marks=pytest.mark.slow)])  # FlatNCE's own gather test: test_distributed
def test_two_processes_give_the_loss_and_gradients_of_one_on_the_whole_task(head, n_supp, n_views, loss_name,
                                                                           tmp_path):
    mp.spawn(_head_worker, args=(str(tmp_path / "store"), str(tmp_path), head, n_supp, n_views, loss_name),
             nprocs=WORLD, join=True)
    n = 3
    z = _views(n_views, n=WORLD * n, d=5, seed=2).requires_grad_(True)
    loss_fn = {"infonce": infonce_loss, "flatnce": flatnce_loss}[loss_name]
    ref = loss_fn(head_logits(head, z, n_supp, n_views, T, 0.5))
    (ref_grad,) = torch.autograd.grad(ref, z)
    ref_grad = ref_grad.view(n_views, WORLD * n, 5)
    parts = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]
    assert torch.allclose(sum(p["loss"] for p in parts) / WORLD, ref, rtol=0, atol=1e-12)
    for r, p in enumerate(parts):  # DDP averages the ranks' gradients
        rows = ref_grad[:, r * n:(r + 1) * n].reshape(-1, 5)
        assert torch.allclose(p["grad"] / WORLD, rows, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- through main.py
@pytest.mark.parametrize("clr, head, views", [("simclr", "PN", ["--n_supp=2", "--n_query=1"]),
                                              ("flatclr", "PN", []), ("simclr", "R2D2", []),
                                              ("flatclr", "R2D2", ["--multiplier=3", "--n_supp=2"])])
def test_heads_train_end_to_end(clr, head, views, tmp_path):
    run = tmp_path / "run"
    assert main(TINY + [f"--clr={clr}", f"--head={head}", "--epochs=1", f"--log_dir={run}", "--no-tsne",
                        "--final_eval="] + views) == 0
    import json
    import yaml

    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["query_acc"] <= 1 and record["loss"] > 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["head"], saved["n_supp"] + saved["n_query"]) == (head, saved["n_views"])
    assert saved["n_views"] == (3 if views else 2)


def test_head_settings_mistakes_are_one_line(tmp_path, capsys):
    cases = [
        (["--clr=simclr", "--head=PN", "--n_views=3", "--n_query=1"],
         "error: --n_views (--multiplier) 3 is not --n_supp 1 + --n_query 1; pass the views as one of the two"),
        (["--clr=byol", "--head=R2D2"],
         "error: --head is a setting of --clr simclr or flatclr, not of byol; drop it or pass --clr simclr"),
        (["--clr=simclr", "--head=R2D2", "--reg=0"], "error: --reg (the R2D2 ridge) must be positive, got 0.0"),
        (["--clr=simclr", "--head=PN", "--reg=3"],
         "error: --reg is the ridge of --head R2D2 and does nothing with --head PN; drop it or pass --head R2D2"),
        (["--clr=simclr", "--n_supp=2"], "error: --n_supp is the support set of --head PN/R2D2; with --head "
         "contrastive every view is an anchor: pass --n_views 3 instead, or a --head"),
        (["--clr=flatclr", "--head=PN", "--n_supp=2", "--n_views=2"],
         "error: a task needs at least one support and one query view per image; got --n_supp 2 and --n_query 0 "
         "(--n_views 2)"),
    ]
    for args, message in cases:
        assert main(TINY + args + [f"--log_dir={tmp_path / 'run'}"]) == 2
        assert capsys.readouterr().err.strip() == message
        assert not (tmp_path / "run").exists()


def test_a_temperature_above_one_with_the_contrastive_head_warns(capsys):
    from main import resolve

    resolve(TINY + ["--clr=simclr", "--temperature=10"])
    assert "MetaContrastive's contrastive head multiplied by it, so its --temperature 10 is 0.1 here" in \
        capsys.readouterr().err
    resolve(TINY + ["--clr=simclr", "--head=PN", "--temperature=10"])
    assert capsys.readouterr().err == ""
