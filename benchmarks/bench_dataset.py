"""The dataset's text steps at the 1st place's scale (10M prompts), measured in one run.

1. Synthetic MiniLM-like prompt embeddings (`testing.prompt_like_embeddings`: random pairs at cosine ~0.12, one
   topic's rows at ~0.69, Zipf-sized topics) with 5% of the rows replaced by near-duplicates of earlier rows at
   cosines drawn from [0.8, 1.0) (`testing.plant_near_duplicates`; chains form as in scraped prompt sets).
2. Agreement on a --sample (50k) of them, side by side: the exact passes (dedup, groups, folds) and the IVF passes
   (`--search ivf`: FAISS inverted lists, pairs within the probed lists). keep_agreement: the share of identical keep
   decisions; leakage: the pairs at cosine >= the group threshold whose rows land in different folds, counted
   exactly over all pairs (exact groups must give 0).
3. Rate: the IVF passes as `run_text_steps` runs them (one k-means, dedup, groups and folds of the kept rows) on
   --rows prompts (1M: the goal's size, so the projection to 1M is a measurement at the default).
4. MiniLM (`embed_prompts`, the real all-MiniLM-L6-v2 from its PyPI package) on --embed prompt-like texts on the
   device: prompts/s, and hours for 10M.
5. With --device cuda: the exact passes on the GPU at --gpu-rows, projected to 10M prompts (both passes grow with the
   square of the rows).

Last line: `prompts_per_s=... projected_1m_cpu_min=... keep_agreement=... leakage_pairs_exact=... leakage_pairs_ivf=...
embed_prompts_per_s=... [projected_10m_gpu_min=...] peak_rss_mb=...`.
Usage: python benchmarks/bench_dataset.py [--rows 1000000] [--sample 50000] [--embed 2048] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from kaggle_i2p.dataset.pairs import NPROBE, leakage_pairs, probe_lists
from kaggle_i2p.dataset.prompts import (
    DEDUP_THRESHOLD,
    GROUP_THRESHOLD,
    N_FOLDS,
    assign_folds,
    semantic_dedup,
    similarity_groups,
)
from kaggle_i2p.testing import plant_near_duplicates, prompt_like_embeddings

DIM = 384
PLANTED = 0.05
WORDS = ("a portrait of an astronaut a castle on a hill at dawn oil painting by greg rutkowski highly detailed "
         "cinematic lighting trending on artstation a cat wearing a hat photorealistic 8k unreal engine watercolor "
         "of a fox in the snow").split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embeddings(rows: int, seed: int = 0) -> np.ndarray:
    """Prompt-like unit rows with planted near-duplicates (step 1)."""
    return plant_near_duplicates(prompt_like_embeddings(rows, DIM, seed=seed), PLANTED, seed=seed)


def text_passes(vectors: np.ndarray, search: str, nprobe: int = NPROBE, device: str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """(keep mask, folds of the kept rows, seconds): dedup, groups and folds as `run_text_steps` runs them."""
    started = time.perf_counter()
    probes = probe_lists(vectors, nprobe=nprobe) if search == "ivf" else None
    keep = semantic_dedup(vectors, DEDUP_THRESHOLD, device=device, probes=probes)
    kept_probes = None if probes is None else probes[keep]
    groups = similarity_groups(vectors[keep], GROUP_THRESHOLD, device=device, probes=kept_probes)
    folds = assign_folds(groups, N_FOLDS)
    return keep, folds, time.perf_counter() - started


def agreement(vectors: np.ndarray) -> dict:
    """Step 2: exact and IVF side by side on the same rows."""
    exact_keep, exact_folds, exact_s = text_passes(vectors, "exact")
    ivf_keep, ivf_folds, ivf_s = text_passes(vectors, "ivf")
    leaked_exact, similar = leakage_pairs(vectors[exact_keep], exact_folds, GROUP_THRESHOLD)
    leaked_ivf = leakage_pairs(vectors[ivf_keep], ivf_folds, GROUP_THRESHOLD)[0]
    return {"keep_agreement": float((exact_keep == ivf_keep).mean()), "dropped_exact": int((~exact_keep).sum()),
            "leakage_pairs_exact": leaked_exact, "leakage_pairs_ivf": leaked_ivf, "similar_pairs": similar,
            "exact_s": exact_s, "ivf_s": ivf_s}


def prompt_texts(n: int, seed: int = 0) -> list[str]:
    """Prompt-like texts of 12-30 words (the embedding rate depends on the length, not the words)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(12, 31))) for _ in range(n)]


def embed_rate(n: int, device: str) -> float:
    """Step 4: MiniLM prompts/s (float16 and large batches on a GPU, as the text step runs it)."""
    from kaggle_i2p.models.text import embed_prompts

    cuda = device.startswith("cuda")
    texts = prompt_texts(n)
    embed_prompts(texts[:64], device=device, half=cuda)  # load the model and warm up outside the timing
    started = time.perf_counter()
    embed_prompts(texts, device=device, batch_size=1024 if cuda else 128, half=cuda)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=50_000)
    parser.add_argument("--embed", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-rows", type=int, default=1_000_000)
    args = parser.parse_args()

    sample = embeddings(args.sample, seed=1)
    side = agreement(sample)
    print(f"{args.sample:,} prompts, exact vs ivf (nprobe {NPROBE}): keep agreement {side['keep_agreement']:.5f} "
          f"(exact drops {side['dropped_exact']:,}); of {side['similar_pairs']:,} pairs at cosine >= "
          f"{GROUP_THRESHOLD}, across folds: exact {side['leakage_pairs_exact']}, ivf {side['leakage_pairs_ivf']}; "
          f"exact {side['exact_s']:.1f} s, ivf {side['ivf_s']:.1f} s", flush=True)

    vectors = embeddings(args.rows)
    keep, _, ivf_s = text_passes(vectors, "ivf")
    rate = args.rows / ivf_s
    print(f"{args.rows:,} prompts through dedup + groups + folds (ivf): {ivf_s:.1f} s, {rate:,.0f} prompts/s, "
          f"{(~keep).sum():,} dropped; projected 1M: {1e6 / rate / 60:.1f} min", flush=True)
    del vectors

    embed = embed_rate(args.embed, args.device)
    print(f"MiniLM on {args.device}: {embed:,.0f} prompts/s; 10M prompts: {1e7 / embed / 3600:.1f} h", flush=True)

    figures = {"prompts_per_s": rate, "projected_1m_cpu_min": 1e6 / rate / 60,
               "keep_agreement": side["keep_agreement"], "leakage_pairs_exact": side["leakage_pairs_exact"],
               "leakage_pairs_ivf": side["leakage_pairs_ivf"], "similar_pairs": side["similar_pairs"],
               "embed_prompts_per_s": embed}
    if args.device.startswith("cuda"):
        gpu_rows = embeddings(args.gpu_rows, seed=2)
        gpu_s = text_passes(gpu_rows, "exact", device=args.device)[2]
        figures["projected_10m_gpu_min"] = gpu_s * (1e7 / args.gpu_rows) ** 2 / 60
        print(f"exact passes on {args.device}, {args.gpu_rows:,} prompts: {gpu_s:.1f} s; projected 10M: "
              f"{figures['projected_10m_gpu_min']:.1f} min", flush=True)
    figures["peak_rss_mb"] = peak_rss_mb()
    print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
