import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10-subset")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def _tiny() -> list[str]:
    """Tiny but real settings: ResNet-18 on 16x16 digits, two steps an epoch, and each registered method's own
    flags at the small size its spec gives (``MethodSpec.tiny``)."""
    from models.methods import METHODS

    hints = {name: value for spec in METHODS.values() for name, value in spec.tiny.items()}
    return ["--dataset_name=digits", "--arch=resnet18", "--image_size=16", "--batch_size=16",
            "--limit_train_batches=2", "--workers=0", "--proj_hidden_dim=64", "--proj_out_dim=32",
            *(f"--{name}={value}" for name, value in hints.items()), "--warmup_epochs=1", "--log_every_n_steps=1",
            "--save_every_n_epochs=1", "--device=cpu"]


TINY = _tiny()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end checks (make test-slow)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; pytest -m cuda)")
    config.addinivalue_line("markers", "compile: runs torch.compile (slow to start; its own part of the GPU check)")


@pytest.fixture
def tiny(tmp_path):
    """Argument list for a tiny run writing under tmp_path."""
    return TINY + [f"--results_dir={tmp_path / 'results'}"]


HAS_CUDA = torch.cuda.is_available()
# Parametrize over this to run a CPU test on CUDA too: `pytest -m cuda` selects the CUDA half.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])]


def make_jpeg_folder(root, per_class=12, test_per_class=4, sides=(48, 200), seed=0, png=True):
    """A folder dataset of real photos (scikit-learn's two bundled 427x640 pictures), cropped at random places to
    random sizes and aspect ratios within ``sides`` and re-encoded as JPEG; classes ``a`` (the first photo) and
    ``b`` (the second); one PNG among the training images when ``png``. Returns the root."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, photo in zip("ab", photos):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for j in range(n):
                h, w = (int(rng.integers(sides[0], sides[1] + 1)) for _ in range(2))
                top, left = int(rng.integers(0, 427 - h + 1)), int(rng.integers(0, 640 - w + 1))
                image = Image.fromarray(photo[top:top + h, left:left + w])
                ext = "png" if png and split == "train" and c == "a" and j == 0 else "jpg"
                image.save(os.path.join(root, split, c, f"{j:03d}.{ext}"), quality=90)
    return str(root)


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory):
    pytest.importorskip("sklearn")
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))
