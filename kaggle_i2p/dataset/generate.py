"""Stable Diffusion 2 image generation for the training set, resumable and sharded over processes or GPUs.

Every (prompt, image number) has its own seed from `zlib.adler32` (a fixed seed for all prompts hurt the 2nd place),
so any shard layout produces the same images. Rank r of a world of W (from torchrun's or accelerate's RANK and
WORLD_SIZE, on one node or many, or from a SLURM job array) takes jobs r, r+W, r+2W, ...: no duplicates, no gaps.
Images that exist are skipped, and each is written atomically, so a killed run resumes without redoing or corrupting
work.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..core.errors import InputFileError
from ..core.fileio import atomic_open
from ..core.ranks import rank_and_world, rank_device
from ..core.validate import setting_changes
from .layout import GENERATION, IMAGES, PROMPT_INDEX, require_text_step

log = logging.getLogger("kaggle_i2p")


@dataclass(frozen=True)
class GenerationDefaults:
    """The generate step's defaults, in one place (the CLI and build_dataset.sh pass values only when given)."""

    images_per_prompt: int = 1
    steps: int = 25  # DPMSolver++ steps
    guidance: float = 9.0
    image_size: int = 512  # saved size: the host's test images are 512
    batch_size: int = 4
    image_format: str = "png"


DEFAULTS = GenerationDefaults()


@dataclass(frozen=True)
class ImageJob:
    prompt_row: int
    image_number: int
    image_id: str
    seed: int


def prompt_seed(prompt: str, image_number: int) -> int:
    """A seed per (prompt, image number), stable across runs, machines and shard layouts."""
    return zlib.adler32(f"{image_number}\x00{prompt}".encode())


def image_jobs(prompts: pd.DataFrame, images_per_prompt: int) -> Iterator[ImageJob]:
    """Every image to make, in a fixed order: prompt by prompt, image number by image number."""
    for row, (prompt_id, prompt) in enumerate(zip(prompts["promptId"], prompts["prompt"], strict=True)):
        for number in range(images_per_prompt):
            yield ImageJob(row, number, f"{prompt_id}_{number}", prompt_seed(prompt, number))


def shard(jobs: list[ImageJob], rank: int, world: int) -> list[ImageJob]:
    """Rank r's share: jobs r, r + W, r + 2W, ... (balanced; the shares of all ranks are disjoint and complete)."""
    return jobs[rank::world]


def check_model_folder(model_dir: str | Path) -> None:
    """A local diffusers Stable Diffusion folder (model_index.json, unet/), checked before any setting is written or
    image planned; InputFileError naming it and the fix."""
    folder = Path(model_dir)
    what = ("--model: give the local diffusers folder of Stable Diffusion 2 (StableDiffusionPipeline."
            "save_pretrained, or a copy of stabilityai/stable-diffusion-2 with model_index.json)")
    if not folder.is_dir():
        raise InputFileError(f"{folder}: no such folder; {what}")
    missing = [name for name in ("model_index.json", "unet/config.json") if not (folder / name).is_file()]
    if missing:
        raise InputFileError(f"{folder} has no {' or '.join(missing)}, so it is not a diffusers pipeline folder; "
                             f"{what}")


def load_pipeline(model_dir: str | Path, device: torch.device, fp16: bool):
    """A local diffusers StableDiffusionPipeline with DPMSolver++ and, in fp16, the SD2 attention upcast (without it
    the 768-v model makes black images); no safety checker, nothing from the hub."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    check_model_folder(model_dir)
    dtype = torch.float16 if fp16 else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype, local_files_only=True,
                                                upcast_attention=fp16)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, unet=unet, torch_dtype=dtype, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_generation_settings(work: Path, settings: dict) -> None:
    """Images already made with other settings are never mixed with new ones: a rerun must give the settings in
    WORK/generation.json (or use a new work folder)."""
    path, images = work / GENERATION, work / IMAGES
    if not path.is_file() or not images.is_dir() or not any(images.iterdir()):
        return  # nothing made yet: any settings may start
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputFileError(f"{path} is damaged ({err}); its images' settings are unknown: move the images away "
                             "or use a new work folder") from err
    differ = setting_changes(stored, settings)
    if differ:
        raise InputFileError(f"{work / IMAGES} holds images made with other settings: {'; '.join(differ)}; rerun "
                             "with those to finish them, or use a new work folder")


def generate(work: str | Path, model_dir: str | Path, images_per_prompt: int = DEFAULTS.images_per_prompt,
             steps: int = DEFAULTS.steps, guidance: float = DEFAULTS.guidance, image_size: int = DEFAULTS.image_size,
             render_size: int | None = None, batch_size: int = DEFAULTS.batch_size,
             image_format: str = DEFAULTS.image_format, device: str | None = None) -> list[Path]:
    """Make this rank's share of the missing images under WORK/images; returns the files it wrote."""
    from tqdm.auto import tqdm

    work = Path(work)
    require_text_step(work, "generate", (PROMPT_INDEX,))
    rank, world, local_rank = rank_and_world()
    settings = {"images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance,
                "image_size": image_size, "render_size": render_size, "format": image_format}
    check_generation_settings(work, settings)
    with atomic_open(work / GENERATION) as handle:  # by every rank (the same bytes): array tasks start in any order
        json.dump(settings, handle, indent=1)
    prompts = pd.read_parquet(work / PROMPT_INDEX)
    out_dir = work / IMAGES
    out_dir.mkdir(exist_ok=True)
    mine = shard(list(image_jobs(prompts, images_per_prompt)), rank, world)
    todo = [job for job in mine if not (out_dir / f"{job.image_id}.{image_format}").is_file()]
    log.info("rank %d/%d: %d images, %d already made", rank, world, len(mine), len(mine) - len(todo))
    if not todo:
        return []
    torch_device = torch.device(device or rank_device(local_rank))
    pipe = load_pipeline(model_dir, torch_device, fp16=torch_device.type == "cuda")
    size = render_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    written = []
    with tqdm(total=len(todo), desc=f"rank {rank}", position=rank, unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in batch]
            images = pipe([prompts["prompt"].iloc[job.prompt_row] for job in batch], num_inference_steps=steps,
                          guidance_scale=guidance, height=size, width=size, generator=generators).images
            for job, image in zip(batch, images, strict=True):
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), resample=3)  # bicubic, like the host's 768 -> 512
                path = out_dir / f"{job.image_id}.{image_format}"
                with atomic_open(path, "wb") as handle:
                    image.save(handle, format="PNG" if image_format == "png" else "WEBP",
                               **({"lossless": True} if image_format == "webp" else {}))
                written.append(path)
            bar.update(len(batch))
    return written
