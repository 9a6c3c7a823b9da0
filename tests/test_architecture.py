"""The shape of the code: a method is a plugin registered in one dict, and imports flow one way."""
import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import list_checkpoints
from main import build_parser, main
from models.methods import METHODS, Flag, MethodSpec, SSLMethod
from tests.conftest import ROOT, TINY

PACKAGES = ("common", "data", "engine", "losses", "models")


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


def _build_toy(cfg, backbone, projector, dim, num_data):
    return CosineToy(backbone, projector, cfg.n_views, cfg.cosine_toy_scale)


TOY = MethodSpec(display="CosineToy", build=_build_toy, summary="test-only cosine loss",
                 flags=(Flag("cosine_toy_scale", 1.0, "multiplies the toy loss"),), identity=("cosine_toy_scale",))


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
             "engine": {"common", "data", "losses", "models"}}
    for module, deps in graph.items():
        layer = module.split(".")[0]
        if layer in below:
            wrong = {d for d in deps if d.split(".")[0] not in below[layer] | {layer}}
            assert not wrong, f"{module} imports {sorted(wrong)}"
    assert "engine.evaluate" not in graph["engine.pretrain"] and "engine.pretrain" not in graph["engine.evaluate"]
    code = "import sys, models, data, losses; sys.exit(any(m.split('.')[0] == 'engine' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
