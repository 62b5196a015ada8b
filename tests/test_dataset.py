"""The text steps of build_dataset: cleaning, semantic dedup, similarity groups and folds, resumable steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kaggle_i2p import dataset
from kaggle_i2p.dataset import assign_folds, clean, collect, semantic_dedup, similarity_groups
from kaggle_i2p.ensemble import l2_normalize
from kaggle_i2p.text import embed_prompts


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
    index_path = dataset.run_text_steps([f"{sample_dir / 'prompts.csv'}:prompt", str(tmp_path / "extra.txt")],
                                        tmp_path / "work", n_folds=3)
    index = pd.read_parquet(index_path)
    assert list(index.columns) == ["promptId", "prompt", "source", "group", "fold"]
    assert len(index) == 8  # 7 sample prompts + the lighthouse; the near-duplicate astronaut and "ok" are gone
    assert "a lighthouse on a cliff during a storm" in index["prompt"].tolist()
    assert index.groupby("group")["fold"].nunique().max() == 1
    targets = np.load(tmp_path / "work" / "prompt_targets.npy")
    np.testing.assert_allclose(targets, embed_prompts(index["prompt"].tolist()), atol=1e-6)

    monkeypatch.setattr(dataset.prompts, "semantic_dedup", lambda *a, **k: pytest.fail("a finished step was redone"))
    monkeypatch.setattr(dataset.prompts, "collect", lambda *a, **k: pytest.fail("a finished step was redone"))
    (tmp_path / "work" / "prompt_index.parquet").unlink()  # only the last step is missing
    assert pd.read_parquet(dataset.run_text_steps(["unused"], tmp_path / "work", n_folds=3)).equals(index)


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
