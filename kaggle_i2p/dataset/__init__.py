"""Building a training set from prompt sources, one resumable step at a time (the data side of build_dataset.sh).

collect (files -> prompts with their source) -> clean (whitespace, length in CLIP tokens, mostly-English, exact
duplicates) -> semantic dedup (all-MiniLM-L6-v2, cosine >= 0.9 to an earlier kept prompt) -> targets (the MiniLM
embeddings) -> folds (prompts grouped at cosine >= 0.7, GroupKFold, so no near-duplicate crosses folds)
-> generate (SD2 images, sharded over ranks, see generate.py) -> index (one row per image that exists).
Every step reads and writes files in one work folder, so each can run alone and a finished step is never redone.
"""

from .index import write_image_index
from .layout import CLEAN, DEDUP, IMAGES, INDEX, PROMPT_INDEX, PROMPT_TARGETS, PROMPTS, TARGETS
from .prompts import (
    CLIP_CONTEXT,
    DatasetError,
    ascii_letter_share,
    assign_folds,
    clean,
    collect,
    run_text_steps,
    semantic_dedup,
    similarity_groups,
)


def main(argv: list[str] | None = None) -> int:
    """`python -m kaggle_i2p.dataset ...` (see `kaggle_i2p.dataset.__main__`)."""
    from .__main__ import main as run

    return run(argv)


__all__ = ["CLEAN", "CLIP_CONTEXT", "DEDUP", "IMAGES", "INDEX", "PROMPTS", "PROMPT_INDEX", "PROMPT_TARGETS", "TARGETS",
           "DatasetError", "ascii_letter_share", "assign_folds", "clean", "collect", "main", "run_text_steps",
           "semantic_dedup", "similarity_groups", "write_image_index"]
