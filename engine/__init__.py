"""Training engine: pretraining loop, evaluation protocols, kNN, checkpoints, optimizers, run logs."""
