"""How a run computes, as one value: `RunOptions`, shared by `predict_dir`, `run_prediction`, `dry_run`,
`plan_run` and the CLI, with its defaults written here and nowhere else.

    kaggle_i2p.predict_dir(images, manifest, out_csv, RunOptions(device="cuda", batch_size=64))
    kaggle_i2p.predict_dir(images, manifest, out_csv, device="cuda", batch_size=64)  # the same

What a run computes (the towers, their views, weights and precision defaults) is the manifest's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..core.errors import OptionError
from ..manifest import PRECISIONS
from .cache import DEFAULT_CHUNK_SIZE

DEFAULT_BATCH_SIZE = {"cuda": 32, "cpu": 8}  # per device type; another type gets the CPU's


@dataclass(frozen=True)
class RunOptions:
    """The options of a run; None means "the default for the device" or "each tower's own"."""

    device: Any = "auto"  # "auto" (CUDA when there is one), "cpu", "cuda", "cuda:1", or a torch.device
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZE for the device's type
    num_workers: int | None = None  # image-decoding processes; None: min(2, CPUs); 0 decodes in the main process
    precision: str | None = None  # one of PRECISIONS for every tower; None: each tower's manifest precision
    compile_views: bool | None = None  # torch.compile every tower (True) or none (False); None: each tower's own
    cache_dir: str | Path | None = None  # store every tower x view output here: a killed run resumes
    cache_chunk_size: int = DEFAULT_CHUNK_SIZE  # images per cache shard (batches never cross one)
    verify_images: bool = False  # the cache knows an image by its content's sha256, not its size and time
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        self.check()  # RunOptions(cache_dir=123) itself is the OptionError, not a TypeError deep in a run

    @classmethod
    def of(cls, options: RunOptions | str | None = None, **values: Any) -> RunOptions:
        """`options` (or the defaults) with `values` put in; an unknown name or a bad value is an OptionError. A
        bare string or torch.device stands for the device (predict_dir's fourth argument once was the device)."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise OptionError(f"unknown run option(s) {', '.join(unknown)}; the options are "
                              f"{', '.join(f.name for f in fields(cls))}")
        if options is not None and not isinstance(options, RunOptions):
            options = cls(device=options)
        return replace(options or cls(), **values)  # checked as it is made

    def check(self) -> None:
        """Values that cannot work are an OptionError before anything runs (never a silent fallback row)."""
        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.batch_size is not None and not (whole(self.batch_size) and self.batch_size >= 1):
            raise OptionError(f"batch size {self.batch_size!r} must be a whole number >= 1 (or left out for the "
                              "default)")
        if self.num_workers is not None and not (whole(self.num_workers) and self.num_workers >= 0):
            raise OptionError(f"workers {self.num_workers!r} must be a whole number >= 0 (0 decodes in the main "
                              "process)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise OptionError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not (whole(self.cache_chunk_size) and self.cache_chunk_size >= 1):
            raise OptionError(f"cache chunk size {self.cache_chunk_size!r} must be a whole number >= 1")
        if self.cache_dir is not None and not (isinstance(self.cache_dir, (str, os.PathLike)) and str(self.cache_dir)):
            raise OptionError(f"cache_dir {self.cache_dir!r} must be a folder path (a str or Path), or None for no "
                              "cache")
        for name in ("verify_images", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} {getattr(self, name)!r} must be True or False")
        if self.compile_views is not None and not isinstance(self.compile_views, bool):
            raise OptionError(f"compile_views {self.compile_views!r} must be True, False or None (each tower's own)")
        if not isinstance(self.device, (str, list, tuple)) and type(self.device).__name__ != "device":
            raise OptionError(f"device {self.device!r} must be a name (auto, cpu, cuda, cuda:1, a list cuda:0,cuda:1) "
                              "or a torch.device")

    def batch_size_on(self, device_type: str) -> int:
        """The batch size on a device of this type: the given one, else the type's default."""
        return self.batch_size or DEFAULT_BATCH_SIZE.get(device_type, DEFAULT_BATCH_SIZE["cpu"])

    def workers(self) -> int:
        """The decoding processes: the given number, else two where there are two CPUs."""
        return min(2, os.cpu_count() or 1) if self.num_workers is None else self.num_workers
