"""The WORK-folder contract of the dataset steps: every file each step reads and writes, by name, in one place.

text: prompts.parquet -> clean.parquet -> embeddings/ -> dedup.parquet + prompt_targets.npy -> prompt_index.parquet
(one row per kept prompt); generate: images/ and generation.json; index: index.parquet + targets.npy (one row per
generated image), which evaluate, tune and the trainer read.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    return json.loads(settings.read_text())["images_per_prompt"] if settings.is_file() else 1
