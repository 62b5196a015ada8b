"""`make demo`: a dry-run of the whole pipeline on the bundled Kaggle sample.

Until the real-weight default ensemble exists, it runs two tiny random-weight towers (one timm, one open_clip) that it
builds itself: the format check and the target check are real; the cosine scores of random towers mean nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .dryrun import dry_run
from .toy import build_toy_ensemble


def main(cache_dir: str | Path = ".cache/demo") -> int:
    manifest = build_toy_ensemble(cache_dir)
    print("kaggle_i2p demo: dry-run on the 7 bundled Kaggle sample images with 2 RANDOM-WEIGHT toy towers "
          "(timm test_vit + a tiny open_clip ViT).\nThe pipeline, the CSV format check and the target check are "
          "real; the cosine scores of random towers are not meaningful.\n", flush=True)
    report = dry_run(manifest=manifest, device="cpu", num_workers=0)
    print(report.summary)
    print(report)
    return 0 if report.format_ok and report.embedding_check_ok else 1


if __name__ == "__main__":
    sys.exit(main())
