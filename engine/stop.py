"""Stopping on request: SIGTERM/SIGUSR1 (SLURM's warning before a preemption or the time limit) and timed saves.

Used by pretraining (engine/pretrain.py) and by the evaluations that train through the backbone
(engine/evaluate.py); both save their exact position and raise ``common.errors.Preempted``.
"""
from __future__ import annotations

import signal
import threading
import time
from argparse import Namespace


class StopRequests:
    """This rank's requests after each step: stop (SIGTERM or SIGUSR1 arrived: SLURM sends one before a
    preemption or the time limit; torchrun passes SIGTERM on to its workers) and save (every
    ``--save_every_n_steps`` steps or ``--save_every_n_minutes``). The handlers live as long as the run."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    SAME_SIGNAL_S = 2.0  # signals this close together are one request

    def __init__(self, cfg: Namespace) -> None:
        self.every_steps = cfg.save_every_n_steps or 0
        self.every_s = (cfg.save_every_n_minutes or 0) * 60
        self.received: str | None = None
        self.received_at = 0.0
        self.last_save = time.monotonic()
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = previous if previous is not None else signal.SIG_DFL
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is not None and now - self.received_at < self.SAME_SIGNAL_S:
            return  # the same stop twice (e.g. to the process group and passed on by a parent): one request
        if self.received is not None:  # a later second signal: the run is stuck, let the default action happen
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received, self.received_at = signal.Signals(signum).name, now

    def __call__(self, next_step: int) -> tuple[bool, bool]:
        """(stop, save) wanted after step ``next_step`` (1-based)."""
        due = bool(self.every_steps and next_step % self.every_steps == 0)
        due = due or bool(self.every_s and time.monotonic() - self.last_save >= self.every_s)
        return self.received is not None, due

    def saved(self) -> None:
        self.last_save = time.monotonic()
