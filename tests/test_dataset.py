"""The text steps of build_dataset: cleaning, semantic dedup, similarity groups and folds, resumable steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import dying_embedder

from kaggle_i2p import dataset
from kaggle_i2p.core.ensemble import l2_normalize
from kaggle_i2p.dataset import assign_folds, clean, collect, semantic_dedup, similarity_groups
from kaggle_i2p.models.text import embed_prompts


def test_clean_drops_each_kind_with_counts():
    frame = pd.DataFrame({"prompt": ["  a   cat on a mat  ", "", "cat", "word " * 80, "кошка сидит на коврике в саду",
                                     "A cat on a MAT", "portrait of an astronaut, oil painting",
                                     "一只猫坐在垫子上的照片"],  # no spaces: one "word", so too short first
                          "source": "s"})
    kept, dropped = clean(frame)
    assert kept["prompt"].tolist() == ["a cat on a mat", "portrait of an astronaut, oil painting"]
    assert dropped == {"empty": 1, "too_short": 2, "too_long": 1, "non_english": 1, "exact_duplicate": 1}


def test_semantic_dedup_keeps_the_first_of_each_near_duplicate_set():
    prompts = ["a cat sitting on a mat", "a dog running in a park", "a cat sitting on the mat",
               "portrait of an astronaut, oil painting", "A portrait of an astronaut, oil painting.",
               "a dog running in the park"]
    embeddings = embed_prompts(prompts)
    for block in (4096, 2):  # the same answer whether duplicates share a block or not
        keep = semantic_dedup(embeddings, threshold=0.9, block=block)
        assert [p for p, k in zip(prompts, keep, strict=True) if k] == prompts[:2] + prompts[3:4]


def test_groups_follow_similarity_transitively_and_never_cross_folds():
    rng = np.random.default_rng(0)
    base = l2_normalize(rng.standard_normal((6, 64)))
    chain = [base[0], l2_normalize(base[0] + 0.6 * base[1]), l2_normalize(base[0] + 1.2 * base[1])]
    vectors = np.array([*chain, base[2], base[3], l2_normalize(base[3] + 0.1 * base[4]), base[5]])
    sims = vectors @ vectors.T
    assert sims[0, 2] < 0.7 <= min(sims[0, 1], sims[1, 2])  # 0-2 only through 1
    for block in (4096, 3):
        groups = similarity_groups(vectors, threshold=0.7, block=block)
        assert groups.tolist() == [0, 0, 0, 1, 2, 2, 3]
    folds = assign_folds(np.repeat(np.arange(40), 3), n_folds=5)
    for group in range(40):
        assert len(set(folds[group * 3:group * 3 + 3])) == 1
    assert sorted(np.bincount(folds).tolist()) == [24] * 5


def test_text_steps_end_to_end_and_resume(tmp_path, sample_dir, monkeypatch):
    (tmp_path / "extra.txt").write_text("an astronaut standing on a engaging white rose, amid ivory cherry blossoms\n"
                                        "a lighthouse on a cliff during a storm\n\nok\n")
    sources = [f"{sample_dir / 'prompts.csv'}:prompt", str(tmp_path / "extra.txt")]
    index_path = dataset.run_text_steps(sources, tmp_path / "work", n_folds=3)
    index = pd.read_parquet(index_path)
    assert list(index.columns) == ["promptId", "prompt", "source", "group", "fold"]
    assert len(index) == 8  # 7 sample prompts + the lighthouse; the near-duplicate astronaut and "ok" are gone
    assert "a lighthouse on a cliff during a storm" in index["prompt"].tolist()
    assert index.groupby("group")["fold"].nunique().max() == 1
    targets = np.load(tmp_path / "work" / "prompt_targets.npy")
    np.testing.assert_allclose(targets, embed_prompts(index["prompt"].tolist()), atol=1e-6)

    monkeypatch.setattr(dataset.prompts, "semantic_dedup", lambda *a, **k: pytest.fail("a finished step was redone"))
    monkeypatch.setattr(dataset.prompts, "iter_collect", lambda *a, **k: pytest.fail("a finished step was redone"))
    (tmp_path / "work" / "prompt_index.parquet").unlink()  # only the last step is missing
    assert pd.read_parquet(dataset.run_text_steps(sources, tmp_path / "work", n_folds=3)).equals(index)
    with pytest.raises(dataset.DatasetError, match="holds the text step of .*prompts.csv:prompt, .*extra.txt"):
        dataset.run_text_steps([str(tmp_path / "extra.txt")], tmp_path / "work", n_folds=3)  # other input: refused


def test_clean_streams_in_batches_with_the_answer_of_one_frame(tmp_path, monkeypatch):
    """The clean step reads prompts.parquet in batches; exact duplicates are found across batches (a shared set), so
    the clean file equals cleaning the whole frame at once."""
    frame = pd.DataFrame({"prompt": ["a red fox in snow", "an owl at night time", "A red fox in SNOW", "ok",
                                     "an owl at night time", "a lighthouse in a storm", "a red fox in snow"],
                          "source": "s"})
    (tmp_path / "w").mkdir()
    frame.to_parquet(tmp_path / "w" / "prompts.parquet", index=False)
    monkeypatch.setattr(dataset.prompts, "CLEAN_BATCH_ROWS", 2)
    dataset.prompts.clean_step(tmp_path / "w")
    streamed = pd.read_parquet(tmp_path / "w" / "clean.parquet")
    assert streamed.equals(clean(frame)[0])
    assert streamed["prompt"].tolist() == ["a red fox in snow", "an owl at night time", "a lighthouse in a storm"]


def test_collect_reads_columns_and_records_sources(tmp_path):
    (tmp_path / "a.csv").write_text("id,text\n1,a red fox in snow\n")
    (tmp_path / "b.txt").write_text("an owl at night\n")
    frame = collect([f"{tmp_path / 'a.csv'}:text", str(tmp_path / "b.txt")])
    assert frame.to_dict("records") == [{"prompt": "a red fox in snow", "source": "a.csv"},
                                        {"prompt": "an owl at night", "source": "b.txt"}]


def _reference_dedup(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """The greedy definition, one row at a time (the algorithm before it was vectorised)."""
    keep, kept = np.zeros(len(vectors), dtype=bool), []
    for i, row in enumerate(vectors):
        if not kept or (np.asarray(kept) @ row).max() < threshold:
            keep[i] = True
            kept.append(row)
    return keep


def _reference_groups(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components by a plain scalar union-find over every pair."""
    parent = list(range(len(vectors)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(vectors @ vectors.T >= threshold), strict=True):
        root_a, root_b = find(int(a)), find(int(b))
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return np.unique([find(i) for i in range(len(vectors))], return_inverse=True)[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_dedup_and_groups_match_the_definitions_on_clustered_sets(seed):
    """1500 prompt-like vectors with chains of planted near-duplicates: the block-wise tensor decisions equal the
    row-by-row greedy and the scalar union-find, whatever the block size."""
    from kaggle_i2p.testing import prompt_like_embeddings

    rng = np.random.default_rng(seed)
    vectors = prompt_like_embeddings(1500, 32, seed=seed, topics=40)
    for start in rng.choice(1400, 60, replace=False):  # chains: each row a small step from the one before
        for i in range(start + 1, start + 5):
            vectors[i] = l2_normalize(vectors[i - 1] + 0.25 * rng.standard_normal(32) / np.sqrt(32))
    vectors = vectors.astype(np.float32)
    expected_keep = _reference_dedup(vectors, 0.9)
    expected_groups = _reference_groups(vectors, 0.8)
    assert 0 < (~expected_keep).sum() and len(np.unique(expected_groups)) < 1500  # both do something here
    for block in (4096, 97):
        assert np.array_equal(semantic_dedup(vectors, threshold=0.9, block=block), expected_keep)
        assert np.array_equal(similarity_groups(vectors, threshold=0.8, block=block), expected_groups)


def _clustered_with_chains(seed: int, n: int = 1500, dim: int = 32) -> np.ndarray:
    """Prompt-like vectors with chains of planted near-duplicates (each row a small step from the one before)."""
    from kaggle_i2p.testing import prompt_like_embeddings

    rng = np.random.default_rng(seed)
    vectors = prompt_like_embeddings(n, dim, seed=seed, topics=40)
    for start in rng.choice(n - 100, n // 25, replace=False):
        for i in range(start + 1, start + 5):
            vectors[i] = l2_normalize(vectors[i - 1] + 0.25 * rng.standard_normal(dim) / np.sqrt(dim))
    return vectors.astype(np.float32)


def test_ivf_pairs_give_the_exact_answers_when_every_list_is_probed():
    """With every inverted list probed no pair can be missed: dedup and groups through the IVF pairs equal the exact
    passes, and the found pairs are exactly the brute-force pairs."""
    from kaggle_i2p.dataset.pairs import probe_lists, similar_pairs

    vectors = _clustered_with_chains(0)
    probes = probe_lists(vectors, nlist=8, nprobe=8)
    a, b = similar_pairs(vectors, probes, 0.8)
    expected = np.argwhere(np.triu(vectors @ vectors.T >= 0.8, k=1))
    assert np.array_equal(np.stack([a, b], axis=1), expected)
    assert np.array_equal(semantic_dedup(vectors, 0.9, probes=probes), semantic_dedup(vectors, 0.9))
    assert np.array_equal(similarity_groups(vectors, 0.8, probes=probes), similarity_groups(vectors, 0.8))


def test_ivf_with_few_probes_agrees_with_exact_and_leakage_is_counted():
    """One probe of 32 lists misses pairs across list borders: the keep decisions still agree on nearly every row,
    and `leakage_pairs` counts exactly the similar pairs that cross folds (0 for exact groups)."""
    from kaggle_i2p.dataset.pairs import leakage_pairs, probe_lists

    vectors = _clustered_with_chains(1, n=3000)
    probes = probe_lists(vectors, nlist=32, nprobe=1)
    exact_keep = semantic_dedup(vectors, 0.9)
    agreement = (semantic_dedup(vectors, 0.9, probes=probes) == exact_keep).mean()
    assert 0.97 <= agreement < 1.0  # approximate, and close
    folds = assign_folds(similarity_groups(vectors, 0.8), 5)
    similar = np.triu(vectors @ vectors.T >= 0.8, k=1)
    assert leakage_pairs(vectors, folds, 0.8, block=700) == (0, similar.sum())
    ivf_folds = assign_folds(similarity_groups(vectors, 0.8, probes=probes), 5)
    expected = int((similar & (ivf_folds[:, None] != ivf_folds[None, :])).sum())
    assert expected > 0 and leakage_pairs(vectors, ivf_folds, 0.8, block=700) == (expected, similar.sum())


def test_greedy_over_pairs_is_the_row_by_row_greedy():
    """The sparse rounds over a pair list decide as the definition does, on long chains and dense cliques."""
    from kaggle_i2p.dataset.pairs import greedy_keep_pairs

    vectors = _clustered_with_chains(2, n=800)
    similar = np.triu(vectors @ vectors.T >= 0.9, k=1)
    a, b = np.nonzero(similar)
    assert np.array_equal(greedy_keep_pairs(len(vectors), a, b), _reference_dedup(vectors, 0.9))


def _text_sources(tmp_path, sample_dir) -> list[str]:
    (tmp_path / "extra.txt").write_text("a lighthouse on a cliff during a storm\nan owl asleep on a snowy branch\n"
                                        "a red bicycle leaning on a brick wall\na bowl of ramen, studio photo\n")
    return [f"{sample_dir / 'prompts.csv'}:prompt", str(tmp_path / "extra.txt")]


def _work_bytes(work) -> dict[str, bytes]:
    return {name: (work / name).read_bytes() for name in ("dedup.parquet", "prompt_targets.npy",
                                                          "prompt_index.parquet")}


def test_text_step_embeds_in_shards_resumes_after_a_kill_and_ranks_equal_one_process(tmp_path, sample_dir,
                                                                                      monkeypatch):
    """The embeddings stream in shards of the clean prompts: a run killed in the third shard redoes only the shards
    not written; two ranks (run one after the other) share the shards and rank 0 writes the index; all three ways
    end in the same bytes, and the shard folder is gone."""
    from kaggle_i2p.bank import build as bankbuild

    sources = _text_sources(tmp_path, sample_dir)
    monkeypatch.setattr(dataset.prompts, "EMBED_SHARD_ROWS", 3)
    whole = tmp_path / "whole"
    dataset.run_text_steps(sources, whole, n_folds=3)
    assert not (whole / "embeddings").exists() and not (whole / "embeddings.building").exists()

    seen, kill_at = [], [3]  # Ctrl-C while embedding the third shard
    monkeypatch.setattr(bankbuild, "minilm_embedder",
                        dying_embedder(bankbuild.minilm_embedder, seen, kill_at, KeyboardInterrupt))
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        dataset.run_text_steps(sources, resumed, n_folds=3)
    assert sorted(p.name for p in (resumed / "embeddings.building").glob("*.npz")) == ["shard-000000.npz",
                                                                                       "shard-000001.npz"]
    seen.clear()
    kill_at.clear()
    dataset.run_text_steps(sources, resumed, n_folds=3)
    assert seen == [3, 2]  # 11 clean prompts: only shards 2 (3 prompts) and 3 (2) are embedded again
    assert _work_bytes(resumed) == _work_bytes(whole)

    ranks = tmp_path / "ranks"
    dataset.prompts.collect_step(sources, ranks, 3)  # rank 0's first steps (rank 1 would wait for them)
    dataset.prompts.clean_step(ranks)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dataset.run_text_steps(sources, ranks, n_folds=3) is None  # its shards done; rank 0 goes on
    assert sorted(p.name for p in (ranks / "embeddings.building").glob("*.npz")) == ["shard-000001.npz",
                                                                                      "shard-000003.npz"]
    monkeypatch.setenv("RANK", "0")
    assert dataset.run_text_steps(sources, ranks, n_folds=3) == ranks / "prompt_index.parquet"
    assert _work_bytes(ranks) == _work_bytes(whole)


def test_text_step_with_ivf_search_matches_exact_on_the_sample(tmp_path, sample_dir):
    """--search ivf runs the same steps through probed inverted lists; on the sample it decides as the exact search
    (and asking for ivf without FAISS would be refused before any compute: see the CLI test)."""
    sources = _text_sources(tmp_path, sample_dir)
    exact = dataset.run_text_steps(sources, tmp_path / "exact", n_folds=3, search="exact")
    ivf = dataset.run_text_steps(sources, tmp_path / "ivf", n_folds=3, search="ivf", nprobe=1)
    assert pd.read_parquet(ivf).equals(pd.read_parquet(exact))
    with pytest.raises(dataset.DatasetError, match="--search 'faiss'"):
        dataset.run_text_steps(sources, tmp_path / "bad", n_folds=3, search="faiss")
    assert not (tmp_path / "bad").exists()


def test_ivf_without_faiss_is_refused_before_any_compute(tmp_path, sample_dir, monkeypatch, capsys):
    """No FAISS: --search ivf is one clear error (exit 2) before anything is read or written; auto falls back to the
    exact passes with a warning."""
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    sources = _text_sources(tmp_path, sample_dir)
    assert dataset.main(["text", *sources, "--work", str(tmp_path / "w"), "--search", "ivf"]) == 2
    assert "pip install 'kaggle_i2p[index]'" in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert dataset.prompts._choose_search("auto", 10**6, "cpu") == "exact"


def test_screened_similarities_decide_as_fp32_products(monkeypatch):
    """The GPU path's logic on the CPU: products screened in bfloat16 (margin 2^-6 for its 8-bit mantissa) with the
    unsure rows multiplied again in fp32 give the fp32 decisions exactly, also for pairs planted at the threshold
    +- 1e-3; dedup and groups through the screen equal the definitions."""
    import torch

    from kaggle_i2p.dataset import pairs
    from kaggle_i2p.testing import plant_near_duplicates, prompt_like_embeddings

    vectors = plant_near_duplicates(prompt_like_embeddings(1200, 48, seed=3, topics=30), 0.1, (0.899, 0.901), seed=3)
    x = torch.from_numpy(vectors)
    expected = {t: (x @ x.T >= t) for t in (0.8, 0.9)}
    monkeypatch.setitem(pairs.SCREENS, "cpu", (torch.bfloat16, 2**-6))
    screened = (x.bfloat16() @ x.bfloat16().T).float()
    assert ((screened >= 0.9) != expected[0.9]).any()  # bfloat16 alone would decide some pairs otherwise
    for threshold, exact in expected.items():
        assert torch.equal(pairs.similar(x, x, threshold), exact)
    assert np.array_equal(semantic_dedup(vectors, 0.9, block=500), _reference_dedup(vectors, 0.9))
    assert np.array_equal(similarity_groups(vectors, 0.8, block=500), _reference_groups(vectors, 0.8))
