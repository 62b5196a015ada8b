"""The text-map head (`head.init: text_map`, the 7th place's start): a `Linear(clip_dim, 384)` fitted by ridge
least squares from the training prompts' CLIP text embeddings to their MiniLM targets, which becomes the image
tower's head before fine-tuning (CLIP puts an image and its prompt close together, so the map is a head that already
points the right way).

Both embeddings stream in batches: the fit keeps only XᵀX (clip_dim²) and XᵀY (clip_dim x 384) in float64, so 6M
prompts cost one pass of the CLIP text tower and no memory beyond a batch. The map has no bias, so it is the same map
for any scale of its input (the image features are not unit vectors). `ridge` is relative: λ = ridge x the mean
diagonal of XᵀX. The map's own validation cosine (validation prompts' text -> their targets) is reported, so the
user sees what the head starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..core.ensemble import l2_normalize
from .config import TextMapConfig
from .data import TrainingData

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class TextMap:
    """A fitted map: `weight` is the head's (384, clip_dim) weight; the prompts it was fitted on and its cosine on
    the validation prompts."""

    weight: np.ndarray
    prompts: int
    val_cosine: float
    val_prompts: int


def fit_ridge(batches: Iterable[tuple[np.ndarray, np.ndarray]], ridge: float) -> np.ndarray:
    """argmin_W |XW - Y|² + λ|W|² over streamed (X, Y) batches, λ = ridge x mean(diag XᵀX): (clip_dim, D)."""
    xtx = xty = None
    for x, y in batches:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        xtx = x.T @ x if xtx is None else xtx + x.T @ x
        xty = x.T @ y if xty is None else xty + x.T @ y
    if xtx is None:
        raise ValueError("no prompts to fit the text map on")
    lam = ridge * float(np.trace(xtx)) / len(xtx)
    return np.linalg.lstsq(xtx + lam * np.eye(len(xtx)), xty, rcond=None)[0]


def map_cosine(batches: Iterable[tuple[np.ndarray, np.ndarray]], weight: np.ndarray) -> tuple[float, int]:
    """Mean cosine of (X W) to Y over streamed batches, and how many rows."""
    total, count = 0.0, 0
    for x, y in batches:
        predicted = l2_normalize(np.asarray(x, dtype=np.float64) @ weight)
        total += float(np.sum(predicted * l2_normalize(np.asarray(y, dtype=np.float64))))
        count += len(y)
    return total / max(count, 1), count


def training_prompts(datasets: Iterable[TrainingData], seed: int, max_prompts: int | None
                     ) -> list[tuple[TrainingData, np.ndarray]]:
    """One row per training prompt of each distinct dataset (a seeded sample of `max_prompts` in all, when set)."""
    unique = list({id(d): d for d in datasets}.values())
    chosen = [(d, d.prompt_rows[d.prompt_offsets[:-1]]) for d in unique]
    total = sum(len(rows) for _, rows in chosen)
    if max_prompts is None or max_prompts >= total:
        return chosen
    keep = np.sort(np.random.default_rng([seed, 7]).choice(total, size=max_prompts, replace=False))
    out, start = [], 0
    for data, rows in chosen:
        mine = keep[(keep >= start) & (keep < start + len(rows))] - start
        out.append((data, rows[mine]))
        start += len(rows)
    return out


def embedded_batches(sets: Iterable[tuple[TrainingData, np.ndarray]], embed: Embed, batch_size: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(CLIP text embeddings, unit MiniLM targets) of those rows, a batch at a time."""
    for data, rows in sets:
        texts = data.prompts(rows)
        for start in range(0, len(rows), batch_size):
            yield embed(texts[start:start + batch_size]), data.unit_targets(rows[start:start + batch_size])


def fit_text_map(config: TextMapConfig, datasets: list[TrainingData], validation: TrainingData, device: str,
                 seed: int = 0, embed: Embed | None = None) -> TextMap:
    """Fit the head's map from the run's training prompts and score it on the validation prompts."""
    if embed is None:
        from ..bank.build import clip_embedder

        embed = clip_embedder(config.clip_arch, config.clip_checkpoint, device, config.batch_size)
    sets = training_prompts(datasets, seed, config.max_prompts)
    weight = fit_ridge(embedded_batches(sets, embed, config.batch_size), config.ridge)
    val_rows = np.unique(validation.val_rows)
    cosine, count = map_cosine(embedded_batches([(validation, val_rows)], embed, config.batch_size), weight)
    return TextMap(weight.T.astype(np.float32), sum(len(r) for _, r in sets), cosine, count)
