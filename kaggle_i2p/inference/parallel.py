"""Data-parallel encoding over several devices (the two T4s of a Kaggle box): one process per device, each taking
whole chunks of the sorted listing (chunk c to device c mod D).

The prediction cache is the exchange: every finished batch is stored as its chunk's shards, so a process that dies
loses only its batch in flight, and the main process computes whatever is missing before the ensemble, as a resumed
run does (a rerun with the same cache finishes the work too). Batches never cross chunks and each is computed whole
by one process, so the output is the bytes of one device. Machines sharing a cache folder split a run the same way
(`predict.encode_part`, `kaggle-i2p predict --share R/W`), each over its own devices.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

log = logging.getLogger("kaggle_i2p")


def device_shares(setup) -> list:
    """A run setup per device: the same run, on that device, with its share of the chunks (of this machine's part,
    when the run is split over machines: part R of W on D devices gives shares R + d W of D W)."""
    world, (part, parts) = len(setup.devices), setup.share
    return [replace(setup, device=device, devices=(device,), share=(part + rank * parts, world * parts))
            for rank, device in enumerate(setup.devices)]


def run_on_devices(function: Callable[[object], dict[str, float]], setups: Sequence) -> Counter:
    """`function(setup)` in one spawned process per setup, at once; the counters they return, summed. A process that
    fails is one warning: what it left is computed afterwards by the caller, from the cache."""
    log.info("encoding on %d devices (%s), chunks shared through the cache at %s", len(setups),
             ", ".join(str(s.device) for s in setups), setups[0].cache.root)
    totals: Counter = Counter()
    with ProcessPoolExecutor(max_workers=len(setups), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(function, setup) for setup in setups]
        for setup, future in zip(setups, futures, strict=True):
            try:
                totals.update(future.result())
            except Exception as err:  # noqa: BLE001 - a lost process costs its batch in flight, nothing more
                log.warning("the process on %s stopped (%s: %s); its missing chunks are computed by the main process",
                            setup.device, type(err).__name__, err)
    return totals
