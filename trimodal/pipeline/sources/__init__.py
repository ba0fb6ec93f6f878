"""Dataset sources: each module here reads one raw layout into Samples and registers itself by name.

A source is `sources/<name>.py` plus `manifests/<name>.toml`: the module decorates its scan function
with `@register_source("<name>")`; nothing else in trimodal names it. Modules are imported on the
first lookup, so `mm download/validate/shard/info` see a new source without any other change.

Most sources list files and `mm shard` writes them into tars. Two kinds do more, through hooks: a
source too large to list in memory, or whose samples already are webdataset tars, shards itself
(`shard=`), and a source whose downloaded files are only a list of URLs fetches the rest (`download=`).

A source that reads its ROOT through `trimodal.storage` paths only says so (`remote_root=True`): its
ROOT may then be in object storage (`s3://…`); for the others a URL as ROOT is refused in one line.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from trimodal.errors import ConfigError, DatasetLayoutError
from trimodal.pipeline.download.manifest import available, load_manifest
from trimodal.pipeline.base.scan import Scan
from trimodal.storage import StoragePath, is_remote, location


ScanFunction = Callable[..., Scan]  # scan(root, name, **options) -> Scan
Synthesizer = Callable[..., dict]  # synthesize(target_dir, *, reporter) -> details for the marker
# shard(root, name, out, options: ShardOptions, *, reporter, **source_options) -> the index it wrote
Sharder = Callable[..., dict]
# download(target_dir, *, reporter, **download_options) -> details for the download record; runs after
# the manifest's files are fetched and verified
Downloader = Callable[..., dict]


@dataclass(frozen=True)
class Source:
    name: str
    scan: ScanFunction
    options: frozenset[str] = frozenset()  # source-specific options it accepts, e.g. {"splits"}
    synthesize: Synthesizer | None = None  # for datasets made locally instead of downloaded
    shard: Sharder | None = None  # writes (or adopts) its own shards instead of listing samples
    download: Downloader | None = None  # fetches what the manifest's files point to
    download_options: frozenset[str] = frozenset()  # options only its download takes, e.g. {"processes"}
    remote_root: bool = False  # its ROOT may be in object storage


_SOURCES: dict[str, Source] = {}
_BROKEN: dict[str, str] = {}  # module name -> why it would not import
_discovered = False


def register_source(name: str, *, options: tuple[str, ...] = (), synthesize: Synthesizer | None = None,
                    shard: Sharder | None = None, download: Downloader | None = None,
                    download_options: tuple[str, ...] = (), remote_root: bool = False):
    """Decorator for a scan function: `@register_source("coco2014", options=("splits",))`."""

    def register(scan: ScanFunction) -> ScanFunction:
        if name in _SOURCES and _SOURCES[name].scan is not scan:
            raise ValueError(f"two sources register the name {name!r}")
        _SOURCES[name] = Source(name, scan, frozenset(options), synthesize, shard, download,
                                frozenset(download_options), remote_root)
        return scan

    return register


def _discover() -> None:
    """Import every module here once. One that fails (a missing optional dependency) is remembered and
    named when its dataset is asked for; it does not take the other sources down with it."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            try:
                importlib.import_module(f"{__name__}.{module.name}")
            except ImportError as error:
                _BROKEN[module.name] = f"{type(error).__name__}: {error}"
        _discovered = True


def has_source(name: str) -> bool:
    """Whether a module here reads `name`, including one that fails to import (`get_source` names why)."""
    _discover()
    return name in _SOURCES or name.replace("-", "_") in _BROKEN


def source_names() -> list[str]:
    _discover()
    return sorted(_SOURCES)


def get_source(name: str) -> Source:
    """The registered source `name`; errors say what to use instead and list the known names."""
    _discover()
    if name in _SOURCES:
        return _SOURCES[name]
    if name.replace("-", "_") in _BROKEN:
        raise DatasetLayoutError(f"the {name} source cannot be loaded ({_BROKEN[name.replace('-', '_')]})")
    if name in available():
        joins = load_manifest(name).joins
        if joins:
            raise DatasetLayoutError(f"{name} is not read on its own: it joins {joins} "
                                     f"(use `{joins}` with the same --root)")
    raise DatasetLayoutError(f"no source reads {name!r}; datasets with one: {', '.join(source_names())}")


def check_options(source: Source, given: dict, kind: str = "options") -> None:
    """A ConfigError naming every option `source` does not take (`kind` "options" or "download_options"),
    and the datasets that do take it."""
    unknown = sorted(set(given) - getattr(source, kind))
    if unknown:
        users = {option: [s.name for s in _SOURCES.values() if option in getattr(s, kind)] for option in unknown}
        flag = lambda option: "--" + option.replace("_", "-")  # noqa: E731
        raise ConfigError("; ".join(f"{flag(option)} does not apply to {source.name} (it applies to "
                                    f"{', '.join(users[option]) or 'no dataset'})" for option in unknown))


def check_root(source: Source, root: StoragePath, command: str) -> None:
    """A ConfigError when `root` is in object storage and `source` reads only local folders."""
    if is_remote(root) and not source.remote_root:
        readers = ", ".join(sorted(s.name for s in _SOURCES.values() if s.remote_root))
        raise ConfigError(f"mm {command} {source.name} needs a local --root, not {root} (a ROOT in object "
                          f"storage is for {readers}); `mm shard {source.name} --out {root}/…` puts its "
                          "shards in object storage")


def scan_source(name: str, root: StoragePath | None, **options) -> Scan:
    """Read `name` under `root`; `options` are source-specific (`splits=`, `manifest=`), None = default.

    `root` may be None only for a source that takes a `manifest` (a JSONL file that says where
    everything is); that source says what it needs.
    """
    source = get_source(name)
    given = {key: value for key, value in options.items() if value is not None}
    check_options(source, given)
    if root is None and "manifest" not in source.options:
        raise ConfigError(f"--root is required: the folder that holds {name}/")
    if root is not None:
        root = location(root)
        check_root(source, root, "validate")
    return source.scan(root, name, **given)
