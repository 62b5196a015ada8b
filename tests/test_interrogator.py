"""The interrogator kind (issue 24): a tiny whole open_clip CLIP file serves as the image tower and its text tower
scores the candidates; phrase banks built from it by build-bank; the picked prompt is checked against a hand
computation with open_clip's own encoders (top phrases per bank, templates x ranks, the best candidate or the mean
of the best), embedded by the real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.inference.images import decode_image, make_view
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.text import embed_prompts
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, TINY_OPEN_CLIP_CONFIG, TINY_PHRASES, write_tiny_interrogator


def _manifest(folder, **section):
    entry = write_tiny_interrogator(folder)
    entry["interrogator"].update(section)
    (folder / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    tower = {"name": "interrogator", **entry, "weight": 1.0,
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": [64]}}
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
    return path


def _by_hand(folder, sample_dir, ids, spec, pick: str, mean_of: int, top: int = 3, base=None) -> np.ndarray:
    clip = open_clip.model.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()
    clip.load_state_dict(load_file(str(folder / "tiny_clip.safetensors")))
    tokenizer = open_clip.tokenizer.SimpleTokenizer()

    def text(texts):
        with torch.no_grad():
            return torch.nn.functional.normalize(clip.encode_text(tokenizer(texts)), dim=-1).numpy()

    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in ids]
    with torch.no_grad():
        images = torch.nn.functional.normalize(clip.encode_image(make_view(pixels, spec.image, 64)), dim=-1).numpy()
    phrase_keys = {slot: text(phrases) for slot, phrases in TINY_PHRASES.items()}
    out = []
    templates = spec.interrogator.templates
    for number, image in enumerate(images):
        best = {slot: [TINY_PHRASES[slot][i] for i in np.argsort(-(keys @ image), kind="stable")[:top]]
                for slot, keys in phrase_keys.items()}
        candidates = []
        for rank in range(top):
            for template in templates:
                made = template.format(base=base[number] if base else "", medium=best["medium"][rank],
                                       artist=best["artist"][rank], flavor=best["flavor"][rank])
                if made not in candidates:
                    candidates.append(made)
        scores = text(candidates) @ image
        chosen = [candidates[i] for i in np.argsort(-scores, kind="stable")[:1 if pick == "best" else mean_of]]
        vector = embed_prompts(chosen).mean(axis=0)
        out.append(vector / np.linalg.norm(vector))
    return np.array(out)


@pytest.mark.parametrize(("pick", "mean_of"), [("best", 4), ("mean", 3)])
def test_the_interrogator_picks_what_the_clip_scores_say(tmp_path, sample_dir, pick, mean_of):
    path = _manifest(tmp_path, pick=pick, mean_of=mean_of)
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=3)
    want = _by_hand(tmp_path, sample_dir, run.ids, load_manifest(path).towers[0], pick, mean_of)
    np.testing.assert_allclose(run.embeddings, want, atol=2e-5)
    assert len({tuple(np.round(row, 4)) for row in run.embeddings}) > 1  # the phrases follow the image


def test_the_base_caption_comes_from_a_caption_tower_of_the_manifest(tmp_path, sample_dir):
    """The CLIP interrogator's recipe: a caption, then the phrases; the caption tower's own captions fill {base}."""
    from kaggle_i2p.models.text import default_model_path
    from kaggle_i2p.testing import write_tiny_captioner

    path = _manifest(tmp_path, base="blip", templates=["{base}, {medium}, {flavor}", "{base} by {artist}"])
    data = yaml.safe_load(path.read_text())
    write_tiny_captioner(tmp_path / "blip", "blip")
    data["towers"].append({"name": "blip", "kind": "caption", "library": "transformers", "arch": "blip",
                           "checkpoint": "blip/model.safetensors", "weight": 0.5,
                           "backbone": {"generate": {"max_new_tokens": 4}},
                           "caption": {"text_model": str(default_model_path())},
                           "image": data["towers"][0]["image"]})
    path.write_text(yaml.safe_dump(data))
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=3)
    base = run.texts["blip"]["r64"]
    assert all(base)
    want = _by_hand(tmp_path, sample_dir, run.ids, load_manifest(path).towers[0], "best", 4, base=base)
    np.testing.assert_allclose(run.tower_embeddings["interrogator"], want, atol=2e-5)

    data["towers"][1]["weight"] = 0  # weighted out of the ensemble, it still runs for the base captions
    path.write_text(yaml.safe_dump(data))
    again = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                      batch_size=3)
    np.testing.assert_allclose(again.embeddings, want, atol=2e-5)  # the interrogator alone


@pytest.mark.parametrize(("section", "field", "message"), [
    ({"templates": ["{base}, {medium}"]}, "templates", "{base} needs base"),
    ({"base": "nobody"}, "base", "must name a caption tower"),
    ({"base": "interrogator"}, "base", "must name a caption tower"),
    ({"templates": ["{medium} by {painter}"]}, "templates", "slot {painter} needs the bank"),
    ({"templates": []}, "templates", "must be a list"),
    ({"pick": "first"}, "pick", "not one of best, mean"),
    ({"top": 0}, "top", "integer >= 1"),
    ({"clip_checkpoint": "missing.pt"}, "clip_checkpoint", "file not found"),
])
def test_interrogator_options_that_cannot_work_are_one_message(tmp_path, capsys, section, field, message):
    path = _manifest(tmp_path, **section)
    assert main(["validate-manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"(towers[0]).interrogator.{field}" in err and message in err and "Traceback" not in err, err


def test_caption_and_interrogator_towers_are_scored_and_tuned_like_any(tmp_path, sample_dir, capsys):
    """evaluate scores each of them on the sample's prompts; tune weights them and writes a manifest that loads."""
    import json

    from kaggle_i2p.models.text import default_model_path
    from kaggle_i2p.testing import write_tiny_captioner

    path = _manifest(tmp_path)
    data = yaml.safe_load(path.read_text())
    write_tiny_captioner(tmp_path / "blip", "blip")
    data["towers"] += [{"name": "blip", "kind": "caption", "library": "transformers", "arch": "blip",
                        "checkpoint": "blip/model.safetensors", "weight": 0.5,
                        "backbone": {"generate": {"max_new_tokens": 4}},
                        "caption": {"text_model": str(default_model_path())}, "image": data["towers"][0]["image"]},
                       {"name": "prior", "kind": "prior", "vector": "fallback.npy", "weight": 0.5}]
    path.write_text(yaml.safe_dump(data))
    common = ["--prompts", str(sample_dir / "prompts.csv"), "--manifest", str(path), "--device", "cpu",
              "--workers", "0"]
    assert main(["evaluate", str(sample_dir / "images"), *common, "--json", "--no-cache"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores["per_tower"]) == {"interrogator", "blip", "prior"}
    assert all(-1 <= s <= 1 for s in scores["per_tower"].values())
    out = tmp_path / "tuned.yaml"
    assert main(["tune", str(sample_dir / "images"), *common, "--out", str(out), "--folds", "2", "--no-cache"]) == 0
    tuned = load_manifest(out)
    assert [t.kind for t in tuned.towers] == ["interrogator", "caption", "prior"]
    assert sum(t.weight for t in tuned.towers) == pytest.approx(1.0)
