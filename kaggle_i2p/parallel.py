"""Data-parallel encoding over several devices (the two T4s of a Kaggle box): one process per device, each taking
whole chunks of the sorted listing (chunk c to device c mod D).

The prediction cache is the exchange: every finished batch is stored as its chunk's shards, so a process that dies
loses only its batch in flight, and the main process computes whatever is missing before the ensemble, as a resumed
run does (a rerun with the same cache finishes the work too). Batches never cross chunks and each is computed whole
by one process, so the output is the bytes of one device. Several machines sharing a cache folder can split a run the
same way (`encode_part`, `kaggle-i2p predict --share R/W`).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("kaggle_i2p")

COUNTERS = ("nonfinite_recomputes", "oom_halvings", "compile_seconds")


def encode_share(setup) -> dict[str, float]:
    """One process's part (`setup.share`): its planned batches encoded into the cache; its runners' counters."""
    from .predict import RunOutputs, encode

    outputs = RunOutputs(setup)
    n_cached = outputs.read_cache()
    runners, _ = encode(setup, outputs, outputs.plan(), n_cached, progress=False)
    return {name: sum(getattr(r, name) for r in runners.values()) for name in COUNTERS}


def encode_part(image_dir: str | Path, manifest, cache_dir: str | Path, share: tuple[int, int], **options) -> int:
    """One machine's part of a run split over machines that share `cache_dir`: its chunks (c mod W == R) encoded
    into the cache (over its devices, when it has several), no CSV. A run without a share on the same cache then
    computes nothing and writes the CSV. Returns the images this part had to compute."""
    from .predict import RunOutputs, encode_missing, prepare_run

    progress = options.pop("progress", True)
    setup = prepare_run(image_dir, manifest, cache_dir=cache_dir, share=share, **options)
    outputs = RunOutputs(setup)
    outputs.read_cache()
    missing = sum(len(planned.rows) for planned in outputs.plan())
    encode_missing(setup, progress)
    return missing


def encode_in_parallel(setup) -> Counter:
    """Every device's share encoded at once, one spawned process each; the counters summed. A process that fails is
    one warning: what it left is computed afterwards by the caller, from the cache."""
    world, (part, parts) = len(setup.devices), setup.share  # a machine's part (parts > 1), split over its devices
    shares = [replace(setup, device=device, devices=(device,), share=(part + rank * parts, world * parts))
              for rank, device in enumerate(setup.devices)]
    log.info("encoding on %d devices (%s), chunks shared through the cache at %s", world,
             ", ".join(str(d) for d in setup.devices), setup.cache.root)
    totals: Counter = Counter()
    with ProcessPoolExecutor(max_workers=world, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(encode_share, share) for share in shares]
        for share, future in zip(shares, futures, strict=True):
            try:
                totals.update(future.result())
            except Exception as err:  # noqa: BLE001 - a lost process costs its batch in flight, nothing more
                log.warning("the process on %s stopped (%s: %s); its missing chunks are computed on %s", share.device,
                            type(err).__name__, err, setup.device)
    return totals
