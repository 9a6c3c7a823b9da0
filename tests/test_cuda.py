"""CUDA behaviour: CPU equality, bf16, torch.compile, no hidden host syncs, device-portable checkpoints, OOM.

Every test here is marked ``cuda`` and skipped without a CUDA device, so the CPU suite stays green;
``pytest -m cuda`` (part 1 of benchmarks/gpu_check.py) runs them on a GPU node. Tests that make sense on both
devices (the fp32 logits under autocast, the augmentation's parameter distributions) live with their CPU
twins, parametrized over ``tests.conftest.DEVICES``.
"""
import copy
from dataclasses import fields

import pytest
import torch

from data import ViewSpec
from data.batched_augment import BatchedViews
from engine.checkpoint import load_checkpoint
from main import main, resolve
from models import METHODS, build_method
from tests.conftest import HAS_CUDA, TINY

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

SMALL = ["--arch=resnet18", "--proj_hidden_dim=64", "--proj_out_dim=32", "--pred_hidden_dim=64",
         "--insdis_num_negatives=64", "--insdis_loss=softmax"]  # softmax: NCE's noise draw differs by device


@pytest.fixture
def strict_fp32():
    """TF32 off for the comparison: cuDNN convolutions default to TF32 on Ampere and later."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _method(clr: str):
    cfg, _, _ = resolve([f"--clr={clr}"] + SMALL)
    torch.manual_seed(0)
    return build_method(cfg, num_data=64, cifar_stem=True)


def _batch(n=16, size=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)], torch.arange(n)


def _loss_and_grads(method, views, index, device, autocast=None, dtype=torch.float32):
    m = copy.deepcopy(method).to(device=device, dtype=dtype)
    with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
        loss, _, _ = m([v.to(device=device, dtype=dtype) for v in views], index.to(device))
    loss.backward()
    return loss.detach().double().cpu(), {k: p.grad.double().cpu() for k, p in m.named_parameters()
                                          if p.grad is not None}


@pytest.mark.parametrize("clr", list(METHODS))
def test_fp32_loss_and_gradients_on_cuda_are_as_exact_as_the_cpus(clr, strict_fp32):
    """Against a float64 CPU reference, CUDA's fp32 gradients must be about as close as the CPU's fp32 ones.

    Comparing CUDA with the CPU directly cannot work: at batch 16 the BN layers make fp32 gradients
    ill-conditioned (the CPU's own fp32 gradient is ~1e-3 from float64 here), and a bias feeding a BN has a
    true gradient of zero, so its fp32 value is pure rounding noise on either device (seen on an H100).
    Measured on an H100 (torch 2.11, TF32 off): CUDA's error equals the CPU's except in the weight gradients
    of layer2's first block (stride 2; the same with cuDNN disabled), up to 3e-4 of the whole gradient's norm
    for BYOL against the CPU's 1e-6; the bounds below leave that room, and a real device bug is off by O(1),
    far beyond them."""
    method, (views, index) = _method(clr), _batch()
    ref_loss, ref = _loss_and_grads(method, views, index, "cpu", dtype=torch.float64)
    cpu_loss, cpu = _loss_and_grads(method, views, index, "cpu")
    gpu_loss, gpu = _loss_and_grads(method, views, index, "cuda")
    assert abs(gpu_loss - ref_loss) <= 2 * abs(cpu_loss - ref_loss) + 1e-5 * abs(ref_loss), \
        (float(gpu_loss), float(cpu_loss), float(ref_loss))
    assert ref.keys() == cpu.keys() == gpu.keys() and len(ref) > 10
    total = torch.cat([g.flatten() for g in ref.values()]).norm()

    def err(grads):  # per tensor and over all, in units of the whole reference gradient's norm
        per = {k: float((grads[k] - g).norm() / total) for k, g in ref.items()}
        return per, float(torch.cat([(grads[k] - g).flatten() for k, g in ref.items()]).norm() / total)

    (cpu_per, cpu_all), (gpu_per, gpu_all) = err(cpu), err(gpu)
    assert gpu_all <= 3 * cpu_all + 1e-3, (gpu_all, cpu_all)
    excess = {k: gpu_per[k] - 10 * cpu_per[k] for k in ref}  # a wrong tensor stands out against the CPU's error
    worst = max(excess, key=excess.get)
    assert excess[worst] <= 1e-3, (worst, gpu_per[worst], cpu_per[worst])


@pytest.mark.parametrize("clr", list(METHODS))
def test_bf16_autocast_loss_is_within_two_percent_of_fp32(clr, strict_fp32):
    method, (views, index) = _method(clr), _batch()
    fp32, _ = _loss_and_grads(method, views, index, "cuda")
    bf16, _ = _loss_and_grads(method, views, index, "cuda", autocast=torch.bfloat16)
    assert abs(bf16 - fp32) <= 0.02 * abs(fp32), (float(bf16), float(fp32))


def _fast_path_trainer(clr: str, compiled: bool = False, precision: str = "bf16", blur: bool = False,
                       extra: tuple[str, ...] = ()):
    """A Trainer and loader of the device-resident pipeline on digits, as pretraining builds them."""
    from common.distributed import DistInfo
    from data.datasets import load_split
    from engine.optim import build_optimizer, lr_schedule
    from engine.pretrain import build_loader
    from engine.trainer import StepParts, Trainer

    cfg, _, _ = resolve(TINY + [f"--clr={clr}", "--faster_version", "--device=cuda", f"--blur={blur}", *extra])
    split = load_split("digits", "unused", train=True, pretrain=True, image_size=16)
    loader, setters = build_loader(cfg, split, DistInfo(), torch.device("cuda"))
    torch.manual_seed(0)
    method = build_method(cfg, num_data=len(split.dataset), cifar_stem=True).cuda()
    model = torch.compile(method) if compiled else method
    trainer = Trainer(StepParts(model, method, build_optimizer("lars", method, 0.1, 1e-6, 0.9),
                                lr_schedule(0.1, 1000, 1, "cosine"), torch.device("cuda"), precision=precision,
                                memory_format=torch.channels_last, rot_task_p=cfg.rot_task_p))
    return trainer, loader, setters


@pytest.mark.compile
def test_compiled_step_equals_eager_and_a_second_epoch_does_not_recompile():
    """One compilation (it takes most of this test's time); graphs counted by dynamo's own counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager, loader, setters = _fast_path_trainer("simclr", precision="fp32")
    views, index = next(iter(loader))
    expected = float(eager.train_step(views, index, 0, 0)["loss"])
    torch._dynamo.reset()
    counters.clear()
    compiled, loader, setters = _fast_path_trainer("simclr", compiled=True, precision="fp32")
    graphs = []
    for epoch in range(2):
        for s in setters:
            s.set_epoch(epoch)
        for i, (views, index) in enumerate(loader):
            loss = float(compiled.train_step(views, index, epoch, i)["loss"])
            if epoch == 0 and i == 0:
                assert abs(loss - expected) <= 1e-3 * abs(expected), (loss, expected)
            if i == 2:
                break
        graphs.append(sum(counters["stats"].values()) + sum(counters["recompiles"].values()))
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs  # the second epoch compiled nothing new


def test_a_fast_path_step_has_no_hidden_host_sync():
    """`set_sync_debug_mode("error")` raises on synchronising CUDA calls the runtime reports: blocking copies
    in either direction (.item(), .cpu(), a tensor made from a Python list on the GPU), nonzero, stream
    synchronisation. What it cannot see: the documented once-per-step check waits on a CUDA *event*
    (cudaEventSynchronize is not reported); a non-blocking copy from pageable host memory, which blocks
    without being reported; waits inside collectives (NCCL) or the caching allocator (cudaFree under memory
    pressure). Every method runs with blur off; SimCLR once more with blur on (its batched kernel path), and
    with the meta-learning heads and both rotation tricks."""
    meta = [("simclr", False, ("--head=PN", "--rot_task_p=0.5")),
            ("flatclr", False, ("--head=R2D2", "--rot_pred_weight=0.5", "--rot_pred_decay"))]
    for clr, blur, extra in [(clr, False, ()) for clr in METHODS] + [("simclr", True, ())] + meta:
        trainer, loader, _ = _fast_path_trainer(clr, blur=blur, extra=extra)
        batches = iter(loader)
        for i in range(2):  # warm-up: first-step work (InsDis's Z estimate, cuDNN autotuning) may sync
            trainer.train_step(*next(batches), 0, i)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # the batch's views are made inside the region too
            trainer.train_step(*next(batches), 0, 2)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_batched_augmentation_on_cuda_equals_the_cpu_for_the_same_parameters(strict_fp32):
    images = torch.randint(0, 256, (64, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for spec in (ViewSpec(0.5, 0.0), ViewSpec(0.1, 0.2), ViewSpec(1.0, 0.0)):
        views = BatchedViews(32, spec, jitter_strength=1.0, min_scale=0.08, mean=(0.5,) * 3, std=(0.25,) * 3)
        p = views.sample(64, 40, 40, torch.Generator().manual_seed(1), "cpu")
        on_gpu = type(p)(**{f.name: getattr(p, f.name).cuda() for f in fields(p)})
        cpu, gpu = views.apply(images, p), views.apply(images.cuda(), on_gpu).cpu()
        assert torch.allclose(gpu, cpu, rtol=1e-4, atol=1e-4), (gpu - cpu).abs().max()


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_moves_between_cuda_and_cpu(first, second, tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--clr=byol", "--epochs=2", "--stop_after_epoch=1", f"--device={first}",
                        f"--log_dir={run}"]) == 0
    assert main([f"--log_dir={run}", "--train_from=latest", f"--device={second}"]) == 0
    assert load_checkpoint(str(run / "checkpoint_0002.pth.tar"))["epoch"] == 2  # the tool's loader: weights_only
    state = torch.load(run / "checkpoint_0002.pth.tar", weights_only=True)  # where the tensors were saved from
    assert state["args"]["device"] == second
    assert {v.device.type for v in state["model"].values()} == {second}


def test_cuda_out_of_memory_is_one_line_and_exit_2(tmp_path, capfd):
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.001)  # ~80 MB of an 80 GB card: the first batch cannot fit
    try:
        code = main(TINY[:-1] + ["--device=cuda", "--batch_size=1024", "--image_size=32", "--epochs=1",
                                 f"--results_dir={tmp_path}"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: CUDA ran out of memory (") and "lower --batch_size" in err[-1]
