"""Similar pairs of prompts when a set is too large for the exact pass: an inverted file (FAISS k-means), then range
search at the threshold inside the lists each prompt probes, scored as matrix products.

The exact dedup and groups (prompts.py) compare every prompt with every earlier one: quadratic, hours for a million
prompts on a CPU. Here FAISS clusters the unit vectors into about N / 256 lists (spherical k-means on a sample, of
the rows less their mean direction: see `probe_lists`) and finds each row's `nprobe` nearest lists. Row i and row j
are compared when i probes j's own list or j probes i's; a pair at cosine >= threshold is found unless neither probes
the other's list. FAISS's own IVF range search scans each query's lists one vector at a time (memory-bound: 3 GFLOP/s
on two cores); here the queries of one list are scored against its members in one matrix product (BLAS, or the
GPU), which costs the same arithmetic at ~10 times the rate. The found pairs then decide dedup (`greedy_keep_pairs`,
the same greedy in order as the exact pass) and groups (connected components), and `leakage_pairs` counts what the
groups missed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..bank.search import fp32_accumulation, import_faiss
from ..core.blocks import blocks
from ..core.ensemble import l2_normalize

log = logging.getLogger("kaggle_i2p")

ROWS_PER_LIST = 256  # list size: large enough for efficient matrix products, small enough to scan few rows
NPROBE = 12  # lists each row probes: 0.998 of the pairs at cosine >= 0.7 on prompt-like data (docs/benchmarks.md)
TRAIN_ROWS_PER_LIST = 32  # k-means sample (FAISS: 30 to 256 per centroid)
KMEANS_ITERATIONS = 10
QUERY_CHUNK = 8192  # queries of one list scored at a time (bounds the score matrix)


# Similarities on a GPU are screened in fp16 (tensor cores, an order of magnitude above fp32) and only rows with an
# entry within the screen's error of the threshold are multiplied again in fp32: the decisions are fp32's. For unit
# rows an fp16 product errs by at most 2 x 2^-11 (each factor rounded) plus the fp32 accumulation's ~384 x 2^-24.
SCREENS: dict[str, tuple[torch.dtype, float]] = {"cuda": (torch.float16, 2e-3)}


def similar(a: torch.Tensor, b: torch.Tensor, threshold: float) -> torch.Tensor:
    """(len(a), len(b)) bool: cosine >= threshold between unit rows, as fp32 products decide it (screened on devices
    in SCREENS, see above)."""
    screen = SCREENS.get(a.device.type)
    if screen is None:
        return a @ b.T >= threshold
    dtype, margin = screen
    with fp32_accumulation(a.device):
        scores = (a.to(dtype) @ b.to(dtype).T).float()
    decided = scores >= threshold + margin
    unsure = (scores >= threshold - margin).logical_and_(~decided).any(dim=1).nonzero().squeeze(1)
    if len(unsure):
        decided[unsure] = a[unsure] @ b.T >= threshold
    return decided


def default_nlist(rows: int) -> int:
    """About ROWS_PER_LIST rows per list, a power of two (at least 1)."""
    return 1 << max(0, round(math.log2(max(rows / ROWS_PER_LIST, 1.0))))


def probe_lists(vectors: np.ndarray, nlist: int | None = None, nprobe: int = NPROBE, seed: int = 0) -> np.ndarray:
    """(rows, nprobe) the inverted lists each row probes, nearest first (column 0: the row's own list), from a
    spherical k-means of a sample of the rows (FAISS).

    The lists are made from the rows less their mean direction: sentence embeddings share one (random prompts sit at
    cosine ~0.1-0.2), which makes a few central lists the near ones of nearly every row; half of a million rows probed
    one list, and scoring those hubs cost 4.7 times a balanced layout. Centred, the lists are balanced; the pairs
    are still scored on the rows as given.
    """
    faiss = import_faiss()
    nlist = min(nlist or default_nlist(len(vectors)), len(vectors))
    nprobe = min(nprobe, nlist)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(vectors), size=min(len(vectors), TRAIN_ROWS_PER_LIST * nlist), replace=False))
    mean = np.asarray(vectors[sample], dtype=np.float64).mean(axis=0)

    def centred(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(l2_normalize(np.asarray(rows, dtype=np.float32) - mean), dtype=np.float32)

    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          max_points_per_centroid=TRAIN_ROWS_PER_LIST * 4, min_points_per_centroid=1)
    kmeans.train(centred(vectors[sample]))
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    quantizer.add(kmeans.centroids)
    probes = np.empty((len(vectors), nprobe), dtype=np.int64)
    for rows in blocks(len(vectors), 65_536):
        probes[rows.start:rows.stop] = quantizer.search(centred(vectors[rows.start:rows.stop]), nprobe)[1]
    return probes


def _lists(probes: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(members, queries) per inverted list: the rows whose own list it is, and the rows that probe it."""
    n, nprobe = probes.shape
    nlist = int(probes.max()) + 1
    own = probes[:, 0]
    members_order = np.argsort(own, kind="stable")
    members_start = np.searchsorted(own[members_order], np.arange(nlist + 1))
    probing_rows = np.repeat(np.arange(n), nprobe)
    queries_order = np.argsort(probes.ravel(), kind="stable")
    queries_start = np.searchsorted(probes.ravel()[queries_order], np.arange(nlist + 1))
    for lst in range(nlist):
        members = members_order[members_start[lst]:members_start[lst + 1]]
        queries = probing_rows[queries_order[queries_start[lst]:queries_start[lst + 1]]]
        if len(members) and len(queries):
            yield members, queries


def _similar_blocks(vectors: np.ndarray, probes: np.ndarray, threshold: float, device: str
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """(query rows, member rows, similar matrix) for each list, in chunks of at most QUERY_CHUNK queries."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
    for members, queries in _lists(probes):
        keys = x[torch.from_numpy(members).to(device)]
        for chunk in blocks(len(queries), QUERY_CHUNK):
            rows = queries[chunk.start:chunk.stop]
            yield rows, members, similar(x[torch.from_numpy(rows).to(device)], keys, threshold)


def similar_pairs(vectors: np.ndarray, probes: np.ndarray, threshold: float, device: str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), a < b: the pairs of rows at cosine >= threshold that share a probed list (each pair once, sorted)."""
    n = len(vectors)
    found = [np.zeros(0, dtype=np.int64)]
    for rows, members, close in _similar_blocks(vectors, probes, threshold, device):
        hits = torch.nonzero(close).cpu().numpy()
        a, b = rows[hits[:, 0]], members[hits[:, 1]]
        apart = a != b
        found.append(np.minimum(a, b)[apart] * n + np.maximum(a, b)[apart])
    codes = np.unique(np.concatenate(found))
    return codes // n, codes % n


def ivf_groups(vectors: np.ndarray, probes: np.ndarray, threshold: float, device: str = "cpu") -> np.ndarray:
    """Group ids (as `prompts.similarity_groups`) from the pairs that share a probed list (`join_similar`)."""
    parent = np.arange(len(vectors))
    for rows, members, close in _similar_blocks(vectors, probes, threshold, device):
        join_similar(parent, rows, members, close, vectors.shape[1])
    return dense_groups(parent)


def join_similar(parent: np.ndarray, rows: np.ndarray, members: np.ndarray, close: torch.Tensor, width: int
                 ) -> None:
    """Join the groups of every close (rows[i], members[j]) pair. When the members already fall in at most `width`
    groups (the vectors' width: the merge then costs less than the similarities did), the similar matrix is first
    reduced to (row, group) links by one matrix product on its device: a dense block of prompts holds millions of
    similar pairs, most inside groups already joined, and only the links leave the device."""
    roots, member_group = np.unique(find_roots(parent, members), return_inverse=True)
    if len(roots) <= width:
        by_group = torch.zeros(len(members), len(roots), device=close.device)
        by_group[torch.arange(len(members)), torch.from_numpy(member_group).to(close.device)] = 1
        hits = torch.nonzero(close.float() @ by_group > 0).cpu().numpy()
        union(parent, rows[hits[:, 0]], roots[hits[:, 1]])
    else:
        hits = torch.nonzero(close).cpu().numpy()
        union(parent, rows[hits[:, 0]], members[hits[:, 1]])


def find_roots(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The union-find roots of `rows`, by pointer jumping (every parent is at most its row)."""
    roots = parent[rows]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            return roots
        roots = up


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the groups of each pair (a[i], b[i]): a vectorised union-find that hooks the larger root under the
    smaller, so a group's root is its first row."""
    while len(a):
        root_a, root_b = find_roots(parent, a), find_roots(parent, b)
        parent[a], parent[b] = root_a, root_b  # path compression: the next finds are one step
        apart = root_a != root_b
        a, b = a[apart], b[apart]
        low, high = np.minimum(root_a[apart], root_b[apart]), np.maximum(root_a[apart], root_b[apart])
        np.minimum.at(parent, high, low)  # several pairs may hook one root: the smallest wins, the others retry


def dense_groups(parent: np.ndarray) -> np.ndarray:
    """Group numbers 0, 1, ... in order of each group's first row."""
    return np.unique(find_roots(parent, np.arange(len(parent))), return_inverse=True)[1]


def greedy_rounds(has_earlier: Callable, open_rows):
    """The greedy in-order decisions: row i is kept when it is open and no earlier kept row is similar to it.

    `has_earlier(mask)` says for each row whether an earlier similar row lies in `mask` (a dense matrix-vector
    product inside a block, a sparse one over found pairs). Decided in rounds: a row is dropped once an earlier similar
    row is kept, and kept once every earlier similar row is decided and none was kept; the earliest undecided row is
    always decided, so the rounds end (after as many as the longest chain of similar rows, usually a few)."""
    undecided, kept = open_rows & True, open_rows & False  # copies, as numpy arrays or tensors
    while undecided.any():
        has_kept, waiting = has_earlier(kept), has_earlier(undecided)
        kept = kept | (undecided & ~has_kept & ~waiting)
        undecided = undecided & ~has_kept & waiting
    return kept


def greedy_keep_pairs(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Keep mask of the greedy in-order dedup over n rows, given the similar pairs (a < b)."""
    from scipy.sparse import csr_matrix

    earlier = csr_matrix((np.ones(len(a), dtype=np.float32), (b, a)), shape=(n, n))  # row b: its earlier rows a
    return greedy_rounds(lambda mask: earlier @ mask.astype(np.float32) > 0, np.ones(n, dtype=bool))


def leakage_pairs(vectors: np.ndarray, folds: np.ndarray, threshold: float, block: int = 4096,
                  device: str = "cpu") -> tuple[int, int]:
    """(leaked, similar): the pairs at cosine >= threshold whose rows lie in different folds, and all such pairs,
    counted exactly (all block pairs): what a grouping let leak between training and validation (exact groups: 0)."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
    fold = torch.from_numpy(np.asarray(folds)).to(device)
    leaked = similar_total = 0
    for left in blocks(len(x), block):
        for right in blocks(len(x), block):
            if right.start < left.start:
                continue
            close = similar(x[left.start:left.stop], x[right.start:right.stop], threshold)
            if right.start == left.start:
                close = torch.triu(close, diagonal=1)
            apart = fold[left.start:left.stop, None] != fold[None, right.start:right.stop]
            leaked += int((close & apart).sum())
            similar_total += int(close.sum())
    return leaked, similar_total
