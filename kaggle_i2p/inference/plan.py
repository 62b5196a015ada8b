"""`kaggle-i2p plan`: will this manifest's run fit the notebook's hours? Measured here, on the device at hand.

1. load: every tower built and loaded as a run loads it (its checkpoint when the file is there, else random weights
   of the same architecture: the time is the architecture's), timed: the start-up.
2. views: each tower x view through the run's own `TowerRunner` (precision, fallbacks and compile included) on
   synthetic 512 px batches at the run's batch size: the first batch (warm-up, compiling) timed apart, then
   `repeats` batches: images/s.
3. decode: the sample images through the run's DataLoader with its worker count: images/s.
4. projection (`RunPlan`): hours per view for N images, and the run: start-up + compiling + the larger of compute
   and decoding (workers decode while the device computes), plus a safety margin, against the budget. When it does
   not fit, the views to drop, least ensemble weight per hour saved first.

The Kaggle notebook runs it in the interactive session (where the test folder holds the 7-image public sample), so
the hidden 16k-image run is known to fit before it is submitted.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import OptionError
from ..core.progress import say
from ..core.resources import DEFAULT_MANIFEST
from ..manifest import Manifest, NetworkSpec, kind_of
from .options import RunOptions

Clock = Callable[[], float]
TEST_IMAGES = 16_000  # the hidden test set, about
KAGGLE_BUDGET_S = 9 * 3600  # a Kaggle notebook's limit
MARGIN = 0.15  # the projection is an estimate: keep this share of the budget to spare
SAMPLE_SIZE = 512  # the competition's images


@dataclass(frozen=True)
class ViewTiming:
    """One tower x view as measured: images/s in steady state, the first batch's seconds, its ensemble share."""

    tower: str
    view: str
    images_per_s: float
    first_batch_s: float
    share: float  # the view's part of the ensemble weight (tower weight x view weight, normalised)

    def seconds(self, images: int) -> float:
        return images / self.images_per_s


@dataclass
class RunPlan:
    """The projection of a run from measured rates (see the module docstring, step 4)."""

    images: int
    budget_s: float
    margin: float
    startup_s: float
    decode_images_per_s: float
    views: list[ViewTiming]
    device: str = ""
    notes: list[str] = field(default_factory=list)

    def compile_s(self, views: Sequence[ViewTiming] | None = None) -> float:
        """The first batches' time beyond a steady-state batch's (compiling, warm-up)."""
        return sum(max(0.0, v.first_batch_s) for v in (self.views if views is None else views))

    def total_s(self, views: Sequence[ViewTiming] | None = None) -> float:
        views = self.views if views is None else views
        compute = sum(v.seconds(self.images) for v in views)
        decode = self.images / self.decode_images_per_s
        return (self.startup_s + self.compile_s(views) + max(compute, decode)) * (1 + self.margin)

    @property
    def fits(self) -> bool:
        return self.total_s() <= self.budget_s

    def drops(self) -> list[ViewTiming]:
        """The views to leave out until the run fits: least ensemble share per second saved first (none if it
        fits; every view, if even start-up and decoding alone do not)."""
        kept, dropped = list(self.views), []
        for view in sorted(self.views, key=lambda v: v.share / v.seconds(self.images)):
            if self.total_s(kept) <= self.budget_s:
                break
            kept.remove(view)
            dropped.append(view)
        return dropped

    def report(self) -> str:
        hours = 3600.0
        lines = [f"plan for {self.images:,} images on {self.device}: start-up {self.startup_s:.1f} s, decoding "
                 f"{self.decode_images_per_s:.1f} images/s ({self.images / self.decode_images_per_s / hours:.2f} h)"]
        for v in self.views:
            lines.append(f"  {v.tower} {v.view}: {v.images_per_s:.2f} images/s, {v.seconds(self.images) / hours:.2f} "
                         f"h, first batch {v.first_batch_s:.1f} s, {v.share:.1%} of the ensemble")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"total {self.total_s() / hours:.2f} h with a {self.margin:.0%} margin: {verdict} in "
                     f"{self.budget_s / hours:.2f} h")
        if not self.fits:
            dropped = self.drops()
            kept = [v for v in self.views if v not in dropped]
            if self.total_s(kept) > self.budget_s:
                lines.append("  even with no views left it does not fit: start-up and decoding alone are too long")
            else:
                lines.append(f"  to fit, drop {', '.join(f'{v.tower} {v.view}' for v in dropped)} "
                             f"({sum(v.share for v in dropped):.1%} of the ensemble): "
                             f"{self.total_s(kept) / hours:.2f} h")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "total_s": self.total_s(), "fits": self.fits,
                           "drops": [f"{v.tower} {v.view}" for v in self.drops()]})

    def unit_drops(self, manifest: Manifest) -> list[tuple[str, str, tuple[str, ...]]]:
        """What a manifest can leave out, least ensemble share per second saved first, until the run fits: whole
        units of a tower's views, as an entry can name them (a resolution, its flips, a normalisation): (tower,
        unit, its views)."""
        units = []
        for spec in manifest.towers:
            if not isinstance(spec, NetworkSpec):
                continue
            views = spec.views
            units += [(spec.name, f"resolution {r}", tuple(v.name for v in views if v.resolution == r))
                      for r in spec.image.resolutions]
            if spec.image.hflip:
                units.append((spec.name, "hflip", tuple(v.name for v in views if v.flip)))
            units += [(spec.name, f"norms[{k}]", tuple(v.name for v in views if v.norm == k))
                      for k in range(1, len(spec.image.normalisations))]
        timed = {(v.tower, v.view): v for v in self.views}

        def cost(unit: tuple[str, str, tuple[str, ...]]) -> float:
            parts = [timed[(unit[0], name)] for name in unit[2] if (unit[0], name) in timed]
            seconds = sum(v.seconds(self.images) for v in parts)
            return sum(v.share for v in parts) / seconds if seconds else float("inf")

        kept, dropped = list(self.views), []
        for unit in sorted(units, key=cost):
            if self.total_s(kept) <= self.budget_s:
                break
            gone = {(unit[0], name) for name in unit[2]}
            if any((v.tower, v.view) in gone for v in kept):
                kept = [v for v in kept if (v.tower, v.view) not in gone]
                dropped.append(unit)
        return dropped


def trimmed_manifest(manifest: Manifest, plan: RunPlan, out: Path) -> tuple[dict, list[str]]:
    """The manifest's data (paths relative to `out`'s folder) with the units `plan.unit_drops` names left out: a
    resolution from its list, `hflip: false`, a normalisation from `norms`; a tower left with no resolution gets
    weight 0 (not run, unless another tower reads it). Returns the data and a line per change."""
    data = manifest.to_dict(out.resolve().parent)
    return data, drop_units(data, manifest, plan)


def drop_units(data: dict, manifest: Manifest, plan: RunPlan) -> list[str]:
    """Leave out, in manifest data (plain, or a user's file as read for a round trip), the units the plan drops;
    a line per change."""
    from ..manifest.write import as_written

    entries = {entry["name"]: entry for entry in data["towers"]}
    changes = []
    for tower, unit, _ in plan.unit_drops(manifest):
        image = entries[tower]["image"]
        if unit.startswith("resolution "):
            image["resolutions"] = as_written([r for r in image["resolutions"] if r != int(unit.split()[1])])
        elif unit == "hflip":
            image["hflip"] = False
        else:
            index = int(unit[len("norms["):-1])
            image["norms"] = [n for k, n in enumerate(image["norms"]) if k != index]
        image.pop("view_weights", None)  # its views changed: equal weights over those left
        changes.append(f"{tower}: {unit} left out")
    for tower, entry in entries.items():
        if "image" in entry and not entry["image"].get("resolutions"):
            entry["image"]["resolutions"] = as_written([manifest_spec_resolution(manifest, tower)])
            entry["weight"] = 0
            changes.append(f"{tower}: every view left out: weight 0")
    return changes


def write_trimmed(manifest: Manifest, plan: RunPlan, out: Path) -> list[str]:
    """`out`: the manifest file with the plan's drops, its comments and layout kept (a manifest built in memory,
    with no file, written whole); validated as read from `out`, then written atomically."""
    from ..manifest.write import edit_manifest, rebase_manifest_paths, write_manifest

    changes: list[str] = []

    def trim(data: dict) -> None:
        rebase_manifest_paths(data, manifest.path.resolve().parent, out.resolve().parent)
        changes.extend(drop_units(data, manifest, plan))

    if manifest.path.is_file():
        edit_manifest(manifest.path, trim, out)
    else:
        data, changes = trimmed_manifest(manifest, plan, out)
        write_manifest(data, out)
    return changes


def manifest_spec_resolution(manifest: Manifest, tower: str) -> int:
    spec = next(t for t in manifest.towers if t.name == tower)
    return spec.image.resolutions[0]


def parse_budget(text: str | float) -> float:
    """Seconds from `9h`, `90m`, `5400s` or a bare number of hours; one OptionError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([hms]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise OptionError(f"budget {text!r}: give hours, minutes or seconds, e.g. 9h, 90m or 5400s")
    return float(match.group(1)) * {"h": 3600, "": 3600, "m": 60, "s": 1}[match.group(2)]


def view_shares(manifest: Manifest) -> dict[tuple[str, str], float]:
    """Each active network tower x view's part of the ensemble weight."""
    towers = manifest.running_towers
    total = sum(t.weight for t in towers)
    readers = manifest.readers()
    shares = {}
    for tower in towers:
        if isinstance(tower, NetworkSpec):  # a tower others read carries its readers' weight (never dropped first)
            weight_of = tower.weight + sum(r.weight / max(len(kind_of(r).reads(r)), 1)  # a reader's weight shared
                                           for r in readers.get(tower.name, []))  # by what it reads
            weights = tower.view_weight_list()
            for view, weight in zip(tower.views, weights, strict=True):
                shares[(tower.name, view.name)] = weight_of / total * weight / sum(weights)
    return shares


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_runners_timed(manifest: Manifest, device: torch.device, precision: str | None = None,
                       compile_views: bool | None = None, clock: Clock = time.perf_counter) -> tuple[list, float, list]:
    """Step 1: a runner per weighted network tower, loaded as a run loads it (its checkpoint when the file is there,
    else random weights of the architecture), with the run's precision and compile; the loading seconds and notes."""
    from ..models.checkpoints import source_parts
    from ..models.towers import build_tower, load_tower
    from .devices import resolve_compile, resolve_precision
    from .runner import TowerRunner

    runners, startup, notes = [], 0.0, []
    networks = [spec for spec in manifest.running_towers if isinstance(spec, NetworkSpec)]
    for number, spec in enumerate(networks, 1):
        say(f"plan: loading tower {spec.name!r} ({number}/{len(networks)}) on {device}")
        started = clock()
        if spec.checkpoint is not None and all(p.exists() for p in source_parts(spec.checkpoint)):
            tower = load_tower(spec, manifest.embedding_dim, device)
        else:
            notes.append(f"note: {spec.name}: no checkpoint here, timed with random weights of the same architecture")
            tower = build_tower(spec, manifest.embedding_dim).to(device).eval().requires_grad_(False)
        startup += clock() - started
        runners.append(TowerRunner(tower, device, resolve_precision(precision or spec.precision, device),
                                   resolve_compile(spec.compile if compile_views is None else compile_views, device)))
    return runners, startup, notes


def synthetic_batch(batch_size: int, device: torch.device) -> torch.Tensor:
    """A seeded uint8 batch of competition-sized images on the device (what timing needs, not what images hold)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch_size, 3, SAMPLE_SIZE, SAMPLE_SIZE), dtype=torch.uint8,
                         generator=generator).to(device)


def time_views(runner, pixels: torch.Tensor, repeats: int, shares: dict[tuple[str, str], float],
               clock: Clock = time.perf_counter) -> list[ViewTiming]:
    """Step 2 for one tower: each view on `pixels` (a uint8 batch on the device), first batch apart."""
    timings = []
    say(f"plan: timing tower {runner.spec.name!r}: {len(runner.spec.views)} view(s), {repeats} batches of "
        f"{len(pixels)} each")
    with torch.inference_mode():
        for view in runner.spec.views:
            _synchronize(runner.device)
            started = clock()
            runner.compute_views(pixels, [view.name])
            _synchronize(runner.device)
            first = clock() - started
            started = clock()
            for _ in range(repeats):
                runner.compute_views(pixels, [view.name])
            _synchronize(runner.device)
            rate = len(pixels) * repeats / max(clock() - started, 1e-9)
            timings.append(ViewTiming(runner.spec.name, view.name, rate, max(0.0, first - len(pixels) / rate),
                                      shares.get((runner.spec.name, view.name), 0.0)))
    return timings


def time_decoding(paths: Sequence[Path], batch_size: int, workers: int, images: int = 64,
                  clock: Clock = time.perf_counter) -> float:
    """Step 3: images/s of the run's DataLoader over `images` decodes of the given files."""
    from .images import image_loader

    repeated = [paths[i % len(paths)] for i in range(images)]
    started = clock()
    for _ in image_loader(repeated, batch_size, workers):
        pass
    return images / max(clock() - started, 1e-9)


def plan_run(manifest: str | Path | Manifest = DEFAULT_MANIFEST, options: RunOptions | None = None, *,
             images: int = TEST_IMAGES, budget: str | float = "9h", margin: float = MARGIN, repeats: int = 3,
             sample_dir: str | Path | None = None, clock: Clock = time.perf_counter, **values: Any) -> RunPlan:
    """Steps 1-4 (see the module docstring); `options` as a run's (device, batch size, workers, precision,
    compile), so the plan times what the run will do."""
    from ..models.towers import validate_manifest
    from .devices import resolve_device
    from .dryrun import default_sample_dir
    from .images import list_images

    # 1. the options, then the towers loaded as a run loads them
    budget_s = parse_budget(budget)
    if images < 1 or repeats < 1 or not 0 <= margin < 1:
        raise OptionError(f"images {images}, repeats {repeats} and margin {margin}: images and repeats at least 1, "
                          "the margin in [0, 1)")
    options = RunOptions.of(options, **values)
    device = resolve_device(options.device)
    manifest = validate_manifest(manifest, check_files=False)
    sample = Path(sample_dir) if sample_dir else default_sample_dir()  # the images, found before any timing
    paths = list(list_images(sample / "images" if (sample / "images").is_dir() else sample).paths)
    batch_size, workers = options.batch_size_on(device.type), options.workers()
    shares = view_shares(manifest)
    runners, startup, notes = load_runners_timed(manifest, device, options.precision, options.compile_views, clock)
    for runner in runners:  # what a forward's time means for these towers, and what it leaves out
        name, kind = runner.spec.name, kind_of(runner.spec)
        if kind.output(runner.spec, manifest.embedding_dim).texts:
            notes.append(f"note: {name}: its views' times are text generation (far slower than a forward), "
                         "timed on synthetic images: real captions may stop earlier or later")
        if kind.has_step_after_encoding(runner.spec):
            notes.append(f"note: {name}: its step after encoding (a bank pass, or the interrogator's candidate "
                         "texts through CLIP) is not timed here; it runs once, after every image")

    # 2. every tower x view on synthetic batches
    pixels = synthetic_batch(batch_size, device)
    timings = [t for runner in runners for t in time_views(runner, pixels, repeats, shares, clock)]

    # 3. decoding, 4. the projection
    decode = time_decoding(paths, batch_size, workers, clock=clock)
    return RunPlan(images, budget_s, margin, startup, decode, timings, str(device), notes)
