"""Rebuild mean_prompt_embedding.npy (beside the reference manifest, and in the package data): the normalised mean
all-MiniLM-L6-v2 embedding of the generic prior prompts."""

from pathlib import Path

import numpy as np

from kaggle_i2p.core.ensemble import l2_normalize
from kaggle_i2p.models.text import embed_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "kaggle_i2p" / "data" / "prior_prompts.txt"
OUTPUTS = (ROOT / "mean_prompt_embedding.npy", ROOT / "kaggle_i2p" / "data" / "mean_prompt_embedding.npy")


def prior_prompts() -> list[str]:
    lines = PROMPTS.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def mean_prompt_embedding() -> np.ndarray:
    return l2_normalize(embed_prompts(prior_prompts()).mean(axis=0))


if __name__ == "__main__":
    vector = mean_prompt_embedding()
    for out in OUTPUTS:
        np.save(out, vector)
        print(f"wrote {out}")
