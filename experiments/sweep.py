"""Sweeps: a grid of ordinary runs (pretraining + final evaluation) and the table they make.

    python -m experiments.sweep experiments/small_batch_cpu.yaml            # one cell after another
    python -m experiments.sweep experiments/seeds.yaml --parallel 4         # four at a time (one per GPU)
    python -m experiments.sweep experiments/small_batch_cpu.yaml --set device=cuda --set data=/data/cifar
                                                                            # a preset elsewhere: base flags replaced

The yaml names a base configuration, a grid and the evaluations::

    name: small_batch_cpu
    config: configs/quickstart.yaml     # optional: a preset to start from (any --config file)
    base: {dataset_name: folder, epochs: 20, ...}   # flags of every cell, as in a --config yaml
    grid: {clr: [simclr, flatclr], batch_size: [16, 64, 256], seed: [0, 1, 2]}   # or a list of such maps
    eval: [knn]                         # --final_eval of every cell (default: knn)
    table: {rows: batch_size, columns: clr}   # optional; by default the first two axes that are not seed

Each cell is ``main.py`` in its own process and run directory, ``<out>/cells/<axis>-<value>__...``, with
its output in ``<out>/cells/<cell>.log``: nothing but the sweep directory is shared. Rerunning the same
command continues an interrupted sweep: finished cells are skipped, a cell with checkpoints resumes from its
latest one (``--train_from latest``), a cell whose training ended but whose evaluation did not is evaluated.
At the end (and after every cell) the sweep directory holds ``results.csv`` (one row per cell),
``table.md`` (mean +- std over the seed axis, n per cell, one table per evaluation) and ``<metric>.png``
(accuracy against the rows axis, one line per column value, error bars over seeds).

The runner lives under ``experiments/`` beside its presets: a sweep is an experiment, while ``scripts/``
holds cluster job scripts that wrap single runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import product

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.errors import EXIT_PREEMPTED, UserError  # noqa: E402
from common.yamlfile import kind as kind_of, read_mapping  # noqa: E402
from engine.settings import MACHINE_KEYS, PER_INVOCATION_KEYS  # noqa: E402

SEED_AXIS = "seed"


@dataclass
class Sweep:
    name: str
    base: dict
    grids: list[dict[str, list]]  # the cells are the union of each grid's product
    evals: list[str]
    rows: str | None
    columns: str | None
    out: str

    @property
    def axes(self) -> list[str]:
        return list(dict.fromkeys(a for g in self.grids for a in g))

    @property
    def grid(self) -> dict[str, list]:
        """Every axis with the values it takes in any grid, in order of appearance; None where a grid lacks
        the axis (its cells keep that flag's base value)."""
        return {a: list(dict.fromkeys([v for g in self.grids for v in g.get(a, [])]
                                      + [None] * any(a not in g for g in self.grids))) for a in self.axes}

    def cells(self) -> list["Cell"]:
        """The union of the grids' products; a cell that two grids both produce is run once."""
        cells = [Cell(self, {a: dict(zip(g, values)).get(a) for a in self.axes if a in g})
                 for g in self.grids for values in product(*g.values())]
        return list({c.name: c for c in reversed(cells)}.values())[::-1]


@dataclass
class Cell:
    sweep: Sweep
    values: dict
    status: str = "pending"
    returncode: int | None = None
    records: dict = field(default_factory=dict)  # protocol -> the evaluation's json record

    @property
    def name(self) -> str:
        return "__".join(f"{k}-{_slug(v)}" for k, v in self.values.items())

    @property
    def run_dir(self) -> str:
        return os.path.join(self.sweep.out, "cells", self.name)

    @property
    def log(self) -> str:
        return os.path.join(self.sweep.out, "cells", self.name + ".log")

    @property
    def config_path(self) -> str:
        return os.path.join(self.sweep.out, "cells", self.name + ".yaml")

    def settings(self) -> dict:
        return {**self.sweep.base, **self.values, "final_eval": list(self.sweep.evals)}


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "_"


# ----------------------------------------------------------------------------- reading the yaml
def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as a mapping, each value read as yaml (``epochs=5`` is an int)."""
    sets = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item}: write it as KEY=VALUE, e.g. --set device=cuda")
        try:
            sets[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--set {item}: the value is not valid yaml ({str(err).splitlines()[0]})") from err
    return sets




def parse_only(items: list[str], sweep: Sweep) -> dict[str, list]:
    """``--grid KEY=V1,V2`` items: the values of each named axis to run now (each read as yaml), each an axis of
    the sweep's grid and among its values."""
    only: dict[str, list] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise UserError(f"--grid {item}: write it as AXIS=V1,V2, e.g. --grid seed=0")
        if key not in sweep.grid:
            raise UserError(f"--grid {item}: {key} is not an axis of this sweep's grid ({', '.join(sweep.grid)})")
        try:
            picked = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError as err:
            raise UserError(f"--grid {item}: a value is not valid yaml ({str(err).splitlines()[0]})") from err
        bad = [v for v in picked if not any(v == w and type(v) is type(w) for w in sweep.grid[key])]
        if bad:
            raise UserError(f"--grid {item}: {bad[0]!r} is not a value of the axis {key} "
                            f"({', '.join(map(str, sweep.grid[key]))})")
        only.setdefault(key, []).extend(picked)
    return only


# Keys a sweep sets itself (each cell's run directory, the evaluations of ``eval``) or that would change what one
# invocation of a cell does; in a cell's settings they would be ignored or break the sweep's resume.
SWEEP_OWNED = ("final_eval",) + PER_INVOCATION_KEYS


def load_sweep(path: str, out: str | None, sets: dict | None = None) -> Sweep:
    if not os.path.isfile(path):
        raise UserError(f"sweep file {path} not found; pass one of experiments/*.yaml")
    try:
        spec = read_mapping(path, path)
    except UserError as err:
        raise UserError(f"{err}; a sweep file is a mapping with name, base, grid and eval") from err
    unknown = sorted(map(str, set(spec) - {"name", "config", "base", "grid", "eval", "table"}))
    if unknown:
        raise UserError(f"unknown key(s) in {path}: {', '.join(unknown)}; use name, config, base, grid, eval, table")
    name = _sweep_name(spec.get("name"), path)
    sources: list[tuple[str, dict, bool]] = []  # (label, settings, strict: only flag names as keys)
    base: dict = {}
    if spec.get("config") is not None:
        values = _preset(spec["config"], path)
        sources.append((f"{path}: config {spec['config']}", values, False))
        base.update(values)
    own = spec.get("base")
    if own is not None and not isinstance(own, dict):
        raise UserError(f"{path}: base must be a mapping of flag names to values (as in a --config yaml), not a "
                        f"{kind_of(own)}")
    sources.append((f"{path}: base", own or {}, True))
    base.update(own or {})
    grids = spec.get("grid")
    grids = grids if isinstance(grids, list) else [grids]
    if not grids or not all(isinstance(g, dict) and g and all(isinstance(v, list) and v for v in g.values())
                            for g in grids):
        raise UserError(f"{path}: grid must map each swept flag to a non-empty list of values (or be a list of "
                        "such maps, whose cells are joined)")
    for g in grids:
        for axis, values in g.items():
            for v in values:
                sources.append((f"{path}: grid", {axis: v}, True))
    grid = {a: [v for g in grids for v in g.get(a, [])] for g in grids for a in g}
    swept = sorted(set(sets or {}) & set(grid))
    if swept:
        raise UserError(f"--set {swept[0]}: {swept[0]} is an axis of the grid of {path}; edit the grid instead")
    sources.append(("--set", sets or {}, True))
    base.update(sets or {})
    _check_values(sources)
    evals = _evaluations(spec.get("eval", ["knn"]), path)
    rows, columns = _table(spec.get("table"), grid, path)
    sweep = Sweep(name, base, grids, evals, rows, columns, out or os.path.join(ROOT, "results", "sweeps", name))
    seen: dict[str, dict] = {}
    for g in grids:
        for values in product(*g.values()):
            cell = Cell(sweep, dict(zip(g, values)))
            if seen.setdefault(cell.name, cell.values) != cell.values:
                raise UserError(f"{path}: the cells {seen[cell.name]} and {cell.values} would share the directory "
                                f"{cell.name}; make the values differ in letters, digits, '.', '+' or '-'")
    _check_cells(sweep, path)
    return sweep


def _evaluations(evals, path: str) -> list[str]:
    """The sweep's ``eval``: protocol names (a list, or one comma-separated string), each once."""
    from engine.protocols import PROTOCOLS

    evals = [e.strip() for e in evals.split(",") if e.strip()] if isinstance(evals, str) else evals
    if not isinstance(evals, list) or not evals or not all(isinstance(e, str) for e in evals):
        raise UserError(f"{path}: eval must be a list of protocol names, e.g. [knn, linear_eval] (choose from "
                        f"{', '.join(PROTOCOLS)}), not {evals!r}")
    bad = [e for e in evals if e not in PROTOCOLS]
    if bad:
        raise UserError(f"{path}: eval: unknown protocol {', '.join(bad)}; choose from {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(evals))


def _sweep_name(name, path: str) -> str:
    """The sweep's directory name (results/sweeps/<name>): its ``name``, or the file's."""
    if name is not None and (not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip()
                             or os.sep in str(name) or str(name) in (".", "..")):
        raise UserError(f"{path}: name {name!r} is not a directory name (results/sweeps/<name>); give one, e.g. "
                        f"{os.path.splitext(os.path.basename(path))[0]}")
    return str(name if name is not None else os.path.splitext(os.path.basename(path))[0])


def _preset(preset, path: str) -> dict:
    """The settings of the sweep's ``config:`` preset, without its own evaluations (the sweep's eval replaces
    them)."""
    if not isinstance(preset, str) or not preset.strip():
        raise UserError(f"{path}: config must be the path of a preset yaml (e.g. configs/quickstart.yaml), not "
                        f"{preset!r}")
    full = os.path.join(ROOT, preset) if not os.path.isabs(preset) else preset
    if not os.path.isfile(full):
        raise UserError(f"{path}: config {preset} not found")
    values = read_mapping(full, f"{path}: config {preset}")
    values.pop("final_eval", None)
    return values


def _table(table, grid: dict, path: str) -> tuple[str | None, str | None]:
    """``table: {rows: AXIS, columns: AXIS}``; by default the first two axes that are not seed (and not the
    other one)."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise UserError(f"{path}: table must be a mapping {{rows: AXIS, columns: AXIS}}, not a {kind_of(table)}")
    unknown = sorted(map(str, set(table) - {"rows", "columns"}))
    if unknown:
        raise UserError(f"{path}: unknown key(s) in table: {', '.join(unknown)}; use rows and columns")
    for key in ("rows", "columns"):
        axis = table.get(key)
        if axis is not None and (not isinstance(axis, str) or axis not in grid):
            raise UserError(f"{path}: table {key} {axis!r} is not an axis of the grid ({', '.join(grid)})")
    if table.get("rows") is not None and table.get("rows") == table.get("columns"):
        raise UserError(f"{path}: table rows and columns are both {table['rows']}; pick two axes of the grid")
    axes = [a for a in grid if a != SEED_AXIS]
    rows = table["rows"] if "rows" in table else next((a for a in axes if a != table.get("columns")), None)
    columns = table["columns"] if "columns" in table else next((a for a in axes if a != rows), None)
    return rows, columns


def _check_values(sources: list[tuple[str, dict, bool]]) -> None:
    """The shape of the sweep's settings, named by where each comes from (a preset, base, a grid axis, --set),
    before any cell starts: flag names as keys (a preset may be in another repository's layout, which main.py
    reads), none that the sweep sets itself, one value per flag. The values' types are main.py's --config check,
    which :func:`_check_cells` runs for every cell."""
    from main import build_parser

    flags = {action.dest for action in build_parser()._actions if action.option_strings and action.dest != "help"}
    for label, values, strict in sources:
        for key, value in values.items():
            if not isinstance(key, str) or (strict and key not in flags):
                raise UserError(f"{label}: {key!r} is not a flag name; keys are flag names as in main.py --help")
            if key in SWEEP_OWNED:
                fix = "list the evaluations under eval" if key == "final_eval" else "the sweep sets it for each cell"
                raise UserError(f"{label}: {key} is not a setting of a sweep cell; {fix}")
            if isinstance(value, (list, dict)) and (strict or key in flags and not isinstance(value, dict)):
                where = f"{label} {key}={value!r}" if label == "--set" else f"{label} {key}: {value!r}"
                axis = "; sweep several values as a grid axis" if "grid" not in label else ""
                raise UserError(f"{where} is a {kind_of(value)}, but --{key} takes one value{axis}")


def _check_cells(sweep: Sweep, path: str) -> None:
    """Every cell's settings must be accepted by main.py, read as its run will read them (a --config yaml),
    and by the set-up checks of its pretraining (one process, this machine's device), before anything runs (one
    line if not). main.py's notes and warnings about the settings are printed once, not once per cell."""
    import contextlib
    import io
    import tempfile

    from common.device import pick_device
    from common.distributed import DistInfo
    from engine.pretrain import check_setup
    from main import resolve

    told: dict[str, None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "cell.yaml")
        for cell in sweep.cells():
            with open(config, "w") as f:
                yaml.safe_dump(cell.settings(), f, sort_keys=False)
            said = io.StringIO()
            try:
                with contextlib.redirect_stderr(said):
                    cfg, _, _ = resolve([f"--config={config}", f"--log_dir={os.path.join(tmp, 'run')}"])
                    check_setup(cfg, DistInfo(), pick_device(cfg.device))
            except UserError as err:  # main.py names the yaml it read: here, the cell's settings
                message = str(err).replace(f"{config}: ", "").replace(config, "its settings")
                raise UserError(f"{path}: cell {cell.name}: {message}") from err
            except Exception as err:  # noqa: BLE001 - a value main.py's checks let through: still one line
                first = (str(err).strip().splitlines() or [""])[0]
                raise UserError(f"{path}: cell {cell.name}: its settings are not accepted ({type(err).__name__}: "
                                f"{first}); check the types of its values") from err
            told.update(dict.fromkeys(line for line in said.getvalue().splitlines() if line.strip()))
    for line in told:
        print(line, file=sys.stderr)


# ----------------------------------------------------------------------------- state of a cell on disk
def _epochs(run_dir: str) -> int | None:
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        return None
    try:
        return int(read_mapping(config, config).get("epochs", 0)) or None
    except (UserError, TypeError, ValueError):
        return None  # unreadable: the cell resumes from its checkpoint, whose settings main.py checks


def cell_state(cell: Cell) -> str:
    """'done', 'evaluate' (trained, evaluation missing), 'resume' (has checkpoints) or 'start'."""
    from engine.checkpoint import all_checkpoints, list_checkpoints

    if not os.path.isdir(cell.run_dir) or not all_checkpoints(cell.run_dir):
        return "start"
    epochs, done = _epochs(cell.run_dir), list_checkpoints(cell.run_dir)
    if epochs is None or not done or max(done) < epochs:
        return "resume"
    cell.records = {}
    for protocol in cell.sweep.evals:
        record = _record(cell, protocol, epochs)
        cell.records[protocol] = _read_record(record)
        if cell.records[protocol] is None:
            return "evaluate"
    return "done"


def _read_record(path: str) -> dict | None:
    """An evaluation's json record, or None when there is none or it is unreadable (then it is evaluated again)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (ValueError, OSError):
        return None
    top1 = record.get("top1") if isinstance(record, dict) else None
    return record if isinstance(top1, (int, float)) and not isinstance(top1, bool) else None


def _record(cell: Cell, protocol: str, epoch: int, suffix: str = ".json") -> str:
    """Where the cell's evaluation ``protocol`` of checkpoint ``epoch`` writes its record (or, with
    ``.partial.pth.tar``, its saved position)."""
    from engine.records import record_path

    return record_path(os.path.join(cell.run_dir, "eval"), protocol, cell.settings().get("semi_ratio"), epoch, suffix)


def command(cell: Cell, state: str) -> list[list[str]]:
    """The main.py arguments of the invocations that bring ``cell`` from ``state`` to done."""
    from engine.records import PARTIAL

    if state == "start":
        if os.path.isdir(cell.run_dir):  # killed before its first checkpoint: the sweep's own directory
            shutil.rmtree(cell.run_dir)
        with open(cell.config_path, "w") as f:
            yaml.safe_dump(cell.settings(), f, sort_keys=False)
        return [[f"--config={cell.config_path}", f"--log_dir={cell.run_dir}"]]
    if state == "resume":  # the run's settings come back from it; the machine's (never saved) from the cell
        machine = [f"--{k}={cell.settings()[k]}" for k in MACHINE_KEYS if k in cell.settings()]
        return [[f"--log_dir={cell.run_dir}", "--train_from=latest"] + machine]
    epochs = _epochs(cell.run_dir)
    evals = [p for p in cell.sweep.evals if _read_record(_record(cell, p, epochs)) is None]
    return [[f"--config={cell.config_path}", "--train_mode=eval", f"--checkpoint_dir={cell.run_dir}",
             f"--transfer_mode={p}", "--final_eval=", "--no-tsne"]
            + ["--train_from=latest"] * os.path.isfile(_record(cell, p, epochs, PARTIAL)) for p in evals]


# ----------------------------------------------------------------------------- running
class Runner:
    """Runs cells as subprocesses, ``parallel`` at a time; on CUDA nodes each on the least busy GPU. SIGTERM
    (or SIGINT) to the sweep is passed on to the running cells as SIGTERM: they save their position and exit 3
    (a cell that also got the signal from its process group counts the two as one), and the sweep exits 3."""

    def __init__(self, sweep: Sweep, parallel: int, gpus: int) -> None:
        self.sweep, self.parallel, self.gpus = sweep, parallel, gpus
        self.stopping: str | None = None
        self.succeeded = 0
        self.refused: tuple[Cell, str] | None = None  # the first cell refused by main.py before any cell finished
        self.running: dict[subprocess.Popen, tuple[Cell, list[list[str]], int | None, object]] = {}

    def _stop(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _start(self, cell: Cell, commands: list[list[str]], gpu: int | None) -> None:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        elif self.parallel > 1:  # share the cores instead of oversubscribing them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))
        log = open(cell.log, "a")
        log.write(f"$ python main.py {' '.join(commands[0])}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "experiments.cell"] + commands[0], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.running[proc] = (cell, commands[1:], gpu, log)
        if self.stopping:  # the signal came while this cell was starting: it stops too
            proc.send_signal(signal.SIGTERM)

    def run(self, cells: list[Cell], bar) -> None:
        pending = list(cells)
        handlers = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (pending and not self.stopping) or self.running:
                while pending and len(self.running) < self.parallel and not self.stopping:
                    cell = pending.pop(0)
                    load = [sum(g == d for _, _, g, _ in self.running.values()) for d in range(self.gpus)]
                    gpu = load.index(min(load)) if self.gpus else None  # the least busy GPU
                    self._start(cell, command(cell, cell.status), gpu)
                time.sleep(0.2)
                for proc in [p for p in self.running if p.poll() is not None]:
                    cell, rest, gpu, log = self.running.pop(proc)
                    if proc.returncode == 0 and rest and not self.stopping:
                        log.close()
                        self._start(cell, rest, gpu)
                        continue
                    log.close()
                    cell.returncode = proc.returncode
                    cell.status = cell_state(cell) if proc.returncode == 0 else (
                        "stopped" if proc.returncode == EXIT_PREEMPTED else "failed")
                    self.succeeded += cell.status == "done"
                    if proc.returncode == 2 and not self.succeeded and not self.refused and _never_started(cell):
                        self.refused = (cell, _error_line(cell.log))  # most likely every cell's: stop here
                        pending.clear()
                    bar.update(1)
                    bar.set_postfix_str(f"{cell.name}: {cell.status}")
                    write_results(self.sweep)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _never_started(cell: Cell) -> bool:
    """Whether a cell was refused before its run began (its log never names a run directory, which a run prints
    once its settings and data are accepted): refused for its settings or its data, not stopped by something of
    its own run (a diverging loss, memory)."""
    try:
        with open(cell.log, encoding="utf-8", errors="replace") as f:
            return not any(line.startswith("run directory: ") for line in f)
    except OSError:
        return True


def _error_line(log: str) -> str:
    """The last ``error:`` line of a cell's log (main.py's one-line reason), without the prefix."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip().startswith(("error:", "[rank")) and "error:" in line]
    except OSError:
        return "see its log"
    return lines[-1].split("error:", 1)[-1].strip() if lines else "see its log"


# ----------------------------------------------------------------------------- results
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def write_results(sweep: Sweep) -> list[Cell]:
    """results.csv, table.md and the PNGs from whatever cells are done (rewritten after each cell)."""
    cells = sweep.cells()
    for cell in cells:
        cell.status = cell_state(cell)
    done = [c for c in cells if c.status == "done"]
    last = {c.name: last_metrics(c.run_dir) for c in done}
    diagnosed = [k for k in DIAGNOSTICS if any(k in m for m in last.values())]
    with open(os.path.join(sweep.out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(sweep.axes + [f"{p}_top1" for p in sweep.evals] + diagnosed + ["run_dir"])
        for c in done:
            top1 = [f"{c.records[p]['top1']:.4f}" for p in sweep.evals]
            found = [f"{last[c.name][k]:.6g}" if isinstance(last[c.name].get(k), (int, float)) else ""
                     for k in diagnosed]
            writer.writerow([c.values.get(a, "") for a in sweep.axes] + top1 + found
                            + [os.path.relpath(c.run_dir, sweep.out)])
    lines = [f"# Sweep {sweep.name}", "", f"{len(done)} of {len(cells)} cells done. Top-1 (%) on the test split, "
             f"mean ± std over {SEED_AXIS} (n runs per cell)." if SEED_AXIS in sweep.grid else
             f"{len(done)} of {len(cells)} cells done. Top-1 (%) on the test split."]
    fixed = [a for a in sweep.axes if a not in (sweep.rows, sweep.columns, SEED_AXIS)]
    for protocol in sweep.evals:
        groups: dict[tuple, list[float]] = {}
        for c in done:
            key = tuple(c.values.get(a) for a in fixed + [sweep.rows, sweep.columns])
            groups.setdefault(key, []).append(c.records[protocol]["top1"])
        for fixed_values in dict.fromkeys(k[:len(fixed)] for k in product(*(sweep.grid[a] for a in fixed))):
            title = ", ".join(f"{a}={v}" for a, v in zip(fixed, fixed_values))
            lines += ["", f"## {protocol}" + (f" ({title})" if title else ""), ""]
            cols = sweep.grid[sweep.columns] if sweep.columns else [None]
            rows = sweep.grid[sweep.rows] if sweep.rows else [None]
            lines.append(f"| {sweep.rows or ''} | " + " | ".join(
                f"{sweep.columns}={c if c is not None else '-'}" if sweep.columns else "top-1" for c in cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for r in rows:
                cells_text = []
                for c in cols:
                    values = groups.get(tuple(fixed_values) + (r, c))
                    if not values:
                        cells_text.append("-")
                    else:
                        mean, std = _mean_std(values)
                        cells_text.append(f"{mean:.2f} ± {std:.2f} (n={len(values)})")
                lines.append(f"| {r if r is not None else '-'} | " + " | ".join(cells_text) + " |")
        _plot(sweep, protocol, groups, fixed)
    with open(os.path.join(sweep.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return cells


# The last epoch's training diagnostics a cell's results.csv row carries (those its method logs).
DIAGNOSTICS = ("loss", "mi_bound", "log_k", "log_s_p10", "log_s_p50", "log_s_p90", "flat_grad_ratio", "alignment",
               "uniformity", "erank", "epoch_time_s")


def last_metrics(run_dir: str) -> dict:
    """Each key's last value in a run's metrics.jsonl, from its complete records (empty when there is none, or
    when the file is damaged: the summary names that)."""
    from engine.runlog import MetricsLog

    try:
        records, _ = MetricsLog(run_dir, resume_epoch=None).parse()  # reads only
    except UserError:
        return {}
    last: dict = {}
    for record in records:  # a diagnostic logged on some epochs only keeps its latest value
        last.update(record)
    return last


def _plot(sweep: Sweep, protocol: str, groups: dict, fixed: list[str]) -> None:
    if not sweep.rows or not groups:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [x for x in sweep.grid[sweep.rows] if x is not None]  # cells without the axis: in the table only
    numeric = all(isinstance(x, (int, float)) for x in xs)
    for fixed_values in dict.fromkeys(k[:len(fixed)] for k in groups):
        for col in (sweep.grid[sweep.columns] if sweep.columns else [None]):
            points = [(i, x, _mean_std(groups[key])) for i, x in enumerate(xs)
                      if (key := tuple(fixed_values) + (x, col)) in groups]
            if not points:
                continue
            label = ", ".join([f"{sweep.columns}={col}"] * bool(sweep.columns)
                              + [f"{a}={v}" for a, v in zip(fixed, fixed_values)]) or protocol
            ax.errorbar([x if numeric else i for i, x, _ in points], [m for _, _, (m, _) in points],
                        yerr=[s for _, _, (_, s) in points], marker="o", capsize=3, label=label)
    if numeric and all(x > 0 for x in xs) and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    if not numeric:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(sweep.rows)
    ax.set_ylabel(f"{protocol} top-1 (%)")
    ax.set_title(f"{sweep.name}: {protocol}" + (f", mean ± std over {SEED_AXIS}" if SEED_AXIS in sweep.grid else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(sweep.out, f"{protocol}.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point
def _claim(sweep: Sweep, path: str, sets: dict | None = None) -> None:
    """The sweep directory belongs to one sweep: its yaml (and ``--set`` replacements, appended as a comment)
    is kept there and must match on a rerun."""
    kept = os.path.join(sweep.out, "sweep.yaml")
    with open(path) as f:
        text = f.read()
    if sets:
        text += f"\n# python -m experiments.sweep --set: {json.dumps(sets, sort_keys=True)}\n"
    if os.path.isfile(kept):
        with open(kept) as f:
            if f.read() != text:
                raise UserError(f"{sweep.out} holds another sweep (its sweep.yaml and --set values differ from "
                                f"{path} and these); pass --out elsewhere, or delete that directory")
    os.makedirs(os.path.join(sweep.out, "cells"), exist_ok=True)
    if not os.path.isfile(kept):
        with open(kept, "w") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep's yaml, e.g. experiments/small_batch_cpu.yaml")
    p.add_argument("--out", default=None, help="sweep directory (default: results/sweeps/<name>)")
    p.add_argument("--parallel", type=int, default=None,
                   help="cells at a time (default: the number of GPUs, else 1); each gets its own GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="replace a base flag of every cell, e.g. --set device=cuda (repeatable; not a grid axis); "
                        "kept with the sweep, so a rerun must pass the same")
    p.add_argument("--grid", action="append", default=[], metavar="AXIS=V1,V2",
                   help="run only the cells with these values of an axis, e.g. --grid seed=0 or --grid "
                        "batch_size=16,32 (repeatable; the table still shows every finished cell)")
    args = p.parse_args(argv)
    try:
        import torch

        gpus = torch.cuda.device_count()
        parallel = args.parallel if args.parallel is not None else max(gpus, 1)
        if parallel < 1:
            raise UserError(f"--parallel must be at least 1, got {parallel}")
        sets = parse_sets(args.set)
        sweep = load_sweep(args.sweep, args.out, sets)
        only = parse_only(args.grid, sweep)
        _claim(sweep, args.sweep, sets)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    cells = write_results(sweep)
    todo = [c for c in cells if c.status != "done" and all(c.values.get(a) in v for a, v in only.items())]
    print(f"sweep {sweep.name}: {len(cells)} cells, {sum(c.status == 'done' for c in cells)} done, {len(todo)} to run"
          f"{' (' + ' '.join(args.grid) + ')' if only else ''} ({parallel} at a time) in {sweep.out}", flush=True)
    runner = Runner(sweep, parallel, gpus)
    with tqdm(total=len(todo), desc=f"sweep {sweep.name}", file=sys.stdout) as bar:
        runner.run(todo, bar)
    cells = write_results(sweep)
    failed = [c for c in cells if c.status != "done" and all(c.values.get(a) in v for a, v in only.items())]
    print(f"table: {os.path.join(sweep.out, 'table.md')}; results.csv and " +
          ", ".join(f"{p}.png" for p in sweep.evals) + " beside it", flush=True)
    if runner.stopping:
        print(f"sweep stopped by {runner.stopping}; run the same command again to continue", file=sys.stderr)
        return EXIT_PREEMPTED
    if runner.refused:
        cell, reason = runner.refused
        print(f"error: cell {cell.name} was refused ({reason}); the sweep stopped there, since the first cell to "
              f"end was refused and the others most likely would be too (its log: {cell.log}); fix that and run "
              "the same command again", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {len(failed)} cell(s) did not finish, e.g. {failed[0].name} (see {failed[0].log}); run the "
              "same command again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
