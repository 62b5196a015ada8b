"""The `kaggle-i2p` command line: predict, validate-manifest, inspect, convert, dry-run, evaluate, tune, build-bank,
pack-wheels, train, export."""

from __future__ import annotations

import argparse
import errno
import re
import sys
from pathlib import Path

from ._version import __version__
from .core.errors import I2PError, OptionError
from .core.resources import DEFAULT_MANIFEST, default_manifest

DEFAULT_CACHE = ".i2p_cache"


def _whole_number(minimum: int):
    """An argparse type: a whole number >= minimum, else one clear usage error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _add_run_options(parser: argparse.ArgumentParser, manifest_default: str | None = DEFAULT_MANIFEST,
                     manifest_help: str = "%(default)s") -> None:
    from .manifest import PRECISIONS  # here, not at the top: the command's start imports nothing it can wait for

    parser.add_argument("--manifest", default=manifest_default,
                        help=f"weights manifest YAML, or `demo` for the real-weight demo ensemble (default: "
                             f"{manifest_help})")
    parser.add_argument("--device", default="auto", help="auto (every GPU if available: several run data-parallel, "
                        "one process each), cpu, cuda, cuda:1, or a list cuda:0,cuda:1")
    parser.add_argument("--batch-size", type=_whole_number(1), default=None,
                        help="images per batch (default: 32 CUDA, 8 CPU)")
    parser.add_argument("--workers", type=_whole_number(0), default=None,
                        help="decoding worker processes (default: 2; 0 decodes in the main process)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="override every tower's precision (default: the manifest's; auto = fp16 autocast on "
                        "CUDA; fp16-weights holds the weights in fp16, norms and heads in fp32)")
    parser.add_argument("--compile", action="store_const", const=True, default=None,
                        help="torch.compile every tower's views, one callable per resolution (CUDA with Triton, "
                        "compute capability 7.0+; default: the manifest's `compile`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_options(args: argparse.Namespace, **values):  # noqa: ANN202 - a RunOptions; imported when a command runs
    """The run options `_add_run_options` declared (and the cache and image checks where the command has them),
    as the one `RunOptions` every entry point takes."""
    from .inference.options import RunOptions

    cache_dir = None if getattr(args, "no_cache", False) else getattr(args, "cache_dir", None)
    return RunOptions.of(device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                         precision=args.precision, compile_views=args.compile, cache_dir=cache_dir,
                         verify_images=getattr(args, "verify_images", False),
                         progress=not (args.quiet or getattr(args, "json", False)), **values)


def _add_index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nlist", type=_whole_number(1), default=None,
                        help="inverted lists of the index (default: FAISS's guidance for the bank size)")
    parser.add_argument("--recall-queries", type=Path, default=None,
                        help=".npy of real queries (e.g. image embeddings) to measure the index's recall on "
                             "(default: held-out bank rows)")


def _add_verify_images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify-images", action="store_true",
                        help="key cached outputs by each image's content hash, not its size and modification time")


def _share(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: give R/W, this machine's part R of W (0 <= R < W), e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def _parser_predict(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="predict a folder of images and write submission.csv")
    predict.add_argument("image_dir", type=Path)
    predict.add_argument("--out", default="submission.csv", help="output CSV (default: %(default)s)")
    predict.add_argument("--cache-dir", type=Path, default=None,
                         help="store every tower x view output here; a killed run resumes where it stopped")
    predict.add_argument("--captions-out", type=Path, default=None, metavar="CSV",
                         help="also write each caption tower's caption of each image and view "
                              "(imgId,tower,view,caption)")
    predict.add_argument("--share", type=_share, default=None, metavar="R/W",
                         help="several machines sharing --cache-dir: encode only this machine's chunks (R of W) "
                         "and write no CSV; a last `predict` without --share writes it")
    _add_run_options(predict)
    _add_verify_images(predict)
    predict.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference.predict import predict_dir

    if args.share is not None:
        from .inference.predict import encode_part

        if args.captions_out is not None:
            raise OptionError(f"--captions-out {args.captions_out}: a --share part writes no files but the cache; "
                              "give --captions-out to the last `predict` without --share, which writes the CSV and "
                              "the captions from the shared cache")

        images = encode_part(args.image_dir, args.manifest, args.cache_dir, args.share, _run_options(args))
        print(f"kaggle_i2p: part {args.share[0]} of {args.share[1]}: {images} images encoded into {args.cache_dir}; "
              "when every part is done, `predict` on the same --cache-dir without --share writes the CSV")
        return 0
    predict_dir(args.image_dir, args.manifest, args.out, _run_options(args), return_frame=False,
                captions_out=args.captions_out)
    return 0


def _labelled_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """The arguments evaluate and tune share: labelled images, their targets, the cache."""
    command = sub.add_parser(name, help=help_text)
    command.add_argument("image_dir", type=Path)
    targets = command.add_mutually_exclusive_group(required=True)
    targets.add_argument("--prompts", type=Path, help="CSV with imgId, prompt (and optionally fold) columns")
    targets.add_argument("--targets", type=Path, help=".npy of (N, 384) targets aligned to the sorted image ids")
    command.add_argument("--json", action="store_true", help="print one JSON object")
    command.add_argument("--cache-dir", type=Path, default=Path(DEFAULT_CACHE),
                         help="prediction cache (default: %(default)s); reruns compute only what is missing")
    command.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    command.add_argument("--report", type=Path, default=None, metavar="DIR",
                         help="also write a page to look at: DIR/index.html and its charts (per tower x view, per "
                              "image against the prior, the towers' correlation, tuning per fold, the worst images); "
                              "needs matplotlib")
    _add_run_options(command)
    _add_verify_images(command)
    return command


def _labelled_run(args: argparse.Namespace, check_folds: bool = False):
    """Manifest, prediction run over all towers (zero weights too, through the cache), aligned targets and, for tune,
    folds; targets and folds are read before the compute, so a bad prompts file or --folds fails in seconds."""
    from .inference.predict import execute, prepare_run
    from .tuning.evaluate import fold_numbers, load_targets

    if args.report is not None:
        from .tuning.report import check_report_folder

        check_report_folder(args.report)  # matplotlib and the folder, before the compute like every output
    options = _run_options(args)
    setup = prepare_run(args.image_dir, args.manifest, options, include_zero_weight=True)
    ids = list(setup.listing.ids)
    targets = load_targets(ids, prompts_csv=args.prompts, targets_npy=args.targets,
                           embedding_dim=setup.manifest.embedding_dim)
    folds = fold_numbers(ids, args.folds, prompts_csv=args.prompts) if check_folds else None
    run = execute(setup, options.progress)
    paths = dict(zip(setup.listing.ids, setup.listing.paths, strict=True))  # the report's worst images
    return setup.manifest, run, targets, folds, paths


def _write_report(args: argparse.Namespace, labelled: tuple, evaluation=None, tuning=None) -> None:
    """The --report page, after the text report (which it never replaces); its path printed. A tuning's page
    evaluates the run here, only when a page is asked for."""
    if args.report is None:
        return
    from .tuning.evaluate import evaluate_run, read_prompts
    from .tuning.report import build_report

    manifest, run, targets, _, paths = labelled
    evaluation = evaluation or evaluate_run(run, manifest, targets)
    prompts = read_prompts(args.prompts)["prompt"].astype(str).to_dict() if args.prompts else None
    page = build_report(run, manifest, targets, evaluation, tuning, prompts, paths).write(args.report)
    print(f"wrote {page}", file=sys.stderr if args.json else sys.stdout)


def _parser_evaluate(sub: argparse._SubParsersAction) -> None:
    evaluate = _labelled_parser(sub, "evaluate", "score each tower, view and the ensemble on labelled images")
    evaluate.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .tuning.evaluate import evaluate_run

    labelled = _labelled_run(args)
    manifest, run, targets, _, _ = labelled
    report = evaluate_run(run, manifest, targets)
    print(report.to_json() if args.json else report, flush=True)
    _write_report(args, labelled, report)
    return 0


def _parser_tune(sub: argparse._SubParsersAction) -> None:
    tune = _labelled_parser(sub, "tune", "tune ensemble weights with scipy, judged out of fold, and write a tuned "
                                         "manifest")
    tune.add_argument("--out", type=Path, required=True, help="where to write the tuned manifest")
    tune.add_argument("--folds", type=_whole_number(2), default=5,
                      help="K for K-fold (ignored when --prompts has a fold column)")
    mode = tune.add_mutually_exclusive_group()
    mode.add_argument("--per-view", action="store_true", help="tune a weight per tower x TTA view")
    mode.add_argument("--per-dim", action="store_true", help="tune 384 weights per tower, regularised to per-tower")
    tune.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from .core.fileio import check_writable_file
    from .tuning.evaluate import tune_run, write_tuned_manifest

    check_writable_file(args.out)  # before the compute, like every output
    labelled = _labelled_run(args, check_folds=True)
    manifest, run, targets, folds, _ = labelled
    report, fitted = tune_run(run, manifest, targets, folds, per_view=args.per_view, per_dim=args.per_dim)
    print(report.to_json() if args.json else report, flush=True)  # the report first: it survives a failed write
    written = write_tuned_manifest(manifest.path, args.out, report, fitted)
    if not args.json:
        print(f"wrote {written}")
    _write_report(args, labelled, tuning=report)
    return 0


def _parser_init(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser("init", help="start a manifest with no towers (add them with inspect --append), its "
                                       "fallback the package's mean prompt embedding copied beside it")
    init.add_argument("path", type=Path, nargs="?", default=Path(DEFAULT_MANIFEST),
                      help="the manifest to write, a new file (default: %(default)s)")
    init.add_argument("--embedding-dim", type=_whole_number(1), default=384,
                      help="the target width (default: %(default)s, all-MiniLM-L6-v2)")
    init.add_argument("--fallback", type=Path, default=None, metavar="NPY",
                      help="your own fallback vector (default: the package's, copied beside the manifest)")
    init.set_defaults(func=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    from .manifest import init_manifest

    _, written = init_manifest(args.path, embedding_dim=args.embedding_dim, fallback=args.fallback)
    print(f"wrote {', '.join(str(p) for p in written)}\n"
          f"next: kaggle-i2p inspect CHECKPOINT --append {args.path}   (once per tower you trained)")
    return 0


def _parser_selfcheck(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("selfcheck", help="serve every registered library's and kind's tiny example on the bundled "
                                             "sample images, offline: does this environment (Kaggle's image) serve "
                                             "them as their own forward?")
    check.add_argument("--library", action="append", default=None, metavar="NAME",
                       help="only this library, through the reference kind (repeatable)")
    check.add_argument("--kind", action="append", default=None, metavar="NAME",
                       help="only this kind, on the library its example names (repeatable)")
    check.add_argument("--manifest", default=None, metavar="M",
                       help="only the libraries and kinds this manifest's towers use")
    check.add_argument("--device", default="cpu", help="where to run them (default: %(default)s)")
    check.set_defaults(func=_cmd_selfcheck)


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .inference.selfcheck import selfcheck

    checks = selfcheck(args.library, args.kind, device=args.device, say=lambda line: print(line, flush=True),
                       manifest=args.manifest)
    failed = [c for c in checks if not c.ok]
    print(f"kaggle_i2p selfcheck: {len(checks) - len(failed)} of {len(checks)} passed or had no example"
          + (f"; failed: {', '.join(f'{c.library} x {c.kind}' for c in failed)}" if failed else ""))
    return 1 if failed else 0


def _parser_validate(sub: argparse._SubParsersAction) -> None:
    validate = sub.add_parser("validate-manifest", help="check a manifest without loading any weights")
    validate.add_argument("path", type=Path)
    validate.add_argument("--no-file-check", action="store_true",
                          help="do not require checkpoint files to exist (e.g. a Kaggle manifest checked locally)")
    validate.add_argument("--deep", action="store_true",
                          help="also hash every checkpoint and match its keys and shapes to the tower (headers only, "
                               "no weights loaded); predict always does this before loading")
    validate.add_argument("--tower", default=None, help="the tower --expect checks (when the manifest has several)")
    _add_expect_options(validate, "the entry as written")
    validate.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from .models.towers import validate_manifest

    manifest = validate_manifest(args.path, check_files=not args.no_file_check, deep=args.deep)
    checked = "schema, files, architectures" if not args.no_file_check else "schema, architectures"
    if args.deep and not args.no_file_check:
        checked += ", checkpoint hashes, keys and shapes"
    print(f"{manifest.path}: OK ({len(manifest.towers)} towers)\n  checked: {checked}")
    for spec in manifest.towers:
        print(f"  {spec.name}: {spec.describe()}")
    if args.expect is None:
        return 0
    from .inference.expect import check_entry, read_images, read_vectors
    from .manifest import NetworkSpec

    towers = [s for s in manifest.towers if isinstance(s, NetworkSpec) and (args.tower in (None, s.name))]
    if len(towers) != 1:
        names = ", ".join(s.name for s in manifest.towers if isinstance(s, NetworkSpec))
        raise OptionError(f"--expect checks one tower: pass --tower with one of {names}" if towers else
                          f"--tower {args.tower!r} is not a tower of {manifest.path} ({names})")
    spec = towers[0]
    ids, pixels = read_images(args.expect_images)
    entry = spec.to_dict(manifest.path.resolve().parent)
    reading = check_entry(entry, manifest.embedding_dim, manifest.path.resolve().parent,
                          read_vectors(args.expect, ids), pixels, args.expect_device)
    print(f"  --expect {args.expect}: tower {spec.name!r}, {reading.line()}")
    return 0 if reading.passed else 1


def _parser_inspect(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser("inspect", help="read a checkpoint your own code saved (keys and shapes only) and print "
                                             "the manifest tower entry that serves it")
    inspect.add_argument("checkpoint", type=Path, nargs="+",
                         help="a .safetensors/.pt/.pth/.bin/.ckpt/.pth.tar state dict (any wrapper: Lightning, timm's "
                              "train.py), a sharded *.index.json, a save_pretrained/save_model folder, an exported "
                              ".pt2 / TorchScript program; several (a backbone and its head saved apart) are merged")
    inspect.add_argument("--library", default=None, help="only this model library (default: every registered one)")
    inspect.add_argument("--arch", default=None, help="the architecture the training code built (a timm or "
                                                      "open_clip name, an HF config.json), when inspect cannot tell")
    inspect.add_argument("--name", default=None, help="the tower's name (default: the file's stem)")
    inspect.add_argument("--embedding-dim", type=_whole_number(1), default=384, help="the head's output width")
    inspect.add_argument("--append", type=Path, default=None, metavar="MANIFEST",
                         help="add the entry to this manifest (validated with --deep first, written atomically, its "
                              "comments kept; started as `init` does when it does not exist)")
    _add_expect_options(inspect, "try every reading the keys cannot tell apart, and every preprocessing nothing "
                                 "beside the file says, and keep the one that matches")
    inspect.set_defaults(func=_cmd_inspect)


def _add_expect_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--expect", type=Path, default=None, metavar="VECTORS",
                        help="your model's own outputs for the --expect-images (.npy rows in sorted-id order, or a "
                             f"submission-style CSV): serve the tower on them, cosine per image, pass at >= 0.9999; "
                             f"{what}")
    parser.add_argument("--expect-images", type=Path, default=None, metavar="DIR",
                        help="the images the vectors are of (default: the 7 sample images bundled in the package)")
    parser.add_argument("--expect-device", default="cpu", help="where the check runs (default: %(default)s)")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .core.fileio import check_writable_file
    from .models.recognise import append_entry, inspect_checkpoint

    if args.append is not None:
        check_writable_file(args.append)  # a read-only manifest is refused before the checkpoint is read
    found = inspect_checkpoint(args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0],
                               embedding_dim=args.embedding_dim, library=args.library,
                               arch=args.arch, name=args.name)
    if args.expect is not None:
        from .inference.expect import choose_reading, read_images, read_vectors
        from .models.recognise import describe_choice

        ids, pixels = read_images(args.expect_images)
        vectors = read_vectors(args.expect, ids)
        result = choose_reading(found.choices, found.sources, args.embedding_dim, Path.cwd(), vectors, pixels,
                                args.expect_device, describe_choice)
        found = found.chosen(result.best.entry, result.report())
        print(found.text(), end="")
        if not result.passed:
            kept = "; nothing appended" if args.append else ""
            print(f"kaggle-i2p inspect: the tower does not serve your vectors{kept}", file=sys.stderr)
            return 1
    else:
        print(found.text(), end="")
    if args.append is not None:
        started = append_entry(found, args.append, args.embedding_dim)
        print(f"# {'started ' + str(args.append) + ' (kaggle-i2p init) and ' if started else ''}added tower "
              f"{found.entry['name']!r} to {args.append}; `kaggle-i2p validate-manifest --deep` passes")
    return 0


def _parser_convert(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="a whole pickled model (torch.save(model)) as safetensors of its weights, "
                                             "and the tower entry inspect proposes (unpickles it: --trust-pickle)")
    convert.add_argument("file", type=Path, help="the pickled model (.pt/.pth/.bin)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="unpickle it (it runs whatever code it names; in a process of its own, never in a run)")
    convert.add_argument("--code", type=Path, action="append", default=[], metavar="FILE.py",
                         help="the training code that defines the model's class (its definitions run, its main "
                              "block does not); repeatable")
    convert.add_argument("--out", type=Path, default=None, help="the safetensors file (default: beside FILE)")
    convert.add_argument("--library", default=None, help="as for inspect")
    convert.add_argument("--arch", default=None, help="as for inspect")
    convert.add_argument("--embedding-dim", type=_whole_number(1), default=384, help="the head's output width")
    convert.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.convert import convert_pickle
    from .models.recognise import InspectError, inspect_checkpoint

    out = convert_pickle(args.file, args.out, trust_pickle=args.trust_pickle, code=args.code)
    print(f"# wrote {out}: the weights of {args.file.name}, nothing else of the pickle")
    try:
        print(inspect_checkpoint(out, embedding_dim=args.embedding_dim, library=args.library, arch=args.arch).text(),
              end="")
    except InspectError as err:
        print(f"# inspect: {err}\n# the weights are written; run `kaggle-i2p inspect {out}` with --arch")
    return 0


def _parser_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="time every tower x view here and project whether a run of N images fits the "
                          "budget (and what to drop if not); exit 3 when it does not fit")
    plan.add_argument("--images", type=_whole_number(1), default=16_000,
                      help="images to plan for (default: %(default)s, the hidden test set)")
    plan.add_argument("--budget", default="9h", help="time the run may take: 9h, 90m, 5400s (default: %(default)s)")
    plan.add_argument("--margin", type=float, default=0.15, help="share of the budget kept to spare (default: "
                      "%(default)s)")
    plan.add_argument("--repeats", type=_whole_number(1), default=3,
                      help="timed batches per view (default: %(default)s)")
    plan.add_argument("--sample-dir", type=Path, default=None, help="images to time decoding on (default: the "
                      "competition sample)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--out", type=Path, default=None, metavar="MANIFEST",
                      help="when the run does not fit, write the manifest it proposes: the units it leaves out (a "
                           "resolution, the flips, a normalisation) removed")
    _add_run_options(plan)
    plan.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from .core.fileio import check_writable_file
    from .inference.plan import plan_run

    if args.out is not None:
        check_writable_file(args.out)  # before the timing, like every output
    plan = plan_run(args.manifest, _run_options(args), images=args.images, budget=args.budget, margin=args.margin,
                    repeats=args.repeats, sample_dir=args.sample_dir)
    print(plan.to_json() if args.json else plan.report())
    if args.out is not None and not plan.fits:
        from .inference.plan import trimmed_manifest, write_trimmed
        from .manifest import as_manifest

        manifest = as_manifest(args.manifest)
        data, _ = trimmed_manifest(manifest, plan, args.out)
        stream = sys.stderr if args.json else sys.stdout
        if not any(t.get("weight", 0) > 0 for t in data["towers"]):
            print(f"nothing written to {args.out}: no view fits (start-up and decoding alone exceed the budget)",
                  file=stream)
        else:
            changes = write_trimmed(manifest, plan, args.out)  # the user's file, its comments kept
            print(f"wrote {args.out}: " + "; ".join(changes), file=stream)
    return 0 if plan.fits else 3  # a run that does not fit the budget is not a success a script may take for one


def _parser_dry_run(sub: argparse._SubParsersAction) -> None:
    dry = sub.add_parser("dry-run", help="predict the competition sample and check format and score")
    dry.add_argument("--sample-dir", type=Path, default=None,
                     help="folder with images/, sample_submission.csv, prompts.csv (default: the Kaggle input when "
                          "attached, else the sample bundled in the package)")
    dry.add_argument("--out", default=None, help="also keep the dry-run CSV here")
    dry.add_argument("--json", action="store_true", help="print one JSON object")
    dry.add_argument("--no-embedding-check", action="store_true", help="skip embedding prompts.csv")
    _add_run_options(dry, manifest_default=default_manifest(), manifest_help=f"{DEFAULT_MANIFEST} on Kaggle, else demo")
    dry.set_defaults(func=_cmd_dry_run)


def _cmd_dry_run(args: argparse.Namespace) -> int:
    from .inference.dryrun import dry_run

    report = dry_run(args.sample_dir, args.manifest, _run_options(args), out_csv=args.out,
                     check_embeddings=not args.no_embedding_check)
    if args.json:
        print(report.to_json())
    else:
        print(report.summary)
        print(report)
    return 0 if report.format_ok else 1


def _parser_build_bank(sub: argparse._SubParsersAction) -> None:
    from .bank import INDEX_TYPES, SHARD_ROWS

    bank = sub.add_parser("build-bank", help="embed a text/CSV/parquet file of prompts into a retrieval bank")
    bank.add_argument("texts", type=Path)
    bank.add_argument("--out", type=Path, required=True)
    bank.add_argument("--column", default=None, help="text column of a CSV/parquet file (default: prompt)")
    bank.add_argument("--keys", choices=["none", "minilm", "clip"], default="none",
                      help="none: a classifier's class bank; minilm: query with 384-d vectors; clip: CLIP text "
                           "embeddings, queried by the matching CLIP image tower (score: embedding)")
    bank.add_argument("--clip-arch", default=None, help="for --keys clip: an open_clip model name or config .json, "
                                                        "or a transformers CLIP/SigLIP save_pretrained folder")
    bank.add_argument("--clip-checkpoint", type=Path, default=None,
                      help="for --keys clip: the whole CLIP checkpoint (open_clip's file, or the HF folder or its "
                           "weights)")
    bank.add_argument("--index", choices=INDEX_TYPES, default=None,
                      help="add a FAISS index of the keys (needs kaggle_i2p[index]), for retrieval.search: index")
    bank.add_argument("--shard-rows", type=_whole_number(1), default=SHARD_ROWS,
                      help="texts per resumable shard (default: %(default)s)")
    bank.add_argument("--encoding", default="utf-8",
                      help="text encoding of a .txt/.csv file, e.g. latin-1 or cp1252 (default: %(default)s; "
                           "parquet is always UTF-8)")
    bank.add_argument("--restart", action="store_true",
                      help="discard an unfinished build in OUT.building (of other settings) and start over")
    bank.add_argument("--device", default=None, help="embedding device (default: this rank's GPU, else cpu)")
    bank.add_argument("--batch-size", type=_whole_number(1), default=None,
                      help="texts per embedding batch (default: 1024 on a GPU, 128 on the CPU)")
    _add_index_options(bank)
    bank.set_defaults(func=_cmd_build_bank)


def _cmd_build_bank(args: argparse.Namespace) -> int:
    from .bank.build import build_bank
    from .bank.folder import Bank

    out = build_bank(args.texts, args.out, column=args.column, keys=args.keys, clip_arch=args.clip_arch,
                     clip_checkpoint=args.clip_checkpoint, index=args.index, nlist=args.nlist,
                     recall_queries=args.recall_queries, shard_rows=args.shard_rows, device=args.device,
                     batch_size=args.batch_size, encoding=args.encoding, restart=args.restart)
    if out is None:
        print(f"this rank's shards are in {args.out}.building; the last rank to finish writes the bank")
        return 0
    bank = Bank.open(out)
    print(f"wrote bank {bank.path}: {len(bank)} texts, targets {bank.targets.shape}, "
          f"keys {None if bank.keys is None else bank.keys.shape}{_index_line(bank.meta.get('index'))}")
    return 0


def _index_line(entry: dict | None) -> str:
    if not entry:
        return ""
    return (f", index {entry['factory']} (recall@{entry['recall_k']} {entry['recall'][str(entry['nprobe'])]:.3f} at "
            f"nprobe {entry['nprobe']})")


def _parser_index_bank(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index-bank", help="add (or rebuild) the FAISS IVF-PQ index of a keyed bank")
    index.add_argument("bank", type=Path)
    _add_index_options(index)
    index.set_defaults(func=_cmd_index_bank)


def _cmd_index_bank(args: argparse.Namespace) -> int:
    from .bank.build import index_bank

    entry = index_bank(args.bank, nlist=args.nlist, recall_queries=args.recall_queries)
    print(f"indexed {args.bank}{_index_line(entry)}; recall@{entry['recall_k']} by nprobe: {entry['recall']}")
    return 0


def _parser_pack_wheels(sub: argparse._SubParsersAction) -> None:
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


def _cmd_pack_wheels(args: argparse.Namespace) -> int:
    from .packaging.wheelhouse import DEFAULT_PROVIDED, pack_wheels

    result = pack_wheels(args.out, source=args.source, provided=args.provided or DEFAULT_PROVIDED,
                         extras=args.extras, extra_packages=args.packages, python_version=args.python_version,
                         platforms=args.platform)
    print(result)
    return 0


def _parser_train(sub: argparse._SubParsersAction) -> None:
    trainer = sub.add_parser("train", help="fine-tune a vision tower on a build_dataset.sh folder (resumes by itself; "
                                           "multi-GPU: accelerate launch -m kaggle_i2p.cli train ...)")
    trainer.add_argument("--config", type=Path, required=True, help="training config YAML (see docs/training.md)")
    trainer.add_argument("--restart", action="store_true",
                         help="ignore OUTPUT/last.pt and start over (default: resume it)")
    trainer.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from .train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = train(args.config, restart=args.restart)
    if not result.main_process:
        return 0
    print(f"best validation cosine {result.best_val:.4f}: {result.best}; last: {result.last}")
    print(f"export it with: kaggle-i2p export {result.best} --out OUT_DIR")
    return 0


def _parser_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a training checkpoint as an fp16 tower + its manifest entry")
    export.add_argument("checkpoint", type=Path, help="OUTPUT/best.pt or OUTPUT/last.pt")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--name", default=None, help="tower name (default: the config's)")
    export.add_argument("--resolutions", type=int, nargs="+", default=None,
                        help="TTA resolutions to serve at (default: the config's tower.image.resolutions)")
    export.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="add flipped views")
    export.add_argument("--raw-weights", action="store_true", help="export the raw weights instead of the EMA")
    export.add_argument("--fallback", type=Path, default=None, metavar="NPY",
                        help="the manifest's fallback vector (default: the package's 384-d mean prompt embedding; "
                             "a tower of another width needs its own)")
    export.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .train import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, name=args.name, resolutions=args.resolutions,
                               hflip=args.hflip, use_ema=not args.raw_weights, fallback=args.fallback)
    print(f"wrote {result.weights} ({'EMA' if result.used_ema else 'raw'} weights, fp16, sha256 {result.sha256})")
    print(f"manifest entry: {result.entry}; complete manifest: {result.manifest}")
    return 0


COMMANDS = (_parser_predict, _parser_init, _parser_selfcheck, _parser_validate, _parser_inspect, _parser_convert,
            _parser_dry_run, _parser_plan, _parser_evaluate, _parser_tune, _parser_build_bank,
            _parser_index_bank, _parser_pack_wheels, _parser_train, _parser_export)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, each command's arguments from the parser function beside it; nothing heavy is
    imported until a command runs."""
    parser = argparse.ArgumentParser(prog="kaggle-i2p", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kaggle_i2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves behind, for the one line Ctrl-C prints."""
    parts = []
    cache_dir = getattr(args, "cache_dir", None)
    if cache_dir is not None and not getattr(args, "no_cache", False):
        parts.append(f"finished batches are kept in the cache {cache_dir}: rerun the same command to resume")
    out = getattr(args, "out", None)
    if args.command == "predict" and out is not None:
        parts.append(f"{out} was left as it was" if Path(out).is_file() else f"no {out} was written")
    if args.command == "train":
        parts.append("OUTPUT/last.pt holds the last checkpoint: rerun the same command to resume")
    if args.command == "build-bank":
        parts.append(f"finished shards are kept in {out}.building: rerun the same command to resume (or add "
                     "--restart to start over)")
    return "; ".join(parts) or "nothing was written"


def _os_error_message(err: OSError) -> str:
    """One line for an OS error: what failed, on which file, and the fix where there is an obvious one."""
    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space and rerun (files written whole are kept)"
    if err.errno == errno.ENAMETOOLONG:
        return f"file name too long:{where[:160]}; choose a shorter name (at most 255 bytes a name)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}:{where}; choose a folder you can write to"
    return f"{what}:{where}" if where else what


SAYS_STEPS = ("inspect", "validate-manifest", "plan")  # commands whose towers load before any bar: one line a step


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kaggle-i2p`: every user error is one clear message and exit 2, Ctrl-C one line and 130 (also
    while the command's parser and modules load)."""
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), "command")  # until the parser says
    args = None
    try:
        for stream in (sys.stdout, sys.stderr):  # a non-ASCII path must never fail the closing print
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        args = build_parser().parse_args(argv)
        command = args.command
        if command not in SAYS_STEPS:
            return args.func(args)
        from .core import progress

        progress.enable(not getattr(args, "quiet", False))
        try:
            return args.func(args)
        finally:
            progress.enable(False)  # a library call made after the command (a test, a notebook) stays silent
    except I2PError as err:
        print(f"kaggle-i2p {command}: error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"kaggle-i2p {command}: error: {_os_error_message(err)}", file=sys.stderr)
    except KeyboardInterrupt:
        kept = _kept(args) if args is not None else "nothing was written"
        print(f"\nkaggle-i2p {command}: interrupted; {kept}", file=sys.stderr)
        return 130
    return 2


def run() -> int:
    """The `kaggle-i2p` console script: `main`, then Ctrl-C ignored while the interpreter shuts down (the command
    is over and its exit status decided; a late Ctrl-C must not turn it into a traceback or exit -2)."""
    import signal

    try:
        code = main()
    except KeyboardInterrupt:  # between main's own handlers (a second Ctrl-C while the first one's line prints)
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(run())
