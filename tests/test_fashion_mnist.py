"""Fashion-MNIST: the IDX reader against the raw bytes, its layouts, its errors, the greyscale views, the fixed
subsets, and a run through main.py."""
import gzip
import os

import numpy as np
import pytest
import torch

from common.errors import UserError
from data.datasets import FMNIST_MEAN, FMNIST_STD, fixed_subset, load_split
from tests.conftest import ROOT

FMNIST = os.path.join(ROOT, "..", "shared", "data", "fashion-mnist")
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs ../shared/data/fashion-mnist")


def _idx(values: np.ndarray) -> bytes:
    """An IDX file of uint8 ``values``, written from the format's definition (magic 0 0 8 <dims>, big-endian
    sizes, the bytes)."""
    return bytes([0, 0, 8, values.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in values.shape) + \
        values.astype(np.uint8).tobytes()


def _write_set(folder, n_train=12, n_test=6, gz=True):
    """Synthetic Fashion-MNIST files (image i of split s: all pixels (i + 10 s) % 256, label i % 10)."""
    os.makedirs(folder, exist_ok=True)
    for stem, n, s in (("train", n_train, 0), ("t10k", n_test, 1)):
        images = np.stack([np.full((28, 28), (i + 10 * s) % 256) for i in range(n)])
        for kind, values in (("images-idx3", images), ("labels-idx1", np.arange(n) % 10)):
            name = os.path.join(folder, f"{stem}-{kind}-ubyte")
            with (gzip.open(name + ".gz", "wb") if gz else open(name, "wb")) as f:
                f.write(_idx(values))


def _tree(root):
    return sorted((d, sorted(f)) for d, _, f in os.walk(root))


@needs_fmnist
def test_the_reader_gives_the_raw_idx_bytes_and_the_published_label_counts():
    train = load_split("fashion_mnist", FMNIST, train=True)
    test = load_split("fashion_mnist", FMNIST, train=False)
    with gzip.open(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz")) as f:
        raw_labels = f.read()
    images, labels = train.dataset.images, train.dataset.labels
    assert images.shape == (60_000, 3, 28, 28) and images.dtype == torch.uint8
    for i in (0, 12_345, 59_999):  # image i: 784 bytes after a 16-byte header; label i: 1 byte after 8
        expected = torch.tensor(list(raw[16 + 784 * i:16 + 784 * (i + 1)]), dtype=torch.uint8).view(28, 28)
        assert all(torch.equal(images[i, c], expected) for c in range(3))
        assert int(labels[i]) == raw_labels[8 + i]
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(test.dataset.labels).tolist() == [1000] * 10 and len(test.dataset) == 10_000
    assert (train.image_size, train.num_classes, train.greyscale, train.in_memory) == (28, 10, True, True)
    pixels = images[:, 0].float() / 255  # the recorded normalisation is the training set's
    assert (pixels.mean().item(), pixels.std().item()) == (pytest.approx(FMNIST_MEAN, abs=1e-4),
                                                           pytest.approx(FMNIST_STD, abs=1e-4))


@pytest.mark.parametrize("layout", ["flat-gz", "flat", "torchvision", "torchvision-gz", "named-subfolder"])
def test_every_layout_is_read_and_nothing_is_written_into_data(tmp_path, layout):
    folder = {"torchvision": tmp_path / "FashionMNIST" / "raw", "torchvision-gz": tmp_path / "FashionMNIST" / "raw",
              "named-subfolder": tmp_path / "fashion-mnist"}.get(layout, tmp_path)
    _write_set(folder, gz=layout.endswith("gz") or layout == "named-subfolder")
    before = _tree(tmp_path)
    train, test = (load_split("fashion_mnist", str(tmp_path), train=t) for t in (True, False))
    assert _tree(tmp_path) == before
    assert len(train.dataset) == 12 and len(test.dataset) == 6
    image, label = train.dataset[7]
    assert image.shape == (3, 28, 28) and bool((image == 7).all()) and label == 7
    assert bool((test.dataset[2][0] == 12).all())


def test_missing_and_damaged_files_are_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        load_split("fashion_mnist", str(tmp_path), train=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("Fashion-MNIST not found: no train-images-idx3-ubyte[.gz] in "
                                                      f"{tmp_path} or {tmp_path}/FashionMNIST/raw")
    assert "--download" in message and "apt-get install dataset-fashion-mnist" in message
    _write_set(tmp_path, gz=False)
    damaged = tmp_path / "t10k-images-idx3-ubyte"
    damaged.write_bytes(damaged.read_bytes()[:-5])  # cut short
    with pytest.raises(UserError, match=rf"^{damaged} is not a uint8 IDX file of 3 dimension\(s\) \(wrong header "
                                        r"or length\); replace it with the original file$"):
        load_split("fashion_mnist", str(tmp_path), train=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.arange(11) % 10))
    with pytest.raises(UserError, match="holds 12 images but .* 11 labels"):
        load_split("fashion_mnist", str(tmp_path), train=True)


def test_greyscale_views_stay_grey_in_both_pipelines():
    from data.augment import ViewSpec, view_transform
    from data.batched_augment import BatchedViews

    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8).expand(-1, 3, -1, -1)
    spec = ViewSpec(0.5, 0.2)
    batched = BatchedViews(28, spec, 1.0, 0.08, (FMNIST_MEAN,) * 3, (FMNIST_STD,) * 3, greyscale=True)
    views = batched(grey.contiguous(), torch.Generator().manual_seed(1))
    assert torch.equal(views[:, 0], views[:, 1]) and torch.equal(views[:, 0], views[:, 2])
    params = batched.sample(64, 28, 28, torch.Generator().manual_seed(1), "cpu")
    assert bool((params.factors[:, 2] == 1).all() and (params.factors[:, 3] == 0).all() and not params.gray.any())
    assert params.factors[:, :2].std() > 0.1  # brightness and contrast still vary
    standard = view_transform(28, spec, 1.0, 0.08, (FMNIST_MEAN,) * 3, (FMNIST_STD,) * 3, greyscale=True)
    names = [type(t).__name__ for t in standard.transforms]
    assert "RandomGrayscale" not in names
    jitter = standard.transforms[names.index("RandomApply")].transforms[0]
    assert jitter.saturation is None and jitter.hue is None and jitter.brightness is not None
    torch.manual_seed(0)
    view = standard(grey[0].contiguous())
    assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])


def test_a_fixed_subset_depends_on_its_own_seed_only():
    from data.datasets import Split, TensorImages

    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(-1, 3, 2, 2)
    split = Split(TensorImages(images, torch.arange(100) % 10), 10, 2, (0.5,) * 3, (0.5,) * 3, True, greyscale=True)
    torch.manual_seed(1)
    a = fixed_subset(split, 30, seed=5, flag="train_subset")
    torch.manual_seed(2)  # the run's seed does not matter
    b = fixed_subset(split, 30, seed=5, flag="train_subset")
    c = fixed_subset(split, 30, seed=6, flag="train_subset")
    assert torch.equal(a.dataset.images, b.dataset.images) and not torch.equal(a.dataset.images, c.dataset.images)
    assert len(a.dataset) == 30 and a.greyscale and a.in_memory
    assert a.dataset.images[:, 0, 0, 0].tolist() == sorted(set(a.dataset.images[:, 0, 0, 0].tolist()))
    with pytest.raises(UserError, match=r"^--eval_train_subset 101 is more than the 100 images of the training set"):
        fixed_subset(split, 101, seed=0, flag="eval_train_subset")


@needs_fmnist
def test_pretraining_on_fashion_mnist_ends_with_an_accuracy(tmp_path, capsys):
    import yaml

    from main import main

    assert main(["--dataset_name=fashion_mnist", f"--data={FMNIST}", "--clr=simclr", "--arch=resnet18",
                 "--width_multiplier=0.25", "--batch_size=32", "--epochs=1", "--limit_train_batches=2",
                 "--train_subset=256", "--eval_train_subset=500", "--faster_version", "--workers=0", "--device=cpu",
                 "--final_eval=knn", "--tsne=false", f"--results_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "knn: top-1 " in out and "(10000 test images)" in out
    run = next((tmp_path / "fashion_mnist" / "32_SimCLR").iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train_subset"], saved["eval_train_subset"], saved["subset_seed"]) == (256, 500, 0)
    import json

    record = json.loads((run / "eval" / "knn_epoch0001.json").read_text())
    assert (record["train_images"], record["test_images"]) == (500, 10_000)


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_download_without_a_network_is_one_line(name, tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    monkeypatch.setattr(tvd, "FashionMNIST", offline)
    with pytest.raises(UserError) as err:
        load_split(name, str(tmp_path), train=True, download=True)
    assert "\n" not in str(err.value) and "Temporary failure in name resolution" in str(err.value)
    assert str(err.value).startswith(f"could not download {'Fashion-MNIST' if name == 'fashion_mnist' else name} into")
