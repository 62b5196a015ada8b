"""Building a training set from prompt sources, one resumable step at a time (the data side of build_dataset.sh).

collect (files -> prompts with their source) -> clean (whitespace, length in CLIP tokens, mostly-English, exact
duplicates) -> embed (all-MiniLM-L6-v2 in shards, shared over ranks, resumable) -> semantic dedup (cosine >= 0.9 to
an earlier kept prompt) -> targets (the kept embeddings) -> folds (prompts grouped at cosine >= 0.7, GroupKFold, so
no near-duplicate crosses folds) -> generate (SD2 images, sharded over ranks or array tasks, see generate.py) ->
index (one row per image; written by whichever rank finds every image made). Dedup and groups are exact (blocked
matrix products, on a GPU for 10M prompts) or, for large sets on a CPU, through FAISS inverted lists (pairs.py).
Every step reads and writes files in one work folder, so each can run alone and a finished step is never redone.
"""

from .index import missing_images, write_image_index
from .layout import CLEAN, DEDUP, IMAGES, INDEX, PROMPT_INDEX, PROMPT_TARGETS, PROMPTS, TARGETS
from .pairs import leakage_pairs
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
           "DatasetError", "ascii_letter_share", "assign_folds", "clean", "collect", "leakage_pairs", "main",
           "missing_images", "run_text_steps", "semantic_dedup", "similarity_groups", "write_image_index"]
