"""`library: onnx` against the same tower in torch, on the CPU, measured side by side in one run.

1. A timm tower (random weights; ConvNeXt-Atto by default, a ViT with --arch) with a Linear head to 384, served two
   ways through the same manifest machinery: `library: timm` (the checkpoint) and `library: onnx` (the same model
   exported with `torch.onnx.export`, a dynamic batch and size).
2. Each runs `run_prediction` over the same images (the bundled 7 sample images, repeated to --images) at batch 8,
   fp32, one decoding worker, after one warm-up run; the vectors of both are compared (cosine per image).

Last line: `torch_img_s=... onnx_img_s=... onnx_over_torch=... min_cosine=...`.
Usage: python benchmarks/bench_onnx.py [--arch convnext_atto] [--size 224] [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.inference.dryrun import bundled_sample_dir


def build(folder: Path, arch: str, size: int) -> tuple[Path, Path]:
    """The two manifests of one random-weight tower: its checkpoint under timm, its ONNX export under onnx."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=384).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tower.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(folder / "tower.onnx"), input_names=["images"],
                          output_names=["out"], dynamic_axes={"images": {0: "batch", 2: "h", 3: "w"},
                                                              "out": {0: "batch"}}, dynamo=False)
    image = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
             "resize": "squash", "resolutions": [size]}
    paths = []
    for library, extra in (("timm", {"arch": arch, "checkpoint": "tower.safetensors", "head": {"type": "linear"}}),
                           ("onnx", {"arch": "tower.onnx", "head": {"type": "none"}})):
        path = folder / f"{library}.yaml"
        path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": [
            {"name": library, "library": library, **extra, "image": image, "weight": 1.0}]}))
        paths.append(path)
    return paths[0], paths[1]


def timed(manifest: Path, images: Path, repeats: int) -> tuple[float, np.ndarray]:
    """Images per second of run_prediction (best of `repeats`, after a warm-up run) and its vectors."""
    options = {"device": "cpu", "num_workers": 1, "progress": False, "batch_size": 8, "precision": "fp32"}
    out = kaggle_i2p.run_prediction(images, manifest, **options).embeddings
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        kaggle_i2p.run_prediction(images, manifest, **options)
        best = min(best, time.perf_counter() - started)
    return len(out) / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="convnext_atto")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = folder / "images"
        images.mkdir()
        sample = sorted((bundled_sample_dir() / "images").glob("*.png"))
        for i in range(args.images):
            shutil.copyfile(sample[i % len(sample)], images / f"{i:05d}.png")
        timm_manifest, onnx_manifest = build(folder, args.arch, args.size)
        torch_rate, torch_out = timed(timm_manifest, images, args.repeats)
        onnx_rate, onnx_out = timed(onnx_manifest, images, args.repeats)
    cosine = float((torch_out * onnx_out).sum(axis=1).min())
    print(f"{args.arch} at {args.size} px, {args.images} images, batch 8, fp32 on {torch.get_num_threads()} CPU "
          f"threads: torch {torch_rate:.2f} img/s, onnxruntime {onnx_rate:.2f} img/s; lowest cosine {cosine:.7f}")
    print(f"torch_img_s={torch_rate:.4g} onnx_img_s={onnx_rate:.4g} onnx_over_torch={onnx_rate / torch_rate:.3f} "
          f"min_cosine={cosine:.7f}")


if __name__ == "__main__":
    main()
