"""The training checkpoint format (`OUTPUT/last.pt`, `best.pt`), shared by the trainer that writes it and the export
that reads it: a dict with `format`, `config` (the YAML mapping), `tower` (its manifest entry), `embedding_dim`,
`model` and `ema` state dicts, `progress`, `history`, `world_size`, `rng` and, mid-stage, the optimizer and scaler."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import I2PError

CHECKPOINT_FORMAT = "kaggle_i2p.train/1"


class CheckpointError(I2PError, ValueError):
    """A file that is not a readable kaggle_i2p training checkpoint."""


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (`last.pt` / `best.pt`), read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; the trainer writes OUTPUT/best.pt and OUTPUT/last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file becomes one clear error
        raise CheckpointError(f"{path}: cannot read it as a checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a kaggle_i2p training checkpoint (no format {CHECKPOINT_FORMAT!r}); "
                              "frozen tower files go straight into a manifest's checkpoint field")
    return checkpoint
