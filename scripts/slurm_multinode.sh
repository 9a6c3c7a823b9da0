#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one torchrun per node (srun), which starts one process per GPU.
#
#   sbatch scripts/slurm_multinode.sh                       # FlatCLR on ImageNet, 4 nodes x 8 GPUs
#   sbatch --nodes=2 scripts/slurm_multinode.sh --config configs/imagenet_simclr.yaml
#
# --batch_size is the global batch over all nodes; it must divide by nodes x GPUs per node.
# Preemption: 5 minutes before the time limit SLURM sends USR1 to this script (--signal=B:USR1@300); the trap
# passes SIGTERM to srun, srun to torchrun, torchrun to every worker; the workers agree on one step, save the
# exact position inside the epoch, rank 0 leaves RUN_DIR/.preempted, and they exit. torchrun waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for that (default 30; set to 240 below, older torch versions ignore it
# and keep 30). The job requeues itself when .preempted is there and resumes from the newest checkpoint of the
# same run directory (RUN_DIR below is fixed per job so a requeued job finds it). A SIGTERM from the scheduler
# (preemption) takes the same path through the TERM trap.
#SBATCH --job-name=flatclr
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-results/imagenet/${SLURM_JOB_ID}_FlatCLR}

export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

RESUME=()
if ls "$RUN_DIR"/checkpoint_*.pth.tar >/dev/null 2>&1; then
  RESUME=(--train_from latest)        # requeued after preemption: continue the same run
fi

SRUN_PID=
forward_stop() {
  set +e
  echo "$(date): $1: saving the run's position" >&2
  [ -n "$SRUN_PID" ] && kill -TERM "$SRUN_PID" 2>/dev/null
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  main.py --config configs/imagenet_flatclr.yaml --log_dir "$RUN_DIR" ${RESUME[@]+"${RESUME[@]}"} \
  --workers $(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE )) "$@" &
SRUN_PID=$!
STATUS=0
while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trap interrupts wait; wait again until srun has ended
  wait "$SRUN_PID" || STATUS=$?
done
if [ -f "$RUN_DIR/.preempted" ]; then  # the position is saved: continue in a new allocation
  echo "$(date): requeueing: $(cat "$RUN_DIR/.preempted")" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$STATUS"
