"""Per-shard parts of a distributed `mm featurize`: each rank writes the features of its own shards into
`<store>.parts/<shard>/` (one `.npy` per array), and rank 0 then writes them into the store in shard order
with the same `FeatureStore.write_shard` one process uses. So no two ranks ever write into the same zarr
chunk (the store's chunks do not follow shard boundaries, and its frame array grows shard by shard), and
the assembled store is identical to the one a single process writes.

A part is complete once its folder has its final name (it is written as `<shard>.tmp/` and renamed), so a
killed rank leaves complete parts and nothing that looks like one; a rerun computes only the shards
that have neither a complete part nor a complete slot in the store.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np

from trimodal.errors import StorageError, TrimodalError
from trimodal.features.store import ShardFeatures, decode_keys, encode_keys
from trimodal.storage import location, open_atomic, remove_tree, storage_errors, write_bytes

_COMPLETE = ".complete"


class Parts:
    """The `<store>.parts/` folder beside a store."""

    def __init__(self, store: Path):
        self.folder = location(str(store).rstrip("/") + ".parts")
        # Object storage has no rename: a part there is complete once its marker object exists, written
        # after its arrays.
        self.remote = not isinstance(self.folder, Path)

    def complete(self, shard: str) -> bool:
        if self.remote:
            with storage_errors(f"reading {self.folder}"):
                return (self.folder / shard / _COMPLETE).exists()
        return (self.folder / shard).is_dir()

    def write(self, shard: str, features: ShardFeatures) -> None:
        if self.remote:
            self._write_objects(shard, features)
            return
        temporary, final = self.folder / f"{shard}.tmp", self.folder / shard
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            for name, value in _arrays(features).items():
                np.save(temporary / f"{name}.npy", value)
            os.replace(temporary, final)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise TrimodalError(f"cannot write the features of {shard} into {self.folder}: {error.strerror or error}; "
                                "parts already written are kept, run the same command again to continue") from error

    def _write_objects(self, shard: str, features: ShardFeatures) -> None:
        folder = self.folder / shard
        try:
            for name, value in _arrays(features).items():
                with open_atomic(folder / f"{name}.npy") as handle:
                    np.save(handle, value)
            write_bytes(folder / _COMPLETE, b"")
        except StorageError as error:
            raise TrimodalError(f"cannot write the features of {shard} into {self.folder}: {error}; parts already "
                                "written are kept, run the same command again to continue") from error

    def read(self, shard: str) -> ShardFeatures:
        folder = self.folder / shard
        with storage_errors(f"reading {folder}"):
            present = (folder / "keys.npy").is_file()
        if not present:
            raise TrimodalError(f"the features of {shard} are not in {self.folder}: every rank must write where rank 0 "
                                "reads (the store's folder on storage that every node sees)")
        try:
            with storage_errors(f"reading {folder}"):
                arrays = {}
                for path in folder.glob("*.npy"):
                    with path.open("rb") as handle:
                        arrays[path.stem] = np.load(handle, allow_pickle=False)
        except (StorageError, ValueError) as error:
            raise TrimodalError(f"cannot read the part {folder}: {error}; delete it and run the command again") from error
        keys = decode_keys(arrays.pop("keys"))
        return ShardFeatures(keys=keys, **arrays)

    def remove(self, shard: str) -> None:
        remove_tree(self.folder / shard)

    def finish(self) -> None:
        """Remove the folder once every part went into the store."""
        remove_tree(self.folder)


def _arrays(features: ShardFeatures) -> dict[str, np.ndarray]:
    """What a part holds: the encoded keys and every array the shard's features have."""
    arrays = {"keys": encode_keys(features.keys)}
    arrays.update({field.name: np.asarray(getattr(features, field.name)) for field in fields(ShardFeatures)
                   if field.name != "keys" and getattr(features, field.name) is not None})
    return arrays
