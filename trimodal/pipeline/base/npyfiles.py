"""Precomputed feature matrices in `.npy` files, checked from their header and read memory-mapped.

Never `allow_pickle`: an object array is refused from its header, before any byte of it is unpickled.
A file of several GB is only ever mapped, a range of rows at a time, and each mapping is dropped when
that range is done: pages of a mapping that stays open count towards the process's resident memory
until it closes, so one mapping of the whole file would show the file's size as RSS by the end.
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
    offset: int  # where the rows start in the file

    def mapped(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) memory-mapped read-only; drop the array to release the mapping."""
        if stop <= start:
            return np.empty((0, self.width), self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * self.width * self.dtype.itemsize,
                         shape=(stop - start, self.width))


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
            offset = reader.tell()
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
    size = path.stat().st_size
    if size < offset + shape[0] * shape[1] * dtype.itemsize:
        raise FeatureFileError(f"{path} is truncated: its header promises {shape[0]:,} rows of {shape[1]}, the file is "
                               f"{size:,} bytes")
    return NpyHeader(path, int(shape[0]), int(shape[1]), dtype, size, offset)


def first_nonfinite(rows: np.ndarray) -> int | None:
    """The index of the first row of `rows` holding NaN or inf, or None."""
    bad = ~np.isfinite(rows).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def scan_nonfinite(path: Path, advance=lambda n: None) -> list[int]:
    """Every row of the file holding NaN or inf, checked ~64 MB at a time."""
    header = read_header(path)
    block = max(1, _BLOCK_BYTES // max(1, header.width * header.dtype.itemsize))
    bad = []
    for start in range(0, header.rows, block):
        rows = header.mapped(start, min(header.rows, start + block))
        bad += (start + np.flatnonzero(~np.isfinite(rows).all(axis=1))).tolist()
        advance(len(rows))
        del rows
    return bad
