"""The GPU check: every figure a GPU session should bring back, from one command, within a time budget.

    python3 benchmarks/gpu_check.py                      # on a GPU node (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --quick  # the same parts at toy sizes on a CPU, under a minute

Parts, in order of value, each with its own time cap; a part that would overrun ``--budget`` is reported as
skipped and one that fails is reported as failed, and the rest still runs:

1. CUDA tests: ``pytest -m cuda`` (tests/test_cuda.py and the CUDA halves of device-parametrized tests).
2. Throughput of the real training step (batched augmentation on the device, forward, backward, LARS,
   method hook) on synthetic uint8 images: images/s, ms/step (median of per-step CUDA-event timings after
   warm-up), achieved TFLOP/s from the FLOPs counted by ``torch.utils.flop_counter`` (forward + backward,
   augmentation included), its fraction of the device's dense bf16 peak, peak memory; compile time apart.
3. Where the time goes: a ``torch.profiler`` trace of 5 steps (top 15 kernels) and the share of the step
   in augmentation, forward, backward and optimizer (CUDA events between phases) and device idle time.
4. Real data: SimCLR on the CIFAR-10 subset (``.data/cifar10-subset``; ``make gpu-data`` copies it from
   ../shared), as many epochs as fit, then kNN top-1 (digits instead with ``--quick``).

Writes ``report.md`` (ready for benchmarks/RESULTS.md) and ``report.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common.distributed import DistInfo  # noqa: E402
from data.batched_augment import BatchedViews  # noqa: E402
from data.augment import ViewSpec  # noqa: E402
from data.datasets import Split, TensorImages  # noqa: E402
from engine.optim import build_optimizer, lr_schedule  # noqa: E402
from engine.pretrain import build_loader, build_model  # noqa: E402
from engine.trainer import StepParts, Trainer  # noqa: E402
from main import main as cli_main  # noqa: E402
from main import resolve  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched in order.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]
# What the parts import besides torch; a missing one is named in the report instead of ending the check.
NEEDED = ("yaml", "tqdm", "sklearn", "tensorboard", "matplotlib", "pytest")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- set-up
class Check:
    """Settings and shared results of one run of the check."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        self.cuda = cuda
        self.precision = "bf16" if cuda else "fp32"
        self.results: dict = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def device_facts(check: Check) -> dict:
    facts = {"device": torch.cuda.get_device_name() if check.cuda else f"cpu ({os.cpu_count()} cores)",
             "torch": torch.__version__, "cuda": torch.version.cuda if check.cuda else None,
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
             "commit": _commit()}
    facts["driver"] = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) \
        if check.cuda else None
    facts["bf16_peak_tflops"] = next((v for k, v in BF16_PEAK_TFLOPS if k in facts["device"]), None)
    facts["missing_modules"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    return facts


def _run_text(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _commit() -> str:
    """The checkout's commit; a copy without .git can name it in GPU_CHECK_COMMIT."""
    sha = _run_text(["git", "rev-parse", "--short", "HEAD"])
    if sha and _run_text(["git", "status", "--porcelain"]):
        sha += " (with uncommitted changes)"
    return sha or os.environ.get("GPU_CHECK_COMMIT", "unknown (no .git in this copy; set GPU_CHECK_COMMIT)")


# ----------------------------------------------------------------------------- part 1: CUDA tests
CUDA_TEST_FILES = ["tests/test_cuda.py", "tests/test_batched_augment.py", "tests/test_models_data.py"]


def cuda_tests(check: Check, deadline: float, marker: str = "cuda and not compile") -> dict:
    """``pytest -m <marker>`` on the files that hold CUDA tests, its log kept under --out; a timeout keeps
    what finished. Without pytest here, a copy in .gl/ (``make gpu-data`` puts one there) is used."""
    env = dict(os.environ)
    if importlib.util.find_spec("pytest") is None and os.path.isdir(os.path.join(ROOT, ".gl")):
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, ".gl"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-m", marker, "-v", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    log = os.path.join(check.args.out, f"pytest_{marker.replace(' ', '_')}.log")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and the inductor workers it started
        output, _ = proc.communicate()
        timed_out = True
    with open(log, "w") as f:
        f.write(output)
    if "No module named pytest" in output:
        raise RuntimeError("pytest is not installed for this python (make gpu-data copies one into .gl/)")
    lines = output.strip().splitlines()
    passed = [ln.split(" ")[0] for ln in lines if " PASSED" in ln]
    failed = [ln.split(" ")[0] for ln in lines if " FAILED" in ln or " ERROR" in ln]
    summary = lines[-1] if lines else ""
    result = {"summary": summary, "passed": passed, "failed": failed, "log": log}
    check.results[f"tests: {marker}"] = result
    if timed_out:
        raise RuntimeError(f"did not finish within its cap; {len(passed)} passed and {len(failed)} failed before "
                           f"that (see {log})")
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"{summary}; failed: {', '.join(failed[:6])} (see {log})")
    if check.cuda and not passed:
        raise RuntimeError(f"on a CUDA device every test was skipped ({summary}): the child sees no GPU")
    return result


def compile_tests(check: Check, deadline: float) -> dict:
    """The torch.compile test alone: a cold inductor compilation takes tens of seconds."""
    return cuda_tests(check, deadline, marker="cuda and compile")


# ----------------------------------------------------------------------------- part 2: throughput
def synthetic_split(n: int, side: int, crop: int) -> Split:
    """n random uint8 images of side x side, cropped to ``crop`` by the views."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    return Split(TensorImages(images, torch.zeros(n, dtype=torch.long)), 10, crop, CIFAR_MEAN, CIFAR_STD, True)


class Bench:
    """A training step of one configuration, run exactly as pretraining runs it."""

    def __init__(self, check: Check, clr: str, arch: str, crop: int, batch: int, compiled: bool,
                 extra: list[str] | None = None) -> None:
        side = crop if crop <= 64 else crop + crop // 7  # ImageNet-like: crops from larger images
        cfg, _, _ = resolve([f"--clr={clr}", f"--arch={arch}", f"--image_size={crop}", f"--batch_size={batch}",
                             "--faster_version", f"--precision={check.precision}", "--channels_last",
                             f"--device={check.device.type}", f"--cifar_stem={crop <= 64}", f"--compile={compiled}",
                             "--workers=0"] + (extra or []))
        torch.manual_seed(0)
        split = synthetic_split(16 * batch, side, crop)  # epochs long enough that their starts do not skew timings
        loader, self.setters = build_loader(cfg, split, DistInfo(), check.device)
        method, memory_format = build_model(cfg, split, DistInfo(), check.device)
        optimizer = build_optimizer(cfg.optimizer, method, 0.1, cfg.weight_decay, cfg.momentum)
        model = torch.compile(method) if compiled else method
        self.trainer = Trainer(StepParts(model, method, optimizer, lr_schedule(0.1, 10**6, 1, "constant"), check.device,
                                         precision=check.precision, memory_format=memory_format,
                                         rot_task_p=cfg.rot_task_p, seed=cfg.seed, accu_iter=cfg.accu_iter))
        self.loader, self.check, self.batch = loader, check, batch
        self.batches = self._cycle()

    def close(self) -> None:
        """Free the model, optimizer and data now (the batch generator holds a reference to the bench)."""
        self.batches.close()
        self.trainer = self.loader = self.batches = None
        gc.collect()
        if self.check.cuda:
            torch.cuda.empty_cache()

    def _cycle(self):
        epoch = 0
        while True:
            for s in self.setters:
                s.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def step(self, mark=None, diagnose: bool = False) -> None:
        views, index = next(self.batches)  # the views are made here, on the device
        if mark is not None:
            mark("augmentation")
        self.trainer.train_step(views, index, 0, 0, mark, diagnose=diagnose)

    def flops(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return float(counter.get_total_flops())

    def time_steps(self, steps: int, deadline: float) -> list[float]:
        """Seconds per step, stopping early at the deadline. On the GPU: CUDA events around each step, read
        after the last one, so timing adds no synchronisation of its own; on the CPU: the host clock."""
        if not self.check.cuda:
            out = []
            for _ in range(steps):
                if out and time.monotonic() + 2 * max(out) > deadline:
                    break
                t0 = time.perf_counter()
                self.step()
                out.append(time.perf_counter() - t0)
            return out
        events = []
        for _ in range(steps):
            if events and time.monotonic() > deadline - 5:
                break
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]


def rows_to_measure(check: Check) -> list[tuple[str, str, int, int, bool]]:
    """(method, arch, crop, batch, compiled) in order of value; the compiled row last (its compile may be slow)."""
    if check.quick:  # one row per code path: the contrastive loss, the momentum target, the memory bank, ResNet-50
        return [("simclr", "resnet18", 16, 32, False), ("byol", "resnet18", 16, 16, False),
                ("insdis", "resnet18", 16, 16, False), ("simclr", "resnet50", 64, 4, False)]
    rows = [("simclr", "resnet18", 32, 512, False), ("simclr", "resnet18", 32, 256, False),
            ("simclr", "resnet18", 32, 1024, False)]
    rows += [(clr, "resnet18", 32, 512, False) for clr in ("byol", "flatclr", "insdis")]
    return rows + [("simclr", "resnet50", 224, 128, False), ("simclr", "resnet18", 32, 512, True)]


def throughput(check: Check, deadline: float) -> dict:
    """One row per configuration, each measured on its own: a row that fails is noted and the rest go on."""
    rows: list[dict] = []
    check.results["throughput"] = {"rows": rows}  # filled as rows finish, so a later failure keeps them
    rows.append(augmentation_alone(check))
    for clr, arch, crop, batch, compiled in rows_to_measure(check):
        label = {"method": clr, "arch": arch, "px": crop, "batch": batch, "mode": "compiled" if compiled else "eager"}
        need = 0 if check.quick else (60 if compiled else 8)  # seconds a row needs at least (compile: more)
        if time.monotonic() + need > deadline:
            rows.append({**label, "note": "skipped: the part's time cap was reached"})
            continue
        print(f"  {clr} {arch} {crop}px batch {batch} {label['mode']}", flush=True)
        try:
            rows.append({**label, **measure_row(check, clr, arch, crop, batch, compiled, deadline, rows)})
        except Exception as err:  # noqa: BLE001 - reported in the row
            rows.append({**label, "note": f"failed: {type(err).__name__}: {str(err).strip()[:160]}"})
    return check.results["throughput"]


def measure_row(check: Check, clr: str, arch: str, crop: int, batch: int, compiled: bool, deadline: float,
                rows: list[dict]) -> dict:
    peak = check.results["facts"]["bf16_peak_tflops"]
    steps, warmup = (3, 1) if check.quick else (30, 5)
    gc.collect()
    base = 0
    if check.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    bench = Bench(check, clr, arch, crop, batch, compiled)
    try:
        flops = bench.flops() if not compiled else next(
            (r["gflop_step"] * 1e9 for r in rows if (r.get("method"), r.get("arch"), r.get("batch"), r.get("mode"))
             == (clr, arch, batch, "eager") and "gflop_step" in r), None)
        t0 = time.perf_counter()
        bench.step()  # the first step (a compiled one compiles here)
        check.sync()
        first_s = time.perf_counter() - t0
        for _ in range(warmup - 1):
            bench.step()
        check.sync()
        times = bench.time_steps(steps, deadline)
        sec = statistics.median(times)
        row = {"img_s": batch / sec, "ms_step": sec * 1e3, "steps_timed": len(times)}
        if compiled:
            row["compile_s"] = first_s
        elif not any("diag_ms" in r for r in rows):  # the first eager row: what a logging step's diagnostics add
            diag = []
            for _ in range(3 if check.quick else 7):
                check.sync()
                t1 = time.perf_counter()
                bench.step(diagnose=True)
                check.sync()
                diag.append(time.perf_counter() - t1)
            row["diag_ms"] = (statistics.median(diag) - sec) * 1e3
        if flops:
            row.update(gflop_step=flops / 1e9, tflop_s=flops / sec / 1e12)
            row["frac_bf16_peak"] = row["tflop_s"] / peak if peak and check.cuda else None
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30 if check.cuda else None
        return row
    finally:
        bench.close()


def augmentation_alone(check: Check) -> dict:
    """The batched SimCLR views (2 per image) of a 32 px batch on the device, images/s."""
    batch = 64 if check.quick else 512
    images = synthetic_split(batch, 32, 32).dataset.images.to(check.device)
    views = [BatchedViews(32, ViewSpec(0.0, 0.0), 0.5, 0.08, CIFAR_MEAN, CIFAR_STD) for _ in range(2)]
    g = torch.Generator(device=check.device).manual_seed(0)
    for _ in range(2):
        [v(images, g) for v in views]
    check.sync()
    times = []
    for _ in range(3 if check.quick else 20):
        t0 = time.perf_counter()
        [v(images, g) for v in views]
        check.sync()
        times.append(time.perf_counter() - t0)
    return {"method": "augmentation alone (2 views)", "px": 32, "batch": batch,
            "img_s": batch / statistics.median(times), "ms_step": statistics.median(times) * 1e3}


def input_pipeline(check: Check, deadline: float) -> dict:
    """Views/s of the ImageNet input paths on real JPEGs of about 500x375 (benchmarks/input_pipeline.py): the
    workers' share per CPU core and, on CUDA, the device half (decode_jpeg on the GPU, crops, colour work)."""
    import tempfile

    from benchmarks.input_pipeline import imagenet_sized_folder, measure

    with tempfile.TemporaryDirectory() as tmp:
        folder = imagenet_sized_folder(tmp, 16 if check.quick else 48)
        rows = measure(folder, 0.5 if check.quick else 2.0, "cuda" if check.cuda else "cpu")
    return {"rows": [{"method": r["path"], "mode": r["where"], "img_s": r["views_s"]} for r in rows]}


# ----------------------------------------------------------------------------- part 3: profile
def profile(check: Check, deadline: float) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = 32 if check.quick else 512
    bench = Bench(check, "simclr", "resnet18", 16 if check.quick else 32, batch, False)
    for _ in range(3):
        bench.step()
    check.sync()
    shares = phase_shares(check, bench, steps=3 if check.quick else 10)
    if time.monotonic() > deadline - 5:
        bench.close()
        return {"config": "simclr resnet18", "phase_shares": shares, "note": "no time left for the trace"}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            bench.step()
        check.sync()
    events = list(prof.key_averages())
    result = {"config": f"simclr resnet18 batch {batch} {check.precision} eager", "phase_shares": shares}
    if check.cuda:
        kernels = [e for e in events if _device_time(e) > 0 and "cuda" in str(getattr(e, "device_type", "")).lower()]
        busy = sum(_device_time(e) for e in kernels)
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if "cuda" in str(getattr(e, "device_type", "")).lower() and e.time_range.end > e.time_range.start]
        if not kernels or not spans:
            result["note"] = "the trace holds no device events (CUPTI unavailable?): no kernel table, no idle share"
        else:
            span = max(end for _, end in spans) - min(start for start, _ in spans)
            result["device_idle_share"] = max(0.0, 1 - busy / span)  # time between kernels: host gaps, syncs
            result["device_span_ms_5_steps"] = span / 1e3
        top = sorted(kernels, key=_device_time, reverse=True)[:15]
        result["top_kernels"] = [{"kernel": e.key[:90], "calls": e.count, "ms_total": _device_time(e) / 1e3,
                                  "share": _device_time(e) / max(busy, 1)} for e in top]
    else:
        ops = [e for e in events if e.self_cpu_time_total > 0]
        busy = sum(e.self_cpu_time_total for e in ops)
        top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        result["top_kernels"] = [{"kernel": e.key[:90], "calls": e.count, "ms_total": e.self_cpu_time_total / 1e3,
                                  "share": e.self_cpu_time_total / max(busy, 1)} for e in top]
    bench.close()
    return result


def _device_time(e) -> float:
    """Self device time (us) of a profiler event, under the names torch 2.4 to 2.11 give it."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(e, name, None)
        if value is not None:
            return float(value)
    return 0.0


def phase_shares(check: Check, bench: Bench, steps: int) -> dict:
    """Fraction of the step in each phase: CUDA events (or host clock) at each phase boundary."""
    totals: dict[str, float] = {}
    for _ in range(steps):
        stamps = [("start", _stamp(check))]
        bench.step(mark=lambda phase: stamps.append((phase, _stamp(check))))
        check.sync()
        for (_, a), (phase, b) in zip(stamps, stamps[1:]):
            totals[phase] = totals.get(phase, 0.0) + _elapsed(check, a, b)
    whole = sum(totals.values())
    return {phase: t / whole for phase, t in totals.items()}


def _stamp(check: Check):
    if check.cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(check: Check, a, b) -> float:
    return a.elapsed_time(b) / 1e3 if check.cuda else b - a


# ----------------------------------------------------------------------------- part 4: real data
def real_data(check: Check, deadline: float) -> dict:
    """SimCLR pretraining for as many epochs as fit, then kNN; the run goes to a temporary directory and only
    its metrics and the kNN record are copied under --out (checkpoints are large)."""
    if check.quick:
        data = ["--dataset_name=digits", "--image_size=16", "--batch_size=32", "--limit_train_batches=2"]
        epochs, source = 1, "digits (quick: the bundled 8x8 digits at 16 px)"
    else:
        root = check.args.data
        if not os.path.isdir(os.path.join(root, "train")):
            return {"note": f"skipped: no CIFAR-10 subset at {root} (make gpu-data copies ../shared/data/"
                            "cifar10-subset there; carry .data)"}
        n = sum(len(files) for _, _, files in os.walk(os.path.join(root, "train")))
        row = next((r for r in check.results.get("throughput", {}).get("rows", [])
                    if r.get("batch") == 512 and r.get("method") == "simclr" and r.get("mode") == "eager"
                    and "img_s" in r), None)
        img_s = row["img_s"] if row else 5000.0
        budget = max(10.0, deadline - time.monotonic() - 30)  # leave 30 s for loading and the kNN
        epochs = max(1, min(100, int(0.7 * budget * img_s / n)))
        data = ["--dataset_name=folder", f"--data={root}", "--batch_size=512"]
        source = f"CIFAR-10 subset at {root} ({n} training images)"
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        flags = data + ["--clr=simclr", "--arch=resnet18", "--faster_version", f"--precision={check.precision}",
                        f"--device={check.device.type}", f"--epochs={epochs}", "--workers=0", f"--log_dir={run}",
                        f"--save_every_n_epochs={epochs}", "--temperature=0.2"]
        t0 = time.perf_counter()
        if cli_main(flags) != 0:
            raise RuntimeError("pretraining failed: " + " ".join(flags))
        train_s = time.perf_counter() - t0
        if cli_main(["--train_mode=eval", "--transfer_mode=knn", f"--checkpoint_dir={run}", "--no-tsne",
                     f"--device={check.device.type}", "--workers=0"]) != 0:
            raise RuntimeError("kNN evaluation failed")
        knn = os.path.join(run, "eval", f"knn_epoch{epochs:04d}.json")
        record = json.load(open(knn))
        kept = os.path.join(check.args.out, "real_data")
        os.makedirs(kept, exist_ok=True)
        for path in (knn, os.path.join(run, "metrics.jsonl"), os.path.join(run, "config.yaml")):
            shutil.copy(path, kept)
    return {"source": source, "epochs": epochs, "pretrain_wall_s": train_s, "knn_top1": record["top1"],
            "command": "python main.py " + " ".join(f.replace(run, "RUN") for f in flags), "files": kept}


# ----------------------------------------------------------------------------- runner and report
# (title, key, function, cap in seconds, cap with --quick), in order of value.
PARTS = [("CUDA tests", "cuda_tests", cuda_tests, 75, 60), ("Throughput", "throughput", throughput, 120, 90),
         ("Input pipeline (views/s)", "input_pipeline", input_pipeline, 45, 40),
         ("Where the time goes", "profile", profile, 25, 40), ("Real data", "real_data", real_data, 60, 40),
         ("Compile test", "compile_tests", compile_tests, 75, 40)]  # --quick caps: room for a loaded CPU


class PartTimeout(Exception):
    """A part ran past its cap (raised by the interval timer in the main thread)."""


def _on_alarm(signum, frame):
    raise PartTimeout("ran past its cap")


def run(check: Check) -> dict:
    check.results["facts"] = device_facts(check)
    start = time.monotonic()
    status: dict = {}
    check.results["status"] = status
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for i, (title, key, fn, cap, quick_cap) in enumerate(PARTS, 1):
            cap = quick_cap if check.quick else cap
            parts = getattr(check.args, "parts", None)
            if parts and key not in parts:
                status[key] = {"status": "not asked", "why": f"--parts {','.join(parts)}"}
                continue
            left = check.args.budget - (time.monotonic() - start)
            if cap > left:
                status[key] = {"status": "skipped", "why": f"needs up to {cap} s, {left:.0f} s of the budget left"}
                print(f"[{i}/{len(PARTS)}] {title}: skipped ({status[key]['why']})", flush=True)
                continue
            print(f"[{i}/{len(PARTS)}] {title} (cap {cap} s) ...", flush=True)
            t0 = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, cap + 15)  # the part's own deadline is cap; this is the backstop
            try:
                check.results[key] = fn(check, t0 + cap)
                status[key] = {"status": "ok", "seconds": time.monotonic() - t0}
            except Exception as err:  # a failed part is reported, the others still run
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                status[key] = {"status": "failed", "seconds": time.monotonic() - t0,
                               "why": f"{type(err).__name__}: {first}"[:400], "trace": traceback.format_exc()[-2000:]}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            print(f"    {status[key]['status']} in {status[key]['seconds']:.1f} s"
                  + (f": {status[key]['why']}" if status[key]["status"] == "failed" else ""), flush=True)
            check.results["total_s"] = time.monotonic() - start
            write_report(check)  # after every part: a check killed later still leaves its figures
    finally:
        signal.signal(signal.SIGALRM, previous)
    check.results["total_s"] = time.monotonic() - start
    return check.results


def write_report(check: Check) -> str:
    md = report_md(check.results)
    with open(os.path.join(check.args.out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(check.args.out, "report.json"), "w") as f:
        json.dump(check.results, f, indent=1, default=str)
    return md


COLUMNS = ["method", "arch", "px", "batch", "mode", "img_s", "ms_step", "steps_timed", "gflop_step", "tflop_s",
           "frac_bf16_peak", "peak_mem_gib", "compile_s", "diag_ms", "note", "kernel", "calls", "ms_total", "share"]


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key.startswith("frac") or key == "share":
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _table(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k in r}
    keys = [k for k in COLUMNS if k in present] + sorted(present - set(COLUMNS))
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(_fmt(k, r.get(k)) for k in keys) + " |" for r in rows]


def report_md(results: dict) -> str:
    f = results["facts"]
    lines = [f"## GPU check: {f['device']}", "",
             f"device {f['device']}, driver {f['driver'] or '-'}, torch {f['torch']} (CUDA {f['cuda'] or '-'}), "
             f"commit {f['commit']}, {f['date']}; command `{f['command']}`; total {results.get('total_s', 0):.0f} s."
             + (f" Missing modules: {', '.join(f['missing_modules'])}." if f.get("missing_modules") else ""), "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for (title, key, *_rest) in PARTS:
        s = results["status"].get(key, {})
        lines.append(f"| {title} | {s.get('status', '-')} | {_fmt('seconds', s.get('seconds'))} | {s.get('why', '')} |")
    for key in ("cuda_tests", "compile_tests"):
        if key in results:
            lines += ["", f"{key.replace('_', ' ')}: {results[key]['summary']}"]
    if "throughput" in results:
        peak = f["bf16_peak_tflops"]
        lines += ["", f"### Throughput (faster_version, channels_last; dense bf16 peak {peak or 'unknown'} TFLOP/s)",
                  ""] + _table(results["throughput"]["rows"])
    if "input_pipeline" in results:
        lines += ["", "### Input pipeline (views/s; workers per CPU core, the device half in batches of 64)", ""] \
            + _table(results["input_pipeline"]["rows"])
    if "profile" in results:
        p = results["profile"]
        lines += ["", f"### Where the time goes ({p['config']})", "",
                  "Share of the step: " + ", ".join(f"{k} {v:.1%}" for k, v in p["phase_shares"].items())]
        if "device_idle_share" in p:
            lines.append(f"Device idle between kernels: {p['device_idle_share']:.1%} of "
                         f"{p['device_span_ms_5_steps']:.0f} ms (5 steps)")
        if "note" in p:
            lines.append(p["note"])
        if p.get("top_kernels"):
            lines += [""] + _table([{**k, "kernel": f"`{k['kernel']}`"} for k in p["top_kernels"]])
    if "real_data" in results:
        r = results["real_data"]
        lines += ["", "### Real data", ""] + ([r["note"]] if "note" in r else [
            f"{r['source']}: {r['epochs']} epoch(s) in {r['pretrain_wall_s']:.0f} s, kNN top-1 {r['knn_top1']:.2f}%",
            "", f"`{r['command']}`"])
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "gpu_check"))
    p.add_argument("--budget", type=float, default=360.0, help="seconds for all parts together")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="toy sizes (a CPU run in under a minute)")
    p.add_argument("--data", default=os.path.join(ROOT, ".data", "cifar10-subset"),
                   help="the CIFAR-10 subset for part 4 (ImageFolder layout: train/, test/)")
    p.add_argument("--parts", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="comma-separated part keys to run (default: all): " + ",".join(k for _, k, *_ in PARTS))
    args = p.parse_args()
    unknown = sorted(set(args.parts) - {k for _, k, *_ in PARTS})
    if unknown:
        print(f"error: unknown --parts {','.join(unknown)}; choose from {','.join(k for _, k, *_ in PARTS)}",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    check = Check(args)
    run(check)
    md = write_report(check)
    print("\n" + md)
    print(f"report: {os.path.join(args.out, 'report.md')} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
