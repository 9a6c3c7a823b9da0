"""Settings, from the command line to the values a run uses: parse (``--config`` as defaults, the command line
winning), translate the other tools' spellings, merge a resumed run's saved settings (the checkpoint is read and
checked by :mod:`engine.checkpoint`), inherit an evaluated run's dataset and architecture, and check every value.
``cfg.sources`` records where each setting came from (written to the run's config.yaml). Still changed
downstream: the settings a method settles (:meth:`MethodSpec.settle`), and what pretraining records of its run
(``--iters``' epochs, the input statistics, the provenance)."""
from __future__ import annotations

import argparse
import os

from cli.compat import run_id_dir, translate
from cli.config import apply_yaml, read_yaml
from cli.options import split_list
from cli.parser import build_parser
from common.distributed import launched_rank
from common.settings import frozen
from common.errors import UserError
from engine.checkpoint import (check_identity, identity_keys, list_checkpoints, load_checkpoint, load_latest,
                               resolve_checkpoint)
from engine.evaluate import eval_defaults
from engine.protocols import PROTOCOLS
from engine.optim import default_lr
from data.datasets import UNLABELLED
from engine.settings import NOT_SAVED_KEYS, RANGES, machine_workers
from models import ARCH_ALIASES, METHODS

# What an evaluation takes from the run it evaluates, unless given on the command line.
EVAL_INHERITED_KEYS = ("dataset_name", "data", "image_size", "arch")


def explicit_dests(argv: list[str]) -> set[str]:
    """Names of the settings given on the command line (not defaults, not yaml)."""
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    ns, _ = shadow.parse_known_args(argv)
    return set(vars(ns))


def validate(cfg: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every value in its range and among its choices (yaml and a resumed run's values bypass argparse's own
    checks), then the method's own checks and the settings that must agree with each other."""
    for action in parser._actions:
        value = getattr(cfg, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            raise UserError(f"{action.dest}={value!r} is not one of {', '.join(map(str, action.choices))}")
    own = {f.name: f.metadata["bounds"] for f in METHODS[cfg.clr].fields() if f.metadata["bounds"]}
    for name, (low, high, what, open_below, open_above) in {**RANGES, **own}.items():  # as declared
        value = getattr(cfg, name)
        if value is None:
            continue
        below = value <= low if open_below else value < low
        above = high is not None and (value >= high if open_above else value > high)
        if below or above:
            raise UserError(f"--{name} must {what}, got {value}")
    spec = METHODS[cfg.clr]
    spec.settle(cfg)
    if cfg.n_views is None:  # a method's own settle may leave it
        cfg.n_views = 2
    if cfg.n_views < spec.min_views:
        raise UserError(f"--n_views must be at least {spec.min_views} for {cfg.clr}, got {cfg.n_views}")
    spec.validate(cfg)
    if isinstance(cfg.final_eval, str):  # a run's settings saved before protocol lists were parsed
        cfg.final_eval = split_list(cfg.final_eval)
    unknown = [p for p in cfg.final_eval if p not in PROTOCOLS]
    if unknown:
        raise UserError(f"--final_eval: unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    check_agreement(cfg)


def check_agreement(cfg: argparse.Namespace) -> None:
    """Settings that only mean something together."""
    if cfg.rot_pred_decay and not cfg.rot_pred_weight:
        raise UserError("--rot_pred_decay decays --rot_pred_weight, which is off; pass --rot_pred_weight")
    needs = [flag for flag, on in (("--train_mode eval", cfg.train_mode == "eval"), ("--final_eval", cfg.final_eval),
                                   ("--eval_every_n_epochs", cfg.eval_every_n_epochs),
                                   ("--eval_every_n_steps", cfg.eval_every_n_steps),
                                   ("--online_probe", cfg.online_probe)) if on]
    if cfg.dataset_name in UNLABELLED and needs:
        raise UserError(f"--dataset_name {cfg.dataset_name} has no labels, which {needs[0]} needs; drop it, and "
                        "evaluate the run on a labelled folder: --train_mode eval --checkpoint_dir RUN --dataset_name "
                        "folder --data DIR (DIR/train/<class>/, DIR/test/<class>/)")
    if cfg.eval_train_subset is not None and cfg.semi_ratio is not None:
        raise UserError("--eval_train_subset and --semi_ratio both choose the labelled training images; give one")
    if cfg.from_pretrained_head and not cfg.from_pretrained:
        raise UserError("--from_pretrained_head takes the head of --from_pretrained's run, which is not given; pass "
                        "--from_pretrained PATH")
    if cfg.from_pretrained and cfg.train_from is None and not os.path.exists(cfg.from_pretrained):  # a resume
        # continues from its own checkpoint and never reads the source again
        raise UserError(f"--from_pretrained {cfg.from_pretrained} does not exist; pass a run directory, a "
                        "checkpoint_*.pth.tar or an export .pth")
    if cfg.faster_version and (cfg.input_pipeline == "hybrid" or cfg.decode_on_gpu):
        raise UserError("--faster_version holds the dataset on the device, which --input_pipeline hybrid and "
                        "--decode_on_gpu read from files; pick one")
    m = cfg.milestone_every_n_epochs
    if m and m % cfg.save_every_n_epochs:
        raise UserError(f"--milestone_every_n_epochs {m} is not a multiple of --save_every_n_epochs "
                        f"{cfg.save_every_n_epochs}, so no checkpoint would be written at its epochs; pass a multiple "
                        "(or 0: no milestones)")


def inherit_from_run(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """Evaluate on the run's own dataset and architecture unless the command line says otherwise."""
    if not cfg.checkpoint_dir:
        raise UserError(f"--train_mode={cfg.train_mode} needs --checkpoint_dir RUN_DIR (a pretraining run)"
                        + (", or --checkpoint_dir none for a random-init baseline" if cfg.train_mode == "eval" else ""))
    if cfg.checkpoint_dir.lower() in ("none", "pca"):  # baselines: no run to inherit from
        return
    if os.path.isfile(cfg.checkpoint_dir):
        raise UserError(f"--checkpoint_dir {cfg.checkpoint_dir} is a file; pass its run directory "
                        f"({os.path.dirname(cfg.checkpoint_dir) or '.'}), and --transfer_from_epoch for its epoch")
    if not os.path.isdir(cfg.checkpoint_dir):
        raise UserError(f"--checkpoint_dir {cfg.checkpoint_dir} does not exist; pass a pretraining run directory")
    available = list_checkpoints(cfg.checkpoint_dir)
    if not available:
        raise UserError(f"no checkpoint_*.pth.tar in {cfg.checkpoint_dir}; pass the directory of a pretraining "
                        "run (results/<dataset>/<bs>_<Method>/<date>) or --checkpoint_dir none")
    config = os.path.join(cfg.checkpoint_dir, "config.yaml")
    if os.path.isfile(config):
        saved = read_yaml(config)
    else:
        saved = load_checkpoint(available[max(available)]).get("args", {})
    if "arch" in explicit and saved.get("arch") not in (None, ARCH_ALIASES.get(cfg.arch, cfg.arch)):
        raise UserError(f"{cfg.checkpoint_dir} was pretrained with --arch {saved['arch']}, not {cfg.arch}; "
                        f"drop --arch or pass --arch {saved['arch']}")
    for key in EVAL_INHERITED_KEYS:
        if key not in explicit and key in saved:
            setattr(cfg, key, saved[key])


def resolve(argv: list[str]) -> tuple[argparse.Namespace, dict | None, str | None]:
    """Parse ``argv`` into the final settings; load the checkpoint when resuming."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_yaml = apply_yaml(parser, pre.config) if pre.config else set()
    cfg = parser.parse_args(argv)
    explicit = explicit_dests(argv)
    chosen = choose_method_by_loss(cfg, explicit, pre.config)
    sources = {key: "command line" for key in explicit} | {key: f"--config {pre.config}" for key in from_yaml
                                                             if key not in explicit}
    if chosen:
        sources.pop("loss", None)
        sources["clr"] = chosen
    for key, value in METHODS[cfg.clr].defaults.items():
        if key not in sources:
            setattr(cfg, key, value)
            sources[key] = f"the default of --clr {cfg.clr}"
    run_id_dir(cfg)
    resume, resume_path = merge_resumed_run(cfg, explicit)
    if resume is not None:
        saved, earlier = resume.get("args", {}), resume.get("args", {}).get("sources")
        kept = ({k: v for k, v in earlier.items() if k not in explicit} if isinstance(earlier, dict)  # as chosen then
                else {k: "the resumed run" for k in saved if k not in explicit})  # a run from before sources
        sources = {**kept, **{k: v for k, v in sources.items() if k in explicit}}
    if {"iters", "epochs"} <= explicit and cfg.train_mode != "eval":
        raise UserError("--iters and --epochs both set the length of the run; pass one of them")
    if "epochs" in explicit and "iters" not in explicit:  # the command line's length wins over a yaml's or run's
        cfg.iters = None
    before = dict(vars(cfg))
    translate(cfg, explicit)
    sources.update({k: "another tool's spelling" for k, v in vars(cfg).items() if before.get(k) != v})
    if cfg.train_mode in ("eval", "export"):
        inherit_from_run(cfg, explicit)
    if cfg.train_mode == "eval":
        refuse_meaningless_eval(cfg, explicit)
    if cfg.lr is None:
        cfg.lr = default_lr(cfg.optimizer, cfg.learning_rate_scaling)
        sources["lr"] = f"the default for --optimizer {cfg.optimizer}"
    if cfg.workers is None:
        cfg.workers = machine_workers()
    validate(cfg, parser)
    refuse_other_methods_flags(cfg, explicit)
    if cfg.train_mode == "eval":
        cfg = eval_defaults(cfg)
    cfg.sources = {k: v for k, v in sorted(sources.items())  # where each setting came from: in config.yaml
                   if k in vars(cfg) and k not in NOT_SAVED_KEYS + ("sources",)}
    return frozen(cfg), resume, resume_path


def merge_resumed_run(cfg: argparse.Namespace, explicit: set[str]) -> tuple[dict | None, str | None]:
    """``--train_from`` of a pretraining run: the checkpoint chosen and read by :mod:`engine.checkpoint` (checksum,
    fallback, identity), and its saved settings taken for every setting the command line does not give; one that
    would change what the run is, refused."""
    if cfg.train_from is not None and not cfg.train_from.strip():
        raise UserError("--train_from is empty (an unset shell variable?); pass a checkpoint file name or 'latest'")
    if not cfg.train_from or cfg.train_mode == "eval":  # eval mode: engine/evaluate.py continues its own fits
        return None, None
    if "from_pretrained" in explicit:
        raise UserError("--train_from resumes a run with its own weights and --from_pretrained starts a new run from "
                        "another's; pass one of them")
    if not cfg.log_dir:
        raise UserError("--train_from needs --log_dir RUN_DIR (the run to continue)")
    if not os.path.isdir(cfg.log_dir):
        raise UserError(f"--log_dir {cfg.log_dir} does not exist; pass the run directory to resume")
    verify = launched_rank() == 0  # rank 0 reads the file for its checksum; the others map it
    if cfg.train_from == "latest":
        resume_path, resume = load_latest(cfg.log_dir, verify)
    else:
        resume_path = resolve_checkpoint(cfg.log_dir, cfg.train_from)
        resume = load_checkpoint(resume_path, verify)
    if resume.get("foreign"):
        raise UserError(f"{resume_path} is a {resume['foreign']} checkpoint, which has no state of this tool to "
                        f"resume; start a new run from its weights with --from_pretrained {resume_path}")
    saved = resume.get("args", {})
    check_identity(cfg.log_dir, resume_path, saved)
    for key in identity_keys(saved.get("clr", cfg.clr)):
        was = saved.get(key)  # a run from before --loss has none: it trained with its method's own loss
        if key in explicit and (key in saved or key == "loss") and getattr(cfg, key) != was:
            shown = was if not (key == "loss" and was is None) else f"its method's own loss ({saved.get('clr')})"
            raise UserError(f"{resume_path} was trained with --{key}={shown}, not {getattr(cfg, key)}; "
                            f"drop --{key} to resume, or start a new run")
    for key, value in saved.items():
        if hasattr(cfg, key) and key not in explicit and key not in NOT_SAVED_KEYS:
            setattr(cfg, key, value)
    if "keep_checkpoints" not in saved and "keep_checkpoints" not in explicit:
        cfg.keep_checkpoints = 0  # a run from before retention existed keeps every checkpoint, as it did
    return resume, resume_path


def choose_method_by_loss(cfg: argparse.Namespace, explicit: set[str], config: str | None) -> str | None:
    """--loss in pretraining: the registered method that trains with it (``MethodSpec.losses``), recorded as that
    method alone (--clr simclr --loss flatnce is --clr flatclr, the same run), and a method's own loss recorded as
    the default (None); a loss the method does not take is one line. On a resume without --clr the run's method is
    not known yet: --loss is then checked as the run's identity. Returns what chose the method (for config.yaml's
    sources) when --loss did."""
    if cfg.loss in (None, "insd") or cfg.train_mode not in ("pretrain", "ssl") or (
            cfg.train_from is not None and "clr" not in explicit):
        return None
    spec = METHODS[cfg.clr]
    target = spec.losses.get(cfg.loss)
    if target is not None and target != cfg.clr:  # another registered method is this loss
        chosen = f"--clr {cfg.clr} --loss {cfg.loss}"
        cfg.clr, cfg.loss = target, None
        return chosen
    if target is not None:  # the method takes it itself; its own loss is the default, recorded as such
        if cfg.loss == spec.loss:
            cfg.loss = None
        return None
    takers = [name for name, s in METHODS.items() if s.losses]
    given = "--loss" if "loss" in explicit or not config else f"loss: in {config}"
    method = f"--clr {cfg.clr}" + ("" if "clr" in explicit else " (the default)")
    if not spec.losses:
        raise UserError(f"{given} {cfg.loss} chooses the loss of {', '.join(takers)}; {method} trains with its own "
                        f"loss: drop {given.split(':')[0]}")
    own = ", ".join(loss for loss, name in spec.losses.items() if name == cfg.clr)
    other = next((name for name, s in METHODS.items() if s.losses.get(cfg.loss) == name), None)
    instead = f"--loss {cfg.loss} is --clr {other}: pass that instead" if other else f"no method trains with {cfg.loss}"
    raise UserError(f"{method} trains with {own}; {instead}")


def refuse_other_methods_flags(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """A method's exclusive flag given on the command line of another method would do nothing: one line."""
    own = {f.name for f in METHODS[cfg.clr].fields()}
    for spec in METHODS.values():
        for field in spec.fields():
            name = field.name
            if field.metadata["exclusive"] and name in explicit and name not in own and cfg.train_mode == "pretrain":
                users = [n for n, s in METHODS.items() if any(f.name == name for f in s.fields())]
                raise UserError(f"--{name} is a setting of --clr {' or '.join(users)}, not of {cfg.clr}; drop "
                                f"it or pass --clr {users[0]}")


def refuse_meaningless_eval(cfg: argparse.Namespace, explicit: set[str]) -> None:
    """Evaluation settings that would be silently ignored by the protocol asked for: one line."""
    if cfg.fc_augment and "fc_augment" in explicit and cfg.transfer_mode != "linear_eval":
        raise UserError(f"--fc_augment trains a linear classifier on augmented images; it means nothing to "
                        f"--transfer_mode {cfg.transfer_mode}: drop it or pass --transfer_mode linear_eval")
    if (cfg.checkpoint_dir or "").lower() == "pca" and (cfg.transfer_mode == "finetune" or cfg.fc_augment):
        raise UserError("--checkpoint_dir pca is a fixed projection of the pixels; evaluate it with linear_eval, knn "
                        "or logistic (without --fc_augment)")


