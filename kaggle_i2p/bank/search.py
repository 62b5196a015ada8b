"""The nearest bank rows of many queries at once: one streamed pass over the keys, or a FAISS IVF-PQ index.

Either search only proposes candidates; the winners are then scored again exactly (float64 dot products of each
query with its candidates' float16 keys, read from the memory-mapped file), so a result does not depend on the
device, the precision of the pass, the batch a query came in, or which search found it. Ties go to the lower row.

The exact pass reads the keys once for all queries, chunk by chunk, with a running top-k per query:
- on CPU, float32 matrix products of query blocks against each chunk;
- on CUDA, float16 chunks go from the memory-mapped file through pinned buffers to the GPU on a side stream while the
  previous chunk is scored (float16 inputs, float32 accumulation), and the pass keeps twice k candidates so that the
  float16 rounding of the scores cannot push a true top-k row out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..core.blocks import blocks
from ..core.errors import I2PError

log = logging.getLogger("kaggle_i2p")

DEFAULT_CHUNK_ROWS = 65_536
QUERY_BLOCK = {"cpu": 1024, "cuda": 8192}  # queries scored against a chunk at once: a 256 MB / 1 GB score block
INDEX_FILE = "index.faiss"
INDEX_CANDIDATES_PER_K = 8  # rows an index proposes per wanted row, scored again exactly (4: recall@32 stalled at 0.94)
RESCORE_BLOCK = 64  # queries rescored at once: their candidates' keys in float64 (64 x 256 x 1024 x 8 B = 134 MB)


class SearchError(I2PError, RuntimeError):
    """A search that cannot run: no FAISS for an index, or an index that does not belong to its keys."""


def rescore(queries: np.ndarray, keys: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's candidate `rows` (-1: none), by exact float64 scores against the stored keys:
    (values float64, rows int64), each (Q, k), best first, ties to the lower row; a query with fewer than k
    candidates has -inf values and rows -1 at the end, which weigh nothing in a soft average."""
    rows = np.asarray(rows, dtype=np.int64)
    values, best = np.empty((len(rows), k)), np.empty((len(rows), k), dtype=np.int64)
    for block in blocks(len(rows), RESCORE_BLOCK):
        values[block.start:block.stop], best[block.start:block.stop] = _rescore_block(
            queries[block.start:block.stop], keys, rows[block.start:block.stop], k)
    return values, best


def _rescore_block(queries: np.ndarray, keys: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    valid = rows >= 0
    unique, inverse = np.unique(np.where(valid, rows, 0), return_inverse=True)
    gathered = np.asarray(keys[unique], dtype=np.float64)  # only the candidates' rows are read from the file
    scores = np.einsum("qd,qcd->qc", np.asarray(queries, dtype=np.float64), gathered[inverse.reshape(rows.shape)])
    # one candidate per row (an index may propose a row twice): order by row, drop repeats, then order by score
    candidate_rows = np.where(valid, rows, np.iinfo(np.int64).max)
    by_row = np.argsort(candidate_rows, axis=1, kind="stable")
    sorted_rows = np.take_along_axis(candidate_rows, by_row, axis=1)
    sorted_scores = np.take_along_axis(np.where(valid, scores, -np.inf), by_row, axis=1)
    sorted_scores[:, 1:][sorted_rows[:, 1:] == sorted_rows[:, :-1]] = -np.inf
    order = np.argsort(-sorted_scores, axis=1, kind="stable")[:, :k]  # stable: equal scores keep the lower row first
    best_values = np.take_along_axis(sorted_scores, order, axis=1)
    best_rows = np.take_along_axis(sorted_rows, order, axis=1)
    missing = ~np.isfinite(best_values)  # fewer than k candidates (an index probing too few lists): value -inf
    best_rows[missing] = -1
    if best_values.shape[1] < k:
        pad = k - best_values.shape[1]
        best_values = np.pad(best_values, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-1)
    return best_values, best_rows


class HostToDevice:
    """How chunks reach the scoring device. CPU: synchronous float32 conversion, no streams. The CUDA subclass copies
    on a side stream; tests use a subclass that defers copies, so a missing wait shows as a wrong result on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def host_buffer(self, rows: int, dim: int) -> torch.Tensor:
        return torch.empty((rows, dim), dtype=torch.float16)

    def device_buffer(self, rows: int, dim: int) -> torch.Tensor:
        return torch.empty((rows, dim), dtype=torch.float32, device=self.device)

    def copy(self, target: torch.Tensor, source: torch.Tensor, after: object) -> object:
        """Copy `source` into `target` once `after` (the scoring of the buffer's previous chunk) is done."""
        target.copy_(source)
        return None

    def use(self, copied: object) -> None:
        """Scoring from here on waits for the copy `copied`."""

    def scored(self) -> object:
        """A mark after the scoring queued so far."""
        return None

    def host_wait(self, copied: object) -> None:
        """Block until the copy `copied` has read its host buffer (before that buffer is filled again)."""


class CudaHostToDevice(HostToDevice):
    """Pinned host buffers and a copy stream: the next chunk crosses while the current one is scored."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)

    def host_buffer(self, rows: int, dim: int) -> torch.Tensor:
        return torch.empty((rows, dim), dtype=torch.float16, pin_memory=True)

    def device_buffer(self, rows: int, dim: int) -> torch.Tensor:
        return torch.empty((rows, dim), dtype=torch.float16, device=self.device)

    def copy(self, target: torch.Tensor, source: torch.Tensor, after: object) -> object:
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def use(self, copied: object) -> None:
        torch.cuda.current_stream(self.device).wait_event(copied)

    def scored(self) -> object:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def host_wait(self, copied: object) -> None:
        if copied is not None:
            copied.synchronize()


def stream_chunks(keys: np.ndarray, chunk_rows: int, transfer: HostToDevice, slots: int = 2
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, chunk on the device) for each `chunk_rows` rows of `keys`, double-buffered: while the caller
    scores chunk i, chunk i+1 is read from the file into a host buffer and copied. A yielded chunk is valid until the
    caller asks for the next one (its scoring is then marked, and the buffer is reused only after that mark)."""
    dim = keys.shape[1]
    host = [transfer.host_buffer(chunk_rows, dim) for _ in range(slots)]
    device = [transfer.device_buffer(chunk_rows, dim) for _ in range(slots)]
    copied: list[object] = [None] * slots
    scored: list[object] = [None] * slots
    for i, rows in enumerate(blocks(len(keys), chunk_rows)):
        slot, n = i % slots, len(rows)
        transfer.host_wait(copied[slot])  # the last copy out of this host buffer has finished reading it
        host[slot][:n].numpy()[:] = keys[rows.start:rows.stop]
        copied[slot] = transfer.copy(device[slot][:n], host[slot][:n], after=scored[slot])
        transfer.use(copied[slot])
        yield rows.start, device[slot][:n]
        scored[slot] = transfer.scored()


@contextmanager
def fp32_accumulation(device: torch.device):
    """float16 products accumulate in float32 (no reduced-precision split-K reductions) while the pass runs."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = before


def exact_candidates(queries: np.ndarray, keys: np.ndarray, n: int, device: str | torch.device = "cpu",
                     chunk_rows: int = DEFAULT_CHUNK_ROWS, transfer: HostToDevice | None = None,
                     progress: bool = False, query_block: int | None = None) -> np.ndarray:
    """(Q, n) int64 rows with the highest `queries @ keys.T` scores, from one pass over `keys` for all queries.

    On a CUDA out-of-memory error the pass starts again with half as many queries scored at once (the score block is
    `query_block` x `chunk_rows`), down to 64; the order of the returned rows is not defined.
    """
    device = torch.device(device)
    n = min(n, len(keys))
    if len(queries) == 0 or n == 0:
        return np.zeros((len(queries), n), dtype=np.int64)
    block = query_block or QUERY_BLOCK.get(device.type, 1024)
    while True:
        try:
            return _one_pass(queries, keys, n, device, chunk_rows, transfer, progress, block)
        except torch.OutOfMemoryError:
            if block <= 64:
                raise
            block //= 2
            log.warning("bank pass: out of GPU memory; starting again with %d queries at a time", block)
            torch.cuda.empty_cache()


def _one_pass(queries: np.ndarray, keys: np.ndarray, n: int, device: torch.device, chunk_rows: int,
              transfer: HostToDevice | None, progress: bool, block: int) -> np.ndarray:
    from tqdm.auto import tqdm

    if transfer is None:
        transfer = CudaHostToDevice(device) if device.type == "cuda" else HostToDevice(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(device, dtype)
    query_blocks = blocks(len(q), block)
    best_values = [torch.full((len(b), 0), float("-inf"), device=device, dtype=dtype) for b in query_blocks]
    best_rows = [torch.zeros((len(b), 0), dtype=torch.long, device=device) for b in query_blocks]
    # one score buffer for the whole pass: a fresh 256 MB block per product cost 25% of the CPU time in page faults
    scores = torch.empty(len(query_blocks[0]) * min(chunk_rows, len(keys)), device=device, dtype=dtype)
    bar = tqdm(total=len(keys), desc=f"bank pass, {len(q)} queries", unit="row", unit_scale=True,
               disable=not progress)
    with bar, torch.inference_mode(), fp32_accumulation(device):
        for start, chunk in stream_chunks(keys, chunk_rows, transfer):
            bar.update(len(chunk))
            for b, rows_of_block in enumerate(query_blocks):
                block_scores = scores[:len(rows_of_block) * len(chunk)].view(len(rows_of_block), len(chunk))
                torch.mm(q[rows_of_block.start:rows_of_block.stop], chunk.T, out=block_scores)
                values, rows = block_scores.topk(min(n, len(chunk)), dim=1, sorted=False)
                merged = torch.cat([best_values[b], values], dim=1)
                best_values[b], order = merged.topk(min(n, merged.shape[1]), dim=1, sorted=False)
                best_rows[b] = torch.cat([best_rows[b], rows + start], dim=1).gather(1, order)
        return torch.cat(best_rows).cpu().numpy()


def candidates_per_query(k: int, device: torch.device) -> int:
    """How many rows a pass keeps per query before the exact rescoring: k in fp32, 2k with float16 scores."""
    return 2 * k if device.type == "cuda" else k


def nearest(queries: np.ndarray, keys: np.ndarray, k: int, device: str | torch.device = "cpu",
            index: object | None = None, nprobe: int | None = None, candidates: int | None = None,
            chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of each unit query, (values float64, rows int64), exactly scored: by one exact pass, or
    from an IVF-PQ `index`'s `candidates` per query (default 8k) searched at `nprobe`."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(keys))
    if len(queries) == 0:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    if index is None:
        device = torch.device(device)
        rows = exact_candidates(queries, keys, candidates_per_query(k, device), device, chunk_rows,
                                progress=progress)
    else:
        rows = index_candidates(index, queries, candidates or INDEX_CANDIDATES_PER_K * k, nprobe)
    values, rows = rescore(queries, keys, rows, k)
    short = int((rows[:, -1] < 0).sum())
    if short:
        log.warning("index search: %d of %d queries found fewer than %d rows at nprobe %s; raise nprobe", short,
                    len(rows), k, nprobe)
    return values, rows


# FAISS, optional (pip install kaggle_i2p[index]) -------------------------------------------------------------------

def import_faiss():
    """The faiss module, or one SearchError saying how to get it."""
    try:
        import faiss
    except ImportError as err:
        raise SearchError("an IVF-PQ index needs FAISS, which is not installed: pip install 'kaggle_i2p[index]' "
                          "(faiss-cpu; the wheelhouse packs it with --extras index), or search exactly "
                          "(retrieval.search: exact)") from err
    return faiss


def read_index(bank: str | Path) -> object:
    """A bank's FAISS index, read into memory (its codes: about rows x code bytes); an unreadable file is one
    SearchError naming it."""
    faiss = import_faiss()
    path = Path(bank) / INDEX_FILE
    if not path.is_file():
        raise SearchError(f"{bank}: no {INDEX_FILE}; build the bank with `kaggle-i2p build-bank --index ivf-pq`")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise SearchError(f"{path} is damaged: FAISS cannot read it ({str(err).strip().splitlines()[-1]}); rebuild "
                          f"it with `kaggle-i2p index-bank {bank}`") from err


IVF_FOURCCS = (b"IwPQ", b"IwPR", b"IwFl", b"IwSh", b"IwSq")  # FAISS's inverted-file index types, as written


def index_header_problem(path: Path, rows: int, dim: int) -> str | None:
    """Why an index file cannot be the IVF index of `rows` keys of width `dim`, from its header (FAISS writes a
    type code, the width as int32 and the row count as int64 first), or None. Reads 16 bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) < 16 or head[:4] not in IVF_FOURCCS:
        return f"is not a FAISS inverted-file index (it starts {head[:4]!r})"
    width, count = int(np.frombuffer(head[4:8], "<i4")[0]), int(np.frombuffer(head[8:16], "<i8")[0])
    if (width, count) != (dim, rows):
        return f"indexes {count} rows of width {width}, and the bank's keys are {rows} x {dim}"
    return None


def index_content_problem(bank: Path, entry: dict) -> str | None:
    """Deep check of a bank's index: its sha256 against the one bank.json recorded when it was built, or (a bank
    built before hashes were recorded) a full read by FAISS; None when it is whole."""
    from ..models.checkpoints import checkpoint_sha256

    path = Path(bank) / INDEX_FILE
    if entry.get("sha256"):
        actual = checkpoint_sha256(path)
        return None if actual == entry["sha256"] else (f"has sha256 {actual}, and bank.json recorded "
                                                       f"{entry['sha256']} when it was built: it is damaged")
    try:
        import_faiss().read_index(str(path))
    except RuntimeError as err:
        return f"is damaged: FAISS cannot read it ({str(err).strip().splitlines()[-1]})"
    return None


def index_candidates(index: object, queries: np.ndarray, n: int, nprobe: int | None) -> np.ndarray:
    """(Q, n) rows the index proposes (-1 where it found fewer)."""
    faiss = import_faiss()
    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    _, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    rows = rows.astype(np.int64)
    bad = (rows < -1) | (rows >= index.ntotal)
    if bad.any():  # ids a damaged index invented: dropped (the candidates are scored again exactly anyway)
        log.warning("index: %d candidate ids outside the bank's %d rows were dropped; rebuild the index with "
                    "`kaggle-i2p index-bank`", int(bad.sum()), index.ntotal)
        rows[bad] = -1
    return rows
