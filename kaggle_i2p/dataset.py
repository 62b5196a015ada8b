"""Building a training set from prompt sources, one resumable step at a time (the data side of build_dataset.sh).

collect (files -> prompts with their source) -> clean (whitespace, length in CLIP tokens, mostly-English, exact
duplicates) -> semantic dedup (all-MiniLM-L6-v2, cosine >= 0.9 to an earlier kept prompt) -> targets (the MiniLM
embeddings) -> folds (prompts grouped at cosine >= 0.7, GroupKFold, so no near-duplicate crosses folds)
-> generate (SD2 images, sharded over ranks, see generate.py) -> index (one row per image that exists).
Every step reads and writes files in one work folder, so each can run alone and a finished step is never redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_open
from .errors import I2PError
from .retrieval import read_texts

log = logging.getLogger("kaggle_i2p")

CLIP_CONTEXT = 77  # tokens, start and end included; SD truncates longer prompts
PROMPTS, CLEAN, DEDUP = "prompts.parquet", "clean.parquet", "dedup.parquet"
PROMPT_TARGETS, PROMPT_INDEX = "prompt_targets.npy", "prompt_index.parquet"  # one row per kept prompt
INDEX, TARGETS, IMAGES = "index.parquet", "targets.npy", "images"  # one row per generated image


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


def _blocks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def semantic_dedup(embeddings: np.ndarray, threshold: float = 0.9, block: int = 4096,
                   device: str = "cpu") -> np.ndarray:
    """Keep mask: a prompt is dropped when its cosine to an earlier kept prompt is >= threshold (greedy, in order).

    Works block by block against the kept set (chunked matmuls on `device`), never an N x N matrix.
    """
    vectors = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device)
    keep = np.zeros(len(vectors), dtype=bool)
    kept_rows: list[torch.Tensor] = []
    for rows in _blocks(len(vectors), block):
        current = vectors[rows.start:rows.stop]
        blocked = torch.zeros(len(current), dtype=torch.bool, device=device)
        for kept in kept_rows:
            blocked |= (current @ kept.T >= threshold).any(dim=1)
        within = current @ current.T >= threshold  # duplicates inside the block: earlier kept rows win
        chosen = []
        for i in range(len(current)):
            if not blocked[i] and not any(within[i, j] for j in chosen):
                chosen.append(i)
        keep[[rows.start + i for i in chosen]] = True
        if chosen:
            kept_rows.append(current[chosen])
    return keep


def similarity_groups(embeddings: np.ndarray, threshold: float = 0.7, block: int = 4096,
                      device: str = "cpu") -> np.ndarray:
    """Group ids: connected components of the graph 'cosine >= threshold' (union-find over chunked matmuls)."""
    vectors = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(device)
    parent = np.arange(len(vectors))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for left in _blocks(len(vectors), block):
        for right in _blocks(len(vectors), block):
            if right.start < left.start:
                continue
            pairs = torch.nonzero(vectors[left.start:left.stop] @ vectors[right.start:right.stop].T >= threshold)
            for a, b in pairs.cpu().numpy():
                root_a, root_b = find(left.start + int(a)), find(right.start + int(b))
                if root_a != root_b:
                    parent[max(root_a, root_b)] = min(root_a, root_b)
    roots = np.array([find(i) for i in range(len(vectors))])
    return np.unique(roots, return_inverse=True)[1]  # dense group numbers in order of first appearance's root


class DatasetError(I2PError, ValueError):
    """A dataset step that cannot run as asked (too few prompts for the folds, a missing source file)."""


def assign_folds(groups: np.ndarray, n_folds: int = 5) -> np.ndarray:
    """A fold per row with scikit-learn's GroupKFold: every group lies in exactly one fold."""
    n_groups = len(np.unique(groups))
    if n_folds < 2 or n_groups < n_folds:
        raise DatasetError(f"{n_folds} folds need at least {max(n_folds, 2)} groups of prompts, and the prompts left "
                           f"after cleaning and dedup form {n_groups} ({len(groups)} prompts, grouped at the "
                           "similarity threshold); add prompts or lower FOLDS / --folds (at least 2)")
    from sklearn.model_selection import GroupKFold

    folds = np.full(len(groups), -1, dtype=int)
    for fold, (_, held_out) in enumerate(GroupKFold(n_splits=n_folds).split(np.zeros(len(groups)), groups=groups)):
        folds[held_out] = fold
    return folds


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        frame.to_parquet(handle, index=False)


def run_text_steps(sources: Sequence[str], work: str | Path, dedup_threshold: float = 0.9,
                   group_threshold: float = 0.7, n_folds: int = 5, device: str = "cpu") -> Path:
    """collect -> clean -> dedup -> targets -> folds; each step's output is kept and reused when present."""
    from .text import embed_prompts

    work = Path(work)
    if n_folds < 2:
        raise DatasetError(f"--folds {n_folds}: at least 2 folds are needed (one held out, the rest to train on)")
    if not (work / PROMPTS).is_file():
        missing = [s for s in sources if not Path(s).exists() and not Path(s.partition(":")[0]).is_file()]
        if missing:
            raise DatasetError(f"prompt file(s) not found: {', '.join(missing)} (give PATH or PATH:COLUMN)")
        _write_parquet(collect(sources), work / PROMPTS)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / CLEAN).is_file():
        collected = pd.read_parquet(work / PROMPTS)
        if len(collected) < n_folds:  # fail before the embedding, not after
            raise DatasetError(f"{len(collected)} prompts collected from {', '.join(sources)}; {n_folds} folds need "
                               f"at least {n_folds}: add prompts or lower FOLDS / --folds")
        kept, dropped = clean(collected)
        log.info("clean: kept %d, dropped %s", len(kept), dropped)
        _write_parquet(kept, work / CLEAN)
    if not (work / DEDUP).is_file() or not (work / PROMPT_TARGETS).is_file():
        frame = pd.read_parquet(work / CLEAN)
        embeddings = embed_prompts(frame["prompt"].tolist(), device=device, progress=True)
        keep = semantic_dedup(embeddings, dedup_threshold, device=device)
        log.info("semantic dedup at cosine %.2f: kept %d of %d", dedup_threshold, keep.sum(), len(keep))
        with atomic_open(work / PROMPT_TARGETS, "wb") as handle:
            np.save(handle, embeddings[keep])
        _write_parquet(frame[keep].reset_index(drop=True), work / DEDUP)
    if not (work / PROMPT_INDEX).is_file():
        frame = pd.read_parquet(work / DEDUP)
        targets = np.load(work / PROMPT_TARGETS)
        groups = similarity_groups(targets, group_threshold, device=device)
        frame = frame.assign(promptId=[f"p{i:08d}" for i in range(len(frame))], group=groups,
                             fold=assign_folds(groups, n_folds))
        _write_parquet(frame[["promptId", "prompt", "source", "group", "fold"]], work / PROMPT_INDEX)
    return work / PROMPT_INDEX


def write_image_index(work: str | Path, image_format: str = "png") -> Path:
    """index.parquet (imgId, prompt, source, path, seed, group, fold; sorted by imgId) and targets.npy aligned to
    it, for every generated image on disk; the evaluate/tune commands and the trainer read these directly."""
    from .generate import image_jobs

    work = Path(work)
    prompts = pd.read_parquet(work / PROMPT_INDEX)
    targets = np.load(work / PROMPT_TARGETS)
    rows = []
    for job in image_jobs(prompts, _images_per_prompt(work)):
        path = work / IMAGES / f"{job.image_id}.{image_format}"
        if path.is_file():
            prompt = prompts.iloc[job.prompt_row]
            rows.append({"imgId": job.image_id, "prompt": prompt["prompt"], "source": prompt["source"],
                         "path": str(path.relative_to(work)), "seed": job.seed, "group": int(prompt["group"]),
                         "fold": int(prompt["fold"]), "prompt_row": job.prompt_row})
    index = pd.DataFrame(rows).sort_values("imgId", ignore_index=True)
    with atomic_open(work / TARGETS, "wb") as handle:
        np.save(handle, targets[index["prompt_row"].to_numpy()])
    _write_parquet(index.drop(columns="prompt_row"), work / INDEX)
    return work / INDEX


def _images_per_prompt(work: Path) -> int:
    settings = work / "generation.json"
    return json.loads(settings.read_text())["images_per_prompt"] if settings.is_file() else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m kaggle_i2p.dataset text|generate|index ...`: the steps of build_dataset.sh, each runnable alone."""
    parser = argparse.ArgumentParser(prog="python -m kaggle_i2p.dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    text = sub.add_parser("text", help="collect, clean, dedup, targets and folds into WORK/index.parquet")
    text.add_argument("sources", nargs="+", help="prompt files: PATH or PATH:COLUMN (txt, csv, parquet)")
    text.add_argument("--work", type=Path, required=True)
    text.add_argument("--dedup-threshold", type=float, default=0.9)
    text.add_argument("--group-threshold", type=float, default=0.7)
    text.add_argument("--folds", type=int, default=5)
    text.add_argument("--device", default="cpu")
    gen = sub.add_parser("generate", help="make this rank's missing images (run under torchrun/accelerate for more)")
    gen.add_argument("--work", type=Path, required=True)
    gen.add_argument("--model", type=Path, required=True, help="local diffusers Stable Diffusion 2 folder")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--steps", type=int, default=25, help="DPMSolver++ steps (default: %(default)s)")
    gen.add_argument("--guidance", type=float, default=9.0)
    gen.add_argument("--image-size", type=int, default=512, help="saved size (the host's images are 512)")
    gen.add_argument("--render-size", type=int, default=None, help="generation size (default: the model's, 768)")
    gen.add_argument("--batch-size", type=int, default=4)
    gen.add_argument("--format", choices=["png", "webp"], default="png")
    gen.add_argument("--device", default=None)
    index = sub.add_parser("index", help="write index.parquet and targets.npy for the images on disk")
    index.add_argument("--work", type=Path, required=True)
    index.add_argument("--format", choices=["png", "webp"], default="png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run_step(args)
    except (I2PError, OSError) as err:
        print(f"python -m kaggle_i2p.dataset {args.step}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npython -m kaggle_i2p.dataset {args.step}: interrupted; finished steps and images are kept in "
              f"{args.work}: rerun the same command to resume", file=sys.stderr)
        return 130


def _run_step(args: argparse.Namespace) -> int:
    if args.step == "text":
        path = run_text_steps(args.sources, args.work, args.dedup_threshold, args.group_threshold, args.folds,
                              args.device)
        print(f"wrote {path}: {len(pd.read_parquet(path))} prompts")
    elif args.step == "generate":
        from .generate import generate

        written = generate(args.work, args.model, args.images_per_prompt, args.steps, args.guidance, args.image_size,
                           args.render_size, args.batch_size, args.format, args.device)
        print(f"generated {len(written)} images")
    else:
        path = write_image_index(args.work, args.format)
        print(f"wrote {path}: {len(pd.read_parquet(path))} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
