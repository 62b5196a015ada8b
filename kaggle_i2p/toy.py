"""Toy towers: tiny random-weight timm and open_clip towers with a manifest, for tests, the demo and benchmarks.

They exercise the real machinery (manifest, safetensors checkpoints, both libraries, open_clip position-embedding
resizing, TTA, weighting) in seconds on a CPU. Their predictions are random directions: scores mean nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .manifest import parse_manifest
from .towers import build_tower

PRIOR_PATH = Path(__file__).parent / "data" / "mean_prompt_embedding.npy"  # mean embedding of generic prompts
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# A tiny open_clip ViT in open_clip's own model-config format (native size 64, patch 16).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def toy_manifest_dict() -> dict:
    """The toy ensemble as manifest data (paths relative to the manifest's folder)."""
    return {
        "embedding_dim": 384,
        "fallback": "fallback.npy",
        "towers": [
            {"name": "toy_timm_vit", "library": "timm", "arch": "test_vit", "checkpoint": "toy_timm_vit.safetensors",
             "head": {"type": "mlp", "hidden": 48, "norm": "batchnorm", "activation": "relu"},
             "image": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": [64, 96], "hflip": True},
             "weight": 0.6},
            {"name": "toy_open_clip_vit", "library": "open_clip", "arch": "tiny_open_clip_vit.json",
             "checkpoint": "toy_open_clip_vit.safetensors", "head": {"type": "linear"},
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bilinear",
                       "resize": "shorter_side_center_crop", "resolutions": [64, 80]},
             "weight": 0.4},
        ],
    }


def build_toy_ensemble(out_dir: str | Path, seed: int = 0) -> Path:
    """Write random-weight checkpoints, the open_clip config, a fallback vector and the manifest; return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tiny_open_clip_vit.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=1))
    shutil.copyfile(PRIOR_PATH, out_dir / "fallback.npy")
    data = toy_manifest_dict()
    manifest_path = out_dir / "toy_manifest.yaml"
    spec_manifest = parse_manifest(data, manifest_path, check_files=False)
    for index, spec in enumerate(spec_manifest.towers):
        torch.manual_seed(seed + index)
        tower = build_tower(spec, spec_manifest.embedding_dim)
        state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
        save_file(state, str(spec.checkpoint))
    manifest_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest_path
