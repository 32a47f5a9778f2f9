"""Dense datasets: procedural scenes, and NYUv2 / Cityscapes in LibMTL's preprocessed layout.

Every dataset turns a list of indices into one `DenseBatch` (``__getitems__``, which the DataLoader
calls with a whole batch): images normalised for the backbone, and the labels of the tasks asked
for, with one convention for "unlabelled" across formats (segmentation 255, depth 0, normals the
zero vector).

LibMTL's layout (the MTAN preprocessing of Liu et al., CVPR 2019) is
``<root>/{train,val}/{image,label,depth,normal}/<index>.npy`` with images ``H x W x 3`` floats in
[0, 1], labels ``H x W`` floats with -1 for unlabelled pixels, depth ``H x W x 1`` (0 = no
measurement) and normals ``H x W x 3``. NYUv2 (795 / 654 images, 288 x 384) has 13 classes, depth
and normals; Cityscapes (2975 / 500, 128 x 256) has 7 classes and depth. Their ``val`` folder holds
the official test images, so it is our test split; validation is carved from ``train``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dualhead.core.registry import Registry
from dualhead.dense.detection import ObjectTargets, object_targets
from dualhead.dense.metrics import IGNORE_INDEX
from dualhead.dense.scenes import CLASS_NAMES, MAX_KEYPOINTS, Scenes, SceneSpec, load_scenes

if TYPE_CHECKING:
    from dualhead.dense.config import DenseDataConfig

TASKS = ("seg", "depth", "normals")
OBJECT_TASKS = ("detection", "keypoints")  # labelled per object (dualhead.dense.detection)
LIBMTL_FOLDERS = {"seg": "label", "depth": "depth", "normals": "normal"}
_LABEL_CHANNELS = {"seg": [()], "depth": [(1,), ()], "normals": [(3,)]}  # trailing dims a label file may have


@dataclass
class DenseBatch:
    """Images and the labels of the tasks a dataset serves (None for the others)."""

    images: Tensor  # [B, 3, H, W] normalised for the backbone
    seg: Tensor | None = None  # [B, H, W] int64 class indices, 255 = unlabelled
    depth: Tensor | None = None  # [B, 1, H, W] float32, 0 = unlabelled
    normals: Tensor | None = None  # [B, 3, H, W] float32 unit vectors, zero vector = unlabelled
    detection: ObjectTargets | None = None  # each image's objects (boxes, classes)
    keypoints: ObjectTargets | None = None  # the same objects, read for their keypoints

    def to(self, device: torch.device | str) -> DenseBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if value is not None else None
        return DenseBatch(**moved)

    def __len__(self) -> int:
        return len(self.images)


def unbatched(batch: DenseBatch) -> DenseBatch:
    """DataLoader ``collate_fn``: datasets already return whole batches."""
    return batch


class DenseDataset(Dataset):
    """Base class: ``__getitems__(indices)`` reads the arrays of a batch and builds a `DenseBatch`.

    A dataset with object labels (``OBJECT_TASKS``) sets `num_object_classes` and `max_keypoints`
    and implements `_objects`."""

    num_object_classes = 0
    max_keypoints = 0

    def __init__(self, tasks: Sequence[str], num_classes: int, data_config: Mapping[str, Any]):
        unknown = [t for t in tasks if t not in TASKS + OBJECT_TASKS]
        if unknown:
            raise ValueError(f"unknown dense tasks {unknown}; choose from {', '.join(TASKS + OBJECT_TASKS)}")
        self.tasks = tuple(tasks)
        self.num_classes = num_classes
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def _read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """``image`` [B, H, W, 3] (uint8, or float in [0, 1]) and each task's labels as `DenseBatch` holds
        them, channels last: ``seg`` [B, H, W] (255 = unlabelled), ``depth`` [B, H, W], ``normals`` [B, H, W, 3]."""
        raise NotImplementedError

    def _objects(self, indices: Sequence[int]) -> ObjectTargets:
        """The objects of each image of a batch (datasets with object labels)."""
        raise NotImplementedError(f"{type(self).__name__} has no object labels")

    def __getitems__(self, indices: Sequence[int]) -> DenseBatch:
        arrays = self._read(list(indices))
        image = arrays["image"]
        images = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).float()
        if image.dtype == np.uint8:
            images = images / 255
        batch = DenseBatch(images=(images - self.mean) / self.std)  # channels-last in memory, as the model runs
        if "seg" in arrays:
            batch.seg = torch.from_numpy(arrays["seg"].astype(np.int64))
        if "depth" in arrays:
            batch.depth = torch.from_numpy(arrays["depth"].astype(np.float32, copy=False)).unsqueeze(1)
        if "normals" in arrays:
            batch.normals = torch.from_numpy(arrays["normals"].astype(np.float32, copy=False)).permute(0, 3, 1, 2).contiguous()
        if any(task in OBJECT_TASKS for task in self.tasks):
            objects = self._objects(list(indices))
            batch.detection = objects if "detection" in self.tasks else None
            batch.keypoints = objects if "keypoints" in self.tasks else None
        return batch

    def __getitem__(self, index: int) -> DenseBatch:
        return self.__getitems__([index])

    def mean_depth(self, samples: int = 32) -> float:
        """Mean labelled depth of the first `samples` images (where a depth head starts)."""
        depth = self.__getitems__(range(min(samples, len(self)))).depth
        if depth is None or not (depth > 0).any():
            raise ValueError("mean_depth: this dataset has no depth labels")
        return float(depth[depth > 0].mean())


class ScenesDataset(DenseDataset):
    """Procedural scenes held in memory (`dualhead.dense.scenes`), with their objects' boxes and keypoints."""

    num_object_classes = len(CLASS_NAMES) - 1  # the shapes, without the background
    max_keypoints = MAX_KEYPOINTS

    def __init__(self, scenes: Scenes, tasks: Sequence[str], data_config: Mapping[str, Any]):
        super().__init__(tasks, len(CLASS_NAMES), data_config)
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def _read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        arrays = {"image": self.scenes.image[indices]}
        for task in self.tasks:
            if task in TASKS:
                arrays[task] = getattr(self.scenes, task)[indices]
        return arrays

    def _objects(self, indices: Sequence[int]) -> ObjectTargets:
        scenes = [self.scenes.objects[i] for i in indices]
        return object_targets(scenes, self.scenes.image.shape[1], self.max_keypoints)


class LibMTLDataset(DenseDataset):
    """One split folder of LibMTL's layout (``<split>/{image,label,depth,normal}/<index>.npy``),
    restricted to the file indices `indices`; files are read as batches ask for them."""

    def __init__(self, folder: Path, indices: Sequence[int], tasks: Sequence[str], num_classes: int, data_config: Mapping[str, Any]):
        super().__init__(tasks, num_classes, data_config)
        self.folder = folder
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        samples = [self._read_one(self.indices[i]) for i in indices]
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}

    def _read_one(self, index: int) -> dict[str, np.ndarray]:
        path = self.folder / "image" / f"{index}.npy"
        image = _load(path)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{path}: an image must be H x W x 3, got shape {image.shape}")
        height, width = image.shape[:2]
        out = {"image": image.astype(np.float32, copy=False)}
        for task in self.tasks:
            path = self.folder / LIBMTL_FOLDERS[task] / f"{index}.npy"
            array = _load(path)
            expected = [(height, width, *channels) for channels in _LABEL_CHANNELS[task]]
            if array.shape not in expected:
                raise ValueError(f"{path}: expected shape {' or '.join(map(str, expected))} to match the image, got {array.shape}")
            if task == "seg":
                array = self._labels(array, path)
            out[task] = array.reshape(height, width) if task == "depth" else array
        return out

    def _labels(self, label: np.ndarray, path: Path) -> np.ndarray:
        """LibMTL's float labels (-1 = unlabelled) as class indices with `IGNORE_INDEX`."""
        bad = (label != -1) & ((label < 0) | (label >= self.num_classes) | (label != np.round(label)))
        if bad.any():
            raise ValueError(
                f"{path}: labels must be -1 (unlabelled) or class indices 0..{self.num_classes - 1}, found {label[bad][0]}"
            )
        return np.where(label == -1, IGNORE_INDEX, label).astype(np.int64)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


# -- formats ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseFormat:
    """A dataset format: its classes, the tasks it labels, and how to load its splits."""

    num_classes: int
    tasks: tuple[str, ...]  # the tasks it labels, learnt when data.tasks is null
    # (data config, tasks, the backbone's data config) -> {split: dataset}
    load: Callable[[DenseDataConfig, Sequence[str], Mapping[str, Any]], dict[str, DenseDataset]]
    object_tasks: tuple[str, ...] = ()  # tasks it also labels, learnt only when data.tasks names them


DENSE_FORMATS: Registry[DenseFormat] = Registry("dense dataset format")


def load_dense_splits(config: DenseDataConfig, tasks: Sequence[str], data_config: Mapping[str, Any]) -> dict[str, DenseDataset]:
    """Every split `config` describes (``train``, and ``val`` / ``test`` where there are any)."""
    spec = DENSE_FORMATS.lookup(config.format)
    unlabelled = [t for t in tasks if t not in spec.tasks + spec.object_tasks]
    if unlabelled:
        labelled = ", ".join(spec.tasks + spec.object_tasks)
        raise ValueError(f"format {config.format!r} has no labels for {unlabelled}; it labels {labelled}")
    return spec.load(config, tasks, data_config)


def _load_scenes(config: DenseDataConfig, tasks: Sequence[str], data_config: Mapping[str, Any]) -> dict[str, DenseDataset]:
    spec = SceneSpec(
        image_size=config.image_size,
        seed=config.seed,
        min_objects=min(SceneSpec.min_objects, config.max_objects),
        max_objects=config.max_objects,
        noise=config.noise,
    )
    sizes = {"train": config.train_size, "val": config.val_size, "test": config.test_size}
    if sizes["train"] < 1:
        raise ValueError(f"data.train_size must be at least 1, got {config.train_size}")
    return {
        split: ScenesDataset(load_scenes(spec, split, count, config.root), tasks, data_config)
        for split, count in sizes.items()
        if count > 0
    }


def _libmtl_loader(num_classes: int) -> Callable[..., dict[str, DenseDataset]]:
    def load(config: DenseDataConfig, tasks: Sequence[str], data_config: Mapping[str, Any]) -> dict[str, DenseDataset]:
        if config.root is None:
            raise ValueError(f"data.root must name the {config.format} folder (with train/ and val/ inside)")
        root = Path(config.root).expanduser()
        train = _file_indices(root / "train", tasks)
        if not 0 <= config.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {config.val_fraction}")
        order = np.random.default_rng(config.seed).permutation(len(train))
        held_out = set(order[: round(config.val_fraction * len(train))].tolist())
        splits = {
            "train": [index for i, index in enumerate(train) if i not in held_out],
            "val": [index for i, index in enumerate(train) if i in held_out],
            "test": _file_indices(root / "val", tasks),
        }
        folders = {"train": root / "train", "val": root / "train", "test": root / "val"}
        return {
            split: LibMTLDataset(folders[split], indices, tasks, num_classes, data_config)
            for split, indices in splits.items()
            if indices
        }

    return load


def _file_indices(folder: Path, tasks: Sequence[str]) -> list[int]:
    """The sample indices of a split folder; every image must have each task's label file."""
    images = folder / "image"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist: expected LibMTL's layout <root>/{{train,val}}/image/<i>.npy")
    indices = []
    for path in sorted(images.glob("*.npy")):
        if not path.stem.isdigit():
            raise ValueError(f"{path}: LibMTL's files are named <index>.npy")
        indices.append(int(path.stem))
    if not indices:
        raise ValueError(f"{images} holds no .npy images")
    for task in tasks:
        for index in indices:
            label = folder / LIBMTL_FOLDERS[task] / f"{index}.npy"
            if not label.is_file():
                raise FileNotFoundError(f"{label} is missing: every image/<i>.npy needs its {LIBMTL_FOLDERS[task]}/<i>.npy")
    return sorted(indices)


DENSE_FORMATS.register("scenes", DenseFormat(len(CLASS_NAMES), TASKS, _load_scenes, OBJECT_TASKS))
DENSE_FORMATS.register("nyuv2", DenseFormat(13, TASKS, _libmtl_loader(13)))
DENSE_FORMATS.register("cityscapes", DenseFormat(7, ("seg", "depth"), _libmtl_loader(7)))
