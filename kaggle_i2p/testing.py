"""Test fixtures (for tests and benchmarks only; nothing else in the package imports this module): tiny random-weight
timm and open_clip towers with a manifest, and a toy training set.

The towers exercise the real machinery (manifest, safetensors checkpoints, both libraries, open_clip position-embedding
resizing, TTA, weighting) in seconds on a CPU. Their predictions are random directions: scores mean nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .core.resources import PRIOR_PATH
from .inference.selfcheck import example_manifest
from .kinds.interrogator import EXAMPLE_PHRASES
from .kinds.interrogator import write_example as write_interrogator_example
from .manifest import parse_manifest, write_manifest
from .models.backbones.open_clip_models import EXAMPLE_CONFIG
from .models.backbones.programs import ExampleProgram, write_example_program
from .models.backbones.transformers_models import (
    EXAMPLE_OPT,
    EXAMPLE_QFORMER,
    EXAMPLE_VISION,
    EXAMPLE_WORDS,
    write_example_captioner,
)
from .models.towers import Tower, build_tower

# Manifest `image` statistics as YAML-friendly lists, from timm's own constants.
CLIP_MEAN, CLIP_STD = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
IMAGENET_MEAN, IMAGENET_STD = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)

# A tiny open_clip ViT in open_clip's own model-config format (native size 64, patch 16): the library's example.
TINY_OPEN_CLIP_CONFIG = EXAMPLE_CONFIG


def assert_served_as_own_forward(model: torch.nn.Module, manifest: str | Path, image_dir: str | Path,
                                 batch_size: int = 3, distinct: float = 0.999) -> np.ndarray:
    """Serve a one-tower manifest on `image_dir` and assert its vectors are `model`'s own forward on the same views,
    TTA-combined (cosine >= 0.9999 per image), and that they depend on the image (the first two images' cosine below
    `distinct`); returns the served vectors."""
    import kaggle_i2p

    from .core.ensemble import combine_views
    from .inference.images import decode_image, make_view
    from .manifest import load_manifest

    image_dir = Path(image_dir)
    spec = load_manifest(manifest).towers[0]
    got = kaggle_i2p.run_prediction(image_dir, manifest, device="cpu", num_workers=0, progress=False,
                                    batch_size=batch_size).embeddings
    ids = sorted(p.stem for p in image_dir.iterdir())
    pixels = [decode_image(image_dir / f"{i}.png") for i in ids]
    with torch.no_grad():
        views = [model.eval()(make_view(pixels, spec.image, v.resolution, v.flip, norm=v.norm)).numpy()
                 for v in spec.views]
    want = combine_views(views, spec.view_weight_list())
    assert (np.sum(got * want, axis=1) >= 0.9999).all(), np.sum(got * want, axis=1)
    assert np.dot(got[0], got[1]) < distinct
    return got


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
    write_manifest(data, manifest_path)
    return manifest_path


def build_toy_training_set(work: str | Path, n_prompts: int = 48, folds: int = 4, size: int = 64,
                           seed: int = 0) -> Path:
    """A build_dataset.sh-shaped folder (images/, index.parquet, targets.npy) the trainer learns from in seconds:
    the 7 real Kaggle sample images with their true MiniLM targets, plus `n_prompts` synthetic prompts of 1-2
    noisy single-colour images whose target is a fixed function of the colour (around the mean prompt direction).
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    from .dataset.layout import IMAGES, INDEX, TARGETS
    from .inference.dryrun import bundled_sample_dir, sample_targets

    work = Path(work)
    (work / IMAGES).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prior = np.load(PRIOR_PATH).astype(np.float32)
    mixing = rng.normal(size=(384, 3)).astype(np.float32)
    rows, targets = [], []
    for p in range(n_prompts):
        colour = rng.uniform(0.1, 0.9, size=3)
        target = prior + 0.12 * mixing @ (colour - 0.5).astype(np.float32)
        for copy in range(1 + (p % 3 == 0)):
            pixels = np.clip(colour * 255 + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
            image_id = f"toy{p:03d}_{copy}"
            Image.fromarray(pixels).save(work / IMAGES / f"{image_id}.png")
            rows.append({"imgId": image_id, "prompt": f"toy prompt {p}", "source": "toy",
                         "path": f"{IMAGES}/{image_id}.png", "seed": p * 10 + copy, "group": p, "fold": p % folds})
            targets.append(target / np.linalg.norm(target))
    sample = bundled_sample_dir()
    truth = dict(zip(*sample_targets(sample / "sample_submission.csv"), strict=True))
    prompts = pd.read_csv(sample / "prompts.csv", dtype={"imgId": str}).set_index("imgId")
    for k, image_id in enumerate(sorted(prompts.index)):
        shutil.copyfile(sample / "images" / f"{image_id}.png", work / IMAGES / f"{image_id}.png")
        rows.append({"imgId": image_id, "prompt": prompts.loc[image_id, "prompt"], "source": "kaggle_sample",
                     "path": f"{IMAGES}/{image_id}.png", "seed": -1, "group": n_prompts + k, "fold": k % folds})
        targets.append(truth[image_id])
    index = pd.DataFrame(rows)
    order = np.argsort(index["imgId"].to_numpy(), kind="stable")
    index.iloc[order].reset_index(drop=True).to_parquet(work / INDEX, index=False)
    np.save(work / TARGETS, np.stack(targets)[order])
    return work


def toy_training_config(work: str | Path, output: str | Path, **overrides) -> dict:
    """A training config for timm's tiny test ViT on `build_toy_training_set`: LP, FT, then FT at a higher
    resolution; `overrides` replace top-level keys."""
    config = {
        "work": str(work), "output": str(output), "seed": 0, "cpu": True,
        "tower": {"name": "toy_trained", "library": "timm", "arch": "test_vit", "init": "none",
                  "head": {"type": "mlp", "hidden": 32},
                  "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash"}},
        "data": {"val_fold": 0, "batch_size": 8, "num_workers": 0, "crop_scale": [0.85, 1.0]},
        "optim": {"lr": 2e-3, "layer_decay": 0.8, "warmup": 2, "min_lr_scale": 0.1, "grad_clip": 1.0},
        "ema": {"decay": 0.9, "warmup": True},
        "precision": "fp32", "log_every": 1,
        "stages": [{"name": "lp", "epochs": 1, "resolution": 32, "head_only": True, "lr": 1e-2},
                   {"name": "ft", "epochs": 2, "resolution": 32},
                   {"name": "ft48", "epochs": 1, "resolution": 48, "lr": 1e-3}],
    }
    config.update(overrides)
    return config


def slow_towers(seconds: float) -> None:
    """Make every tower forward pass take `seconds` longer (in this process), so a test can kill or interrupt a run
    part-way through."""
    import time

    real = Tower.forward

    def slow(self, images):
        time.sleep(seconds)
        return real(self, images)

    Tower.forward = slow


def prompt_like_embeddings(n: int, dim: int, seed: int = 0, topics: int | None = None, spread: float = 0.55,
                           first_row: int = 0) -> np.ndarray:
    """(n, dim) float32 unit rows clustered as sentence embeddings of prompts are: a shared direction (random pairs
    have cosine ~0.12), Zipf-sized topics (rows of one topic ~0.69), and per-row noise (`spread`; more noise makes
    harder queries, such as image embeddings against text keys). Rows depend only on (seed, row), so a bank can be
    made in chunks (`first_row`) and its held-out queries drawn from the same distribution with another seed."""
    topics = topics or 4096
    layout = np.random.default_rng(seed)  # the topic layout: one per seed
    mean = layout.standard_normal(dim)
    mean /= np.linalg.norm(mean)
    centres = layout.standard_normal((topics, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / (np.arange(topics) + 10.0)
    out = np.empty((n, dim), dtype=np.float32)
    block = 65_536
    for start in range(first_row - first_row % block, first_row + n, block):
        rng = np.random.default_rng([seed, start // block])  # a block's rows, whatever part of it is asked for
        topic = rng.choice(topics, size=block, p=weights / weights.sum())
        noise = rng.standard_normal((block, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        rows = (0.35 * mean + 0.75 * centres[topic] + spread * noise).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        lo, hi = max(start, first_row), min(start + block, first_row + n)
        out[lo - first_row:hi - first_row] = rows[lo - start:hi - start]
    return out


def plant_near_duplicates(vectors: np.ndarray, fraction: float, cosines: tuple[float, float] = (0.8, 1.0),
                          seed: int = 0) -> np.ndarray:
    """Copies of `vectors` where a `fraction` of the rows (never row 0) are replaced by a near-duplicate of a random
    earlier row at a cosine drawn uniformly from `cosines` (exactly that cosine to its source), as reworded prompts
    are; a source may itself be a planted row, so chains form as in scraped prompt sets."""
    rng = np.random.default_rng(seed)
    out = np.array(vectors, dtype=np.float32)
    rows = np.sort(rng.choice(np.arange(1, len(out)), size=int(fraction * len(out)), replace=False))
    sources = (rng.random(len(rows)) * rows).astype(np.int64)  # a random earlier row
    cosine = rng.uniform(*cosines, size=len(rows)).astype(np.float32)
    noise = rng.standard_normal((len(rows), out.shape[1])).astype(np.float32)
    for i, row in enumerate(rows):  # in order: a planted source is planted before it is copied
        source, other = out[sources[i]], noise[i]
        other -= (other @ source) * source
        out[row] = cosine[i] * source + np.sqrt(1.0 - cosine[i] ** 2) * other / np.linalg.norm(other)
    return out


def synthetic_bank(folder: str | Path, rows: int, key_dim: int, seed: int = 0, target_dim: int = 384) -> Path:
    """A bank folder of `rows` prompt-like float16 keys and targets, written in chunks (a 5M-row bank never sits in
    memory), with texts `text <row>`; as `write_bank` lays it out."""
    from .bank.folder import BANK_MARKER

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = np.lib.format.open_memmap(folder / "keys.npy", mode="w+", dtype=np.float16, shape=(rows, key_dim))
    targets = np.lib.format.open_memmap(folder / "targets.npy", mode="w+", dtype=np.float16, shape=(rows, target_dim))
    with open(folder / "texts.txt", "w", encoding="utf-8") as texts:
        for start in range(0, rows, 262_144):
            n = min(262_144, rows - start)
            keys[start:start + n] = prompt_like_embeddings(n, key_dim, seed, first_row=start)
            targets[start:start + n] = prompt_like_embeddings(n, target_dim, seed + 1, first_row=start)
            texts.writelines(f"text {i}\n" for i in range(start, start + n))
    keys.flush()
    targets.flush()
    (folder / BANK_MARKER).write_text(json.dumps({"rows": rows, "keys": "synthetic", "seed": seed}))
    return folder


def build_clip_retrieval(folder: str | Path, retrieval: dict, name: str = "clip_retrieval.yaml") -> Path:
    """A manifest with one tiny open_clip tower that retrieves from a random 300-row bank keyed in its 32-d space
    (two resolutions, flipped too: four views); the bank and checkpoint are written once per folder and shared."""
    from .bank.folder import write_bank

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_open_clip_vit.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=1))
    shutil.copyfile(PRIOR_PATH, folder / "fallback.npy")
    if not (folder / "texts").exists():
        rng = np.random.default_rng(0)
        write_bank(folder / "texts", [f"text {i}" for i in range(300)], rng.standard_normal((300, 384)),
                   keys=rng.standard_normal((300, 32)))
    image = {**toy_manifest_dict()["towers"][1]["image"], "hflip": True}
    data = {"fallback": "fallback.npy", "towers": [
        {"name": "clip", "kind": "retrieval", "library": "open_clip", "arch": "tiny_open_clip_vit.json",
         "checkpoint": "clip.safetensors", "image": image, "retrieval": {"bank": "texts", **retrieval},
         "weight": 1.0}]}
    path = folder / name
    spec = parse_manifest(data, path, check_files=False).towers[0]
    if not spec.checkpoint.exists():
        torch.manual_seed(3)
        save_file({k: v.contiguous() for k, v in build_tower(spec).state_dict().items()}, str(spec.checkpoint))
    write_manifest(data, path)
    return path


# ---- the libraries' and kinds' examples live with them (`BackboneLibrary.example`, `TowerKind.example`), and
# `kaggle_i2p.inference.selfcheck.example_manifest` makes a manifest of any pair; under the names the tests use:
tiny_tower_manifest = example_manifest
TinyProgram, write_tiny_program = ExampleProgram, write_example_program
write_tiny_captioner, TINY_WORDS = write_example_captioner, EXAMPLE_WORDS
write_tiny_interrogator, TINY_PHRASES = write_interrogator_example, EXAMPLE_PHRASES


def tiny_hf_config(family: str) -> dict:
    """A tiny transformers config (as `config.json` holds it) of one family: clip, clip_vision, siglip, blip2, vit,
    dinov2, convnext, swin (the vision towers at the transformers library's example size)."""
    import transformers as hf

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = EXAMPLE_VISION
    configs = {
        "clip_vision": lambda: hf.CLIPVisionConfig(**vision, projection_dim=24),
        "clip": lambda: hf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24),
        "siglip": lambda: hf.SiglipVisionConfig(**vision),
        "blip2": lambda: hf.Blip2Config(vision_config=vision, qformer_config=EXAMPLE_QFORMER, text_config=EXAMPLE_OPT,
                                        num_query_tokens=4),
        "vit": lambda: hf.ViTConfig(**vision),
        "dinov2": lambda: hf.Dinov2Config(**vision),
        "convnext": lambda: hf.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
        "swin": lambda: hf.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                      window_size=4),
    }
    return configs[family]().to_dict()


def write_tiny_hf_model(folder: str | Path, family: str) -> Path:
    """A model folder holding a tiny transformers config (`config.json`), as `save_pretrained` leaves it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_hf_config(family), indent=1))
    return folder


TINY_COCA_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
}


def write_tiny_coca(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip CoCa (model-config .json and its whole safetensors file, as open_clip saves it), every
    weight drawn at random so its greedy captions vary; returns (config, checkpoint)."""
    from open_clip.coca_model import CoCa

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny_coca.json"
    config.write_text(json.dumps(TINY_COCA_CONFIG, indent=1))
    torch.manual_seed(seed)
    model = CoCa(**TINY_COCA_CONFIG)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny_coca.safetensors"))
    return config, folder / "tiny_coca.safetensors"


def yaml_load(path: Path) -> dict:
    """A YAML file's data (the tiny manifests')."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
