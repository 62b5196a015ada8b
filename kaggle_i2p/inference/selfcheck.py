"""Whether this environment serves each registered library and kind: every library's example through the reference
kind, every kind's example on the library it names, predicted on the bundled Kaggle sample images and compared with
the tower's own forward, offline, in seconds (`kaggle-i2p selfcheck`).

Run it where the notebook runs: Kaggle's image has its own torch, timm, open_clip and transformers, and a library
that imports but builds, loads or runs differently there is found here, before a 9-hour run. The examples are the
libraries' and kinds' own (`BackboneLibrary.example`, `TowerKind.example`); the registry tests run the same
manifests through every step.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from ..core.ensemble import combine_views
from ..core.errors import I2PError, OptionError
from ..core.registry import KINDS, LIBRARIES
from ..core.resources import PRIOR_PATH
from ..manifest import as_manifest, parse_manifest, write_manifest
from ..manifest.schema import KindExample, NetworkSpec
from ..models.towers import build_tower, load_tower
from .dryrun import bundled_sample_dir
from .expect import cosines
from .images import decode_image, list_images, make_view
from .runner import as_record

REFERENCE_KIND, REFERENCE_LIBRARY = "regressor", "timm"  # every library is shown through the one, kinds on the other
EXAMPLE_IMAGE = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                 "interpolation": "bicubic", "resize": "squash", "resolutions": [64, 96], "hflip": True}


class NoExample(I2PError):
    """A library or kind without an example (a plugin that has none), asked for one."""


def kind_example(kind: str, folder: Path, out_dim: int, embedding_dim: int) -> KindExample:
    """The registered kind's example, its files written into `folder`; NoExample when it has none here."""
    example = KINDS.get(kind).example(folder, out_dim, embedding_dim)
    if example is None:
        raise NoExample(f"tower kind {kind!r} has no example here (TowerKind.example: a plugin may have none, and a "
                        "kind that embeds texts needs the all-MiniLM-L6-v2 package)")
    return example


def home_library(kind: str) -> str:
    """The library a kind's example runs on: the one it names, else the reference library."""
    return KINDS.get(kind).example_library or REFERENCE_LIBRARY


def example_manifest(folder: str | Path, library: str, kind: str, seed: int = 0, embedding_dim: int = 384) -> Path:
    """A one-tower manifest (`tiny_manifest.yaml` in `folder`) of `kind`'s example on `library`'s example (two
    resolutions and a flip), with its random-weight checkpoint; for a kind without a network of its own, the library
    is not used, and a kind made of another tower's results gets a tiny regressor on the library named "input"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PRIOR_PATH, folder / "fallback.npy")
    lib = LIBRARIES.get(library)
    arch = lib.example(folder)
    if arch is None:
        raise NoExample(f"library {library!r} has no example here (BackboneLibrary.example)")
    with torch.device("meta"):  # the width of the library's features, for a kind whose keys depend on it
        out_dim = lib.build(str(folder / arch) if lib.arch_is_path(arch) else arch, None, 0).out_dim
    example = kind_example(kind, folder, out_dim, embedding_dim)
    companions = list(example.companions)
    if not example.network:
        entry = {"name": "tiny", "weight": 1.0, **example.entry}
    elif example.reads_input:  # the kind's tower first, over a tiny regressor of the library (weight 0)
        made = example_manifest(folder / "input", library, REFERENCE_KIND, seed, embedding_dim)
        regressor = yaml.safe_load(made.read_text(encoding="utf-8"))["towers"][0]
        companions.insert(0, {**regressor, "name": "input", "weight": 0,
                              "checkpoint": f"input/{regressor['checkpoint']}",
                              **({"arch": f"input/{regressor['arch']}"} if (made.parent / regressor["arch"]).exists()
                                 else {})})
        entry = example.entry
    else:
        entry = {"name": "tiny", "library": library, "arch": arch, "checkpoint": "tiny.safetensors",
                 "image": dict(EXAMPLE_IMAGE), "weight": 1.0, **example.entry}
    data = {"embedding_dim": embedding_dim, "fallback": "fallback.npy", "towers": [entry, *companions]}
    path = folder / "tiny_manifest.yaml"
    spec = parse_manifest(data, path, check_files=False).towers[0]
    if "checkpoint" in entry and not example.reads_input:
        torch.manual_seed(seed)
        tower = build_tower(spec, embedding_dim)
        save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(spec.checkpoint))
    write_manifest(data, path)
    return path


def reference_outputs(spec: object, run: object, pixels: list[torch.Tensor]) -> tuple[str, np.ndarray]:
    """What the run should have given for the example tower, computed without the run's machinery: ("embeddings",
    its views' own forwards through the kind's step after encoding, combined) for a tower that gives embeddings, or
    ("views", its raw view outputs stacked) for one that does not (a features tower); a constant tower's vector, a
    combining tower's head over the run's other towers."""
    from ..manifest import EncodingContext, kind_of

    owner = kind_of(spec)
    if owner.combines(spec):  # its head over the others' results, as the run gave them
        return "embeddings", owner.combine(spec, run.tower_embeddings, {}, "cpu")
    if not isinstance(spec, NetworkSpec):
        return "embeddings", np.tile(spec.constant(), (len(run.ids), 1))
    tower = load_tower(spec)
    with torch.no_grad():
        views = [as_record(tower(make_view(pixels, spec.image, view.resolution, view.flip))).values.numpy()
                 for view in spec.views]
    if owner.has_step_after_encoding(spec):
        after = owner.after_encoding(spec, np.concatenate(views), EncodingContext("cpu"))
        views = np.split(after, len(spec.views))
    if not owner.gives_embeddings(spec):
        return "views", np.stack(views)
    return "embeddings", combine_views(views, spec.view_weight_list())


@dataclass(frozen=True)
class Check:
    """One example served: which library and kind, its status (ok: the run gave the tower's own outputs; FAIL;
    skip: no example here), how long it took, and what was found (the lowest cosine, or the error)."""

    library: str
    kind: str
    status: str
    seconds: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def line(self) -> str:
        return f"{self.status:<4} {self.library} x {self.kind}: {self.detail} ({self.seconds:.1f} s)"


def check_pairs(libraries: list[str] | None = None, kinds: list[str] | None = None) -> list[tuple[str, str]]:
    """What to check: each library through the reference kind, each kind on its home library (every registered one
    when not narrowed), in registry order, each pair once."""
    pairs: dict[tuple[str, str], None] = {}
    for name in libraries if libraries is not None else ([] if kinds else LIBRARIES.names()):
        pairs[(name, REFERENCE_KIND)] = None
    for kind in kinds if kinds is not None else ([] if libraries else KINDS.names()):
        pairs[(home_library(kind), kind)] = None
    return list(pairs)


def check_example(library: str, kind: str, images: Path, device: str = "cpu") -> Check:
    """`kind`'s example on `library`'s, predicted on `images` by the whole run and compared with the tower's own
    forward (cosine >= 0.9999 on every image; no fallback); any exception is the check's finding."""
    from ..manifest import load_manifest
    from .predict import run_prediction

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="kaggle_i2p-selfcheck-") as folder:
            with contextlib.redirect_stderr(io.StringIO()):  # the writers' own progress bars (build-bank's, HF's)
                path = example_manifest(folder, library, kind)
            run = run_prediction(images, path, device=device, num_workers=0, progress=False, batch_size=4,
                                 precision="fp32")  # the library serves its own forward: compared in full precision
            spec = load_manifest(path).towers[0]
            pixels = [decode_image(p) for p in list_images(images).paths]
            what, want = reference_outputs(spec, run, pixels)
            got = np.stack([run.view_outputs["tiny"][v.name] for v in spec.views]) if what == "views" \
                else run.tower_embeddings["tiny"]
            cosine = np.nan_to_num(cosines(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])),
                                   nan=-1.0).min()
            ok = bool(cosine >= 0.9999) and not run.summary.fallbacks
            status = "ok" if ok else "FAIL"
            detail = (f"{len(run.ids)} images served as the tower's own forward (lowest cosine {cosine:.6f})" if ok
                      else f"served outputs differ from the tower's own forward (lowest cosine {cosine:.6f}), "
                           f"{len(run.summary.fallbacks)} fallbacks")
    except NoExample as err:
        status, detail = "skip", str(err)
    except Exception as err:  # noqa: BLE001 - whatever breaks is what the check reports
        status, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return Check(library, kind, status, time.perf_counter() - started, detail)


def manifest_uses(manifest: object) -> tuple[list[str], list[str]]:
    """The libraries and kinds a manifest's towers use, each once, in manifest order."""
    towers = as_manifest(manifest).towers
    libraries = [t.library for t in towers if isinstance(t, NetworkSpec)]
    return list(dict.fromkeys(libraries)), list(dict.fromkeys(t.kind for t in towers))


def selfcheck(libraries: list[str] | None = None, kinds: list[str] | None = None, images: str | Path | None = None,
              device: str = "cpu", say=print, manifest: object = None) -> list[Check]:
    """Every check of `check_pairs` on the bundled sample images (or `images`), one line each through `say`;
    `manifest` (a path, a name or a Manifest): the libraries and kinds its towers use, besides any named."""
    if manifest is not None:
        used_libraries, used_kinds = manifest_uses(manifest)
        libraries, kinds = [*(libraries or []), *used_libraries], [*(kinds or []), *used_kinds]
    for name in libraries or []:
        if name not in LIBRARIES:
            raise OptionError(f"--library {name}: {LIBRARIES.unknown(name)}")
    for name in kinds or []:
        if name not in KINDS:
            raise OptionError(f"--kind {name}: {KINDS.unknown(name)}")
    folder = Path(images) if images is not None else bundled_sample_dir() / "images"
    checks = []
    for library, kind in check_pairs(libraries, kinds):
        checks.append(check_example(library, kind, folder, device))
        say(checks[-1].line())
    return checks
