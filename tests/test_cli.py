"""Command-line behaviour: FlatCLR's commands, booleans, yaml configs, one-line errors."""
import os
import subprocess
import sys

import pytest
import torch

from main import build_parser, resolve
from tests.conftest import ROOT


@pytest.mark.parametrize("flag, expected", [
    ([], False), (["--faster_version"], True), (["--faster_version=True"], True),
    (["--faster_version=False"], False), (["--faster_version=0"], False), (["--faster_version=1"], True),
    (["--faster_version", "False"], False), (["--no-faster_version"], False),
])
def test_booleans_mean_what_they_say(flag, expected):
    # FlatCLR parsed this with type=bool, so "--faster_version=False" became True.
    assert build_parser().parse_args(flag).faster_version is expected


@pytest.mark.parametrize("argv, expect", [
    ("--dataset_name=cifar10 --clr=simclr --faster_version=True",
     dict(dataset_name="cifar10", clr="simclr", faster_version=True)),
    ("--dataset_name=cifar10 --clr=flatclr --faster_version=False",
     dict(dataset_name="cifar10", clr="flatclr", faster_version=False)),
    ("--dataset_name=imagenet --clr=simclr", dict(dataset_name="imagenet", clr="simclr", arch="resnet50")),
    ("--dataset_name=imagenet --clr=flatclr", dict(dataset_name="imagenet", clr="flatclr", batch_size=512)),
    ("--model=res18 --train_mode=ssl --fp16_precision", dict(arch="resnet18", train_mode="pretrain",
                                                              precision="fp16")),
])
def test_flatclr_readme_pretraining_commands_parse(argv, expect):
    cfg, resume, _ = resolve(argv.split())
    assert resume is None
    for key, value in expect.items():
        assert getattr(cfg, key) == value
    assert cfg.lr == 0.3 and cfg.learning_rate_scaling == "linear"  # 0.6 at batch 512, FlatCLR's default


def test_yaml_sets_defaults_and_command_line_wins(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("clr: byol\nbatch_size: 64\ntemperature: 0.2\n")
    cfg, _, _ = resolve([f"--config={cfg_file}", "--batch_size=32"])
    assert (cfg.clr, cfg.batch_size, cfg.temperature) == ("byol", 32, 0.2)


def test_every_shipped_config_resolves():
    configs = sorted(os.listdir(os.path.join(ROOT, "configs")))
    assert "quickstart.yaml" in configs and len(configs) >= 17
    for name in configs:
        resolve([f"--config={os.path.join(ROOT, 'configs', name)}"])


def _run(args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--clr=moco"], "invalid choice: 'moco'"),
    (["--dataset_name=cifar10", "--data=/nonexistent/ds"],
     "cifar10 not found in /nonexistent/ds/cifar-10-batches-py; pass --download"),
    (["--dataset_name=folder", "--data=/nonexistent/ds"], "no image folder at /nonexistent/ds/train"),
    (["--batch_size=1"], "--batch_size must be at least 2"),
    (["--faster_version=maybe"], "expected a boolean"),
    (["--train_from=checkpoint_0001.pth.tar"], "--train_from needs --log_dir"),
    (["--dataset_name=digits", "--batch_size=4096", "--device=cpu"], "larger than the dataset (1437 images)"),
])
def test_user_errors_are_one_line_with_exit_status_2(args, message, tmp_path):
    proc = _run(args + [f"--results_dir={tmp_path}"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_yaml_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clr: simclr\nlearning_rate: 0.1\n")
    proc = _run([f"--config={bad}"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: unknown key(s) in {bad}: learning_rate; keys are flag names as in --help"


def test_cuda_out_of_memory_is_one_line_naming_the_flag(monkeypatch, capsys):
    import engine.final_eval
    import main as cli

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)\n"
                                          "See documentation for Memory Management")

    monkeypatch.setattr(engine.final_eval, "pretrain", oom)
    monkeypatch.setattr(cli, "evaluate", oom)
    assert cli.main(["--dataset_name=digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: CUDA ran out of memory (CUDA out of memory. Tried")
    assert "lower --batch_size" in err
    assert cli.main(["--train_mode=eval", "--checkpoint_dir=none", "--dataset_name=digits"]) == 2
    assert "lower --fc_micro_batch_size (images per device and pass" in capsys.readouterr().err


def test_only_a_recorded_schedule_mapping_is_skipped_in_yaml(tmp_path):
    from common.errors import UserError

    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule: constant\n")  # meant --scheduler: still an unknown key
    with pytest.raises(UserError, match="unknown key.*schedule"):
        resolve([f"--config={bad}"])
    record = tmp_path / "run.yaml"
    record.write_text("epochs: 3\nschedule: {kind: cosine, warmup_steps: 1}\n")
    assert resolve([f"--config={record}"])[0].epochs == 3


def test_a_method_flag_that_reuses_a_core_flag_is_refused(monkeypatch):
    from dataclasses import dataclass

    from common.settings import setting
    from models.methods import METHODS

    @dataclass(frozen=True)
    class Clash:
        temperature: float = setting(0.5, "again")

    clash = METHODS["simclr"].__class__(display="Clash", build=None, settings=Clash)
    monkeypatch.setitem(METHODS, "clash", clash)
    with pytest.raises(ValueError, match="method clash declares --temperature, which is already a flag of the tool"):
        build_parser()


def test_the_activation_estimate_equals_what_autograd_keeps():
    """engine/memory.py's meta-device estimate against the bytes autograd really saves (batch 4 minus batch 2, so
    that the weights it saves cancel), for a CIFAR-stem ResNet-18 at 32 px and an ImageNet-stem one at 64 px."""
    from engine.memory import activation_bytes
    from models.backbones import build_backbone

    def saved(net, size, batch):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(batch, 3, size, size))
        return sum(storages.values())

    for cifar_stem, size in ((True, 32), (False, 64)):
        torch.manual_seed(0)
        real = build_backbone("resnet18", cifar_stem)[0].train()
        with torch.device("meta"):
            meta = build_backbone("resnet18", cifar_stem)[0]
        per_image = (saved(real, size, 4) - saved(real, size, 2)) / 2
        assert abs(activation_bytes(meta, size) / per_image - 1) < 0.05


def test_a_step_that_cannot_fit_the_device_is_refused_before_anything_is_allocated(monkeypatch, tmp_path, capsys):
    import engine.memory as memory
    from main import main
    from tests.conftest import TINY

    monkeypatch.setattr(memory, "device_memory", lambda device: 2**30)  # a 1 GiB device
    args = TINY + ["--clr=simclr", "--image_size=64", "--batch_size=64", f"--results_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a step needs about ") and \
        "fp32 activations for 64 images x 2 views of 64 px through resnet18" in err[0] and \
        "more than this machine's 1.0 GiB; pass --precision bf16 (about half the activations), or --accu_iter 4 " \
        "(micro-batches of 16, the same global batch), or more processes" in err[0]
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(memory, "device_memory", lambda device: 2**40)
    assert memory.check_fits(resolve(args)[0], 1000, 64, False, 1, torch.device("cpu")) is None


def test_help_is_grouped_by_concern_and_other_tools_spellings_are_only_in_help_all_and_the_docs(capsys):
    import re

    from cli.compat import ALIASES, SEED_FLAGS
    from cli.parser import build_parser
    from tests.conftest import ROOT

    core = build_parser().format_help()
    for group in ("mode:", "data:", "model:", "objective:", "optimisation:", "evaluation (--train_mode=eval):",
                  "run:", "SimCLR (--clr simclr):", "BYOL (--clr byol):"):
        assert f"\n{group}" in core, group
    spellings = list(ALIASES) + list(SEED_FLAGS)
    assert not [s for s in spellings if re.search(re.escape(s) + r"\b(?!_)", core)]
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--help-all"])
    assert done.value.code == 0
    full = capsys.readouterr().out
    docs = open(os.path.join(ROOT, "docs", "compatibility.md")).read()
    for spelling in spellings:
        assert re.search(re.escape(spelling) + r"\b(?!_)", full), spelling
        assert f"`{spelling}" in docs, spelling
    for spelling, (dest, _) in ALIASES.items():
        assert f"= --{dest} (" in full
        assert re.search(rf"\| `{re.escape(spelling)}` \| `--{dest}`", docs), spelling


@pytest.mark.parametrize("argv, dest, value", [
    (["--t=0.3"], "temperature", 0.3), (["--exp=somewhere"], "log_dir", "somewhere"),
    (["--model=ResNet18"], "arch", "resnet18"), (["--dataset=digits"], "dataset_name", "digits"),
    (["--rottlr=0.5", "--adpt"], "rot_pred_decay", True), (["--rottlr_p=0.25"], "rot_task_p", 0.25),
    (["--save_freq=7"], "save_every_n_steps", 7), (["--log_freq=9"], "log_every_n_steps", 9),
])
def test_each_alias_sets_its_one_flag_and_errors_name_the_flag(argv, dest, value):
    from cli.resolve import resolve
    from common.errors import UserError

    cfg, _, _ = resolve(["--dataset_name=digits", *argv])
    assert getattr(cfg, dest) == value
    spelling = argv[-1].split("=")[0]
    if "=" in argv[-1] and dest not in ("log_dir", "arch", "dataset_name"):
        with pytest.raises(UserError, match=rf"^argument --{dest}: "):
            resolve([f"{spelling}=oops"])


def test_workers_default_to_the_machine_and_are_never_saved(tmp_path, monkeypatch):
    import yaml

    from engine.runlog import write_config
    from engine.settings import machine_workers

    cfg, _, _ = resolve(["--dataset_name=digits"])
    cores = len(os.sched_getaffinity(0))
    assert cfg.workers == machine_workers() == min(8, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores on the node: none each
    assert resolve(["--dataset_name=digits"])[0].workers == 0
    write_config(str(tmp_path), vars(cfg))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "workers" not in saved and "workers" not in saved["sources"] and saved["dataset_name"] == "digits"


def test_loss_chooses_the_method_that_trains_with_it_and_refuses_what_none_does(tmp_path, capsys):
    from main import main
    from tests.conftest import TINY

    chosen, _, _ = resolve(["--clr=simclr", "--loss=flatnce"])
    plain, _, _ = resolve(["--clr=flatclr"])
    assert chosen.clr == "flatclr" and chosen.loss is None
    assert {k: v for k, v in vars(chosen).items() if k != "sources"} == {
        k: v for k, v in vars(plain).items() if k != "sources"}  # the same run as --clr flatclr
    assert chosen.sources["clr"] == "--clr simclr --loss flatnce" and "loss" not in chosen.sources
    assert resolve(["--clr=simclr", "--loss=infonce"])[0].clr == "simclr"
    for argv, message in ((["--clr=flatclr", "--loss=infonce"],
                           "--clr flatclr trains with flatnce; --loss infonce is --clr simclr: pass that instead"),
                          (["--clr=byol", "--loss=flatnce"],
                           "--loss flatnce chooses the loss of simclr, flatclr; --clr byol trains with its own loss: "
                           "drop --loss"),
                          (["--clr=insdis", "--loss=infonce"],
                           "--loss infonce chooses the loss of simclr, flatclr; --clr insdis trains with its own "
                           "loss: drop --loss")):
        assert main(TINY + argv + [f"--results_dir={tmp_path}"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert os.listdir(tmp_path) == []  # nothing written by a refused command
    start = TINY + ["--clr=simclr", "--loss=flatnce", "--run_id=000001", f"--results_dir={tmp_path}"]
    assert main(start + ["--epochs=1"]) == 0
    assert os.listdir(tmp_path / "digits") == ["16_FlatCLR"]
    assert main(start + ["--epochs=2", "--train_from=latest"]) == 0  # the starting command resumes it
    run = tmp_path / "digits" / "16_FlatCLR" / "000001"
    assert os.listdir(run.parent) == ["000001"] and (run / "checkpoint_0002.pth.tar").exists()
    capsys.readouterr()
    assert main([f"--log_dir={run}", "--train_from=latest", "--loss=infonce", "--epochs=3"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run}/checkpoint_0002.pth.tar was trained with --loss=its method's own loss (flatclr), not infonce; "
        "drop --loss to resume, or start a new run")
