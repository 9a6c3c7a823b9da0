"""Command line for contrastive self-supervised learning (SimCLR, FlatCLR, BYOL, InsDis and the meta-learning
heads): parse, then dispatch on ``--train_mode``. Launch with ``python main.py`` or
``torchrun --nproc_per_node=N main.py``; see README.md.

The settings are built in :mod:`cli` (the parser, ``--config`` yaml, the other tools' spellings, the resume
merge, the checks); the work is done in :mod:`engine` (pretraining with its final evaluation, evaluation,
export, the summary of runs).
"""
from __future__ import annotations

import sys

import torch

from cli.parser import build_parser  # noqa: F401 - part of the command line's API (tests, sweeps)
from cli.resolve import resolve
from common import provenance
from common.distributed import cleanup, launched_rank
from common.errors import EXIT_PREEMPTED, Preempted, UserError, worker_message
from engine.evaluate import evaluate
from engine.export import export_run
from engine.final_eval import pretrain_then_evaluate
from engine.summary import print_summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    provenance.COMMAND[:] = argv
    mode = "pretrain"
    try:
        cfg, resume, resume_path = resolve(argv)
        mode = cfg.train_mode
        if mode == "eval":
            evaluate(cfg)
        elif mode == "export":
            export_run(cfg)
        elif mode == "summary":
            if not cfg.checkpoint_dir:
                raise UserError("--train_mode=summary needs --checkpoint_dir: a run directory or results/")
            print_summary(cfg.checkpoint_dir)
        else:
            held = [resume]
            del resume  # the engine holds the only reference, and lets the mapped file go once restored
            pretrain_then_evaluate(cfg, held, resume_path)
    except UserError as err:
        return report_error(worker_message(str(err)))
    except torch.cuda.OutOfMemoryError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        if mode == "eval":
            return report_error(f"CUDA ran out of memory ({first[:160]}); lower --fc_micro_batch_size (images per "
                                "device and pass; --fc_batch_size is still reached by accumulation)")
        return report_error(f"CUDA ran out of memory ({first[:160]}); lower --batch_size (it is the global batch, "
                            "split over the GPUs) or use --precision bf16")
    except Preempted as stop:  # every rank stopped at the same step; rank 0 says so
        if launched_rank() == 0:
            print(f"preempted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt as stop:
        if launched_rank() == 0:  # pretraining adds the command that continues the run
            print(f"interrupted; {getattr(stop, 'resume_command', 'the last checkpoint written is intact')}",
                  file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0


def report_error(message: str) -> int:
    """One line on stderr (prefixed with the rank under torchrun, except rank 0); exit status 2."""
    rank = launched_rank()
    print(f"{'' if rank == 0 else f'[rank {rank}] '}error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
