"""Kept so the documented `kaggle_i2p.trainer.train(config)` keeps working: the code lives in `kaggle_i2p.train`."""

from .train.trainer import Trainer, TrainingError, TrainResult, train

__all__ = ["TrainResult", "Trainer", "TrainingError", "train"]
