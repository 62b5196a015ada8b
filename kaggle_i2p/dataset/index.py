"""The index step: one row per generated image that exists, with its prompt's target, sorted by image id."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import InputFileError
from ..core.fileio import atomic_open, write_parquet
from .generate import image_jobs
from .layout import IMAGES, INDEX, PROMPT_INDEX, PROMPT_TARGETS, TARGETS, images_per_prompt, require_text_step


def missing_images(work: str | Path, per_prompt: int, image_format: str = "png") -> int:
    """How many of the images the prompt index asks for are not on disk yet (one directory listing, not a stat per
    image): 0 tells the rank that finishes last that the index can be written."""
    work = Path(work)
    require_text_step(work, "index")
    made = {entry.name for entry in os.scandir(work / IMAGES)} if (work / IMAGES).is_dir() else set()
    jobs = image_jobs(pd.read_parquet(work / PROMPT_INDEX, columns=["promptId", "prompt"]), per_prompt)
    return sum(f"{job.image_id}.{image_format}" not in made for job in jobs)


def write_image_index(work: str | Path, image_format: str = "png") -> Path:
    """index.parquet (imgId, prompt, source, path, seed, group, fold; sorted by imgId) and targets.npy aligned to
    it, for every generated image on disk; the evaluate/tune commands and the trainer read these directly."""
    work = Path(work)
    require_text_step(work, "index")
    prompts = pd.read_parquet(work / PROMPT_INDEX)
    targets = np.load(work / PROMPT_TARGETS)
    rows = []
    for job in image_jobs(prompts, images_per_prompt(work)):
        path = work / IMAGES / f"{job.image_id}.{image_format}"
        if path.is_file():
            prompt = prompts.iloc[job.prompt_row]
            rows.append({"imgId": job.image_id, "prompt": prompt["prompt"], "source": prompt["source"],
                         "path": str(path.relative_to(work)), "seed": job.seed, "group": int(prompt["group"]),
                         "fold": int(prompt["fold"]), "prompt_row": job.prompt_row})
    if not rows:
        raise InputFileError(f"{work / IMAGES} holds none of the {image_format} images the prompt index asks for: run "
                             f"the generate step first (python -m kaggle_i2p.dataset generate --work {work} --model "
                             "SD2_FOLDER), or pass the --format the images were saved in")
    index = pd.DataFrame(rows).sort_values("imgId", ignore_index=True)
    with atomic_open(work / TARGETS, "wb") as handle:
        np.save(handle, targets[index["prompt_row"].to_numpy()])
    write_parquet(index.drop(columns="prompt_row"), work / INDEX)
    return work / INDEX
