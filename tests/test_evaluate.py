"""Evaluation: kNN and linear probe against naive references; every mode end to end through main.py."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from engine.fitting import accumulate_gradients, fit_linear_on_features, semi_subset
from engine.knn import topk_correct
from engine.knn import knn_scores
from main import main
from tests.conftest import SHARED_DATA, TINY


def naive_knn(train_x, train_y, test_x, num_classes, k, t):
    """Loop version of weighted kNN: the k most cosine-similar training points vote exp(sim / t)."""
    preds = []
    for q in test_x:
        sims = [(float(F.cosine_similarity(q, x, dim=0)), int(y)) for x, y in zip(train_x, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += torch.tensor(sim / t).exp().item()
        preds.append(votes)
    return torch.tensor(preds)


def test_knn_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(60, 5, generator=g), torch.randint(0, 4, (60,), generator=g)
    test_x = torch.randn(15, 5, generator=g)
    got = knn_scores(train_x, train_y, test_x, 4, k=7, temperature=0.1, chunk=4)
    ref = naive_knn(train_x, train_y, test_x, 4, 7, 0.1)
    # equal up to a positive factor per test row (the weights are scaled to avoid overflow)
    assert torch.allclose(got / got.sum(1, keepdim=True), ref / ref.sum(1, keepdim=True), rtol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 1, 1]), ks=(1, 2)) == [1, 3]  # rows 2, 3: label ranks 2nd


def test_linear_probe_matches_closed_form_reference():
    # Two separable Gaussian blobs: the probe must classify held-out points as well as the Bayes rule
    # (sign of the projection on the mean difference), which is the naive reference here.
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([2.0, -1.0, 0.5])
    x = torch.cat([torch.randn(200, 3, generator=g) + mu, torch.randn(200, 3, generator=g) - mu])
    y = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    test = torch.cat([torch.randn(100, 3, generator=g) + mu, torch.randn(100, 3, generator=g) - mu])
    test_y = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    bayes = ((test @ mu) < 0).long()
    head = fit_linear_on_features(x, y, 2, epochs=50, batch_size=64, lr=0.5, weight_decay=0.0, momentum=0.9,
                                  optimizer="sgd", scheduler="cosine", seed=0, show=False)
    with torch.no_grad():
        pred = head(test).argmax(1)
    assert (pred == bayes).float().mean() >= 0.98
    assert abs((pred == test_y).float().mean() - (bayes == test_y).float().mean()) <= 0.02


@pytest.mark.parametrize("micro", [7, 16, 64])
def test_accumulated_micro_batches_give_the_whole_batchs_gradient(micro):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(3, (40,))
    F.cross_entropy(net(x), y).backward()  # the reference: one pass over the whole batch
    whole = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    loss = accumulate_gradients(net, x, y, micro)
    assert loss.item() == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-12)
    for p, g in zip(net.parameters(), whole):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_semi_subset_is_class_balanced_seeded_and_saved(tmp_path):
    from data import load_split

    split = load_split("digits", "unused", train=True)
    a = semi_subset(split, 0.1, seed=3, data_root="unused", dataset_name="digits", save_dir=str(tmp_path))
    counts = torch.bincount(split.dataset.labels[a], minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16 and len(set(a)) == len(a)
    saved = json.load(open(tmp_path / "semi_0.1_seed3.json"))
    assert saved["indices"] == a
    assert semi_subset(split, 0.1, seed=3, data_root="unused", dataset_name="digits", save_dir=str(tmp_path)) == a


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=2", f"--log_dir={run}"]) == 0
    return run


EVAL = ["--train_mode=eval", "--workers=0", "--device=cpu", "--fc_epochs=2", "--fc_batch_size=256"]


@pytest.mark.parametrize("mode, extra", [("knn", []), ("linear_eval", []), ("linear_eval", ["--fc_augment"]),
                                         ("finetune", ["--semi_ratio=0.1", "--fc_micro_batch_size=64"])])
def test_every_mode_runs_end_to_end_and_writes_json_and_png(mode, extra, pretrained):
    assert main(EVAL + [f"--transfer_mode={mode}", f"--checkpoint_dir={pretrained}"] + extra) == 0
    tag = mode + ("_semi0.1" if extra and "semi" in extra[0] else "")
    record = json.load(open(pretrained / "eval" / f"{tag}_epoch0002.json"))
    assert record["mode"] == mode and record["dataset"] == "digits" and record["checkpoint_epoch"] == 2
    assert 0 <= record["top1"] <= record["top5"] <= 100 and record["test_images"] == 360
    if mode == "finetune":  # 142 images, fc_batch_size 256: one step of three accumulated pieces per epoch
        assert record["fc_micro_batch_size"] == 64 and record["train_images"] == 142
    assert (pretrained / "eval" / f"tsne_{mode}_epoch0002.png").stat().st_size > 10_000
    assert any(f.startswith("events.out") for f in os.listdir(pretrained / "eval" / "tensorboard"))


def test_eval_all_plots_accuracy_against_epoch(pretrained):
    assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={pretrained}", "--eval_all", "--no-tsne"]) == 0
    results = json.load(open(pretrained / "eval" / "knn_all_epochs.json"))
    assert [r["checkpoint_epoch"] for r in results] == [1, 2]
    assert (pretrained / "eval" / "knn_all_epochs.png").stat().st_size > 5_000


def test_eval_errors_are_one_line(pretrained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(EVAL + [f"--checkpoint_dir={empty}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no checkpoint_*.pth.tar in {empty}; pass the directory")
    assert main(EVAL + [f"--checkpoint_dir={pretrained}", "--transfer_from_epoch=7"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no checkpoint for epoch 7 in {pretrained} (epochs available: 1, 2); "
        "pass one of those to --transfer_from_epoch")
    assert main(EVAL + [f"--checkpoint_dir={pretrained}", "--model=resnet50"]) == 2
    assert "was pretrained with --arch resnet18, not resnet50" in capsys.readouterr().err
    assert main(EVAL) == 2
    assert "--train_mode=eval needs --checkpoint_dir" in capsys.readouterr().err


# A short SimCLR pretraining (40 steps of 256 images at 16 px, about 2 CPU minutes) against the same
# ResNet-18 with random weights. Random ResNet features already separate digits well when all labels are
# used (95% linear probe), so the digits comparison uses 2% of the labels (28 images), where the features
# matter. One such subset is a noisy judge: on the 2-core CPU machine (torch 2.14.1), seed 42's subset
# gave 71.1% against 64.2% with NCHW weights and 61.9% against 64.2% with channels_last, while seeds
# 0, 1 and 2 (each pretrained with that seed) gave +11.7, +11.4 and +15.3 points. So the probe is
# averaged over five subsets (each with its own random-init baseline).
SHORT = ["--clr=simclr", "--arch=resnet18", "--image_size=16", "--batch_size=256", "--epochs=8",
         "--limit_train_batches=5", "--warmup_epochs=1", "--proj_hidden_dim=512", "--proj_out_dim=128",
         "--temperature=0.5", "--lr=1.0", "--workers=1", "--save_every_n_epochs=8", "--device=cpu"]


def _pretrained_vs_random(tmp_path, data, mode, semi_ratio, extra=(), probe_seeds=(42,)):
    """Mean top-1 over ``probe_seeds`` (label subset, probe and baseline initialisation) of the pretrained
    network and of the random-init one."""
    run = tmp_path / "run"
    assert main(data + SHORT + list(extra) + [f"--log_dir={run}"]) == 0
    probe = ["--train_mode=eval", f"--transfer_mode={mode}", "--workers=0", "--no-tsne", "--device=cpu"]
    if semi_ratio:
        probe.append(f"--semi_ratio={semi_ratio}")
    pre, base = [], []
    for seed in probe_seeds:
        assert main(probe + [f"--seed={seed}", f"--checkpoint_dir={run}"]) == 0
        (name,) = [f for f in os.listdir(run / "eval") if f.endswith(".json") and f.startswith(mode)]
        pre.append(json.load(open(run / "eval" / name))["top1"])
        baseline = tmp_path / f"baseline{seed}"
        width = [a for a in extra if a.startswith("--width_multiplier")]  # the same network, untrained
        assert main(probe + data + width + [f"--seed={seed}", "--checkpoint_dir=none", "--model=resnet18",
                                            "--image_size=16", f"--results_dir={baseline}"]) == 0
        (base_json,) = [os.path.join(dp, f) for dp, _, fs in os.walk(baseline) for f in fs
                        if f.endswith(".json") and f.startswith(mode)]
        base.append(json.load(open(base_json))["top1"])
    pre_mean, base_mean = sum(pre) / len(pre), sum(base) / len(base)
    print(f"\n{mode} top-1: pretrained {pre_mean:.2f}%, random init {base_mean:.2f}% (seeds {list(probe_seeds)}: "
          + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(pre, base)) + ")")
    return pre_mean, base_mean


def test_short_pretraining_beats_random_init_on_digits(tmp_path):
    # ResNet-18 at width 0.25, 60 steps of batch 256 with the batched augmentation (30 s), against the same
    # network untrained, three probe seeds. Measured: 66.94% against 51.57% (+15.4), ahead on each seed.
    pre, base = _pretrained_vs_random(tmp_path, ["--dataset_name=digits"], "linear_eval", 0.02,
                                      ["--min_crop_scale=0.3", "--width_multiplier=0.25", "--epochs=12",
                                       "--faster_version"], probe_seeds=(0, 1, 2))
    assert pre >= base + 5.0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not beside this checkout")
def test_short_pretraining_beats_random_init_on_real_cifar10(tmp_path):
    # 209 s on the 2-core CPU machine (reading 5170 PNGs with one worker, twice), a third of the default
    # suite, so it runs with `make test-slow`; the digits comparison above keeps the claim in every run.
    # On real images 40 steps move the kNN accuracy (measured: 31.37% against 27.73%, +3.6 points) but not
    # yet a linear probe on all 5170 labels (28.1% against 29.7% before the baseline was seeded), which
    # needs a longer run than CI can afford.
    pre, base = _pretrained_vs_random(tmp_path, ["--dataset_name=folder", f"--data={SHARED_DATA}"], "knn", None)
    assert pre >= base + 2.0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not beside this checkout")
def test_longer_pretraining_beats_random_init_on_real_cifar10_with_a_linear_probe(tmp_path):
    # 120 steps (about 6 CPU minutes, hence `make test-slow`). Measured: 35.69% against 29.01% (+6.7).
    pre, base = _pretrained_vs_random(tmp_path, ["--dataset_name=folder", f"--data={SHARED_DATA}"], "linear_eval",
                                      None, ["--limit_train_batches=15"])
    assert pre >= base + 3.0


@pytest.mark.slow
def test_finetuning_resnet50_with_the_default_batch_fits_a_small_machine(tmp_path):
    """The SimCLR paper's --fc_batch_size 4096 through a ResNet-50 was killed at 24 GB on the 2-core machine
    (the whole digits set in one forward); accumulated 256-image pieces keep the process under half of that
    (measured: 7.6 GiB peak RSS, about 30 MB of activations per 32x32 image through the CIFAR-stem ResNet-50)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--train_mode=eval", "--checkpoint_dir=none", "--transfer_mode=finetune", "--dataset_name=digits",
            "--arch=resnet50", "--fc_epochs=1", "--workers=0", "--device=cpu", "--no-tsne", f"--results_dir={tmp_path}",
            "--fc_batch_size=4096"]  # SimCLR's batch, as the default is; given, so it is not lowered for this small set
    code = ("import resource, sys; from main import main; rc = main(sys.argv[1:]); "
            "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code] + args, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_gib = int(proc.stdout.split("peak_kib ")[1].split()[0]) / 2**20
    assert peak_gib < 12, peak_gib
    record = json.load(open(next((tmp_path / "digits").rglob("finetune_epoch0000.json"))))
    assert record["fc_batch_size"] == 4096 and record["fc_micro_batch_size"] == 256


def test_a_narrow_network_records_its_width_evaluates_and_keeps_it_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--width_multiplier=0.25", f"--log_dir={run}"]) == 0
    ckpt = torch.load(run / "checkpoint_0001.pth.tar", weights_only=True)
    assert ckpt["width_multiplier"] == 0.25 and ckpt["feat_dim"] == 128
    assert ckpt["model"]["backbone.layer4.1.conv2.weight"].shape[0] == 128
    assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={run}", "--no-tsne"]) == 0
    assert json.load(open(run / "eval" / "knn_epoch0001.json"))["top1"] > 20  # 10 classes: learned something
    capsys.readouterr()
    assert main([f"--log_dir={run}", "--train_from=latest", "--epochs=2", "--width_multiplier=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run / 'checkpoint_0001.pth.tar'} was trained with "
                                               "--width_multiplier=0.25, not 0.5; drop --width_multiplier to "
                                               "resume, or start a new run")


@pytest.mark.parametrize("side, size, expect", [(32, 32, "every pixel"), (64, 32, "8/7 then centre"),
                                                (20, 32, "resized up"), (48, 32, "8/7 then centre")])
def test_the_test_view_of_a_folder_keeps_images_already_at_the_training_size(tmp_path, side, size, expect):
    """A folder of 32x32 PNGs (CIFAR as files) was resized to 8/7 and cropped, losing a quarter of each image."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2

    from data import load_split
    from engine.knn import test_transform

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / split / "a" / "0.png")
    test = load_split("folder", str(tmp_path), train=False, image_size=size)
    got = test_transform(test)(test.dataset[0][0])
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    if expect == "resized up":
        image = v2.functional.resize(image, [size], antialias=True)
    elif expect == "8/7 then centre":
        image = v2.functional.center_crop(v2.functional.resize(image, [round(size * 8 / 7)], antialias=True), [size])
    mean, std = torch.tensor(test.mean).view(3, 1, 1), torch.tensor(test.std).view(3, 1, 1)
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, (image.float() / 255 - mean) / std, rtol=0, atol=1e-5)


def test_final_eval_follows_pretraining_when_it_reaches_its_epochs(tmp_path, capsys):
    """--final_eval runs when a run reaches --epochs (also when a resume gets there), not before, and a resume
    with nothing left writes nothing; its record is the one --train_mode eval writes."""
    from tests.test_reliability import _snapshot

    run = tmp_path / "run"
    first = TINY + ["--clr=simclr", "--epochs=2", "--stop_after_epoch=1", "--final_eval=knn,linear_eval",
                    "--final_eval_baseline", "--fc_epochs=2", "--no-tsne", f"--log_dir={run}",
                    f"--results_dir={tmp_path / 'results'}"]
    assert main(first) == 0
    assert not (run / "eval").exists() and "final evaluation" not in capsys.readouterr().out
    assert main([f"--log_dir={run}", "--train_from=latest"]) == 0  # the run's --final_eval is kept
    out = capsys.readouterr().out
    summary = out[out.index("final evaluation of"):].strip().splitlines()
    knn = json.load(open(run / "eval" / "knn_epoch0002.json"))
    linear = json.load(open(run / "eval" / "linear_eval_epoch0002.json"))
    assert summary[1].startswith(f"  knn: top-1 {knn['top1']:.2f}% (epoch 2), random init ")
    assert summary[2].startswith(f"  linear_eval: top-1 {linear['top1']:.2f}% (epoch 2), random init ")
    baselines = sorted((run / "eval" / "random_init").rglob("*_epoch0000.json"))  # beside the run's, not nested
    assert [str(p.relative_to(run)) for p in baselines] == ["eval/random_init/knn_epoch0000.json",
                                                            "eval/random_init/linear_eval_epoch0000.json"]
    cached = sorted((tmp_path / "results" / "baselines").iterdir())
    assert [json.load(open(p))["top1"] for p in cached] == [json.load(open(p))["top1"] for p in baselines]

    again = tmp_path / "again"  # another run with the same evaluation settings: the baselines are reused
    assert main([a if not a.startswith("--log_dir") else f"--log_dir={again}" for a in first[:2]]
                + [a for a in first[2:] if not a.startswith(("--log_dir", "--stop_after"))] + [f"--log_dir={again}"]) == 0
    out = capsys.readouterr().out
    assert out.count("(the same baseline as ") == 2 and "random init" in out
    assert sorted(p.name for p in (again / "eval" / "random_init").iterdir()) == ["knn_epoch0000.json",
                                                                                 "linear_eval_epoch0000.json"]

    before = _snapshot(run)
    assert main([f"--log_dir={run}", "--train_from=latest"]) == 0  # nothing to do: no evaluation either
    assert _snapshot(run) == before
    assert main(EVAL + ["--transfer_mode=knn", f"--checkpoint_dir={run}", "--no-tsne"]) == 0
    assert json.load(open(run / "eval" / "knn_epoch0002.json"))["top1"] == knn["top1"]


def test_an_unknown_final_eval_protocol_is_one_line(capsys):
    assert main(TINY + ["--final_eval=knn,probe"]) == 2
    assert capsys.readouterr().err.strip() == ("error: argument --final_eval: unknown protocol probe; choose from "
                                               "linear_eval, finetune, knn, logistic (see --help)")


def test_a_preempted_final_finetune_is_finished_by_the_resume(tmp_path, capsys, monkeypatch):
    """SIGTERM during --final_eval's fine-tuning: its position is saved, RUN/.preempted asks the job script to
    requeue, and the resume (nothing left to pretrain) continues that fine-tuning and clears the mark."""
    from tests.test_preemption import _signal_in_fit

    run = tmp_path / "run"
    _signal_in_fit(monkeypatch, call=3)
    args = TINY + ["--clr=simclr", "--epochs=1", "--final_eval=finetune", "--semi_ratio=0.1", "--fc_epochs=2",
                   "--fc_batch_size=32", "--no-tsne", f"--log_dir={run}"]
    assert main(args) == 3
    partial = run / "eval" / "finetune_semi0.1_epoch0001.partial.pth.tar"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"preempted: stopped by SIGTERM at finetune epoch 1, step 3 of 4, after saving {partial}; continue with "
        f"--log_dir {run} --train_from latest")
    assert partial.exists() and (run / ".preempted").exists()
    monkeypatch.undo()
    assert main([f"--log_dir={run}", "--train_from=latest"]) == 0
    record = json.load(open(run / "eval" / "finetune_semi0.1_epoch0001.json"))
    assert record["resumed_at_step"] == 3 and not partial.exists() and not (run / ".preempted").exists()
    assert "  finetune: top-1" in capsys.readouterr().out


def test_a_default_classifier_batch_is_lowered_to_make_twenty_steps_an_epoch(pretrained, capsys):
    """digits: 1,437 training images, half of them labelled: SimCLR's batch 4096 would be one step an epoch."""
    base = ["--train_mode=eval", "--workers=0", "--device=cpu", "--fc_epochs=1", "--transfer_mode=finetune",
            "--semi_ratio=0.5", "--no-tsne", f"--checkpoint_dir={pretrained}"]
    assert main(base) == 0
    out = capsys.readouterr().out
    lr = 0.05 * 4096 / 256 * (32 / 4096) ** 0.5  # finetune's default fc_lr, sqrt-scaled to the new batch
    assert ("note: 718 labelled images make 0 step(s) an epoch at --fc_batch_size 4096; fitting with batch 32 and "
            f"fc_lr {lr:.4g} (sqrt-scaled) instead, 22 steps an epoch; pass --fc_batch_size to choose") in out
    record = json.load(open(pretrained / "eval" / "finetune_semi0.5_epoch0002.json"))
    assert (record["fc_batch_size"], record["fc_lr"]) == (32, pytest.approx(lr))
    assert main(base + ["--fc_batch_size=256"]) == 0  # given: kept, and said nothing
    assert "note: " not in capsys.readouterr().out
    assert json.load(open(pretrained / "eval" / "finetune_semi0.5_epoch0002.json"))["fc_batch_size"] == 256
    assert main(base[:4] + ["--transfer_mode=linear_eval"] + base[5:]) == 0  # a probe on cached features: kept
    assert "note: " not in capsys.readouterr().out
    few = [a if a != "--semi_ratio=0.5" else "--semi_ratio=0.01" for a in base]  # 14 labelled images
    assert main(few) == 0  # never a batch larger than the images: the fit drops an epoch's remainder
    assert "fitting with batch 8 and fc_lr" in capsys.readouterr().out


def test_a_run_that_ends_below_random_init_or_with_a_falling_monitor_says_so(tmp_path, capsys, monkeypatch):
    import engine.final_eval as final_eval
    from engine.pretrain import monitor_verdict

    monkeypatch.setattr(final_eval, "random_init_record", lambda ev, out_dir: {"top1": 100.0})
    run = tmp_path / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=1", "--final_eval=knn", "--final_eval_baseline", "--no-tsne",
                        f"--log_dir={run}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == f"pictures: {run / 'curves.png'}"
    assert out[-1].startswith("warning: knn ended below the random-init baseline: this pretraining did not help; ")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text('{"epoch": 1, "knn_top1": 40.0}\n{"epoch": 2, "knn_top1": 35.5}\n')
    assert monitor_verdict(str(tmp_path / "m")).startswith(
        "\nwarning: the kNN monitor fell from 40.00% to 35.50% over the run: pretraining made the features worse")
    (tmp_path / "m" / "metrics.jsonl").write_text('{"epoch": 1, "knn_top1": 40.0}\n{"epoch": 2, "knn_top1": 41}\n')
    assert monitor_verdict(str(tmp_path / "m")) == ""


def test_a_resume_keeps_which_settings_were_chosen_and_the_baseline_key_tells_them_apart(tmp_path):
    """A resumed run still knows that --fc_batch_size was left at its default (so its final fine-tuning lowers
    it as the uninterrupted run's would), and a baseline with a given batch is not one with a defaulted one."""
    from argparse import Namespace

    from cli.resolve import resolve
    from engine.final_eval import baseline_key

    for given, run in (([], tmp_path / "a"), (["--fc_batch_size=4096"], tmp_path / "b")):
        assert main(TINY + ["--clr=simclr", "--epochs=2", "--stop_after_epoch=1", f"--log_dir={run}"] + given) == 0
        cfg, _, _ = resolve([f"--log_dir={run}", "--train_from=latest"])
        assert ("fc_batch_size" in cfg.sources) == bool(given), cfg.sources
    cfg, _, _ = resolve(TINY + ["--train_mode=eval", "--checkpoint_dir=none", "--transfer_mode=finetune"])
    chosen, _, _ = resolve(TINY + ["--train_mode=eval", "--checkpoint_dir=none", "--transfer_mode=finetune",
                                   "--fc_batch_size=4096"])
    assert cfg.fc_batch_size == chosen.fc_batch_size and baseline_key(cfg) != baseline_key(chosen)
    assert baseline_key(cfg) == baseline_key(Namespace(**vars(cfg)))


def test_a_repeated_evaluation_adds_its_embedding_without_a_warning(pretrained, capsys):
    args = ["--train_mode=eval", "--workers=0", "--device=cpu", "--transfer_mode=knn", f"--checkpoint_dir={pretrained}"]
    for _ in range(2):
        assert main(args) == 0
    out = capsys.readouterr()
    assert "Embedding dir exists" not in out.out + out.err
    board = pretrained / "eval" / "tensorboard"
    assert len([d for d in board.iterdir() if d.name.isdigit() and (d / "test_features_epoch0002").is_dir()]) >= 2


def test_the_summary_lists_each_eval_all_record_once_and_not_its_table(pretrained, capsys):
    assert main(["--train_mode=eval", "--workers=0", "--device=cpu", "--transfer_mode=knn", "--eval_all",
                 "--no-tsne", f"--checkpoint_dir={pretrained}"]) == 0
    assert (pretrained / "eval" / "knn_all_epochs.json").exists()
    capsys.readouterr()
    assert main(["--train_mode=summary", f"--checkpoint_dir={pretrained}"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[2]
    assert "knn_epoch0001 " in row and "knn_epoch0002 " in row and "all_epochs" not in row and "unreadable" not in row
