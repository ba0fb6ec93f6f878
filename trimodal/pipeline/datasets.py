"""The pipeline's front doors by dataset name: `mm download`, `mm validate` and `mm shard` of a dataset.

The jobs below take what a dataset's source gives them (a manifest and hooks, a Scan) and name no dataset;
this module looks the source up and hands it over. It is the only pipeline module above the sources.
"""

from __future__ import annotations

from trimodal.errors import ConfigError
from trimodal.pipeline import sources
from trimodal.pipeline.download.archives import DownloadResult, download
from trimodal.pipeline.download.fetch import FetchPolicy
from trimodal.pipeline.download.manifest import Manifest, load_manifest
from trimodal.pipeline.shard.writer import ShardOptions, write_shards
from trimodal.pipeline.validate import ValidationReport, validate_scan
from trimodal.progress import SILENT, Reporter
from trimodal.storage import StoragePath, location


def download_dataset(
    name: str,
    root: StoragePath,
    *,
    mirror: str | None = None,
    verify: bool = True,
    force: bool = False,
    keep_archives: bool = False,
    only: list[str] | None = None,
    download_options: dict | None = None,
    reporter: Reporter = SILENT,
    policy: FetchPolicy = FetchPolicy(),
) -> DownloadResult:
    """Make `root/name` hold the dataset (or the parts named in `only`); what is complete is left alone
    without any request.

    `download_options` (None values ignored) go to the source's download hook, e.g. cc3m's
    `{"processes": 8, "max_samples": 1000}`; an option the source does not take is a ConfigError.
    """
    manifest = load_manifest(name)
    given = {key: value for key, value in (download_options or {}).items() if value is not None}
    source = _source_of(manifest)
    sources.check_options(source, given, "download_options")
    root = location(root)
    sources.check_root(source, root, "download")
    return download(manifest, root, hook=source.download, hook_options=given, synthesize=source.synthesize,
                    mirror=mirror, verify=verify, force=force, keep_archives=keep_archives, only=only,
                    reporter=reporter, policy=policy)


def _source_of(manifest: Manifest) -> sources.Source:
    """The dataset's source; a dataset read through the one it joins (facc, spokencoco) has none of its own
    (an empty one stands in: no hooks)."""
    if not manifest.joins and sources.has_source(manifest.name):
        return sources.get_source(manifest.name)  # a module that does not import is named here
    return sources.Source(manifest.name, scan=lambda *args, **kwargs: None)


def validate_dataset(name: str, root: StoragePath | None, *, workers: int = 2, source_options: dict | None = None,
                     reporter: Reporter = SILENT) -> ValidationReport:
    """`root/name` read by its source, then every file checked (see `validate_scan`)."""
    scan = sources.scan_source(name, root, **(source_options or {}))
    return validate_scan(scan, workers=workers, reporter=reporter)


def shard_dataset(name: str, root: StoragePath | None, out: StoragePath, options: ShardOptions = ShardOptions(), *,
                  source_options: dict | None = None, reporter: Reporter = SILENT) -> dict:
    """Write `out/<split>-%06d.tar` for every split of `root/name` and return the index it wrote.

    `source_options` go to the dataset's source (`splits="official"` for coco2014, `manifest=` for custom).
    A source that writes or adopts its own shards (a `shard=` hook) does so; the others are scanned and
    written by `write_shards`.
    """
    options.check()
    source = sources.get_source(name)
    if source.shard is not None:
        given = {key: value for key, value in (source_options or {}).items() if value is not None}
        sources.check_options(source, given)
        if root is None:
            raise ConfigError(f"--root is required: the folder that holds {name}/")
        root = location(root)
        sources.check_root(source, root, "shard")
        return source.shard(root, name, location(out), options, reporter=reporter, **given)
    scan = sources.scan_source(name, root, **(source_options or {}))
    return write_shards(scan, out, options, reporter=reporter)
