"""The documentation cannot drift from the code: docs/flags.md is what the parser would write, every command in
the shell blocks of README.md and docs/*.md resolves as main.py (or the sweep runner) would take it, and a block
that needs a GPU or a cluster says so above it.

Substitution rule for the placeholders the pages use: ``RUN`` (also ``RUN/...`` and any
``results/<dataset>/<bs>_<Method>/<date>`` path) is a tiny digits run made here, and a ``checkpoint_NNNN.pth.tar``
name its one checkpoint; ``DIR`` is the CIFAR-10 subset in ../shared/data (or, without it, a small image folder
made here); ``FILE`` is configs/quickstart.yaml. A sweep in a block marked as needing a GPU is parsed and its file
read, not checked against this machine's devices. A line
that resumes or evaluates a run named by a literal path that is not on this machine (another repository's
example) is parsed and its values checked, not resolved against that run.
"""
import os
import re
import shlex

import pytest

from common.errors import UserError
from tests.conftest import ROOT, SHARED_DATA, TINY, make_jpeg_folder

PAGES = ["README.md"] + sorted(os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT, "docs"))
                               if p.endswith(".md"))
NEEDS = re.compile(r"torchrun|sbatch|\bsrun\b|--device[ =]cuda|device=cuda|make gpu-")
MARKS = ("> Needs a GPU.", "> Needs a cluster.")


def shell_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(the line above the opening fence, the block's lines) of each fenced bash/sh/console block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if re.match(r"^```(bash|sh|console|shell)\s*$", lines[i]):
            j = lines.index("```", i + 1)
            blocks.append((lines[i - 1] if i else "", lines[i + 1:j]))
            i = j
        i += 1
    return blocks


def commands(block: list[str]) -> list[str]:
    """The commands of a block: continuation lines joined, comments and prompts dropped."""
    joined, current = [], ""
    for line in block:
        line = re.sub(r"^\$ ", "", line.strip())
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [shlex.split(c, comments=True) for c in joined if c.strip()]


def documented(program: str) -> list[tuple[str, list[str], bool]]:
    """(page, argv after the program, whether its block is marked as needing a GPU or a cluster) of every
    documented ``python main.py`` or ``python -m experiments.sweep``."""
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            for above, block in shell_blocks(f.read()):
                for words in commands(block):
                    if words[:1] in (["python"], ["python3"]) and words[1:1 + len(program.split())] == program.split():
                        found.append((page, words[1 + len(program.split()):], above.strip() in MARKS))
    return found


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    from main import main

    root = tmp_path_factory.mktemp("docrun")
    assert main(TINY + ["--clr=flatclr", "--epochs=1", f"--results_dir={root}", "--tsne=false"]) == 0
    return str(next((root / "digits" / "16_FlatCLR").iterdir()))


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory):
    if os.path.isdir(SHARED_DATA):
        return SHARED_DATA
    pytest.importorskip("sklearn")
    return make_jpeg_folder(tmp_path_factory.mktemp("docdir"))


def substitute(argv: list[str], run: str, folder: str) -> list[str]:
    out = []
    for word in argv:
        word = re.sub(r"results/\w+/\d+_\w+/<date>", "RUN", word)
        word = re.sub(r"checkpoint_\d{4}\.pth\.tar", "checkpoint_0001.pth.tar", word)
        word = re.sub(r"(?<![A-Za-z_])RUN(?![A-Za-z_])", run, word)
        word = re.sub(r"(?<![A-Za-z_])DIR(?![A-Za-z_])", folder, word)
        out.append(re.sub(r"(?<![A-Za-z_])FILE(?![A-Za-z_])", os.path.join(ROOT, "configs", "quickstart.yaml"), word))
    return out


def check_main_command(argv: list[str]) -> None:
    """What main.py does with ``argv`` before it trains: parse, read --config, resolve (a resumed or evaluated run
    that is not on this machine: parse and check the values only). Raises UserError as main.py would."""
    from cli.parser import build_parser
    from cli.resolve import resolve

    build_parser().parse_args(argv)  # flags, types, choices
    names = {w.split("=")[0] for w in argv if w.startswith("--")}
    values = dict(zip(argv, argv[1:]))
    named = [values.get(f) or next((w.split("=", 1)[1] for w in argv if w.startswith(f + "=")), None)
             for f in ("--log_dir", "--checkpoint_dir", "--exp")]
    elsewhere = [p for p in named if p and p.lower() not in ("none", "pca") and "results/" in p and not os.path.exists(p)]
    if elsewhere and ({"--train_from", "--checkpoint_dir", "--encoder_ckpt"} & names):
        return
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # configs/... paths are the repository's
        resolve(argv)
    finally:
        os.chdir(cwd)


def test_flags_page_is_what_the_parser_writes():
    from cli.flagsdoc import PAGE, render

    with open(PAGE, encoding="utf-8") as f:
        assert f.read() == render(), "docs/flags.md is stale: python -m cli.flagsdoc"


def test_every_block_that_needs_a_gpu_or_a_cluster_is_marked():
    unmarked = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            for above, block in shell_blocks(f.read()):
                if NEEDS.search("\n".join(block)) and above.strip() not in MARKS:
                    unmarked.append(f"{page}: {block[0]}")
    assert not unmarked, unmarked


def test_every_documented_main_command_resolves(doc_run, doc_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    found = documented("main.py")
    assert len(found) >= 40 and {p for p, _, _ in found} >= {"README.md", "docs/compatibility.md"}
    failures = []
    for page, argv, _ in found:
        argv = substitute(argv, doc_run, doc_dir) + [f"--results_dir={tmp_path}"]
        try:
            check_main_command(argv)
        except (UserError, SystemExit) as err:
            failures.append(f"{page}: main.py {' '.join(argv)}: {err}")
    assert not failures, "\n".join(failures)


def test_every_documented_sweep_command_loads(doc_dir, tmp_path):
    from experiments.sweep import load_sweep, parse_only, parse_sets

    found = documented("-m experiments.sweep")
    assert len(found) >= 3
    for page, argv, marked in found:
        argv = substitute(argv, "RUN", doc_dir)
        path, sets, grid = argv[0], [], []
        for flag, value in zip(argv, argv[1:]):
            {"--set": sets, "--grid": grid}.get(flag, []).append(value)
        assert os.path.isfile(os.path.join(ROOT, path)), f"{page}: {path}"
        sets = parse_sets(sets)
        if marked:  # its cells are for a GPU: read the file and the replacements, not this machine's devices
            sets = {k: v for k, v in sets.items() if k != "device"}
        sweep = load_sweep(os.path.join(ROOT, path), str(tmp_path / "out"), sets)
        parse_only(grid, sweep)


def test_a_renamed_flag_fails_the_check(doc_run, doc_dir, tmp_path):
    argv = ["--dataset_name", "digits", "--arch", "resnet18", f"--results_dir={tmp_path}"]
    check_main_command(argv)
    with pytest.raises(UserError, match="unrecognized arguments: --dataset digits|--datset_name"):
        check_main_command(["--datset_name", "digits"] + argv[2:])


def test_the_library_example_runs():
    with open(os.path.join(ROOT, "docs", "library.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)
    assert blocks
    scope: dict = {}
    exec(compile(blocks[0], "docs/library.md", "exec"), scope)  # noqa: S102 - the page's own example
    assert scope["loss"].requires_grad is False or scope["loss"].grad_fn is not None
    assert all(p.grad is not None for p in scope["encoder"].parameters())


def readme_tasks() -> dict[str, list[str]]:
    """The first command of each task section of README.md (its heading -> the words after the program)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        sections = re.split(r"^## ", f.read(), flags=re.M)[1:]
    tasks = {}
    for section in sections:
        heading, _, body = section.partition("\n")
        for _, block in shell_blocks(body)[:1]:
            for words in commands(block):
                if words[:1] in (["python"], ["python3"]):
                    tasks[heading.strip()] = words[1:]
                    break
    return tasks


@pytest.mark.slow
def test_each_readme_task_runs_end_to_end_with_tiny_limits(tmp_path, capsys):
    """The first command of each README task as written, with tiny limits appended (a later flag wins) and the
    placeholders of :func:`substitute`: pretrain, evaluate, resume, export, and the sweep (with Fashion-MNIST
    from ../shared, one cell). The cluster task needs a cluster."""
    from experiments.sweep import main as sweep_main
    from main import main

    tasks = readme_tasks()
    assert set(tasks) >= {"Pretrain and get an accuracy", "Evaluate a run", "Resume, stop and preemption",
                          "Export and load in plain torchvision or torch.hub", "Compare methods with a sweep"}
    tiny = ["--epochs=1", "--limit_train_batches=2", "--fc_epochs=1", "--workers=0", "--device=cpu", "--no-tsne"]
    pretrain = tasks["Pretrain and get an accuracy"]
    assert main(pretrain[1:] + tiny + [f"--results_dir={tmp_path}"]) == 0
    run = str(next((tmp_path / "digits" / "128_FlatCLR").iterdir()))
    assert "final evaluation of" in capsys.readouterr().out
    for task, extra in (("Evaluate a run", tiny[2:]), ("Resume, stop and preemption", ["--epochs=2"]),
                        ("Export and load in plain torchvision or torch.hub", [])):
        argv = substitute(tasks[task][1:], run, SHARED_DATA)
        assert main(argv + extra) == 0, task
    assert (tmp_path / "digits" / "128_FlatCLR" / os.path.basename(run) / "checkpoint_0002.pth.tar").exists()
    assert list((tmp_path / "digits" / "128_FlatCLR" / os.path.basename(run) / "export").glob("*.pth"))
    fmnist = os.path.join(ROOT, "..", "shared", "data", "fashion-mnist")
    if os.path.isdir(fmnist):
        sweep = tasks["Compare methods with a sweep"]
        sets = [f"data={fmnist}", "epochs=1", "limit_train_batches=2", "train_subset=256", "eval_train_subset=500",
                "fc_epochs=1"]
        grid = ["seed=0", "batch_size=16", "clr=simclr"]
        assert sweep_main(sweep[2:] + [f"--out={tmp_path / 'sweep'}"] + [a for s in sets for a in ("--set", s)]
                          + [a for g in grid for a in ("--grid", g)]) == 0
        assert (tmp_path / "sweep" / "table.md").exists()
