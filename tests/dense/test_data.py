"""Dense datasets: scenes batches, NYUv2 / Cityscapes in LibMTL's layout, and their errors; the sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dualhead.dense.config import DenseDataConfig
from dualhead.dense.data import DenseBatch, load_dense_splits
from dualhead.dense.sampler import ShuffledBatchSampler
from tests.dense.conftest import DATA_CONFIG


def write_libmtl(root: Path, counts: dict[str, int], size=(6, 8), classes: int = 13, normals: bool = True, seed: int = 0) -> Path:
    """A dataset in LibMTL's preprocessed layout, as examples/nyu/create_dataset.py reads it."""
    rng = np.random.default_rng(seed)
    h, w = size
    for folder, count in counts.items():
        for kind in ("image", "label", "depth") + (("normal",) if normals else ()):
            (root / folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = rng.integers(-1, classes, size=(h, w)).astype(np.float32)
            depth = rng.uniform(0.5, 9.0, size=(h, w, 1)).astype(np.float32)
            depth[0, 0] = 0  # no measurement
            np.save(root / folder / "image" / f"{i}.npy", rng.uniform(0, 1, size=(h, w, 3)).astype(np.float32))
            np.save(root / folder / "label" / f"{i}.npy", label)
            np.save(root / folder / "depth" / f"{i}.npy", depth)
            if normals:
                normal = rng.normal(size=(h, w, 3)).astype(np.float32)
                normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                normal[0, 1] = 0  # unlabelled
                np.save(root / folder / "normal" / f"{i}.npy", normal)
    return root


@pytest.fixture
def nyuv2(tmp_path) -> Path:
    return write_libmtl(tmp_path / "nyuv2", {"train": 10, "val": 3})


def libmtl_config(root: Path, format: str = "nyuv2", **changes) -> DenseDataConfig:
    return DenseDataConfig(format=format, root=str(root), val_fraction=0.2, **changes)


def test_nyuv2_splits_batches_and_label_conventions(nyuv2):
    splits = load_dense_splits(libmtl_config(nyuv2), ["seg", "depth", "normals"], DATA_CONFIG)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 8, "val": 2, "test": 3}
    assert set(splits["train"].indices) | set(splits["val"].indices) == set(range(10))  # val is carved from train/
    assert splits["test"].folder == nyuv2 / "val"  # LibMTL's val/ holds the official test images

    batch = splits["test"].__getitems__([0, 2])
    assert isinstance(batch, DenseBatch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 6, 8)
    image = np.load(nyuv2 / "val" / "image" / "2.npy")
    torch.testing.assert_close(batch.images[1], (torch.from_numpy(image).permute(2, 0, 1) - 0.5) / 0.5)
    label = np.load(nyuv2 / "val" / "label" / "2.npy")
    assert batch.seg.dtype == torch.int64 and batch.seg.shape == (2, 6, 8)
    assert (batch.seg[1][torch.from_numpy(label == -1)] == 255).all()
    assert (batch.seg[1][torch.from_numpy(label != -1)] == torch.from_numpy(label[label != -1]).long()).all()
    assert batch.depth.shape == (2, 1, 6, 8) and batch.depth[0, 0, 0, 0] == 0
    assert batch.normals.shape == (2, 3, 6, 8) and (batch.normals[:, :, 0, 1] == 0).all()
    assert splits["train"].num_classes == 13


def test_validation_carve_follows_the_data_seed(nyuv2):
    def val_indices(seed):
        return load_dense_splits(libmtl_config(nyuv2, seed=seed), ["seg"], DATA_CONFIG)["val"].indices

    assert val_indices(0) == val_indices(0)
    assert val_indices(0) != val_indices(1)


def test_single_task_datasets_read_only_their_labels(nyuv2):
    batch = load_dense_splits(libmtl_config(nyuv2), ["depth"], DATA_CONFIG)["train"].__getitems__([0, 1])
    assert batch.depth is not None and batch.seg is None and batch.normals is None


def test_cityscapes_has_seven_classes_and_no_normals(tmp_path):
    root = write_libmtl(tmp_path / "cityscapes", {"train": 4, "val": 2}, classes=7, normals=False)
    splits = load_dense_splits(libmtl_config(root, "cityscapes"), ["seg", "depth"], DATA_CONFIG)
    assert splits["train"].num_classes == 7
    batch = splits["test"].__getitems__([0, 1])
    assert batch.seg.max() < 7 or batch.seg.max() == 255
    assert batch.normals is None
    with pytest.raises(ValueError, match="no labels for \\['normals'\\]"):
        load_dense_splits(libmtl_config(root, "cityscapes"), ["seg", "normals"], DATA_CONFIG)


def test_corrupt_file_is_named(nyuv2):
    bad = nyuv2 / "val" / "depth" / "1.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    test = load_dense_splits(libmtl_config(nyuv2), ["seg", "depth"], DATA_CONFIG)["test"]
    test.__getitems__([0])  # other files still read
    with pytest.raises(ValueError, match=f"cannot read {bad}"):
        test.__getitems__([1])


def test_wrong_shapes_and_labels_are_named(nyuv2):
    np.save(nyuv2 / "val" / "normal" / "0.npy", np.zeros((6, 8), np.float32))
    np.save(nyuv2 / "val" / "label" / "1.npy", np.full((6, 8), 13, np.float32))
    test = load_dense_splits(libmtl_config(nyuv2), ["seg", "depth", "normals"], DATA_CONFIG)["test"]
    with pytest.raises(ValueError, match="normal/0.npy: expected shape \\(6, 8, 3\\)"):
        test.__getitems__([0])
    with pytest.raises(ValueError, match="label/1.npy: labels must be -1 .* 0..12, found 13"):
        test.__getitems__([1])


def test_missing_label_file_and_folder_are_named(nyuv2, tmp_path):
    (nyuv2 / "train" / "normal" / "4.npy").unlink()
    with pytest.raises(FileNotFoundError, match="train/normal/4.npy is missing"):
        load_dense_splits(libmtl_config(nyuv2), ["seg", "normals"], DATA_CONFIG)
    load_dense_splits(libmtl_config(nyuv2), ["seg"], DATA_CONFIG)  # a task not asked for needs no files
    with pytest.raises(FileNotFoundError, match="image does not exist"):
        load_dense_splits(libmtl_config(tmp_path / "empty"), ["seg"], DATA_CONFIG)
    with pytest.raises(ValueError, match="data.root must name"):
        load_dense_splits(DenseDataConfig(format="nyuv2"), ["seg"], DATA_CONFIG)


def test_scenes_batches_normalise_with_the_backbones_statistics(scenes_cache):
    config = DenseDataConfig(root=str(scenes_cache), image_size=16, train_size=6, val_size=0, test_size=2)
    splits = load_dense_splits(config, ["seg", "depth", "normals"], {"mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3)})
    assert set(splits) == {"train", "test"}  # a split of size 0 is left out
    train = splits["train"]
    batch = train.__getitems__([4, 1])
    expected = (torch.from_numpy(train.scenes.image[[4, 1]]).permute(0, 3, 1, 2) / 255 - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(batch.images, expected)
    torch.testing.assert_close(batch.depth[:, 0], torch.from_numpy(train.scenes.depth[[4, 1]]))
    torch.testing.assert_close(batch.normals, torch.from_numpy(train.scenes.normals[[4, 1]]).permute(0, 3, 1, 2))
    assert batch.seg.dtype == torch.int64
    assert train.mean_depth() == pytest.approx(float(train.scenes.depth.mean()), rel=1e-5)


def test_sampler_covers_every_sample_reproducibly_and_resumes():
    sampler = ShuffledBatchSampler(10, 4, seed=7)
    sampler.set_epoch(3)
    epoch = list(sampler)
    assert sorted(i for batch in epoch for i in batch) == list(range(10))
    assert [len(b) for b in epoch] == [4, 4, 2] and sampler.epoch_length == 3
    sampler.set_epoch(4)
    assert list(sampler) != epoch
    sampler.set_epoch(3, skip=1)
    assert list(sampler) == epoch[1:] and len(sampler) == 2 and sampler.epoch_length == 3
    assert list(ShuffledBatchSampler(10, 4, seed=8)) != list(ShuffledBatchSampler(10, 4, seed=7))


def test_sampler_never_leaves_one_sample_alone():
    sampler = ShuffledBatchSampler(9, 4)
    assert [len(b) for b in sampler] == [4, 5]
    assert sorted(i for b in sampler for i in b) == list(range(9))
