"""Which share of a job this process has: torchrun's or accelerate's global rank, or a SLURM job array's task, and
the device a rank works on. Image generation, the text step's embedding and build-bank all shard by it."""

from __future__ import annotations

import os

import torch

from .errors import OptionError


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's or accelerate's RANK, WORLD_SIZE and LOCAL_RANK (global over
    nodes: `torchrun --nnodes N --node_rank R ...`); else a SLURM job array's task (`sbatch --array=0-99`: task
    (SLURM_ARRAY_TASK_ID - MIN) / STEP of SLURM_ARRAY_TASK_COUNT, no torch.distributed needed); else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world, local = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        source = "RANK and WORLD_SIZE"
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        offset = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        rank, world, local = offset // int(env.get("SLURM_ARRAY_TASK_STEP", 1)), int(env["SLURM_ARRAY_TASK_COUNT"]), 0
        source = "SLURM_ARRAY_TASK_ID, _MIN, _STEP and _COUNT"
    else:
        return 0, 1, 0
    if not 0 <= rank < world:
        raise OptionError(f"rank {rank} of a world of {world} (from {source}): every rank must be in 0..{world - 1}; "
                          "check the launcher's settings")
    return rank, world, local


def rank_device(local_rank: int) -> str:
    """The device a rank works on when none is given: its own GPU (LOCAL_RANK) when there is one, else the CPU."""
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
