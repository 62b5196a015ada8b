"""The `kaggle-i2p` command line: predict, validate-manifest, dry-run, pack-wheels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__

DEFAULT_MANIFEST = "weights_manifest.yaml"


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default=DEFAULT_MANIFEST, help="weights manifest YAML (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 32 CUDA, 8 CPU)")
    parser.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: 2)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=None,
                        help="override every tower's precision (default: the manifest's; auto = fp16 on CUDA)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_dir

    predict_dir(args.image_dir, manifest=args.manifest, out_csv=args.out, device=args.device,
                batch_size=args.batch_size, num_workers=args.workers, precision=args.precision,
                progress=not args.quiet)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .manifest import load_manifest
    from .towers import check_architectures

    manifest = load_manifest(args.path, check_files=not args.no_file_check)
    check_architectures(manifest)
    print(f"{args.path}: OK ({len(manifest.towers)} towers)")
    for spec in manifest.towers:
        print(f"  {spec.name}: {spec.library} {spec.arch}, {spec.head.type} head, resolutions "
              f"{list(spec.image.resolutions)}{' + hflip' if spec.image.hflip else ''}, weight {spec.weight:g}, "
              f"{spec.checkpoint}")
    return 0


def _cmd_dry_run(args: argparse.Namespace) -> int:
    from .dryrun import dry_run

    report = dry_run(args.sample_dir, manifest=args.manifest, out_csv=args.out, device=args.device,
                     batch_size=args.batch_size, num_workers=args.workers, precision=args.precision,
                     check_embeddings=not args.no_embedding_check, progress=not (args.quiet or args.json))
    if args.json:
        print(report.to_json())
    else:
        print(report.summary)
        print(report)
    return 0 if report.format_ok else 1


def _cmd_pack_wheels(args: argparse.Namespace) -> int:
    from .wheelhouse import DEFAULT_PROVIDED, pack_wheels

    result = pack_wheels(args.out, source=args.source, provided=args.provided or DEFAULT_PROVIDED,
                         extras=args.extras, extra_packages=args.packages, python_version=args.python_version,
                         platforms=args.platform)
    print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaggle-i2p", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kaggle_i2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="predict a folder of images and write submission.csv")
    predict.add_argument("image_dir", type=Path)
    predict.add_argument("--out", default="submission.csv", help="output CSV (default: %(default)s)")
    _add_run_options(predict)
    predict.set_defaults(func=_cmd_predict)

    validate = sub.add_parser("validate-manifest", help="check a manifest without loading any weights")
    validate.add_argument("path", type=Path)
    validate.add_argument("--no-file-check", action="store_true",
                          help="do not require checkpoint files to exist (e.g. a Kaggle manifest checked locally)")
    validate.set_defaults(func=_cmd_validate)

    dry = sub.add_parser("dry-run", help="predict the competition sample and check format and score")
    dry.add_argument("--sample-dir", type=Path, default=None,
                     help="folder with images/, sample_submission.csv, prompts.csv (default: the Kaggle input when "
                          "attached, else the sample bundled in the package)")
    dry.add_argument("--out", default=None, help="also keep the dry-run CSV here")
    dry.add_argument("--json", action="store_true", help="print one JSON object")
    dry.add_argument("--no-embedding-check", action="store_true", help="skip embedding prompts.csv")
    _add_run_options(dry)
    dry.set_defaults(func=_cmd_dry_run)

    pack = sub.add_parser("pack-wheels", help="build the offline wheelhouse to upload as a Kaggle dataset")
    pack.add_argument("--out", type=Path, default=Path("dist/wheelhouse"))
    pack.add_argument("--source", type=Path, default=None, help="kaggle_i2p source tree (default: this checkout)")
    pack.add_argument("--provided", nargs="*", default=None,
                      help="packages the target image already has; they and their dependencies are not packed "
                           "(default: torch torchvision numpy pillow)")
    pack.add_argument("--extras", nargs="*", default=[], help="kaggle_i2p extras to pack too, e.g. text")
    pack.add_argument("--packages", nargs="*", default=[], help="further requirements to pack (pip syntax)")
    pack.add_argument("--python-version", default=None, help="target Python, e.g. 3.10 (default: this one)")
    pack.add_argument("--platform", action="append", default=None,
                      help="target platform tag, repeatable, e.g. manylinux2014_x86_64 (default: this machine)")
    pack.set_defaults(func=_cmd_pack_wheels)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kaggle-i2p`; user errors print one clear message and exit 2."""
    from .images import ImageListingError
    from .manifest import ManifestError
    from .towers import TowerLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ManifestError, ImageListingError, TowerLoadError, FileNotFoundError) as err:
        print(f"kaggle-i2p {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
