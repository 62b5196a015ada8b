"""The real-weight demo (`python -m kaggle_i2p.demo`, `make demo`, the `demo` manifest name).

ImageNet EfficientNet-Lite0 from PyPI (`efficientnet_lite0`: its weight conversion for timm) retrieving ImageNet class
phrases, blended with the mean prompt embedding (`ensemble`: built once, on first use).
"""

from .ensemble import build_demo_ensemble, default_demo_dir

__all__ = ["build_demo_ensemble", "default_demo_dir"]
