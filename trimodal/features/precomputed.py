"""Image embeddings a dataset ships precomputed (BabyLM's DINOv2 `.npy` files), imported by sample key.

The shards' `index.json` says, under `precomputed`, which files hold each part's rows (with their
sha256, size and mtime as `mm shard` saw them); a key `<part>-<row>` names row `row` of the part's
files taken in order. Files are memory-mapped (never unpickled) over the span of rows the shard at hand
needs, and the mapping is dropped after each shard, so a 7 GB file never enters memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trimodal.errors import TrimodalError
from trimodal.features.store import StaleCacheError
from trimodal.pipeline.base.npyfiles import first_nonfinite, read_header


class PrecomputedImageFeatures:
    """The image extractor of a dataset that has no pixels: rows looked up by key."""

    needs_pixels = False
    tokens = False
    random_init = False

    def __init__(self, index: dict, shards: Path):
        spec = index.get("precomputed", {}).get("image/embedding")
        if not spec:
            raise TrimodalError(f"the shards in {shards} carry no precomputed image features "
                                "(only datasets such as babylm-mm do); use an image encoder with --image")
        self.extractor, self.embed_dim = spec["extractor"], int(spec["width"])
        self._files: dict[str, list[dict]] = {}
        self._headers: dict[str, object] = {}
        self._starts: dict[str, np.ndarray] = {}
        for part, described in spec["parts"].items():
            for file in described["files"]:
                self._headers[file["path"]] = self._check(Path(file["path"]), file)
            self._files[part] = described["files"]
            self._starts[part] = np.cumsum([0] + [file["rows"] for file in described["files"]])

    def _check(self, path: Path, recorded: dict):
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise TrimodalError(f"{path} (the image features of these shards) no longer exists") from None
        if (stat.st_size, stat.st_mtime_ns) != (recorded["bytes"], recorded["mtime_ns"]):
            raise StaleCacheError(f"{path} changed since `mm shard` read it (size or mtime differ from index.json); "
                                  "run `mm shard` again")
        header = read_header(path, self.embed_dim)
        if header.rows != recorded["rows"]:
            raise StaleCacheError(f"{path} has {header.rows:,} rows; index.json recorded {recorded['rows']:,}")
        return header

    def attrs(self) -> dict:
        return {"encoder": "precomputed", "family": "precomputed", "model": self.extractor, "embed_dim": self.embed_dim,
                "tokens": False, "random_init": False,
                "files": {part: [{"file": f["file"], "rows": f["rows"], "sha256": f["sha256"]} for f in files]
                          for part, files in self._files.items()}}

    def embed_keys(self, keys: list[str]) -> np.ndarray:
        """(len(keys), width) float32: each key's row, checked for NaN and inf."""
        from trimodal.pipeline.sources.babylm_mm import parse_key

        out = np.empty((len(keys), self.embed_dim), dtype=np.float32)
        wanted: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            try:
                part, row = parse_key(key)
            except ValueError as error:
                raise TrimodalError(f"{error}: the shards do not match their precomputed features") from None
            if part not in self._files:
                raise TrimodalError(f"sample {key}: no precomputed features for part {part} in index.json")
            file_number = int(np.searchsorted(self._starts[part], row, side="right")) - 1
            if not 0 <= file_number < len(self._files[part]):
                raise TrimodalError(f"sample {key}: row {row} is past the {self._starts[part][-1]:,} feature rows of {part}")
            wanted.setdefault((part, file_number), []).append((position, row - int(self._starts[part][file_number])))
        for (part, file_number), pairs in wanted.items():
            file = self._files[part][file_number]
            positions, rows = (np.asarray(column) for column in zip(*pairs))
            order = np.argsort(rows, kind="stable")  # ascending rows: the mapped pages are read in order
            first, last = int(rows[order[0]]), int(rows[order[-1]])
            span = self._headers[file["path"]].mapped(first, last + 1)
            block = np.asarray(span[rows[order] - first], dtype=np.float32)
            del span  # unmapped: its pages stop counting as this process's memory
            bad = first_nonfinite(block)
            if bad is not None:
                raise TrimodalError(f"{file['path']}: row {int(rows[order][bad])} holds NaN or inf "
                                    f"(sample {keys[positions[order][bad]]}); these features cannot be imported")
            out[positions[order]] = block
        return out
