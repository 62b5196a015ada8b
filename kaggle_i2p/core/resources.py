"""Where things are: the Kaggle folders, the package data, and the one "are we on Kaggle" test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_SAMPLE_DIR = KAGGLE_INPUT / "stable-diffusion-image-to-prompts"
DEFAULT_MANIFEST = "weights_manifest.yaml"
DEMO_MANIFEST = "demo"
DATA_DIR = Path(__file__).parents[1] / "data"
PRIOR_PATH = DATA_DIR / "mean_prompt_embedding.npy"  # the mean MiniLM embedding of generic prompts (the fallback)


def on_kaggle() -> bool:
    """True inside a Kaggle notebook (its kernel variable, or the /kaggle/input mount): the one test every default
    that differs on Kaggle uses."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_INPUT.is_dir()


def default_manifest() -> str:
    """The manifest a command uses when none is given: the competition's file on Kaggle, else the demo ensemble."""
    return DEFAULT_MANIFEST if on_kaggle() else DEMO_MANIFEST


# Named manifests (`demo`) resolve to a file made on first use: name -> the builder that returns it. The package face
# registers its own here at import (nothing heavy imported for it); `manifest.register_named_manifest` adds others.
NAMED_MANIFESTS: dict[str, Callable[[], Path]] = {}
