import tarfile

import pytest

from tests.builders import tar_with, zip_with
from trimodal.errors import ArchiveError, UnsafeArchiveError
from trimodal.pipeline.download.extract import extract_archive, safe_member_path


@pytest.mark.parametrize("name", ["/etc/passwd", "C:/windows/x", "a/../../b", "..", "a\\..\\..\\b"])
def test_escaping_member_names_are_refused(name, tmp_path):
    with pytest.raises(UnsafeArchiveError):
        safe_member_path(name, tmp_path / "a.zip")


@pytest.mark.parametrize("name", ["__MACOSX/x/._a.jpg", "dir/._a.jpg", "./", ""])
def test_macos_litter_is_skipped(name, tmp_path):
    assert safe_member_path(name, tmp_path / "a.zip") is None


def test_inner_dots_are_fine(tmp_path):
    assert safe_member_path("./a/./b.c.txt", tmp_path / "a.zip") == "a/b.c.txt"


def test_zip_extracts_files_and_folders(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_with({"d/": b"", "d/x.txt": b"hello", "__MACOSX/d/._x.txt": b"fork"}))
    summary = extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "x.txt").read_bytes() == b"hello"
    assert (summary.files, summary.skipped) == (1, 1)


def test_links_inside_the_target_are_kept(tmp_path):
    link = tarfile.TarInfo("a/link.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "real.txt"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_with([("a/real.txt", b"data"), link]))
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "link.txt").read_bytes() == b"data"


def test_a_hard_link_to_outside_is_refused(tmp_path):
    link = tarfile.TarInfo("a/hard")
    link.type, link.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_with([link]))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "out")


def test_device_files_are_refused(tmp_path):
    device = tarfile.TarInfo("dev/null")
    device.type = tarfile.CHRTYPE
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_with([device]))
    with pytest.raises(UnsafeArchiveError, match="device file"):
        extract_archive(archive, tmp_path / "out")


def test_a_member_written_through_an_escaping_symlink_is_refused(tmp_path):
    """The symlink check alone would stop this, but the folder check must hold on its own too."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").symlink_to(tmp_path / "outside")
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_with([("a/x.txt", b"x")]))
    with pytest.raises(UnsafeArchiveError, match="resolves outside"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "outside" / "x.txt").exists()


def test_a_truncated_zip_is_an_archive_error(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_with({"x.txt": b"hello" * 1000})[:50])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        extract_archive(archive, tmp_path / "out")


def test_unknown_archive_types_are_refused(tmp_path):
    archive = tmp_path / "a.rar"
    archive.write_bytes(b"x")
    with pytest.raises(ArchiveError, match="unknown archive type"):
        extract_archive(archive, tmp_path / "out")
