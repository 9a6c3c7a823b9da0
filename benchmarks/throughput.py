"""Throughput of the data pipelines and of the full training step.

Counts *source images* per second (each image yields its views). Sections:

1. Augmentation alone, per CPU core (one thread), two SimCLR views per image: the batched pipeline of
   ``--faster_version``, the torchvision per-image pipeline on tensors (what DataLoader workers run for
   in-memory datasets), the torchvision/PIL per-image pipeline, and kornia's per-sample batched
   augmentation when kornia is installed (benchmarks/requirements.txt).
2. The full training step (augment + forward + backward + optimizer step) for each method, standard
   vs faster pipeline, for each batch size; peak memory; on CUDA the achieved TFLOP/s (FLOPs counted
   by torch.utils.flop_counter on one step) as a fraction of the device's dense bf16 peak.

Prints a markdown table and ends with ``augment_speedup_vs_pil: <ratio>``.

    python benchmarks/throughput.py --quick            # < 2 minutes on a 2-core CPU
    python benchmarks/throughput.py --device cuda --precision bf16 --batch_sizes 256,512,1024
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from data import load_split, symmetric_views, view_transform  # noqa: E402
from data.batched_augment import BatchedViews  # noqa: E402
from models.methods import METHODS  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "A6000": 154.8}  # dense, vendor sheets


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats


def augment_rows(images: torch.Tensor, size: int, mean, std, n_images: int, quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    specs = symmetric_views(2, blur=False)
    rows = []
    batch = images[:n_images]
    g = torch.Generator().manual_seed(0)
    batched = [BatchedViews(size, s, 0.5, 0.08, mean, std) for s in specs]
    sec = timed(lambda: [v(batch, g) for v in batched], 3 if quick else 10)
    rows.append({"pipeline": "batched (--faster_version), per-sample params", "img_s": n_images / sec})
    per_image = [view_transform(size, s, 0.5, 0.08, mean, std) for s in specs]
    few = batch[: max(64, n_images // 8)]
    tensors = [tv_tensors.Image(x) for x in few]
    sec = timed(lambda: [[t(x) for t in per_image] for x in tensors], 1 if quick else 3)
    rows.append({"pipeline": "torchvision v2 per image, uint8 tensors", "img_s": len(few) / sec})
    pils = [v2.functional.to_pil_image(x) for x in few]
    sec = timed(lambda: [[t(x) for t in per_image] for x in pils], 1 if quick else 3)
    rows.append({"pipeline": "torchvision per image, PIL", "img_s": len(few) / sec})
    try:
        import kornia.augmentation as K

        s = 0.5
        kaug = torch.nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.08, 1.0)), K.RandomHorizontalFlip(),
            K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8), K.RandomGrayscale(p=0.2),
            K.Normalize(torch.tensor(mean), torch.tensor(std)))
        floats = batch.float() / 255
        sec = timed(lambda: [kaug(floats) for _ in specs], 1 if quick else 3)
        import kornia

        rows.append({"pipeline": f"kornia {kornia.__version__}, per-sample params", "img_s": n_images / sec})
    except ImportError:
        rows.append({"pipeline": "kornia (not installed: pip install -r benchmarks/requirements.txt)", "img_s": None})
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def step_rows(args, device: torch.device) -> list[dict]:
    from main import resolve
    from models import build_method
    from engine.optim import build_optimizer
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    pipelines = {"both": (False, True), "faster": (True,), "standard": (False,)}[args.pipelines]
    for clr in args.methods.split(","):
        for width in (float(w) for w in args.widths.split(",")):
            for bs in (int(b) for b in args.batch_sizes.split(",")):
                for faster in pipelines:
                    cfg, _, _ = resolve([f"--clr={clr}", f"--arch={args.arch}", "--dataset_name=digits",
                                         f"--batch_size={bs}", f"--precision={args.precision}",
                                         f"--workers={args.workers}", f"--faster_version={faster}",
                                         f"--width_multiplier={width}", "--device=" + device.type])
                    rows.append(measure_step(cfg, device, args.steps, FlopCounterMode, build_method, build_optimizer))
    return rows


def measure_step(cfg, device, steps: int, flop_counter, build_method, build_optimizer) -> dict:
    from common.distributed import DistInfo
    from engine.pretrain import build_loader
    from engine.trainer import DTYPES

    torch.manual_seed(0)
    split = load_split(cfg.dataset_name, cfg.data, train=True, pretrain=True, image_size=cfg.image_size)
    loader, setters = build_loader(cfg, split, DistInfo(), device)
    method = build_method(cfg, num_data=len(split.dataset), cifar_stem=True).to(device)
    cl = cfg.channels_last is not False  # as pretraining does
    if cl:
        method = method.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optimizer, method, 0.1, cfg.weight_decay, cfg.momentum)
    autocast = torch.autocast(device.type, dtype=DTYPES.get(cfg.precision, torch.bfloat16),
                              enabled=cfg.precision in DTYPES)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def batches():
        while True:
            for s in setters:
                s.set_epoch(0)
            yield from loader

    it = batches()

    def step(count_flops=None):
        views, index = next(it)
        views = [v.to(device, non_blocking=True) for v in views]
        if cl:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with autocast:
            loss, _, outputs = method(views, index.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_step(1, 100, outputs)

    counter = flop_counter(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    sec = timed(step, steps, sync)
    img_s = cfg.batch_size / sec
    row = {"method": cfg.clr, "width": cfg.width_multiplier,
           "pipeline": "faster" if cfg.faster_version else f"standard ({cfg.workers} workers)", "batch": cfg.batch_size,
           "img_s": img_s, "step_ms": sec * 1e3, "gflop_per_img": flops / cfg.batch_size / 1e9}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        row["tflop_s"] = flops / sec / 1e12
        row["frac_bf16_peak"] = row["tflop_s"] / peak if peak else None
    else:
        row["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS
    return row


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: "-" if v is None else (f"{v:,.1f}" if isinstance(v, float) and abs(v) >= 10 else  # noqa: E731
                                          f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: under two minutes on a 2-core CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch_sizes", default=None, help="comma-separated (default: 16,32 quick, else 256,512)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--widths", default="1.0", help="comma-separated --width_multiplier values, e.g. 0.25,0.5,1.0")
    p.add_argument("--pipelines", default="both", choices=["both", "faster", "standard"])
    p.add_argument("--skip_augment", action="store_true", help="only the training-step table")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=None, help="standard pipeline workers (default: cores)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--augment_images", type=int, default=None, help="batch for the augmentation-only rows")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.batch_sizes = args.batch_sizes or ("16,32" if args.quick else "256,512")
    args.workers = os.cpu_count() if args.workers is None else args.workers
    args.steps = args.steps or (2 if args.quick else 20)
    n_aug = args.augment_images or (256 if args.quick else 1024)
    if args.quick and not cuda:
        args.methods = ",".join(m for m in args.methods.split(",") if m in ("simclr", "byol"))

    split = load_split("digits", "unused", train=True)
    images = split.dataset.images
    print(f"# device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}\n")
    aug = None
    if not args.skip_augment:
        print("## Augmentation alone, one CPU thread, 2 views per image, 32x32\n")
        aug = augment_rows(images, 32, split.mean, split.std, n_aug, args.quick)
        print(table(aug) + "\n")
    print(f"## Full training step, {args.arch}, {args.precision}, 32x32 digits\n")
    print(table(step_rows(args, device)) + "\n")
    if aug is not None:
        pil = next(r["img_s"] for r in aug if r["pipeline"].endswith("PIL"))
        print(f"augment_speedup_vs_pil: {aug[0]['img_s'] / pil:.1f}")

if __name__ == "__main__":
    main()
