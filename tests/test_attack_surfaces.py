"""Nothing lost, nothing silent, part 3 (issue 32): each defect found by attacking the newer surfaces (inspect, key
layouts, shards, programs, captions, the interrogator, plugins, LoRA, the text map, the GPU suite), reproduced and now
handled as a class. docs/reliability.md lists each case under its rule.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kaggle_i2p.core.errors import I2PError, OptionError
from kaggle_i2p.manifest import ManifestError, load_manifest
from kaggle_i2p.models.recognise import InspectError, append_entry, inspect_checkpoint
from kaggle_i2p.models.towers import validate_manifest
from kaggle_i2p.testing import tiny_tower_manifest, write_tiny_program

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CPU = ["--device", "cpu", "--workers", "0", "--quiet"]
# A child process's peak memory in kB: its own address space's high-water mark (getrusage's ru_maxrss would carry
# the forking parent's, pytest's, across the exec)
PEAK = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))"


def _cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaggle_i2p.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _one_message(done: subprocess.CompletedProcess, *words: str) -> str:
    """A refusal as users see it: exit 2, one `error:` line first, no traceback, naming `words`."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "error:" in done.stderr, done.stderr[-2000:]
    for word in words:
        assert word in done.stderr, (word, done.stderr[-2000:])
    return done.stderr


def _rewrite_zip(source: Path, target: Path, member_suffix: str, data: bytes | None = None,
                 deflate_to: int | None = None) -> Path:
    """A copy of a zip archive (as torch wrote it) with one member's bytes replaced, or inflated to `deflate_to`
    bytes of zeros stored deflated (a zip bomb)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if not info.filename.endswith(member_suffix):
                new.writestr(info, old.read(info.filename))
            elif deflate_to is not None:
                bomb = zipfile.ZipInfo(info.filename)
                bomb.compress_type = zipfile.ZIP_DEFLATED
                with new.open(bomb, "w", force_zip64=True) as handle:
                    for _ in range(deflate_to >> 24):
                        handle.write(b"\0" * (1 << 24))
            else:
                new.writestr(info, data)
    return target


class Payload:
    """A pickle that runs a shell command when unpickled: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _manifest(folder: Path, edit) -> Path:
    """A copy of the tiny manifest in `folder` with `edit(tower_entry)` applied, as another file."""
    data = yaml.safe_load((folder / "tiny_manifest.yaml").read_text())
    edit(data["towers"][0])
    path = folder / f"edited_{len(list(folder.glob('edited_*')))}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def timm_tower(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("timm_tower")
    tiny_tower_manifest(folder, "timm", "regressor")
    return folder


@pytest.fixture(scope="module")
def export_tower(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export_tower")
    tiny_tower_manifest(folder, "export", "regressor")
    return folder


# ---- rule 6 and security: no code from a model file ----------------------------------------------------------------

def test_a_program_whose_records_are_code_pickles_is_refused_and_the_payload_never_runs(export_tower, tmp_path,
                                                                                         sample_images):
    """A torch.export archive whose sample-inputs record is a pickle running a shell command (the rest as
    torch.export.save wrote it): inspect, validate-manifest and predict refuse it, and the marker is never written
    (torch's loader would fall back to weights_only=False and run it)."""
    marker = tmp_path / "PWNED"
    buffer = io.BytesIO()
    torch.save({"x": Payload(marker)}, buffer)
    bad = _rewrite_zip(export_tower / "tiny.pt2", tmp_path / "bad.pt2", "sample_inputs/model.pt", buffer.getvalue())
    shutil.copyfile(export_tower / "tiny.safetensors", tmp_path / "tiny.safetensors")
    shutil.copyfile(export_tower / "fallback.npy", tmp_path / "fallback.npy")
    data = yaml.safe_load((export_tower / "tiny_manifest.yaml").read_text())
    data["towers"][0]["arch"] = "bad.pt2"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    _one_message(_cli("inspect", str(bad)), "bad.pt2", "refused", "by running code")
    _one_message(_cli("validate-manifest", "--deep", str(manifest)), "bad.pt2", "by running code")
    _one_message(_cli("predict", str(sample_images), "--manifest", str(manifest), "--out", str(tmp_path / "s.csv"),
                      *CPU), "by running code")
    assert not marker.exists()
    assert not (tmp_path / "s.csv").exists()


def test_the_program_loader_can_unpickle_no_python_object():
    """Inside `guarded_unpickling` every torch.load is weights_only (whatever its caller asks) and torch.export's
    own `pickle.loads` and TorchScript-object loads are refused: the loader's every route to code is closed."""
    import torch.export.pt2_archive._package as package

    from kaggle_i2p.models.safe_load import UnsafeFileError, guarded_unpickling

    buffer = io.BytesIO()
    torch.save({"x": Payload(Path("/nonexistent/PWNED"))}, buffer)
    with guarded_unpickling():
        with pytest.raises(UnsafeFileError, match="by running code"):
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        with pytest.raises(UnsafeFileError, match="never unpickled"):
            package.pickle.loads(b"cos\nsystem\n(S'true'\ntR.")
        with pytest.raises(UnsafeFileError):
            torch._C._pickle_load_obj(b"")
        assert torch.load(io.BytesIO(_tensor_bytes()), weights_only=False)["w"].sum() == 6
    assert package.pickle.__name__ == "pickle" and torch.load.__module__ == "torch.serialization"


def _tensor_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.full((2, 3), 1.0)}, buffer)
    return buffer.getvalue()


def test_damaged_programs_are_one_message_each(export_tower, tmp_path):
    """A TorchScript file whose data.pkl is a Python pickle naming os.system, and a .pt2 whose model.json is cut in
    half: one message naming the file and its format, exit 2 (the payload never ran)."""
    traced = write_tiny_program(tmp_path / "good_ts.pt", "torchscript")
    import pickle

    marker = tmp_path / "PWNED_TS"
    bad_ts = _rewrite_zip(traced, tmp_path / "bad_ts.pt", "/data.pkl", pickle.dumps(Payload(marker), protocol=2))
    _one_message(_cli("inspect", str(bad_ts), "--library", "torchscript"), "bad_ts.pt", "TorchScript")
    with zipfile.ZipFile(export_tower / "tiny.pt2") as archive:
        model_json = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        cut = archive.read(model_json)[: len(archive.read(model_json)) // 2]
    bad_pt2 = _rewrite_zip(export_tower / "tiny.pt2", tmp_path / "cut.pt2", "models/model.json", cut)
    _one_message(_cli("inspect", str(bad_pt2)), "cut.pt2", "torch.export")
    assert not marker.exists()


def test_a_pickled_module_or_code_in_a_checkpoint_is_refused_and_lightning_metadata_is_read(timm_tower, tmp_path):
    """torch.save(model) is refused with the way to save a state dict; a pickle naming os.system is refused without
    running; a Lightning .ckpt whose hyper_parameters is an argparse Namespace (what Lightning writes) serves: plain
    metadata is read by an allow-list, never by running the file's code."""
    import argparse

    from kaggle_i2p.models.checkpoints import read_state_dict
    from kaggle_i2p.models.safe_load import UnsafeFileError, load_pickled

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(UnsafeFileError, match=r"whole pickled torch\.nn\.modules\.container\.Sequential.*state_dict"):
        read_state_dict(tmp_path / "whole.pt")
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(marker)}, tmp_path / "code.pt")
    with pytest.raises(UnsafeFileError, match="system"):
        read_state_dict(tmp_path / "code.pt")
    assert not marker.exists()
    state = load_file(timm_tower / "tiny.safetensors")
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3,
                "pytorch-lightning_version": "2.4.0",
                "hyper_parameters": argparse.Namespace(lr=0.1, arch="test_vit", out=Path("runs"))}, ckpt)
    loaded = load_pickled(ckpt)
    assert loaded["hyper_parameters"].lr == 0.1 and loaded["hyper_parameters"].out == Path("runs")
    manifest = _manifest(timm_tower, lambda t: t.update(checkpoint=str(ckpt)))
    validate_manifest(manifest, deep=True)
    found = inspect_checkpoint(ckpt)
    assert "Lightning" in found.text() and found.entry["arch"] == "test_vit"


def test_a_zip_bomb_is_refused_before_it_inflates(export_tower, timm_tower, tmp_path):
    """A TorchScript file (and a torch.save checkpoint) whose data.pkl is a 320 MB deflated run of zeros in a file of
    a few hundred KB: refused from the zip directory, before anything inflates (the process stays small)."""
    traced = write_tiny_program(tmp_path / "ts.pt", "torchscript")
    bomb = _rewrite_zip(traced, tmp_path / "bomb_ts.pt", "/data.pkl", deflate_to=320 << 20)
    assert bomb.stat().st_size < 2 << 20
    probe = ("from kaggle_i2p.models.recognise import inspect_checkpoint, InspectError\n"
             f"try: inspect_checkpoint({str(bomb)!r}, library='torchscript')\n"
             "except InspectError as err: print(err)\n"
             f"{PEAK}")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    message, peak_kb = done.stdout.strip().splitlines()[-2:]
    assert "zip bomb" in message and "bomb_ts.pt" in message, done.stdout + done.stderr
    assert int(peak_kb) < 2_000_000  # a 3 GB member would have been inflated into memory
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    bomb_pt = _rewrite_zip(tmp_path / "plain.pt", tmp_path / "bomb.pt", "/data.pkl", deflate_to=32 << 20)
    manifest = _manifest(timm_tower, lambda t: t.update(checkpoint=str(bomb_pt)))
    with pytest.raises(ManifestError, match="zip bomb"):
        validate_manifest(manifest, deep=True)


# ---- rule 2: nothing of the user's destroyed ------------------------------------------------------------------------

def test_inspect_append_keeps_a_manifests_mode_writes_through_links_and_refuses_a_read_only_one(timm_tower, tmp_path):
    source = timm_tower / "tiny.safetensors"
    original = (timm_tower / "tiny_manifest.yaml").read_text()

    def manifest(name: str, mode: int) -> Path:
        path = tmp_path / name
        path.write_text(original.replace("fallback.npy", str(timm_tower / "fallback.npy")).replace(
            "tiny.safetensors", str(source)))
        os.chmod(path, mode)
        return path

    read_only = manifest("ro.yaml", 0o444)
    done = _cli("inspect", str(source), "--name", "second", "--append", str(read_only))
    _one_message(done, "ro.yaml", "read-only")
    assert read_only.read_text().count("name:") == 1 and (read_only.stat().st_mode & 0o777) == 0o444

    private = manifest("private.yaml", 0o600)
    append_entry(inspect_checkpoint(source, name="second"), private)
    assert (private.stat().st_mode & 0o777) == 0o600 and "second" in private.read_text()

    target = manifest("real.yaml", 0o644)
    link = tmp_path / "link.yaml"
    link.symlink_to(target.name)
    append_entry(inspect_checkpoint(source, name="second"), link)
    assert link.is_symlink() and "second" in target.read_text()
    load_manifest(link)


def test_an_output_that_names_another_output_or_an_input_is_refused_before_the_compute(timm_tower, tmp_path,
                                                                                       sample_images):
    """`--captions-out` naming the `--out` file (or `--out` naming the manifest) would replace one with the other:
    exit 2 before any weight loads, the files untouched."""
    caption = tmp_path / "cap"
    tiny_tower_manifest(caption, "transformers", "caption")
    out = tmp_path / "sub.csv"
    out.write_text("kept")
    _one_message(_cli("predict", str(sample_images), "--manifest", str(caption / "tiny_manifest.yaml"), "--out",
                      str(out), "--captions-out", str(out), *CPU), "--captions-out", "both name")
    assert out.read_text() == "kept"
    before = (timm_tower / "tiny_manifest.yaml").read_text()
    _one_message(_cli("predict", str(sample_images), "--manifest", str(timm_tower / "tiny_manifest.yaml"), "--out",
                      str(timm_tower / "tiny_manifest.yaml"), *CPU), "is the manifest")
    assert (timm_tower / "tiny_manifest.yaml").read_text() == before
    _one_message(_cli("predict", str(sample_images), "--manifest", str(caption / "tiny_manifest.yaml"), "--share",
                      "0/2", "--cache-dir", str(tmp_path / "c"), "--captions-out", str(tmp_path / "c.csv"), *CPU),
                 "--captions-out", "--share")
    assert not (tmp_path / "c").exists()


def test_pack_wheels_refuses_a_folder_of_the_users_and_reads_a_relative_source(tmp_path, monkeypatch):
    from kaggle_i2p.packaging.wheelhouse import MARKER, WheelhouseError, check_wheelhouse_folder, find_source_dir

    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "requirements.txt").write_text("numpy==1.0\n")
    with pytest.raises(WheelhouseError, match="did not write"):
        check_wheelhouse_folder(theirs)
    done = _cli("pack-wheels", "--out", str(theirs))
    _one_message(done, "requirements.txt", "new or empty folder")
    assert (theirs / "requirements.txt").read_text() == "numpy==1.0\n"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MARKER).write_text("")
    (ours / "requirements.txt").write_text("numpy==1.0\n")
    check_wheelhouse_folder(ours)  # a folder pack-wheels wrote is its own to rewrite
    monkeypatch.chdir(ROOT.parent)
    relative = Path(os.path.relpath(ROOT, ROOT.parent))
    assert find_source_dir(relative) == ROOT and find_source_dir(relative).is_absolute()


# ---- rules 5 and 7: nothing served wrong without a word -------------------------------------------------------------

def _fake_text_model(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text("[]")
    (folder / "model.safetensors").write_bytes(content)
    return folder


def test_the_cache_knows_a_text_model_and_a_bank_by_content_not_by_size_and_time(tmp_path):
    """Other weights of the same size with the modification time set back: a caption tower's text-model identity
    and a classifier bank's identity both change (they were size and mtime)."""
    from kaggle_i2p.kinds.caption import CAPTION
    from kaggle_i2p.kinds.retrieval import bank_identity

    folder = _fake_text_model(tmp_path / "minilm", b"a" * 4096)
    spec = type("Spec", (), {"caption": type("Options", (), {"text_model": folder})()})()
    before = CAPTION.cache_identity(spec, {"name": "x"})
    stat = (folder / "model.safetensors").stat()
    (folder / "model.safetensors").write_bytes(b"b" * 4096)
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "model.safetensors").stat().st_mtime_ns == stat.st_mtime_ns
    assert CAPTION.cache_identity(spec, {"name": "x"}) != before

    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "texts.txt").write_text("a cat\na dog\n")
    first = bank_identity(bank)
    stat = (bank / "texts.txt").stat()
    (bank / "texts.txt").write_text("a cow\na dog\n")
    os.utime(bank / "texts.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert bank_identity(bank) != first


def test_a_key_rule_that_collides_or_matches_nothing_is_a_problem(timm_tower, tmp_path):
    state = load_file(timm_tower / "tiny.safetensors")
    aux = {k.replace("head.", "aux.", 1): v * 2 for k, v in state.items() if k.startswith("head.")}
    save_file({**state, **aux}, str(tmp_path / "two_heads.safetensors"))
    collide = _manifest(timm_tower, lambda t: t.update(checkpoint=str(tmp_path / "two_heads.safetensors"),
                                                       checkpoint_keys={"rename": {"aux.": "head."}}))
    with pytest.raises(ManifestError, match=r"checkpoint_keys: two_heads.safetensors: \d+ key\(s\) collide"):
        validate_manifest(collide, deep=True)
    nothing = _manifest(timm_tower, lambda t: t.update(checkpoint_keys={"strip": ["state_dict_ema."],
                                                                        "ignore": ["aux."]}))
    with pytest.raises(ManifestError) as err:
        validate_manifest(nothing, deep=True)
    text = str(err.value)
    assert "checkpoint_keys.strip" in text and "'state_dict_ema.'" in text and "checkpoint_keys.ignore" in text


def test_the_gpu_suite_resolves_a_relative_out_and_fails_when_its_parts_do(tmp_path):
    """Run from outside the checkout with a relative --out: the reports land there; a suite whose every part fails
    (here: no budget left) exits non-zero, its reports still written."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--parts", "env",
                           "--budget", "3", "--out", "rel_out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert (tmp_path / "rel_out" / "gpu_suite.json").is_file() and "did not measure: env" in done.stderr
    assert json.loads((tmp_path / "rel_out" / "gpu_suite.json").read_text())["parts"]["env"]["status"] == "skipped"


# ---- rule 4 and security: a small input never takes the machine ------------------------------------------------------

def _alias_bomb(field: str) -> str:
    levels = ["x0: &x0 [64, 64, 64, 64, 64, 64, 64, 64, 64]"]
    levels += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 10)]
    resolutions = "*x9" if field == "resolutions" else "[64]"
    name = "*x9" if field == "name" else "tiny"
    return "\n".join(["embedding_dim: 384", "fallback: fallback.npy", *levels, "towers:", f"- name: {name}",
                      "  library: timm", "  arch: test_vit", "  checkpoint: tiny.safetensors",
                      f"  image: {{mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], resolutions: {resolutions}}}",
                      "  head: {type: linear}", "  weight: 1.0", ""])


@pytest.mark.parametrize("field", ["resolutions", "name"])
def test_a_yaml_alias_bomb_is_one_problem_in_bounded_memory(timm_tower, tmp_path, field):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(field))
    assert path.stat().st_size < 2000
    probe = ("from kaggle_i2p.manifest import load_manifest, ManifestError\n"
             f"try: load_manifest({str(path)!r})\nexcept ManifestError as err: print(str(err).replace(chr(10), ' '))\n"
             f"{PEAK}")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    message, peak_kb = done.stdout.strip().splitlines()[-2:]
    assert "alias bomb" in message, done.stdout + done.stderr
    assert int(peak_kb) < 2_000_000  # the bomb expands to 3 GB; the imports alone take ~0.8 GB


def test_yaml_aliases_within_bounds_still_work_and_a_recursive_one_is_refused():
    from kaggle_i2p.core.validate import load_yaml_text

    assert load_yaml_text("a: &a {x: 1}\nb: *a\nc: [*a, *a]") == {"a": {"x": 1}, "b": {"x": 1}, "c": [{"x": 1}] * 2}
    with pytest.raises(yaml.YAMLError, match="contains it"):
        load_yaml_text("a: &a [1, *a]")


def _sharded(folder: Path, state: dict, shard_names: list[str]) -> Path:
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**{k: shard_names[0] for k in keys[:half]},
                                                **{k: shard_names[1] for k in keys[half:]}}}))
    return index


def test_a_shard_index_only_names_regular_files_beside_it(timm_tower, tmp_path):
    """Shard names that climb out (`../../etc/passwd`), absolute names, and a FIFO among the shards: each refused,
    naming the entry, never opened (a FIFO would block `train` and `inspect` forever)."""
    from kaggle_i2p.models.checkpoints import TowerLoadError, checkpoint_shapes, shard_files

    state = load_file(timm_tower / "tiny.safetensors")
    good = _sharded(tmp_path, state, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert set(checkpoint_shapes(good)) == set(state)
    for names, words in ((["../../../../../etc/passwd", "model-00002-of-00002.safetensors"], "outside"),
                         (["/etc/hostname", "model-00002-of-00002.safetensors"], "not a file name beside")):
        index = _sharded(tmp_path, state, names)
        with pytest.raises(TowerLoadError, match=words):
            shard_files(index)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    index = _sharded(tmp_path, state, ["model-00001-of-00002.safetensors", "fifo.safetensors"])
    with pytest.raises(TowerLoadError, match="not a regular file"):
        shard_files(index)
    done = _cli("inspect", str(index), timeout=120)
    _one_message(done, "not a regular file")


# ---- rules 1 and 4: one message before the compute ------------------------------------------------------------------

@pytest.fixture(scope="module")
def caption_tower(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("caption_tower")
    tiny_tower_manifest(folder, "transformers", "caption")
    return folder


def test_a_caption_towers_text_model_and_tokenizer_are_checked_before_any_image(caption_tower, tmp_path):
    """A text model of another width, one without its weights, and a captioner folder without tokenizer files:
    each a manifest problem of the deep check (which predict runs first), not a traceback or fallbacks after the
    images were captioned."""
    from sentence_transformers import SentenceTransformer

    from kaggle_i2p.models.text import default_model_path

    minilm = SentenceTransformer(str(default_model_path()), device="cpu")
    dense = __import__("sentence_transformers").models.Dense(384, 128)
    SentenceTransformer(modules=[minilm[0], minilm[1], dense]).save(str(tmp_path / "wide"))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(default_model_path(), no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(caption_tower / "tiny_blip", no_tokenizer,
                    ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special_tokens*"))
    for edit, words in (
            (lambda t: t["caption"].update(text_model=str(tmp_path / "wide")), "gives 128-d embeddings"),
            (lambda t: t["caption"].update(text_model=str(no_weights)), "holds no weights"),
            (lambda t: t.update(arch=str(no_tokenizer)), "no tokenizer")):
        with pytest.raises(ManifestError, match=words):
            validate_manifest(_manifest(caption_tower, edit), deep=True)


@pytest.fixture(scope="module")
def interrogator_tower(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("interrogator_tower")
    tiny_tower_manifest(folder, "open_clip", "interrogator")
    return folder


def test_interrogator_templates_and_clip_checkpoint_are_checked_before_any_image(interrogator_tower, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ManifestError, match=r"interrogator.clip_checkpoint: .*junk.safetensors cannot be read"):
        validate_manifest(_manifest(interrogator_tower, lambda t: t["interrogator"].update(
            clip_checkpoint=str(junk))), deep=True)
    for template, words in (("{medium} by {artist", "a brace without its pair"),
                            ("{medium}, {}", "empty field"),
                            ("a photo", "names no slot"),
                            ("{medium!r}", "not a bank's folder name")):
        with pytest.raises(ManifestError, match=r"templates\[0\]: .*" + words):
            load_manifest(_manifest(interrogator_tower, lambda t, x=template: t["interrogator"].update(
                templates=[x])))


def test_a_text_map_clip_checkpoint_of_junk_is_a_config_problem(tmp_path, interrogator_tower):
    from kaggle_i2p.testing import build_toy_training_set, toy_training_config
    from kaggle_i2p.train.config import TrainConfigError, parse_train_config

    build_toy_training_set(tmp_path / "work", n_prompts=4)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(2048))
    config = toy_training_config(tmp_path / "work", tmp_path / "out", text_map={
        "clip_arch": str(interrogator_tower / "tiny_open_clip_vit.json"), "clip_checkpoint": str(junk)})
    config["tower"]["head"] = {"type": "linear", "init": "text_map"}
    with pytest.raises(TrainConfigError, match=r"text_map.clip_checkpoint: .*junk.safetensors cannot be read"):
        parse_train_config(config, tmp_path / "config.yaml")


@pytest.mark.parametrize("kind", [["regressor"], {"regressor": 1}])
def test_a_kind_that_is_not_a_name_is_a_problem(timm_tower, kind):
    with pytest.raises(ManifestError, match="must be one name"):
        load_manifest(_manifest(timm_tower, lambda t: t.update(kind=kind)))


def test_inspect_says_what_is_wrong_with_a_file_or_a_name(tmp_path, timm_tower):
    hf = tmp_path / "hf"
    tiny_tower_manifest(hf, "transformers", "regressor")
    for name, config, words in (("badjson", "{not json", "cannot be read as a transformers config.json"),
                                ("badtype", json.dumps({"model_type": "nosuchmodel"}), "not one transformers knows")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(config)
        shutil.copyfile(hf / "tiny.safetensors", folder / "tiny.safetensors")
        with pytest.raises(InspectError, match=words):
            inspect_checkpoint(folder / "tiny.safetensors")
    (tmp_path / "random.pt").write_bytes(os.urandom(5000))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "cut.safetensors").write_bytes((timm_tower / "tiny.safetensors").read_bytes()[:300])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    for file, words in (("random.pt", "not a torch.save file"), ("empty.safetensors", "an empty file"),
                        ("cut.safetensors", "300 bytes"), ("module.pt", "whole pickled")):
        with pytest.raises(InspectError, match=words) as err:
            inspect_checkpoint(tmp_path / file)
        assert "pass --library and --arch" not in str(err.value)
    with pytest.raises(InspectError, match="--name 'my tower'.*e.g. my_tower"):
        inspect_checkpoint(timm_tower / "tiny.safetensors", name="my tower")
    with pytest.raises(InspectError) as err:
        inspect_checkpoint(timm_tower / "tiny.safetensors", library="timm", arch="vit_tiny_patch16_224")
    assert "pass --library" not in str(err.value) and "check that --arch" in str(err.value)


def test_run_options_of_the_wrong_type_are_one_option_error():
    from kaggle_i2p.inference.options import RunOptions

    for values in ({"cache_dir": 123}, {"progress": "yes"}, {"device": 3}, {"compile_views": "no"}):
        with pytest.raises(OptionError):
            RunOptions.of(**values)


def test_a_lora_stage_reports_every_problem_at_once(tmp_path):
    from kaggle_i2p.testing import build_toy_training_set, toy_training_config
    from kaggle_i2p.train.config import TrainConfigError, parse_train_config

    build_toy_training_set(tmp_path / "work", n_prompts=4)
    config = toy_training_config(tmp_path / "work", tmp_path / "out")
    config["stages"][1]["lora"] = {"blocks": [5, 9], "rank": 0, "alpha": -1, "dropout": 1.0, "modules": ["nosuch"]}
    with pytest.raises(TrainConfigError) as err:
        parse_train_config(config, tmp_path / "config.yaml")
    problems = err.value.problems
    for field in ("lora.rank", "lora.alpha", "lora.dropout", "lora.modules", "lora.blocks"):
        assert any(f"stages[1].{field}:" in p for p in problems), (field, problems)


def test_export_refuses_resolutions_its_tower_cannot_serve_and_writes_nothing(tmp_path):
    from kaggle_i2p.testing import build_toy_training_set, toy_training_config
    from kaggle_i2p.train import export_checkpoint, train
    from kaggle_i2p.train.export import ExportError

    build_toy_training_set(tmp_path / "work", n_prompts=6)
    config = toy_training_config(tmp_path / "work", tmp_path / "out")
    config["stages"] = config["stages"][:1]
    result = train(_write_yaml(tmp_path / "config.yaml", config))
    with pytest.raises(ExportError, match=r"(?s)--resolutions.*40 is not a multiple of the patch size 16"):
        export_checkpoint(result.best, tmp_path / "export", resolutions=[40])
    assert not (tmp_path / "export").exists()
    written = export_checkpoint(result.best, tmp_path / "export", resolutions=[32, 48])
    validate_manifest(written.manifest, deep=True)


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_dataset_steps_say_what_is_missing_and_how_to_make_it(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for step in (["index"], ["generate", "--model", str(tmp_path / "sd2")]):
        done = subprocess.run([sys.executable, "-m", "kaggle_i2p.dataset", *step, "--work", str(work)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "text step has not finished" in done.stderr and "python -m kaggle_i2p.dataset text" in done.stderr
    from kaggle_i2p.dataset.generate import check_model_folder

    with pytest.raises(I2PError, match="no such folder.*--model"):
        check_model_folder(tmp_path / "sd2")


# ---- rule 3: a plugin never ends a command, and never replaces silently ------------------------------------------

def _plugin_site(tmp_path: Path, module: str, code: str, group: str = "kaggle_i2p.libraries") -> dict:
    site = tmp_path / "site"
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    path = [str(site), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "HOME": str(tmp_path)}


def test_a_plugin_that_exits_at_import_is_logged_and_the_command_goes_on(timm_tower, tmp_path):
    env = _plugin_site(tmp_path, "argv_plugin", """
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--mine", required=True)
        parser.parse_args()  # exits 2: the command line is kaggle-i2p's
        """)
    done = _cli("validate-manifest", str(timm_tower / "tiny_manifest.yaml"), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "argv_plugin" in done.stderr and "SystemExit" in done.stderr and "OK" in done.stdout


def test_a_plugin_replacing_a_builtin_library_is_named_in_the_runs_summary(timm_tower, tmp_path, sample_images):
    env = _plugin_site(tmp_path, "timm_override", """
        from kaggle_i2p import register_library
        from kaggle_i2p.models.backbones.timm_models import TimmLibrary

        class Mine(TimmLibrary):
            pass

        register_library(Mine(), replace=True)
        """)
    done = _cli("predict", str(sample_images), "--manifest", str(timm_tower / "tiny_manifest.yaml"), "--out",
                str(tmp_path / "s.csv"), "--device", "cpu", "--workers", "0", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replaced by timm_override" in done.stderr
    summary = next(line for line in done.stdout.splitlines() if line.startswith("kaggle_i2p: 7 images"))
    assert "replaced by plugins: library 'timm' by timm_override" in summary


# ---- signals ------------------------------------------------------------------------------------------------------

def test_ctrl_c_while_the_command_loads_or_after_it_finished_is_130_or_its_status(timm_tower, tmp_path):
    """The console script's Ctrl-C: delivered while the manifest modules import (the first tenth of a second, once
    a bare traceback and exit -2) it is the one line and 130; delivered after the command finished (the interpreter
    shutting down) it changes nothing."""
    manifest = tmp_path / "m.yaml"
    shutil.copyfile(timm_tower / "tiny_manifest.yaml", manifest)
    shutil.copyfile(timm_tower / "fallback.npy", tmp_path / "fallback.npy")
    shutil.copyfile(timm_tower / "tiny.safetensors", tmp_path / "tiny.safetensors")
    args = ["kaggle-i2p", "inspect", str(tmp_path / "tiny.safetensors"), "--name", "again", "--append", str(manifest)]
    early = textwrap.dedent(f"""
        import importlib.abc, os, signal, sys
        class CtrlC(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "kaggle_i2p.manifest":
                    os.kill(os.getpid(), signal.SIGINT)
                return None
        sys.meta_path.insert(0, CtrlC())
        sys.argv = {args!r}
        from kaggle_i2p.cli import run  # what the console script does
        sys.exit(run())
        """)
    done = subprocess.run([sys.executable, "-c", early], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert "interrupted; nothing was written" in done.stderr
    late = textwrap.dedent(f"""
        import os, signal, sys
        sys.argv = {args!r}
        from kaggle_i2p.cli import run
        code = run()
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C while the interpreter shuts down
        sys.exit(code)
        """)
    done = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "again" in manifest.read_text()
    np.testing.assert_equal(len(load_manifest(manifest).towers), 2)
