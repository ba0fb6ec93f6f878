"""`mm export-benchmark`: CLIP_benchmark's webdataset layout as links to our shards (its run on the layout is
in tests/training/test_zero_shot.py)."""

from __future__ import annotations

import shutil

from trimodal.cli.main import main


def test_the_layout_links_every_shard_of_the_split_in_order_and_a_rerun_replaces_it(mini_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(mini_shards, shards)
    assert main(["export-benchmark", str(shards), "--split", "train", "--split", "test"]) == 0
    view = shards / "clip_benchmark"
    assert (view / "dataset_type.txt").read_text().strip() == "retrieval"
    for split, count in (("train", 4), ("test", 1)):
        assert int((view / split / "nshards.txt").read_text()) == count
        links = sorted((view / split).glob("*.tar"), key=lambda p: int(p.stem))
        assert [p.name for p in links] == [f"{n}.tar" for n in range(count)]
        assert [p.resolve() for p in links] == [(shards / f"{split}-{n:06d}.tar").resolve() for n in range(count)]
        assert all(p.is_symlink() for p in links)
    moved = tmp_path / "moved"
    shards.rename(moved)  # relative links: the layout moves with the shards
    assert (moved / "clip_benchmark" / "test" / "0.tar").read_bytes() == (moved / "test-000000.tar").read_bytes()
    assert main(["export-benchmark", str(moved)]) == 0
    assert sorted(p.name for p in (moved / "clip_benchmark" / "test").iterdir()) == ["0.tar", "nshards.txt"]


def test_bad_requests_are_one_line(mini_shards, tmp_path, capsys):
    for argv, message in [(["export-benchmark", str(mini_shards), "--split", "dev", "--out", str(tmp_path / "v")],
                           "has no split 'dev'"),
                          (["export-benchmark", "s3://bucket/shards"], "object storage"),
                          (["export-benchmark", str(tmp_path / "nothing")], "index.json")]:
        assert main(argv) != 0
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, (argv, error)
    assert not (tmp_path / "v").exists()
