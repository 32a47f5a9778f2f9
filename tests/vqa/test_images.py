"""Image decoding to RGB, preprocessing, answer-preserving augmentation and the image cache."""

import numpy as np
import pytest
import torch
from PIL import Image

from dualhead.vqa.data.images import ImagePreprocessor, ImageStore, load_rgb, question_allows_flip
from dualhead.vqa.data.records import DataError


def _save(tmp_path, img: Image.Image, name: str):
    path = tmp_path / name
    img.save(path)
    return path


@pytest.mark.parametrize(
    ("mode", "suffix", "value", "expected"),
    [
        ("1", "png", 1, (255, 255, 255)),
        ("L", "png", 100, (100, 100, 100)),
        ("RGB", "png", (10, 20, 30), (10, 20, 30)),
        ("RGBA", "png", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", "png", (10, 20, 30, 0), (255, 255, 255)),  # transparent: composited on white
        ("LA", "png", (100, 0), (255, 255, 255)),
        ("LA", "png", (100, 255), (100, 100, 100)),
        ("CMYK", "tiff", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", "jpg", (0, 0, 0, 255), (0, 0, 0)),
        ("I;16", "png", 65535, (255, 255, 255)),  # 16-bit scaled by its full range, not clipped
        ("I;16", "png", 32896, (128, 128, 128)),
        ("I;16B", "tiff", 257 * 40, (40, 40, 40)),
    ],
)
def test_every_mode_decodes_to_rgb(tmp_path, mode, suffix, value, expected):
    path = _save(tmp_path, Image.new(mode, (6, 4), value), f"img.{suffix}")
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (6, 4)
    assert img.getpixel((2, 2)) == pytest.approx(expected, abs=2)  # jpg is lossy


def test_palette_with_transparency_and_wide_grey_modes(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0
    img = load_rgb(_save(tmp_path, palette, "p.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (200, 10, 10)

    # 32-bit integer and float images have no fixed range: stretched from min to max.
    ramp = np.array([[0, 1000, 2000]], dtype=np.int32)
    for mode, array in [("I", ramp), ("F", ramp.astype(np.float32) / 7)]:
        img = load_rgb(_save(tmp_path, Image.fromarray(array, mode=mode), f"{mode}.tiff"))
        assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_missing_and_corrupt_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match=r"image not found: .*nothing\.png \(trainset\.json record 3\)"):
        load_rgb(tmp_path / "nothing.png", "trainset.json record 3")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(DataError, match=r"cannot decode image .*corrupt\.png \(train\.jsonl line 2\)"):
        load_rgb(corrupt, "train.jsonl line 2")
    # A valid header with truncated pixel data only fails when fully decoded.
    good = _save(
        tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "t.png"
    )
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(DataError, match="truncated.png"):
        load_rgb(truncated)


def test_preprocessor_resize_and_normalize():
    pre = ImagePreprocessor(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    tensor = pre.to_uint8(Image.new("RGB", (40, 24), (255, 0, 128)))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 16, 16)
    out = pre.normalize(tensor.unsqueeze(0))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    assert out[0, :, 5, 5].tolist() == pytest.approx([2.0, -1.0, 128 / 255 - 0.5], abs=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        pre.normalize(out)
    with pytest.raises(ValueError, match="interpolation"):
        ImagePreprocessor(16, (0.5,) * 3, (0.5,) * 3, interpolation="cubic-ish")


def test_question_allows_flip():
    assert question_allows_flip("Is there a mass in the lung?")
    assert question_allows_flip("Is the brightness normal?")  # 'right' inside a word does not count
    assert not question_allows_flip("Is the lesion on the LEFT side?")
    assert not question_allows_flip("Right or left kidney?")
    assert not question_allows_flip("Which is the leftmost shape?")


def _left_heavy_batch(n: int, size: int = 32) -> torch.Tensor:
    img = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    img[..., : size // 2] = 255  # left half white, right half black
    return img


def _left_minus_right(batch: torch.Tensor) -> torch.Tensor:
    half = batch.shape[-1] // 2
    values = batch.float()
    return values[..., :half].sum(dim=(1, 2, 3)) - values[..., half:].sum(dim=(1, 2, 3))


def test_augment_flips_only_where_allowed():
    pre = ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    batch = _left_heavy_batch(24)
    kept = pre.augment(batch, [False] * 24)
    assert kept.dtype == torch.uint8 and kept.shape == batch.shape
    assert (_left_minus_right(kept) > 0).all()  # crop, rotation and jitter never move the mass across
    assert not torch.equal(kept, batch)  # but they did change the images

    flipped = pre.augment(batch, [True] * 12 + [False] * 12)
    balance = _left_minus_right(flipped)
    assert (balance[12:] > 0).all()
    assert (balance[:12] < 0).any() and (balance[:12] > 0).any()  # random flips, where allowed
    with pytest.raises(ValueError, match="allow_flip"):
        pre.augment(batch, [True])


def test_image_store_decodes_each_path_once(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (8, 8), (1, 2, 3)), "a.png")
    store = ImageStore(ImagePreprocessor(4, (0.5,) * 3, (0.5,) * 3))
    first = store.get(path, "record 1")
    assert torch.equal(store.get(str(path), "record 2"), first)
    assert store.decoded_count == 1 and first.shape == (3, 4, 4)

    uncached = ImageStore(store.preprocessor, cache=False)
    uncached.get(path)
    uncached.get(path)
    assert uncached.decoded_count == 2
    with pytest.raises(DataError, match="image not found"):
        store.get(tmp_path / "b.png", "record 3")
