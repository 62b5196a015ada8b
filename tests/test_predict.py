"""End-to-end prediction on the real Kaggle sample images with tiny towers: math, robustness, determinism."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import kaggle_i2p
from kaggle_i2p.inference import devices as devices_module
from kaggle_i2p.inference import predict as predict_module
from kaggle_i2p.inference import runner as runner_module
from kaggle_i2p.inference.images import ImageListingError, decode_image, make_view
from kaggle_i2p.inference.submission import read_submission
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.towers import Tower, load_tower

SAMPLE_IDS = ["20057f34d", "227ef0887", "92e911621", "a4e1c55a9", "c98f79f71", "d8edf2e40", "f27825b2c"]


def _run(image_dir, manifest, **kw):
    options = {"device": "cpu", "num_workers": 0, "progress": False, "batch_size": 3}
    return kaggle_i2p.run_prediction(image_dir, manifest, **{**options, **kw})


def _hand_prediction(image_dir, manifest_path):
    """The ensemble computed image by image with explicit formulas, independent of the batched loop."""
    manifest = load_manifest(manifest_path)
    towers = {spec.name: load_tower(spec) for spec in manifest.towers}
    total = sum(spec.weight for spec in manifest.towers)
    result = {}
    for image_id in SAMPLE_IDS:
        pixels = decode_image(image_dir / f"{image_id}.png").unsqueeze(0)
        mixed = np.zeros(384)
        for spec in manifest.towers:
            views = []
            for res in spec.image.resolutions:
                for flip in [False, True] if spec.image.hflip else [False]:
                    with torch.no_grad():
                        out = towers[spec.name](make_view(pixels, spec.image, res, hflip=flip))[0].double().numpy()
                    views.append(out / np.linalg.norm(out))
            tower_vec = np.mean(views, axis=0)
            tower_vec /= np.linalg.norm(tower_vec)
            mixed += spec.weight / total * tower_vec
        result[image_id] = mixed / np.linalg.norm(mixed)
    return result


def test_prediction_equals_hand_computation(sample_images, toy_manifest):
    run = _run(sample_images, toy_manifest)
    assert run.ids == SAMPLE_IDS
    assert run.embeddings.shape == (7, 384) and run.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(run.embeddings, axis=1), 1.0, atol=1e-6)
    expected = _hand_prediction(sample_images, toy_manifest)
    for i, image_id in enumerate(SAMPLE_IDS):
        np.testing.assert_allclose(run.embeddings[i], expected[image_id], atol=2e-5)
    assert set(run.tower_embeddings) == {"toy_timm_vit", "toy_open_clip_vit"}
    assert run.summary.n_views == 4 + 2 and run.summary.fallbacks == []
    assert run.summary.precision == {"toy_timm_vit": "fp32", "toy_open_clip_vit": "fp32"}


def test_predict_dir_writes_csv_and_returns_frame(sample_images, toy_manifest, tmp_path, capsys):
    out = tmp_path / "sub" / "submission.csv"
    frame = kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=out, device="cpu", num_workers=0)
    assert len(frame) == 7 * 384 and frame["imgId_eId"].iloc[0] == "20057f34d_0"
    back = read_submission(out)
    assert back["imgId_eId"].tolist() == frame["imgId_eId"].tolist()
    assert np.array_equal(back["val"].to_numpy(np.float32), frame["val"].to_numpy(np.float32))
    printed = capsys.readouterr().out
    assert "kaggle_i2p: 7 images, 2 towers, 6 views/image, 0 fallbacks" in printed and "wrote" in printed


def test_bad_files_get_the_fallback_and_the_run_completes(sample_images, toy_manifest, caplog):
    (sample_images / "zero_bytes.png").write_bytes(b"")
    (sample_images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    good = (sample_images / "20057f34d.png").read_bytes()
    (sample_images / "truncated.png").write_bytes(good[: len(good) // 3])
    (sample_images / "readme.txt").write_text("not an image")
    Image.new("RGBA", (300, 200), (10, 200, 30, 128)).save(sample_images / "rgba_small.png")
    Image.new("L", (1024, 700), 90).save(sample_images / "gray_big.webp")
    caplog.set_level(logging.WARNING, logger="kaggle_i2p")
    run = _run(sample_images, toy_manifest)
    fallback = load_manifest(toy_manifest).fallback

    assert run.ids == sorted(SAMPLE_IDS + ["zero_bytes", "corrupt", "truncated", "rgba_small", "gray_big"])
    reasons = dict(run.summary.fallbacks)
    assert set(reasons) == {"zero_bytes", "corrupt", "truncated"}
    assert reasons["zero_bytes"] == "unreadable image (empty file)"
    for image_id in reasons:
        assert np.array_equal(run.embeddings[run.ids.index(image_id)], fallback)
        assert f"{image_id}." in caplog.text  # the warning names the file
    for image_id in ["rgba_small", "gray_big", *SAMPLE_IDS]:
        row = run.embeddings[run.ids.index(image_id)]
        assert not np.array_equal(row, fallback) and np.isclose(np.linalg.norm(row), 1.0)
    assert run.summary.skipped_files == [("readme.txt", "not an image file by its suffix")]
    # the good rows are unaffected by their bad neighbours
    alone = _run_only(sample_images, toy_manifest, SAMPLE_IDS)
    for i, image_id in enumerate(SAMPLE_IDS):
        np.testing.assert_allclose(run.embeddings[run.ids.index(image_id)], alone[i], atol=2e-6)


def _run_only(folder, manifest, ids):
    target = folder.parent / "only"
    target.mkdir(exist_ok=True)
    for image_id in ids:
        shutil.copy(folder / f"{image_id}.png", target / f"{image_id}.png")
    return _run(target, manifest).embeddings


def test_duplicate_ids_fail_before_any_weights_load(sample_images, toy_manifest, monkeypatch):
    shutil.copy(sample_images / "20057f34d.png", sample_images / "20057f34d.jpg")
    monkeypatch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ImageListingError, match="20057f34d: 20057f34d.jpg, 20057f34d.png"):
        _run(sample_images, toy_manifest)


def test_non_finite_reduced_precision_is_recomputed_in_fp32(sample_images, toy_manifest, monkeypatch):
    reference = _run(sample_images, toy_manifest)
    real_forward = Tower.forward

    def nan_under_autocast(self, images):
        out = real_forward(self, images)
        return out * float("nan") if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(Tower, "forward", nan_under_autocast)
    run = _run(sample_images, toy_manifest, precision="bf16")
    assert run.summary.precision == {"toy_timm_vit": "bf16", "toy_open_clip_vit": "bf16"}
    # 3 batches (7 images, batch 3) x (4 + 2) views: every one recomputed, and the result is the fp32 one
    assert run.summary.nonfinite_recomputes == 3 * 6
    np.testing.assert_allclose(run.embeddings, reference.embeddings, atol=1e-6)
    assert run.summary.fallbacks == []


def test_non_finite_even_in_fp32_falls_back(sample_images, toy_manifest, monkeypatch):
    real_forward = Tower.forward

    def always_nan(self, images):
        return real_forward(self, images) * float("nan")

    monkeypatch.setattr(Tower, "forward", always_nan)
    run = _run(sample_images, toy_manifest)
    fallback = load_manifest(toy_manifest).fallback
    assert len(run.summary.fallbacks) == 7 and "non-finite output even in fp32" in run.summary.fallbacks[0][1]
    assert np.array_equal(run.embeddings, np.tile(fallback, (7, 1)))


def test_out_of_memory_halves_the_batch(sample_images, toy_manifest, monkeypatch):
    reference = _run(sample_images, toy_manifest, batch_size=4)
    real_forward = Tower.forward
    sizes = []

    def small_memory(self, images):
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, images)

    monkeypatch.setattr(Tower, "forward", small_memory)
    run = _run(sample_images, toy_manifest, batch_size=4)
    np.testing.assert_allclose(run.embeddings, reference.embeddings, atol=2e-6)
    assert run.summary.oom_halvings == 4  # 4 -> 2 -> 1, once per tower; later batches start at the lower size
    assert max(sizes[-20:]) == 1


def test_zero_weight_tower_is_not_run(sample_images, toy_manifest, tmp_path):
    text = toy_manifest.read_text().replace("weight: 0.4", "weight: 0")
    manifest = toy_manifest.parent / "zero_weight.yaml"
    manifest.write_text(text)
    run = _run(sample_images, manifest)
    assert run.summary.towers == ["toy_timm_vit"]
    np.testing.assert_allclose(run.embeddings, run.tower_embeddings["toy_timm_vit"], atol=1e-6)


def test_same_inputs_give_identical_bytes(sample_images, toy_manifest, tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=first, device="cpu", num_workers=2, progress=False)
    kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=second, device="cpu", num_workers=0, progress=False)
    assert first.read_bytes() == second.read_bytes()


def test_predict_embeddings_returns_ids_and_array(sample_images, toy_manifest):
    ids, embeddings = kaggle_i2p.predict_embeddings(sample_images, toy_manifest, device="cpu", num_workers=0,
                                                    progress=False)
    assert ids == SAMPLE_IDS and embeddings.shape == (7, 384)


def test_fp16_weights_hold_norms_and_head_in_fp32_and_match_fp32(sample_images, toy_manifest):
    """fp16-weights: the backbone's weights in fp16 except its norms, the head in fp32; the views agree with fp32
    (on the CPU here, where half matmuls run too)."""
    from kaggle_i2p.inference.predict import TowerRunner

    manifest = load_manifest(toy_manifest)
    images = make_view([decode_image(p) for p in sorted(sample_images.glob("*.png"))[:3]], manifest.towers[0].image,
                       32)
    for spec in manifest.towers:
        reference = TowerRunner(load_tower(spec), torch.device("cpu"), "fp32").forward_view(images).values
        runner = TowerRunner(load_tower(spec), torch.device("cpu"), "fp16-weights")
        dtypes = {type(m).__name__: {p.dtype for p in m.parameters(recurse=False)}
                  for m in runner.tower.backbone.modules() if list(m.parameters(recurse=False))}
        assert dtypes["Linear"] == {torch.float16} and dtypes["LayerNorm"] == {torch.float32}
        assert {p.dtype for p in runner.tower.head.parameters()} == {torch.float32}
        out = runner.forward_view(images).values
        assert out.dtype == torch.float32 and runner.nonfinite_recomputes == 0
        cosine = torch.nn.functional.cosine_similarity(out, reference)
        assert cosine.min() > 0.999 and not torch.equal(out, reference)  # fp16 really ran, and close


@pytest.mark.parametrize(("precision", "non_finite_at", "tried"), [
    ("fp16-weights", set(), ["fp16-weights"]),
    ("fp16-weights", {"fp16-weights"}, ["fp16-weights", "fp16"]),
    ("fp16-weights", {"fp16-weights", "fp16"}, ["fp16-weights", "fp16", "fp32"]),
    ("fp16-weights", {"fp16-weights", "fp16", "fp32"}, ["fp16-weights", "fp16", "fp32"]),
    ("bf16", {"bf16"}, ["bf16", "fp32"]),
    ("fp32", {"fp32"}, ["fp32"]),
])
def test_precision_falls_back_in_order_and_counts(toy_manifest, precision, non_finite_at, tried):
    """A batch with a non-finite output is computed again one step down: fp16 weights -> fp16 autocast -> fp32;
    the fp32 step of an fp16-weights tower runs on an fp32 copy."""
    from kaggle_i2p.inference.predict import TowerRunner

    spec = load_manifest(toy_manifest).towers[0]
    runner = TowerRunner(load_tower(spec), torch.device("cpu"), precision)
    seen, real = [], runner._forward

    def forward(images, level):
        seen.append(level)
        out = real(images, level)
        return out._replace(values=out.values * float("nan")) if level in non_finite_at else out

    runner._forward = forward
    out = runner.forward_view(torch.rand(2, 3, 32, 32)).values
    assert seen == tried and runner.nonfinite_recomputes == len(tried) - 1
    assert torch.isfinite(out).all() == (tried[-1] not in non_finite_at)
    if precision == "fp16-weights" and "fp32" in tried:
        assert {p.dtype for p in runner._fp32_tower.parameters()} == {torch.float32}
        assert next(runner.tower.backbone.parameters()).dtype == torch.float16  # the fp16 tower is kept


def test_compile_is_gated_by_device_and_triton(monkeypatch, caplog):
    """Compiling needs CUDA with Triton (compute capability 7.0+): a P100 (6.0) and the CPU run eager, each with one
    log line; nothing is compiled unless asked."""
    caplog.set_level(logging.INFO, logger="kaggle_i2p")
    cuda = torch.device("cuda")
    assert not devices_module.resolve_compile(False, cuda)
    assert not devices_module.resolve_compile(True, torch.device("cpu"))
    monkeypatch.setattr(devices_module, "_triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    assert not devices_module.resolve_compile(True, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert devices_module.resolve_compile(True, cuda)
    monkeypatch.setattr(devices_module, "_triton_available", lambda: False)
    assert not devices_module.resolve_compile(True, cuda)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile: off")]
    assert len(lines) == 3 and "compute capability 6.0" in lines[1] and "Triton not installed" in lines[2]


def _compiling_runner(toy_manifest, monkeypatch, perturb: bool = False):
    """A runner of the toy ViT tower that compiles its views with a fake torch.compile recording each batch size."""
    from kaggle_i2p.inference.predict import TowerRunner

    calls, real_compile = [], torch.compile

    def fake_compile(module, dynamic=None, backend=None):
        assert dynamic is False and backend == "eager"
        inner = real_compile(module, dynamic=False, backend="eager")

        def compiled(images):
            calls.append((images.shape[-1], len(images)))
            return -inner(images) if perturb else inner(images)
        return compiled

    monkeypatch.setattr(runner_module, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = load_manifest(toy_manifest).towers[0]
    return TowerRunner(load_tower(spec), torch.device("cpu"), "fp32", compile_views=True), spec, calls


def test_compiled_views_one_callable_per_resolution_padded_batches_and_the_same_outputs(toy_manifest, monkeypatch):
    """Each resolution gets its own static-shape callable, compiled for the first batch; a smaller batch is padded
    to it (no recompile), and the outputs are eager's."""
    from kaggle_i2p.inference.predict import TowerRunner

    runner, spec, calls = _compiling_runner(toy_manifest, monkeypatch)
    eager = TowerRunner(load_tower(spec), torch.device("cpu"), "fp32")
    pixels = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    names = [view.name for view in spec.views]
    for batch in (pixels, pixels[:2]):
        got, expected = runner.compute_views(batch, names), eager.compute_views(batch, names)
        for name in names:
            np.testing.assert_allclose(got[name].values, expected[name].values, atol=1e-5)
    resolutions = sorted({view.resolution for view in spec.views})
    assert sorted(runner._compiled) == resolutions and None not in runner._compiled.values()
    assert {rows for _, rows in calls} == {3}  # the batch of 2 ran padded to the compiled 3
    assert sorted({size for size, _ in calls}) == resolutions and runner.compile_seconds > 0


def test_a_compiled_view_that_differs_from_eager_runs_eager(toy_manifest, monkeypatch, caplog):
    from kaggle_i2p.inference.predict import TowerRunner

    runner, spec, _ = _compiling_runner(toy_manifest, monkeypatch, perturb=True)
    eager = TowerRunner(load_tower(spec), torch.device("cpu"), "fp32")
    pixels = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    names = [view.name for view in spec.views]
    for _ in range(2):
        got, expected = runner.compute_views(pixels, names), eager.compute_views(pixels, names)
        for name in names:
            np.testing.assert_array_equal(got[name].values, expected[name].values)
    assert set(runner._compiled.values()) == {None}
    assert sum("compiled output differs from eager" in r.getMessage() for r in caplog.records) == len(
        {view.resolution for view in spec.views})


def test_compile_asked_on_cpu_runs_eager_and_the_manifest_checks_the_field(sample_images, toy_manifest, tmp_path):
    import yaml

    run = _run(sample_images, toy_manifest, compile_views=True)
    assert run.summary.compile_seconds == 0 and "compiling" not in str(run.summary)
    data = yaml.safe_load(toy_manifest.read_text())
    data["towers"][0]["compile"] = "yes"
    bad = toy_manifest.parent / "bad_compile.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(kaggle_i2p.manifest.ManifestError, match="compile: 'yes' must be true or false"):
        load_manifest(bad)
    data["towers"][0]["compile"] = True
    bad.write_text(yaml.safe_dump(data))
    spec = load_manifest(bad).towers[0]
    assert spec.compile is True and spec.to_dict()["compile"] is True


def test_towers_load_in_the_background_while_the_first_batch_decodes(sample_images, toy_manifest, monkeypatch):
    """The first tower's load waits until an image has been decoded: without the overlap this run would stall for
    the 60 s the wait allows. Loading errors still reach the caller."""
    import threading

    from kaggle_i2p.inference import images as images_module
    from kaggle_i2p.models.checkpoints import TowerLoadError

    decoded, loaded_in = threading.Event(), []
    real_decode, real_load = images_module.DecodedImages.__getitem__, predict_module.load_tower

    def decode(self, index):
        decoded.set()
        return real_decode(self, index)

    def load(*args, **kwargs):
        loaded_in.append((threading.current_thread().name, decoded.wait(timeout=60)))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(images_module.DecodedImages, "__getitem__", decode)
    monkeypatch.setattr(predict_module, "load_tower", load)
    run = _run(sample_images, toy_manifest)
    assert loaded_in == [("kaggle_i2p-load-towers", True)] * 2  # both towers, each after a decode had happened
    assert run.summary.loading_seconds > 0 and "s loading towers" in str(run.summary)

    def broken(*args, **kwargs):
        raise TowerLoadError("tower 'toy_timm_vit': cannot read checkpoint")

    monkeypatch.setattr(predict_module, "load_tower", broken)
    with pytest.raises(TowerLoadError, match="cannot read checkpoint"):
        _run(sample_images, toy_manifest)


def test_run_options_are_one_value_and_their_names_work_too(sample_images, toy_manifest, tmp_path):
    """`RunOptions` or its fields by name give the same run; an unknown name is one OptionError naming them all."""
    import pytest

    import kaggle_i2p
    from kaggle_i2p import RunOptions
    from kaggle_i2p.core.errors import OptionError

    options = RunOptions(device="cpu", num_workers=0, batch_size=3, progress=False)
    kaggle_i2p.predict_dir(sample_images, toy_manifest, tmp_path / "a.csv", options, return_frame=False)
    kaggle_i2p.predict_dir(sample_images, toy_manifest, tmp_path / "b.csv", device="cpu", num_workers=0,
                           batch_size=3, progress=False, return_frame=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    with pytest.raises(OptionError, match="unknown run option.*batchsize.*the options are device, batch_size"):
        kaggle_i2p.run_prediction(sample_images, toy_manifest, batchsize=3)
    assert RunOptions.of(options, batch_size=5) == RunOptions(device="cpu", num_workers=0, batch_size=5,
                                                             progress=False)
    assert RunOptions().batch_size_on("cuda") == 32 and RunOptions().batch_size_on("mps") == 8


def test_a_compiled_batch_is_judged_on_the_rows_that_have_a_value():
    """A caption tower's image without a caption has no value (NaN, not present) compiled or eager: the fidelity check
    compares the present rows, so such a batch is not sent back to eager; a NaN in a present row still is."""
    from kaggle_i2p.inference.runner import _fidelity
    from kaggle_i2p.manifest import ViewOutput

    values = torch.randn(3, 4)
    values[1] = float("nan")
    present = torch.tensor([True, False, True])
    assert float(_fidelity(ViewOutput(values, present), ViewOutput(values.clone(), present))) > 0.9999
    assert float(_fidelity(ViewOutput(values, ~present & False), ViewOutput(values, ~present & False))) == 1.0
    assert not float(_fidelity(ViewOutput(values), ViewOutput(values))) >= 0.9999  # NaN in a present row
