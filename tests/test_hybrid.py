"""The hybrid input pipeline and --decode_on_gpu on a folder of real JPEGs (plus a PNG and a truncated file)."""
import json
import os
import shutil

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from data.augment import ViewSpec
from data.batched_augment import BatchedViews, ViewParams
from data.datasets import load_split
from data.hybrid import CROPPED, ENCODED, HybridItems, HybridLoader, collate
from data.loaders import pretrain_loader
from main import main
from tests.conftest import DEVICES

SIZE = 64
SPECS = [ViewSpec(0.5, 0.0), ViewSpec(0.5, 0.3)]  # blur on both views, solarize on the second
TINY_FOLDER = ["--dataset_name=folder", "--arch=resnet18", "--width_multiplier=0.25", "--image_size=32",
               "--batch_size=8", "--limit_train_batches=2", "--proj_hidden_dim=32", "--proj_out_dim=16",
               "--warmup_epochs=1", "--log_every_n_steps=1", "--device=cpu", "--no-diagnostics"]


def _items(folder, encoded, size=SIZE):
    split = load_split("folder", folder, train=True, image_size=size)
    views = [BatchedViews(size, spec, 1.0, 0.08, split.mean, split.std) for spec in SPECS]
    return split, HybridItems(split.dataset, views, seed=3, encoded=encoded)


def _finish(items, keys, device):
    return HybridLoader(None, items, torch.device(device)).finish(collate([items[key] for key in keys]))


def reference_view(path, p: ViewParams, kernel: int, uint8: bool, size=SIZE) -> torch.Tensor:
    """The view for the parameters ``p`` (one image) made as the standard pipeline makes it, with torchvision's own
    functions: the file decoded by PIL and made a uint8 tensor (v2.ToImage), cropped and resized as a tensor
    (antialias), then ColorJitter's operations in their order, grayscale, 2-D Gaussian blur, solarize; on uint8
    as the standard pipeline runs them (``uint8``: rounded, or truncated, after each operation), or on float
    after the crop. Returned in [0, 255]."""
    top, left, h, w = (int(v) for v in p.box[0].tolist())
    with Image.open(path) as img:
        x = TF.resized_crop(TF.pil_to_tensor(img.convert("RGB")), top, left, h, w, [size, size], antialias=True)
    x = x if uint8 else x.float() / 255
    if p.flip[0]:
        x = TF.horizontal_flip(x)
    if p.jitter[0]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in p.order[0].tolist():
            x = ops[op](x, float(p.factors[0, op]))
    if p.gray[0]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[0]:
        x = TF.gaussian_blur(x, [kernel, kernel], [float(p.sigma[0])] * 2)
    if p.solarize[0]:
        x = TF.solarize(x, 128 if uint8 else 0.5)
    return x.float() if uint8 else x * 255


def _as_uint8(view: torch.Tensor, mean, std) -> torch.Tensor:
    return (view.cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255


@pytest.mark.parametrize("encoded", [False, True], ids=["hybrid", "decode_on_gpu"])
@pytest.mark.parametrize("device", DEVICES)
def test_views_equal_the_standard_pipelines_for_the_same_parameters(jpeg_folder, encoded, device):
    """Against today's standard pipeline (torchvision on uint8): mean absolute difference under 2 on the uint8
    scale (torchvision's own tolerance between JPEG decoders; measured 1.44, the worst view 2.97: each of the
    standard pipeline's uint8 jitter operations truncates its result). Against the same operations in float,
    each view within 1 (measured: at most 0.11 hybrid, PIL's resize against torchvision's; at most 0.58 with
    --decode_on_gpu's decoder and resize)."""
    split, items = _items(jpeg_folder, encoded)
    views, index = _finish(items, [(0, i) for i in range(len(items))], device)
    seen = {"jitter": 0, "gray": 0, "blur": 0, "solarize": 0, "flip": 0}
    to_standard = []
    for v, view in enumerate(items.views):
        for row, i in enumerate(index.tolist()):
            path = split.dataset.samples[i][0]
            with Image.open(path) as img:
                height, width = img.height, img.width
            p = items.params(0, i, height, width)[v]
            out = _as_uint8(views[v][row], split.mean, split.std)
            assert (out - reference_view(path, p, view.kernel, uint8=False)).abs().mean() < 1.0, (path, v, p)
            to_standard.append((out - reference_view(path, p, view.kernel, uint8=True)).abs().mean())
            for name in seen:
                seen[name] += int(getattr(p, name)[0])
    assert torch.stack(to_standard).mean() < 2.0
    assert all(seen.values()), seen  # every operation was exercised


def test_a_worker_sends_uint8_crops_or_jpeg_bytes_and_views_depend_only_on_seed_epoch_and_index(jpeg_folder):
    split, plain = _items(jpeg_folder, encoded=False)
    _, encoded = _items(jpeg_folder, encoded=True)
    png = next(i for i, (path, _) in enumerate(split.dataset.samples) if path.endswith(".png"))
    jpg = next(i for i, (path, _) in enumerate(split.dataset.samples) if path.endswith(".jpg"))
    kind, crops, params, _, _ = plain[(0, jpg)]
    assert kind == CROPPED and crops.dtype == torch.uint8 and crops.shape == (2, 3, SIZE, SIZE)
    assert encoded[(0, jpg)][0] == ENCODED and encoded[(0, jpg)][1] == open(split.dataset.samples[jpg][0], "rb").read()
    assert encoded[(0, png)][0] == CROPPED  # not a JPEG: decoded by PIL in the worker
    assert torch.equal(params, encoded[(0, jpg)][2])  # the same parameters whichever way the file travels
    assert torch.equal(plain[(0, jpg)][1], crops) and torch.equal(plain[(0, jpg)][2], params)
    assert not torch.equal(plain[(1, jpg)][2], params)  # a new epoch draws new views


def test_workers_and_ranks_see_the_one_process_views(jpeg_folder):
    split = load_split("folder", jpeg_folder, train=True, image_size=32)
    spec = [ViewSpec(0.5, 0.0)] * 2

    def batches(workers, rank=0, world=1):
        loader, setters = pretrain_loader(split, spec, 8, seed=1, rank=rank, world_size=world, workers=workers,
                                          pipeline="hybrid")
        setters[0].set_epoch(1)
        return list(loader)

    one = batches(0)
    assert len(one) == 3
    for (v0, i0), (v2, i2) in zip(one, batches(2)):
        assert torch.equal(i0, i2) and all(torch.equal(a, b) for a, b in zip(v0, v2))
    halves = [batches(0, r, 2) for r in (0, 1)]
    for k, (views, index) in enumerate(one):
        joined = torch.cat([halves[0][k][1], halves[1][k][1]])
        assert sorted(joined.tolist()) == sorted(index.tolist())
        for v in range(2):
            whole = dict(zip(index.tolist(), views[v]))
            for r in (0, 1):
                for i, view in zip(halves[r][k][1].tolist(), halves[r][k][0][v]):
                    assert torch.equal(view, whole[i])


# The plain hybrid path behind `slow`: its decoding is the standard pipeline's (read_image), and its views are in
# the default suite through the equality, worker and resume tests.
HYBRID_SLOW = pytest.param("--input_pipeline=hybrid", marks=pytest.mark.slow)


@pytest.mark.parametrize("flag", [HYBRID_SLOW, "--decode_on_gpu"])
def test_a_jpeg_folder_pretrains_and_evaluates_end_to_end(jpeg_folder, flag, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder, data)
    good = data / "train" / "b" / "001.jpg"
    (data / "train" / "b" / "truncated.jpg").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    run = tmp_path / "run"
    args = TINY_FOLDER + [f"--data={data}", "--epochs=1", f"--log_dir={run}", "--workers=0", flag]
    assert main(args + ["--skip_bad_images"]) == 0
    assert [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")] == [1]
    assert main(["--train_mode=eval", "--transfer_mode=knn", f"--checkpoint_dir={run}", "--no-tsne", "--workers=0",
                 "--device=cpu", f"--data={data}", "--skip_bad_images"]) == 0
    record = json.load(open(run / "eval" / "knn_epoch0001.json"))
    assert 0 <= record["top1"] <= 100 and record["checkpoint_epoch"] == 1 and record["train_images"] == 25


@pytest.mark.parametrize("flag", [HYBRID_SLOW, "--decode_on_gpu"])
def test_a_truncated_jpeg_stops_the_run_naming_it(jpeg_folder, flag, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder, data)
    good = data / "train" / "b" / "001.jpg"
    bad = data / "train" / "b" / "truncated.jpg"
    bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    run = tmp_path / "run"
    assert main(TINY_FOLDER + [f"--data={data}", "--epochs=1", f"--log_dir={run}", "--workers=0", flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read image {bad} (") and \
        err[0].endswith("replace or remove it, or pass --skip_bad_images"), err
    assert not run.exists()


def test_decode_on_gpu_needs_files_and_faster_version_is_exclusive(tmp_path, capsys):
    assert main(["--dataset_name=digits", "--decode_on_gpu", "--epochs=1", f"--results_dir={tmp_path}",
                 "--device=cpu", "--workers=0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --decode_on_gpu decodes image files, and this dataset is held "
                                               "in memory; drop --decode_on_gpu")
    assert main(["--dataset_name=digits", "--faster_version", "--input_pipeline=hybrid", "--epochs=1",
                 f"--results_dir={tmp_path}", "--device=cpu"]) == 2
    assert "pick one" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_resumed_hybrid_run_ends_with_the_weights_of_the_uninterrupted_one(jpeg_folder, tmp_path):
    from engine.checkpoint import load_checkpoint

    common = TINY_FOLDER + [f"--data={jpeg_folder}", "--epochs=2", "--workers=0", "--input_pipeline=hybrid",
                            "--clr=simclr"]
    assert main(common + [f"--log_dir={tmp_path / 'straight'}"]) == 0
    assert main(common + [f"--log_dir={tmp_path / 'cut'}", "--stop_after_epoch=1"]) == 0
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest", "--workers=2"]) == 0  # other workers
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoint_0002.pth.tar"))["model"]
    b = load_checkpoint(str(tmp_path / "cut" / "checkpoint_0002.pth.tar"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
