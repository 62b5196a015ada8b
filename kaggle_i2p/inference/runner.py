"""`TowerRunner`: one loaded tower over a decoded batch, every TTA view, in its precision with the fallbacks a
non-finite output asks for, each resolution compiled on its own where asked, and an out-of-memory batch halved. A
view's result is one record (`ViewOutput`: values, the rows with one, texts), whatever the tower's kind."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch

from ..manifest import NetworkSpec, ViewOutput
from ..models.towers import Tower, hold_in_fp16
from .images import make_view

log = logging.getLogger("kaggle_i2p")

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
COMPILE_BACKEND = "inductor"  # tests use "eager": the wiring runs, nothing waits on a real compile
COMPILE_FIDELITY = 0.9999  # the first compiled batch of a resolution against eager: below this cosine, eager
# What a batch is computed in, in order, when the one before gave a non-finite output.
FALLBACKS = {"fp16-weights": ("fp16-weights", "fp16", "fp32"), "fp16": ("fp16", "fp32"), "bf16": ("bf16", "fp32"),
             "fp32": ("fp32",)}



def _raise_recompile_limit(limit: int = 64) -> None:
    """Every tower shares `Tower.forward`'s code object, so each (tower, resolution, batch) is one more compiled entry
    under dynamo's per-code-object limit (8 by default); past it dynamo quietly runs eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


class TowerRunner:
    """Runs one loaded tower over a decoded batch: all its TTA views, precision and its fallbacks, compiled views,
    OOM halving."""

    def __init__(self, tower: Tower, device: torch.device, precision: str, compile_views: bool = False):
        self.spec: NetworkSpec = tower.spec
        self.device = device
        self.precision = precision
        # fp16-weights holds the weights in fp16; a batch that falls back to fp32 uses a copy made on first need
        self.tower = hold_in_fp16(tower) if precision == "fp16-weights" else tower
        self._fp32_tower: Tower | None = None
        self.compile_views = compile_views
        self._compiled: dict[int, Callable | None] = {}  # per resolution; None: eager (the check failed)
        self._compiled_rows: dict[int, int] = {}  # the batch a resolution was compiled for (smaller ones padded)
        self.compile_seconds = 0.0
        self.max_chunk: int | None = None  # lowered after an out-of-memory error, kept for later batches
        self.nonfinite_recomputes = 0
        self.oom_halvings = 0

    def _tower_for(self, level: str) -> Tower:
        if level == "fp32" and self.precision == "fp16-weights":
            if self._fp32_tower is None:
                self._fp32_tower = copy.deepcopy(self.tower).float()
            return self._fp32_tower
        return self.tower

    def _run(self, module: Callable, images: torch.Tensor, level: str) -> ViewOutput:
        if level == "fp16-weights":
            return as_record(module(images.half()))
        dtype = AUTOCAST_DTYPES[level]
        with torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return as_record(module(images))

    def _forward(self, images: torch.Tensor, level: str) -> ViewOutput:
        if self.compile_views and level == FALLBACKS[self.precision][0]:
            return self._compiled_forward(images, level)
        return self._run(self._tower_for(level), images, level)

    def _compiled_forward(self, images: torch.Tensor, level: str) -> ViewOutput:
        """One compiled callable per resolution, static shapes (`dynamic=False`: a module compiled for two sizes went
        dynamic and ran 40 times slower), a smaller batch padded to the compiled one. The first compiled batch of a
        resolution is checked against eager: below COMPILE_FIDELITY cosine, that resolution stays eager."""
        size, rows = images.shape[-1], len(images)
        if self._compiled.get(size, True) is None:
            return self._run(self.tower, images, level)
        target = self._compiled_rows.setdefault(size, rows)
        if self.max_chunk is not None and self.max_chunk < target:  # halved after an OOM: compile the smaller batch
            target = self._compiled_rows[size] = self.max_chunk
        padded = images if rows >= target else torch.cat([images, images.new_zeros(target - rows, *images.shape[1:])])
        if size in self._compiled:
            return first_rows(self._run(self._compiled[size], padded, level), rows)
        _raise_recompile_limit()
        compiled = torch.compile(self.tower, dynamic=False, backend=COMPILE_BACKEND)
        started = time.perf_counter()
        out = first_rows(self._run(compiled, padded, level), rows)
        self.compile_seconds += time.perf_counter() - started
        eager = self._run(self.tower, images, level)
        fidelity = _fidelity(out, eager)
        if not bool(fidelity >= COMPILE_FIDELITY):  # NaN fails too
            log.warning("tower %r at %d px: compiled output differs from eager (lowest cosine %.6f < %g); running "
                        "it eager", self.spec.name, size, float(fidelity), COMPILE_FIDELITY)
            self._compiled[size] = None
            return eager
        self._compiled[size] = compiled
        return out

    def _forward_chunked(self, images: torch.Tensor, level: str) -> ViewOutput:
        while True:
            chunk = self.max_chunk or len(images)
            try:
                return joined([self._forward(images[i:i + chunk], level) for i in range(0, len(images), chunk)])
            except torch.OutOfMemoryError:
                if chunk <= 1:
                    raise
                self.max_chunk = max(1, chunk // 2)
                self.oom_halvings += 1
                log.warning("tower %r: out of memory at batch %d; retrying with %d", self.spec.name, chunk,
                            self.max_chunk)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def release(self) -> None:
        """Free the tower (and its GPU memory) once every batch is encoded: the bank pass wants the room."""
        self.tower = self._fp32_tower = None
        self._compiled = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def forward_view(self, images: torch.Tensor) -> ViewOutput:
        """The view's record, values (B, D) float32; a batch with a non-finite value is computed again one step
        down `FALLBACKS` (fp16 weights -> fp16 autocast -> fp32), each step counted. Only the rows present are
        judged: a row the tower gave no value for (a caption tower's image without a caption) is no value by design,
        which no precision gives it."""
        levels = FALLBACKS[self.precision]
        for level, lower in zip(levels, levels[1:], strict=False):
            out = self._forward_chunked(images, level)
            values = out.values if out.present is None else out.values[out.present.to(out.values.device)]
            if torch.isfinite(values).all():
                return out
            self.nonfinite_recomputes += 1
            log.warning("tower %r: non-finite %s output; recomputing the batch in %s", self.spec.name, level, lower)
        return self._forward_chunked(images, levels[-1])

    def compute_views(self, pixels: torch.Tensor | list[torch.Tensor], view_names: list[str]
                      ) -> dict[str, ViewOutput]:
        """The records of the named TTA views of a decoded batch, as numpy (values (B, D) float32; a retrieval
        tower's head has already turned its scores into the soft top-k bank average); each resolution is resized
        once per normalisation, whatever the order."""
        resized: dict[tuple[int, int], torch.Tensor] = {}
        outputs = {}
        for view in self.spec.views:
            if view.name not in view_names:
                continue
            if (view.resolution, view.norm) not in resized:  # one held at a time
                resized = {(view.resolution, view.norm): make_view(pixels, self.spec.image, view.resolution,
                                                                   norm=view.norm)}
            images = resized[(view.resolution, view.norm)]
            out = self.forward_view(images.flip(-1) if view.flip else images)
            outputs[view.name] = ViewOutput(out.values.cpu().numpy(),
                                            None if out.present is None else out.present.cpu().numpy(), out.texts)
        return outputs


def _fidelity(out: ViewOutput, eager: ViewOutput) -> torch.Tensor:
    """The lowest cosine between a compiled batch's values and eager's, over the rows eager gave a value for (1 when
    it gave none)."""
    rows = slice(None) if eager.present is None else eager.present.to(eager.values.device)
    cosines = torch.nn.functional.cosine_similarity(out.values[rows], eager.values[rows])
    return cosines.min() if cosines.numel() else torch.tensor(1.0)


def as_record(out: torch.Tensor | ViewOutput) -> ViewOutput:
    """A tower's forward as a record with float32 values: a bare tensor is every row present, no texts."""
    return out._replace(values=out.values.float()) if isinstance(out, ViewOutput) else ViewOutput(out.float())


def first_rows(out: ViewOutput, rows: int) -> ViewOutput:
    """The record of the first `rows` rows (a padded compiled batch's own)."""
    return ViewOutput(out.values[:rows], None if out.present is None else out.present[:rows],
                      None if out.texts is None else out.texts[:rows])


def joined(parts: list[ViewOutput]) -> ViewOutput:
    """The records of a batch's chunks as one, in order."""
    if len(parts) == 1:
        return parts[0]
    present = None
    if any(p.present is not None for p in parts):
        present = torch.cat([p.present if p.present is not None else
                             torch.ones(len(p.values), dtype=torch.bool, device=p.values.device) for p in parts])
    texts = None if all(p.texts is None for p in parts) else [t for p in parts for t in (p.texts or [""] * len(
        p.values))]
    return ViewOutput(torch.cat([p.values for p in parts]), present, texts)


