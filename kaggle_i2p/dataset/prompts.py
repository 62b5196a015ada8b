"""The text steps: collect (files -> prompts with their source) -> clean (whitespace, length in CLIP tokens,
mostly-English, exact duplicates) -> semantic dedup (all-MiniLM-L6-v2, cosine >= 0.9 to an earlier kept prompt) ->
targets (the MiniLM embeddings) -> folds (prompts grouped at cosine >= 0.7, GroupKFold, so no near-duplicate crosses
folds). Each step's output is kept in the work folder and reused when present.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..bank.search import import_faiss
from ..bank.textfiles import DEFAULT_ENCODING, iter_text_batches
from ..core.blocks import blocks
from ..core.errors import I2PError
from ..core.fileio import atomic_open, write_parquet, write_parquet_batches
from ..core.ranks import rank_and_world, rank_device
from ..tuning.folds import group_fold_numbers
from .layout import CLEAN, DEDUP, EMBEDDINGS, PROMPT_INDEX, PROMPT_TARGETS, PROMPTS, TEXT_SETTINGS
from .pairs import (
    NPROBE,
    dense_groups,
    greedy_keep_pairs,
    greedy_rounds,
    ivf_groups,
    join_similar,
    probe_lists,
    similar,
    similar_pairs,
)

# The text steps' defaults, in one place (the CLI and build_dataset.sh pass values only when given).
DEDUP_THRESHOLD = 0.9  # MiniLM cosine to an earlier kept prompt above which a prompt is a duplicate
GROUP_THRESHOLD = 0.7  # prompts this similar share a group, and so a fold
N_FOLDS = 5
SEARCHES = ("auto", "exact", "ivf")
KEPT_CHUNK = 16_384  # exact dedup: kept rows per matrix product
CLEAN_BATCH_ROWS = 65_536  # prompts cleaned at a time (the exact-duplicate set spans the batches)
EMBED_SHARD_ROWS = 100_000  # prompts per embedding shard: the unit of resume and of sharing over ranks
EXACT_UP_TO = 100_000  # `auto` on a CPU: the exact passes up to this many prompts (a few minutes), ivf above

log = logging.getLogger("kaggle_i2p")

CLIP_CONTEXT = 77  # tokens, start and end included; SD truncates longer prompts


def _split_source(source: str) -> tuple[str, str | None]:
    """`PATH` or `PATH:COLUMN` as (path, column or None); a path that exists as given is never split."""
    path, _, column = source.partition(":") if not Path(source).exists() else (source, "", "")
    return path, column or None


def iter_collect(sources: Sequence[str], encoding: str = DEFAULT_ENCODING) -> Iterator[pd.DataFrame]:
    """Prompts from files given as `PATH` or `PATH:COLUMN` (txt, csv, parquet), with the file each came from, a
    batch at a time (a 10M-prompt file is never one list)."""
    for source in sources:
        path, column = _split_source(source)
        count = 0
        for texts in iter_text_batches(path, column, encoding=encoding):
            count += len(texts)
            yield pd.DataFrame({"prompt": texts, "source": Path(path).name})
        log.info("%s: %d prompts", source, count)


def collect(sources: Sequence[str]) -> pd.DataFrame:
    """`iter_collect` in one frame, for small sets."""
    frames = list(iter_collect(sources))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"prompt": [], "source": []})


def ascii_letter_share(text: str) -> float:
    """Share of the letters that are ASCII: a cheap, dependency-free 'mostly English' test."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 0.0


@functools.cache
def _clip_tokenizer():
    """open_clip's CLIP tokenizer, built once (its BPE tables take a moment)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clean(frame: pd.DataFrame, min_words: int = 3, max_tokens: int = CLIP_CONTEXT, min_ascii: float = 0.9,
          seen: set[str] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise whitespace and drop empty, too short (< min_words), too long (> max_tokens CLIP tokens with start
    and end), mostly non-English and exactly repeated prompts (case-insensitive); returns the rest and the counts.
    `seen`: the lower-cased prompts kept from earlier batches of a stream (updated with this batch's)."""
    tokenizer = _clip_tokenizer()
    prompts = frame["prompt"].astype(str).map(lambda t: " ".join(t.split()))
    reasons = pd.Series("", index=frame.index)
    reasons[prompts.str.len() == 0] = "empty"
    words = prompts.map(lambda t: len(re.findall(r"\w+", t)))
    reasons[(reasons == "") & (words < min_words)] = "too_short"
    tokens = prompts.map(lambda t: len(tokenizer.encode(t)) + 2)
    reasons[(reasons == "") & (tokens > max_tokens)] = "too_long"
    reasons[(reasons == "") & (prompts.map(ascii_letter_share) < min_ascii)] = "non_english"
    lowered = prompts.str.lower()
    repeated = lowered.duplicated() | (lowered.isin(seen) if seen else False)
    reasons[(reasons == "") & repeated] = "exact_duplicate"
    if seen is not None:
        seen.update(lowered[reasons == ""])
    counts = {r: int((reasons == r).sum()) for r in ("empty", "too_short", "too_long", "non_english",
                                                      "exact_duplicate")}
    kept = frame.assign(prompt=prompts)[reasons == ""].reset_index(drop=True)
    return kept, counts


def semantic_dedup(embeddings: np.ndarray, threshold: float = DEDUP_THRESHOLD, block: int = 4096,
                   device: str = "cpu", probes: np.ndarray | None = None) -> np.ndarray:
    """Keep mask: a prompt is dropped when its cosine to an earlier kept prompt is >= threshold (greedy, in order).

    Exact: block by block against the kept set (chunked matmuls on `device`), never an N x N matrix, each block's rows
    decided with tensor ops (`greedy_keep`). With `probes` (`pairs.probe_lists`), the similar pairs are looked for
    only within the inverted lists each prompt probes and the same greedy runs over them: for large sets on a CPU.
    """
    if probes is not None:
        return greedy_keep_pairs(len(embeddings), *similar_pairs(embeddings, probes, threshold, device))
    vectors = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device)
    keep = np.zeros(len(vectors), dtype=bool)
    kept_rows: list[torch.Tensor] = []
    for rows in blocks(len(vectors), block):
        current = vectors[rows.start:rows.stop]
        blocked = torch.zeros(len(current), dtype=torch.bool, device=device)
        for kept in kept_rows:
            blocked |= similar(current, kept, threshold).any(dim=1)
        chosen = greedy_keep(similar(current, current, threshold), ~blocked)
        keep[rows.start:rows.stop] = chosen.cpu().numpy()
        if chosen.any():  # kept rows in chunks of up to KEPT_CHUNK: fewer, larger matrix products
            if kept_rows and len(kept_rows[-1]) + int(chosen.sum()) <= KEPT_CHUNK:
                kept_rows[-1] = torch.cat([kept_rows[-1], current[chosen]])
            else:
                kept_rows.append(current[chosen])
    return keep


def greedy_keep(close: torch.Tensor, open_rows: torch.Tensor) -> torch.Tensor:
    """The greedy in-order decisions inside a block (`pairs.greedy_rounds`, with dense matrix-vector products)."""
    earlier = torch.tril(close, diagonal=-1).float()  # earlier[i, j]: row j comes before row i and is similar
    return greedy_rounds(lambda mask: earlier @ mask.float() > 0, open_rows)


def similarity_groups(embeddings: np.ndarray, threshold: float = GROUP_THRESHOLD, block: int = 4096,
                      device: str = "cpu", probes: np.ndarray | None = None) -> np.ndarray:
    """Group ids: connected components of the graph 'cosine >= threshold', numbered in order of each group's first
    row. Exact: chunked matmuls over all block pairs into a vectorised union-find (`pairs.join_similar`); with
    `probes`, only the pairs within probed inverted lists (`pairs.ivf_groups`)."""
    if probes is not None:
        return ivf_groups(embeddings, probes, threshold, device)
    vectors = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device)
    parent = np.arange(len(vectors))
    for left in blocks(len(vectors), block):
        for right in blocks(len(vectors), block):
            if right.start < left.start:
                continue
            close = similar(vectors[left.start:left.stop], vectors[right.start:right.stop], threshold)
            join_similar(parent, np.arange(left.start, left.stop), np.arange(right.start, right.stop), close,
                         vectors.shape[1])
    return dense_groups(parent)


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


def check_text_options(dedup_threshold: float, group_threshold: float, n_folds: int, search: str, nprobe: int,
                       batch_size: int | None) -> None:
    """The text step's options, all checked at once before any file is read."""
    problems = []
    for name, value in (("--dedup-threshold", dedup_threshold), ("--group-threshold", group_threshold)):
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            problems.append(f"{name} {value!r}: a cosine similarity in (0, 1], e.g. {DEDUP_THRESHOLD} for dedup and "
                            f"{GROUP_THRESHOLD} for groups")
    if not (isinstance(n_folds, int) and n_folds >= 2):
        problems.append(f"--folds {n_folds}: at least 2 folds are needed (one held out, the rest to train on)")
    if search not in SEARCHES:
        problems.append(f"--search {search!r}: choose {', '.join(SEARCHES)}")
    if not (isinstance(nprobe, int) and nprobe >= 1):
        problems.append(f"--nprobe {nprobe!r}: a whole number >= 1")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        problems.append(f"--batch-size {batch_size!r}: a whole number >= 1")
    if problems:
        raise DatasetError("; ".join(problems))


def text_settings(sources: Sequence[str], dedup_threshold: float, group_threshold: float, n_folds: int,
                  encoding: str = DEFAULT_ENCODING) -> dict:
    """What decides the text step's outputs: each source file (as given, with its size and modification time) and
    the thresholds and folds."""
    files = []
    for source in sources:
        path, column = _split_source(source)
        stat = Path(path).stat() if Path(path).is_file() else None
        files.append({"source": source, "path": str(Path(path).resolve()), "column": column,
                      "size": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None})
    return {"sources": files, "dedup_threshold": dedup_threshold, "group_threshold": group_threshold,
            "folds": n_folds, **({"encoding": encoding} if encoding != DEFAULT_ENCODING else {})}


def check_text_settings(work: Path, settings: dict) -> None:
    """A work folder's text step belongs to one set of inputs and settings (WORK/text.json): a rerun with the same
    resumes, one with others is refused naming the old ones. A folder from before text.json is checked by its
    prompts' source file names. Reads only: `record_text_settings` writes."""
    path = work / TEXT_SETTINGS
    fix = "rerun with those, or give this input a new --work folder"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DatasetError(f"{path} is damaged ({err}); give this input a new --work folder") from err
        if stored != settings:
            old = ", ".join(f["source"] for f in stored.get("sources", []))
            differ = [k for k in settings if stored.get(k) != settings[k]]
            raise DatasetError(f"{work} holds the text step of {old or 'other inputs'} (settings differ in "
                               f"{', '.join(differ)}: a file changed, or other files or thresholds were given); its "
                               f"prompts, images and targets belong to those: {fix}")
        return
    if (work / PROMPTS).is_file():  # made before text.json existed
        import pyarrow.parquet as pq

        had = sorted(set(pq.read_table(work / PROMPTS, columns=["source"]).column(0).to_pylist()))
        given = sorted({Path(f["path"]).name for f in settings["sources"]})
        if had and had != given:
            raise DatasetError(f"{work} holds the text step of {', '.join(had)}, and this run gives "
                               f"{', '.join(given)}: {fix}")


def record_text_settings(work: Path, settings: dict) -> None:
    """WORK/text.json, written once the prompts are collected (a failed collect leaves no settings behind)."""
    if not (work / TEXT_SETTINGS).is_file():
        with atomic_open(work / TEXT_SETTINGS, "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=1)


def run_text_steps(sources: Sequence[str], work: str | Path, dedup_threshold: float = DEDUP_THRESHOLD,
                   group_threshold: float = GROUP_THRESHOLD, n_folds: int = N_FOLDS, device: str | None = None,
                   search: str = "auto", nprobe: int = NPROBE, batch_size: int | None = None,
                   encoding: str = DEFAULT_ENCODING) -> Path | None:
    """collect -> clean -> embed -> dedup -> groups and folds; each step's output is kept and reused when present.

    Under torchrun every rank embeds its shards of the clean prompts; rank 0 goes on with dedup, groups and folds
    and returns the prompt index, the others return None.
    `device`: None for the rank's GPU when there is one. `search`: `exact`, `ivf` (similar pairs within probed
    inverted lists, `pairs.py`) or `auto` (exact on a GPU or up to EXACT_UP_TO prompts, else ivf when FAISS is
    installed).
    """
    # 1. everything that can be wrong, before any file is read or any compute
    work = Path(work)
    check_text_options(dedup_threshold, group_threshold, n_folds, search, nprobe, batch_size)
    if search == "ivf":
        import_faiss()
    rank, _, local_rank = rank_and_world()
    device = device or rank_device(local_rank)

    # 2. collect and clean: rank 0 (the others wait for its file)
    if rank == 0:
        settings = text_settings(sources, dedup_threshold, group_threshold, n_folds, encoding)
        check_text_settings(work, settings)
        collect_step(sources, work, n_folds, encoding)
        record_text_settings(work, settings)
        clean_step(work)
    else:
        _wait_for(work / CLEAN, "rank 0's clean step")

    # 3. MiniLM embeddings, 4. semantic dedup and the targets
    probes = None  # the inverted lists of --search ivf, kept for step 5 when step 4 ran in this process
    if not (work / DEDUP).is_file() or not (work / PROMPT_TARGETS).is_file():
        embeddings = embed_step(work, device, batch_size, rank)
        if embeddings is None:
            return None  # this rank's shards are done; rank 0 goes on
        if _choose_search(search, len(embeddings), device) == "ivf":
            probes = probe_lists(embeddings, nprobe=nprobe)
        keep = dedup_step(work, embeddings, dedup_threshold, device, probes)
        probes = None if probes is None else probes[keep]
        shutil.rmtree(work / EMBEDDINGS, ignore_errors=True)  # the kept rows are in the targets now

    # 5. similarity groups and folds
    if not (work / PROMPT_INDEX).is_file():
        folds_step(work, group_threshold, n_folds, device, search, nprobe, probes)
    return work / PROMPT_INDEX


def _choose_search(search: str, rows: int, device: str) -> str:
    """`auto` resolved: exact on a GPU or up to EXACT_UP_TO rows; else ivf when FAISS is installed."""
    if search != "auto":
        return search
    if device.startswith("cuda") or rows <= EXACT_UP_TO:
        return "exact"
    try:
        import_faiss()
    except I2PError:
        log.warning("%d prompts on the CPU without FAISS: the exact similarity passes are quadratic (hours at a "
                    "million); pip install 'kaggle_i2p[index]' for --search ivf", rows)
        return "exact"
    return "ivf"


def _wait_for(path: Path, what: str) -> None:
    """Wait for a file another process writes (logged once a minute)."""
    waited = 0
    while not path.is_file():
        if waited % 60 == 0:
            log.info("waiting for %s (%s)", path, what)
        time.sleep(1)
        waited += 1


def collect_step(sources: Sequence[str], work: Path, n_folds: int, encoding: str = DEFAULT_ENCODING) -> None:
    """1. The prompts of every source file, with the file each came from, streamed into prompts.parquet."""
    if (work / PROMPTS).is_file():
        return
    missing = [s for s in sources if not Path(s).exists() and not Path(s.partition(":")[0]).is_file()]
    if missing:
        raise DatasetError(f"prompt file(s) not found: {', '.join(missing)} (give PATH or PATH:COLUMN)")
    work.mkdir(parents=True, exist_ok=True)

    def counted() -> Iterator[pd.DataFrame]:
        rows = 0
        for frame in iter_collect(sources, encoding):
            rows += len(frame)
            yield frame
        if rows < n_folds:  # fail before the embedding, not after (and leave no prompts.parquet)
            raise DatasetError(f"{rows} prompts collected from {', '.join(sources)}; {n_folds} folds need at least "
                               f"{n_folds}: add prompts or lower FOLDS / --folds")

    write_parquet_batches(counted(), work / PROMPTS, ["prompt", "source"])


def clean_step(work: Path) -> None:
    """2. Whitespace, length, language and exact duplicates (see `clean`), a batch at a time."""
    if (work / CLEAN).is_file():
        return
    import pyarrow.parquet as pq

    seen: set[str] = set()
    dropped: Counter = Counter()

    def cleaned() -> Iterator[pd.DataFrame]:
        for batch in pq.ParquetFile(work / PROMPTS).iter_batches(batch_size=CLEAN_BATCH_ROWS):
            kept, counts = clean(batch.to_pandas(), seen=seen)
            dropped.update(counts)
            yield kept

    kept = write_parquet_batches(cleaned(), work / CLEAN, ["prompt", "source"])
    log.info("clean: kept %d, dropped %s", kept, dict(dropped))


def embed_step(work: Path, device: str, batch_size: int | None, rank: int) -> np.ndarray | None:
    """3. The MiniLM embeddings of the clean prompts, float32, in row order: built as a bank in shards (streamed,
    resumable, shared over ranks; see bankbuild). Rank 0 goes on (waiting for the rank that finishes the last shard
    to assemble them); the others return None once their shards are done."""
    from ..bank.build import build_bank
    from ..bank.folder import BANK_MARKER, Bank

    bank = build_bank(work / CLEAN, work / EMBEDDINGS, column="prompt", device=device, batch_size=batch_size,
                      shard_rows=EMBED_SHARD_ROWS, dtype="float32")
    if rank != 0:
        return None
    if bank is None:
        _wait_for(work / EMBEDDINGS / BANK_MARKER, "the embeddings, assembled by the rank that finishes last")
    embeddings = np.array(Bank.open(work / EMBEDDINGS).targets)  # read into memory, once
    import pyarrow.parquet as pq

    if len(embeddings) != pq.ParquetFile(work / CLEAN).metadata.num_rows:  # the footer, not 10M strings
        raise DatasetError(f"{work / EMBEDDINGS} does not match {work / CLEAN}; remove it and rerun")
    return embeddings


def dedup_step(work: Path, embeddings: np.ndarray, threshold: float, device: str, probes: np.ndarray | None
               ) -> np.ndarray:
    """4. Semantic dedup (through the IVF `probes` when given); the kept prompts and their embeddings (the training
    targets). Returns the keep mask."""
    keep = semantic_dedup(embeddings, threshold, device=device, probes=probes)
    log.info("semantic dedup at cosine %.2f (%s): kept %d of %d", threshold, "exact" if probes is None else "ivf",
             keep.sum(), len(keep))
    with atomic_open(work / PROMPT_TARGETS, "wb") as handle:
        np.save(handle, embeddings[keep])
    write_parquet(pd.read_parquet(work / CLEAN)[keep].reset_index(drop=True), work / DEDUP)
    return keep


def folds_step(work: Path, threshold: float, n_folds: int, device: str, search: str, nprobe: int,
               probes: np.ndarray | None = None) -> None:
    """5. Prompt ids, similarity groups and the folds (every group in one fold); `probes`: step 4's inverted lists
    of the kept rows, when it ran in this process with --search ivf."""
    frame = pd.read_parquet(work / DEDUP)
    targets = np.load(work / PROMPT_TARGETS)
    if probes is None and _choose_search(search, len(targets), device) == "ivf":
        probes = probe_lists(targets, nprobe=nprobe)
    groups = similarity_groups(targets, threshold, device=device, probes=probes)
    log.info("similarity groups at cosine %.2f (%s): %d groups of %d prompts", threshold,
             "exact" if probes is None else "ivf", groups.max() + 1, len(groups))
    frame = frame.assign(promptId=[f"p{i:08d}" for i in range(len(frame))], group=groups,
                         fold=assign_folds(groups, n_folds))
    write_parquet(frame[["promptId", "prompt", "source", "group", "fold"]], work / PROMPT_INDEX)
