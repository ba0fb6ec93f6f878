from pathlib import Path

import pytest

from trimodal.errors import ManifestError
from trimodal.pipeline.manifest import available, load_manifest, manifest_dir, parse_manifest

# Published digests, copied from ../shared/reference/datasets.md (sections 1 and 2): a typo in a
# manifest must not pass.
PUBLISHED_MD5 = {
    ("flickr8k", "Flickr8k_Dataset.zip"): "f18a1e2920de5bd84dae7cf08ec78978",
    ("flickr8k", "Flickr8k_text.zip"): "bf6c1abcb8e4a833b7f922104de18627",
    ("facc", "flickr_audio.tar.gz"): "9d078f1f150c26e864aa64d1d733779a",
}
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "datasets.md"


def test_every_manifest_loads():
    names = available()
    assert {"flickr8k", "facc", "mini"} <= set(names)
    for name in names:
        manifest = load_manifest(name)
        assert manifest.name == name
        assert manifest.licence and manifest.terms_url.startswith("http")
        assert manifest.synthetic or manifest.archives


def test_flickr8k_and_facc_digests_equal_the_published_values():
    for (name, file), digest in PUBLISHED_MD5.items():
        archive = next(a for a in load_manifest(name).archives if a.file == file)
        assert archive.md5 == digest
    if REFERENCE.is_file():  # the research notes, when this checkout sits beside them
        text = REFERENCE.read_text(encoding="utf-8")
        for digest in PUBLISHED_MD5.values():
            assert digest in text


def test_flickr8k_expected_counts():
    counts = load_manifest("flickr8k").counts
    assert (counts["images"], counts["caption_lines"]) == (8091, 40460)
    assert (counts["train"], counts["val"], counts["test"]) == (6000, 1000, 1000)
    facc = load_manifest("facc").counts
    assert (facc["wavs"], facc["speakers"]) == (40000, 183)


def test_flickr8k_urls_list_the_github_mirror_first():
    for archive in load_manifest("flickr8k").archives:
        assert archive.urls[0].startswith("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/")
        assert len(archive.urls) >= 2


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ManifestError, match="unknown dataset 'flickr9k'.*flickr8k"):
        load_manifest("flickr9k")


def test_malformed_manifest_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[archives]]\nfile = "a.zip"\nurls = []\nmd5 = "XYZ"\n')
    with pytest.raises(ManifestError) as error:
        parse_manifest(bad)
    message = str(error.value)
    assert "title" in message and "urls" in message and "md5" in message


def test_manifests_ship_inside_the_package_folder_or_beside_it():
    assert (manifest_dir() / "flickr8k.toml").is_file()
