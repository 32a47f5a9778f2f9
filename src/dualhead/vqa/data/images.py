"""Image decoding, resizing, normalisation and answer-preserving augmentation."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .records import DataError

_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# The modes torchvision can resize uint8 tensors with.
_TENSOR_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")
_LEFT_RIGHT = re.compile(r"\b(left|right)", re.IGNORECASE)
# Images with more pixels are refused before they are decoded (decompression bombs, giant scans).
MAX_PIXELS = 64 * 1024 * 1024
# The default bound of `ImageStore`'s cache of resized images (per process: each data loader worker
# holds its own).
CACHE_BYTES = 1024**3


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit images (and PGM's, which Pillow opens as 32-bit) are scaled by their full range
    (x / 257); 32-bit int and float images, which have no fixed range, are stretched linearly from
    their minimum to their maximum finite value (NaN and -inf go to black, +inf to white)."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM"):
        values /= 257.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
        if high > low:
            values -= low
            values *= 255.0 / (high - low)
        else:
            values[:] = 0.0
    np.clip(np.rint(values, out=values), 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _gray_to_8bit(img)
    if img.mode == "La":  # premultiplied alpha: Pillow converts it to RGBA only through LA
        img = img.convert("LA")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*_BACKGROUND, 255)), rgba)
    return img.convert("RGB")


def load_rgb(path: str | Path, source: str = "", max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode an image file of any mode to RGB, fully, so a corrupt file fails here.

    The EXIF orientation is applied; transparency is composited on white; 16-bit grey is scaled to
    8 bit. An image over `max_pixels` (None: no limit of ours) or over Pillow's own
    ``Image.MAX_IMAGE_PIXELS`` is refused before decoding. Errors are `DataError`s naming the file
    and `source` (the record that uses it).
    """
    path = Path(path)
    where = f" ({source})" if source else ""
    if not path.is_file():
        raise DataError(f"image not found: {path}{where}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(f"image {path}{where} is over Pillow's limit, Image.MAX_IMAGE_PIXELS: {err}") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {path}{where}: {err}") from err
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise DataError(
                f"image {path}{where} has {width}x{height} = {width * height:,} pixels, over the limit "
                f"of {max_pixels:,} (max_pixels)"
            )
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot decode image {path}{where}: {err}") from err


def question_allows_flip(question: str) -> bool:
    """A horizontal flip keeps the answer unless the question speaks of left or right."""
    return _LEFT_RIGHT.search(question) is None


class ImagePreprocessor:
    """Resize to a square uint8 tensor, normalise for the encoder, and augment for training.

    `mean` and `std` are the encoder's pretrained statistics (on the 0-1 scale).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        if interpolation not in _TENSOR_INTERPOLATIONS:
            known = ", ".join(_TENSOR_INTERPOLATIONS)
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {known}")
        self.interpolation = v2.InterpolationMode(interpolation)
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Changes that keep every answer true: no hue shift (colour questions), small geometry.
        self._augment = v2.Compose(
            [
                v2.RandomResizedCrop(
                    image_size, scale=(0.85, 1.0), ratio=(0.9, 1.1), interpolation=self.interpolation
                ),
                v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        )
        self._flip = v2.RandomHorizontalFlip(p=0.5)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """An RGB image as a uint8 tensor [3, S, S]."""
        tensor = TF.pil_to_tensor(img.convert("RGB"))
        return TF.resize(
            tensor, [self.image_size, self.image_size], interpolation=self.interpolation, antialias=True
        )

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 images [..., 3, H, W] to float: x / 255, minus mean, over std."""
        if batch.dtype != torch.uint8 or batch.ndim < 3 or batch.shape[-3] != 3:
            raise ValueError(f"expected uint8 images [..., 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        mean = torch.tensor(self.mean, device=batch.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(3, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def augment(self, batch: torch.Tensor, allow_flip: Sequence[bool]) -> torch.Tensor:
        """Random crop, rotation and brightness/contrast per image of a uint8 batch [N, 3, S, S];
        a horizontal flip only where `allow_flip[i]` (questions about left/right forbid it)."""
        if batch.ndim != 4 or len(allow_flip) != batch.shape[0]:
            raise ValueError(
                f"augment needs a batch [N, 3, S, S] and one allow_flip per image; "
                f"got {tuple(batch.shape)} and {len(allow_flip)}"
            )
        out = []
        for image, flip in zip(batch, allow_flip, strict=True):
            image = self._augment(image)
            out.append(self._flip(image) if flip else image)
        return torch.stack(out)


class ImageStore:
    """Decoded, resized images by path; with `cache` on, each is decoded once while it stays in the
    cache, which keeps the most recently used images up to `max_bytes` of tensors (None: no bound).
    `max_pixels` is passed to `load_rgb`."""

    def __init__(
        self,
        preprocessor: ImagePreprocessor,
        cache: bool = True,
        max_bytes: int | None = CACHE_BYTES,
        max_pixels: int | None = MAX_PIXELS,
    ):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be None or at least 0, got {max_bytes}")
        self.preprocessor = preprocessor
        self.cache = cache
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.decoded_count = 0
        self.cached_bytes = 0
        self._images: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def for_workers(self, workers: int) -> ImageStore:
        """An empty store for DataLoader worker processes: each worker holds its own copy, so each
        gets an equal share of this store's byte budget and together they stay within it."""
        budget = None if self.max_bytes is None else self.max_bytes // max(workers, 1)
        return ImageStore(self.preprocessor, cache=self.cache, max_bytes=budget, max_pixels=self.max_pixels)

    def get(self, path: str | Path, source: str = "") -> torch.Tensor:
        """The image at `path` as uint8 [3, S, S]; `source` names the record for error messages."""
        path = Path(path)
        cached = self._images.get(path)
        if cached is not None:
            self._images.move_to_end(path)
            return cached
        tensor = self.preprocessor.to_uint8(load_rgb(path, source, self.max_pixels))
        self.decoded_count += 1
        size = tensor.numel() * tensor.element_size()
        if self.cache and (self.max_bytes is None or size <= self.max_bytes):
            self._images[path] = tensor
            self.cached_bytes += size
            while self.max_bytes is not None and self.cached_bytes > self.max_bytes:
                _, evicted = self._images.popitem(last=False)
                self.cached_bytes -= evicted.numel() * evicted.element_size()
        return tensor
