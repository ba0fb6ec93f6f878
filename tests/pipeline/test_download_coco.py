"""`mm download` on the COCO family: parts (`--only`), Karpathy's `keep`, SpokenCOCO's recorded checksum."""

import hashlib
import json

import pytest

from tests.builders import manifest_expecting, tar_with
from tests.coco_builders import build_coco_archives, build_coco_tree
from trimodal.errors import ArchiveError, ChecksumError, ConfigError
from trimodal.pipeline import datasets as datasets_module
from trimodal.pipeline.download.archives import DOWNLOADS, RECORDED
from trimodal.pipeline.datasets import download_dataset
from trimodal.pipeline.download.marker import read_marker, read_state
from trimodal.pipeline.download.fetch import FetchPolicy
from trimodal.pipeline.info import describe
from trimodal.pipeline.download.manifest import Manifest
from trimodal.progress import Reporter

FAST = FetchPolicy(attempts_per_url=3, backoff_seconds=0.01, timeout_seconds=10)
ANNOTATION_ARCHIVES = ["/annotations_trainval2014.zip", "/caption_datasets.zip"]


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    tree = build_coco_tree(tmp_path_factory.mktemp("coco-source"), train=3, restval=1, val=2, test=2)
    return build_coco_archives(tree)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_for(name: str, files: dict[str, bytes], server_url: str) -> Manifest:
    """The real manifest expecting the test archives' sha256 (parts, keep and unpublished checksums kept).

    Its own URLs point at a path the test server does not serve, so a download that ignored --mirror
    would fail here instead of reaching the internet."""
    return manifest_expecting(name, files, lambda file: [f"{server_url}/not-the-mirror/{file}"])


@pytest.fixture
def serve(http_server, archives, monkeypatch):
    """Serve the COCO test archives and make the manifests expect their digests."""
    for file, data in archives.items():
        http_server.files[f"/{file}"] = data
    monkeypatch.setattr(datasets_module, "load_manifest",
                        lambda name: manifest_for(name, archives, http_server.url))
    return http_server


class NoteCollector(Reporter):
    def __init__(self):
        self.notes: list[tuple[str, str]] = []

    def note(self, message: str, level: str = "info") -> None:
        self.notes.append((message, level))


def fetched(server) -> list[str]:
    return sorted(request.path for request in server.log if request.status in (200, 206))


def coco2014_status(root) -> dict:
    return next(d for d in describe(root)["datasets"] if d["name"] == "coco2014")


def test_only_annotations_fetches_the_two_annotation_archives_and_keeps_only_dataset_coco(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations"], policy=FAST)
    target = tmp_path / "coco2014"
    assert fetched(serve) == ANNOTATION_ARCHIVES
    assert (target / "annotations" / "captions_train2014.json").is_file()
    assert (target / "annotations" / "captions_val2014.json").is_file()
    assert (target / "dataset_coco.json").is_file()
    assert not list(target.rglob("dataset_flickr8k.json")) and not list(target.rglob("dataset_flickr30k.json"))
    assert not (target / "val2014").exists() and not (target / "train2014").exists()


def test_only_annotations_leaves_the_dataset_partial_with_that_part(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations"], policy=FAST)
    status = coco2014_status(tmp_path)
    assert status["status"] == "partial" and status["parts"] == ["annotations"]
    assert read_marker(tmp_path, "coco2014") is None
    assert read_state(tmp_path / "coco2014")["complete"] is False


def test_only_val_after_annotations_adds_val2014_without_fetching_the_annotations_again(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations"], policy=FAST)
    serve.log.clear()
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["val"], policy=FAST)
    assert fetched(serve) == ["/val2014.zip"]
    assert list((tmp_path / "coco2014" / "val2014").glob("*.jpg"))
    assert (tmp_path / "coco2014" / "annotations" / "captions_val2014.json").is_file()
    assert coco2014_status(tmp_path)["parts"] == ["annotations", "val"]
    assert coco2014_status(tmp_path)["status"] == "partial"


def test_a_plain_download_after_parts_fetches_only_what_is_missing_and_completes(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations"], policy=FAST)
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["val"], policy=FAST)
    serve.log.clear()
    result = download_dataset("coco2014", tmp_path, mirror=serve.url, policy=FAST)
    assert fetched(serve) == ["/train2014.zip"]
    assert not result.already_complete
    assert list((tmp_path / "coco2014" / "train2014").glob("*.jpg"))
    assert read_marker(tmp_path, "coco2014")["parts"] == ["annotations", "val", "train"]
    assert coco2014_status(tmp_path)["status"] == "complete"
    assert not (tmp_path / DOWNLOADS).exists()


def test_a_download_of_a_complete_dataset_makes_no_request(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations", "val"], policy=FAST)
    download_dataset("coco2014", tmp_path, mirror=serve.url, policy=FAST)
    serve.log.clear()
    result = download_dataset("coco2014", tmp_path, mirror=serve.url, policy=FAST)
    assert result.already_complete and serve.log == []


def test_only_a_part_already_downloaded_makes_no_request(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations"], policy=FAST)
    serve.log.clear()
    result = download_dataset("coco2014", tmp_path, mirror=serve.url, only=["annotations"], policy=FAST)
    assert result.already_complete and serve.log == []


def test_a_download_that_fails_later_still_records_the_parts_it_finished(serve, tmp_path):
    serve.files["/val2014.zip"] = b"not the val2014 archive"
    with pytest.raises(ChecksumError):
        download_dataset("coco2014", tmp_path, mirror=serve.url, policy=FAST)
    status = coco2014_status(tmp_path)
    assert status["status"] == "partial" and status["parts"] == ["annotations"]


def test_force_with_only_downloads_that_part_again_and_keeps_the_others(serve, tmp_path):
    download_dataset("coco2014", tmp_path, mirror=serve.url, policy=FAST)
    (tmp_path / "coco2014" / "val2014" / "stray.jpg").write_bytes(b"left by hand")
    serve.log.clear()
    download_dataset("coco2014", tmp_path, mirror=serve.url, only=["val"], force=True, policy=FAST)
    target = tmp_path / "coco2014"
    assert fetched(serve) == ["/val2014.zip"]
    assert not (target / "val2014" / "stray.jpg").exists() and list((target / "val2014").glob("*.jpg"))
    assert list((target / "train2014").glob("*.jpg")) and (target / "dataset_coco.json").is_file()
    assert (target / "annotations" / "captions_train2014.json").is_file()
    assert coco2014_status(tmp_path)["status"] == "complete"


def test_only_an_unknown_part_is_a_config_error_listing_the_parts(serve, tmp_path):
    with pytest.raises(ConfigError, match=r"no part 'images'.*annotations, val, train"):
        download_dataset("coco2014", tmp_path, mirror=serve.url, only=["images"], policy=FAST)
    assert serve.log == []
    assert not (tmp_path / "coco2014").exists()


def test_only_on_a_dataset_without_parts_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="flickr8k is not split into parts"):
        download_dataset("flickr8k", tmp_path, mirror="http://127.0.0.1:9", only=["val"], policy=FAST)
    assert not (tmp_path / "flickr8k").exists()


def test_a_checksum_mismatch_on_a_coco_archive_names_it_and_extracts_nothing(serve, tmp_path):
    original = serve.files["/val2014.zip"]
    serve.files["/val2014.zip"] = original[:-10] + b"0123456789"
    with pytest.raises(ChecksumError, match=r"val2014\.zip") as error:
        download_dataset("coco2014", tmp_path, mirror=serve.url, only=["val"], policy=FAST)
    assert error.value.expected == sha256(original)
    assert not (tmp_path / "coco2014" / "val2014").exists()
    assert not list((tmp_path / "coco2014").glob(".extracting-*"))
    assert not list((tmp_path / DOWNLOADS).glob("val2014.zip*"))
    assert "val2014.zip" not in read_state(tmp_path / "coco2014").get("archives", {})


def test_spokencoco_first_download_records_its_sha256_and_warns(serve, tmp_path, archives):
    reporter = NoteCollector()
    download_dataset("spokencoco", tmp_path, mirror=serve.url, reporter=reporter, policy=FAST)
    digest = sha256(archives["SpokenCOCO.tar.gz"])
    assert json.loads((tmp_path / RECORDED).read_text()) == {"SpokenCOCO.tar.gz": digest}
    warnings = [message for message, level in reporter.notes if level == "warning"]
    assert len(warnings) == 1
    assert "SpokenCOCO.tar.gz" in warnings[0] and digest in warnings[0] and "no published checksum" in warnings[0]


def test_spokencoco_unpacks_to_spokencoco_folder(serve, tmp_path):
    download_dataset("spokencoco", tmp_path, mirror=serve.url, policy=FAST)
    spoken = tmp_path / "spokencoco" / "SpokenCOCO"
    assert (spoken / "SpokenCOCO_train.json").is_file() and (spoken / "SpokenCOCO_val.json").is_file()
    assert list((spoken / "wavs").rglob("*.wav"))
    assert read_marker(tmp_path, "spokencoco")["complete"] is True


def test_spokencoco_a_later_download_must_match_the_recorded_digest(serve, tmp_path, archives):
    download_dataset("spokencoco", tmp_path, mirror=serve.url, policy=FAST)
    recorded = sha256(archives["SpokenCOCO.tar.gz"])
    serve.files["/SpokenCOCO.tar.gz"] = tar_with([("SpokenCOCO/SpokenCOCO_train.json", b'{"data": []}')])
    with pytest.raises(ChecksumError, match=recorded) as error:
        download_dataset("spokencoco", tmp_path, mirror=serve.url, force=True, policy=FAST)
    assert str(tmp_path / RECORDED) in str(error.value)
    assert not (tmp_path / "spokencoco" / "SpokenCOCO").exists()
    assert json.loads((tmp_path / RECORDED).read_text()) == {"SpokenCOCO.tar.gz": recorded}


def test_spokencoco_a_first_transfer_that_does_not_unpack_is_neither_recorded_nor_kept(serve, tmp_path, archives):
    serve.files["/SpokenCOCO.tar.gz"] = b"<html>503 Service Unavailable</html>"
    with pytest.raises(ArchiveError):
        download_dataset("spokencoco", tmp_path, mirror=serve.url, policy=FAST)
    assert not (tmp_path / RECORDED).exists()
    assert not list((tmp_path / DOWNLOADS).glob("SpokenCOCO.tar.gz*"))
    serve.files["/SpokenCOCO.tar.gz"] = archives["SpokenCOCO.tar.gz"]
    download_dataset("spokencoco", tmp_path, mirror=serve.url, policy=FAST)
    assert json.loads((tmp_path / RECORDED).read_text()) == {"SpokenCOCO.tar.gz": sha256(archives["SpokenCOCO.tar.gz"])}
    assert (tmp_path / "spokencoco" / "SpokenCOCO" / "SpokenCOCO_train.json").is_file()


def test_a_val2014_transfer_cut_half_way_resumes_with_a_range_request(serve, tmp_path, archives):
    serve.rules["/val2014.zip"] = {"cut_once": True}
    result = download_dataset("coco2014", tmp_path, mirror=serve.url, only=["val"], policy=FAST)
    size = len(archives["val2014.zip"])
    requests = serve.requests_for("/val2014.zip")
    assert [(r.range, r.status) for r in requests] == [(None, 200), (f"bytes={size // 2}-", 206)]
    (outcome,) = result.archives
    assert outcome.verified and outcome.digests == {"sha256": sha256(archives["val2014.zip"])}
    assert list((tmp_path / "coco2014" / "val2014").glob("*.jpg"))


def test_cli_only_takes_comma_separated_parts(serve, tmp_path, mm):
    result = mm("download", "coco2014", "--root", tmp_path, "--mirror", serve.url, "--only", "annotations,val")
    assert result.exit_code == 0, result.output
    assert fetched(serve) == sorted(ANNOTATION_ARCHIVES + ["/val2014.zip"])
    assert (tmp_path / "coco2014" / "dataset_coco.json").is_file()
    assert list((tmp_path / "coco2014" / "val2014").glob("*.jpg"))
    assert coco2014_status(tmp_path)["parts"] == ["annotations", "val"]
