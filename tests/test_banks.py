"""Banks at scale: build-bank streams, resumes and shares shards over ranks; the FAISS IVF-PQ index round trip with
its measured recall; index search in a manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import dying_embedder

import kaggle_i2p
from kaggle_i2p.bank import build as bankbuild
from kaggle_i2p.bank import textfiles
from kaggle_i2p.bank.build import build_bank, index_bank
from kaggle_i2p.bank.folder import Bank, BankError, retrieve
from kaggle_i2p.bank.index import ivfpq_parameters, measure_recall
from kaggle_i2p.bank.search import nearest, read_index
from kaggle_i2p.cli import main
from kaggle_i2p.manifest import ManifestError, load_manifest
from kaggle_i2p.testing import build_clip_retrieval, prompt_like_embeddings, synthetic_bank

SUBJECTS = ["a red fox", "an old lighthouse", "a robot", "a bowl of ramen", "a castle", "a cat astronaut",
            "a rainy street", "a dragon", "a sailing ship", "a desert city", "a forest spirit"]
STYLES = ["oil painting", "photo, 35mm", "watercolor", "pixel art"]


def _prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i // len(SUBJECTS) % len(STYLES)]}, variant {i}"
            for i in range(n)]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    lines = _prompts(23)
    lines.insert(5, "   ")  # blank lines are not texts
    path.write_text("\n".join(lines) + "\n")
    return path


class Killed(BaseException):
    """A kill in the middle of a shard (as SIGKILL would leave it: nothing after it runs)."""


def _bank_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("texts.txt", "targets.npy", "keys.npy")}


def test_build_bank_streams_in_shards_and_resumes_after_a_kill(tmp_path, prompts_file, monkeypatch):
    monkeypatch.setattr(textfiles, "READ_BATCH_ROWS", 4)  # the reader never holds more than 4 lines
    whole = build_bank(prompts_file, tmp_path / "whole", keys="minilm", shard_rows=5)
    assert not (tmp_path / "whole.building").exists()
    bank = Bank.open(whole)
    assert len(bank) == 23 and bank.texts([0, 22]) == [_prompts(23)[0], _prompts(23)[22]]
    assert np.array_equal(np.asarray(bank.keys), np.asarray(bank.targets))

    seen, kill_at = [], [3]  # killed while embedding the third shard
    monkeypatch.setattr(bankbuild, "minilm_embedder",
                        dying_embedder(bankbuild.minilm_embedder, seen, kill_at, Killed))
    with pytest.raises(Killed):
        build_bank(prompts_file, tmp_path / "resumed", keys="minilm", shard_rows=5)
    work = tmp_path / "resumed.building"
    assert sorted(p.name for p in work.glob("shard-*.npz")) == ["shard-000000.npz", "shard-000001.npz"]
    assert seen == [5, 5, 5]
    seen.clear()
    kill_at.clear()
    build_bank(prompts_file, tmp_path / "resumed", keys="minilm", shard_rows=5)
    assert seen == [5, 5, 3]  # only shards 2, 3 and 4 were embedded again
    assert _bank_bytes(tmp_path / "resumed") == _bank_bytes(whole) and not work.exists()


def test_ranks_share_the_shards_and_the_last_one_assembles(tmp_path, prompts_file, monkeypatch):
    single = build_bank(prompts_file, tmp_path / "single", keys="minilm", shard_rows=4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert build_bank(prompts_file, tmp_path / "shared", keys="minilm", shard_rows=4) is None
    work = tmp_path / "shared.building"
    assert sorted(p.name for p in work.glob("shard-*.npz")) == ["shard-000001.npz", "shard-000003.npz",
                                                                 "shard-000005.npz"]
    monkeypatch.setenv("RANK", "0")
    assert build_bank(prompts_file, tmp_path / "shared", keys="minilm", shard_rows=4) == (tmp_path / "shared")
    assert _bank_bytes(tmp_path / "shared") == _bank_bytes(single) and not work.exists()


def test_a_resumed_build_must_match_its_plan_and_a_foreign_work_folder_is_refused(tmp_path, prompts_file,
                                                                                   monkeypatch):
    work = tmp_path / "bank.building"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="is not a build-bank work folder"):
        build_bank(prompts_file, tmp_path / "bank", keys="minilm")
    assert (work / "notes.txt").read_text() == "mine"

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert build_bank(prompts_file, tmp_path / "other", keys="minilm", shard_rows=4) is None
    with pytest.raises(BankError, match="holds an unfinished build of another input or other settings: keys"):
        build_bank(prompts_file, tmp_path / "other", keys="none", shard_rows=4)


def test_cli_builds_an_indexed_bank_and_reports_its_recall(tmp_path, capsys):
    texts = tmp_path / "prompts.csv"
    import pandas as pd

    pd.DataFrame({"prompt": _prompts(400)}).to_csv(texts, index=False)
    assert main(["build-bank", str(texts), "--out", str(tmp_path / "bank"), "--keys", "minilm", "--index",
                 "ivf-pq", "--shard-rows", "150"]) == 0
    printed = capsys.readouterr().out
    bank = Bank.open(tmp_path / "bank")
    entry = bank.meta["index"]
    assert entry["factory"] == "IVF10,PQ96" and entry["nlist"] == 10 and entry["recall_k"] == 32
    assert entry["recall_query_source"] == "held-out bank rows" and entry["recall_queries"] == 40
    assert entry["recall"][str(entry["nprobe"])] >= 0.95
    assert f"index IVF10,PQ96 (recall@32 {entry['recall'][str(entry['nprobe'])]:.3f}" in printed
    assert (tmp_path / "bank" / "index.faiss").is_file()


def test_build_bank_refuses_an_index_without_keys_or_faiss_before_embedding(tmp_path, prompts_file, monkeypatch,
                                                                             capsys):
    import builtins

    monkeypatch.setattr(bankbuild, "minilm_embedder", lambda *a: pytest.fail("embedded before refusing"))
    assert main(["build-bank", str(prompts_file), "--out", str(tmp_path / "b"), "--index", "ivf-pq"]) == 2
    assert "an index searches keys" in capsys.readouterr().err
    (tmp_path / "queries.npy").write_text("not an array")
    assert main(["build-bank", str(prompts_file), "--out", str(tmp_path / "b"), "--keys", "minilm", "--index",
                 "ivf-pq", "--recall-queries", str(tmp_path / "queries.npy")]) == 2
    assert "queries.npy: not a readable .npy file" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    assert main(["build-bank", str(prompts_file), "--out", str(tmp_path / "b"), "--keys", "minilm",
                 "--index", "ivf-pq"]) == 2
    assert "pip install 'kaggle_i2p[index]'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.building").exists()


def test_faiss_guidance_by_bank_size():
    assert ivfpq_parameters(3_000, 384).factory == "IVF76,PQ96"  # below 1M: 4 sqrt(N), at least 39 rows per list
    assert ivfpq_parameters(500_000, 384).factory == "IVF2048,PQ96"
    assert ivfpq_parameters(5_000_000, 1024).factory == "IVF65536_HNSW32,PQ64"  # 64 divides 1024
    assert ivfpq_parameters(6000, 64).factory == "IVF153,PQ16"
    big = ivfpq_parameters(56_000_000, 384)
    assert big.factory == "IVF262144_HNSW32,PQ96" and big.train_rows == 64 * 262_144
    assert big.resident_bytes(56_000_000, 384) / 2**30 < 8  # the 4th place's bank in under 8 GB


def test_index_round_trip_recall_and_exactness(tmp_path):
    """An index over a 6000-row prompt-like bank: its measured recall is stored, searching every list gives the
    exact search's rows, and at the default nprobe recall@32 reaches 0.95 on held-out queries."""
    folder = synthetic_bank(tmp_path / "bank", 6000, 64, seed=0)
    entry = index_bank(folder)
    bank = Bank.open(folder)
    assert json.loads((folder / "bank.json").read_text())["index"] == entry == bank.meta["index"]
    assert entry["recall"][str(entry["nprobe"])] >= 0.95
    index = read_index(folder)
    queries = prompt_like_embeddings(200, 64, seed=0, first_row=10_000_000)  # held out: never bank rows
    exact_values, exact_rows = nearest(queries, bank.keys, 32)
    all_lists = nearest(queries, bank.keys, 32, index=index, nprobe=entry["nlist"], candidates=6000)
    assert np.array_equal(all_lists[1], exact_rows) and np.array_equal(all_lists[0], exact_values)
    recall = measure_recall(index, bank.keys, queries, ladder=(entry["nprobe"],))
    assert recall[entry["nprobe"]] >= 0.95
    assert entry["factory"] == ivfpq_parameters(6000, 64).factory  # the guidance's layout was built


def test_index_search_in_a_manifest(tmp_path, sample_dir):
    """`search: index` is checked before any weight loads, and with every list probed it gives the exact run's bytes."""
    exact_path = build_clip_retrieval(tmp_path, {"k": 5, "temperature": 0.1, "score": "embedding"})
    data = yaml.safe_load(exact_path.read_text())
    data["towers"][0]["retrieval"].update(search="index", nprobe=3, candidates=300)  # every list, every row
    path = tmp_path / "indexed.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError, match="has no index.faiss; build the bank with `kaggle-i2p build-bank --index"):
        load_manifest(path)
    entry = index_bank(tmp_path / "texts", nlist=3)
    assert entry["nlist"] == 3
    indexed = load_manifest(path).towers[0]
    assert indexed.retrieval.search == "index" and "index search" in indexed.describe()
    options = {"device": "cpu", "num_workers": 0, "progress": False}
    exact = kaggle_i2p.run_prediction(sample_dir / "images", exact_path, **options)
    via_index = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    assert np.array_equal(exact.embeddings, via_index.embeddings)
    assert retrieve(np.ones((1, 32)), Bank.open(tmp_path / "texts"), k=5).shape == (1, 384)


def test_an_index_search_without_faiss_is_one_manifest_problem(tmp_path, monkeypatch):
    import importlib.util

    build_clip_retrieval(tmp_path, {"score": "embedding"})
    index_bank(tmp_path / "texts", nlist=3)
    path = build_clip_retrieval(tmp_path, {"score": "embedding", "search": "index"}, "indexed.yaml")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with pytest.raises(ManifestError, match=r"retrieval.search: an index search needs FAISS, which is not "
                                            r"installed: pip install 'kaggle_i2p\[index\]'"):
        load_manifest(path)


def test_the_4th_place_blend_validates_and_runs_on_synthetic_weights(tmp_path, sample_dir, monkeypatch):
    """configs/blend_4th_place.yaml as shipped validates (every arch built and run on the meta device against a
    1024-d keyed, indexed bank); the same blend with tiny stand-in archs and random weights predicts the sample,
    its index search equal to exact search when the candidates cover the bank."""
    from pathlib import Path

    from safetensors.torch import save_file

    from kaggle_i2p.core.ensemble import combine_towers
    from kaggle_i2p.manifest import parse_manifest
    from kaggle_i2p.models.towers import build_tower, check_architectures

    blend_path = Path(__file__).resolve().parents[1] / "configs" / "blend_4th_place.yaml"
    monkeypatch.setenv("I2P_BANK", str(synthetic_bank(tmp_path / "bank_h14", 1200, 1024)))
    index_bank(tmp_path / "bank_h14", nlist=4)
    shipped = load_manifest(blend_path, check_files=False)
    check_architectures(shipped.towers)
    retrieval = shipped.towers[0].retrieval
    assert [t.kind for t in shipped.towers] == ["retrieval", "regressor", "regressor"]
    assert retrieval.search == "index" and retrieval.key_dim == 1024 and shipped.towers[0].arch == "ViT-H-14"

    small = tmp_path / "small"
    build_clip_retrieval(small, {"score": "embedding"})  # the tiny CLIP, its 300-row bank and checkpoint
    index_bank(small / "texts", nlist=3)
    data = yaml.safe_load(blend_path.read_text())
    clip, eva, convnext = data["towers"]
    clip.update(arch="tiny_open_clip_vit.json", checkpoint="clip.safetensors")
    clip["image"]["resolutions"] = [64]
    clip["retrieval"].update(bank="texts", candidates=300)
    eva.update(arch="test_vit", checkpoint="eva.safetensors")
    eva["image"]["resolutions"] = [64, 96]
    convnext.update(arch="tiny_open_clip_vit.json", checkpoint="convnext.safetensors")
    convnext["image"]["resolutions"] = [64]
    data["fallback"] = "fallback.npy"
    path = small / "blend.yaml"
    for spec in parse_manifest(data, path, check_files=False).towers[1:]:
        save_file({k: v.contiguous() for k, v in build_tower(spec).state_dict().items()}, str(spec.checkpoint))
    path.write_text(yaml.safe_dump(data))
    options = {"device": "cpu", "num_workers": 0, "progress": False}
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    manifest = load_manifest(path)
    assert run.summary.fallbacks == [] and np.allclose(np.linalg.norm(run.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(run.embeddings, combine_towers(run.tower_embeddings, manifest.weights), atol=1e-6)
    clip["retrieval"] = {k: v for k, v in clip["retrieval"].items() if k not in ("search", "candidates")}
    path.write_text(yaml.safe_dump(data))
    exact = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    assert np.array_equal(exact.embeddings, run.embeddings)


def test_a_stale_index_is_a_manifest_problem_before_any_compute(tmp_path):
    build_clip_retrieval(tmp_path, {"score": "embedding"})
    index_bank(tmp_path / "texts", nlist=3)
    path = build_clip_retrieval(tmp_path, {"score": "embedding", "search": "index"}, "indexed.yaml")
    with open(tmp_path / "texts" / "index.faiss", "ab") as handle:
        handle.write(b"\0")  # another index file than the one bank.json describes
    with pytest.raises(ManifestError, match=r"index.faiss was built for other keys or was changed: bank.json says "
                                            r"bytes \d+ \(now \d+\); rebuild it with `kaggle-i2p index-bank"):
        load_manifest(path)


def test_the_bank_pass_halves_its_query_block_on_out_of_memory(monkeypatch, caplog):
    import torch

    from kaggle_i2p.bank import search

    keys = prompt_like_embeddings(500, 16).astype(np.float16)
    queries = prompt_like_embeddings(300, 16, spread=0.8, first_row=10_000)
    expected = nearest(queries, keys, 5)
    real_pass, blocks_tried = search._one_pass, []

    def small_memory(queries, keys, n, device, chunk_rows, transfer, progress, block):
        blocks_tried.append(block)
        if block > 128:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_pass(queries, keys, n, device, chunk_rows, transfer, progress, block)

    monkeypatch.setattr(search, "_one_pass", small_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    values, rows = nearest(queries, keys, 5)
    assert blocks_tried == [1024, 512, 256, 128]
    assert np.array_equal(rows, expected[1]) and np.array_equal(values, expected[0])
    assert "out of GPU memory; starting again with 128 queries at a time" in caplog.text
