"""`python -m kaggle_i2p.dataset text|generate|index ...`: the steps of build_dataset.sh, each runnable alone."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from ..core.errors import I2PError
from .generate import DEFAULTS
from .index import missing_images, write_image_index
from .layout import IMAGE_FORMATS
from .pairs import NPROBE
from .prompts import DEDUP_THRESHOLD, EXACT_UP_TO, GROUP_THRESHOLD, N_FOLDS, SEARCHES, run_text_steps

DESCRIPTION = """Build a training set from prompt files, one resumable step at a time (the steps of build_dataset.sh):
text (collect, clean, semantic dedup, MiniLM targets, grouped folds) -> generate (SD2 images, sharded over ranks) ->
index (index.parquet and targets.npy for the images on disk). A finished step or image is never redone."""


def main(argv: list[str] | None = None) -> int:
    """`python -m kaggle_i2p.dataset text|generate|index ...`: the steps of build_dataset.sh, each runnable alone."""
    parser = argparse.ArgumentParser(prog="python -m kaggle_i2p.dataset", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    text = sub.add_parser("text", help="collect, clean, dedup, targets and folds into WORK/index.parquet")
    text.add_argument("sources", nargs="+", help="prompt files: PATH or PATH:COLUMN (txt, csv, parquet)")
    text.add_argument("--work", type=Path, required=True)
    text.add_argument("--dedup-threshold", type=float, default=DEDUP_THRESHOLD)
    text.add_argument("--group-threshold", type=float, default=GROUP_THRESHOLD)
    text.add_argument("--folds", type=int, default=N_FOLDS)
    text.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.csv prompt files, e.g. latin-1 "
                      "(default: %(default)s)")
    text.add_argument("--device", default=None, help="embedding and similarity device (default: the rank's GPU when "
                      "there is one, else the CPU)")
    text.add_argument("--search", choices=SEARCHES, default="auto",
                      help="similar pairs: exact, or ivf (FAISS inverted lists, approximate, for large sets on a CPU); "
                      f"auto: exact on a GPU or up to {EXACT_UP_TO:,} prompts (default: %(default)s)")
    text.add_argument("--nprobe", type=int, default=NPROBE, help="lists each prompt probes with --search ivf "
                      "(default: %(default)s)")
    text.add_argument("--batch-size", type=int, default=None, help="embedding batch (default: 1024 on a GPU, 128)")
    gen = sub.add_parser("generate", help="make this rank's missing images (run under torchrun/accelerate or a job "
                         "array for more); the rank that finds every image made writes the index")
    gen.add_argument("--work", type=Path, required=True)
    gen.add_argument("--model", type=Path, required=True, help="local diffusers Stable Diffusion 2 folder")
    gen.add_argument("--images-per-prompt", type=int, default=DEFAULTS.images_per_prompt)
    gen.add_argument("--steps", type=int, default=DEFAULTS.steps, help="DPMSolver++ steps (default: %(default)s)")
    gen.add_argument("--guidance", type=float, default=DEFAULTS.guidance)
    gen.add_argument("--image-size", type=int, default=DEFAULTS.image_size,
                     help="saved size (default: %(default)s, the host's images)")
    gen.add_argument("--render-size", type=int, default=None, help="generation size (default: the model's, 768)")
    gen.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    gen.add_argument("--format", choices=IMAGE_FORMATS, default=DEFAULTS.image_format)
    gen.add_argument("--device", default=None)
    index = sub.add_parser("index", help="write index.parquet and targets.npy for the images on disk")
    index.add_argument("--work", type=Path, required=True)
    index.add_argument("--format", choices=IMAGE_FORMATS, default=DEFAULTS.image_format)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run_step(args)
    except (I2PError, OSError) as err:
        print(f"python -m kaggle_i2p.dataset {args.step}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npython -m kaggle_i2p.dataset {args.step}: interrupted; finished steps and images are kept in "
              f"{args.work}: rerun the same command to resume", file=sys.stderr)
        return 130


def _run_step(args: argparse.Namespace) -> int:
    if args.step == "text":
        path = run_text_steps(args.sources, args.work, args.dedup_threshold, args.group_threshold, args.folds,
                              args.device, args.search, args.nprobe, args.batch_size, args.encoding)
        if path is None:
            print("this rank's embedding shards are done; the rank that finishes the last one writes the index")
        else:
            print(f"wrote {path}: {len(pd.read_parquet(path))} prompts")
    elif args.step == "generate":
        from .generate import generate

        written = generate(args.work, args.model, args.images_per_prompt, args.steps, args.guidance, args.image_size,
                           args.render_size, args.batch_size, args.format, args.device)
        print(f"generated {len(written)} images")
        missing = missing_images(args.work, args.images_per_prompt, args.format)
        if missing:  # other ranks (or nodes, or array tasks) are still at work: the last to finish writes the index
            print(f"{missing} images are still to be made by other ranks; the one that finishes last writes the "
                  "index")
        else:
            path = write_image_index(args.work, args.format)
            print(f"every image is made: wrote {path}: {len(pd.read_parquet(path))} images")
    else:
        path = write_image_index(args.work, args.format)
        print(f"wrote {path}: {len(pd.read_parquet(path))} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
