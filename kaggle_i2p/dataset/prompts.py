"""The text steps: collect (files -> prompts with their source) -> clean (whitespace, length in CLIP tokens,
mostly-English, exact duplicates) -> semantic dedup (all-MiniLM-L6-v2, cosine >= 0.9 to an earlier kept prompt) ->
targets (the MiniLM embeddings) -> folds (prompts grouped at cosine >= 0.7, GroupKFold, so no near-duplicate crosses
folds). Each step's output is kept in the work folder and reused when present.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..blocks import blocks
from ..errors import I2PError
from ..fileio import atomic_open, write_parquet
from ..folds import group_fold_numbers
from ..textfiles import read_texts
from .layout import CLEAN, DEDUP, PROMPT_INDEX, PROMPT_TARGETS, PROMPTS

# The text steps' defaults, in one place (the CLI and build_dataset.sh pass values only when given).
DEDUP_THRESHOLD = 0.9  # MiniLM cosine to an earlier kept prompt above which a prompt is a duplicate
GROUP_THRESHOLD = 0.7  # prompts this similar share a group, and so a fold
N_FOLDS = 5

log = logging.getLogger("kaggle_i2p")

CLIP_CONTEXT = 77  # tokens, start and end included; SD truncates longer prompts


def collect(sources: Sequence[str]) -> pd.DataFrame:
    """Prompts from files given as `PATH` or `PATH:COLUMN` (txt, csv, parquet), with the file each came from."""
    frames = []
    for source in sources:
        path, _, column = source.partition(":") if not Path(source).exists() else (source, "", "")
        texts = read_texts(path, column or None)
        frames.append(pd.DataFrame({"prompt": texts, "source": Path(path).name}))
        log.info("%s: %d prompts", source, len(texts))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"prompt": [], "source": []})


def ascii_letter_share(text: str) -> float:
    """Share of the letters that are ASCII: a cheap, dependency-free 'mostly English' test."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 0.0


def clean(frame: pd.DataFrame, min_words: int = 3, max_tokens: int = CLIP_CONTEXT, min_ascii: float = 0.9
          ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise whitespace and drop empty, too short (< min_words), too long (> max_tokens CLIP tokens with start
    and end), mostly non-English and exactly repeated prompts (case-insensitive); returns the rest and the counts."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    prompts = frame["prompt"].astype(str).map(lambda t: " ".join(t.split()))
    reasons = pd.Series("", index=frame.index)
    reasons[prompts.str.len() == 0] = "empty"
    words = prompts.map(lambda t: len(re.findall(r"\w+", t)))
    reasons[(reasons == "") & (words < min_words)] = "too_short"
    tokens = prompts.map(lambda t: len(tokenizer.encode(t)) + 2)
    reasons[(reasons == "") & (tokens > max_tokens)] = "too_long"
    reasons[(reasons == "") & (prompts.map(ascii_letter_share) < min_ascii)] = "non_english"
    reasons[(reasons == "") & prompts.str.lower().duplicated()] = "exact_duplicate"
    counts = {r: int((reasons == r).sum()) for r in ("empty", "too_short", "too_long", "non_english",
                                                      "exact_duplicate")}
    kept = frame.assign(prompt=prompts)[reasons == ""].reset_index(drop=True)
    return kept, counts


def semantic_dedup(embeddings: np.ndarray, threshold: float = DEDUP_THRESHOLD, block: int = 4096,
                   device: str = "cpu") -> np.ndarray:
    """Keep mask: a prompt is dropped when its cosine to an earlier kept prompt is >= threshold (greedy, in order).

    Works block by block against the kept set (chunked matmuls on `device`), never an N x N matrix, and decides each
    block's rows with tensor ops (`greedy_keep`), not a loop over its rows.
    """
    vectors = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device)
    keep = np.zeros(len(vectors), dtype=bool)
    kept_rows: list[torch.Tensor] = []
    for rows in blocks(len(vectors), block):
        current = vectors[rows.start:rows.stop]
        blocked = torch.zeros(len(current), dtype=torch.bool, device=device)
        for kept in kept_rows:
            blocked |= (current @ kept.T >= threshold).any(dim=1)
        chosen = greedy_keep(current @ current.T >= threshold, ~blocked)
        keep[rows.start:rows.stop] = chosen.cpu().numpy()
        if chosen.any():
            kept_rows.append(current[chosen])
    return keep


def greedy_keep(similar: torch.Tensor, open_rows: torch.Tensor) -> torch.Tensor:
    """The greedy in-order decisions inside a block: row i is kept when it is open and no earlier kept row is
    similar to it. Decided in rounds of two matrix-vector products: a row is dropped once an earlier similar row is
    kept, and kept once every earlier similar row is decided and none was kept; the earliest undecided row is always
    decided, so the rounds end (after as many as the longest chain of similar rows, usually a few)."""
    earlier = torch.tril(similar, diagonal=-1).float()  # earlier[i, j]: row j comes before row i and is similar
    undecided, kept = open_rows.clone(), torch.zeros_like(open_rows)
    while undecided.any():
        has_kept = (earlier @ kept.float()) > 0
        waiting = (earlier @ undecided.float()) > 0
        kept = kept | (undecided & ~has_kept & ~waiting)
        undecided = undecided & ~has_kept & waiting
    return kept


def _find_roots(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The union-find roots of `rows`, by pointer jumping (every parent is at most its row)."""
    roots = parent[rows]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def similarity_groups(embeddings: np.ndarray, threshold: float = GROUP_THRESHOLD, block: int = 4096,
                      device: str = "cpu") -> np.ndarray:
    """Group ids: connected components of the graph 'cosine >= threshold' (chunked matmuls; a vectorised union-find
    hooks each pair's larger root under its smaller one, so a group's root is its first row)."""
    vectors = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device)
    parent = np.arange(len(vectors))
    for left in blocks(len(vectors), block):
        for right in blocks(len(vectors), block):
            if right.start < left.start:
                continue
            pairs = torch.nonzero(vectors[left.start:left.stop] @ vectors[right.start:right.stop].T >= threshold)
            pairs = pairs.cpu().numpy()
            a, b = pairs[:, 0] + left.start, pairs[:, 1] + right.start
            while len(a):
                root_a, root_b = _find_roots(parent, a), _find_roots(parent, b)
                parent[a], parent[b] = root_a, root_b  # path compression: the next finds are one step
                apart = root_a != root_b
                a, b = a[apart], b[apart]
                low, high = np.minimum(root_a[apart], root_b[apart]), np.maximum(root_a[apart], root_b[apart])
                np.minimum.at(parent, high, low)  # several pairs may hook one root: the smallest wins, others retry
    roots = _find_roots(parent, np.arange(len(parent)))
    return np.unique(roots, return_inverse=True)[1]  # dense group numbers in order of each group's first row


class DatasetError(I2PError, ValueError):
    """A dataset step that cannot run as asked (too few prompts for the folds, a missing source file)."""


def assign_folds(groups: np.ndarray, n_folds: int = N_FOLDS) -> np.ndarray:
    """A fold per row with scikit-learn's GroupKFold: every group lies in exactly one fold."""
    n_groups = len(np.unique(groups))
    if n_folds < 2 or n_groups < n_folds:
        raise DatasetError(f"{n_folds} folds need at least {max(n_folds, 2)} groups of prompts, and the prompts left "
                           f"after cleaning and dedup form {n_groups} ({len(groups)} prompts, grouped at the "
                           "similarity threshold); add prompts or lower FOLDS / --folds (at least 2)")
    return group_fold_numbers(groups, n_folds)


def run_text_steps(sources: Sequence[str], work: str | Path, dedup_threshold: float = DEDUP_THRESHOLD,
                   group_threshold: float = GROUP_THRESHOLD, n_folds: int = N_FOLDS, device: str = "cpu") -> Path:
    """collect -> clean -> dedup -> targets -> folds; each step's output is kept and reused when present."""
    from ..text import embed_prompts

    work = Path(work)
    if n_folds < 2:
        raise DatasetError(f"--folds {n_folds}: at least 2 folds are needed (one held out, the rest to train on)")
    if not (work / PROMPTS).is_file():
        missing = [s for s in sources if not Path(s).exists() and not Path(s.partition(":")[0]).is_file()]
        if missing:
            raise DatasetError(f"prompt file(s) not found: {', '.join(missing)} (give PATH or PATH:COLUMN)")
        write_parquet(collect(sources), work / PROMPTS)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / CLEAN).is_file():
        collected = pd.read_parquet(work / PROMPTS)
        if len(collected) < n_folds:  # fail before the embedding, not after
            raise DatasetError(f"{len(collected)} prompts collected from {', '.join(sources)}; {n_folds} folds need "
                               f"at least {n_folds}: add prompts or lower FOLDS / --folds")
        kept, dropped = clean(collected)
        log.info("clean: kept %d, dropped %s", len(kept), dropped)
        write_parquet(kept, work / CLEAN)
    if not (work / DEDUP).is_file() or not (work / PROMPT_TARGETS).is_file():
        frame = pd.read_parquet(work / CLEAN)
        embeddings = embed_prompts(frame["prompt"].tolist(), device=device, progress=True)
        keep = semantic_dedup(embeddings, dedup_threshold, device=device)
        log.info("semantic dedup at cosine %.2f: kept %d of %d", dedup_threshold, keep.sum(), len(keep))
        with atomic_open(work / PROMPT_TARGETS, "wb") as handle:
            np.save(handle, embeddings[keep])
        write_parquet(frame[keep].reset_index(drop=True), work / DEDUP)
    if not (work / PROMPT_INDEX).is_file():
        frame = pd.read_parquet(work / DEDUP)
        targets = np.load(work / PROMPT_TARGETS)
        groups = similarity_groups(targets, group_threshold, device=device)
        frame = frame.assign(promptId=[f"p{i:08d}" for i in range(len(frame))], group=groups,
                             fold=assign_folds(groups, n_folds))
        write_parquet(frame[["promptId", "prompt", "source", "group", "fold"]], work / PROMPT_INDEX)
    return work / PROMPT_INDEX
