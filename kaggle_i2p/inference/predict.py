"""The prediction path, top to bottom: files -> uint8 batch -> per-tower views -> forward -> ensemble -> CSV.

Each image is decoded once (in DataLoader workers) and every tower x resolution x flip view is made from that one
decoded batch on the device. Per batch and tower: fp16 autocast on CUDA (fp32 on CPU unless asked), a recompute in
fp32 when an output is non-finite, and batch halving on CUDA out-of-memory. Unreadable images get the manifest's
fallback vector, so the submission is always complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..core.blocks import blocks
from ..core.ensemble import combine_towers, combine_views, unusable_rows
from ..core.errors import OptionError, OutputError
from ..core.fileio import check_distinct_outputs, check_writable_file, probe_folder
from ..core.resources import DEFAULT_MANIFEST
from ..manifest import Manifest, NetworkSpec, TowerSpec, ViewOutput, kind_of
from ..manifest.schema import EncodingContext, run_after_encoding
from ..models.towers import checkpoint_fit, load_tower, validate_manifest
from .cache import PredictionCache, Shard, image_key
from .devices import resolve_compile, resolve_device, resolve_devices, resolve_precision  # noqa: F401 - as before
from .images import DecodedBatch, ImageListing, image_loader, list_images
from .options import RunOptions
from .parallel import device_shares, run_on_devices
from .runner import TowerRunner
from .submission import check_output_path, submission_frame, write_captions, write_submission

log = logging.getLogger("kaggle_i2p")

@dataclass
class RunSummary:
    """What a prediction run did, for the closing line and for tests."""

    n_images: int
    towers: list[str]
    n_views: int  # forward passes per image, over all towers
    device: str
    precision: dict[str, str] = field(default_factory=dict)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (image id, reason)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (folder entry, why it is not predicted)
    converted: list[tuple[str, str]] = field(default_factory=list)  # (image id, what the decode changed)
    nonfinite_recomputes: int = 0  # batches computed again for a non-finite value (never for a missing caption)
    oom_halvings: int = 0
    compile_seconds: float = 0.0  # the first call of each compiled (tower, resolution): compiling included
    devices: int = 1  # processes that encoded (one per device)
    loading_seconds: float = 0.0  # start-up: loading the towers (in the background, while the first batch decoded)
    cached_images: int = 0  # images whose every tower x view came from the cache
    cache_failed: bool = False  # the cache could not be written and was switched off (the run went on)
    keys_left_out: dict[str, int] = field(default_factory=dict)  # per tower: checkpoint keys ignored or not its own
    seconds: float = 0.0
    replaced: list[str] = field(default_factory=list)  # the package's own libraries/kinds a plugin replaced, used here

    def _left_out(self) -> str:
        if not self.keys_left_out:
            return ""
        towers = ", ".join(f"{name} {n}" for name, n in sorted(self.keys_left_out.items()))
        return f", {sum(self.keys_left_out.values())} checkpoint key(s) left out ({towers})"

    def _no_caption(self) -> str:
        """` (2 with no caption)`: the fallbacks of rows a tower gave no value for, by design, by what they lack."""
        lacking = Counter(m.group(1) for _, reason in self.fallbacks if (m := MISSING.fullmatch(reason)))
        return f" ({', '.join(f'{n} with {what}' for what, n in sorted(lacking.items()))})" if lacking else ""

    def _replaced(self) -> str:
        return f", replaced by plugins: {'; '.join(self.replaced)}" if self.replaced else ""

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"kaggle_i2p: {self.n_images} images, {len(self.towers)} towers, {self.n_views} views/image, "
                f"{len(self.fallbacks)} fallbacks{self._no_caption()}, {self.nonfinite_recomputes} recomputes at "
                "higher precision, "
                f"{self.oom_halvings} OOM halvings, {len(self.skipped_files)} folder entries skipped, "
                f"{len(self.converted)} converted to 8 bits, {self.cached_images} from cache"
                f", {self.loading_seconds:.1f} s loading towers"
                f"{self._left_out()}"
                f"{f', {self.compile_seconds:.0f} s compiling' if self.compile_seconds else ''}"
                f"{' (cache switched off: not writable)' if self.cache_failed else ''}"
                f"{self._replaced()}, "
                f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s on {self.device}"
                f"{f' and {self.devices - 1} more device(s)' if self.devices > 1 else ''}")


@dataclass
class PredictionRun:
    """The result of a run: ids in submission order, final (N, D) unit vectors, per-tower and per-view outputs."""

    ids: list[str]
    embeddings: np.ndarray
    tower_embeddings: dict[str, np.ndarray]  # each tower's TTA result, (N, D) unit rows
    view_outputs: dict[str, dict[str, np.ndarray]]  # tower -> view name -> raw (N, D) forward outputs
    summary: RunSummary
    texts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # caption tower -> view -> text per image


def progress_label(setup: RunSetup) -> str:
    """The progress bar's label, counting towers as the run's summary line does (a constant tower, a prior, is one)."""
    towers = len(setup.active)
    constant = towers - len(setup.with_network)
    return f"{towers} tower{'s' if towers != 1 else ''}" + (f" ({constant} constant)" if constant else "")


@dataclass
class RunSetup:
    """Step 1's result: everything a run needs, checked, with no weights loaded yet."""

    manifest: Manifest
    listing: ImageListing
    device: torch.device
    batch_size: int
    num_workers: int
    active: list[TowerSpec]  # towers that take part (weight > 0, or all with include_zero_weight)
    with_network: list[NetworkSpec]  # the active towers that run a network (not constant towers)
    precisions: dict[str, str]
    compiles: dict[str, bool]  # towers whose views are compiled (asked for, and where Triton runs)
    cache: PredictionCache | None
    tower_keys: dict[str, str]
    image_keys: list[str]
    chunk_size: int
    devices: tuple[torch.device, ...] = ()  # more than one: data-parallel, one process per device (parallel.py)
    share: tuple[int, int] = (0, 1)  # (rank, world): this process computes chunks c with c % world == rank
    temporary_cache: bool = False  # made for a data-parallel run without a cache folder; removed afterwards
    keys_left_out: dict[str, int] = field(default_factory=dict)  # per tower: its file's keys no tower key takes

    @property
    def n_images(self) -> int:
        return len(self.listing.ids)


def prepare_run(image_dir: str | Path, manifest: str | Path | Manifest = DEFAULT_MANIFEST,
                options: RunOptions | None = None, *, include_zero_weight: bool = False,
                share: tuple[int, int] = (0, 1), **values: Any) -> RunSetup:
    """Step 1: check everything that can fail before the first weight loads (options, device, the manifest with
    every checkpoint's hash, keys and shapes, the image ids) and open the cache."""
    options = RunOptions.of(options, **values)
    cache_dir, cache_chunk_size = options.cache_dir, options.cache_chunk_size
    if not 0 <= share[0] < share[1]:
        raise OptionError(f"share {share[0]}/{share[1]}: give R/W with 0 <= R < W (this machine's part of W)")
    if share != (0, 1) and cache_dir is None:
        raise OptionError("--share needs --cache-dir: a folder every machine writes its chunks into")
    devices = resolve_devices(options.device)
    device = devices[0]
    manifest = validate_manifest(manifest, deep=True)
    listing = list_images(image_dir)
    batch_size, num_workers = options.batch_size_on(device.type), options.workers()
    active = [t for t in manifest.towers if t.weight > 0 or include_zero_weight]
    sources = {name for t in active for name in kind_of(t).reads(t)}  # towers others read (texts, fused results)
    for spec in manifest.towers:
        if spec.weight <= 0 and not include_zero_weight:
            log.info("tower %r has weight 0: %s", spec.name,
                     "run only for the results another tower reads" if spec.name in sources else "not run")
    active = [t for t in manifest.towers if t in active or t.name in sources]
    with_network = [s for s in active if isinstance(s, NetworkSpec)]
    precisions = {s.name: resolve_precision(options.precision or s.precision, device) for s in with_network}
    compiles = {s.name: resolve_compile(s.compile if options.compile_views is None else options.compile_views, device)
                for s in with_network}
    temporary_cache = len(devices) > 1 and cache_dir is None  # the devices exchange chunks through a cache
    cache = PredictionCache.open(tempfile.mkdtemp(prefix="kaggle_i2p_parallel_") if temporary_cache else cache_dir)
    cache = check_cache(cache, cache_dir, share, cache_bytes(with_network, manifest.embedding_dim,
                                                             len(listing.paths), cache_chunk_size, share))
    tower_keys = {s.name: cache.tower_key(s, precisions[s.name], manifest.embedding_dim, batch_size,
                                          compiles[s.name]) for s in with_network} if cache else {}
    image_keys = [image_key(p, options.verify_images) for p in listing.paths] if cache else []
    left_out = {s.name: n for s in with_network if (n := checkpoint_fit(s, manifest.embedding_dim).left_out)}
    return RunSetup(manifest, listing, device, batch_size, num_workers, active, with_network, precisions, compiles,
                    cache, tower_keys, image_keys, cache_chunk_size, devices, share, temporary_cache, left_out)


SHARD_OVERHEAD_BYTES = 4096  # a shard's zip and array headers, besides its rows
ROW_OVERHEAD_BYTES = 200  # per image and shard: its key string, done flag and error text


def cache_bytes(towers: list[NetworkSpec], embedding_dim: int, n_images: int, chunk_size: int,
                share: tuple[int, int] = (0, 1)) -> int:
    """The most a run's (or one share's) outputs take in the cache: float32 rows per tower x view, plus headers."""
    rank, world = share
    mine = sum(len(chunk) for c, chunk in enumerate(blocks(n_images, chunk_size)) if c % world == rank)
    chunks = -(-mine // chunk_size)
    per_row = sum(len(t.views) * (4 * t.forward_dim(embedding_dim) + ROW_OVERHEAD_BYTES) for t in towers)
    return mine * per_row + chunks * sum(len(t.views) for t in towers) * SHARD_OVERHEAD_BYTES


def check_cache(cache: PredictionCache | None, cache_dir: str | Path | None, share: tuple[int, int],
                needed: int) -> PredictionCache | None:
    """Before any compute, prove the cache folder writable and roomy (a probe file). For a share the cache is the
    output: a cache that cannot take it is one OutputError. Otherwise it is a helper: it is read but not written
    to, with one warning."""
    what = f"the cache folder {cache.root if cache is not None else cache_dir}"
    if share != (0, 1):
        if cache is None:
            raise OutputError(f"--share {share[0]}/{share[1]}: {what} cannot be made, and a share's outputs go only "
                              "there; choose a writable --cache-dir")
        probe_folder(cache.root, f"--share {share[0]}/{share[1]}: {what}", room=needed)
        return cache
    if cache is not None:
        try:
            probe_folder(cache.root, what, room=needed)
        except OutputError as err:
            log.warning("%s; the run goes on, reading the cache but storing nothing in it", err)
            cache.writable = False
    return cache


class PlannedBatch(NamedTuple):
    """One batch to compute: its chunk of the listing, its rows, and the views each tower still lacks for it."""

    chunk: range
    rows: list[int]
    missing: dict[str, list[str]]


class RunOutputs:
    """The run's raw outputs per tower x view, the rows done, decode errors and notes; it reads the cache and stores
    a chunk's shards after every batch, so a kill loses at most the batch in flight."""

    def __init__(self, setup: RunSetup):
        self.setup = setup
        n, dim = setup.n_images, setup.manifest.embedding_dim
        self.views = {s.name: [view.name for view in s.views] for s in setup.with_network}
        self.values = {s.name: {v: np.full((n, s.forward_dim(dim)), np.nan, dtype=np.float32)
                                for v in self.views[s.name]} for s in setup.with_network}
        self.done = {s.name: {v: np.zeros(n, dtype=bool) for v in self.views[s.name]} for s in setup.with_network}
        # the rows a tower gave a value for (not one by design: a caption tower's image without a caption)
        self.present = {s.name: {v: np.ones(n, dtype=bool) for v in self.views[s.name]} for s in setup.with_network}
        self.errors: dict[int, str] = {}
        self.notes: dict[int, str] = {}
        self.texts = {s.name: {v: [""] * n for v in self.views[s.name]} for s in setup.with_network
                      if kind_of(s).output(s, dim).texts}  # a caption tower's caption per image and view

    def read_cache(self) -> int:
        """Step 2: take every stored shard (complete or partial); returns how many images need no compute."""
        setup = self.setup
        if setup.cache is None:
            return 0
        for chunk in blocks(setup.n_images, setup.chunk_size):
            keys = setup.image_keys[chunk.start:chunk.stop]
            for spec in setup.with_network:
                for view in self.views[spec.name]:
                    shard = setup.cache.load(setup.tower_keys[spec.name], view, keys)
                    if shard is None:
                        continue
                    if spec.name in self.texts and shard.texts is None:
                        continue  # stored before texts were kept: computed again, texts and all
                    self.values[spec.name][view][chunk.start:chunk.stop] = shard.outputs
                    self.done[spec.name][view][chunk.start:chunk.stop] = shard.done
                    self.present[spec.name][view][chunk.start:chunk.stop] = shard.present
                    if shard.texts is not None and spec.name in self.texts:
                        self.texts[spec.name][view][chunk.start:chunk.stop] = shard.texts
                    self.errors.update({chunk.start + i: e for i, e in enumerate(shard.errors) if e})
        every = np.ones(setup.n_images, dtype=bool)
        for spec in setup.with_network:
            for view in self.views[spec.name]:
                every &= self.done[spec.name][view]
        return int(every.sum())

    def plan(self) -> list[PlannedBatch]:
        """Step 3: the batches still to compute, on the fixed grid of chunks and batches (so resumed = fresh)."""
        setup, plan = self.setup, []
        rank, world = setup.share
        for number, chunk in enumerate(blocks(setup.n_images, setup.chunk_size)):
            if number % world != rank:
                continue  # another process's chunk (data-parallel)
            for start in range(chunk.start, chunk.stop, setup.batch_size):
                rows = list(range(start, min(start + setup.batch_size, chunk.stop)))
                missing = {s.name: [v for v in self.views[s.name] if not self.done[s.name][v][rows].all()]
                           for s in setup.with_network}
                missing = {name: views for name, views in missing.items() if views}
                if missing:
                    plan.append(PlannedBatch(chunk, rows, missing))
        return plan

    def record_decoding(self, batch: DecodedBatch) -> None:
        paths = self.setup.listing.paths
        for index, reason in batch.errors:
            self.errors[index] = reason
            log.warning("cannot read %s: %s; writing the fallback vector", paths[index], reason)
        for index, note in batch.notes:
            if index not in self.notes:
                self.notes[index] = note
                log.warning("%s: %s", paths[index], note)

    def store(self, planned: PlannedBatch, name: str, view: str, indices: list[int], out: ViewOutput | None
              ) -> None:
        """One tower x view's record of a batch (values, the rows present, its texts for a tower that makes them);
        every row of the batch is done (unreadable ones stay NaN, their text empty)."""
        if len(indices):
            self.values[name][view][indices] = out.values
            if out.present is not None:
                self.present[name][view][indices] = out.present
            for index, text in zip(indices, out.texts or (), strict=False):
                self.texts[name][view][index] = text
        self.done[name][view][planned.rows] = True

    def flush(self, planned: PlannedBatch) -> None:
        """Store the batch's chunk shards of every tower x view it computed."""
        setup = self.setup
        if setup.cache is None:
            return
        chunk = planned.chunk
        keys = setup.image_keys[chunk.start:chunk.stop]
        errors = [self.errors.get(i, "") for i in chunk]
        for name, views in planned.missing.items():
            for view in views:
                texts = self.texts[name][view][chunk.start:chunk.stop] if name in self.texts else None
                shard = Shard(self.values[name][view][chunk.start:chunk.stop],
                              self.done[name][view][chunk.start:chunk.stop], errors, texts,
                              self.present[name][view][chunk.start:chunk.stop])
                setup.cache.save(setup.tower_keys[name], view, keys, shard)


class _TqdmHandler(logging.Handler):
    """Log records written above the progress bars (tqdm.write), not onto their line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never stop a run
            self.handleError(record)


@contextmanager
def _logging_above_bars(enabled: bool):
    """While bars are shown, warnings go through tqdm.write: the configured handlers (logging_redirect_tqdm), or,
    when nothing is configured, a handler of ours in place of Python's last-resort one."""
    if not enabled:
        yield
    elif logging.root.handlers or log.handlers:  # only loggers with handlers: it adds one to each logger given
        with logging_redirect_tqdm(loggers=[lg for lg in (logging.root, log) if lg.handlers], tqdm_class=tqdm):
            yield
    else:
        handler = _TqdmHandler(logging.WARNING)
        log.addHandler(handler)
        try:
            yield
        finally:
            log.removeHandler(handler)


MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def bound_heap_growth() -> bool:
    """Serve allocations of 1 MiB and more by mmap, returned to the OS when freed (glibc only; never fatal).

    Each batch makes float copies of its full-size images (25 MB for 8 images at 512 px, per tower and resolution).
    glibc's dynamic mmap threshold moves such blocks onto the heap after the first free, and thread arenas then keep
    them: peak RSS grew by 40 to 400 MB between 100 and 2000 images depending on thread timing, and by 5 to 10 MB with
    a fixed threshold (docs/benchmarks.md). A threshold set by the user (MALLOC_MMAP_THRESHOLD_) is left alone.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return False
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def load_runners(setup: RunSetup, plan: list[PlannedBatch]) -> dict[str, TowerRunner]:
    """Step 4: load the towers the plan needs (none when the cache had everything), each in its runner; the
    checkpoints are read straight onto the device."""
    needed = {name for planned in plan for name in planned.missing}
    return {spec.name: TowerRunner(load_tower(spec, setup.manifest.embedding_dim, setup.device), setup.device,
                                   setup.precisions[spec.name], setup.compiles[spec.name])
            for spec in setup.with_network if spec.name in needed}


class _Background:
    """A call run in a daemon thread (a Ctrl-C does not wait for it); `result()` waits and re-raises its error."""

    def __init__(self, function: Callable, *args):
        self._result, self._error = None, None
        self.seconds = 0.0
        started = time.perf_counter()

        def run() -> None:
            try:
                self._result = function(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the caller by result()
                self._error = err
            self.seconds = time.perf_counter() - started

        self._thread = threading.Thread(target=run, name="kaggle_i2p-load-towers", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def encode(setup: RunSetup, outputs: RunOutputs, plan: list[PlannedBatch], n_cached: int, progress: bool
           ) -> tuple[dict[str, TowerRunner], float]:
    """Steps 4-5: the towers load in a background thread while the first batches decode (the decoding workers are
    started first: forking next to a loading thread is not safe); then each planned batch is decoded once, every
    runner computes the views it still lacks, and the batch is stored. Returns the runners and the loading seconds."""
    if plan:
        bound_heap_growth()
    loader = image_loader(setup.listing.paths, setup.batch_size, setup.num_workers,
                          pin_memory=setup.device.type == "cuda", batches=[planned.rows for planned in plan])
    batches = iter(loader)  # the decoding workers start now
    loading = _Background(load_runners, setup, plan)
    bar = tqdm(total=setup.n_images, initial=n_cached, desc=progress_label(setup), unit="img", disable=not progress)
    try:
        with torch.inference_mode(), _logging_above_bars(progress):
            for planned, batch in zip(plan, batches, strict=True):
                runners = loading.result()  # waits for the towers once, at the first batch
                outputs.record_decoding(batch)
                pixels = batch.pixels_on(setup.device) if batch.indices else None
                for name, runner in runners.items():
                    view_names = planned.missing.get(name, [])
                    computed = runner.compute_views(pixels, view_names) if pixels is not None and view_names else {}
                    for view in view_names:
                        outputs.store(planned, name, view, batch.indices, computed.get(view))
                outputs.flush(planned)
                bar.update(len(planned.rows))
    finally:
        bar.close()
    return loading.result(), loading.seconds


def after_encoding(setup: RunSetup, outputs: RunOutputs, progress: bool) -> None:
    """Step 6: each tower whose kind has a step after encoding (a retrieval tower's one pass over its bank) turns the
    outputs of every image and view into embeddings at once; rows without an output (unreadable images) stay NaN."""
    n, dim = setup.n_images, setup.manifest.embedding_dim
    for spec in setup.with_network:
        kind = kind_of(spec)
        if not kind.has_step_after_encoding(spec):
            continue
        views = outputs.views[spec.name]
        stored = np.concatenate([outputs.values[spec.name][v] for v in views])
        found = np.isfinite(stored).all(axis=1)
        source, texts = kind.text_source(spec), None
        if source is not None:  # another tower's texts, its first view's, one per image, repeated for each view
            texts = [t for t, keep in zip(outputs.texts[source][outputs.views[source][0]] * len(views), found,
                                          strict=True) if keep]
        embedded = run_after_encoding(kind, spec, stored[found], EncodingContext(setup.device, progress, texts))
        rows = np.full((len(stored), dim), np.nan, dtype=np.float32)
        rows[found] = embedded
        for i, view in enumerate(views):
            outputs.values[spec.name][view] = rows[i * n:(i + 1) * n]


def ensemble(setup: RunSetup, outputs: RunOutputs) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, str]]:
    """Step 7: each tower's output (its TTA views combined, or its constant), then the weighted ensemble; the one
    place that decides fallbacks: unreadable images, and rows a tower left non-finite even in fp32."""
    manifest, paths, n = setup.manifest, setup.listing.paths, setup.n_images
    failed = {i: f"unreadable image ({reason})" for i, reason in outputs.errors.items()}
    tower_embeddings: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}  # a features tower's output: its views' mean, as they came
    combined = [spec for spec in setup.active if kind_of(spec).combines(spec)]
    for spec in setup.active:
        constant = spec.constant()
        if constant is not None:  # a tower without views (a prior)
            tower_embeddings[spec.name] = np.tile(constant, (n, 1))
            continue
        if spec in combined:  # made of the others' results, below
            continue
        views = outputs.views[spec.name]
        if not kind_of(spec).gives_embeddings(spec):
            weights = np.asarray(spec.view_weight_list(), dtype=np.float64)
            stacked = np.stack([outputs.values[spec.name][v] for v in views])
            features[spec.name] = np.tensordot(weights / weights.sum(), stacked, axes=1).astype(np.float32)
            _fail_rows(features[spec.name], spec, failed, paths)
            continue
        tower = combine_views([outputs.values[spec.name][v] for v in views], spec.view_weight_list())
        tower[_fail_rows(tower, spec, failed, paths, outputs.present[spec.name], manifest.embedding_dim)] = \
            manifest.fallback
        tower_embeddings[spec.name] = tower
    for spec in combined:  # a fusion tower: its inputs' results through its head (a failed input row fails it)
        bad_inputs = np.zeros(n, dtype=bool)
        bad_inputs[list(failed)] = True
        tower = kind_of(spec).combine(spec, tower_embeddings, features, setup.device)
        tower[bad_inputs | _fail_rows(tower, spec, failed, paths)] = manifest.fallback
        tower_embeddings[spec.name] = tower
    weighted = {name: out for name, out in tower_embeddings.items() if manifest.weights[name] > 0}
    embeddings = combine_towers(weighted, manifest.weights, manifest.dim_weights)
    for index in failed:
        embeddings[index] = manifest.fallback
    return embeddings, tower_embeddings, failed


MISSING = re.compile(r"tower '.*' made (.+) for it")  # a row a tower gave no value for, by design (`_fail_rows`)


def _fail_rows(tower: np.ndarray, spec: TowerSpec, failed: dict[int, str], paths: list[Path],
               present: dict[str, np.ndarray] | None = None, embedding_dim: int = 384) -> np.ndarray:
    """The rows a tower left without a value: an image no view gave a value for, by design (what the kind's output
    says it lacks: "made no caption for it"), or a value non-finite even in fp32; each a fallback row, said once per
    image with its reason."""
    bad = unusable_rows(tower)
    lacking = kind_of(spec).output(spec, embedding_dim).missing if present else ""
    for index in np.flatnonzero(bad):
        if int(index) not in failed:
            silent = present and not any(view[int(index)] for view in present.values())
            failed[int(index)] = f"tower {spec.name!r} " + (f"made {lacking} for it" if silent else
                                                            "gave a non-finite output even in fp32")
            log.warning("%s: %s; writing the fallback vector", paths[index], failed[int(index)])
    return bad


def summarize(setup: RunSetup, encoded: Encoded, failed: dict[int, str], seconds: float) -> RunSummary:
    """Step 8: what the run did (the data-parallel processes' counters added), for the closing line and tests."""
    ids, runners, parallel = setup.listing.ids, encoded.runners.values(), encoded.parallel
    return RunSummary(
        n_images=setup.n_images, towers=[s.name for s in setup.active],
        n_views=sum(s.n_views for s in setup.with_network), device=str(setup.device), precision=setup.precisions,
        fallbacks=[(ids[i], failed[i]) for i in sorted(failed)],
        skipped_files=[(s.name, s.reason) for s in setup.listing.skipped],
        converted=[(ids[i], note) for i, note in sorted(encoded.outputs.notes.items())],
        nonfinite_recomputes=sum(r.nonfinite_recomputes for r in runners) + parallel["nonfinite_recomputes"],
        oom_halvings=sum(r.oom_halvings for r in runners) + parallel["oom_halvings"],
        compile_seconds=sum(r.compile_seconds for r in runners) + parallel["compile_seconds"],
        devices=len(setup.devices) or 1, loading_seconds=encoded.loading_seconds, cached_images=encoded.n_cached,
        cache_failed=setup.cache is not None and not setup.cache.writable, keys_left_out=setup.keys_left_out,
        seconds=seconds, replaced=replaced_builtins(setup.active))


def replaced_builtins(towers: list[TowerSpec]) -> list[str]:
    """The package's own libraries and kinds these towers use that a plugin replaced (`register(replace=True)`),
    each as `library 'timm' by plugin.module`: a run never uses a replacement without saying so."""
    from ..core.registry import KINDS, LIBRARIES

    used = {(LIBRARIES, getattr(s, "library", None)) for s in towers} | {(KINDS, s.kind) for s in towers}
    return sorted(f"{table.what} {name!r} by {table.replaced[name]}" for table, name in used
                  if name in table.replaced)


class Encoded(NamedTuple):
    """Steps 2-5's result: the outputs, the runners that computed, and what to report of them."""

    outputs: RunOutputs
    runners: dict[str, TowerRunner]
    n_cached: int  # images whose every output was in the cache when the run began
    planned: int  # images in the batches that were missing when the run began (its share's, under a share)
    loading_seconds: float
    parallel: Counter  # the data-parallel processes' counters (empty on one device)


def encode_missing(setup: RunSetup, progress: bool = True) -> Encoded:
    """Steps 2-5: read the cache; on several devices, their shares of the chunks encoded at once into it and the
    cache read again; then plan what is still missing (all of it, or what a lost process left), load and encode."""
    outputs = RunOutputs(setup)
    n_cached = outputs.read_cache()
    plan = outputs.plan()
    planned = sum(len(batch.rows) for batch in plan)
    parallel: Counter = Counter()
    if len(setup.devices) > 1 and plan and setup.cache is None:  # the cache folder could not be made (warned)
        log.warning("several devices exchange their chunks through the cache, which is off: running on %s alone",
                    setup.device)
    elif len(setup.devices) > 1 and plan:
        parallel = run_on_devices(encode_share, device_shares(setup))
        outputs = RunOutputs(setup)
        outputs.read_cache()
        plan = outputs.plan()
    runners, loading_seconds = encode(setup, outputs, plan, n_cached, progress)
    return Encoded(outputs, runners, n_cached, planned, loading_seconds, parallel)


COUNTERS = ("nonfinite_recomputes", "oom_halvings", "compile_seconds")


def encode_share(setup: RunSetup) -> dict[str, float]:
    """One device's process (`parallel.run_on_devices`): its share of the chunks encoded into the cache; its
    runners' counters."""
    outputs = RunOutputs(setup)
    n_cached = outputs.read_cache()
    runners, _ = encode(setup, outputs, outputs.plan(), n_cached, progress=False)
    return {name: sum(getattr(r, name) for r in runners.values()) for name in COUNTERS}


def encode_part(image_dir: str | Path, manifest: str | Path | Manifest, cache_dir: str | Path,
                share: tuple[int, int], options: RunOptions | None = None, **values: Any) -> int:
    """One machine's part of a run split over machines that share `cache_dir`: its chunks (c mod W == R) encoded
    into the cache (over its devices, when it has several), no CSV. A run without a share on the same cache then
    computes nothing and writes the CSV. Returns the images this part had to compute."""
    options = RunOptions.of(options, **{**values, "cache_dir": cache_dir})
    setup = prepare_run(image_dir, manifest, options, share=share)
    planned = encode_missing(setup, options.progress).planned
    if not setup.cache.writable:  # the disk filled during the part: its outputs are the part's only result
        raise OutputError(f"part {share[0]} of {share[1]}: the cache folder {cache_dir} stopped taking outputs "
                          "during the run (see the warning above); what was stored is kept: free some space and "
                          "rerun the same command to finish this part")
    return planned


def execute(setup: RunSetup, progress: bool = True) -> PredictionRun:
    """Steps 2-8 of a prepared run: encode what the cache lacks, search the banks, ensemble, summarise."""
    started = time.perf_counter()
    try:
        encoded = encode_missing(setup, progress)
        outputs = encoded.outputs
        for runner in encoded.runners.values():
            runner.release()
        after_encoding(setup, outputs, progress)
        embeddings, tower_embeddings, failed = ensemble(setup, outputs)
    finally:
        if setup.temporary_cache:
            shutil.rmtree(setup.cache.root, ignore_errors=True)
    summary = summarize(setup, encoded, failed, time.perf_counter() - started)
    return PredictionRun(list(setup.listing.ids), embeddings, tower_embeddings, outputs.values, summary,
                         outputs.texts)


def run_prediction(image_dir: str | Path, manifest: str | Path | Manifest = DEFAULT_MANIFEST,
                   options: RunOptions | None = None, *, include_zero_weight: bool = False,
                   **values: Any) -> PredictionRun:
    """Predict every image in `image_dir` with the manifest's ensemble; the full result with per-tower outputs.
    `options` (a `RunOptions`) or its fields by name: device, batch_size, num_workers, precision, compile_views,
    cache_dir, cache_chunk_size, verify_images, progress.

    The sorted listing is cut into fixed chunks of `cache_chunk_size` images and batches never cross a chunk, so a
    run resumed from `cache_dir` after a kill computes exactly the batches that were missing and gives the same bytes.
    """
    options = RunOptions.of(options, **values)
    setup = prepare_run(image_dir, manifest, options, include_zero_weight=include_zero_weight)
    return execute(setup, options.progress)


def predict_embeddings(image_dir: str | Path, manifest: str | Path | Manifest = DEFAULT_MANIFEST,
                       **options) -> tuple[list[str], np.ndarray]:
    """`(ids, float32 array [N, 384])` for the images in `image_dir`; options as for `run_prediction`."""
    run = run_prediction(image_dir, manifest, **options)
    return run.ids, run.embeddings


def predict_dir(image_dir: str | Path, manifest: str | Path | Manifest = DEFAULT_MANIFEST,
                out_csv: str | Path | None = "submission.csv", options: RunOptions | None = None, *,
                return_frame: bool = True, captions_out: str | Path | None = None,
                **values: Any) -> pd.DataFrame | None:
    """Predict a folder of images and write the Kaggle submission CSV; returns the submission as a DataFrame
    (`return_frame=False`: None, sparing the 6.1M-row frame of a 16k-image run). `options` as for `run_prediction`.

    The output path is checked (a file path, a writable folder, room for the CSV) before any weights load. With
    `cache_dir`, every tower x view output is stored as it is made: a killed run resumes where it stopped.
    `captions_out`: also write what each caption tower read in each image (`imgId,tower,view,caption`).
    """
    options = RunOptions.of(options, **values)
    progress = options.progress
    check_distinct_outputs({"--out": out_csv, "--captions-out": captions_out},
                           {"image folder": image_dir, "manifest": None if isinstance(manifest, Manifest) else
                            manifest if Path(str(manifest)).is_file() else None})
    setup = prepare_run(image_dir, manifest, options)
    if out_csv is not None:
        check_output_path(out_csv, setup.listing.ids, setup.manifest.embedding_dim)
    if captions_out is not None:
        if not any(kind_of(s).output(s, setup.manifest.embedding_dim).texts for s in setup.with_network):
            raise OptionError(f"--captions-out {captions_out}: the manifest has no caption tower to read captions "
                              "from (kind: caption); leave it out")
        check_writable_file(captions_out)
    run = execute(setup, progress)
    ids, embeddings, summary, texts = run.ids, run.embeddings, run.summary, run.texts
    del run  # per-view outputs are not needed past this point; free them before the CSV and the DataFrame
    if out_csv is not None:
        write_submission(ids, embeddings, out_csv)
    if captions_out is not None:
        write_captions(ids, texts, captions_out)
    if progress:
        print(summary, flush=True)
        if out_csv is not None:
            print(f"kaggle_i2p: wrote {out_csv} ({len(ids) * embeddings.shape[1]} rows)", flush=True)
    return submission_frame(ids, embeddings) if return_frame else None
