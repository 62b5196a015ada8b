"""An IVF-PQ index of a bank's keys (FAISS), for banks too large to scan on the machine that predicts.

The parameters follow FAISS's own guidelines for the bank size ("Guidelines to choose an index", faiss wiki): an
inverted file of about 4 sqrt(N) lists below 1M rows, 65,536 lists (HNSW coarse quantizer) to 10M, 262,144 to 100M,
1,048,576 above; product-quantised codes of d/4 bytes (at most 96: PQ48 needed 4 times as many candidates for
the same recall on prompt-like data); 64 training points per list. On a machine with a
FAISS GPU build the k-means runs on the GPUs. The index only proposes candidates: the search scores them again exactly
from `keys.npy`, and `targets.npy` stays exact for the soft average.

Recall@k against the exact search is measured when the index is built, on held-out queries (bank rows left out of
the training sample, or the caller's own queries such as real image embeddings), for a ladder of `nprobe` values;
the smallest `nprobe` reaching the target recall (0.95, with 0.01 to spare) becomes the bank's default, and all of it
goes into `bank.json`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.ensemble import l2_normalize
from ..core.fileio import sha256_file
from .search import INDEX_CANDIDATES_PER_K, INDEX_FILE, exact_candidates, import_faiss, index_candidates, rescore

log = logging.getLogger("kaggle_i2p")

RECALL_K = 32
RECALL_TARGET = 0.95
RECALL_MARGIN = 0.01  # a recall measured on ~1000 queries is an estimate: the default nprobe keeps this to spare
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TRAIN_POINTS_PER_LIST = 64  # FAISS: 30 to 256 per centroid
MAX_PQ_BYTES = 96  # 4 dimensions per byte up to 384-d: 56M rows in 6.3 GB with ids and centroids
ADD_CHUNK_ROWS = 262_144


@dataclass(frozen=True)
class IndexParameters:
    """An IVF-PQ layout: lists, coarse quantizer, code bytes, training sample."""

    nlist: int
    coarse: str  # "flat" or "hnsw32"
    pq_bytes: int
    train_rows: int

    @property
    def factory(self) -> str:
        coarse = "_HNSW32" if self.coarse == "hnsw32" else ""
        return f"IVF{self.nlist}{coarse},PQ{self.pq_bytes}"

    def resident_bytes(self, rows: int, dim: int) -> int:
        """Memory of the index when loaded for search: codes and ids per row, centroids, HNSW links."""
        links = self.nlist * 32 * 2 * 4 if self.coarse == "hnsw32" else 0
        return rows * (self.pq_bytes + 8) + self.nlist * dim * 4 + links


def _power_of_two(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def ivfpq_parameters(rows: int, dim: int, nlist: int | None = None) -> IndexParameters:
    """FAISS's guidance for `rows` vectors of width `dim` (`nlist` overrides the number of lists)."""
    if nlist is None:
        if rows < 1_000_000:
            nlist = min(_power_of_two(4 * math.sqrt(rows)), max(1, rows // 39))  # 39: FAISS's minimum per list
        else:
            nlist = 65_536 if rows < 10_000_000 else 262_144 if rows < 100_000_000 else 1_048_576
    coarse = "hnsw32" if nlist >= 65_536 else "flat"
    pq_bytes = max(b for b in range(1, min(MAX_PQ_BYTES, max(1, dim // 4)) + 1) if dim % b == 0)
    train_rows = min(rows, max(TRAIN_POINTS_PER_LIST * nlist, 256 * 39))  # 256 * 39: the PQ codebooks' minimum
    return IndexParameters(nlist, coarse, pq_bytes, train_rows)


PQ_CENTROIDS = 256  # 8-bit product-quantiser codes: each sub-quantiser's k-means needs this many training rows


def index_problem(rows: int, nlist: int | None = None, dim: int = 384) -> str | None:
    """Why an IVF-PQ index of `rows` keys (with `nlist` lists) cannot be trained, or None; asked before any
    embedding, so a FAISS failure never waits for it."""
    params = ivfpq_parameters(rows, dim, nlist)
    trainable = min(params.train_rows, rows - _held_out_count(rows))  # held-out rows measure the recall
    if trainable < max(params.nlist, PQ_CENTROIDS):
        return (f"{rows} texts are too few for an index of {params.nlist} lists with {PQ_CENTROIDS}-centroid codes "
                f"(it trains on {trainable} of them, the rest measure its recall, and needs at least "
                f"{max(params.nlist, PQ_CENTROIDS)}); leave out --index (an exact search "
                "is fast at this size) or lower --nlist")
    return None


def _held_out_count(rows: int, n_recall: int = 1000) -> int:
    """Bank rows kept out of the training sample to measure recall on (when no queries are given)."""
    return min(n_recall, max(1, rows // 10))


def _sample_rows(rows: int, n: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """`n` distinct rows in increasing order (read from a memory-mapped file in one sweep)."""
    rng = np.random.default_rng(seed)
    pool = np.arange(rows) if exclude is None else np.setdiff1d(np.arange(rows), exclude)
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


def _gpu_clustering(faiss, index, dim: int) -> None:
    """k-means on every visible GPU when FAISS was built with them (the 1M-list trainings of large banks)."""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
        log.info("IVF k-means on %d GPU(s)", faiss.get_num_gpus())


def train_index(keys: np.ndarray, params: IndexParameters, seed: int = 0, exclude: np.ndarray | None = None):
    """An IVF-PQ index trained on a sample of `keys` (inner product; spherical k-means), with every row added."""
    from tqdm.auto import tqdm

    faiss = import_faiss()
    dim = keys.shape[1]
    index = faiss.index_factory(dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.spherical = True
    ivf.do_polysemous_training = False  # its Hamming-code search is not used; its training took 95% of the time
    _gpu_clustering(faiss, index, dim)
    sample = _sample_rows(len(keys), params.train_rows, seed, exclude)
    index.train(np.ascontiguousarray(keys[sample], dtype=np.float32))
    with tqdm(total=len(keys), desc="index add", unit="row", unit_scale=True, disable=len(keys) < 1_000_000) as bar:
        for start in range(0, len(keys), ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(keys[start:start + ADD_CHUNK_ROWS], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))
    return index


def _without(rows: np.ndarray, own: np.ndarray | None, k: int) -> np.ndarray:
    """Each query's first k rows other than its own (a held-out bank row finds itself: that says nothing)."""
    if own is None:
        return rows[:, :k]
    return np.stack([r[r != o][:k] for r, o in zip(rows, own, strict=True)])


def measure_recall(index, keys: np.ndarray, queries: np.ndarray, k: int = RECALL_K,
                   ladder: tuple[int, ...] = NPROBE_LADDER, own_rows: np.ndarray | None = None,
                   device: str = "cpu") -> dict[int, float]:
    """{nprobe: recall@k} of the index search (candidates scored again exactly, as a run searches) against exact
    search, up to the first nprobe that reaches recall 1 or visits every list. `own_rows`: the bank row each query
    is, left out of both results."""
    queries = l2_normalize(queries)
    extra = 0 if own_rows is None else 1
    k = min(k, len(keys) - extra)
    wanted = k + extra
    _, truth = rescore(queries, keys, exact_candidates(queries, keys, wanted, device), wanted)
    truth = _without(truth, own_rows, k)
    nlist = import_faiss().extract_index_ivf(index).nlist
    recall = {}
    for nprobe in ladder:
        nprobe = min(nprobe, nlist)
        candidates = index_candidates(index, queries, INDEX_CANDIDATES_PER_K * wanted, nprobe)
        found = _without(rescore(queries, keys, candidates, wanted)[1], own_rows, k)
        hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth, strict=True))
        recall[nprobe] = hits / truth.size
        if recall[nprobe] >= 1.0 or nprobe >= nlist:
            break
    return recall


def default_nprobe(recall: dict[int, float], target: float = RECALL_TARGET, margin: float = RECALL_MARGIN) -> int:
    """The smallest measured nprobe whose recall reaches `target + margin` (else the best measured)."""
    reaching = [n for n, r in sorted(recall.items()) if r >= target + margin]
    return reaching[0] if reaching else max(recall, key=lambda n: (recall[n], -n))


def build_index(keys: np.ndarray, out_dir: str | Path, nlist: int | None = None, recall_queries: np.ndarray | None
                = None, n_recall: int = 1000, seed: int = 0) -> dict:
    """Train, fill and write `out_dir/index.faiss` for a bank's keys; returns the `bank.json` entry (parameters,
    recall@32 per nprobe on held-out queries, default nprobe)."""
    faiss = import_faiss()
    params = ivfpq_parameters(len(keys), keys.shape[1], nlist)
    held_out = None
    if recall_queries is None:  # bank rows the quantizers never saw
        held_out = _sample_rows(len(keys), _held_out_count(len(keys), n_recall), seed + 1)
        recall_queries = np.asarray(keys[held_out], dtype=np.float32)
    index = train_index(keys, params, seed, exclude=held_out)
    recall = measure_recall(index, keys, recall_queries, own_rows=held_out)
    nprobe = default_nprobe(recall)
    if recall[nprobe] < RECALL_TARGET:
        log.warning("index: recall@%d is %.3f at most (nprobe %d); the target is %.2f: use search: exact or more "
                    "lists", RECALL_K, recall[nprobe], nprobe, RECALL_TARGET)
    path = Path(out_dir) / INDEX_FILE
    faiss.write_index(index, str(path))
    return {"type": "ivf-pq", "rows": len(keys), "dim": keys.shape[1], "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "factory": params.factory, **asdict(params), "metric": "inner_product",
            "candidates_per_k": INDEX_CANDIDATES_PER_K, "recall_k": RECALL_K, "recall_queries": len(recall_queries),
            "recall_query_source": "held-out bank rows" if held_out is not None else "given",
            "recall": {str(n): round(r, 4) for n, r in recall.items()}, "nprobe": nprobe}
