"""The shape of the code: a method is a plugin registered in one dict, and imports flow one way."""
import ast
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import list_checkpoints
from losses import LOSSES, ContrastiveLogits
from main import build_parser, main
from common.settings import setting
from models.methods import METHODS, MethodSpec, SSLMethod
from tests.conftest import ROOT, TINY

PACKAGES = ("cli", "common", "data", "engine", "losses", "models")


class CosineToy(SSLMethod):
    """A negative-free toy: pull each view's projection towards the other views' (stop-gradient)."""

    def __init__(self, backbone, projector, n_views, scale):
        super().__init__(backbone, projector, n_views)
        self.scale = scale

    def objective(self, views, index):
        z = F.normalize(self.embed(views), dim=1).chunk(self.n_views)
        loss = -sum((z[i] * z[j].detach()).sum(dim=1).mean() for i in range(self.n_views)
                    for j in range(self.n_views) if i != j) * self.scale
        return loss, {"pos_sim": -loss.detach() / self.scale / (self.n_views * (self.n_views - 1))}


@dataclass(frozen=True)
class CosineToySettings:
    cosine_toy_scale: float = setting(1.0, "multiplies the toy loss", identity=True)


def _build_toy(cfg, backbone, projector, dim, num_data):
    return CosineToy(backbone, projector, cfg.n_views, TOY.own(cfg).cosine_toy_scale)


TOY = MethodSpec(display="CosineToy", build=_build_toy, summary="test-only cosine loss", settings=CosineToySettings)


def test_a_method_registered_from_outside_trains_saves_resumes_and_shows_in_help(monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "cosine_toy", TOY)
    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "--cosine_toy_scale" in help_text and "CosineToy (--clr cosine_toy)" in help_text
    assert "cosine_toy (CosineToy: test-only cosine loss)" in help_text
    common = TINY + ["--clr", "cosine_toy", "--epochs=2", "--cosine_toy_scale=0.5", f"--results_dir={tmp_path}"]
    assert main(common + [f"--log_dir={tmp_path / 'straight'}"]) == 0
    assert main(common + [f"--log_dir={tmp_path / 'cut'}", "--stop_after_epoch=1"]) == 0
    # the toy's own flag is part of its identity: a resume that changes it is refused
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest", "--cosine_toy_scale=2"]) == 2
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint_0002.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint_0002.pth.tar", weights_only=True)
    assert a["clr"] == "cosine_toy" and a["args"]["cosine_toy_scale"] == 0.5
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert sorted(list_checkpoints(str(tmp_path / "cut"))) == [1, 2]
    assert main(TINY + ["--clr", "cosine_toy", "--epochs=1", f"--results_dir={tmp_path / 'r'}"]) == 0
    assert os.listdir(tmp_path / "r" / "digits") == ["16_CosineToy"]  # display name from the spec


class QueueToy(SSLMethod):
    """A MoCo-shaped toy: each first view's projection against the second view's (detached) and a queue of
    the keys of earlier steps, refreshed in ``after_step`` from the step's outputs."""

    def __init__(self, backbone, projector, n_views, temperature, size, dim):
        super().__init__(backbone, projector, n_views)
        self.temperature = temperature
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=torch.Generator().manual_seed(0)),
                                                  dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # on the device: no host read a step

    def objective(self, views, index):
        q, k = F.normalize(self.embed(views[:2]), dim=1).chunk(2)
        k = k.detach()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        return loss, {"pos_sim": (q * k).sum(1).mean().detach()}, {"keys": k}

    @torch.no_grad()
    def after_step(self, step, total_steps, outputs):
        keys = outputs["keys"]
        slots = (self.ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[slots] = keys.to(self.queue.dtype)
        self.ptr.copy_((self.ptr + len(keys)) % len(self.queue))


@dataclass(frozen=True)
class QueueToySettings:
    queue_toy_size: int = setting(40, "keys in the queue", at_least=1, identity=True)


def _build_queue_toy(cfg, backbone, projector, dim, num_data):
    return QueueToy(backbone, projector, cfg.n_views, cfg.temperature, QUEUE_TOY.own(cfg).queue_toy_size, dim)


QUEUE_TOY = MethodSpec(display="QueueToy", build=_build_queue_toy, summary="test-only queue of negatives",
                       settings=QueueToySettings, defaults={"temperature": 0.2, "proj_out_dim": 24})


def test_a_method_with_a_queue_sets_its_defaults_updates_from_its_outputs_and_resumes_mid_epoch_bitwise(
        monkeypatch, tmp_path, capsys):
    import yaml

    from engine.trainer import Trainer
    from main import resolve

    monkeypatch.setitem(METHODS, "queue_toy", QUEUE_TOY)
    help_text = " ".join(build_parser().format_help().split())
    assert "QueueToy (--clr queue_toy): --queue_toy_size QUEUE_TOY_SIZE keys in the queue" in help_text
    tiny = [a for a in TINY if not a.startswith("--proj_out_dim")] + ["--clr=queue_toy"]
    cfg, _, _ = resolve(tiny)  # (a) the method's own defaults, below the command line and --config
    assert (cfg.temperature, cfg.proj_out_dim, cfg.sources["temperature"]) == (0.2, 24, "the default of --clr "
                                                                                        "queue_toy")
    (tmp_path / "c.yaml").write_text("temperature: 0.3\n")
    assert resolve(tiny + [f"--config={tmp_path / 'c.yaml'}"])[0].temperature == 0.3
    assert resolve(tiny + [f"--config={tmp_path / 'c.yaml'}", "--temperature=0.4"])[0].temperature == 0.4
    assert resolve(TINY + ["--clr=simclr"])[0].temperature == 0.1  # another method keeps the tool's default

    steps = []  # (b) the queue takes each step's keys from after_step's outputs, in order
    real = QueueToy.after_step

    def spy(self, step, total_steps, outputs):
        steps.append((int(self.ptr), outputs["keys"].clone()))
        real(self, step, total_steps, outputs)
    monkeypatch.setattr(QueueToy, "after_step", spy)
    common = tiny + ["--epochs=2", "--limit_train_batches=3", "--lr=0.05", "--learning_rate_scaling=none"]
    straight = tmp_path / "straight"
    assert main(common + [f"--log_dir={straight}"]) == 0
    end = torch.load(straight / "checkpoint_0002.pth.tar", weights_only=True)
    assert [p for p, _ in steps] == [(16 * i) % 40 for i in range(6)]
    queue = end["model"]["queue"]
    for ptr, keys in steps[-2:]:  # the last two steps' keys sit where the pointer was
        slots = (ptr + torch.arange(16)) % 40
        assert torch.equal(queue[slots], keys)
    assert int(end["model"]["ptr"]) == (16 * 6) % 40
    assert yaml.safe_load((straight / "config.yaml").read_text())["sources"]["temperature"] == \
        "the default of --clr queue_toy"

    real_step = Trainer.train_step  # (c) SIGTERM in step 5 (epoch 2, step 2): a mid-epoch checkpoint, then resume

    def train_step(self, *args, **kwargs):
        if self.step + 1 == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    cut = tmp_path / "cut"
    assert main(common + [f"--log_dir={cut}"]) == 3
    assert sorted(os.listdir(cut)).count("checkpoint_0001_step000002.pth.tar") == 1
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main([f"--log_dir={cut}", "--train_from=latest"]) == 0
    resumed = torch.load(cut / "checkpoint_0002.pth.tar", weights_only=True)
    for key, value in end["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["args"]["temperature"] == 0.2 and resumed["args"]["proj_out_dim"] == 24


class QueueLossToy(QueueToy):
    """The queue toy with a choice of loss: --loss infonce (its own) or flatnce on the same logits."""

    def __init__(self, *args, loss):
        super().__init__(*args)
        self.loss_fn = LOSSES[loss]

    def objective(self, views, index):
        q, k = F.normalize(self.embed(views[:2]), dim=1).chunk(2)
        k = k.detach()
        logits = ContrastiveLogits(pos=(q * k).sum(1, keepdim=True) / self.temperature,
                                   neg=q @ self.queue.T / self.temperature, temperature=self.temperature)
        return self.loss_fn(logits), {"pos_sim": (q * k).sum(1).mean().detach()}, {"keys": k}


def _build_queue_loss_toy(cfg, backbone, projector, dim, num_data):
    return QueueLossToy(backbone, projector, cfg.n_views, cfg.temperature, 40, dim, loss=cfg.loss or "infonce")


def test_a_method_that_takes_either_loss_reads_it_and_names_its_runs_by_it(monkeypatch, tmp_path, capsys):
    from main import resolve

    spec = MethodSpec(display="QueueLossToy", build=_build_queue_loss_toy, summary="test-only queue, either loss",
                      losses={"infonce": "qloss_toy", "flatnce": "qloss_toy"}, loss="infonce")
    monkeypatch.setitem(METHODS, "qloss_toy", spec)
    flat, _, _ = resolve(TINY + ["--clr=qloss_toy", "--loss=flatnce"])
    assert (flat.clr, flat.loss, spec.display_for(flat)) == ("qloss_toy", "flatnce", "QueueLossToy-FlatNCE")
    own, _, _ = resolve(TINY + ["--clr=qloss_toy", "--loss=infonce"])  # its own loss: the default, as recorded
    assert (own.loss, spec.display_for(own)) == (None, "QueueLossToy")
    for loss in ("flatnce", "infonce"):
        assert main(TINY + ["--clr=qloss_toy", f"--loss={loss}", "--epochs=1", f"--results_dir={tmp_path}"]) == 0
    assert sorted(os.listdir(tmp_path / "digits")) == ["16_QueueLossToy", "16_QueueLossToy-FlatNCE"]
    (run,) = os.listdir(tmp_path / "digits" / "16_QueueLossToy-FlatNCE")
    ckpt = torch.load(tmp_path / "digits" / "16_QueueLossToy-FlatNCE" / run / "checkpoint_0001.pth.tar",
                      weights_only=True)
    assert ckpt["args"]["loss"] == "flatnce"
    assert main([f"--log_dir={tmp_path / 'digits' / '16_QueueLossToy-FlatNCE' / run}", "--train_from=latest",
                 "--loss=infonce", "--epochs=2"]) == 2  # the loss is the run's identity
    assert "loss" in capsys.readouterr().err


def _project_imports() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its file (top level or inside functions)."""
    files = {}
    for top in PACKAGES + ("main.py",):
        path = os.path.join(ROOT, top)
        for dirpath, _, names in os.walk(path) if os.path.isdir(path) else [(ROOT, [], [top])]:
            for name in names:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
                    files[rel.removesuffix(".__init__")] = os.path.join(dirpath, name)
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {n for n in names if n in files and n != module}
        graph[module] = edges
    return graph


def test_no_import_cycle_among_project_modules():
    graph = _project_imports()
    assert {"engine.pretrain", "engine.evaluate", "models.methods.byol", "common.errors"} <= set(graph)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_layers_import_downwards_only():
    graph = _project_imports()
    below = {"common": set(), "losses": {"common"}, "data": {"common"}, "models": {"common", "data", "losses"},
             "engine": {"common", "data", "losses", "models"}, "cli": {"common", "data", "losses", "models", "engine"}}
    for module, deps in graph.items():
        layer = module.split(".")[0]
        if layer in below:
            wrong = {d for d in deps if d.split(".")[0] not in below[layer] | {layer}}
            assert not wrong, f"{module} imports {sorted(wrong)}"
    assert "engine.evaluate" not in graph["engine.pretrain"] and "engine.pretrain" not in graph["engine.evaluate"]
    code = "import sys, models, data, losses; sys.exit(any(m.split('.')[0] == 'engine' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ----------------------------------------------------------------------------- the shape, measured on the AST
MAX_FUNCTION_LINES = 60
LONG_BY_NAME: set[str] = set()  # generated tables or declarative lists allowed to be longer (at most three)
SKIPPED = ("tests", "benchmarks", ".venv", ".git", ".data", ".gl", "results", "datasets")


def _sources() -> dict[str, str]:
    """Every project .py file outside tests/ and benchmarks/: {relative path: source}."""
    found = {}
    for dirpath, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (dirpath == ROOT and d in SKIPPED)]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found[os.path.relpath(path, ROOT)] = open(path).read()
    return found


def _shape_violations(sources: dict[str, str], declared: set[str]) -> list[str]:
    """What breaks the shape rules: long functions, a long main.py, torch.load outside one module, and
    getattr(cfg, <declared setting>, default)."""
    found, loaders = [], set()
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and node.name not in LONG_BY_NAME:
                    found.append(f"{path}: {node.name} is {length} lines")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    loaders.add(path)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                    and len(node.args) == 3 and isinstance(node.args[0], ast.Name) \
                    and node.args[0].id in ("cfg", "settings", "args") and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in declared:
                found.append(f"{path}: getattr({node.args[0].id}, {node.args[1].value!r}, default) of a declared "
                             "setting")
    if len(sources.get("main.py", "").splitlines()) > 150:
        found.append("main.py is longer than 150 lines")
    if len(loaders) != 1:
        found.append(f"torch.load is called in {sorted(loaders)}, not in one module")
    return found


def test_the_code_keeps_its_shape_and_each_rule_catches_a_planted_violation():
    declared = {a.dest for a in build_parser()._actions}
    sources = _sources()
    assert "models/checkpoint_file.py" in sources and not any(p.startswith("tests") for p in sources)
    assert _shape_violations(sources, declared) == []
    assert len(LONG_BY_NAME) <= 3
    long_function = "def planted():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    plants = {
        "long function": ({"engine/planted.py": long_function}, "engine/planted.py: planted is 61 lines"),
        "long main": ({"main.py": sources["main.py"] + "\n" * 150}, "main.py is longer than 150 lines"),
        "second torch.load": ({"engine/planted.py": "import torch\nstate = torch.load('x', weights_only=True)\n"},
                              "torch.load is called in ['engine/planted.py', 'models/checkpoint_file.py'], not in one module"),
        "getattr default": ({"engine/planted.py": "def f(cfg):\n    return getattr(cfg, 'temperature', 0.1)\n"},
                            "engine/planted.py: getattr(cfg, 'temperature', default) of a declared setting"),
    }
    for what, (change, message) in plants.items():
        assert _shape_violations({**sources, **change}, declared) == [message], what


def test_core_settings_are_declared_once_and_the_parser_and_checks_come_from_them():
    import dataclasses

    from cli.parser import build_parser
    from engine.checkpoint import identity_keys
    from engine.settings import CONCERNS, IDENTITY_KEYS, PER_INVOCATION_KEYS, RANGES, Data, concern, declared

    parser = build_parser()
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    for cls in CONCERNS:  # each concern is one --help group holding exactly its declared fields
        assert groups[cls.GROUP] == {f.name for f in dataclasses.fields(cls)}, cls.GROUP
    fields = {f.name: f for _, f in declared()}
    assert {n for n, f in fields.items() if f.metadata["identity"]} == set(IDENTITY_KEYS)
    assert set(IDENTITY_KEYS) <= set(identity_keys("simclr")) and "dataset_name" in IDENTITY_KEYS
    assert {"train_from", "log_dir", "config"} <= set(PER_INVOCATION_KEYS) and "epochs" not in PER_INVOCATION_KEYS
    assert RANGES["batch_size"].low == 2 and RANGES["semi_ratio"].open_above and "lr" in RANGES
    defaults = vars(parser.parse_args([]))
    assert all(defaults[n] == f.metadata["default"] for n, f in fields.items())
    typed = concern(Data, parser.parse_args(["--dataset_name=digits", "--workers=0"]))
    assert (typed.dataset_name, typed.workers) == ("digits", 0)


def test_resolved_settings_are_read_only_and_derived_copies_stay_so():
    from cli.resolve import resolve
    from common.settings import FrozenSettings, Settings, derive

    cfg, _, _ = resolve(["--dataset_name=digits", "--clr=simclr", "--device=cpu"])
    assert isinstance(cfg, Settings)
    with pytest.raises(FrozenSettings, match="--epochs cannot be set"):
        cfg.epochs = 3
    later = derive(cfg, epochs=3)
    assert (later.epochs, cfg.epochs) == (3, 100) and isinstance(later, Settings)
    with pytest.raises(FrozenSettings):
        later.lr = 1.0
