"""The WORK-folder contract of the dataset steps: every file each step reads and writes, by name, in one place.

text: prompts.parquet -> clean.parquet -> embeddings/ -> dedup.parquet + prompt_targets.npy -> prompt_index.parquet
(one row per kept prompt); generate: images/ and generation.json; index: index.parquet + targets.npy (one row per
generated image), which evaluate, tune and the trainer read.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputFileError

TEXT_SETTINGS = "text.json"  # the text step's inputs and settings: a rerun with others is refused, never mixed in
PROMPTS, CLEAN, DEDUP = "prompts.parquet", "clean.parquet", "dedup.parquet"
EMBEDDINGS = "embeddings"  # the clean prompts' MiniLM embeddings, a bank built in shards (removed after dedup)
PROMPT_TARGETS, PROMPT_INDEX = "prompt_targets.npy", "prompt_index.parquet"  # one row per kept prompt
INDEX, TARGETS, IMAGES = "index.parquet", "targets.npy", "images"  # one row per generated image
GENERATION = "generation.json"  # the settings the images were generated with
IMAGE_FORMATS = ("png", "webp")  # how images are saved: PNG, or lossless WebP


def images_per_prompt(work: Path) -> int:
    """How many images per prompt the generate step was run with (1 before it ran)."""
    settings = Path(work) / GENERATION
    if not settings.is_file():
        return 1
    try:
        count = json.loads(settings.read_text(encoding="utf-8"))["images_per_prompt"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputFileError(f"{settings} is damaged ({type(err).__name__}: {err}); rerun the generate step with "
                             "the settings the images were made with, which rewrites it") from err
    if not (isinstance(count, int) and count >= 1):
        raise InputFileError(f"{settings}: images_per_prompt {count!r} is not a whole number >= 1")
    return count


def require_text_step(work: Path, step: str, files: tuple[str, ...] = (PROMPT_INDEX, PROMPT_TARGETS)) -> None:
    """The text step's output (`files`) must be in WORK before `step` reads it: one message saying what is missing
    and the command that makes it (never a bare path from the parquet reader)."""
    work = Path(work)
    if not work.is_dir():
        raise InputFileError(f"--work {work}: no such folder; the {step} step reads the folder the text step wrote "
                             f"(python -m kaggle_i2p.dataset text PROMPTS... --work {work}, or build_dataset.sh)")
    missing = [name for name in files if not (work / name).is_file()]
    if missing:
        raise InputFileError(f"{work} has no {' or '.join(missing)}: the text step has not finished there; run "
                             f"`python -m kaggle_i2p.dataset text PROMPTS... --work {work}` (or build_dataset.sh) "
                             f"before the {step} step")
