"""Pipeline overhead and memory growth of predict_dir, measured in one run.

1. Throughput: `predict_dir` on N synthetic 512x512 PNGs vs a bare loop of the same towers over the same images
   pre-decoded in memory (same views, batch size and precision, no file I/O, no DataLoader). ratio = pipeline / bare.
   The tower is a ViT-B/16 @ 224 with random weights (the scale of a real tower, affordable on a CPU).
2. Memory: peak RSS of a fresh `predict_dir` process at N=100 and N=2000 images, with the toy towers (the data path,
   not the model, decides growth): VmHWM of the main process, and the sampled sum over main + decoding workers.
   rss_growth_mb = main-process peak(2000) - peak(100), the median of 3 interleaved pairs of fresh processes (single
   pairs on this shared machine range from 60 to 480 MB); max_rss_growth_mb is the largest of the 3.

3. On CUDA (`--device cuda`, optionally `--manifest M` for the real ensemble): autocast against fp16 weights (images/s
   of the bare loop, lowest cosine to fp32); then per tower x view, with the manifest's precision and compile: steady
   images/s and the first batch apart (`kaggle_i2p.inference.plan.time_views`), FLOPs per image
   (`torch.utils.flop_counter`),
   and MFU against an fp16 matmul peak measured in the same run; and the start-up (loading the towers).

Last line: `ratio=<float> rss_growth_mb=<float> max_rss_growth_mb=<float>` (and on CUDA the precision and MFU figures).
Usage: python benchmarks/bench_predict.py [--n 48] [--device cpu] [--manifest M]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.core.ensemble import combine_views
from kaggle_i2p.inference.devices import resolve_device, resolve_precision
from kaggle_i2p.inference.images import decode_image, list_images
from kaggle_i2p.inference.runner import TowerRunner
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.towers import build_tower, load_tower
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, build_toy_ensemble


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """Smooth colour fields plus noise: PNGs of about the size and entropy of SD outputs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
        pixels = (127.5 + 100 * base + rng.normal(0, 12, (512, 512, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png", compress_level=1)
    return folder


def vit_b_manifest(folder: Path) -> Path:
    data = {"embedding_dim": 384, "fallback": "fallback.npy", "towers": [
        {"name": "vit_b16", "library": "timm", "arch": "vit_base_patch16_224", "checkpoint": "vit_b16.safetensors",
         "head": {"type": "linear"},
         "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                   "resolutions": [224]},
         "weight": 1.0}]}
    np.save(folder / "fallback.npy", np.ones(384, np.float32) / np.sqrt(384))
    path = folder / "bench_manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_manifest(path, check_files=False).towers[0]
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_tower(spec).state_dict().items()}, str(spec.checkpoint))
    return path


def bare_loop(image_dir: Path, manifest_path: Path, device: torch.device, batch_size: int,
              precision: str | None = None) -> float:
    """Seconds for the same towers and views over pre-decoded tensors: the floor the pipeline is measured against
    (`precision` overrides the manifest's, as `--precision` does)."""
    manifest = load_manifest(manifest_path)
    runners = [TowerRunner(load_tower(s, 384, device), device, precision or resolve_precision(s.precision, device))
               for s in manifest.towers]
    pixels = torch.stack([decode_image(p) for p in list_images(image_dir).paths])

    def embed(runner: TowerRunner, batch: torch.Tensor) -> np.ndarray:
        views = runner.compute_views(batch, [view.name for view in runner.spec.views])
        return combine_views([view.values for view in views.values()], runner.spec.view_weight_list())

    with torch.inference_mode():
        for runner in runners:  # warm-up, as the pipeline gets in its first batch
            embed(runner, pixels[:batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(device)
            for runner in runners:
                embed(runner, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def fidelity(image_dir: Path, manifest_path: Path, device: torch.device, precision: str, n: int = 8) -> float:
    """The lowest cosine, over images and views, of `precision`'s outputs to fp32's (the same weights)."""
    spec = load_manifest(manifest_path).towers[0]
    pixels = torch.stack([decode_image(p) for p in list_images(image_dir).paths[:n]]).to(device)
    outputs = {}
    for name in ("fp32", precision):
        runner = TowerRunner(load_tower(spec, 384, device), device, name)
        with torch.inference_mode():
            outputs[name] = runner.compute_views(pixels, [view.name for view in spec.views])
    return min(float(torch.nn.functional.cosine_similarity(torch.from_numpy(outputs[precision][view].values),
                                                           torch.from_numpy(outputs["fp32"][view].values)).min())
               for view in outputs["fp32"])


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float16, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on the device, measured (the MFU's denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def flops_per_image(runner: TowerRunner, view: str, pixels: torch.Tensor) -> float:
    """FLOPs of one image's forward at a view (`torch.utils.flop_counter`, matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        runner.compute_views(pixels[:1], [view])
    return float(counter.get_total_flops())


def tower_rows(manifest_path: Path, device: torch.device, batch_size: int, repeats: int = 3) -> tuple[list, float]:
    """Per tower x view: (tower, view, images/s, first batch s, FLOPs per image); and the towers' loading seconds
    (the planner's own loading and timing, `kaggle_i2p.inference.plan`)."""
    from kaggle_i2p.inference.plan import load_runners_timed, synthetic_batch, time_views, view_shares

    manifest = load_manifest(manifest_path)
    runners, loading, _ = load_runners_timed(manifest, device)
    pixels = synthetic_batch(batch_size, device)
    rows = [(timing.tower, timing.view, timing.images_per_s, timing.first_batch_s,
             flops_per_image(runner, timing.view, pixels))
            for runner in runners for timing in time_views(runner, pixels, repeats, view_shares(manifest))]
    return rows, loading


def pipeline(image_dir: Path, manifest_path: Path, device: torch.device, batch_size: int, workers: int,
             out_csv: Path) -> float:
    warm = image_dir.parent / "warm"
    warm.mkdir(exist_ok=True)
    for p in sorted(image_dir.iterdir())[:batch_size]:
        (warm / p.name).write_bytes(p.read_bytes())
    kaggle_i2p.predict_dir(warm, manifest_path, out_csv=None, device=device, batch_size=batch_size,
                           num_workers=workers, progress=False)
    started = time.perf_counter()
    kaggle_i2p.predict_dir(image_dir, manifest_path, out_csv=out_csv, device=device, batch_size=batch_size,
                           num_workers=workers, progress=False)
    return time.perf_counter() - started


RSS_PROBE = """
import json, os, sys, threading, time
import kaggle_i2p

def tree_rss_mb():
    # VmRSS of this process and its decoding workers; ru_maxrss is useless here (Linux carries it across exec)
    pids, total = [os.getpid()], 0
    for tid in os.listdir("/proc/self/task"):
        try:  # a thread can end between the listing and the read
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024

peak = {"tree": 0.0}
def sample():
    while True:
        peak["tree"] = max(peak["tree"], tree_rss_mb())
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
image_dir, manifest, out_csv, workers, frame = sys.argv[1:6]
kaggle_i2p.predict_dir(image_dir, manifest, out_csv=out_csv, device="cpu", num_workers=int(workers), progress=False,
                       return_frame=frame == "1")
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps({"main_peak_mb": hwm, "tree_peak_mb": max(peak["tree"], tree_rss_mb())}))
"""


def peak_rss_child(n: int, workdir: Path, workers: int, frame: bool = False) -> dict:
    """Run predict_dir on n images in a fresh process: peak RSS (MB) of the main process and of main + workers.
    `frame`: also build the returned submission DataFrame (the API default; the CLI and the notebook do not)."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(workdir / f"imgs{n}"),
                          str(workdir / "toy" / "toy_manifest.yaml"), str(workdir / f"sub{n}.csv"), str(workers),
                          "1" if frame else "0"], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48, help="images for the throughput ratio")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=[100, 2000])
    parser.add_argument("--rss-repeats", type=int, default=3)
    parser.add_argument("--manifest", type=Path, default=None, help="the towers for the per-view rows on CUDA "
                        "(default: the benchmark's ViT-B/16)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = make_images(work / "imgs", args.n)
        manifest = vit_b_manifest(work)
        t_pipe = pipeline(images, manifest, device, args.batch_size, args.workers, work / "sub.csv")
        t_bare = bare_loop(images, manifest, device, args.batch_size)
        ratio = t_bare / t_pipe
        print(f"throughput ({device}, ViT-B/16@224, batch {args.batch_size}, {args.workers} workers, "
              f"torch threads {torch.get_num_threads()}): pipeline {args.n / t_pipe:.2f} img/s, "
              f"bare loop {args.n / t_bare:.2f} img/s, ratio {ratio:.3f}", flush=True)
        precisions = {}
        if device.type == "cuda":  # autocast against fp16 weights: the faster at fidelity >= 0.9999 is the default
            for precision in ("fp16", "fp16-weights"):
                rate = args.n / bare_loop(images, manifest, device, args.batch_size, precision)
                precisions[precision] = (rate, fidelity(images, manifest, device, precision))
                print(f"bare loop in {precision}: {rate:.2f} img/s, lowest cosine to fp32 "
                      f"{precisions[precision][1]:.7f}", flush=True)
            peak = matmul_peak(device)
            rows, loading = tower_rows(args.manifest or manifest, device, args.batch_size)
            print(f"fp16 matmul peak {peak / 1e12:.0f} TFLOP/s; towers loaded in {loading:.1f} s", flush=True)
            for tower, view, rate, first, flops in rows:
                print(f"  {tower} {view}: {rate:.1f} img/s, first batch {first:.1f} s, {flops / 1e9:.1f} GFLOP/img, "
                      f"MFU {flops * rate / peak:.1%}", flush=True)
            precisions["mfu_min"] = (min(f * r / peak for _, _, r, _, f in rows), 0.0)

        build_toy_ensemble(work / "toy")
        small, large = args.rss_sizes
        make_images(work / f"imgs{small}", small)
        make_images(work / f"imgs{large}", large, seed=1)
        pairs = [(peak_rss_child(small, work, args.workers), peak_rss_child(large, work, args.workers))
                 for _ in range(args.rss_repeats)]
        growths = [large_run["main_peak_mb"] - small_run["main_peak_mb"] for small_run, large_run in pairs]
        for (rss_small, rss_large), grown in zip(pairs, growths, strict=True):
            print(f"peak RSS (toy towers, {args.workers} workers, CLI path): main process N={small} "
                  f"{rss_small['main_peak_mb']:.0f} MB, N={large} {rss_large['main_peak_mb']:.0f} MB (+{grown:.0f}); "
                  f"main + workers N={small} {rss_small['tree_peak_mb']:.0f} MB, N={large} "
                  f"{rss_large['tree_peak_mb']:.0f} MB", flush=True)
        growth, worst = float(np.median(growths)), max(growths)
    extra = "".join(f" mfu_min={rate:.4f}" if name == "mfu_min" else
                    f" {name.replace('-', '_')}_img_s={rate:.2f} {name.replace('-', '_')}_cosine={cos:.7f}"
                    for name, (rate, cos) in precisions.items())
    print(f"ratio={ratio:.3f} rss_growth_mb={growth:.1f} max_rss_growth_mb={worst:.1f}{extra}")


if __name__ == "__main__":
    main()
