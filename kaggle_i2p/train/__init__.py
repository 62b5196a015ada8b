"""Training upstream of Kaggle: the YAML config (`config`), the dataset folder and image pipeline (`data`), the recipe
(layer-wise LR decay, EMA, loss: `recipe`), the checkpoint format (`checkpoint`), the trainer, and the export of a
checkpoint as a frozen tower with its manifest entry (`export`)."""

from .config import TrainConfig, TrainConfigError, load_train_config
from .export import ExportError, ExportResult, export_checkpoint
from .trainer import Trainer, TrainingError, TrainResult, train

__all__ = ["ExportError", "ExportResult", "TrainConfig", "TrainConfigError", "TrainResult", "Trainer",
           "TrainingError", "export_checkpoint", "load_train_config", "train"]
