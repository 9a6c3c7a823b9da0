"""Preemption: SIGTERM/SIGUSR1 save the exact position inside the epoch and stop; resuming from it ends
bitwise where an uninterrupted run ends. Timed mid-epoch checkpoints share the naming scheme."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.errors import EXIT_PREEMPTED
from engine.checkpoint import all_checkpoints, prune_mid_epoch, resolve_checkpoint
from engine.trainer import Trainer
from main import main
from tests.conftest import ROOT, TINY

FOUR = TINY + ["--limit_train_batches=4", "--epochs=2"]  # 4 steps an epoch, 8 in all


def _signal_during(monkeypatch, step: int, sig=signal.SIGTERM):
    """Deliver ``sig`` to this process while global step ``step`` (1-based) runs."""
    real = Trainer.train_step

    def train_step(self, *args, **kwargs):
        if self.step + 1 == step:
            os.kill(os.getpid(), sig)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def _weights(path):
    return torch.load(path, weights_only=True)


def _same_end(a, b):
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


# InsDis draws from the global RNG every step and --faster_version carries a device generator: the two
# hardest cases run in every suite; the others (about 30 s each) with `make test-slow`.
# BYOL's case also turns on both rotation tricks (their draws are a function of the step, not saved state);
# InsDis's accumulates two micro-batches a step.
@pytest.mark.parametrize("clr, extra, sig", [
    ("insdis", ["--accu_iter=2"], signal.SIGTERM),
    ("byol", ["--faster_version", "--rot_task_p=0.5", "--rot_pred_weight=0.5", "--rot_pred_decay"], signal.SIGUSR1),
    pytest.param("simclr", [], signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("byol", [], signal.SIGUSR1, marks=pytest.mark.slow),
    pytest.param("simclr", ["--workers=2"], signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_saves_mid_epoch_and_the_resumed_run_ends_bitwise_equal(clr, extra, sig, tmp_path, monkeypatch,
                                                                           capsys):
    args = FOUR + [f"--clr={clr}"] + extra
    assert main(args + [f"--log_dir={tmp_path / 'straight'}"]) == 0
    _signal_during(monkeypatch, step=3, sig=sig)
    assert main(args + [f"--log_dir={tmp_path / 'cut'}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    mid = tmp_path / "cut" / "checkpoint_0000_step000003.pth.tar"
    assert err[-1] == (f"preempted: stopped by {signal.Signals(sig).name} at epoch 1, step 3 of 4, "
                       f"after saving {mid}; continue with --log_dir {tmp_path / 'cut'} --train_from latest")
    assert list(all_checkpoints(str(tmp_path / "cut"))) == [(0, 3)]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it
    monkeypatch.undo()
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest"]) == 0
    _same_end(_weights(tmp_path / "straight" / "checkpoint_0002.pth.tar"),
              _weights(tmp_path / "cut" / "checkpoint_0002.pth.tar"))
    records = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("straight", "cut")]
    assert [r["epoch"] for r in records[1]] == [1, 2]
    assert [r["loss"] for r in records[1]] == [r["loss"] for r in records[0]]  # the epoch's sums were saved
    assert not (tmp_path / "cut" / "checkpoint_0000_step000003.pth.tar").exists()  # pruned by the epoch end


def test_timed_mid_epoch_checkpoints_are_kept_few_and_latest_picks_the_newest(tmp_path, monkeypatch):
    args = FOUR + ["--clr=flatclr", "--epochs=3", "--save_every_n_steps=3"]
    assert main(args + [f"--log_dir={tmp_path / 'straight'}"]) == 0
    assert list(all_checkpoints(str(tmp_path / "straight"))) == [(1, 0), (2, 0), (3, 0)]  # mid ones pruned
    _signal_during(monkeypatch, step=7)
    assert main(args + [f"--log_dir={tmp_path / 'cut'}"]) == 3
    # step 3 (timer), 4 (epoch end), 6 (timer: 2 into epoch 2), 7 (the signal: 3 into epoch 2)
    assert list(all_checkpoints(str(tmp_path / "cut"))) == [(1, 0), (1, 2), (1, 3)]
    assert resolve_checkpoint(str(tmp_path / "cut"), "latest").endswith("checkpoint_0001_step000003.pth.tar")
    monkeypatch.undo()
    assert main([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest"]) == 0
    _same_end(_weights(tmp_path / "straight" / "checkpoint_0003.pth.tar"),
              _weights(tmp_path / "cut" / "checkpoint_0003.pth.tar"))


def test_pruning_keeps_the_newest_mid_epoch_checkpoints_after_the_last_epoch_end(tmp_path):
    names = ["checkpoint_0001.pth.tar", "checkpoint_0001_step000002.pth.tar", "checkpoint_0002.pth.tar",
             "checkpoint_0002_step000001.pth.tar", "checkpoint_0002_step000005.pth.tar",
             "checkpoint_0002_step000009.pth.tar", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    # a save at (2, 5) in a run resumed from an older position: nothing after it is touched
    assert prune_mid_epoch(str(tmp_path), keep=1, current=(2, 5)) == [
        str(tmp_path / "checkpoint_0001_step000002.pth.tar"), str(tmp_path / "checkpoint_0002_step000001.pth.tar")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0001.pth.tar", "checkpoint_0002.pth.tar",
                                            "checkpoint_0002_step000005.pth.tar", "checkpoint_0002_step000009.pth.tar",
                                            "notes.txt"]
    removed = prune_mid_epoch(str(tmp_path), keep=2, current=(2, 9))
    assert removed == [] and len(os.listdir(tmp_path)) == 5  # the two newest mid-epoch ones are kept


class Job:
    """A background process whose output goes to files (a pipe nobody reads would fill and block it)."""

    def __init__(self, cmd, cwd, env, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self.out, self.err = open(os.path.join(log_dir, "out.txt"), "w+"), open(os.path.join(log_dir, "err.txt"), "w+")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.out, stderr=self.err, text=True)

    def wait(self, timeout=600) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.err.seek(0)
        return code, self.err.read()


def _torchrun(args, cwd, name):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "main.py"), *args]
    return Job(cmd, cwd, env, os.path.join(cwd, f"logs_{name}"))


def _wait_for(path, seconds=300):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(path), f"{path} did not appear within {seconds} s"


@pytest.mark.slow  # about a minute: three torchrun runs (the slurm test below covers the signal path in every suite)
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_the_resume_is_bitwise(tmp_path):
    args = TINY + ["--clr=simclr", "--limit_train_batches=8", "--epochs=3"]
    code, err = _torchrun(args + [f"--log_dir={tmp_path / 'straight'}"], tmp_path, "straight").wait()
    assert code == 0, err[-3000:]
    cut = _torchrun(args + [f"--log_dir={tmp_path / 'cut'}"], tmp_path, "cut")
    _wait_for(tmp_path / "cut" / "checkpoint_0001.pth.tar")
    time.sleep(0.5)  # into epoch 2
    cut.proc.send_signal(signal.SIGTERM)  # torchrun passes SIGTERM on to its two workers
    code, err = cut.wait(timeout=300)
    assert code != 0
    assert err.count("preempted: stopped by SIGTERM") == 1, err[-3000:]  # rank 0 alone reports
    saved = list(all_checkpoints(str(tmp_path / "cut")))
    assert saved[-1] > (1, 0) and len(_weights(resolve_checkpoint(str(tmp_path / "cut"), "latest"))["rng"]) == 2
    code, err = _torchrun([f"--log_dir={tmp_path / 'cut'}", "--train_from=latest"], tmp_path, "resumed").wait()
    assert code == 0, err[-3000:]
    _same_end(_weights(tmp_path / "straight" / "checkpoint_0003.pth.tar"),
              _weights(tmp_path / "cut" / "checkpoint_0003.pth.tar"))


def test_the_slurm_script_passes_usr1_on_as_sigterm_saves_and_requeues(tmp_path):
    """scripts/slurm_multinode.sh with srun and scontrol replaced by stand-ins, on one node of 2 gloo ranks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit=1
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; '
                                      f'else echo "$@" >> {tmp_path / "scontrol.log"}; fi\n')
    (bin_dir / "torchrun").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="77",
               SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="2", GPUS_PER_NODE="2", MASTER_PORT="29517",
               RUN_DIR=str(run_dir))
    job = Job(["bash", os.path.join(ROOT, "scripts", "slurm_multinode.sh")]
              + TINY + ["--clr=simclr", "--limit_train_batches=8", "--epochs=3", "--workers=0"],
              ROOT, env, str(tmp_path / "logs"))
    _wait_for(run_dir / "checkpoint_0001.pth.tar")
    job.proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch script
    code, err = job.wait(timeout=300)
    assert code == 0, err[-3000:]
    assert "preempted: stopped by SIGTERM" in err, err[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
    assert max(all_checkpoints(str(run_dir))) > (1, 0)  # the position inside epoch 2 was saved


# ----------------------------------------------------------------------------- evaluations that train
@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(TINY + ["--clr=simclr", "--epochs=1", f"--log_dir={run}"]) == 0
    return run


def _signal_in_fit(monkeypatch, call: int, sig=signal.SIGTERM):
    """Deliver ``sig`` while the fit's ``call``-th (1-based) optimizer step runs."""
    import engine.fitting as ev

    real, calls = ev.accumulate_gradients, []

    def accumulate(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "accumulate_gradients", accumulate)


@pytest.mark.parametrize("mode, tag, lr, call", [
    (["--transfer_mode=finetune"], "finetune_semi0.1", 0.00625, 7),
    (["--transfer_mode=finetune"], "finetune_semi0.1", 0.00625, 4),  # at the end of epoch 1
    (["--transfer_mode=linear_eval", "--fc_augment"], "linear_eval_semi0.1", 0.0125, 7)])
def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_result(eval_run, tmp_path, monkeypatch, capsys,
                                                                       mode, tag, lr, call):
    """144 labelled images at batch 32: 4 steps an epoch, 8 in all; SIGTERM during step 7 (epoch 2, step 3)
    or step 4 (the last of epoch 1: the position is the start of epoch 2)."""
    import shutil

    runs = {name: shutil.copytree(eval_run, tmp_path / name) for name in ("whole", "cut")}
    args = ["--train_mode=eval", "--workers=0", "--device=cpu", "--no-tsne", "--semi_ratio=0.1", "--fc_epochs=2",
            "--fc_batch_size=32", "--fc_micro_batch_size=16"] + mode
    assert main(args + [f"--checkpoint_dir={runs['whole']}"]) == 0
    whole = json.load(open(runs["whole"] / "eval" / f"{tag}_epoch0001.json"))

    cut = [f"--checkpoint_dir={runs['cut']}"]
    partial = runs["cut"] / "eval" / f"{tag}_epoch0001.partial.pth.tar"
    _signal_in_fit(monkeypatch, call=call)
    assert main(args + cut) == EXIT_PREEMPTED
    name = "finetune" if "finetune" in tag else "linear"
    epoch, step = (call - 1) // 4 + 1, (call - 1) % 4 + 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"preempted: stopped by SIGTERM at {name} epoch {epoch}, step {step} of 4, after saving {partial}; continue "
        "with the same command and --train_from latest")
    assert partial.exists() and not (runs["cut"] / "eval" / f"{tag}_epoch0001.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()

    assert main(args + cut + ["--train_from=latest", "--fc_lr=0.5"]) == 2  # another setting: refused, kept
    assert capsys.readouterr().err.strip() == (
        f"error: {partial} was saved with --fc_lr={lr}, not 0.5; continue with the same settings, or delete that "
        "file to start afresh")
    assert partial.exists()

    assert main(args + cut + ["--train_from=latest"]) == 0
    resumed = json.load(open(runs["cut"] / "eval" / f"{tag}_epoch0001.json"))
    assert resumed.pop("resumed_at_step") == call
    assert resumed.pop("checkpoint") != whole.pop("checkpoint")  # the two copies of the run
    assert resumed.pop("provenance")["command"] != whole.pop("provenance")["command"]  # each its own command
    assert resumed == whole  # accuracy and the last epoch's training loss, bitwise
    assert not partial.exists()

    assert main(args + cut + ["--train_from=latest"]) == 2  # nothing left to continue
    assert capsys.readouterr().err.strip() == (
        f"error: --train_from latest: there is no interrupted evaluation to continue ({partial} does not exist); "
        "drop --train_from to start it")


def test_ctrl_c_prints_the_command_that_continues_the_run_and_the_resume_names_its_checkpoint(tmp_path, monkeypatch,
                                                                                               capsys):
    import engine.pretrain as pretrain_module

    real = pretrain_module.train_epoch

    def interrupted(trainer, loader, epoch, *args, **kwargs):
        if epoch == 1:  # after the first epoch's checkpoint
            raise KeyboardInterrupt
        return real(trainer, loader, epoch, *args, **kwargs)

    monkeypatch.setattr(pretrain_module, "train_epoch", interrupted)
    args = TINY + ["--clr=simclr", "--epochs=2", f"--results_dir={tmp_path}"]
    assert main(args) == 130
    run = next((tmp_path / "digits" / "16_SimCLR").iterdir())
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"interrupted; the last checkpoint written is intact; continue with: python main.py --log_dir {run} "
                    "--train_from latest")
    monkeypatch.setattr(pretrain_module, "train_epoch", real)
    assert main(TINY + ["--clr=simclr", "--epochs=2", f"--log_dir={run}", "--train_from=latest"]) == 0
    assert f"resuming from {run / 'checkpoint_0001.pth.tar'} (epoch 1)" in capsys.readouterr().out
    monkeypatch.setattr(pretrain_module, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(TINY + ["--clr=simclr", "--epochs=2", f"--results_dir={tmp_path / 'fresh'}"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("interrupted; no checkpoint was written yet; run the "
                                                                "same command again to start over")
