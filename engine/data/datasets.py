"""Datasets for fine-tuning and evaluation: scikit-learn's digits (no download; read from the file
it ships), CIFAR-10 in the torchvision on-disk layout, and image folders, each split
deterministically into train, val and test parts of ([0, 1] float32 C×H×W image, int label)
items.

Every split is held in a random order (a seeded shuffle, or the file's own order for CIFAR-10's
test batch), so the first N items of a split (what `max_examples` evaluates) are a random sample
rather than one class."""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..common.errors import ConfigError, DataError
from ..models.normalization import Normalization
from .spec import parse_data_spec
from .split import SplitError, digits_arrays, stratified_holdout

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

# Share of a dataset held out as the test split when the data has no test part of its own.
TEST_FRACTION = 0.2
DEFAULT_IMAGE_SIZE = 32
# At most this many train images are read to estimate an image folder's mean and std.
STATS_SAMPLE = 2000
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class DataBundle:
    """The three splits of one dataset with what a model and the trainer need to know of it.
    `normalization` is the train split's per-channel mean/std (a suggestion); `flip_ok` says
    horizontal flips keep labels (False for digits); `source_channels` is how many channels the
    images have on disk (None for image folders, whose files may differ), before conversion to
    `in_channels`."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]
    normalization: Normalization
    flip_ok: bool
    source_channels: int | None = None


class ImageTensorDataset(Dataset):
    """Images held in memory as one (N, C, H, W) tensor, uint8 or [0, 1] float, served as
    float32 [0, 1] images with `channels` channels at `image_size`×`image_size`."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], channels: int, image_size: int) -> None:
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.channels = channels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = convert_images(self.images[index][None], self.channels, self.image_size)[0]
        return image, int(self.labels[index])


def convert_images(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """A stored (N, C, H, W) batch, uint8 or float, as float32 [0, 1] images with `channels`
    channels at `size`×`size`, on the batch's own device."""
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return _resize(_to_channels(images, channels), size)


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray → RGB by replication, RGB → gray by ITU-R 601 luma (as PIL's "L" mode)."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class InMemorySplit:
    """A split whose items are rows of one `ImageTensorDataset`: its stored images and labels and
    the rows the split's items are, so a batch is one indexing operation on whatever device the
    tensors live on instead of a loop over items."""

    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    channels: int
    image_size: int

    def to(self, device: torch.device) -> "InMemorySplit":
        return InMemorySplit(self.images.to(device), self.labels.to(device), self.rows.to(device),
                             self.channels, self.image_size)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the split's items `indices`, as the dataset serves them."""
        rows = self.rows[indices]
        return convert_images(self.images[rows], self.channels, self.image_size), self.labels[rows]


def in_memory(dataset: Dataset) -> InMemorySplit | None:
    """`dataset` as an `InMemorySplit` when it is an `ImageTensorDataset` or subsets of one;
    None for anything else (image folders are read file by file)."""
    rows: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        rows = indices if rows is None else indices[rows]
        dataset = dataset.dataset
    if not isinstance(dataset, ImageTensorDataset):
        return None
    if rows is None:
        rows = torch.arange(len(dataset))
    return InMemorySplit(dataset.images, dataset.labels, rows, dataset.channels, dataset.image_size)


def _check_args(channels: int | None, image_size: int | None, val_fraction: float, seed: int) -> None:
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1):
        raise ConfigError(f"image_size must be a positive whole number of pixels, got {image_size!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 < val_fraction < 1.0 - TEST_FRACTION
    ):
        raise ConfigError(f"val_fraction must be between 0 and {1.0 - TEST_FRACTION:g}, got {val_fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative whole number, got {seed!r}")


def _stratified_split(
    labels: np.ndarray, holdout: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `labels` split into (rest, holdout) with `holdout` items, stratified by
    class and shuffled by `seed`."""
    try:
        return stratified_holdout(labels, holdout, seed)
    except SplitError:
        raise DataError(
            f"{what} has too few images ({len(labels)} in {len(np.unique(labels))} classes) for a stratified "
            "split that keeps every class in each part"
        ) from None


def _three_way_split(
    labels: np.ndarray, val_fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions: test is round(20% of n), val round(val_fraction·n), the
    rest is train; both cuts stratified by class with `seed` as the random state."""
    n = len(labels)
    rest, test = _stratified_split(labels, round(TEST_FRACTION * n), seed, what)
    train, val = _stratified_split(labels[rest], round(val_fraction * n), seed, what)
    return rest[train], rest[val], test


def _shuffled(dataset: Dataset, seed: int) -> Subset:
    """`dataset` in a seeded random order, so any prefix is a random sample."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return Subset(dataset, order.tolist())


def _statistics(dataset: Dataset, limit: int | None, seed: int) -> Normalization:
    """Per-channel mean and std of the images of `dataset` (of a seeded sample of `limit`
    images when it holds more)."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is not None and n > limit:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    else:
        indices = list(range(n))
    total = total_sq = None
    pixels = 0
    for start in range(0, len(indices), 512):
        batch = torch.stack([dataset[i][0] for i in indices[start : start + 512]]).double()
        sums, sq = batch.sum(dim=(0, 2, 3)), (batch * batch).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sq if total_sq is None else total_sq + sq
        pixels += batch.shape[0] * batch.shape[2] * batch.shape[3]
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def load_data(
    spec: str,
    *,
    channels: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> DataBundle:
    """Load `digits`, `cifar10:PATH` or `imagefolder:PATH` as a `DataBundle` with images of
    `channels` channels (default: the data's own) at `image_size` pixels (default 32)."""
    _check_args(channels, image_size, val_fraction, seed)
    parsed = parse_data_spec(spec)
    if parsed.kind == "digits":
        return _load_digits(channels or 1, image_size or DEFAULT_IMAGE_SIZE, seed, val_fraction)
    loader = _load_cifar10 if parsed.kind == "cifar10" else _load_imagefolder
    return loader(parsed.path, channels or 3, image_size or DEFAULT_IMAGE_SIZE, seed, val_fraction)  # type: ignore[arg-type]


def _load_digits(channels: int, image_size: int, seed: int, val_fraction: float) -> DataBundle:
    """scikit-learn's 1797 8×8 digits (0..16) as [0, 1] images resized bilinearly (antialiased)
    to `image_size`; with the defaults the split is 1258 train / 180 val / 359 test."""
    try:
        pixels, target = digits_arrays()
    except (OSError, ValueError) as exc:
        raise DataError(f"the digits dataset could not be read: {exc}") from None
    small = torch.from_numpy(pixels.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(small, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    labels = target.astype(np.int64)
    full = ImageTensorDataset(images, labels, channels, image_size)
    train, val, test = _three_way_split(labels, val_fraction, seed, "the digits dataset")
    train_set = Subset(full, train.tolist())
    return DataBundle(
        name="digits",
        train=train_set,
        val=Subset(full, val.tolist()),
        test=Subset(full, test.tolist()),
        num_classes=10,
        in_channels=channels,
        image_size=image_size,
        classes=[str(d) for d in range(10)],
        normalization=_statistics(train_set, None, seed),
        flip_ok=False,
        source_channels=1,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batch files that rebuilds numpy arrays and plain containers and
    refuses every other global, so a tampered file cannot run code."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """The (N, 3, 32, 32) uint8 images and labels of one CIFAR-10 python batch file."""
    try:
        with path.open("rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} is not a CIFAR-10 batch: it refers to code ({exc}), which is never loaded") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__})") from None
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels") if isinstance(entry, dict) else None
    if (
        not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
        or not isinstance(labels, list) or len(labels) != len(data)
        or not all(isinstance(v, int) and 0 <= v < 10 for v in labels)
    ):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected 'data' N×3072 uint8 and 10-class 'labels')")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    try:
        with meta.open("rb") as handle:
            names = _ArrayUnpickler(handle, encoding="latin1").load().get("label_names")
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError):
        names = None
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(v, str) for v in names):
        raise DataError(f"{meta} is not a CIFAR-10 metadata file (expected 10 'label_names')")
    return names


def _load_cifar10(path: Path, channels: int, image_size: int, seed: int, val_fraction: float) -> DataBundle:
    """CIFAR-10's python batches from `path/cifar-10-batches-py` or `path` itself; the val split
    is a stratified, seeded `val_fraction` of the 50,000 train images."""
    folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    missing = [name for name in [*CIFAR10_TRAIN_FILES, "test_batch"] if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} is not a complete CIFAR-10 python folder: {', '.join(missing)} missing")
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    train_images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_labels = np.array([label for p in parts for label in p[1]], dtype=np.int64)
    test_images, test_labels = _read_cifar_batch(folder / "test_batch")
    full_train = ImageTensorDataset(train_images, train_labels, channels, image_size)
    train, val = _stratified_split(train_labels, round(val_fraction * len(train_labels)), seed, str(folder))
    train_set = Subset(full_train, train.tolist())
    return DataBundle(
        name="cifar10",
        train=train_set,
        val=Subset(full_train, val.tolist()),
        test=ImageTensorDataset(torch.from_numpy(test_images), test_labels, channels, image_size),
        num_classes=10,
        in_channels=channels,
        image_size=image_size,
        classes=_cifar_classes(folder),
        normalization=_statistics(train_set, None, seed),
        flip_ok=True,
        source_channels=3,
    )


class _PilImage:
    """ImageFolder transform: a PIL image to a [0, 1] tensor of `channels` channels at `size`."""

    def __init__(self, channels: int, size: int) -> None:
        self.mode = "L" if channels == 1 else "RGB"
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32).reshape(self.size, self.size, -1)
        return torch.from_numpy(array.transpose(2, 0, 1).copy()) / 255.0


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, Image.DecompressionBombError):
        raise DataError(f"{path} is not a readable image") from None


def _image_folder(folder: Path, channels: int, size: int) -> Dataset:
    """One `folder/<class>/*` tree, checked to have classes and images in every class."""
    # torchvision takes a second to import (it loads torch._dynamo): only image folders need it.
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/*.png or *.jpg)")
    for name in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (folder / name).rglob("*") if f.is_file()):
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return ImageFolder(str(folder), transform=_PilImage(channels, size), loader=_open_image)


def _load_imagefolder(path: Path, channels: int, image_size: int, seed: int, val_fraction: float) -> DataBundle:
    """`path/train/<class>/*` with `path/val` and/or `path/test`, or one level of class
    folders. Both held-out folders: val and test as given. One of them: it is the test split and
    val is carved from train. Neither, or a single level: split 70/10/20 (stratified, seeded)."""
    root = path / "train" if (path / "train").is_dir() else path
    train_tree = _image_folder(root, channels, image_size)
    held = {name: _image_folder(path / name, channels, image_size)
            for name in ("val", "test") if root != path and (path / name).is_dir()}
    for name, tree in held.items():
        if tree.classes != train_tree.classes:
            raise DataError(
                f"{path / name} has classes {tree.classes}, which differ from {root}'s {train_tree.classes}"
            )
    labels = np.asarray(train_tree.targets, dtype=np.int64)
    what = str(root)
    if len(held) == 2:
        train_set = _shuffled(train_tree, seed)
        val_set, test_set = _shuffled(held["val"], seed), _shuffled(held["test"], seed)
    elif len(held) == 1:
        train, val = _stratified_split(labels, round(val_fraction * len(labels)), seed, what)
        train_set, val_set = Subset(train_tree, train.tolist()), Subset(train_tree, val.tolist())
        test_set = _shuffled(next(iter(held.values())), seed)
    else:
        train, val, test = _three_way_split(labels, val_fraction, seed, what)
        train_set, val_set, test_set = (Subset(train_tree, idx.tolist()) for idx in (train, val, test))
    return DataBundle(
        name=f"imagefolder:{path.name}",
        train=train_set,
        val=val_set,
        test=test_set,
        num_classes=len(train_tree.classes),
        in_channels=channels,
        image_size=image_size,
        classes=list(train_tree.classes),
        normalization=_statistics(train_set, STATS_SAMPLE, seed),
        flip_ok=True,
    )
