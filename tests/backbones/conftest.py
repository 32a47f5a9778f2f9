"""Helpers of the backbone tests."""

from __future__ import annotations

import skimage.data
import timm
import torch
from PIL import Image
from torch import nn


def assert_classifies_imagenet_photos(model: nn.Module) -> torch.Tensor:
    """An ImageNet classifier with its own preprocessing calls scikit-image's coffee photo an
    espresso and its cat a cat; returns the preprocessed photos."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    photos = torch.stack(
        [transform(Image.fromarray(image())) for image in (skimage.data.coffee, skimage.data.chelsea)]
    )
    with torch.no_grad():
        top1 = model.eval()(photos).argmax(dim=1).tolist()
    assert top1[0] == 967  # espresso
    assert 281 <= top1[1] <= 285  # a cat
    return photos
