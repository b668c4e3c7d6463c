"""Dataset loading: digits splits, CIFAR-10 python batches (including hostile pickles) and image
folders, built as tiny fixtures in tmp_path."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.common.errors import ConfigError, DataError
from engine.data.augment import CropFlipDraws, crop_flip
from engine.data.datasets import load_data

# Constant colour per class, so an image read back tells which class folder it came from.
COLOURS = {"apple": (255, 0, 0), "kiwi": (0, 255, 0), "plum": (0, 0, 255)}


def _indices(split) -> set[int]:
    return set(int(i) for i in split.indices)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_digits_split_counts_items_and_stratification(digits) -> None:
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1258, 180, 359)
    parts = [_indices(digits.train), _indices(digits.val), _indices(digits.test)]
    assert set.union(*parts) == set(range(1797)) and sum(map(len, parts)) == 1797
    image, label = digits.train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32) and isinstance(label, int)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    labels = np.array([digits.test[i][1] for i in range(len(digits.test))])
    all_labels = digits.train.dataset.labels.numpy()
    for c in range(10):
        assert abs((labels == c).sum() - 0.2 * (all_labels == c).sum()) <= 1
    assert digits.flip_ok is False and digits.num_classes == 10 and digits.classes[3] == "3"


def test_digits_normalization_is_the_train_split_statistics(digits) -> None:
    images = torch.stack([digits.train[i][0] for i in range(len(digits.train))]).double()
    assert digits.normalization.mean[0] == pytest.approx(float(images.mean()), abs=1e-9)
    assert digits.normalization.std[0] == pytest.approx(float(images.std(unbiased=False)), abs=1e-9)


def test_digits_split_depends_on_seed_only(digits) -> None:
    again = load_data("digits", seed=0)
    other = load_data("digits", seed=1)
    assert list(again.val.indices) == list(digits.val.indices)
    assert list(other.val.indices) != list(digits.val.indices)
    assert len(other.val) == 180


def test_digits_channels_and_size() -> None:
    bundle = load_data("digits", channels=3, image_size=16)
    image, _ = bundle.train[0]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert bundle.in_channels == 3 and len(bundle.normalization.mean) == 3


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "words"),
    [
        ("mnist", {}, DataError, "unknown dataset spec"),
        ("digits:/x", {}, DataError, "unknown dataset spec"),
        ("cifar10:", {}, DataError, "names no folder"),
        ("imagefolder:/no/such/folder", {}, DataError, "does not exist"),
        ("digits", {"channels": 2}, ConfigError, "channels must be 1 or 3"),
        ("digits", {"image_size": 0}, ConfigError, "image_size must be"),
        ("digits", {"val_fraction": 0.9}, ConfigError, "val_fraction must be"),
        ("digits", {"val_fraction": "0.1"}, ConfigError, "val_fraction must be"),
        ("digits", {"seed": -1}, ConfigError, "seed must be"),
    ],
)
def test_bad_specs_and_arguments(spec: str, kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        load_data(spec, **kwargs)


def _cifar_batch(rng: np.random.Generator, n: int, offset: int) -> dict:
    return {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "labels": [(offset + i) % 3 for i in range(n)],
        "filenames": [f"img{offset + i}.png" for i in range(n)],
    }


def _write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _py2_pickle(batch: dict) -> bytes:
    """`batch` as CIFAR-10's own Python 2 files store it (protocol 2, `str` keys and array
    bytes, numpy's `numpy.core` names), opcode by opcode."""

    def whole(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def short(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    data = batch["data"]
    dtype = b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R(K\x03" + short(b"|") + b"NNN"
    dtype += whole(-1) + whole(-1) + b"K\x00tb"
    raw = data.tobytes()
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R(K\x01"
    array += whole(data.shape[0]) + whole(data.shape[1]) + b"\x86" + dtype + b"\x89T" + struct.pack("<I", len(raw))
    array += raw + b"tb"
    labels = b"](" + b"".join(whole(v) for v in batch["labels"]) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + labels + b"u."


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _cifar_batch(rng, 6, 6 * (i - 1)) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, 4, 100)
    for name, batch in batches.items():
        _write_pickle(folder / name, batch)
    (folder / "test_batch").write_bytes(_py2_pickle(batches["test_batch"]))
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names})
    return tmp_path, batches


def test_cifar10_reads_the_python_batches(cifar_root) -> None:
    root, batches = cifar_root
    bundle = load_data(f"cifar10:{root}", val_fraction=0.2)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 4)
    assert bundle.classes[1] == "car" and bundle.flip_ok and bundle.in_channels == 3
    raw = batches["test_batch"]
    image, label = bundle.test[2]
    expected = torch.from_numpy(raw["data"][2].reshape(3, 32, 32)).float() / 255
    assert torch.equal(image, expected) and label == raw["labels"][2]
    train_all = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    position = int(bundle.val.indices[0])
    assert torch.equal(bundle.val[0][0], torch.from_numpy(train_all[position].reshape(3, 32, 32)).float() / 255)
    assert sorted(bundle.val[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]
    direct = load_data(f"cifar10:{root / 'cifar-10-batches-py'}", val_fraction=0.2)
    assert torch.equal(direct.test[2][0], image)


def test_cifar10_gray_and_resized(cifar_root) -> None:
    root, batches = cifar_root
    bundle = load_data(f"cifar10:{root}", channels=1, image_size=16, val_fraction=0.2)
    image, _ = bundle.test[0]
    assert image.shape == (1, 16, 16)
    rgb = torch.from_numpy(batches["test_batch"]["data"][0].reshape(3, 32, 32)).float() / 255
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert float(image.mean()) == pytest.approx(float(luma.mean()), abs=1e-3)


def test_cifar10_incomplete_folder(cifar_root) -> None:
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="not a complete CIFAR-10 python folder: data_batch_3 missing"):
        load_data(f"cifar10:{root}")


class _Payload:
    """Unpickling this would create a folder: the loader must refuse before that happens."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.target),))


def test_cifar10_refuses_code_in_pickles(cifar_root, tmp_path: Path) -> None:
    root, _ = cifar_root
    marker = tmp_path / "pwned"
    _write_pickle(root / "cifar-10-batches-py" / "data_batch_2", {"data": _Payload(marker), "labels": []})
    with pytest.raises(DataError, match="refers to code"):
        load_data(f"cifar10:{root}")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps([1, 2, 3], protocol=2)])
def test_cifar10_rejects_non_batches(cifar_root, content: bytes) -> None:
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match="test_batch is not"):
        load_data(f"cifar10:{root}")


def _tree(folder: Path, per_class: int, classes=COLOURS) -> None:
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), COLOURS[name]).save(folder / name / f"{i}.png")


def _check_colours(split, classes: list[str]) -> None:
    for i in range(len(split)):
        image, label = split[i]
        assert image.shape == (3, 32, 32)
        expected = torch.tensor(COLOURS[classes[label]], dtype=torch.float32).view(3, 1, 1) / 255
        assert torch.allclose(image, expected.expand_as(image))


def test_imagefolder_with_train_val_test(tmp_path: Path) -> None:
    _tree(tmp_path / "train", 6)
    _tree(tmp_path / "val", 2)
    _tree(tmp_path / "test", 3)
    bundle = load_data(f"imagefolder:{tmp_path}")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (18, 6, 9)
    assert bundle.classes == ["apple", "kiwi", "plum"] and bundle.num_classes == 3
    for split in (bundle.train, bundle.val, bundle.test):
        _check_colours(split, bundle.classes)
    assert sorted(bundle.test[i][1] for i in range(9)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [bundle.test[i][1] for i in range(9)] != sorted(bundle.test[i][1] for i in range(9))


def test_imagefolder_carves_val_when_only_test_exists(tmp_path: Path) -> None:
    _tree(tmp_path / "train", 10)
    _tree(tmp_path / "test", 2)
    bundle = load_data(f"imagefolder:{tmp_path}", channels=1, image_size=8)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (27, 3, 6)
    assert bundle.train[0][0].shape == (1, 8, 8)
    assert sorted(bundle.val[i][1] for i in range(3)) == [0, 1, 2]


def test_imagefolder_single_level_is_split(tmp_path: Path) -> None:
    _tree(tmp_path, 10)
    bundle = load_data(f"imagefolder:{tmp_path}")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (21, 3, 6)
    indices = [set(split.indices) for split in (bundle.train, bundle.val, bundle.test)]
    assert set.union(*indices) == set(range(30))
    _check_colours(bundle.test, bundle.classes)


def test_imagefolder_problems(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    _tree(tmp_path / "a" / "train", 4)
    (tmp_path / "a" / "train" / "pear").mkdir()
    with pytest.raises(DataError, match="pear holds no images"):
        load_data(f"imagefolder:{tmp_path / 'a'}")
    _tree(tmp_path / "b" / "train", 6)
    _tree(tmp_path / "b" / "val", 2, classes=["apple", "kiwi"])
    _tree(tmp_path / "b" / "test", 2)
    with pytest.raises(DataError, match="differ from"):
        load_data(f"imagefolder:{tmp_path / 'b'}")
    _tree(tmp_path / "tiny", 2)
    with pytest.raises(DataError, match=r"too few images \(6 in 3 classes\)"):
        load_data(f"imagefolder:{tmp_path / 'tiny'}")
    _tree(tmp_path / "c", 10)
    (tmp_path / "c" / "kiwi" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="0.png is not a readable image"):
        bundle = load_data(f"imagefolder:{tmp_path / 'c'}")
        for split in (bundle.train, bundle.val, bundle.test):
            [split[i] for i in range(len(split))]


def test_crop_flip_matches_slicing() -> None:
    images = torch.rand(3, 2, 5, 6)
    offsets = torch.tensor([[2, 2], [0, 4], [3, 1]])
    flips = torch.tensor([False, False, True])
    out = crop_flip(images, offsets, flips, pad=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert torch.equal(out[0], images[0])
    assert torch.equal(out[1], padded[1, :, 0:5, 4:10])
    assert torch.equal(out[2], padded[2, :, 3:8, 1:7].flip(-1))


def test_crop_flip_draws_are_per_index_and_seeded() -> None:
    draws = CropFlipDraws.draw(10, 4, True, torch.Generator().manual_seed(3))
    again = CropFlipDraws.draw(10, 4, True, torch.Generator().manual_seed(3))
    assert torch.equal(draws.offsets, again.offsets) and torch.equal(draws.flips, again.flips)
    assert int(draws.offsets.min()) >= 0 and int(draws.offsets.max()) <= 8
    images = torch.rand(10, 1, 6, 6)
    whole = draws.apply(images, torch.arange(10))
    part = draws.apply(images[[7, 2]], torch.tensor([7, 2]))
    assert torch.equal(part, whole[[7, 2]])
    no_flip = CropFlipDraws.draw(10, 4, False, torch.Generator().manual_seed(3))
    assert not bool(no_flip.flips.any())
