from pathlib import Path

import pytest

from trimodal.errors import ManifestError
from trimodal.pipeline.download.manifest import available, load_manifest, manifest_dir, parse_manifest

# Published digests, copied from ../shared/reference/datasets.md (sections 1 and 2): a typo in a
# manifest must not pass.
PUBLISHED_MD5 = {
    ("flickr8k", "Flickr8k_Dataset.zip"): "f18a1e2920de5bd84dae7cf08ec78978",
    ("flickr8k", "Flickr8k_text.zip"): "bf6c1abcb8e4a833b7f922104de18627",
    ("facc", "flickr_audio.tar.gz"): "9d078f1f150c26e864aa64d1d733779a",
}
# SHA-256 from the TFDS checksum files, as copied into ../shared/reference/datasets.md section 3.
PUBLISHED_SHA256 = {
    ("coco2014", "train2014.zip"): "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
    ("coco2014", "val2014.zip"): "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
    ("coco2014", "annotations_trainval2014.zip"): "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
    ("coco2014", "caption_datasets.zip"): "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817",
    ("coco2017", "train2017.zip"): "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
    ("coco2017", "val2017.zip"): "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
    ("coco2017", "annotations_trainval2017.zip"): "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
}
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "datasets.md"


def test_every_manifest_loads():
    names = available()
    assert {"flickr8k", "facc", "mini"} <= set(names)
    for name in names:
        manifest = load_manifest(name)
        assert manifest.name == name
        assert manifest.licence and (manifest.local or manifest.terms_url.startswith("http"))
        assert manifest.synthetic or manifest.local or manifest.archives


def test_flickr8k_and_facc_digests_equal_the_published_values():
    for (name, file), digest in PUBLISHED_MD5.items():
        archive = next(a for a in load_manifest(name).archives if a.file == file)
        assert archive.md5 == digest
    if REFERENCE.is_file():  # the research notes, when this checkout sits beside them
        text = REFERENCE.read_text(encoding="utf-8")
        for digest in PUBLISHED_MD5.values():
            assert digest in text


def test_coco_digests_equal_the_published_values():
    for (name, file), digest in PUBLISHED_SHA256.items():
        archive = next(a for a in load_manifest(name).archives if a.file == file)
        assert archive.sha256 == digest
    if REFERENCE.is_file():
        text = REFERENCE.read_text(encoding="utf-8")
        for digest in PUBLISHED_SHA256.values():
            assert digest in text


def test_coco_parts_and_the_karpathy_member_kept():
    coco = load_manifest("coco2014")
    assert coco.parts() == ["annotations", "val", "train"]
    karpathy = next(a for a in coco.archives if a.file == "caption_datasets.zip")
    assert "dataset_coco.json" in karpathy.keep
    assert load_manifest("coco2014").counts["train"] == 113_287
    assert (load_manifest("coco2014").counts["val"], load_manifest("coco2014").counts["test"]) == (5000, 5000)


def test_spokencoco_has_no_published_checksum_and_says_so():
    archive = load_manifest("spokencoco").archives[0]
    assert archive.unpublished_checksum and not archive.digests
    assert load_manifest("spokencoco").joins == "coco2014"


def test_an_archive_without_any_checksum_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ntitle = "t"\nlicence = "l"\nterms_url = "https://x"\n'
                   '[[archives]]\nfile = "a.zip"\nurls = ["https://x/a.zip"]\n')
    with pytest.raises(ManifestError, match="unpublished"):
        parse_manifest(bad)


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
