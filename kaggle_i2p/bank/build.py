"""`kaggle-i2p build-bank` at any size: texts streamed in shards, embedded, resumed after a kill, shared over ranks.

The input (.txt, one text per line; .csv or .parquet, one column) is read in batches, never whole. Its non-blank texts
are cut into shards of `shard_rows`; rank r of W (torchrun's or accelerate's RANK and WORLD_SIZE, as for image
generation) embeds shards r, r+W, ... with all-MiniLM-L6-v2 (float16 on a GPU) and, for the keys, MiniLM itself or a
local CLIP text tower. Each shard is written atomically into `OUT.building/`, so a killed build redoes at most the
shards in flight. The rank that finishes the last shard assembles the bank folder (streamed from the shards into
memory-mapped arrays), builds the FAISS index when asked, and renames it into place.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..core.ensemble import l2_normalize
from ..core.fileio import atomic_open, open_npy, staging_dir
from ..core.ranks import rank_and_world, rank_device
from ..core.validate import setting_changes
from ..models.backbones import TextTowerError, text_library
from . import INDEX_TYPES, SHARD_ROWS
from .folder import BANK_MARKER, Bank, BankError, check_bank_destination, publish_bank
from .index import build_index, index_problem
from .search import INDEX_FILE, import_faiss
from .textfiles import DEFAULT_ENCODING, check_source, iter_text_batches

log = logging.getLogger("kaggle_i2p")

KEY_KINDS = ("none", "minilm", "clip")
WORK_SUFFIX = ".building"
LOCK_SUFFIX = ".lock"
INDEX_LOCK = ".index-bank.lock"  # in a bank folder, held while index-bank replaces its index and bank.json
PLAN_FILE = "plan.json"
PLAN_FORMAT = 2  # 2: the storage dtype is part of the plan


def shard_texts(batches: Iterator[list[str]], shard_rows: int) -> Iterator[tuple[int, list[str]]]:
    """(shard number, its texts): the stream cut into shards of exactly `shard_rows` (the last one shorter)."""
    pending: list[str] = []
    number = 0
    for batch in batches:
        pending.extend(batch)
        while len(pending) >= shard_rows:
            yield number, pending[:shard_rows]
            pending, number = pending[shard_rows:], number + 1
    if pending:
        yield number, pending


# Embedding --------------------------------------------------------------------------------------------------------

Embed = Callable[[list[str]], np.ndarray]


def minilm_embedder(model_path: str | Path | None, device: str, batch_size: int) -> Embed:
    """Texts -> all-MiniLM-L6-v2 unit vectors; float16 weights on a GPU (large batches), float32 on the CPU."""
    from ..models.text import embed_prompts

    half = device.startswith("cuda")
    return lambda texts: embed_prompts(texts, model_path=model_path, batch_size=batch_size, device=device,
                                       half=half)


def clip_text_width(arch: str) -> int:
    """The width of the CLIP text embeddings of the model `arch` names, from its config alone."""
    return text_library(arch).text_width(arch)


def clip_checkpoint_problem(arch: str, checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be the whole CLIP model `arch` that `clip_embedder` loads (no library reads `arch`,
    an unreadable file, other keys or shapes), from its keys and shapes alone; None when it fits."""
    try:
        reader = text_library(arch)
    except TextTowerError as err:
        return str(err)
    return reader.text_problem(arch, Path(checkpoint))


def clip_embedder(arch: str, checkpoint: str | Path, device: str, batch_size: int) -> Embed:
    """Texts -> unit CLIP text embeddings: the text tower of the model `arch` names, from the library that reads it
    (an open_clip name or model config with its whole checkpoint; a transformers CLIP/SigLIP folder)."""
    return text_library(arch).text_encoder(arch, Path(checkpoint), device, batch_size)


# The work folder: a plan and the finished shards -------------------------------------------------------------------

def _work_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + WORK_SUFFIX)


def _shard_paths(work: Path, number: int) -> tuple[Path, Path]:
    return work / f"shard-{number:06d}.txt", work / f"shard-{number:06d}.npz"


def _open_plan(work: Path, plan: dict, restart: bool = False) -> dict:
    """The build's plan: written on the first run, and a resumed run must match it (same input and settings);
    `restart` discards an unfinished build (only a folder this command made: it holds plan.json)."""
    path = work / PLAN_FILE
    if restart and path.is_file():
        for entry in work.iterdir():
            if not entry.name.endswith(LOCK_SUFFIX):  # the ranks' locks stay: they are held
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        log.info("build-bank --restart: discarded the unfinished build in %s", work)
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BankError(f"{path} is damaged ({err}); rerun with --restart to discard the unfinished build") from err
        differ = setting_changes(stored, plan)
        if differ or "rows" not in stored:
            raise BankError(f"{work} holds an unfinished build of another input or other settings: "
                            f"{'; '.join(differ) or 'no row count'}. Rerun with those settings to resume it, or add "
                            "--restart to discard it and start over")
        return stored
    return plan


def _ours(work: Path) -> bool:
    """A work folder this command made: it holds plan.json, or only the ranks' lock files (a first run counting)."""
    return (work / PLAN_FILE).is_file() or all(p.name.endswith(LOCK_SUFFIX) for p in work.iterdir())


@contextmanager
def _rank_lock(work: Path, rank: int) -> Iterator[None]:
    """Hold this rank's lock on the work folder for the whole build: a second build-bank into the same --out (the
    same rank of another command) is refused while this one runs, never interleaved with it."""
    if work.is_file() or (work.is_dir() and not _ours(work)):
        raise BankError(f"{work} exists and is not a build-bank work folder (no {PLAN_FILE}); it is never touched: "
                        "choose another --out, or move that folder away yourself")
    for attempt in range(3):  # a peer may remove the folder (its build done) between the mkdir and the open
        work.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(work / f"rank-{rank}{LOCK_SUFFIX}", "a")
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BankError(f"another build-bank is writing {work.with_name(work.name[:-len(WORK_SUFFIX)])} as rank "
                            f"{rank} (it holds {handle.name}); wait for it to finish, or give this one another "
                            "--out") from None
        yield


def _discard_if_empty(work: Path) -> None:
    """After a failed first step: a work folder with no finished shard is removed, so the corrected command starts
    clean (a folder with shards is kept for the rerun to resume)."""
    if work.is_dir() and not any(work.glob("shard-*.npz")) and _ours(work):
        shutil.rmtree(work, ignore_errors=True)


def _count(source: Path, column: str | None, encoding: str) -> int:
    from tqdm.auto import tqdm

    total = 0
    with tqdm(desc="counting texts", unit="text", unit_scale=True) as bar:
        for batch in iter_text_batches(source, column, encoding=encoding):
            total += len(batch)
            bar.update(len(batch))
    return total


def build_bank(texts_path: str | Path, out_dir: str | Path, column: str | None = None, keys: str = "none",
               text_model_path: str | Path | None = None, batch_size: int | None = None,
               clip_arch: str | None = None, clip_checkpoint: str | Path | None = None, index: str | None = None,
               nlist: int | None = None, recall_queries: str | Path | None = None, shard_rows: int = SHARD_ROWS,
               device: str | None = None, dtype: str = "float16", encoding: str = DEFAULT_ENCODING,
               restart: bool = False) -> Path | None:
    """Embed a text file into a bank folder (see the module docstring). Returns the bank's path, or None when this
    rank finished its shards while others are still embedding (the last one to finish assembles the bank).

    Keys: `none` (a classifier's class bank), `minilm` (queried with 384-d vectors) or `clip` (the texts through a
    local CLIP text tower, queried by the matching CLIP image tower). `index`: `ivf-pq` adds a FAISS index.
    `dtype`: how the vectors are stored (float16 halves a bank; the dataset's targets keep float32). `encoding`: the
    text file's (UTF-8 unless given). `restart`: discard an unfinished build of other settings in OUT.building.
    """
    # 1. everything that can be wrong, before any text is embedded
    if keys not in KEY_KINDS:
        raise BankError(f"keys {keys!r}: choose {', '.join(KEY_KINDS)}")
    if keys == "clip" and not (clip_arch and clip_checkpoint):
        raise BankError("--keys clip needs --clip-arch and --clip-checkpoint (an open_clip model and its whole "
                        "checkpoint, or a transformers CLIP/SigLIP folder given to both)")
    for given, what in ((clip_checkpoint, "--clip-checkpoint"), (text_model_path, "the MiniLM model folder")):
        if given is not None and not Path(given).exists():
            raise BankError(f"{what} {given}: no such file or folder; give the local path")
    if keys == "clip" and (problem := clip_checkpoint_problem(clip_arch, clip_checkpoint)):
        raise BankError(f"--clip-checkpoint: {problem}")
    if index is not None:
        if index not in INDEX_TYPES:
            raise BankError(f"index {index!r}: choose {', '.join(INDEX_TYPES)}")
        if keys == "none":
            raise BankError("an index searches keys: build the bank with --keys minilm or --keys clip")
        import_faiss()
    queries = _read_recall_queries(recall_queries)  # read now: a bad file must not wait for the embedding
    out_dir = check_bank_destination(out_dir).resolve()
    source = Path(texts_path).resolve()
    column = check_source(source, column, encoding)
    stat = source.stat()
    settings = {"format": PLAN_FORMAT, "source": str(source), "source_size": stat.st_size,
                "source_mtime_ns": stat.st_mtime_ns, "column": column, "keys": keys, "clip_arch": clip_arch,
                "clip_checkpoint": str(clip_checkpoint) if clip_checkpoint else None,
                "text_model": str(text_model_path) if text_model_path else None, "shard_rows": shard_rows,
                "dtype": np.dtype(dtype).name, **({"encoding": encoding} if encoding != DEFAULT_ENCODING else {})}
    work = _work_dir(out_dir)
    rank, world, local_rank = rank_and_world()
    with _rank_lock(work, rank):
        try:
            return _build_locked(work, out_dir, settings, source, column, encoding, restart, rank, world,
                                 local_rank, device, batch_size, keys, text_model_path, clip_arch, clip_checkpoint,
                                 texts_path, index, nlist, queries)
        except Exception:  # a failure (not Ctrl-C, whose counted plan is kept for the resume)
            if world == 1:
                _discard_if_empty(work)
            raise


def _build_locked(work: Path, out_dir: Path, settings: dict, source: Path, column: str | None, encoding: str,
                  restart: bool, rank: int, world: int, local_rank: int, device: str | None, batch_size: int | None,
                  keys: str, text_model_path: str | Path | None, clip_arch: str | None,
                  clip_checkpoint: str | Path | None, texts_path: str | Path, index: str | None, nlist: int | None,
                  queries: np.ndarray | None) -> Path | None:
    """Steps 2-4 of `build_bank`, under this rank's lock."""
    # 2. the plan: how many texts and shards (a counting pass on the first run), and whether they can be indexed
    plan = _open_plan(work, settings, restart)
    counted = "rows" not in plan
    if counted:
        plan = {**settings, "rows": _count(source, column, encoding)}
        if not plan["rows"]:
            raise BankError(f"{source}: no texts")
    if index is not None and (problem := index_problem(plan["rows"], nlist)) is not None:
        raise BankError(f"{source}: {problem}")
    if counted:
        with atomic_open(work / PLAN_FILE) as handle:
            json.dump(plan, handle, indent=1)
    n_shards = -(-plan["rows"] // plan["shard_rows"])

    # 3. this rank's missing shards, embedded as the input streams past
    _embed_shards(source, column, work, plan, n_shards, rank, world, local_rank, device, batch_size,
                  keys, text_model_path, clip_arch, clip_checkpoint, encoding)

    # 4. the last rank to finish assembles the bank
    if not (work / PLAN_FILE).is_file() and (out_dir / BANK_MARKER).is_file():
        return out_dir  # another rank assembled it while this one finished
    if not all(_shard_paths(work, s)[1].is_file() for s in range(n_shards)):
        done = sum(_shard_paths(work, s)[1].is_file() for s in range(n_shards))
        log.warning("rank %d: its shards are done (%d of %d in all); the last rank to finish assembles %s", rank,
                    done, n_shards, out_dir)
        return None
    meta = {"source": str(texts_path), "targets": "all-MiniLM-L6-v2", "keys": keys,
            **({"clip_arch": clip_arch} if keys == "clip" else {})}
    return _assemble(work, out_dir, plan, n_shards, meta, index, nlist, queries)


def _embed_shards(source: Path, column: str | None, work: Path, plan: dict, n_shards: int, rank: int, world: int,
                  local_rank: int, device: str | None, batch_size: int | None, keys: str,
                  text_model_path: str | Path | None, clip_arch: str | None,
                  clip_checkpoint: str | Path | None, encoding: str = DEFAULT_ENCODING) -> None:
    from tqdm.auto import tqdm

    mine = range(rank, n_shards, world)
    todo = {s for s in mine if not _shard_paths(work, s)[1].is_file()}
    if not todo:
        return
    rows, shard_rows = plan["rows"], plan["shard_rows"]
    size = {s: min(shard_rows, rows - s * shard_rows) for s in mine}
    device = device or rank_device(local_rank)
    batch_size = batch_size or (1024 if device.startswith("cuda") else 128)
    embed_targets = minilm_embedder(text_model_path, device, batch_size)
    embed_keys = clip_embedder(clip_arch, clip_checkpoint, device, batch_size) if keys == "clip" else None
    last = max(todo)
    with tqdm(total=sum(size.values()), initial=sum(size[s] for s in mine if s not in todo),
              desc=f"rank {rank}/{world} embedding", unit="text", unit_scale=True, position=rank) as bar:
        for number, texts in shard_texts(iter_text_batches(source, column, encoding=encoding), shard_rows):
            if number in todo:
                targets = l2_normalize(embed_targets(texts)).astype(plan["dtype"])
                arrays = {"targets": targets}
                if keys == "minilm":
                    arrays["keys"] = targets
                elif embed_keys is not None:
                    arrays["keys"] = l2_normalize(embed_keys(texts)).astype(plan["dtype"])
                text_path, array_path = _shard_paths(work, number)
                with atomic_open(text_path, "w", encoding="utf-8") as handle:
                    handle.writelines(t + "\n" for t in texts)
                with atomic_open(array_path, "wb") as handle:  # written last: the shard is done
                    np.savez(handle, **arrays)
                bar.update(len(texts))
            if number == last:
                break


def _read_recall_queries(path: str | Path | None, dim: int | None = None) -> np.ndarray | None:
    """The caller's recall queries: a 2-D .npy (of the keys' width when it is known), or one BankError."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise BankError(f"recall queries {path}: no such file")
    return open_npy(path, "recall queries", ndim=2, width=dim)


def _assemble(work: Path, out_dir: Path, plan: dict, n_shards: int, meta: dict, index: str | None,
              nlist: int | None, recall_queries: np.ndarray | None) -> Path | None:
    """The shards streamed into one bank folder (under a lock: one rank assembles), then the index, then renamed into
    place and the work folder removed."""
    with open(work / "assemble.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another rank is assembling %s", out_dir)
            return None
        if not work.is_dir() or not (work / PLAN_FILE).is_file():  # a peer assembled it meanwhile
            return out_dir
        rows = plan["rows"]
        staging = staging_dir(out_dir)
        try:
            with np.load(_shard_paths(work, 0)[1]) as first:
                widths = {name: first[name].shape[1] for name in first.files}
            arrays = {name: np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=plan["dtype"],
                                                      shape=(rows, width)) for name, width in widths.items()}
            start = 0
            with open(staging / "texts.txt", "w", encoding="utf-8") as texts:
                for number in range(n_shards):
                    text_path, array_path = _shard_paths(work, number)
                    with open(text_path, encoding="utf-8") as handle:
                        shutil.copyfileobj(handle, texts)
                    with np.load(array_path) as shard:
                        n = len(shard["targets"])
                        for name, array in arrays.items():
                            array[start:start + n] = shard[name]
                    start += n
            if start != rows:
                raise BankError(f"{work}: the shards hold {start} texts, the plan {rows}; remove the folder and "
                                "build again")
            for array in arrays.values():
                array.flush()
            del arrays
            if index is not None:
                meta["index"] = _build_index(np.load(staging / "keys.npy", mmap_mode="r"), staging, nlist,
                                             recall_queries, work)
            publish_bank(staging, out_dir, {"rows": rows, **meta})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _build_index(keys: np.ndarray, staging: Path, nlist: int | None, queries: np.ndarray | None,
                 work: Path) -> dict:
    """`build_index`, with a FAISS failure as one BankError that says the embedded shards are kept."""
    try:
        return build_index(keys, staging, nlist, queries)
    except RuntimeError as err:
        kept = (f"the embedded shards are kept in {work}: rerun with another --nlist (or without --index) to finish"
                if work.name.endswith(WORK_SUFFIX) else f"{work} is unchanged: rerun with another --nlist")
        raise BankError(f"FAISS could not build the index ({str(err).strip().splitlines()[-1]}); {kept}") from err


def index_bank(bank_path: str | Path, nlist: int | None = None, recall_queries: str | Path | None = None) -> dict:
    """Add (or rebuild) the IVF-PQ index of an existing keyed bank; returns the `bank.json` index entry."""
    import_faiss()
    bank = Bank.open(bank_path)
    if bank.keys is None:
        raise BankError(f"{bank.path}: a bank without keys.npy has nothing to index")
    if not (bank.path / BANK_MARKER).is_file():
        raise BankError(f"{bank.path}: no {BANK_MARKER}; only a bank built by kaggle-i2p is changed in place")
    queries = _read_recall_queries(recall_queries, bank.keys.shape[1])
    if (problem := index_problem(len(bank.keys), nlist, bank.keys.shape[1])) is not None:
        raise BankError(f"{bank.path}: {problem}")
    with open(bank.path / INDEX_LOCK, "a") as lock:  # two index-banks never pair one's index with the other's entry
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BankError(f"another index-bank is indexing {bank.path}; wait for it to finish") from None
        staging = staging_dir(bank.path / "index")
        try:
            entry = _build_index(bank.keys, staging, nlist, queries, bank.path)
            (staging / INDEX_FILE).replace(bank.path / INDEX_FILE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with atomic_open(bank.path / BANK_MARKER) as handle:
            json.dump({**bank.meta, "index": entry}, handle, indent=1)
    return entry
