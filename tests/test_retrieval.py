"""Retrieval over text banks: exact rows come back, top-k and temperature behave, a 1M-row bank stays in bounded
memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import yaml

from kaggle_i2p.bank.folder import Bank, BankError, retrieve, retrieve_from_logits, soft_average, write_bank
from kaggle_i2p.bank.search import HostToDevice, exact_candidates, nearest, rescore
from kaggle_i2p.core.ensemble import l2_normalize


@pytest.fixture
def bank(tmp_path) -> Bank:
    rng = np.random.default_rng(0)
    keys, targets = rng.standard_normal((1000, 32)), rng.standard_normal((1000, 384))
    texts = [f"text {i}" for i in range(1000)]
    return Bank.open(write_bank(tmp_path / "bank", texts, targets, keys, meta={"source": "synthetic"}))


def test_the_matching_row_comes_back(bank):
    query = torch.from_numpy(np.asarray(bank.keys[[123, 456]], dtype=np.float32))
    out = retrieve(query, bank, k=1)
    expected = l2_normalize(np.asarray(bank.targets[[123, 456]], dtype=np.float32))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    sharp = retrieve(query, bank, k=16, temperature=1e-4)  # a sharp softmax over 16 is the top-1
    np.testing.assert_allclose(sharp, expected, atol=1e-4)
    assert bank.texts([456, 123]) == ["text 456", "text 123"] and bank.meta["rows"] == 1000


def _brute_force(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(queries, np.float64) @ np.asarray(keys, np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def _queries(n: int, dim: int, seed: int = 1) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)))


def test_one_pass_equals_the_per_batch_search_and_brute_force(bank):
    """One pass over the bank for all queries gives the same bytes as a search per batch of 7 (the old path's
    shape), and the rows and scores of a float64 brute force."""
    queries = _queries(100, 32)
    values, rows = nearest(queries, bank.keys, k=9, chunk_rows=96)
    batched = [nearest(queries[i:i + 7], bank.keys, k=9, chunk_rows=96) for i in range(0, 100, 7)]
    assert np.array_equal(values, np.concatenate([v for v, _ in batched]))
    assert np.array_equal(rows, np.concatenate([r for _, r in batched]))
    expected_values, expected_rows = _brute_force(queries, bank.keys, 9)
    assert np.array_equal(rows, expected_rows)
    np.testing.assert_allclose(values, expected_values, rtol=0, atol=1e-12)
    at_once = retrieve(queries, bank, k=9, temperature=0.05, chunk_rows=96)
    per_batch = np.concatenate([retrieve(queries[i:i + 7], bank, k=9, temperature=0.05) for i in range(0, 100, 7)])
    assert np.array_equal(at_once, per_batch)


def test_rescoring_keeps_each_row_once_and_breaks_ties_by_row():
    keys = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float16)
    query = np.array([[1.0, 0.0]])
    values, rows = rescore(query, keys, np.array([[3, 1, 1, -1, 0, 2]]), k=3)
    assert rows.tolist() == [[0, 1, 3]]  # rows 0 and 1 tie: the lower first; the repeated 1 and the -1 are dropped
    np.testing.assert_allclose(values, [[1.0, 1.0, 0.6]], atol=1e-3)


class CheckedTransfer(HostToDevice):
    """The CUDA copy protocol, checked on CPU: a host buffer is refilled only after its last copy was waited for, a
    device buffer is overwritten only after the scoring of its last chunk, and scoring waits for its chunk's copy."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.last_copy: dict[int, object] = {}  # host buffer -> its last copy
        self.last_scored: dict[int, object] = {}  # device buffer -> the mark after its chunk was scored
        self.waited: set[int] = set()
        self.used: object = None
        self.current = None
        self.copies = 0

    def copy(self, target, source, after):
        host, device = source.data_ptr(), target.data_ptr()
        assert host not in self.last_copy or id(self.last_copy[host]) in self.waited, "host buffer refilled early"
        assert after is self.last_scored.get(device), "device buffer overwritten before its chunk was scored"
        target.copy_(source)
        event = self.last_copy[host] = object()
        self.current, self.latest, self.copies = device, event, self.copies + 1
        return event

    def use(self, copied):
        self.used = copied

    def scored(self):
        assert self.used is self.latest, "a chunk was scored without waiting for its copy"
        mark = self.last_scored[self.current] = object()
        return mark

    def host_wait(self, copied):
        if copied is not None:
            self.waited.add(id(copied))


def test_the_streaming_protocol_on_cpu(bank):
    """The CUDA path's double buffering (slots reused over 11 chunks, a short last one) keeps its waits and gives
    the brute-force rows."""
    queries = _queries(20, 32, seed=2)
    transfer = CheckedTransfer()
    rows = exact_candidates(queries, bank.keys, 6, chunk_rows=96, transfer=transfer)
    assert transfer.copies == 11  # 1000 rows in chunks of 96
    assert np.array_equal(np.sort(rows, axis=1), np.sort(_brute_force(queries, bank.keys, 6)[1], axis=1))


def test_temperature_interpolates_between_top1_and_the_plain_mean(bank):
    values = torch.tensor([[3.0, 2.0, 1.0]])
    rows = torch.tensor([[10, 20, 30]])
    targets = np.asarray(bank.targets, dtype=np.float32)
    hot = soft_average(values, rows, bank.targets, temperature=1e3)
    np.testing.assert_allclose(hot[0], l2_normalize(targets[[10, 20, 30]].mean(0)), atol=1e-3)
    cold = soft_average(values, rows, bank.targets, temperature=1e-3)
    np.testing.assert_allclose(cold[0], l2_normalize(targets[10]), atol=1e-6)
    weights = torch.softmax(values / 0.5, dim=1)[0].numpy()  # and in between, exactly the softmax weighting
    middle = soft_average(values, rows, bank.targets, temperature=0.5)
    np.testing.assert_allclose(middle[0], l2_normalize(weights @ targets[[10, 20, 30]]), atol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_average(values, rows, bank.targets, temperature=0)


def test_classifier_logits_as_scores(bank):
    logits = torch.full((2, 1000), -10.0)
    logits[0, 7] = 10.0
    logits[1, 999] = 10.0
    out = retrieve_from_logits(logits, bank.targets, k=5, temperature=1.0)
    np.testing.assert_allclose(out, l2_normalize(np.asarray(bank.targets[[7, 999]], dtype=np.float32)), atol=1e-6)
    with pytest.raises(BankError, match="1000 logits for a bank of 10 class phrases"):
        retrieve_from_logits(logits, bank.targets[:10])


def test_million_row_bank_in_bounded_memory(tmp_path):
    n, d, dim, planted = 1_000_000, 32, 16, 987_654
    folder = tmp_path / "big"
    folder.mkdir()
    keys = np.lib.format.open_memmap(folder / "keys.npy", mode="w+", dtype=np.float16, shape=(n, d))
    targets = np.lib.format.open_memmap(folder / "targets.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    rng = np.random.default_rng(0)
    for start in range(0, n, 100_000):
        keys[start:start + 100_000] = l2_normalize(rng.standard_normal((100_000, d))) * 0.5  # far from the query
        targets[start:start + 100_000] = l2_normalize(rng.standard_normal((100_000, dim)))
    query = l2_normalize(rng.standard_normal((1, d)))
    keys[planted] = query[0]
    targets[planted] = l2_normalize(np.arange(dim, dtype=np.float32))
    keys.flush(), targets.flush()
    del keys, targets
    bank = Bank.open(folder)

    tracemalloc.start()
    out = retrieve(torch.from_numpy(query), bank, k=4, temperature=1e-3, chunk_rows=65_536)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_allclose(out[0], l2_normalize(np.arange(dim, dtype=np.float32)), atol=2e-3)
    one_chunk = 65_536 * d * 4  # 8.4 MB of float32 keys
    assert peak < 1.5 * one_chunk  # one chunk at a time, never the whole bank (128 MB as float32)


def test_bank_errors(tmp_path):
    with pytest.raises(BankError, match="not a bank"):
        Bank.open(tmp_path)
    with pytest.raises(BankError, match="2 texts, 3 targets"):
        write_bank(tmp_path / "b", ["a", "b"], np.ones((3, 4)))
    only_targets = Bank.open(write_bank(tmp_path / "c", ["a\nb", "c"], np.ones((2, 4))))
    assert only_targets.texts([0]) == ["a b"]  # newlines inside a text never split a row
    with pytest.raises(BankError, match="no keys.npy"):
        retrieve(torch.ones(1, 4), only_targets)


def test_build_bank_from_the_real_prompts_gives_each_prompt_back(tmp_path, sample_dir, capsys):
    """A MiniLM-keyed bank of the sample prompts, queried with sample_submission's targets, returns each target."""
    from kaggle_i2p.cli import main
    from kaggle_i2p.inference.dryrun import sample_targets

    assert main(["build-bank", str(sample_dir / "prompts.csv"), "--out", str(tmp_path / "prompts_bank"),
                 "--keys", "minilm"]) == 0
    assert "7 texts, targets (7, 384), keys (7, 384)" in capsys.readouterr().out
    bank = Bank.open(tmp_path / "prompts_bank")
    ids, targets = sample_targets(sample_dir / "sample_submission.csv")
    out = retrieve(torch.from_numpy(targets), bank, k=1)
    np.testing.assert_allclose(out, targets, atol=2e-3)  # float16 storage
    assert bank.texts([0])[0] == "hyper realistic photo of very friendly and dystopian crater"
    assert bank.meta["keys"] == "minilm" and bank.meta["rows"] == 7


def test_read_texts_from_txt_csv_and_parquet(tmp_path):
    import pandas as pd

    from kaggle_i2p.bank.textfiles import TextFileError, read_texts

    (tmp_path / "p.txt").write_text("a  cat\n\n a dog \n")
    assert read_texts(tmp_path / "p.txt") == ["a cat", "a dog"]
    pd.DataFrame({"prompt": ["a red  fox", "", "an owl"]}).to_parquet(tmp_path / "p.parquet")
    assert read_texts(tmp_path / "p.parquet") == ["a red fox", "an owl"]
    (tmp_path / "p.csv").write_text("id,text\n1,a cat\n2,\n")
    assert read_texts(tmp_path / "p.csv", column="text") == ["a cat"]
    with pytest.raises(TextFileError, match="no column 'prompt'"):
        read_texts(tmp_path / "p.csv")


def test_clip_keyed_bank_and_clip_image_retrieval_end_to_end(tmp_path, sample_dir, toy_manifest):
    """A tiny random CLIP saved as open_clip saves it: its text tower keys the bank, its image tower queries it."""
    import json

    import open_clip
    import yaml
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import save_file

    import kaggle_i2p
    from kaggle_i2p.bank.build import build_bank
    from kaggle_i2p.inference.images import decode_image, make_view
    from kaggle_i2p.manifest import load_manifest

    config_path = toy_manifest.parent / "tiny_open_clip_vit.json"
    config = json.loads(config_path.read_text())
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**config).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))

    bank = Bank.open(build_bank(sample_dir / "prompts.csv", tmp_path / "bank", keys="clip", clip_arch=str(config_path),
                                clip_checkpoint=tmp_path / "clip.safetensors"))
    texts = bank.texts(range(len(bank)))
    with torch.no_grad():
        expected_keys = torch.nn.functional.normalize(clip.encode_text(SimpleTokenizer()(texts)), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(bank.keys, dtype=np.float32), expected_keys, atol=2e-3)
    assert bank.keys.shape == (7, 32) and bank.meta["keys"] == "clip"

    save_file({"backbone." + k[len("visual."):]: v.contiguous() for k, v in clip.state_dict().items()
               if k.startswith("visual.")}, str(tmp_path / "visual.safetensors"))
    image = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
             "interpolation": "bicubic", "resize": "squash", "resolutions": [64]}
    manifest = {"fallback": str(toy_manifest.parent / "fallback.npy"), "towers": [
        {"name": "clip_retrieval", "kind": "retrieval", "library": "open_clip", "arch": str(config_path),
         "checkpoint": str(tmp_path / "visual.safetensors"), "image": image, "weight": 1,
         "retrieval": {"bank": str(tmp_path / "bank"), "k": 1, "score": "embedding"}}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    spec = load_manifest(tmp_path / "m.yaml").towers[0]
    run = kaggle_i2p.run_prediction(sample_dir / "images", tmp_path / "m.yaml", device="cpu", num_workers=0,
                                    progress=False)
    targets = np.asarray(bank.targets, dtype=np.float32)
    for i, image_id in enumerate(run.ids):
        with torch.no_grad():
            query = clip.encode_image(make_view(decode_image(sample_dir / "images" / f"{image_id}.png")[None],
                                                spec.image, 64))
        query = torch.nn.functional.normalize(query, dim=-1)[0].numpy()
        best = int(np.argmax(np.asarray(bank.keys, np.float32) @ query))
        np.testing.assert_allclose(run.embeddings[i], l2_normalize(targets[best]), atol=1e-5)


def test_clip_keys_need_a_checkpoint(tmp_path, sample_dir):
    from kaggle_i2p.bank.build import build_bank

    with pytest.raises(BankError, match="--keys clip needs --clip-arch and --clip-checkpoint"):
        build_bank(sample_dir / "prompts.csv", tmp_path / "b", keys="clip")


def test_inverse_weighting_is_the_knn_notebooks(bank):
    """weighting: inverse gives the public kNN-regression notebook's 1 / ((1 - cos) ** 6 + 1e-4) over the top k."""
    from kaggle_i2p.bank.folder import neighbour_weights

    cosines = np.array([[0.99, 0.9, 0.5, 1.0 + 1e-7]])
    expected = 1.0 / (np.clip(1.0 - cosines, 0, None) ** 6 + 1e-4)
    np.testing.assert_allclose(neighbour_weights(cosines, weighting="inverse"), expected / expected.sum(), rtol=1e-12)
    queries = _queries(5, 32, seed=4)
    values, rows = _brute_force(queries, bank.keys, 100)
    weights = 1.0 / ((1.0 - values) ** 6 + 1e-4)
    targets = np.asarray(bank.targets, dtype=np.float64)
    notebook = l2_normalize(np.einsum("bk,bkd->bd", weights, targets[rows]))
    np.testing.assert_allclose(retrieve(queries, bank, k=100, weighting="inverse"), notebook, atol=1e-6)
    softmax = retrieve(queries, bank, k=100, temperature=0.05)
    assert np.abs(softmax - notebook).max() > 1e-3  # the two weightings differ
    with pytest.raises(ValueError, match="power > 0 and eps > 0"):
        neighbour_weights(cosines, weighting="inverse", power=0)


def test_a_towers_inverse_weighting_is_validated_written_and_served(tmp_path, sample_dir):
    """The manifest's weighting: validated with the fix, written only when not the default, served through the bank
    pass, and (queries being what the cache stores) outside the tower's cache key."""
    import kaggle_i2p
    from kaggle_i2p.inference.cache import PredictionCache
    from kaggle_i2p.manifest import ManifestError, load_manifest
    from kaggle_i2p.testing import build_clip_retrieval

    inverse = build_clip_retrieval(tmp_path, {"k": 50, "score": "embedding", "weighting": "inverse", "power": 4},
                                   "inverse.yaml")
    softmax = build_clip_retrieval(tmp_path, {"k": 50, "temperature": 0.05, "score": "embedding"}, "softmax.yaml")
    spec = load_manifest(inverse).towers[0]
    entry = spec.to_dict()["retrieval"]
    assert entry["weighting"] == "inverse" and entry["power"] == 4 and "eps" not in entry
    assert "weighting" not in load_manifest(softmax).towers[0].to_dict()["retrieval"]
    cache = PredictionCache(tmp_path / "cache")
    assert cache.tower_key(spec, "fp32", 384, 8) == cache.tower_key(load_manifest(softmax).towers[0], "fp32", 384, 8)
    options = {"device": "cpu", "num_workers": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    a = kaggle_i2p.run_prediction(sample_dir / "images", inverse, **options)
    b = kaggle_i2p.run_prediction(sample_dir / "images", softmax, **options)
    assert b.summary.cached_images == 7 and not np.allclose(a.embeddings, b.embeddings, atol=1e-4)
    for bad, message in [({"weighting": "cubic"}, "weighting: 'cubic' is not one of softmax, inverse"),
                         ({"power": 3}, "power: only for weighting: inverse"),
                         ({"weighting": "inverse", "eps": -1}, "eps: -1 must be a number > 0"),
                         ({"weighting": "inverse", "score": "logits"}, "inverse weighs cosines: it needs score: "
                                                                       "embedding")]:
        data = yaml.safe_load(softmax.read_text())
        data["towers"][0]["retrieval"].update(bad)
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
            load_manifest(tmp_path / "bad.yaml")
