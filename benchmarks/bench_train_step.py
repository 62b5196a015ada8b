"""Time one training step of a ViT-B/16 regressor (CLIP-style timm ViT, MLP head) at 224 and 336, per precision.

A step is what the trainer does per optimizer step: forward under autocast, cosine embedding loss, backward (through
a grad scaler for fp16), gradient clipping, AdamW over layer-wise-decayed groups, EMA update. Random weights and
random inputs: this measures compute, not data loading. Prints one JSON line per (resolution, precision):
ms_per_step, images_per_s, and the peak GPU memory on CUDA.

Usage: python benchmarks/bench_train_step.py [--device cuda] [--batch-size 64] [--precisions fp16 bf16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kaggle_i2p.kinds.regressor import HeadSpec, RegressorSpec
from kaggle_i2p.manifest import ImageSpec
from kaggle_i2p.models.towers import build_tower
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD
from kaggle_i2p.train.recipe import ModelEMA, cosine_embedding_loss, llrd_param_groups

ARCH = "vit_base_patch16_clip_224"


def step_time(resolution: int, precision: str, batch_size: int, steps: int, device: torch.device,
              arch: str = ARCH) -> dict:
    """Mean wall time of `steps` optimizer steps after two warm-up steps."""
    spec = RegressorSpec(name="bench", library="timm", arch=arch, checkpoint=None, head=HeadSpec("mlp", 1024),
                         image=ImageSpec(CLIP_MEAN, CLIP_STD, "bicubic", "squash", (resolution,)), weight=1.0,
                         native_resolution=resolution)
    torch.manual_seed(0)
    tower = build_tower(spec).to(device).train()
    optimizer = torch.optim.AdamW(llrd_param_groups(tower, 1e-4, 0.6), lr=1e-4)
    ema = ModelEMA(tower, 0.9998)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = torch.randn(batch_size, 3, resolution, resolution, device=device)
    targets = torch.nn.functional.normalize(torch.randn(batch_size, 384, device=device), dim=-1)

    def one_step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = cosine_embedding_loss(tower(images).float(), targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.update(tower)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        one_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    seconds = (time.perf_counter() - started) / steps
    result = {"arch": arch, "resolution": resolution, "precision": precision, "batch_size": batch_size,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "ms_per_step": round(seconds * 1000, 1), "images_per_s": round(batch_size / seconds, 1)}
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 2 on CPU)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 336])
    parser.add_argument("--arch", default=ARCH, help="timm architecture (default: %(default)s)")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp16 bf16 on CUDA, fp32 bf16 on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    for resolution in args.resolutions:
        for precision in args.precisions or (["fp16", "bf16"] if cuda else ["fp32", "bf16"]):
            print(json.dumps(step_time(resolution, precision, args.batch_size or (64 if cuda else 4),
                                       args.steps or (20 if cuda else 2), device, args.arch)), flush=True)


if __name__ == "__main__":
    main()
