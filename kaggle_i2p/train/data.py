"""Training data from a build_dataset.sh folder: the index, the split, the epoch order, and the image pipeline.

Images go through `images.decode_image` and `images.make_view`, the functions inference uses, so a trained tower sees
at training time exactly the resize and normalisation it is served with; augmentation (a random resized crop and a
colour jitter, off for validation) happens on the uint8 image before that. Every random choice is seeded by (seed,
epoch, row), so a resumed run and a multi-process run draw the same crops as one uninterrupted process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.ensemble import l2_normalize
from ..core.errors import I2PError
from ..core.fileio import open_npy
from ..dataset.layout import INDEX, TARGETS
from ..inference.images import decode_image, make_view
from ..manifest import ImageSpec
from .config import DataConfig

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 64  # more unreadable images in a row than this means a broken folder, not one bad file


class TrainingDataError(I2PError, ValueError):
    """A dataset folder the trainer cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class TrainingData:
    """The index's images and unit targets, split into training prompts (each with its images) and validation rows."""

    work: Path
    ids: np.ndarray  # imgId per row (index order: sorted)
    paths: np.ndarray  # per row, relative to `work`: one string buffer, so forked workers do not copy it
    targets: np.ndarray  # (N, D) as stored in targets.npy (memory-mapped); use `unit_targets`
    prompt_offsets: np.ndarray  # training prompt p owns prompt_rows[prompt_offsets[p]:prompt_offsets[p + 1]]
    prompt_rows: np.ndarray
    val_rows: np.ndarray

    @property
    def n_train_prompts(self) -> int:
        return len(self.prompt_offsets) - 1

    def path(self, row: int) -> Path:
        return self.work / str(self.paths[row])

    def prompts(self, rows: np.ndarray) -> list[str]:
        """The prompts of index rows `rows` (only the index's prompt column is read, when asked: millions of
        strings are not kept)."""
        column = pd.read_parquet(self.work / INDEX, columns=["prompt"])["prompt"]
        return column.iloc[rows].astype(str).tolist()

    def unit_targets(self, rows: np.ndarray | int) -> np.ndarray:
        """float32 unit-norm targets of these rows."""
        return l2_normalize(self.targets[rows])


def load_training_data(work: str | Path, val_fold: int, max_val_images: int | None = None,
                       sources: tuple[str, ...] | None = None, validation_prompts: set[str] | None = None
                       ) -> TrainingData:
    """Read WORK/index.parquet + targets.npy; folds != val_fold train (grouped by prompt), val_fold validates.

    A stage's own dataset: `sources` keeps only the index rows of those sources; `validation_prompts` (the prompts
    of the validation folder's rows) makes this folder a training set only: all its folds train, but no row with a
    validation prompt does (and it validates nothing)."""
    work = Path(work)
    index_path, targets_path = work / INDEX, work / TARGETS
    for path in (index_path, targets_path):
        if not path.is_file():
            raise TrainingDataError(f"{path} not found: build the dataset first (build_dataset.sh, or "
                                    f"`python -m kaggle_i2p.dataset index --work {work}` once images exist)")
    try:
        index = pd.read_parquet(index_path)
    except ImportError as err:
        raise TrainingDataError(f"{index_path}: reading parquet needs pyarrow (pip install pyarrow)") from err
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise TrainingDataError(f"{index_path}: cannot read it as parquet ({err}); rebuild it with `python -m "
                                f"kaggle_i2p.dataset index --work {work}`") from err
    missing = ({"imgId", "prompt", "path", "fold"} | ({"source"} if sources else set())) - set(index.columns)
    if missing:
        raise TrainingDataError(f"{index_path}: missing column(s) {', '.join(sorted(missing))}; rebuild it with "
                                f"`python -m kaggle_i2p.dataset index --work {work}`")
    targets = open_npy(targets_path, "training targets")  # memory-mapped: millions of rows stay on disk
    if targets.ndim != 2 or len(targets) != len(index):
        raise TrainingDataError(f"{targets_path}: shape {targets.shape} does not align with the {len(index)} rows of "
                                f"{index_path}; rebuild both with the dataset's index step")
    folds = index["fold"].to_numpy()
    if validation_prompts is None:
        if val_fold not in set(folds.tolist()):
            raise TrainingDataError(f"{index_path}: no rows in validation fold {val_fold} (folds present: "
                                    f"{sorted(set(folds.tolist()))}); set data.val_fold")
        val_rows = np.flatnonzero(folds == val_fold)
        if max_val_images is not None:
            val_rows = val_rows[:max_val_images]
        training = folds != val_fold
    else:
        val_rows = np.zeros(0, dtype=np.int64)
        training = ~index["prompt"].isin(validation_prompts).to_numpy()
    if sources:
        present = set(index["source"].astype(str).unique().tolist())
        unknown = sorted(set(sources) - present)
        if unknown:
            raise TrainingDataError(f"{index_path}: no rows of source(s) {', '.join(unknown)} (sources present: "
                                    f"{', '.join(sorted(present))}); fix the stage's sources")
        training &= index["source"].astype(str).isin(sources).to_numpy()
    train = index.loc[training, ["prompt"]].assign(row=np.flatnonzero(training))
    if train.empty:
        what = (f"every row is in fold {val_fold}" if validation_prompts is None and not sources
                else "no row is left to train on after the stage's sources and the validation prompts")
        raise TrainingDataError(f"{index_path}: {what}; nothing is left to train on")
    train = train.sort_values(["prompt", "row"], kind="stable")
    counts = train.groupby("prompt", sort=True).size().to_numpy()
    return TrainingData(work=work, ids=np.asarray(index["imgId"].astype(str).tolist(), dtype=str),
                        paths=np.asarray(index["path"].astype(str).tolist(), dtype=str), targets=targets,
                        prompt_offsets=np.concatenate([[0], np.cumsum(counts)]),
                        prompt_rows=train["row"].to_numpy(), val_rows=val_rows)


def epoch_rows(data: TrainingData, seed: int, epoch: int) -> np.ndarray:
    """One image per training prompt (chosen at random when it has several), in a random order; the same for the
    same (seed, epoch) in every process."""
    rng = np.random.default_rng([seed, epoch])
    counts = np.diff(data.prompt_offsets)
    chosen = data.prompt_rows[data.prompt_offsets[:-1] + (rng.random(len(counts)) * counts).astype(np.int64)]
    return chosen[rng.permutation(len(chosen))]


def rank_batches(order: np.ndarray, batch_size: int, world_size: int, rank: int, accumulation: int = 1
                 ) -> list[list[int]]:
    """This process's micro-batches: global batch k is order[k*B*W:(k+1)*B*W] and rank r takes its r-th slice of B,
    so W processes see the same global batches as one process with batch B*W. The tail that does not fill a whole
    optimizer step on every process is left out (it comes back in other epochs' orders)."""
    per_step = batch_size * world_size * accumulation
    usable = (len(order) // per_step) * per_step
    global_batches = order[:usable].reshape(-1, world_size, batch_size)
    return [batch.tolist() for batch in global_batches[:, rank]]


class TrainImages(torch.utils.data.Dataset):
    """Row -> (view, target, row): decode, augment (training only), then inference's own `make_view`.

    A file that fails to decode is replaced by the next row's image (with a warning naming it), so batch sizes and
    the processes' step counts never change and one bad file cannot stop a run.
    """

    def __init__(self, data: TrainingData, spec: ImageSpec, resolution: int, augment: DataConfig | None = None,
                 seed: int = 0, epoch: int = 0):
        self.data, self.spec, self.resolution = data, spec, resolution
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __len__(self) -> int:
        return len(self.data.paths)

    def _decode(self, row: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self.data.paths))):
            candidate = (row + attempt) % len(self.data.paths)
            try:
                return decode_image(self.data.path(candidate)), candidate
            except Exception as err:  # noqa: BLE001 - a bad file is skipped, never fatal
                log.warning("skipping unreadable training image %s (%s: %s)", self.data.path(candidate),
                            type(err).__name__, err)
        raise TrainingDataError(f"{self.data.work}: {MAX_CONSECUTIVE_BAD} images in a row from index row {row} "
                                "cannot be decoded; check the images folder (or rerun the dataset's generate step)")

    def _augmented(self, pixels: torch.Tensor, row: int) -> tuple[torch.Tensor, bool]:
        from torchvision.transforms import v2

        config = self.augment
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1)[0]))
            top, left, height, width = v2.RandomResizedCrop.get_params(pixels, list(config.crop_scale),
                                                                       list(config.crop_ratio))
            pixels = pixels[:, top:top + height, left:left + width]
            if config.color_jitter > 0:
                c = config.color_jitter
                pixels = v2.ColorJitter(brightness=c, contrast=c, saturation=c)(pixels)
            flip = bool(config.hflip and torch.rand(()) < 0.5)
        return pixels, flip

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        pixels, row = self._decode(row)
        flip = False
        if self.augment is not None:
            pixels, flip = self._augmented(pixels, row)
        view = make_view(pixels.unsqueeze(0), self.spec, self.resolution, hflip=flip)[0]
        return view, torch.from_numpy(self.data.unit_targets(row)), row


def loader(dataset: TrainImages, batches: list[list[int]], num_workers: int, pin_memory: bool
           ) -> torch.utils.data.DataLoader:
    """A DataLoader over fixed index batches (their order is the run's order), decoding in worker processes. It
    draws worker seeds from its own generator, so creating it never shifts the global RNG (resumes stay exact)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                                       prefetch_factor=4 if num_workers > 0 else None)
