"""Retrieval at the 4th place's scale, measured in one run: exact search in one pass vs per batch, and IVF-PQ.

1. A synthetic bank of prompt-like float16 keys (clustered as MiniLM prompt embeddings are: random pairs at cosine
   ~0.12, one topic's rows at ~0.69; `kaggle_i2p.testing.prompt_like_embeddings`), and held-out queries from the
   same topics with more noise (as image embeddings against text keys).
2. Exact, one pass: all queries against the bank in one streamed pass (`search.nearest`), rescoring included.
   Baseline, the old path: the previous code's search (copied here verbatim) called per batch of 32 queries, as the
   retrieval head did per image batch (a few batches are timed; the rate is what counts). Both in row x queries/s.
3. IVF-PQ: an index of the first --index-rows rows, built with `bankindex.build_index`'s code path; recall@32 per
   nprobe against exact search on held-out queries; the time of a search at the default nprobe.
4. Projection to 56M rows x 16,384 queries (the 4th place's bank, the competition's test set), from measured rates:
   exact = rows x queries / exact rate; index = queries x (measured time per query, scaled by the list length FAISS's
   guidance gives at 56M over the list length measured here, plus the flat coarse search over 262,144 centroids at
   the exact rate). Memory at 56M: the index's codes, ids and centroids (`IndexParameters.resident_bytes`).

Last line: `exact_rq_per_s=... baseline_rq_per_s=... speedup=... ivfpq_recall_at_32=... projected_56m_16k_min=...
projected_56m_exact_min=... projected_56m_index_gb=... peak_rss_mb=...`.
Usage: python benchmarks/bench_retrieval.py [--rows 2000000] [--queries 4096] [--index-rows 1000000] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kaggle_i2p.bank.folder import Bank
from kaggle_i2p.bank.index import default_nprobe, ivfpq_parameters, measure_recall, train_index
from kaggle_i2p.bank.search import INDEX_CANDIDATES_PER_K, nearest
from kaggle_i2p.testing import prompt_like_embeddings, synthetic_bank

RECALL_K = 32
TEST_IMAGES = 16_384
BANK_56M = 56_000_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def held_out_queries(n: int, dim: int) -> np.ndarray:
    """Queries from the bank's topics, never bank rows, noisier than the keys."""
    return prompt_like_embeddings(n, dim, seed=0, spread=0.8, first_row=10**9)


def exact_rate(keys: np.ndarray, queries: np.ndarray, k: int = RECALL_K, device: str = "cpu"
               ) -> tuple[float, np.ndarray]:
    """Row x queries per second of one pass for all queries; and the exact top-k rows."""
    started = time.perf_counter()
    _, rows = nearest(queries, keys, k, device)
    return len(keys) * len(queries) / (time.perf_counter() - started), rows


def old_top_k(queries: torch.Tensor, keys: np.ndarray, k: int, chunk_rows: int = 65_536
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The retrieval head's search before this change, verbatim (`retrieval.top_k` at 9ebe2bf): called per batch."""
    k = min(k, len(keys))
    best_values = torch.full((len(queries), 0), float("-inf"), device=queries.device)
    best_rows = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(keys), chunk_rows):
        chunk = torch.from_numpy(np.asarray(keys[start:start + chunk_rows], dtype=np.float32)).to(queries.device)
        scores = queries.float() @ chunk.T
        values, rows = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_values = torch.cat([best_values, values], dim=1)
        merged_rows = torch.cat([best_rows, rows + start], dim=1)
        best_values, order = merged_values.topk(min(k, merged_values.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, order)
        del chunk, scores  # one chunk in memory at a time
    return best_values, best_rows


def baseline_rate(keys: np.ndarray, queries: np.ndarray, batches: int, k: int = RECALL_K, batch: int = 32,
                  device: str = "cpu") -> float:
    """The old path: the old code's pass over the whole bank per batch of 32 queries; `batches` batches timed."""
    queries = torch.from_numpy(queries).to(device)
    old_top_k(queries[:batch], keys[:batch * 64], k)  # warm-up
    started = time.perf_counter()
    for b in range(batches):
        old_top_k(queries[b * batch:(b + 1) * batch], keys, k)
    if queries.device.type == "cuda":
        torch.cuda.synchronize()
    return len(keys) * batches * batch / (time.perf_counter() - started)


def index_figures(keys: np.ndarray, queries: np.ndarray, nlist: int | None) -> dict:
    """Build an IVF-PQ index over `keys`, measure recall@32 per nprobe and the search time at the default nprobe."""
    params = ivfpq_parameters(len(keys), keys.shape[1], nlist)
    started = time.perf_counter()
    index = train_index(keys, params)
    build_s = time.perf_counter() - started
    recall = measure_recall(index, keys, queries, RECALL_K)
    nprobe = default_nprobe(recall)
    started = time.perf_counter()
    nearest(queries, keys, RECALL_K, index=index, nprobe=nprobe)
    search_s = time.perf_counter() - started
    return {"params": params, "build_s": build_s, "recall": recall, "nprobe": nprobe, "search_s": search_s,
            "per_query_s": search_s / len(queries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="bank rows for the exact search")
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=384, help="key width (384: MiniLM keys; 768/1024: CLIP L/H)")
    parser.add_argument("--index-rows", type=int, default=1_000_000, help="bank rows for the IVF-PQ index")
    parser.add_argument("--nlist", type=int, default=4096,
                        help="inverted lists at --index-rows (FAISS's guidance says 65,536 at 1M, which 2 CPU cores "
                             "cannot train in minutes; 4096 = 4 sqrt(N) keeps the list length of the 56M layout)")
    parser.add_argument("--baseline-batches", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="device of the exact pass and the baseline (cpu, cuda)")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the bank (default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        started = time.perf_counter()
        bank = Bank.open(synthetic_bank(Path(tmp) / "bank", args.rows, args.dim, target_dim=8))
        queries = held_out_queries(args.queries, args.dim)
        print(f"bank: {args.rows:,} x {args.dim} float16 keys, {args.queries} held-out queries "
              f"({time.perf_counter() - started:.0f} s to make)", flush=True)

        exact, _ = exact_rate(bank.keys, queries, device=args.device)
        print(f"exact, one pass: {exact:.3g} row-queries/s ({args.rows * args.queries / exact:.1f} s)",
              flush=True)
        baseline = baseline_rate(bank.keys, queries, args.baseline_batches, device=args.device)
        print(f"baseline, the old code per batch of 32: {baseline:.3g} row-queries/s; one pass is "
              f"{exact / baseline:.2f}x", flush=True)

        keys = bank.keys[:args.index_rows]
        figures = index_figures(keys, queries, args.nlist)
        params, recall, nprobe = figures["params"], figures["recall"], figures["nprobe"]
        print(f"IVF-PQ {params.factory} over {len(keys):,} rows: built in {figures['build_s']:.0f} s; recall@"
              f"{RECALL_K} by nprobe {', '.join(f'{n}: {r:.3f}' for n, r in recall.items())}; default nprobe "
              f"{nprobe}: {figures['search_s']:.2f} s for {args.queries} queries "
              f"({INDEX_CANDIDATES_PER_K * RECALL_K} candidates each, rescored exactly)", flush=True)

    big = ivfpq_parameters(BANK_56M, args.dim)
    list_ratio = (BANK_56M / big.nlist) / (len(keys) / params.nlist)
    per_query = figures["per_query_s"] * list_ratio + big.nlist / exact  # + the coarse search, flat at worst
    projected_index_min = TEST_IMAGES * per_query / 60
    projected_exact_min = BANK_56M * TEST_IMAGES / exact / 60
    index_gb = big.resident_bytes(BANK_56M, args.dim) / 2**30
    print(f"56M rows x {TEST_IMAGES} queries: exact {projected_exact_min:.0f} min on this CPU; {big.factory} "
          f"{projected_index_min:.1f} min (lists {list_ratio:.2f}x as long as here), index resident "
          f"{index_gb:.1f} GB")
    print(f"exact_rq_per_s={exact:.4g} baseline_rq_per_s={baseline:.4g} speedup={exact / baseline:.2f} "
          f"ivfpq_recall_at_32={recall[nprobe]:.4f} nprobe={nprobe} projected_56m_16k_min={projected_index_min:.2f} "
          f"projected_56m_exact_min={projected_exact_min:.0f} projected_56m_index_gb={index_gb:.2f} "
          f"peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
