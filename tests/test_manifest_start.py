"""Issue 34, part 2 (start and keep): `kaggle-i2p init` writes a valid manifest with no towers and the package's own
fallback vector; `inspect --append` (which starts a missing manifest) and `tune --out` rewrite a user's manifest with
its comments, key order and formatting kept, changing only what they add."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import timm
import torch
import yaml

from kaggle_i2p.cli import main
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.tuning.evaluate import write_tuned_manifest


def _convnext(path):
    torch.manual_seed(0)
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=384).state_dict(), path)
    return path


def test_init_then_append_keeps_the_users_comments_and_validates(tmp_path, capsys):
    manifest = tmp_path / "kaggle" / "m.yaml"
    assert main(["init", str(manifest)]) == 0
    assert "next: kaggle-i2p inspect CHECKPOINT --append" in capsys.readouterr().out
    assert (manifest.parent / PRIOR_PATH.name).read_bytes() == PRIOR_PATH.read_bytes()  # the package's own vector
    data = yaml.safe_load(manifest.read_text())
    assert data == {"embedding_dim": 384, "fallback": PRIOR_PATH.name, "towers": []}

    # an empty manifest is valid to hold, not to run: one message naming the way to add a tower
    assert main(["validate-manifest", str(manifest)]) == 2
    assert f"add one with `kaggle-i2p inspect CHECKPOINT --append {manifest}`" in capsys.readouterr().err

    text = manifest.read_text().replace("embedding_dim: 384", "embedding_dim: 384   # MiniLM, as the metric")
    manifest.write_text("# my ensemble for the private LB, v3\n" + text)
    checkpoint = _convnext(tmp_path / "c.pth")
    assert main(["inspect", str(checkpoint), "--append", str(manifest)]) == 0
    assert main(["inspect", str(checkpoint), "--name", "again", "--append", str(manifest)]) == 0
    written = manifest.read_text()
    assert written.startswith("# my ensemble for the private LB, v3\n# A kaggle_i2p manifest")
    assert "embedding_dim: 384   # MiniLM, as the metric\n" in written
    assert "# written for an image no tower can read" in written
    assert "\n  - name: c\n    library: timm\n" in written  # the towers as the package lays them out
    assert "\n\n  - name: again\n" in written  # a blank line between towers
    assert "    head: {type: linear}\n" in written and "      resolutions: [224]\n" in written
    towers = yaml.safe_load(written)["towers"]
    assert [t["name"] for t in towers] == ["c", "again"] and towers[0]["checkpoint"] == "../c.pth"
    assert main(["validate-manifest", "--deep", str(manifest)]) == 0


def test_init_never_replaces_a_file_and_asks_for_a_vector_of_another_width(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("my notes\n")
    assert main(["init", str(manifest)]) == 2
    assert "exists; init starts a new manifest and never replaces one" in capsys.readouterr().err
    assert manifest.read_text() == "my notes\n"

    mine = tmp_path / PRIOR_PATH.name  # a vector of the user's own under the package's name
    vector = np.random.default_rng(0).normal(size=384).astype(np.float32)
    np.save(mine, vector)
    before = mine.read_bytes()
    assert main(["init", str(tmp_path / "new.yaml")]) == 2
    assert "is not the package's mean prompt embedding; it is left as it is: pass --fallback" in \
        capsys.readouterr().err
    assert mine.read_bytes() == before and not (tmp_path / "new.yaml").exists()
    assert main(["init", str(tmp_path / "new.yaml"), "--fallback", str(mine)]) == 0
    assert yaml.safe_load((tmp_path / "new.yaml").read_text())["fallback"] == mine.name  # used where it is

    assert main(["init", str(tmp_path / "wide.yaml"), "--embedding-dim", "256"]) == 2
    assert "pass --fallback FILE, a .npy of 256 values" in capsys.readouterr().err
    np.save(tmp_path / "v256.npy", np.ones(256, np.float32))
    assert main(["init", str(tmp_path / "wide.yaml"), "--embedding-dim", "256", "--fallback",
                 str(tmp_path / "v256.npy")]) == 0
    assert yaml.safe_load((tmp_path / "wide.yaml").read_text())["embedding_dim"] == 256


def test_append_starts_a_manifest_that_does_not_exist(tmp_path, capsys):
    checkpoint = _convnext(tmp_path / "c.pth")
    manifest = tmp_path / "new" / "m.yaml"
    assert main(["inspect", str(checkpoint), "--append", str(manifest)]) == 0
    assert f"started {manifest} (kaggle-i2p init) and added tower 'c'" in capsys.readouterr().out
    loaded = load_manifest(manifest)
    assert [t.name for t in loaded.towers] == ["c"]
    np.testing.assert_array_equal(loaded.fallback, np.load(PRIOR_PATH) / np.linalg.norm(np.load(PRIOR_PATH)))


def test_a_failed_append_leaves_no_started_manifest(tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"w": torch.zeros(3, 3)}, tmp_path / "odd.pth")
    manifest = tmp_path / "m.yaml"
    assert main(["inspect", str(tmp_path / "odd.pth"), "--append", str(manifest)]) == 2
    assert not manifest.exists()


COMMENTED = """\
# my two towers; keep the ViT first
embedding_dim: 384
fallback: fallback.npy    # the mean prompt, never zeros
towers:
  # the timm one
  - name: toy_timm_vit
    library: timm
    arch: test_vit
    checkpoint: toy_timm_vit.safetensors
    head: {type: mlp, hidden: 48, norm: batchnorm, activation: relu}
    image:
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
      interpolation: bicubic
      resize: squash
      resolutions: [64, 96]
      hflip: true
    weight: 0.6    # best on fold 0
  - name: toy_open_clip_vit
    library: open_clip
    arch: tiny_open_clip_vit.json
    checkpoint: toy_open_clip_vit.safetensors
    head: {type: linear}
    image:
      mean: [0.48145466, 0.4578275, 0.40821073]
      std: [0.26862954, 0.26130258, 0.27577711]
      interpolation: bilinear
      resize: shorter_side_center_crop
      resolutions: [64, 80]
    weight: 0.4
"""


def test_tune_out_keeps_the_comments_and_changes_only_the_weights_and_paths(toy_manifest, tmp_path):
    source = toy_manifest.parent / "commented.yaml"
    source.write_text(COMMENTED)
    report = SimpleNamespace(weights={"toy_timm_vit": 0.25, "toy_open_clip_vit": 0.75},
                             view_weights={"toy_timm_vit": {"r64": 0.3, "r64_flip": 0.2, "r96": 0.5, "r96_flip": 0.0},
                                           "toy_open_clip_vit": {"r64": 1.0, "r80": 0.0}}, mode="per_view")
    out = write_tuned_manifest(source, tmp_path / "tuned" / "t.yaml", report, {})
    written = out.read_text()
    rel = "../../" + toy_manifest.parent.name  # the relative paths rebased to the new folder
    expected = (COMMENTED.replace("weight: 0.6    # best on fold 0", "weight: 0.25   # best on fold 0")
                .replace("weight: 0.4", "weight: 0.75")
                .replace("hflip: true\n",
                         "hflip: true\n      view_weights: {r64: 0.3, r64_flip: 0.2, r96: 0.5, r96_flip: 0.0}\n")
                .replace("resolutions: [64, 80]\n",
                         "resolutions: [64, 80]\n      view_weights: {r64: 1.0, r80: 0.0}\n")
                .replace("fallback: fallback.npy    #", f"fallback: {rel}/fallback.npy #")  # the comment's column
                # is kept while the value fits before it
                .replace("checkpoint: toy", f"checkpoint: {rel}/toy")
                .replace("arch: tiny_open_clip_vit.json", f"arch: {rel}/tiny_open_clip_vit.json"))
    assert written == expected
    tuned = load_manifest(out)
    assert [t.weight for t in tuned.towers] == [0.25, 0.75]
    assert source.read_text() == COMMENTED
