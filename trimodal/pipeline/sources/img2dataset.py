"""Any img2dataset webdataset output folder: its tars adopted as shards, its parquet files reported.

`--root FOLDER` is the output folder itself: its tars form the train split, unless FOLDER holds
`train/`, `val/`, `test/` folders of tars (one img2dataset run each), which become those splits.
"""

from __future__ import annotations

from trimodal.errors import DatasetLayoutError
from trimodal.pipeline.base.samples import SPLITS
from trimodal.pipeline.base.scan import Scan
from trimodal.pipeline.sources import register_source
from trimodal.storage import StoragePath, location


def split_folders(root: StoragePath) -> dict[str, StoragePath]:
    """split -> folder of tars: `train/`, `val/`, `test/` when present, else the folder itself as train."""
    from trimodal.pipeline.shard.adopt import find_tars

    root = location(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"--root {root} does not exist (give the folder img2dataset wrote)")
    folders = {split: root / split for split in SPLITS if find_tars(root / split)}
    if folders:
        return folders
    if find_tars(root):
        return {"train": root}
    raise DatasetLayoutError(f"{root} holds no webdataset tars (*.tar), neither directly nor in train/, val/ or "
                             "test/; was img2dataset run with --output_format webdataset?")


def shard_img2dataset(root: StoragePath, name: str, out: Path, options, *, reporter, **source_options) -> dict:
    from trimodal.pipeline.shard.adopt import adopt_splits

    return adopt_splits(name, split_folders(root), out, options, reporter=reporter)


@register_source("img2dataset", shard=shard_img2dataset, remote_root=True)
def scan(root: StoragePath, name: str = "img2dataset") -> Scan:
    """What img2dataset's parquet files say about each split: successes and failures by reason."""
    from trimodal.pipeline.download.url_report import report_scan

    folders = split_folders(root)
    return report_scan(name, location(root), location(root), folders)
