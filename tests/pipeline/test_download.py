import tarfile

import pytest

from tests.builders import build_archives, build_flickr_tree, manifest_expecting, md5, tar_with, zip_with
from trimodal.errors import ArchiveError, ChecksumError, DiskSpaceError, DownloadError, UnsafeArchiveError
from trimodal.pipeline import datasets as datasets_module
from trimodal.pipeline.download import archives as download_module
from trimodal.pipeline.download.archives import DOWNLOADS
from trimodal.pipeline.datasets import download_dataset
from trimodal.pipeline.download.marker import MARKER, read_marker
from trimodal.pipeline.download.fetch import FetchPolicy
from trimodal.pipeline.download.manifest import Archive, Manifest

FAST = FetchPolicy(attempts_per_url=3, backoff_seconds=0.01, timeout_seconds=10)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    tree = build_flickr_tree(tmp_path_factory.mktemp("source"), train=6, val=2, test=2)
    return build_archives(tree)


def manifest_for(name: str, files: dict[str, bytes], urls=None) -> Manifest:
    """The real manifest with its digests (and, given `urls`, URLs) swapped for the test archives'."""
    return manifest_expecting(name, files, urls)


@pytest.fixture
def serve(http_server, archives, monkeypatch):
    """Serve the test archives and make the manifests expect their digests."""
    for file, data in archives.items():
        http_server.files[f"/{file}"] = data
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_for(name, archives))
    return http_server


def test_download_unpacks_the_real_layout_without_macos_litter(serve, tmp_path):
    result = download_dataset("flickr8k", tmp_path, mirror=serve.url, policy=FAST)
    target = tmp_path / "flickr8k"
    assert (target / "Flicker8k_Dataset").is_dir()
    assert len(list((target / "Flicker8k_Dataset").glob("*.jpg"))) == 11
    assert (target / "Flickr8k.token.txt").is_file()
    assert not list(target.rglob("__MACOSX")) and not list(target.rglob("._*"))
    assert read_marker(tmp_path, "flickr8k")["complete"] is True
    assert [a.file for a in result.archives] == ["Flickr8k_Dataset.zip", "Flickr8k_text.zip"]
    assert all(a.verified and a.skipped_members > 0 for a in result.archives)
    assert not (tmp_path / DOWNLOADS).exists()  # archives are removed unless --keep-archives


def test_facc_lands_in_flickr_audio(serve, tmp_path):
    download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    audio = tmp_path / "facc" / "flickr_audio"
    assert (audio / "wav2capt.txt").is_file() and (audio / "wav2spk.txt").is_file()
    assert len(list((audio / "wavs").glob("*.wav"))) == 50


def test_keep_archives_keeps_the_verified_archive(serve, tmp_path):
    download_dataset("facc", tmp_path, mirror=serve.url, keep_archives=True, policy=FAST)
    assert (tmp_path / DOWNLOADS / "flickr_audio.tar.gz").is_file()


def test_a_transfer_cut_half_way_resumes_from_the_byte_it_reached(serve, tmp_path, archives):
    serve.rules["/flickr_audio.tar.gz"] = {"cut_once": True}
    download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    requests = serve.requests_for("/flickr_audio.tar.gz")
    size = len(archives["flickr_audio.tar.gz"])
    assert [r.range for r in requests] == [None, f"bytes={size // 2}-"]
    assert [r.status for r in requests] == [200, 206]
    assert read_marker(tmp_path, "facc")


def test_resume_continues_a_part_file_left_by_an_earlier_run(serve, tmp_path, archives):
    data = archives["flickr_audio.tar.gz"]
    (tmp_path / DOWNLOADS).mkdir()
    (tmp_path / DOWNLOADS / "flickr_audio.tar.gz.part").write_bytes(data[:1000])
    download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    assert [r.range for r in serve.requests_for("/flickr_audio.tar.gz")] == ["bytes=1000-"]


def test_a_server_that_ignores_range_makes_the_download_start_over(serve, tmp_path, archives):
    data = archives["flickr_audio.tar.gz"]
    (tmp_path / DOWNLOADS).mkdir()
    (tmp_path / DOWNLOADS / "flickr_audio.tar.gz.part").write_bytes(data[:1000])
    serve.rules["/flickr_audio.tar.gz"] = {"ignore_range": True}
    download_dataset("facc", tmp_path, mirror=serve.url, keep_archives=True, policy=FAST)
    assert [r.status for r in serve.requests_for("/flickr_audio.tar.gz")] == [200]
    assert (tmp_path / DOWNLOADS / "flickr_audio.tar.gz").read_bytes() == data  # not appended


def test_redirects_are_followed(serve, tmp_path, archives, monkeypatch):
    serve.rules["/releases/flickr_audio.tar.gz"] = {"redirect": "/flickr_audio.tar.gz"}
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_for(
        name, archives, urls=lambda file: [f"{serve.url}/releases/{file}"]))
    download_dataset("facc", tmp_path, policy=FAST)
    assert [r.status for r in serve.log] == [302, 200]


def test_falls_back_to_the_next_url_after_a_404(serve, tmp_path, archives, monkeypatch):
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_for(
        name, archives, urls=lambda file: [f"{serve.url}/gone/{file}", f"{serve.url}/{file}"]))
    download_dataset("facc", tmp_path, policy=FAST)
    assert [(r.path, r.status) for r in serve.log] == [("/gone/flickr_audio.tar.gz", 404), ("/flickr_audio.tar.gz", 200)]


def test_transient_server_errors_are_retried(serve, tmp_path):
    serve.rules["/flickr_audio.tar.gz"] = {"fail": [503, 502]}
    download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    assert [r.status for r in serve.requests_for("/flickr_audio.tar.gz")] == [503, 502, 200]


def test_every_url_failing_is_one_error_naming_them(serve, tmp_path):
    with pytest.raises(DownloadError, match=r"could not download flickr_audio.tar.gz: .*missing/flickr_audio.tar.gz: HTTP 404"):
        download_dataset("facc", tmp_path, mirror=serve.url + "/missing", policy=FAST)
    assert read_marker(tmp_path, "facc") is None


def test_checksum_mismatch_keeps_nothing_extracted(serve, tmp_path):
    serve.files["/flickr_audio.tar.gz"] = serve.files["/flickr_audio.tar.gz"][:-10] + b"0123456789"
    with pytest.raises(ChecksumError) as error:
        download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    assert "flickr_audio.tar.gz" in str(error.value)
    assert error.value.expected in str(error.value) and error.value.actual in str(error.value)
    assert error.value.expected != error.value.actual
    assert not (tmp_path / "facc" / "flickr_audio").exists()
    assert not list((tmp_path / DOWNLOADS).glob("flickr_audio.tar.gz*"))
    assert read_marker(tmp_path, "facc") is None


def test_no_verify_skips_the_checksum(serve, tmp_path):
    serve.files["/Flickr8k_text.zip"] = serve.files["/Flickr8k_text.zip"]  # digest still differs below
    result = download_dataset("flickr8k", tmp_path, mirror=serve.url, verify=False, policy=FAST)
    assert all(not a.verified and not a.digests for a in result.archives)
    assert read_marker(tmp_path, "flickr8k")["verified"] is False


def test_a_second_run_makes_no_request(serve, tmp_path):
    download_dataset("flickr8k", tmp_path, mirror=serve.url, policy=FAST)
    before = len(serve.log)
    result = download_dataset("flickr8k", tmp_path, mirror=serve.url, policy=FAST)
    assert result.already_complete and len(serve.log) == before


def test_force_downloads_again(serve, tmp_path):
    download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    (tmp_path / "facc" / "flickr_audio" / "wav2spk.txt").unlink()
    download_dataset("facc", tmp_path, mirror=serve.url, force=True, policy=FAST)
    assert (tmp_path / "facc" / "flickr_audio" / "wav2spk.txt").is_file()
    assert len(serve.requests_for("/flickr_audio.tar.gz")) == 2


def test_file_urls_work(archives, tmp_path, monkeypatch):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "flickr_audio.tar.gz").write_bytes(archives["flickr_audio.tar.gz"])
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_for(name, archives))
    download_dataset("facc", tmp_path / "data", mirror=(tmp_path / "mirror").as_uri(), policy=FAST)
    assert (tmp_path / "data" / "facc" / "flickr_audio" / "wav2capt.txt").is_file()


def test_missing_file_url_is_a_clear_error(tmp_path, archives, monkeypatch):
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest_for(name, archives))
    with pytest.raises(DownloadError, match="no such file"):
        download_dataset("facc", tmp_path, mirror=(tmp_path / "nowhere").as_uri(), policy=FAST)


def test_free_space_is_checked_before_the_transfer(serve, tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskSpaceError, match="not enough free space"):
        download_dataset("facc", tmp_path, mirror=serve.url, policy=FAST)
    assert not list((tmp_path / DOWNLOADS).glob("*.part")) or \
        (tmp_path / DOWNLOADS / "flickr_audio.tar.gz.part").stat().st_size == 0


def _serve_one(http_server, monkeypatch, name: str, file: str, data: bytes):
    http_server.files[f"/{file}"] = data
    manifest = Manifest(name=name, title=name, licence="test", terms_url="http://x",
                        archives=(Archive(file=file, urls=(f"{http_server.url}/{file}",), md5=md5(data)),))
    monkeypatch.setattr(datasets_module, "load_manifest", lambda _: manifest)


def test_zip_slip_is_refused_and_nothing_lands_outside(http_server, tmp_path, monkeypatch):
    _serve_one(http_server, monkeypatch, "flickr8k", "evil.zip", zip_with({"ok.txt": b"fine", "../../escaped.txt": b"x"}))
    root = tmp_path / "deep" / "root"
    with pytest.raises(UnsafeArchiveError, match=r"\.\./\.\./escaped\.txt"):
        download_dataset("flickr8k", root, policy=FAST)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (root / "flickr8k" / "ok.txt").exists()
    assert read_marker(root, "flickr8k") is None


def test_a_tar_whose_symlink_escapes_is_refused(http_server, tmp_path, monkeypatch):
    link = tarfile.TarInfo("flickr_audio/wavs")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../outside"
    follower = ("flickr_audio/wavs/pwned.wav", b"RIFF")
    _serve_one(http_server, monkeypatch, "facc", "flickr_audio.tar.gz", tar_with([link, follower]))
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        download_dataset("facc", tmp_path / "root", policy=FAST)
    assert not list(tmp_path.rglob("pwned.wav"))


def test_a_tar_member_with_an_absolute_path_is_refused(http_server, tmp_path, monkeypatch):
    _serve_one(http_server, monkeypatch, "facc", "flickr_audio.tar.gz", tar_with([("/tmp/absolute.txt", b"x")]))
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        download_dataset("facc", tmp_path, policy=FAST)


def test_a_corrupt_archive_is_a_clear_error(http_server, tmp_path, monkeypatch):
    _serve_one(http_server, monkeypatch, "facc", "flickr_audio.tar.gz", b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(ArchiveError, match="corrupt or truncated archive"):
        download_dataset("facc", tmp_path, policy=FAST)
    assert read_marker(tmp_path, "facc") is None


def test_the_marker_is_written_last(serve, tmp_path, monkeypatch):
    """A crash while extracting the second archive leaves no completion marker; the rerun finishes."""
    real_extract = download_module.extract_archive
    calls = []

    def crash_on_second(archive, target, reporter, keep=()):
        calls.append(archive.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_extract(archive, target, reporter, keep)

    monkeypatch.setattr(download_module, "extract_archive", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        download_dataset("flickr8k", tmp_path, mirror=serve.url, policy=FAST)
    assert read_marker(tmp_path, "flickr8k") is None
    assert (tmp_path / "flickr8k" / MARKER).is_file()  # progress record, complete: false
    monkeypatch.setattr(download_module, "extract_archive", real_extract)
    download_dataset("flickr8k", tmp_path, mirror=serve.url, policy=FAST)
    assert read_marker(tmp_path, "flickr8k")
    assert [r.path for r in serve.log].count("/Flickr8k_Dataset.zip") == 1  # the first archive was not fetched again
