"""kaggle_i2p: predict all-MiniLM-L6-v2 prompt embeddings from Stable Diffusion images, offline, with an ensemble.

    import kaggle_i2p
    kaggle_i2p.predict_dir("/kaggle/input/stable-diffusion-image-to-prompts/images",
                           manifest="weights_manifest.yaml", out_csv="/kaggle/working/submission.csv")

The prediction API (`predict_dir`, `run_prediction`, ...) is imported on first use, so `import kaggle_i2p` and
`kaggle-i2p --help` load no torch.
"""

from importlib import import_module
from typing import Any

from . import _moved as moved
from ._version import __version__
from .core.resources import NAMED_MANIFESTS

# Everything else is imported on first use: `import kaggle_i2p` (and so the `kaggle-i2p` command's start, whose
# Ctrl-C must be caught from its first moment) loads no numpy, YAML or torch.
_LAZY = {"PredictionRun": "inference.predict", "RunSummary": "inference.predict", "predict_dir": "inference.predict",
         "predict_embeddings": "inference.predict", "run_prediction": "inference.predict",
         "RunOptions": "inference.options", "Manifest": "manifest", "ManifestError": "manifest",
         "load_manifest": "manifest", "register_named_manifest": "manifest", "register_kind": "core.registry",
         "register_library": "core.registry", "evaluate_dir": "tuning.report"}
_SUBPACKAGES = {"core", "manifest", "models", "bank", "kinds", "inference", "tuning", "packaging", "dataset", "train",
                "demo", "cli", "testing"}


def __getattr__(name: str) -> Any:
    """The API and the subpackages, imported when first asked for."""
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in moved.MOVED or name in _SUBPACKAGES:  # `kaggle_i2p.towers` as an attribute, as it was when this
        return import_module(f".{name}", __name__)  # package imported it
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _demo_manifest():
    """The real-weight demo ensemble's manifest, built on first use (see kaggle_i2p.demo)."""
    from .demo import build_demo_ensemble

    return build_demo_ensemble()


NAMED_MANIFESTS["demo"] = _demo_manifest  # what `register_named_manifest("demo", ...)` does, without its imports
moved.install(__name__)  # `kaggle_i2p.towers` and the other old flat names keep working

__all__ = [
    "Manifest",
    "ManifestError",
    "PredictionRun",
    "RunOptions",
    "RunSummary",
    "__version__",
    "evaluate_dir",
    "load_manifest",
    "predict_dir",
    "predict_embeddings",
    "register_kind",
    "register_named_manifest",
    "register_library",
    "run_prediction",
]
