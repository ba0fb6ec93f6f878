import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.builders import make_jpeg
from trimodal.errors import ConfigError, DatasetLayoutError
from trimodal.pipeline.download.manifest import available, load_manifest
from trimodal.pipeline.sources import get_source, scan_source, source_names

REPOSITORY = Path(__file__).resolve().parents[2]


def test_every_source_has_a_manifest_and_every_readable_manifest_a_source():
    for name in source_names():
        assert load_manifest(name).name == name
    readable = [name for name in available() if not load_manifest(name).joins]
    assert sorted(readable) == source_names()


def test_synthetic_datasets_register_a_synthesizer():
    for name in available():
        if load_manifest(name).synthetic:
            assert get_source(name).synthesize is not None


@pytest.mark.parametrize("name", source_names())
def test_an_empty_root_is_one_clear_error_for_every_source(name, tmp_path):
    with pytest.raises((DatasetLayoutError, ConfigError)) as error:
        scan_source(name, tmp_path)
    assert str(tmp_path) in str(error.value)


def test_an_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DatasetLayoutError, match="coco2017, custom, flickr30k, flickr8k"):
        scan_source("laion400m", Path("."))


def test_a_joined_dataset_points_at_the_one_it_joins():
    with pytest.raises(DatasetLayoutError, match="facc is not read on its own: it joins flickr8k"):
        scan_source("facc", Path("."))


def test_an_option_of_another_source_is_refused_naming_who_takes_it(tmp_path):
    with pytest.raises(ConfigError, match="--manifest does not apply to coco2014 .*custom"):
        scan_source("coco2014", tmp_path, manifest=tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match="--splits does not apply to flickr8k"):
        scan_source("flickr8k", tmp_path, splits="official")


TOY_SOURCE = '''
"""A toy dataset: toy/pairs.tsv lines `<image file>\\t<caption>\\t<split>`."""

from trimodal.pipeline.base.samples import Caption, Sample
from trimodal.pipeline.base.scan import Scan
from trimodal.pipeline.sources import register_source


@register_source("toy")
def scan(root, name):
    folder = root / name
    samples = []
    for line in (folder / "pairs.tsv").read_text().splitlines():
        image, caption, split = line.split("\\t")
        samples.append(Sample(image.split(".")[0], split, folder / image, (Caption(0, caption),),
                              {"image_file": f"{name}/{image}"}))
    return Scan(name, root, folder, samples, [], {"images": len(samples)})
'''

TOY_MANIFEST = '''
name = "toy"
title = "a toy dataset added by a test"
licence = "CC0"
terms_url = "https://creativecommons.org/publicdomain/zero/1.0/"
local = true
'''


def test_a_new_source_needs_nothing_but_its_module_and_manifest(tmp_path):
    """A copy of the package gains `sources/toy.py` and `manifests/toy.toml`; every command finds it."""
    copy = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "trimodal", copy / "trimodal", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPOSITORY / "manifests", copy / "manifests")
    (copy / "trimodal" / "pipeline" / "sources" / "toy.py").write_text(textwrap.dedent(TOY_SOURCE))
    (copy / "manifests" / "toy.toml").write_text(TOY_MANIFEST)
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    lines = []
    for number, split in enumerate(["train"] * 3 + ["val", "test"]):
        (data / f"image{number}.jpg").write_bytes(make_jpeg(number))
        lines.append(f"image{number}.jpg\ta picture number {number}\t{split}")
    (data / "pairs.tsv").write_text("\n".join(lines) + "\n")

    def mm(*args):
        return subprocess.run([sys.executable, "-m", "trimodal", *map(str, args)], cwd=copy,
                              capture_output=True, text=True, timeout=120)

    assert "toy" in mm("--help").stdout
    validated = mm("validate", "toy", "--root", tmp_path / "data")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    sharded = mm("shard", "toy", "--root", tmp_path / "data", "--out", tmp_path / "shards")
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert "toy" in mm("info", tmp_path / "shards").stdout
    refused = mm("download", "toy", "--root", tmp_path / "data")
    assert refused.returncode == 1 and "nothing to download" in refused.stderr


def test_a_source_that_cannot_be_imported_is_named_and_leaves_the_others_working(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "trimodal", copy / "trimodal", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPOSITORY / "manifests", copy / "manifests")
    (copy / "trimodal" / "pipeline" / "sources" / "toy.py").write_text("import a_package_that_is_not_installed\n")
    (copy / "manifests" / "toy.toml").write_text(TOY_MANIFEST)
    script = ("from pathlib import Path\nfrom trimodal.pipeline.sources import get_source\n"
              "assert get_source('flickr8k').name == 'flickr8k'\n"
              "try:\n    get_source('toy')\nexcept Exception as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the toy source cannot be loaded" in result.stdout and "a_package_that_is_not_installed" in result.stdout
