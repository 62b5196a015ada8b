"""The prediction path, top to bottom: files -> uint8 batch -> per-tower views -> forward -> ensemble -> CSV.

Each image is decoded once (in DataLoader workers) and every tower x resolution x flip view is made from that one
decoded batch on the device. Per batch and tower: fp16 autocast on CUDA (fp32 on CPU unless asked), a recompute in
fp32 when an output is non-finite, and batch halving on CUDA out-of-memory. Unreadable images get the manifest's
fallback vector, so the submission is always complete.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .cache import DEFAULT_CHUNK_SIZE, PredictionCache, image_key
from .ensemble import combine_towers, combine_views, unusable_rows
from .images import image_loader, list_images, make_view
from .manifest import Manifest, TowerSpec, as_manifest
from .retrieval import Bank, retrieve, retrieve_from_logits
from .submission import submission_frame, write_submission
from .towers import Tower, check_architectures, load_tower

log = logging.getLogger("kaggle_i2p")

DEFAULT_BATCH_SIZE = {"cuda": 32, "cpu": 8}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


@dataclass
class RunSummary:
    """What a prediction run did, for the closing line and for tests."""

    n_images: int
    towers: list[str]
    n_views: int  # forward passes per image, over all towers
    device: str
    precision: dict[str, str] = field(default_factory=dict)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason)
    skipped_files: list[str] = field(default_factory=list)
    nonfinite_recomputes: int = 0
    oom_halvings: int = 0
    cached_images: int = 0  # images whose every tower x view came from the cache
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"kaggle_i2p: {self.n_images} images, {len(self.towers)} towers, {self.n_views} views/image, "
                f"{len(self.fallbacks)} fallbacks, {self.nonfinite_recomputes} fp32 recomputes, "
                f"{self.oom_halvings} OOM halvings, {len(self.skipped_files)} non-image files skipped, "
                f"{self.cached_images} from cache, "
                f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s on {self.device}")


@dataclass
class PredictionRun:
    """The result of a run: ids in submission order, final (N, D) unit vectors, per-tower and per-view outputs."""

    ids: list[str]
    embeddings: np.ndarray
    tower_embeddings: dict[str, np.ndarray]  # each tower's TTA result, (N, D) unit rows
    view_outputs: dict[str, dict[str, np.ndarray]]  # tower -> view name -> raw (N, D) forward outputs
    summary: RunSummary


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is fp16 on CUDA (T4/P100 have no bf16) and fp32 on CPU; fp16 on CPU falls back to fp32."""
    if requested == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type == "cpu":
        log.info("fp16 autocast on CPU is slow and imprecise; using fp32 (use bf16 for reduced precision on CPU)")
        return "fp32"
    return requested


class TowerRunner:
    """Runs one loaded tower over a decoded batch: all its TTA views, precision, fp32 recompute, OOM halving."""

    def __init__(self, spec: TowerSpec, tower: Tower, device: torch.device, precision: str):
        self.spec = spec
        self.tower = tower
        self.bank = Bank.open(spec.retrieval.bank) if spec.kind == "retrieval" else None
        self.device = device
        self.precision = precision
        self.max_chunk: int | None = None  # lowered after an out-of-memory error, kept for later batches
        self.nonfinite_recomputes = 0
        self.oom_halvings = 0

    def _forward(self, views: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.tower(views).float()

    def _forward_chunked(self, views: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        while True:
            chunk = self.max_chunk or len(views)
            try:
                return torch.cat([self._forward(views[i:i + chunk], dtype) for i in range(0, len(views), chunk)])
            except torch.OutOfMemoryError:
                if chunk <= 1:
                    raise
                self.max_chunk = max(1, chunk // 2)
                self.oom_halvings += 1
                log.warning("tower %r: out of memory at batch %d; retrying with %d", self.spec.name, chunk,
                            self.max_chunk)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def forward_view(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, r, r) -> (B, D) float32; recomputed in fp32 when reduced precision gives NaN/inf."""
        dtype = AUTOCAST_DTYPES[self.precision]
        out = self._forward_chunked(views, dtype)
        if dtype is not None and not torch.isfinite(out).all():
            self.nonfinite_recomputes += 1
            log.warning("tower %r: non-finite %s output; recomputing the batch in fp32", self.spec.name,
                        self.precision)
            out = self._forward_chunked(views, None)
        return out

    def compute_views(self, pixels: torch.Tensor | list[torch.Tensor], views: list[str]) -> dict[str, np.ndarray]:
        """(B, D) float32 outputs of the named TTA views of a decoded batch (raw for a regressor, the soft top-k bank
        average for a retrieval tower); each resize is made once."""
        wanted = [(name, res, flip) for name, res, flip in self.spec.views if name in views]
        outputs, resized = {}, {}
        for name, resolution, flip in wanted:
            if resolution not in resized:
                resized = {resolution: make_view(pixels, self.spec.image, resolution)}
            view = resized[resolution]
            scores = self.forward_view(view.flip(-1) if flip else view)
            outputs[name] = scores.cpu().numpy() if self.bank is None else self._retrieve(scores)
        return outputs

    def _retrieve(self, scores: torch.Tensor) -> np.ndarray:
        options = self.spec.retrieval
        if options.score == "logits":
            return retrieve_from_logits(scores, self.bank.targets, options.k, options.temperature)
        return retrieve(scores, self.bank, options.k, options.temperature)


def _chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def run_prediction(image_dir: str | Path, manifest: str | Path | Manifest = "weights_manifest.yaml", *,
                   device: str | torch.device = "auto", batch_size: int | None = None,
                   num_workers: int | None = None, precision: str | None = None, progress: bool = True,
                   cache_dir: str | Path | None = None, cache_chunk_size: int = DEFAULT_CHUNK_SIZE,
                   include_zero_weight: bool = False) -> PredictionRun:
    """Predict every image in `image_dir` with the manifest's ensemble; the full result with per-tower outputs.

    The sorted listing is cut into fixed chunks of `cache_chunk_size` images and batches never cross a chunk, so a
    chunk's outputs are the same whether computed in one run or resumed from `cache_dir` after a kill.
    """
    started = time.perf_counter()
    manifest = as_manifest(manifest)
    check_architectures(manifest)  # every manifest problem surfaces before a byte of weights is read
    listing = list_images(image_dir)
    device = resolve_device(device)
    batch_size = batch_size or DEFAULT_BATCH_SIZE.get(device.type, 8)
    num_workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
    every = [t for t in manifest.towers if t.weight > 0 or include_zero_weight]
    for spec in manifest.towers:
        if spec.weight <= 0 and not include_zero_weight:
            log.info("tower %r has weight 0: not run", spec.name)
    specs = [s for s in every if s.kind != "prior"]  # the towers with a network to run
    precisions = {s.name: resolve_precision(precision or s.precision, device) for s in specs}
    cache = PredictionCache(cache_dir) if cache_dir is not None else None
    tower_keys = {s.name: cache.tower_key(s, precisions[s.name], manifest.embedding_dim) for s in specs if cache}

    n, dim = len(listing.ids), manifest.embedding_dim
    image_keys = [image_key(p) for p in listing.paths] if cache else []
    views = {s.name: [name for name, _, _ in s.views] for s in every}
    outputs = {s.name: {v: np.full((n, dim), np.nan, dtype=np.float32) for v in views[s.name]} for s in specs}
    outputs.update({s.name: {"prior": np.tile(s.prior, (n, 1))} for s in every if s.kind == "prior"})
    decode_errors: dict[int, str] = {}

    # 1. What the cache already holds; a chunk is decoded only if some tower x view lacks it.
    todo: list[tuple[range, dict[str, list[str]]]] = []
    for chunk in _chunks(n, cache_chunk_size):
        missing: dict[str, list[str]] = {}
        for spec in specs:
            for view in views[spec.name]:
                hit = cache.load(tower_keys[spec.name], view, image_keys[chunk.start:chunk.stop]) if cache else None
                if hit is None:
                    missing.setdefault(spec.name, []).append(view)
                    continue
                outputs[spec.name][view][chunk.start:chunk.stop] = hit[0]
                decode_errors.update({chunk.start + i: e for i, e in enumerate(hit[1]) if e})
        if missing:
            todo.append((chunk, missing))
    n_cached = n - sum(len(chunk) for chunk, _ in todo)

    # 2. Compute what is missing, only the towers x views each chunk lacks, and store each chunk as it completes.
    needed = {name for _, missing in todo for name in missing}
    runners = {s.name: TowerRunner(s, load_tower(s, dim, device), device, precisions[s.name])
               for s in specs if s.name in needed}
    plan = [(chunk, missing, start + batch_size >= len(chunk), list(chunk[start:start + batch_size]))
            for chunk, missing in todo for start in range(0, len(chunk), batch_size)]  # (.., ends its chunk, batch)
    bars = {s.name: tqdm(total=n, initial=n_cached, desc=s.name, unit="img", position=i, disable=not progress)
            for i, s in enumerate(specs)}
    loader = image_loader(listing.paths, batch_size, num_workers, pin_memory=device.type == "cuda",
                          batches=[batch for *_, batch in plan])
    try:
        with torch.inference_mode():
            for (chunk, missing, ends_chunk, _), batch in zip(plan, loader, strict=True):
                for index, reason in batch.errors:
                    decode_errors[index] = reason
                    log.warning("cannot read %s: %s; writing the fallback vector", listing.paths[index], reason)
                pixels = batch.pixels_on(device) if batch.indices else None
                for name, bar in bars.items():
                    if pixels is not None and name in missing:
                        for view, out in runners[name].compute_views(pixels, missing[name]).items():
                            outputs[name][view][batch.indices] = out
                    bar.update(len(batch.indices) + len(batch.errors))
                if cache and ends_chunk:
                    errors = [decode_errors.get(i, "") for i in chunk]
                    for name, missing_views in missing.items():
                        for view in missing_views:
                            cache.save(tower_keys[name], view, image_keys[chunk.start:chunk.stop],
                                       outputs[name][view][chunk.start:chunk.stop], errors)
    finally:
        for bar in bars.values():
            bar.close()

    # 3. TTA per tower, then the weighted ensemble; unreadable or non-finite rows get the fallback.
    failed = {i: f"unreadable image ({reason})" for i, reason in decode_errors.items()}
    tower_embeddings = {}
    for spec in every:
        tower = combine_views([outputs[spec.name][v] for v in views[spec.name]], spec.view_weight_list())
        bad = unusable_rows(tower)
        for index in np.flatnonzero(bad):
            if int(index) not in failed:
                failed[int(index)] = f"tower {spec.name!r} gave a non-finite output even in fp32"
                log.warning("%s: %s; writing the fallback vector", listing.paths[index], failed[int(index)])
        tower[bad] = manifest.fallback
        tower_embeddings[spec.name] = tower
    weighted = {name: out for name, out in tower_embeddings.items() if manifest.weights[name] > 0}
    embeddings = combine_towers(weighted, manifest.weights, manifest.dim_weights)
    for index in failed:
        embeddings[index] = manifest.fallback

    summary = RunSummary(
        n_images=n, towers=[s.name for s in every], n_views=sum(s.n_views for s in specs),
        device=str(device), precision=precisions,
        fallbacks=[(listing.ids[i], failed[i]) for i in sorted(failed)],
        skipped_files=[p.name for p in listing.skipped],
        nonfinite_recomputes=sum(r.nonfinite_recomputes for r in runners.values()),
        oom_halvings=sum(r.oom_halvings for r in runners.values()), cached_images=n_cached,
        seconds=time.perf_counter() - started,
    )
    return PredictionRun(list(listing.ids), embeddings, tower_embeddings, outputs, summary)


def predict_embeddings(image_dir: str | Path, manifest: str | Path | Manifest = "weights_manifest.yaml",
                       **options) -> tuple[list[str], np.ndarray]:
    """`(ids, float32 array [N, 384])` for the images in `image_dir`; options as for `run_prediction`."""
    run = run_prediction(image_dir, manifest, **options)
    return run.ids, run.embeddings


def predict_dir(image_dir: str | Path, manifest: str | Path | Manifest = "weights_manifest.yaml",
                out_csv: str | Path | None = "submission.csv", device: str | torch.device = "auto",
                batch_size: int | None = None, num_workers: int | None = None, *,
                precision: str | None = None, progress: bool = True, cache_dir: str | Path | None = None,
                cache_chunk_size: int = DEFAULT_CHUNK_SIZE) -> pd.DataFrame:
    """Predict a folder of images and write the Kaggle submission CSV; returns the submission as a DataFrame.

    With `cache_dir`, every tower x view output is stored as it is made: a killed run resumes where it stopped.
    """
    run = run_prediction(image_dir, manifest, device=device, batch_size=batch_size, num_workers=num_workers,
                         precision=precision, progress=progress, cache_dir=cache_dir,
                         cache_chunk_size=cache_chunk_size)
    ids, embeddings, summary = run.ids, run.embeddings, run.summary
    del run  # per-view outputs are not needed past this point; free them before the DataFrame is built
    if out_csv is not None:
        write_submission(ids, embeddings, out_csv)
    if progress:
        print(summary, flush=True)
        if out_csv is not None:
            print(f"kaggle_i2p: wrote {out_csv} ({len(ids) * embeddings.shape[1]} rows)", flush=True)
    return submission_frame(ids, embeddings)
