"""Distributed training on CPU with gloo: 2 processes via torch.multiprocessing and via torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from engine.checkpoint import list_checkpoints
from common.distributed import gather_no_grad, gather_with_grad
from common.errors import UserError
from losses import contrastive_logits, flatnce_loss, infonce_loss
from main import main
from models import METHODS
from tests.conftest import ROOT, TINY

WORLD = 2


def _spawn(fn, tmp_path, *args):
    mp.spawn(fn, args=(str(tmp_path / "store"), str(tmp_path), *args), nprocs=WORLD, join=True)


def _init(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _batch(seed=0, n=4, d=6):
    """Two views of a global batch of WORLD*n images; rank r holds images r*n .. r*n+n-1."""
    g = torch.Generator().manual_seed(seed)
    v1 = torch.randn(WORLD * n, d, generator=g)
    v2 = v1 + 0.5 * torch.randn(WORLD * n, d, generator=g)
    return v1, v2


def _local(v1, v2, rank, n=4):
    return torch.cat([v1[rank * n:(rank + 1) * n], v2[rank * n:(rank + 1) * n]])


def _gather_worker(rank, store, out_dir, loss_name):
    _init(rank, store)
    loss_fn = {"infonce": infonce_loss, "flatnce": flatnce_loss}[loss_name]
    v1, v2 = _batch()
    z = _local(v1, v2, rank).requires_grad_(True)
    loss = loss_fn(contrastive_logits(z, 2, 0.3, gather_with_grad(z), offset=rank * z.shape[0]))
    (grad,) = torch.autograd.grad(loss, z)
    # the common wrong variant: gather without gradient, put the local tensor back in its slot
    z2 = _local(v1, v2, rank).requires_grad_(True)
    keys = gather_no_grad(z2.detach()).clone()
    keys = torch.cat([keys[:rank * 8], z2, keys[(rank + 1) * 8:]])
    (wrong,) = torch.autograd.grad(loss_fn(contrastive_logits(z2, 2, 0.3, keys, offset=rank * 8)), z2)
    torch.save({"loss": loss.detach(), "grad": grad, "wrong": wrong}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", ["infonce", "flatnce"])
def test_gathered_loss_and_gradients_equal_one_process_on_the_concatenated_batch(loss_name, tmp_path):
    _spawn(_gather_worker, tmp_path, loss_name)
    v1, v2 = _batch()
    z = torch.cat([v1, v2]).requires_grad_(True)  # one process, global batch, view-major
    loss_fn = {"infonce": infonce_loss, "flatnce": flatnce_loss}[loss_name]
    ref_loss = loss_fn(contrastive_logits(z, 2, 0.3))
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    parts = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]
    # The global loss is the mean of the rank losses (equal numbers of anchors per rank) ...
    assert torch.allclose(sum(p["loss"] for p in parts) / WORLD, ref_loss, atol=1e-6)
    # ... and DDP averages gradients over ranks, so each rank's gradient / W is the reference's rows.
    for r, p in enumerate(parts):
        rows = torch.cat([torch.arange(r * 4, r * 4 + 4), torch.arange(8 + r * 4, 8 + r * 4 + 4)])
        assert torch.allclose(p["grad"] / WORLD, ref_grad[rows], atol=1e-6)
        assert not torch.allclose(p["wrong"] / WORLD, ref_grad[rows], atol=1e-3)  # the test can fail


def _finite_worker(rank, store, out_dir):
    _init(rank, store)
    from engine.trainer import _StepCheck

    # a stop request (a signal) on rank 0 and a save request (a timer) on rank 1 reach both ranks
    agreed = _StepCheck(torch.tensor(1.0), stop=rank == 0, save=rank == 1).wait(0, 0, None)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    try:
        _StepCheck(loss, stop=False, save=False).wait(epoch=0, step=3, last_ckpt="run/checkpoint_0002.pth.tar")
        outcome = "continued"
    except UserError as err:
        outcome = str(err)
    with open(os.path.join(out_dir, f"f{rank}.txt"), "w") as f:
        f.write(f"{agreed}\n{outcome}")
    dist.destroy_process_group()


def test_nan_or_a_stop_request_on_one_rank_reaches_every_rank(tmp_path):
    _spawn(_finite_worker, tmp_path)
    for r in range(WORLD):
        agreed, text = (tmp_path / f"f{r}.txt").read_text().split("\n", 1)
        assert agreed == "(True, True)"
        assert text.startswith("loss is not finite at epoch 1, step 4 on 1 rank(s)"), text
        assert "resume from run/checkpoint_0002.pth.tar" in text


def _tiny_simclr():
    """A BN-free network (CPU has no SyncBatchNorm, and per-rank BN statistics differ by design)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return backbone, nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def _train(method_name, views_by_step, model, rank=0, world=1):
    from engine.optim import build_optimizer
    from models.methods import ContrastiveMethod

    backbone, head = model
    method = ContrastiveMethod(backbone, head, 2, 0.2, "infonce" if method_name == "simclr" else "flatnce")
    method = method.double()  # float64, so that summation order cannot hide a real difference
    net = nn.parallel.DistributedDataParallel(method) if world > 1 else method
    opt = build_optimizer("lars", method, lr=2.0, weight_decay=1e-4, momentum=0.9)
    for v1, v2, index in views_by_step:
        n = v1.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        loss, _, _ = net([v1[sl].double(), v2[sl].double()], index[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _steps():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g), torch.arange(8))
            for _ in range(4)]


def _ddp_worker(rank, store, out_dir, method_name):
    _init(rank, store)
    state = _train(method_name, _steps(), _tiny_simclr(), rank, WORLD)
    if rank == 0:
        torch.save(state, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["simclr", "flatclr"])
def test_two_ranks_reach_the_weights_of_one_process(method_name, tmp_path):
    # In float32 the two differ by up to 6e-6 (biases take the raw lr 2.0; the all-reduce sums in another
    # order than one process). In float64 that noise is ~1e-15, so a 1e-10 tolerance is a real check.
    _spawn(_ddp_worker, tmp_path, method_name)
    ref = _train(method_name, _steps(), _tiny_simclr())
    ddp = torch.load(tmp_path / "ddp.pt")
    for key, value in ref.items():
        assert torch.allclose(ddp[key], value, rtol=0, atol=1e-10), key
    backbone, _ = _tiny_simclr()
    assert not torch.allclose(backbone[0].weight.double(), ref["backbone.0.weight"])  # training moved it


def _torchrun(args, cwd, nproc=WORLD):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "main.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """``torchrun_runs(clr, *extra)``: (the directory holding results/, the run directory) of a two-epoch tiny run
    of that method by two processes, launched once per module and shared by the tests below."""
    runs = {}

    def run(clr, *extra):
        if (clr, extra) not in runs:
            cwd = tmp_path_factory.mktemp(f"torchrun_{clr}")
            proc = _torchrun(TINY + [f"--clr={clr}", "--epochs=2", "--results_dir=results", *extra], cwd=cwd)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints
            parent = cwd / "results" / "digits" / f"16_{METHODS[clr].display}"
            (run_dir,) = os.listdir(parent)  # exactly one run directory, made by rank 0
            runs[clr, extra] = cwd, parent / run_dir
        return runs[clr, extra]

    return run


# SimCLR and BYOL alone under torchrun are in `make test-slow`: SimCLR runs with the fast path and accumulation
# here, FlatCLR with resume and evaluation, InsDis with its bank.
@pytest.mark.parametrize("clr, extra", [(clr, []) if clr not in ("simclr", "byol")
                                        else pytest.param(clr, [], marks=pytest.mark.slow) for clr in METHODS]
                         + [("simclr", ["--faster_version", "--accu_iter=2"])])
def test_torchrun_two_processes_write_one_run_directory(clr, extra, torchrun_runs):
    _, run = torchrun_runs(clr, *extra)
    assert sorted(list_checkpoints(str(run))) == [1, 2]
    ckpt = torch.load(run / "checkpoint_0002.pth.tar", weights_only=True)
    assert len(ckpt["rng"]) == WORLD and ckpt["args"]["batch_size"] == 16


def test_insdis_under_torchrun_updates_its_bank_with_every_ranks_features(torchrun_runs):
    _, run = torchrun_runs("insdis")
    ckpt = torch.load(run / "checkpoint_0002.pth.tar", weights_only=True)
    assert ckpt["model"]["bank"].norm(dim=1).allclose(torch.ones(1437))


def test_a_torchrun_run_resumes_in_its_directory_and_evaluates_as_one_process(torchrun_runs, tmp_path):
    import shutil

    cwd, shared = torchrun_runs("flatclr")
    run = tmp_path / "results" / "digits" / shared.parent.name / shared.name  # a copy: the shared run stays as made
    shutil.copytree(shared, run)
    proc = _torchrun([f"--log_dir={run}", "--train_from=latest", "--epochs=3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(list_checkpoints(str(run))) == [1, 2, 3] and os.listdir(run.parent) == [run.name]
    epochs = [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")]
    assert epochs == [1, 2, 3]
    # evaluation under torchrun: the training features stay sharded, kNN merges the ranks' candidates, and
    # gives the accuracy of one process
    knn = ["--train_mode=eval", f"--checkpoint_dir={run}", "--workers=0", "--device=cpu", "--no-tsne"]
    proc = _torchrun(knn + ["--transfer_mode=knn"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(run / "eval" / "knn_epoch0003.json"))
    assert main(knn + ["--transfer_mode=knn"]) == 0
    one = json.load(open(run / "eval" / "knn_epoch0003.json"))
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]


@pytest.mark.slow  # a torchrun launch; DDP's gradient path is in the default suite (two ranks reach one process)
def test_finetuning_runs_under_torchrun(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--clr=flatclr", "--epochs=1", f"--log_dir={run}"]) == 0
    proc = _torchrun(["--train_mode=eval", f"--checkpoint_dir={run}", "--workers=0", "--device=cpu", "--no-tsne",
                      "--transfer_mode=finetune", "--fc_epochs=1", "--fc_batch_size=64", "--semi_ratio=0.1"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finetune_semi0.1 epoch 1: top-1") == 1


def test_torchrun_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    proc = _torchrun(TINY + ["--batch_size=15"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "error: --batch_size 15 (global) does not divide over 2 processes" in proc.stderr
    assert not os.path.exists(tmp_path / "results")


def _shared_outcome_worker(rank, store, out_dir):
    _init(rank, store)
    from common.distributed import on_main_only, shared_outcome

    def disk_full():
        raise OSError(28, "No space left on device")

    outcome = on_main_only(disk_full) if rank == 0 else None  # file work on rank 0 only
    try:
        shared_outcome(outcome)
        text = "continued"
    except UserError as err:
        text = str(err)
    with open(os.path.join(out_dir, f"s{rank}.txt"), "w") as f:
        f.write(text)
    dist.destroy_process_group()


def test_a_failure_of_rank_0s_file_work_reaches_every_rank(tmp_path):
    # without it the other ranks would wait in the next collective until the process group timed out
    _spawn(_shared_outcome_worker, tmp_path)
    for r in range(WORLD):
        assert (tmp_path / f"s{r}.txt").read_text() == ("rank 0 failed writing the run: OSError: [Errno 28] No space "
                                                        "left on device")
