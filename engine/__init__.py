"""Training engine: pretraining loop, distributed helpers, checkpoints, optimizers, run logs."""
