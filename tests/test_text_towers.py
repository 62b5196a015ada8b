"""Issue 35, part 2 (the whole library contract): a CLIP text tower is asked of the registry, so the transformers
CLIP and SigLIP text towers that users' image towers pair with serve where open_clip's did: `build-bank --keys clip`
keys, the interrogator's ranking of its candidates, and the checks before compute. Tiny models saved with
save_pretrained (a word-piece tokenizer beside them), compared with the model's own `get_text_features`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as hf

from kaggle_i2p.bank.build import build_bank, clip_checkpoint_problem, clip_embedder, clip_text_width
from kaggle_i2p.bank.folder import Bank
from kaggle_i2p.kinds.interrogator import InterrogatorOptions, interrogate
from kaggle_i2p.models.backbones import TextTowerError, text_library
from kaggle_i2p.models.text import default_model_path
from kaggle_i2p.testing import TINY_WORDS

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


def _save(folder, family: str, seed: int = 0, projection: int = 24):
    """A tiny CLIP or SigLIP as save_pretrained leaves it, with a word-piece tokenizer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]
    (folder / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(64 - len(words))]) + "\n")
    tokenizer = hf.BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    if family == "clip":
        model = hf.CLIPModel(hf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=projection))
    else:
        model = hf.SiglipModel(hf.SiglipConfig(text_config=TEXT, vision_config=VISION))
    model.save_pretrained(str(folder))
    return model.eval(), tokenizer


def _own(model, tokenizer, texts: list[str], family: str) -> np.ndarray:
    """The model's own text features for `texts`, tokenized as it was trained."""
    padding = "max_length" if family == "siglip" else "longest"
    tokens = tokenizer(texts, padding=padding, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=tokens["input_ids"],
                                      **({} if family == "siglip" else {"attention_mask": tokens["attention_mask"]}))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out, dim=-1).numpy()


PHRASES = ["a red castle at night", "oil painting of a city", "golden hour portrait", "neon street in the rain",
           "a blue river", "digital art"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_transformers_text_tower_builds_clip_keyed_banks(family, tmp_path):
    folder = tmp_path / family
    model, tokenizer = _save(folder, family)
    assert text_library(str(folder)).name == "transformers"
    assert clip_checkpoint_problem(str(folder), folder) is None
    assert clip_text_width(str(folder)) == (24 if family == "clip" else 32)
    (tmp_path / "phrases.txt").write_text("\n".join(PHRASES) + "\n")
    bank = Bank.open(build_bank(tmp_path / "phrases.txt", tmp_path / "bank", keys="clip", clip_arch=str(folder),
                                clip_checkpoint=folder / "model.safetensors", device="cpu"))
    want = _own(model, tokenizer, PHRASES, family)
    np.testing.assert_allclose(np.asarray(bank.keys, dtype=np.float32), want, atol=2e-3)  # float16 keys
    assert len({tuple(np.round(row, 3)) for row in want}) == len(PHRASES)  # the texts are told apart
    np.testing.assert_allclose(clip_embedder(str(folder), folder, "cpu", 4)(PHRASES), want, atol=1e-5)


def test_the_interrogator_ranks_its_candidates_with_a_transformers_text_tower(tmp_path):
    folder = tmp_path / "clip"
    model, tokenizer = _save(folder, "clip")
    slots = {"medium": ["oil painting", "digital art", "a portrait"]}  # ranked by the query, each a candidate
    for slot, phrases in slots.items():
        (tmp_path / f"{slot}.txt").write_text("\n".join(phrases) + "\n")
        build_bank(tmp_path / f"{slot}.txt", tmp_path / "banks" / slot, keys="clip", clip_arch=str(folder),
                   clip_checkpoint=folder, device="cpu")
    options = InterrogatorOptions(phrase_banks=tmp_path / "banks", templates=("{medium} of a city",),
                                  clip_arch=str(folder), clip_checkpoint=folder / "model.safetensors",
                                  text_model=default_model_path(), top=3, pick="best", mean_of=1, key_dim=24)
    targets = ["digital art of a city", "a portrait of a city"]
    queries = _own(model, tokenizer, targets, "clip")  # an image embedding equal to a candidate's text key
    _, picked = interrogate(options, queries, "cpu")
    assert picked == targets


def test_what_no_library_reads_as_a_text_tower_is_one_message(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    hf.ViTConfig(**{k: v for k, v in VISION.items()}).save_pretrained(str(folder))
    with pytest.raises(TextTowerError, match="names no model with a text tower that a registered library reads"):
        text_library(str(folder))
    assert "open_clip, transformers" in clip_checkpoint_problem(str(folder), folder)
    other = tmp_path / "other"
    _save(other, "clip", projection=16)
    _save(tmp_path / "clip", "clip")
    problem = clip_checkpoint_problem(str(tmp_path / "clip"), other / "model.safetensors")
    assert problem.startswith(f"{other / 'model.safetensors'} is not the whole {tmp_path / 'clip'} model") and \
        "text_projection.weight" in problem
