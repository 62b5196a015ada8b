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
from .manifest import parse_manifest, write_manifest
from .models.towers import Tower, build_tower

# Manifest `image` statistics as YAML-friendly lists, from timm's own constants.
CLIP_MEAN, CLIP_STD = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
IMAGENET_MEAN, IMAGENET_STD = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)

# A tiny open_clip ViT in open_clip's own model-config format (native size 64, patch 16).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


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


# ---- one tiny example per registered library and kind: tests/test_registries.py runs each through the machinery.
# A library or kind registered without one fails that test until it gets one here (or, for a plugin, through
# `TINY_ARCHS[name] = ...` in its own tests).

def _tiny_open_clip(folder: Path) -> str:
    path = Path(folder) / "tiny_open_clip_vit.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=1))
    return path.name


_HF_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 16}


def tiny_hf_config(family: str) -> dict:
    """A tiny transformers config (as `config.json` holds it) of one family: clip, clip_vision, siglip, blip2, vit,
    dinov2, convnext, swin."""
    import transformers as hf

    qformer = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "cross_attention_frequency": 1}
    opt = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1, "ffn_dim": 64, "num_attention_heads": 2,
           "vocab_size": 64, "word_embed_proj_dim": 32}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    configs = {
        "clip_vision": lambda: hf.CLIPVisionConfig(**_HF_VISION, projection_dim=24),
        "clip": lambda: hf.CLIPConfig(vision_config=_HF_VISION, text_config=text, projection_dim=24),
        "siglip": lambda: hf.SiglipVisionConfig(**_HF_VISION),
        "blip2": lambda: hf.Blip2Config(vision_config=_HF_VISION, qformer_config=qformer, text_config=opt,
                                        num_query_tokens=4),
        "vit": lambda: hf.ViTConfig(**_HF_VISION),
        "dinov2": lambda: hf.Dinov2Config(**_HF_VISION),
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


class TinyProgram(torch.nn.Module):
    """A tiny conv trunk giving 24 pooled features at any size: what the program libraries' examples hold."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, 2, 1), torch.nn.GELU(),
                                         torch.nn.Conv2d(12, 24, 3, 2, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).mean(dim=(2, 3))


def write_tiny_program(path: Path, library: str = "export") -> Path:
    """`TinyProgram` saved as `library` saves it: torch.export with a dynamic batch and size, traced TorchScript, or
    an ONNX graph (torch.onnx.export, dynamic batch and size)."""
    import warnings

    model, example = TinyProgram().eval(), torch.randn(2, 3, 64, 64)
    path = Path(path)
    if library == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch", 2: "h", 3: "w"}, "features": {0: "batch"}},
                              dynamo=False)
    elif library == "export":
        dim = torch.export.Dim
        dims = {"images": {0: dim("batch"), 2: dim("h", min=16, max=1024), 3: dim("w", min=16, max=1024)}}
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dims), str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.trace(model, example).save(str(path))
    return path


# library -> a function writing what its tiny arch needs into a folder and returning the arch as a manifest writes it
TINY_ARCHS: dict[str, object] = {"timm": lambda folder: "test_vit", "open_clip": _tiny_open_clip,
                                 "transformers": lambda folder: write_tiny_hf_model(
                                     Path(folder) / "tiny_hf_clip", "clip_vision").name,
                                 "export": lambda folder: write_tiny_program(Path(folder) / "tiny.pt2").name,
                                 "torchscript": lambda folder: write_tiny_program(Path(folder) / "tiny.pt",
                                                                                  "torchscript").name,
                                 "onnx": lambda folder: write_tiny_program(Path(folder) / "tiny.onnx", "onnx").name}


TINY_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "painting", "city", "night", "forest", "by",
              "artstation", "portrait", "sky", "castle", "river", "golden", "hour", "highly", "detailed", "oil",
              "canvas", "neon", "street", "rain", "mountain", "sunset", "fantasy", "art", "digital", "concept"]


def write_tiny_captioner(folder: str | Path, family: str = "blip", seed: int = 0) -> Path:
    """A tiny transformers captioner as `save_pretrained` leaves it (config.json, model.safetensors, and the
    processor's tokenizer beside them), random weights: blip, blip2 (OPT), blip2_t5, git or
    vision-encoder-decoder (ViT + BERT)."""
    import transformers as hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]
    words += [f"w{i}" for i in range(64 - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    hf.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "vocab_size": 64}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, **ids}
    torch.manual_seed(seed)
    if family == "blip":
        config = hf.BlipConfig(vision_config=_HF_VISION, text_config={**text, "sep_token_id": 3,
                                                                       "encoder_hidden_size": 32})
        model = hf.BlipForConditionalGeneration(config)
    elif family == "git":
        model = hf.GitForCausalLM(hf.GitConfig(vision_config=_HF_VISION, **text))
    elif family == "blip2":  # OPT's decoder under the Q-Former's 4 queries, its image token the vocab's last
        data = tiny_hf_config("blip2")
        data["text_config"].update(bos_token_id=2, eos_token_id=3, pad_token_id=0)
        config = hf.CONFIG_MAPPING["blip-2"].from_dict({**data, "image_token_index": 63})
        model = hf.Blip2ForConditionalGeneration(config)
    elif family == "blip2_t5":  # Flan-T5 under the Q-Former: the prompt goes to its encoder
        data = tiny_hf_config("blip2")
        data["text_config"] = {"model_type": "t5", "vocab_size": 64, "d_model": 32, "d_kv": 16, "d_ff": 64,
                               "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "pad_token_id": 0,
                               "eos_token_id": 3, "decoder_start_token_id": 0}
        config = hf.CONFIG_MAPPING["blip-2"].from_dict({**data, "image_token_index": 63})
        model = hf.Blip2ForConditionalGeneration(config)
    else:
        config = hf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            hf.ViTConfig(**_HF_VISION), hf.BertConfig(**text, is_decoder=True, add_cross_attention=True))
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
        model = hf.VisionEncoderDecoderModel(config)
    if family.startswith("blip2"):
        for parameter in model.parameters():  # drawn wide: a tiny random OPT otherwise repeats one token
            torch.nn.init.normal_(parameter, std=0.3)
    model.save_pretrained(str(folder))
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


def _tiny_regressor(folder: Path, out_dim: int, embedding_dim: int) -> dict:
    return {"head": {"type": "mlp", "hidden": 16, "norm": "layernorm", "activation": "gelu"}}


def _tiny_retrieval(folder: Path, out_dim: int, embedding_dim: int) -> dict:
    synthetic_bank(Path(folder) / "bank", rows=40, key_dim=out_dim, target_dim=embedding_dim)
    return {"kind": "retrieval", "retrieval": {"bank": "bank", "k": 4, "temperature": 0.1, "score": "embedding"}}


def _tiny_caption(folder: Path, out_dim: int, embedding_dim: int) -> dict:
    """A tiny BLIP captioner (its own arch: a caption tower's library must give captions) and the real MiniLM."""
    from .models.text import default_model_path

    write_tiny_captioner(Path(folder) / "tiny_blip")
    return {"kind": "caption", "arch": "tiny_blip", "backbone": {"generate": {"max_new_tokens": 6}},
            "caption": {"text_model": str(default_model_path())}}


TINY_PHRASES = {"medium": ["an oil painting", "a photograph", "a watercolor", "a 3d render", "a sketch"],
                "artist": ["greg rutkowski", "alphonse mucha", "studio ghibli", "monet", "artgerm"],
                "flavor": ["trending on artstation", "highly detailed", "cinematic lighting", "4k", "dramatic"]}


def write_tiny_interrogator(folder: str | Path, seed: int = 0) -> dict:
    """A tiny whole open_clip CLIP file (its visual tower is the image tower, its text tower scores candidates),
    phrase banks built from it by build-bank (keys clip), and the real MiniLM: an interrogator's entry keys."""
    import open_clip

    from .bank.build import build_bank
    from .models.text import default_model_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny_clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=1))
    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**{k: v for k, v in TINY_OPEN_CLIP_CONFIG.items() if k != "quick_gelu"})
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "tiny_clip.safetensors"))
    for slot, phrases in TINY_PHRASES.items():
        (folder / f"{slot}.txt").write_text("\n".join(phrases) + "\n", encoding="utf-8")
        build_bank(folder / f"{slot}.txt", folder / "phrases" / slot, keys="clip", clip_arch=str(config),
                   clip_checkpoint=folder / "tiny_clip.safetensors", device="cpu", dtype="float32")
    return {"kind": "interrogator", "library": "open_clip", "arch": config.name,
            "checkpoint": "tiny_clip.safetensors",
            "interrogator": {"phrase_banks": "phrases", "templates": ["{medium} by {artist}, {flavor}",
                                                                      "{medium}, {flavor}"],
                             "clip_arch": config.name, "clip_checkpoint": "tiny_clip.safetensors",
                             "text_model": str(default_model_path()), "top": 3}}


def _tiny_interrogator(folder: Path, out_dim: int, embedding_dim: int) -> dict:
    entry = write_tiny_interrogator(folder)
    del entry["checkpoint"]  # the image tower's own file, tiny.safetensors; the whole CLIP file scores texts
    return entry


def _tiny_features(folder: Path, out_dim: int, embedding_dim: int) -> dict:
    """A backbone's features, weight 0 (its `companions`: the fusion tower that reads them, with its head's file)."""
    return {"kind": "features", "weight": 0}


def _features_companions(folder: Path, out_dim: int, embedding_dim: int) -> list[dict]:
    return [_tiny_fusion_entry(folder, "fuse", [{"tower": "tiny", "output": "features"}], out_dim, embedding_dim)]


_tiny_features.companions = _features_companions


def _tiny_fusion_entry(folder: Path, name: str, inputs: list, in_dim: int, embedding_dim: int) -> dict:
    """A fusion entry over `inputs` with an MLP head of random weights saved as the head's own module saves it."""
    from .kinds.regressor import HeadSpec, build_head

    head = {"type": "mlp", "hidden": 24, "norm": "layernorm", "activation": "gelu"}
    torch.manual_seed(11)
    module = build_head(in_dim, HeadSpec(type="mlp", hidden=24, norm="layernorm", activation="gelu"), embedding_dim)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(Path(folder) / f"{name}.safetensors"))
    return {"name": name, "kind": "fusion", "inputs": inputs, "head": head, "checkpoint": f"{name}.safetensors",
            "weight": 1.0}


_tiny_caption.library = "transformers"  # each names the one library its tiny example runs with
_tiny_interrogator.library = "open_clip"

# network kind -> a function writing what its section needs and returning the entry's kind-specific keys
TINY_NETWORK_ENTRIES: dict[str, object] = {"regressor": _tiny_regressor, "retrieval": _tiny_retrieval,
                                           "caption": _tiny_caption, "interrogator": _tiny_interrogator,
                                           "features": _tiny_features}


def _tiny_prior(folder: Path, embedding_dim: int) -> dict:
    vector = prompt_like_embeddings(1, embedding_dim, seed=5)[0]
    np.save(Path(folder) / "prior_vector.npy", vector)
    return {"kind": "prior", "vector": "prior_vector.npy"}


# constant kinds (no network) -> a function returning a whole entry but its name and weight
TINY_CONSTANT_ENTRIES: dict[str, object] = {"prior": _tiny_prior}

# kinds made of other towers' results -> the kind's entry named "tiny" (towers[0]) over a tiny regressor of the library
TINY_COMBINED_ENTRIES: dict[str, object] = {
    "fusion": lambda folder, embedding_dim: _tiny_fusion_entry(folder, "tiny", ["input"], embedding_dim,
                                                               embedding_dim)}


def yaml_load(path: Path) -> dict:
    """A YAML file's data (the tiny manifests')."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def tiny_tower_manifest(folder: str | Path, library: str, kind: str, seed: int = 0, embedding_dim: int = 384) -> Path:
    """A one-tower manifest of `kind` on `library`'s tiny arch (two resolutions and a flip), with its random-weight
    checkpoint; for a constant kind, the library is not used."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PRIOR_PATH, folder / "fallback.npy")
    companions: list[dict] = []
    if kind in TINY_CONSTANT_ENTRIES:
        entry = {"name": "tiny", "weight": 1.0, **TINY_CONSTANT_ENTRIES[kind](folder, embedding_dim)}
    elif kind in TINY_COMBINED_ENTRIES:  # the kind's tower first, over a tiny regressor of the library (weight 0)
        made = Path(tiny_tower_manifest(folder / "input", library, "regressor", seed, embedding_dim))
        regressor = yaml_load(made)["towers"][0]
        companions = [{**regressor, "name": "input", "weight": 0,
                       **{k: f"input/{v}" for k, v in regressor.items() if k in ("checkpoint",)},
                       **({"arch": f"input/{regressor['arch']}"} if (made.parent / regressor["arch"]).exists()
                          else {})}]
        entry = TINY_COMBINED_ENTRIES[kind](folder, embedding_dim)
    else:
        arch = TINY_ARCHS[library](folder)
        from .models.backbones import library as library_named

        lib = library_named(library)
        with torch.device("meta"):
            out_dim = lib.build(str(folder / arch) if lib.arch_is_path(arch) else arch, None, 0).out_dim
        entry = {"name": "tiny", "library": library, "arch": arch, "checkpoint": "tiny.safetensors",
                 "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                           "resolutions": [64, 96], "hflip": True},
                 "weight": 1.0, **TINY_NETWORK_ENTRIES[kind](folder, out_dim, embedding_dim)}
        extra = getattr(TINY_NETWORK_ENTRIES[kind], "companions", None)
        companions = extra(folder, out_dim, embedding_dim) if extra else []
    data = {"embedding_dim": embedding_dim, "fallback": "fallback.npy", "towers": [entry, *companions]}
    path = folder / "tiny_manifest.yaml"
    spec = parse_manifest(data, path, check_files=False).towers[0]
    if "checkpoint" in entry and kind not in TINY_COMBINED_ENTRIES:
        torch.manual_seed(seed)
        tower = build_tower(spec, embedding_dim)
        save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(spec.checkpoint))
    write_manifest(data, path)
    return path
