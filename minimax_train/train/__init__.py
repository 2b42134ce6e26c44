"""Trainer: loop, optimiser and schedule, checkpointing, metrics and logging.

Entry point: `python -m minimax_train.train [hydra overrides]`; programmatic: `train(job, run_dir)`."""

from minimax_train.train.loop import NonFiniteError, TrainResult, train

__all__ = ["train", "TrainResult", "NonFiniteError"]
