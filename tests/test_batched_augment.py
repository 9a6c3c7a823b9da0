"""The batched (--faster_version) augmentation against torchvision: each operation's values, and the
random parameters' distributions."""
import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
import torchvision.transforms.v2.functional as TF

from data import ViewSpec
from data.batched_augment import BatchedViews, DeviceLoader, color_jitter, crop_flip, gaussian_blur, sample_crop_boxes
from tests.conftest import DEVICES


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between empirical distributions."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.08, 1.0)), (24, 40, (0.2, 1.0))])
def test_crop_boxes_match_torchvision_in_distribution(height, width, scale, device):
    n = 20000
    g = torch.Generator(device=device).manual_seed(0)
    ours = sample_crop_boxes(n, height, width, scale, g, device).cpu()
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                       dtype=torch.float)
    for boxes in (ours, ref):
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    log_ratio = lambda b: torch.log(b[:, 3] / b[:, 2])  # noqa: E731
    centre_x = lambda b: b[:, 1] + b[:, 3] / 2  # noqa: E731
    # 20000 samples each: a KS distance above ~0.02 would be a real difference (p < 1e-3)
    assert ks_statistic(area(ours), area(ref)) < 0.02
    assert ks_statistic(log_ratio(ours), log_ratio(ref)) < 0.02
    assert ks_statistic(centre_x(ours), centre_x(ref)) < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_probabilities_and_ranges(device):
    views = BatchedViews(32, ViewSpec(blur_p=0.1, solarize_p=0.2), jitter_strength=0.5, min_scale=0.08,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    p = views.sample(40000, 32, 32, torch.Generator(device=device).manual_seed(1), device)
    p = type(p)(**{name: value.cpu() for name, value in vars(p).items()})
    for flag, rate in ((p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.1), (p.solarize, 0.2)):
        assert abs(flag.float().mean().item() - rate) < 0.01
    s = 0.5
    lo, hi = p.factors.min(0).values, p.factors.max(0).values
    assert torch.allclose(lo, torch.tensor([1 - 0.8 * s] * 3 + [-0.2 * s]), atol=1e-3)
    assert torch.allclose(hi, torch.tensor([1 + 0.8 * s] * 3 + [0.2 * s]), atol=1e-3)
    uniform = torch.rand(40000, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.6
    assert ks_statistic(p.factors[:, 0], uniform) < 0.02  # brightness ~ U(0.6, 1.4)
    assert ((p.sigma >= 0.1) & (p.sigma <= 2.0)).all()
    assert (p.order.sort(1).values == torch.arange(4)).all()  # each row a permutation
    first_op = torch.bincount(p.order[:, 0], minlength=4).float() / 40000
    assert torch.allclose(first_op, torch.full((4,), 0.25), atol=0.01)  # random order, as torchvision


def _images(n=6, h=20, w=20, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_crop_and_flip_equal_torchvision_resized_crop():
    imgs = _images()
    box = torch.tensor([[0, 0, 20, 20], [2, 3, 10, 12], [5, 1, 15, 8], [0, 0, 20, 20], [4, 4, 8, 8],
                        [1, 0, 19, 20]], dtype=torch.float)
    flip = torch.tensor([False, False, True, True, False, True])
    ours = crop_flip(imgs, box, flip, 16)
    for i in range(len(imgs)):
        top, left, h, w = (int(v) for v in box[i])
        ref = TF.resized_crop(imgs[i].float() / 255, top, left, h, w, [16, 16], antialias=False)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.allclose(ours[i], ref, atol=1e-5), i
    same = crop_flip(imgs, torch.tensor([[0, 0, 20, 20]] * 6, dtype=torch.float), torch.zeros(6, dtype=torch.bool), 20)
    assert torch.allclose(same, imgs.float() / 255, atol=1e-5)  # full-image crop at full size is identity


@pytest.mark.parametrize("op, tv", [
    (0, lambda x, f: TF.adjust_brightness(x, f[0])), (1, lambda x, f: TF.adjust_contrast(x, f[1])),
    (2, lambda x, f: TF.adjust_saturation(x, f[2])), (3, lambda x, f: TF.adjust_hue(x, f[3])),
])
def test_each_jitter_operation_equals_torchvision(op, tv):
    x = _images(n=4).float() / 255
    factors = torch.tensor([[0.6, 1.3, 0.7, 0.1], [1.4, 0.7, 1.2, -0.1], [1.0, 1.0, 0.0, 0.05],
                            [0.8, 1.2, 1.4, -0.2]])
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    only = identity.repeat(4, 1)
    only[:, op] = factors[:, op]
    order = torch.arange(4).repeat(4, 1)
    ours = color_jitter(x, only, order, torch.ones(4, dtype=torch.bool))
    for i in range(4):
        assert torch.allclose(ours[i], tv(x[i], factors[i].tolist()), atol=1e-4), i
    untouched = color_jitter(x, factors, order, torch.zeros(4, dtype=torch.bool))
    assert torch.equal(untouched, x)


def test_jitter_in_each_samples_random_order_equals_torchvision_sequence():
    x = _images(n=24, seed=5).float() / 255
    g = torch.Generator().manual_seed(7)
    views = BatchedViews(20, ViewSpec(0.0, 0.0), jitter_strength=1.0, min_scale=0.08, mean=(0,) * 3, std=(1,) * 3)
    p = views.sample(24, 20, 20, g, "cpu")
    ours = color_jitter(x, p.factors, p.order, torch.ones(24, dtype=torch.bool))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    assert len({tuple(o) for o in p.order.tolist()}) > 10  # many different orders in the batch
    for i in range(24):
        ref = x[i]
        for op in p.order[i].tolist():
            ref = ops[op](ref, p.factors[i, op].item())
        assert torch.allclose(ours[i], ref, atol=1e-4), i


def test_grayscale_blur_and_solarize_equal_torchvision():
    x = _images(n=3).float() / 255
    plain = BatchedViews(20, ViewSpec(0.0, 0.0), 0.0, 1.0, (0.0,) * 3, (1.0,) * 3)
    p = plain.sample(3, 20, 20, torch.Generator().manual_seed(0), "cpu")
    p.box[:] = torch.tensor([0.0, 0.0, 20.0, 20.0])
    p.flip[:], p.jitter[:], p.gray[:] = False, False, torch.tensor([True, False, True])
    gray = plain.apply(_images(n=3), p)  # grayscale, fused with the normalisation
    for i in range(3):
        ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if p.gray[i] else x[i]
        assert torch.allclose(gray[i], ref, atol=1e-6), i
    sigma = torch.tensor([0.3, 1.0, 2.0])
    blurred = gaussian_blur(x, sigma, torch.tensor([True, True, False]), kernel=5)
    for i in range(2):
        assert torch.allclose(blurred[i], TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2), atol=1e-5)
    assert torch.allclose(blurred[2], x[2], atol=1e-6)
    views = BatchedViews(20, ViewSpec(0.0, 1.0), 0.0, 1.0, (0.0,) * 3, (1.0,) * 3)
    p = views.sample(3, 20, 20, torch.Generator().manual_seed(0), "cpu")
    p.box[:] = torch.tensor([0.0, 0.0, 20.0, 20.0])
    p.flip[:], p.gray[:], p.jitter[:] = False, False, False
    ref = TF.solarize(_images(n=3), 128).float() / 255
    assert torch.allclose(views.apply(_images(n=3), p), ref, atol=1e-5)


def test_two_calls_never_return_the_same_views():
    views = BatchedViews(16, ViewSpec(0.5, 0.0), 0.5, 0.08, (0.5,) * 3, (0.25,) * 3)
    imgs = _images(n=64, h=16, w=16)
    g = torch.Generator().manual_seed(0)
    a, b = views(imgs, g), views(imgs, g)
    assert a.shape == (64, 3, 16, 16) and a.dtype == torch.float32
    differ = (a - b).flatten(1).abs().amax(1) > 1e-3
    assert differ.all()  # every image got new parameters


def test_device_loader_shards_a_seeded_permutation():
    imgs = _images(n=40, h=8, w=8)
    views = [BatchedViews(8, ViewSpec(0.0, 0.0), 0.5, 0.5, (0.5,) * 3, (0.5,) * 3)] * 2
    one = DeviceLoader(imgs, views, batch_size=8, seed=3)
    ranks = [DeviceLoader(imgs, views, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(one) == 5 and all(len(r) == 5 for r in ranks)
    batches = [idx for _, idx in one]
    assert sorted(torch.cat(batches).tolist()) == list(range(40))  # each image once per epoch
    for k, parts in enumerate(zip(*[[idx for _, idx in r] for r in ranks])):
        assert sorted(torch.cat(parts).tolist()) == sorted(batches[k].tolist())  # ranks split the same batch
    one.set_epoch(1)
    assert not torch.equal(torch.cat([idx for _, idx in one]), torch.cat(batches))  # a new order
    assert math.isclose(float(next(iter(one))[0][0].mean()), float(next(iter(one))[0][0].mean()))  # seeded


def test_hue_on_ties_grays_and_saturated_pixels_equals_torchvision():
    # every ordering of the channels, ties in the maximum (r = b is where the sextant formulas disagree by
    # one turn), grays, black, white and pure colours
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    grid = torch.cartesian_prod(levels, levels, levels).T.reshape(3, 8, 8)  # 64 colours
    x = torch.stack([grid, grid.flip(1)])
    for shift in (-0.5, -0.2, 0.0, 0.13, 0.5):
        ours = color_jitter(x, torch.tensor([[1.0, 1.0, 1.0, shift]] * 2), torch.arange(4).repeat(2, 1),
                            torch.ones(2, dtype=torch.bool))
        for i in range(2):
            assert torch.allclose(ours[i], TF.adjust_hue(x[i], shift), atol=1e-5), (shift, i)


def test_chunked_cpu_views_equal_one_piece():
    views = BatchedViews(32, ViewSpec(0.5, 0.2), 0.5, 0.08, (0.5,) * 3, (0.25,) * 3)
    imgs = _images(n=300, h=32, w=32)  # above the CPU chunk of 128 images at 32x32: three chunks
    chunked = views(imgs, torch.Generator().manual_seed(4))
    p = views.sample(300, 32, 32, torch.Generator().manual_seed(4), "cpu")
    assert torch.allclose(chunked, views.apply(imgs, p), atol=1e-6)
