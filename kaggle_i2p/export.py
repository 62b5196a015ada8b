"""Kept so the documented `kaggle_i2p.export.export_checkpoint(...)` keeps working: the code lives in
`kaggle_i2p.train.export`."""

from .train.checkpoint import read_checkpoint
from .train.export import ExportError, ExportResult, export_checkpoint

__all__ = ["ExportError", "ExportResult", "export_checkpoint", "read_checkpoint"]
