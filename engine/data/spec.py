"""The data spec a user writes (`digits`, `cifar10:PATH`, `imagefolder:PATH`) read without loading
anything, so a form can check it as it is typed: which dataset, which folder, and what its
images are on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import DataError

SPEC_HELP = "use digits, cifar10:PATH or imagefolder:PATH"
# Channels, side and classes of the images as stored, where the dataset fixes them.
NATIVE: dict[str, tuple[int | None, int | None, int | None]] = {
    "digits": (1, 8, 10), "cifar10": (3, 32, 10), "imagefolder": (None, None, None),
}


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: the dataset kind and, for folders, the folder (checked to exist)."""

    kind: str
    path: Path | None = None

    @property
    def native_channels(self) -> int | None:
        """Channels of the stored images (None: an image folder's files decide)."""
        return NATIVE[self.kind][0]

    @property
    def native_size(self) -> int | None:
        """Side in pixels of the stored images (None: an image folder's files decide)."""
        return NATIVE[self.kind][1]

    @property
    def classes(self) -> int | None:
        """Number of classes (None: an image folder's class folders decide)."""
        return NATIVE[self.kind][2]

    def describe(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(spec: str) -> DataSpec:
    """Read a data spec; `DataError` in words for an unknown kind, a missing folder name or a
    folder that does not exist."""
    kind, sep, path_text = str(spec).strip().partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return DataSpec("digits")
    if kind in ("cifar10", "imagefolder") and sep:
        if not path_text.strip():
            raise DataError(f"dataset spec {spec!r} names no folder; {SPEC_HELP}")
        path = Path(os.path.expanduser(path_text.strip()))
        if not path.is_dir():
            raise DataError(f"dataset folder {path} does not exist")
        return DataSpec(kind, path)
    raise DataError(f"unknown dataset spec {spec!r}; {SPEC_HELP}")
