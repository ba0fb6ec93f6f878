"""Precomputed feature matrices in `.npy` files, checked from their header and read memory-mapped.

Never `allow_pickle`: an object array is refused from its header, before any byte of it is unpickled.
A file of several GB is only ever mapped, and checked for NaN/inf in row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trimodal.errors import TrimodalError

FEATURE_DTYPES = (np.dtype("float32"), np.dtype("float16"))
_BLOCK_BYTES = 64 << 20  # rows checked for NaN/inf at a time


class FeatureFileError(TrimodalError):
    """A features file that is not an (N, width) float matrix, or holds NaN/inf."""


@dataclass(frozen=True)
class NpyHeader:
    path: Path
    rows: int
    width: int
    dtype: np.dtype
    bytes: int


def read_header(path: Path, width: int | None = None) -> NpyHeader:
    """The shape and dtype of a 2-D float `.npy` file, from its header only."""
    path = Path(path)
    try:
        with open(path, "rb") as reader:
            version = np.lib.format.read_magic(reader)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = read(reader)
    except FileNotFoundError:
        raise FeatureFileError(f"{path} does not exist") from None
    except (OSError, ValueError) as error:
        raise FeatureFileError(f"{path} is not a .npy file: {error}") from error
    if dtype.hasobject:
        raise FeatureFileError(f"{path} holds Python objects (a pickled array); it is refused: features must be "
                               "a float32 (N, D) matrix")
    if dtype not in FEATURE_DTYPES:
        raise FeatureFileError(f"{path} has dtype {dtype}; features must be float32 or float16")
    if len(shape) != 2:
        raise FeatureFileError(f"{path} has shape {shape}; features must be a 2-D (rows, width) matrix")
    if fortran:
        raise FeatureFileError(f"{path} is stored column-major (Fortran order); rows could not be read one by one")
    if width is not None and shape[1] != width:
        raise FeatureFileError(f"{path} has rows of width {shape[1]}; {width} was expected")
    return NpyHeader(path, int(shape[0]), int(shape[1]), dtype, path.stat().st_size)


def open_rows(path: Path) -> np.ndarray:
    """The file's matrix, memory-mapped read-only (no pickles)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FeatureFileError(f"cannot map {path}: {error}") from error


def first_nonfinite(rows: np.ndarray) -> int | None:
    """The index of the first row of `rows` holding NaN or inf, or None."""
    bad = ~np.isfinite(rows).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def scan_nonfinite(path: Path, advance=lambda n: None) -> list[int]:
    """Every row of the file holding NaN or inf (checked in blocks of ~64 MB)."""
    matrix = open_rows(path)
    block = max(1, _BLOCK_BYTES // max(1, matrix.shape[1] * matrix.itemsize))
    bad = []
    for start in range(0, len(matrix), block):
        rows = np.asarray(matrix[start : start + block])
        bad += (start + np.flatnonzero(~np.isfinite(rows).all(axis=1))).tolist()
        advance(len(rows))
    return bad
