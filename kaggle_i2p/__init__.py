"""kaggle_i2p: predict all-MiniLM-L6-v2 prompt embeddings from Stable Diffusion images, offline, with an ensemble.

    import kaggle_i2p
    kaggle_i2p.predict_dir("/kaggle/input/stable-diffusion-image-to-prompts/images",
                           manifest="weights_manifest.yaml", out_csv="/kaggle/working/submission.csv")
"""

from ._version import __version__
from .core import moved
from .core.registry import register_kind, register_library
from .inference.predict import PredictionRun, RunSummary, predict_dir, predict_embeddings, run_prediction
from .manifest import Manifest, ManifestError, load_manifest, register_named_manifest


def _demo_manifest():
    """The real-weight demo ensemble's manifest, built on first use (see kaggle_i2p.demo)."""
    from .demo import build_demo_ensemble

    return build_demo_ensemble()


register_named_manifest("demo", _demo_manifest)
moved.install(__name__)  # `kaggle_i2p.towers` and the other old flat names keep working

__all__ = [
    "Manifest",
    "ManifestError",
    "PredictionRun",
    "RunSummary",
    "__version__",
    "load_manifest",
    "predict_dir",
    "predict_embeddings",
    "register_kind",
    "register_library",
    "run_prediction",
]
