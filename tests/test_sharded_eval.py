"""Sharded evaluation over gloo ranks: kNN and the cached-feature linear probe give one process's results while each
rank holds only its shard of the training features, so a rank's memory falls as ranks are added.

One spawn per world size does every check (spawning costs seconds); the tests compare what the ranks saved.
"""
import os
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import Dataset

from common.distributed import DistInfo
from data.datasets import Split
from engine.fitting import fit_linear_on_features
from engine.protocols import EvalJob, knn_protocol, linear_protocol
from engine.knn import FeatureShard, extract_features, knn_scores, knn_scores_sharded

N_TRAIN, N_TEST, DIM, CLASSES = 601, 150, 64, 10  # 601: shards of unequal size under 2 and 4 ranks
KNN = [dict(k=20, temperature=0.07, chunk=64), dict(k=200, temperature=0.1, chunk=64)]  # 200 > a 4-rank shard
PROBE = dict(epochs=4, batch_size=64, lr=0.2, weight_decay=1e-4, momentum=0.9, optimizer="sgd",
             scheduler="cosine", seed=3, show=False)
SUBSET_PROBE = dict(PROBE, batch_size=8)  # small minibatches: some steps leave a rank none of theirs


def _features(seed=0):
    """Class means plus noise three times their size: neighbours mostly, not always, share a label."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(CLASSES, DIM, generator=g)
    train_y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    test_y = torch.randint(0, CLASSES, (N_TEST,), generator=g)
    train_x = means[train_y] + 6.0 * torch.randn(N_TRAIN, DIM, generator=g) + 1.5  # a mean to standardise away
    test_x = means[test_y] + 6.0 * torch.randn(N_TEST, DIM, generator=g) + 1.5
    subset = torch.randperm(N_TRAIN, generator=g)[:203].tolist()  # unsorted, as a label list may be
    return train_x, train_y, test_x, test_y, subset


class _Images(Dataset):
    """Float "images" (channels, side, side) made from their index, so that no rank holds the whole split; with
    the test transform's identity normalisation their flattened pixels are their features."""

    def __init__(self, n: int, channels: int, side: int, seed: int) -> None:
        self.n, self.shape, self.seed = n, (channels, side, side), seed
        self.means = 2.0 * torch.randn(CLASSES, *self.shape, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        label = (i * 7) % CLASSES
        noise = torch.randn(*self.shape, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        return self.means[label] + 6.0 * noise, label


def _split(n: int, channels: int, side: int, seed: int) -> Split:
    return Split(_Images(n, channels, side, seed), CLASSES, side, (0.0,) * channels, (1.0,) * channels, True)


def _job(rank: int, world: int, train: Split, test: Split, train_indices=None) -> EvalJob:
    cfg = Namespace(fc_batch_size=64, workers=0, knn_k=20, knn_temperature=0.07, fc_augment=False, fc_epochs=3,
                    fc_lr=0.2, fc_weight_decay=1e-4, fc_momentum=0.9, fc_optimizer="sgd", fc_scheduler="cosine", seed=1)
    return EvalJob(cfg, DistInfo(rank, world), torch.device("cpu"), train, test, train_indices)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory(rank: int, world: int) -> dict:
    """Growth of this process's peak resident memory over kNN evaluation of a 100 MB feature set (5000 x 5120):
    the shard, its normalised copy and one chunk's similarities, all 1/W of the whole."""
    train, test = _split(5000, 20, 16, seed=5), _split(256, 20, 16, seed=6)
    job = _job(rank, world, train, test)
    test_x = torch.stack([test.dataset[i][0].flatten() for i in range(len(test.dataset))])
    resettable = _reset_peak()
    before = _rss()
    knn_protocol(job, nn.Flatten(), 5120, test_x)
    growth = _peak() - before if resettable else None
    return {"growth": growth, "shard_bytes": 4 * 5120 * len(range(rank, 5000, world))}


def _reset_peak() -> bool:
    """Sets the peak resident memory to the current one. Without it the peak (ru_maxrss, VmHWM) of a process
    started by fork + exec begins at its parent's: the whole pytest process's, in a full run of the suite."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _direct(rank: int, world: int) -> dict:
    """kNN and the probe on this rank's shard (rows r, r+W, ...) of the fixed feature set, and on a subset."""
    train_x, train_y, test_x, _, subset = _features()
    rows = torch.arange(rank, N_TRAIN, world)
    knn = [knn_scores_sharded(train_x[rows], train_y[rows], test_x, CLASSES, **kw) for kw in KNN]
    head = fit_linear_on_features(train_x[rows], train_y[rows], CLASSES, **PROBE, rows=rows)
    part = FeatureShard(train_x[rows], train_y[rows], rows, N_TRAIN).select(subset)
    sub_head = fit_linear_on_features(part.feats, part.labels, CLASSES, **SUBSET_PROBE, rows=part.rows)
    return {"knn": knn, "head": head.state_dict(), "sub_head": sub_head.state_dict(), "sub_rows": len(part.rows)}


def _protocols(rank: int, world: int) -> dict:
    """knn_protocol and the cached linear_protocol end to end (extraction, label subset, fit) on a small split, and
    the whole split's features put together from the shards."""
    train, test = _split(203, 1, 8, seed=7), _split(40, 1, 8, seed=8)
    job = _job(rank, world, train, test, train_indices=list(range(0, 203, 3))[::-1])
    test_x = torch.stack([test.dataset[i][0].flatten() for i in range(len(test.dataset))])
    knn, _, _ = knn_protocol(job, nn.Flatten(), 64, test_x)
    linear, _, _ = linear_protocol(job, nn.Flatten(), 64, test_x)
    whole = extract_features(nn.Flatten(), train, torch.device("cpu"), 16, 0, show=False)
    return {"knn": knn, "linear": linear, "whole": whole}


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = {"memory": _memory(rank, world)}
    result.update(direct=_direct(rank, world), protocols=_protocols(rank, world))
    torch.save(result, os.path.join(out_dir, f"r{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """ranks(W): what each of W ranks saved, from one spawn per W."""
    done = {}

    def run(world: int) -> list[dict]:
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            mp.spawn(_worker, args=(world, str(out / "store"), str(out)), nprocs=world, join=True)
            done[world] = [torch.load(out / f"r{r}.pt") for r in range(world)]
        return done[world]

    return run


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_knn_gives_the_one_process_scores(world, ranks):
    train_x, train_y, test_x, test_y, _ = _features()
    for i, kw in enumerate(KNN):
        ref = knn_scores(train_x, train_y, test_x, CLASSES, **kw)
        assert 0.3 < (ref.argmax(1) == test_y).float().mean() < 0.95  # neighbours mostly, not always, agree
        for saved in ranks(world):
            got = saved["direct"]["knn"][i]
            assert torch.equal(got.argmax(1), ref.argmax(1)), kw
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), kw


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_probe_gives_the_one_process_head(world, ranks):
    train_x, train_y, test_x, _, subset = _features()
    ref = fit_linear_on_features(train_x, train_y, CLASSES, **PROBE).state_dict()
    sub = fit_linear_on_features(train_x[subset], train_y[subset], CLASSES, **SUBSET_PROBE).state_dict()
    saved = ranks(world)
    assert sum(s["direct"]["sub_rows"] for s in saved) == len(subset)
    for s in saved:
        for key in ref:  # standardisation (0.*) and the head (1.*)
            assert torch.allclose(s["direct"]["head"][key], ref[key], rtol=1e-5, atol=1e-4), key
            assert torch.allclose(s["direct"]["sub_head"][key], sub[key], rtol=1e-5, atol=1e-4), key
        for got, want in ((s["direct"]["head"], ref), (s["direct"]["sub_head"], sub)):
            assert torch.equal(_predict(got, test_x), _predict(want, test_x))


def _predict(state: dict, x: torch.Tensor) -> torch.Tensor:
    return ((x - state["0.mean"]) / state["0.std"] @ state["1.weight"].T + state["1.bias"]).argmax(1)


@pytest.mark.parametrize("world", [2, 4])
def test_protocols_on_shards_give_the_one_process_results(world, ranks):
    one = ranks(1)[0]["protocols"]
    for saved in ranks(world):
        assert all(torch.equal(got, want) for got, want in zip(saved["protocols"]["whole"], one["whole"]))
        for name in ("knn", "linear"):
            assert torch.equal(saved["protocols"][name].argmax(1), one[name].argmax(1)), name
            assert torch.allclose(saved["protocols"][name], one[name], rtol=1e-4, atol=1e-4), name


def test_a_ranks_memory_falls_as_ranks_are_added(ranks):
    if any(s["memory"]["growth"] is None for w in (1, 2, 4) for s in ranks(w)):
        pytest.skip("this system does not let a process reset its peak resident memory (/proc/self/clear_refs)")
    peak = {w: max(s["memory"]["growth"] for s in ranks(w)) for w in (1, 2, 4)}
    shard = {w: max(s["memory"]["shard_bytes"] for s in ranks(w)) for w in (1, 2, 4)}
    print("per-rank peak growth (MB) at 1/2/4 ranks:", [round(peak[w] / 2**20, 1) for w in (1, 2, 4)],
          "shard (MB):", [round(shard[w] / 2**20, 1) for w in (1, 2, 4)])
    assert peak[4] < peak[2] < peak[1]
    assert peak[1] > 1.5 * shard[1]  # the measure sees the features: the shard and its normalised copy
    assert peak[2] < 0.75 * peak[1] and peak[4] < 0.75 * peak[2]
