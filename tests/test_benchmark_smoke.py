"""The benchmark's building blocks still run against the current API (tiny inputs; no time is asserted)."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "bench_predict"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_functions_run(tmp_path, toy_manifest):
    bench = _bench()
    images = bench.make_images(tmp_path / "imgs", 3)
    assert sorted(p.name for p in images.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    device = torch.device("cpu")
    assert bench.bare_loop(images, toy_manifest, device, 2) > 0
    assert bench.pipeline(images, toy_manifest, device, 2, 0, tmp_path / "s.csv") > 0
    assert bench.bare_loop(images, toy_manifest, device, 2, "fp16-weights") > 0
    assert 0.999 < bench.fidelity(images, toy_manifest, device, "fp16-weights", n=3) < 1.0 + 1e-6
    assert bench.matmul_peak(device, torch.float32, n=128, repeats=2) > 0
    rows, loading = bench.tower_rows(toy_manifest, device, batch_size=2, repeats=1)
    assert [(tower, view) for tower, view, *_ in rows][:2] == [("toy_timm_vit", "r64"), ("toy_timm_vit", "r64_flip")]
    assert all(rate > 0 and flops > 1e5 for *_, rate, _, flops in rows) and loading > 0
    flops = {view: f for tower, view, _, _, f in rows if tower == "toy_timm_vit"}
    assert flops["r96"] > 2 * flops["r64"] and flops["r64_flip"] == flops["r64"]  # (96/64)^2 = 2.25 x the tokens
    assert (tmp_path / "s.csv").stat().st_size > 0
    (tmp_path / "toy").symlink_to(toy_manifest.parent)
    (tmp_path / "imgs3").symlink_to(images)
    rss = bench.peak_rss_child(3, tmp_path, 0)
    assert rss["main_peak_mb"] > 50 and rss["tree_peak_mb"] >= rss["main_peak_mb"] * 0.5


def test_train_step_benchmark_runs():
    bench = _bench("bench_train_step")
    result = bench.step_time(32, "bf16", 2, 1, torch.device("cpu"), arch="test_vit")
    assert result["resolution"] == 32 and result["precision"] == "bf16" and result["ms_per_step"] > 0


def test_retrieval_benchmark_runs(tmp_path):
    import numpy as np

    from kaggle_i2p.bank.folder import Bank
    from kaggle_i2p.testing import synthetic_bank

    bench = _bench("bench_retrieval")
    bank = Bank.open(synthetic_bank(tmp_path / "bank", 3000, 32, target_dim=8))
    queries = bench.held_out_queries(64, 32)
    exact, rows = bench.exact_rate(bank.keys, queries, k=8)
    assert exact > 0 and rows.shape == (64, 8) and (rows >= 0).all()
    assert bench.baseline_rate(bank.keys, queries, batches=1, k=8) > 0
    figures = bench.index_figures(bank.keys, queries, nlist=8)
    assert figures["params"].nlist == 8 and 0 < figures["recall"][figures["nprobe"]] <= 1
    assert np.isfinite(figures["per_query_s"])


def test_dataset_benchmark_runs():
    """The exact and IVF passes side by side on 3000 planted rows: identical decisions here, no exact leakage."""
    import numpy as np

    bench = _bench("bench_dataset")
    vectors = bench.embeddings(3000)
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() < 1e-5
    side = bench.agreement(vectors)
    assert side["leakage_pairs_exact"] == 0 and 50 < side["dropped_exact"] < 150  # 150 planted, about half >= 0.9
    assert side["keep_agreement"] >= 0.99
    assert bench.embed_rate(8, "cpu") > 0


def test_generate_benchmark_runs_the_tiny_configuration():
    """The SD2-shaped pipeline without a text encoder takes prompt embeddings and makes images (tiny, on CPU)."""
    bench = _bench("bench_generate")
    pipe = bench.build_pipeline(tiny=True, device=torch.device("cpu"))
    assert pipe.unet.config.cross_attention_dim == 16 and pipe.scheduler.config.prediction_type == "v_prediction"
    assert bench.time_batch(pipe, batch=2, steps=2, size=16, repeats=1) > 0


def test_gpu_suite_smoke_runs_every_part_and_writes_its_reports(tmp_path):
    """`benchmarks/gpu_suite.py --smoke`: every part's code at tiny sizes on the CPU, each in its own process under
    its budget, then the JSON and the Markdown fragment (so the suite does not rot between GPU lends)."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    failed = {name: entry.get("reason") for name, entry in report["parts"].items() if entry["status"] != "ok"}
    assert not failed and list(report["parts"]) == ["env", "predict", "retrieval", "dataset", "generate", "train",
                                                    "compile", "caption"], failed
    parts = {name: entry["figures"] for name, entry in report["parts"].items()}
    assert parts["predict"]["pipeline_img_s"] > 0 and parts["predict"]["startup_s"] > 0
    assert {row["tower"] for row in parts["predict"]["views"]} == {"toy_timm_vit", "toy_open_clip_vit"}
    assert all(row["auto"] in ("fp16", "fp16-weights") and row["fp16_cosine"] > 0.999
               for row in parts["predict"]["precision"].values())
    assert parts["retrieval"]["row_queries_per_s"] > 0 and parts["dataset"]["projected_10m_gpu_min"] > 0
    assert parts["dataset"]["minilm"] == "random weights from the config"
    assert parts["dataset"]["minilm_prompts_per_s"] > 0
    assert parts["generate"]["ours_s_per_image"] > 0 and parts["train"]["rows"][0]["ms_per_step"] > 0
    assert set(parts["compile"]["towers"]) == {"toy_timm_vit", "toy_open_clip_vit"}
    assert parts["caption"]["fp32_img_s"] > 0 and parts["caption"]["fp16_captions_equal_fp32"] == 4  # CPU: fp32
    assert all(goal["measured"] is not None for goal in report["goals"])
    markdown = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert markdown.startswith("### GPU suite,") and "| goal | target | measured | met |" in markdown
    assert run.stdout.strip().splitlines()[-1].startswith("parts_ok=8 parts=8 ensemble_img_s=")


def test_gpu_suite_reports_a_part_that_fails_and_goes_on(tmp_path, monkeypatch):
    """A part that raises is reported with its reason and traceback; one with no budget left is skipped, said so."""
    import json

    suite = _bench("gpu_suite")
    monkeypatch.setattr(suite, "SMOKE_BUDGET", 60)
    report = suite.run_suite(tmp_path, ["env"], smoke=True, budget=4)
    assert report["parts"]["env"]["status"] == "skipped" and "budget was spent" in report["parts"]["env"]["reason"]
    assert (tmp_path / "gpu_suite.md").is_file() and "not measured" in (tmp_path / "gpu_suite.md").read_text()

    def broken(device, smoke, work):
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(suite.PARTS, "env", broken)
    assert suite.run_part("env", True, tmp_path / "env.json") == 1
    outcome = json.loads((tmp_path / "env.json").read_text())
    assert outcome["error"] == "RuntimeError: no such kernel" and "broken" in outcome["traceback"]
