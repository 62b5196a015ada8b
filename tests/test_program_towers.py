"""Exported towers (issue 23, step 7): `library: torchscript` (the 68th place's traced image tower) and `library:
export` (a torch.export program with dynamic sizes, or one static program per resolution), each the whole image ->
384 tower (`head: none`, no checkpoint) or a feature program under a head of its own; served through a manifest with
multi-resolution TTA and compared with the model's own forward. Programs that cannot run a view, files of another
format and heads that do not fit are one message each, from the deep check, before any compute."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.export import Dim

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.inference.cache import PredictionCache
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.manifest.write import save_manifest
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, assert_served_as_own_forward

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # torch's note on tracing, not ours


class Tower(nn.Module):
    """A user's whole tower: a conv trunk, mean pooling and a Linear head to the embedding (or its features alone)."""

    def __init__(self, out: int | None = 384, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU())
        self.fc = nn.Linear(32, out) if out else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(images).mean(dim=(2, 3)))


def _export(model: nn.Module, size: int, path, dynamic_size: bool = True, dynamic_batch: bool = True) -> None:
    dims = {0: Dim("batch")} if dynamic_batch else {}
    if dynamic_size:
        dims |= {2: Dim("h", min=16, max=512), 3: Dim("w", min=16, max=512)}
    program = torch.export.export(model.eval(), (torch.randn(2, 3, size, size),), dynamic_shapes={"images": dims})
    torch.export.save(program, str(path))


def _manifest(folder, library: str, arch: str, resolutions, hflip: bool = True, **entry):
    (folder / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    tower = {"name": "user", "library": library, "arch": arch, "head": {"type": "none"},
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": list(resolutions), "hflip": hflip}, "weight": 1.0, **entry}
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
    return path


def _check(model: nn.Module, path, sample_dir) -> np.ndarray:
    """The deep check passes; the served vectors are the model's own forward (7 images: a last batch of 1)."""
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    return assert_served_as_own_forward(model, path, sample_dir / "images", batch_size=3)


def test_a_traced_torchscript_tower_is_served_as_saved(tmp_path, sample_dir):
    model = Tower().eval()
    torch.jit.trace(model, torch.randn(2, 3, 64, 64)).save(str(tmp_path / "tower.pt"))
    _check(model, _manifest(tmp_path, "torchscript", "tower.pt", [64, 96]), sample_dir)


def test_an_exported_program_with_dynamic_sizes_runs_every_resolution(tmp_path, sample_dir, capsys):
    model = Tower()
    _export(model, 64, tmp_path / "tower.pt2")
    path = _manifest(tmp_path, "export", "tower.pt2", [64, 96, 128])
    _check(model, path, sample_dir)
    assert "weights in the program" in capsys.readouterr().out  # no checkpoint file stands for it


def test_one_static_program_per_resolution_is_one_tower(tmp_path, sample_dir):
    model = Tower()
    for size in (64, 96):
        _export(model, size, tmp_path / f"tower_{size}.pt2", dynamic_size=False)
    path = _manifest(tmp_path, "export", "tower_{resolution}.pt2", [64, 96])
    got = _check(model, path, sample_dir)
    spec = load_manifest(path).towers[0]
    assert [v.name for v in spec.views] == ["r64", "r64_flip", "r96", "r96_flip"]

    out = tmp_path / "copy" / "m.yaml"  # a manifest written elsewhere still names the programs, relative to itself
    out.parent.mkdir()
    save_manifest(load_manifest(path), out)
    assert yaml.safe_load(out.read_text())["towers"][0]["arch"] == "../tower_{resolution}.pt2"
    again = kaggle_i2p.run_prediction(sample_dir / "images", out, device="cpu", num_workers=0, progress=False,
                                      batch_size=3).embeddings
    np.testing.assert_array_equal(again, got)


def test_a_resolution_without_its_program_is_named_before_any_compute(tmp_path, capsys):
    _export(Tower(), 64, tmp_path / "tower_64.pt2", dynamic_size=False)
    path = _manifest(tmp_path, "export", "tower_{resolution}.pt2", [64, 96])
    assert main(["validate-manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert "(towers[0]).arch: file not found" in err and "tower_96.pt2" in err and "tower_64" not in err


@pytest.mark.parametrize(("dynamic_size", "dynamic_batch", "message"), [
    (False, True, "cannot run at 96x96"),  # made for 64 only: the 96 view cannot run
    (True, False, "takes a batch of 2 but not of 1"),  # made for a batch of 2: a run's batches vary
])
def test_a_program_that_cannot_run_a_view_fails_the_deep_check(tmp_path, capsys, dynamic_size, dynamic_batch,
                                                              message):
    _export(Tower(), 64, tmp_path / "tower.pt2", dynamic_size=dynamic_size, dynamic_batch=dynamic_batch)
    path = _manifest(tmp_path, "export", "tower.pt2", [64, 96])
    assert main(["validate-manifest", "--deep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "(towers[0])" in err and message in err and "{resolution}" in err and "Traceback" not in err


def test_a_feature_program_under_a_head_of_its_own(tmp_path, sample_dir):
    """The program gives 32 features; the head the user trained on them comes as its own file, named as saved."""
    features, model = Tower(out=None), Tower()
    features.trunk = model.trunk
    torch.jit.trace(features.eval(), torch.randn(2, 3, 64, 64)).save(str(tmp_path / "trunk.pt"))
    torch.save({"fc.weight": model.fc.weight.detach(), "fc.bias": model.fc.bias.detach()}, tmp_path / "head.pth")
    path = _manifest(tmp_path, "torchscript", "trunk.pt", [64, 80], checkpoint="head.pth", head={"type": "linear"})
    _check(model, path, sample_dir)


@pytest.mark.parametrize(("out", "entry", "field", "message"), [
    (None, {}, "head.type", "32 wide, not 384"),  # head none on features: the embedding is not what it gives
    (None, {"head": {"type": "linear"}}, "", "no checkpoint, but the tower's head has 2 key(s)"),
    (384, {"sha256": "0" * 64}, "sha256", "trunk.pt has sha256"),
])
def test_a_head_or_hash_that_does_not_fit_the_program_is_one_message(tmp_path, capsys, out, entry, field, message):
    torch.jit.trace(Tower(out=out).eval(), torch.randn(2, 3, 64, 64)).save(str(tmp_path / "trunk.pt"))
    path = _manifest(tmp_path, "torchscript", "trunk.pt", [64], **entry)
    assert main(["validate-manifest", "--deep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"(towers[0]){'.' + field if field else ''}" in err and message in err and "Traceback" not in err


def test_the_program_sha256_is_checked_and_refused_for_per_resolution_programs(tmp_path, capsys):
    torch.jit.trace(Tower().eval(), torch.randn(2, 3, 64, 64)).save(str(tmp_path / "tower.pt"))
    digest = hashlib.sha256((tmp_path / "tower.pt").read_bytes()).hexdigest()
    assert main(["validate-manifest", "--deep", str(_manifest(tmp_path, "torchscript", "tower.pt", [64],
                                                              sha256=digest))]) == 0
    for size in (64, 96):
        (tmp_path / f"tower_{size}.pt").write_bytes((tmp_path / "tower.pt").read_bytes())
    path = _manifest(tmp_path, "torchscript", "tower_{resolution}.pt", [64, 96], sha256=digest)
    capsys.readouterr()
    assert main(["validate-manifest", str(path)]) == 2
    assert "(towers[0]).sha256: checks one file" in capsys.readouterr().err


def test_files_of_another_format_say_which_library_reads_them(tmp_path, capsys):
    model = Tower().eval()
    torch.jit.trace(model, torch.randn(2, 3, 64, 64)).save(str(tmp_path / "traced.pt"))
    _export(model, 64, tmp_path / "exported.pt2")
    torch.save(model, tmp_path / "pickled.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    cases = [("export", "traced.pt", "use library: torchscript"), ("torchscript", "exported.pt2", "library: export"),
             ("torchscript", "pickled.pt", "never unpickled"), ("export", "junk.pt", "not a zip archive")]
    for library, arch, message in cases:
        path = _manifest(tmp_path, library, arch, [64])
        assert main(["validate-manifest", "--deep", str(path)]) == 2
        err = capsys.readouterr().err
        assert "(towers[0]).arch:" in err and message in err and "Traceback" not in err, err


def test_the_cache_key_is_the_programs_content(tmp_path):
    """Same path, same entry, other weights in the program: another key (the program is the tower's weights)."""
    cache, keys = PredictionCache(tmp_path / "cache"), []
    for seed in (0, 1, 0):
        _export(Tower(seed=seed), 64, tmp_path / "tower_64.pt2", dynamic_size=False)
        spec = load_manifest(_manifest(tmp_path, "export", "tower_{resolution}.pt2", [64])).towers[0]
        keys.append(cache.tower_key(spec, "fp32", 384, 4))
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_a_program_is_not_trained_here(tmp_path):
    from kaggle_i2p.testing import toy_training_config, write_tiny_program
    from kaggle_i2p.train.config import TrainConfigError, parse_train_config

    write_tiny_program(tmp_path / "tiny.pt2")
    config = toy_training_config(tmp_path, tmp_path / "out")
    config["tower"].update(library="export", arch="tiny.pt2")
    with pytest.raises(TrainConfigError, match=r"tower.library: library: export serves a program as saved"):
        parse_train_config(config, tmp_path / "c.yaml", check_files=False)


# ---- ONNX graphs (issue 33): onnxruntime, as the program libraries ------------------------------------------------

def _onnx(model: nn.Module, size: int, path, dynamic: bool = True) -> None:
    import warnings

    axes = {"images": {0: "batch", 2: "h", 3: "w"}, "out": {0: "batch"}} if dynamic else {"images": {0: "batch"},
                                                                                         "out": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), str(path), input_names=["images"],
                          output_names=["out"], dynamic_axes=axes, dynamo=False)


def test_an_onnx_graph_is_served_as_saved_at_every_resolution(tmp_path, sample_dir):
    model = Tower(seed=3)
    _onnx(model, 64, tmp_path / "tower.onnx")
    _check(model, _manifest(tmp_path, "onnx", "tower.onnx", [64, 96]), sample_dir)


def test_one_onnx_graph_per_resolution_and_a_feature_graph_under_its_head(tmp_path, sample_dir):
    model = Tower(seed=4)
    for size in (64, 96):
        _onnx(model, size, tmp_path / f"tower_{size}.onnx", dynamic=False)
    _check(model, _manifest(tmp_path, "onnx", "tower_{resolution}.onnx", [64, 96]), sample_dir)
    features = Tower(out=None)
    features.trunk = model.trunk
    _onnx(features, 64, tmp_path / "trunk.onnx")
    torch.save({"weight": model.fc.weight.detach(), "bias": model.fc.bias.detach()}, tmp_path / "head.pth")
    from kaggle_i2p.models.recognise import inspect_checkpoint

    found = inspect_checkpoint([tmp_path / "trunk.onnx", tmp_path / "head.pth"])
    assert found.entry["library"] == "onnx" and found.entry["checkpoint"] == str(tmp_path / "head.pth")
    _check(model, _manifest(tmp_path, "onnx", "trunk.onnx", [64, 80], checkpoint="head.pth",
                            head={"type": "linear"}), sample_dir)


def test_an_onnx_graph_that_cannot_run_a_view_is_read_from_its_declared_shapes(tmp_path, capsys, monkeypatch):
    """A graph fixed at 64: the 96 view is refused by the deep check from the graph's declared input, before any
    compute (onnxruntime is never asked to run)."""
    from kaggle_i2p.models.backbones import programs

    _onnx(Tower(seed=5), 64, tmp_path / "tower.onnx", dynamic=False)
    monkeypatch.setattr(programs.OnnxProgram, "__call__", lambda *a: pytest.fail("the graph ran"))
    assert main(["validate-manifest", "--deep", str(_manifest(tmp_path, "onnx", "tower.onnx", [64, 96]))]) == 2
    err = capsys.readouterr().err
    assert "cannot run at 96x96" in err and "takes a height of 64 only" in err and "Traceback" not in err


def test_the_onnx_cache_key_is_the_graphs_content_and_other_formats_say_which_library(tmp_path, capsys):
    cache, keys = PredictionCache(tmp_path / "cache"), []
    for seed in (0, 1):
        _onnx(Tower(seed=seed), 64, tmp_path / "tower.onnx")
        keys.append(cache.tower_key(load_manifest(_manifest(tmp_path, "onnx", "tower.onnx", [64])).towers[0],
                                    "fp32", 384, 4))
    assert keys[0] != keys[1]
    _export(Tower(), 64, tmp_path / "exported.pt2")
    for library, arch, message in (("onnx", "exported.pt2", "library: export"),
                                   ("export", "tower.onnx", "use library: onnx")):
        assert main(["validate-manifest", "--deep", str(_manifest(tmp_path, library, arch, [64]))]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_an_onnx_graph_asked_for_cuda_without_its_provider_says_so_and_runs_on_the_cpu(tmp_path):
    """onnxruntime without the CUDA execution provider (the CPU wheel): one warning naming onnxruntime-gpu, and the
    graph runs on the CPU, its outputs on the images' device."""
    from kaggle_i2p.models.backbones.programs import OnnxProgram

    model = Tower(seed=6)
    _onnx(model, 64, tmp_path / "tower.onnx")
    with pytest.warns(UserWarning, match="onnxruntime-gpu"):
        program = OnnxProgram(tmp_path / "tower.onnx", torch.device("cuda"))
    assert program.session.get_providers() == ["CPUExecutionProvider"]
    x = torch.randn(3, 3, 64, 64)
    np.testing.assert_allclose(program(x).numpy(), model(x).detach().numpy(), atol=1e-5)
