"""Every known bad input ends in one clear message, a non-zero exit and no traceback."""

import dataclasses
import subprocess
import sys

import pytest

from tests.builders import build_archives, build_flickr_tree, md5, zip_with
from trimodal.pipeline import datasets as datasets_module
from trimodal.pipeline.download.manifest import load_manifest


def assert_one_clear_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_unknown_dataset(mm, tmp_path):
    assert_one_clear_error(mm("download", "flickr9k", "--root", tmp_path), "unknown dataset 'flickr9k'", "flickr8k")


def test_validate_a_root_without_the_dataset(mm, tmp_path):
    assert_one_clear_error(mm("validate", "flickr8k", "--root", tmp_path), "does not exist", "mm download flickr8k")


def test_shard_a_root_without_the_dataset(mm, tmp_path):
    assert_one_clear_error(mm("shard", "flickr8k", "--root", tmp_path, "--out", tmp_path / "o"), "does not exist")


def test_shard_facc_alone_points_to_flickr8k(mm, tmp_path):
    assert_one_clear_error(mm("shard", "facc", "--root", tmp_path, "--out", tmp_path / "o"), "joins flickr8k")


def test_info_on_a_path_that_does_not_exist(mm, tmp_path):
    assert_one_clear_error(mm("info", tmp_path / "nowhere"), "does not exist")


def test_info_on_a_folder_that_is_neither(mm, tmp_path):
    assert_one_clear_error(mm("info", tmp_path), "neither a shard folder")


def test_bad_max_bad_value(mm, tmp_path):
    build_flickr_tree(tmp_path / "data")
    assert_one_clear_error(mm("shard", "flickr8k", "--root", tmp_path / "data", "--out", tmp_path / "o",
                              "--max-bad", "1.5"), "--max-bad")


def test_malformed_annotation_line_stops_shard(mm, tmp_path):
    tree = build_flickr_tree(tmp_path / "data")
    tree.token_file.write_text(tree.token_file.read_text().replace("\t", " ", 1))
    assert_one_clear_error(mm("shard", "flickr8k", "--root", tree.root, "--out", tmp_path / "o"),
                           "Flickr8k.token.txt:1", "mm validate")


def test_too_many_bad_samples(mm, tmp_path):
    tree = build_flickr_tree(tmp_path / "data")
    for key in tree.splits["train"][:3]:
        tree.image(key).unlink()
    result = mm("shard", "flickr8k", "--root", tree.root, "--out", tmp_path / "o")
    assert_one_clear_error(result, "3 of 14 samples", tree.splits["train"][0])
    assert not (tmp_path / "o" / "index.json").exists()


@pytest.fixture
def served(http_server, tmp_path, monkeypatch):
    tree = build_flickr_tree(tmp_path / "source")
    files = build_archives(tree)
    for name, data in files.items():
        http_server.files[f"/{name}"] = data
    real = load_manifest

    def manifest(name):
        m = real(name)
        return dataclasses.replace(m, archives=tuple(dataclasses.replace(a, md5=md5(files[a.file])) for a in m.archives))

    monkeypatch.setattr(datasets_module, "load_manifest", manifest)
    return http_server


def test_checksum_mismatch(mm, served, tmp_path):
    served.files["/flickr_audio.tar.gz"] += b"tampered"
    result = mm("download", "facc", "--root", tmp_path / "data", "--mirror", served.url)
    assert_one_clear_error(result, "checksum mismatch", "flickr_audio.tar.gz", "expected md5")


def test_no_verify_warns_visibly(mm, served, tmp_path):
    served.files["/flickr_audio.tar.gz"] = served.files["/flickr_audio.tar.gz"]
    result = mm("download", "facc", "--root", tmp_path / "data", "--mirror", served.url, "--no-verify")
    assert result.exit_code == 0 and "warning: --no-verify" in result.err and "not verified" in result.out


def test_mirror_without_the_file(mm, served, tmp_path, monkeypatch):
    monkeypatch.setattr("trimodal.pipeline.download.fetch.time.sleep", lambda s: None)
    result = mm("download", "facc", "--root", tmp_path / "data", "--mirror", served.url + "/nothing-here")
    assert_one_clear_error(result, "could not download flickr_audio.tar.gz", "HTTP 404")


def test_unreachable_mirror(mm, tmp_path, monkeypatch):
    monkeypatch.setattr("trimodal.pipeline.download.fetch.time.sleep", lambda s: None)
    result = mm("download", "facc", "--root", tmp_path / "data", "--mirror", "http://127.0.0.1:9")
    assert_one_clear_error(result, "could not download", "cannot connect")


def test_zip_slip_archive(mm, http_server, tmp_path, monkeypatch):
    evil = zip_with({"../../evil.txt": b"x"})
    http_server.files["/Flickr8k_Dataset.zip"] = evil
    real = load_manifest("flickr8k")
    manifest = dataclasses.replace(real, archives=(dataclasses.replace(real.archives[0], md5=md5(evil)),))
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest)
    result = mm("download", "flickr8k", "--root", tmp_path / "data", "--mirror", http_server.url)
    assert_one_clear_error(result, "refusing member", "../../evil.txt")
    assert not list(tmp_path.rglob("evil.txt"))


def test_corrupt_archive(mm, http_server, tmp_path, monkeypatch):
    broken = b"PK\x03\x04" + b"\x00" * 100
    http_server.files["/Flickr8k_Dataset.zip"] = broken
    real = load_manifest("flickr8k")
    manifest = dataclasses.replace(real, archives=(dataclasses.replace(real.archives[0], md5=md5(broken)),))
    monkeypatch.setattr(datasets_module, "load_manifest", lambda name: manifest)
    result = mm("download", "flickr8k", "--root", tmp_path / "data", "--mirror", http_server.url)
    assert_one_clear_error(result, "corrupt or truncated archive")


def test_a_missing_required_option_is_a_usage_error_not_a_traceback(mm):
    result = mm("shard", "mini", "--root", "data")
    assert result.exit_code == 2 and "Traceback" not in result.output and "--out" in result.output


def test_a_missing_root_is_one_clear_error(mm, tmp_path):
    assert_one_clear_error(mm("validate", "mini"), "--root is required")
    assert_one_clear_error(mm("shard", "coco2014", "--out", tmp_path / "out"), "--root is required")


def test_the_real_console_script_prints_no_traceback(tmp_path):
    """Through a real process, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "trimodal", "validate", "flickr8k", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().startswith("error:") and "does not exist" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trimodal", "--debug", "validate", "flickr8k", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_featurize_a_folder_without_shards(mm, tmp_path):
    assert_one_clear_error(mm("featurize", tmp_path, "--out", tmp_path / "f.zarr"), "no index.json")


def test_featurize_with_a_missing_weights_file(mm, mini_shards, tmp_path):
    result = mm("featurize", mini_shards, "--out", tmp_path / "f.zarr", "--image", "open_clip:ViT-S-32:/nowhere/w.pt")
    assert_one_clear_error(result, "weights file /nowhere/w.pt does not exist")


def test_featurize_with_a_missing_speech_tower_weights_file(mm, mini_shards, tmp_path):
    result = mm("featurize", mini_shards, "--out", tmp_path / "f.zarr", "--audio", "torchaudio:HUBERT_BASE:/nowhere/h.pt")
    assert_one_clear_error(result, "weights file /nowhere/h.pt does not exist")
    assert not (tmp_path / "f.zarr").exists()


def test_cman_on_a_store_without_tower_states_names_the_featurize_options(mm, mini_shards, mini_features, tmp_path):
    result = mm("train", "configs/cman-tiny.toml", "--shards", mini_shards, "--features", mini_features,
                "--out", tmp_path / "r")
    assert_one_clear_error(result, "--image open_clip:ViT-B-32:layer=11 --image-tokens")
    assert not (tmp_path / "r").exists()


def test_featurize_on_cuda_without_a_gpu(mm, mini_shards, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_clear_error(mm("featurize", mini_shards, "--out", tmp_path / "f.zarr", "--device", "cuda"), "no CUDA device")


def test_train_with_a_config_that_does_not_exist(mm, mini_shards, mini_features, tmp_path):
    result = mm("train", tmp_path / "nope.toml", "--shards", mini_shards, "--features", mini_features, "--out", tmp_path / "r")
    assert_one_clear_error(result, "nope.toml does not exist")


def test_train_with_a_bad_override(mm, mini_shards, mini_features, tmp_path):
    result = mm("train", "configs/mmn-tiny.toml", "--shards", mini_shards, "--features", mini_features,
                "--out", tmp_path / "r", "train.epochs=zero")
    assert_one_clear_error(result, "epochs")


def test_train_with_features_from_other_shards(mm, mini_features, tmp_path):
    tree = build_flickr_tree(tmp_path / "data")
    from trimodal.pipeline.datasets import shard_dataset

    shard_dataset("flickr8k", tree.root, tmp_path / "shards")
    result = mm("train", "configs/mmn-tiny.toml", "--shards", tmp_path / "shards", "--features", mini_features,
                "--out", tmp_path / "r")
    assert_one_clear_error(result, "stale cache")


def test_train_with_a_store_that_does_not_exist(mm, mini_shards, tmp_path):
    result = mm("train", "configs/mmn-tiny.toml", "--shards", mini_shards, "--features", tmp_path / "none.zarr",
                "--out", tmp_path / "r")
    assert_one_clear_error(result, "is not a feature store")


def test_eval_of_a_folder_that_is_not_a_run(mm, tmp_path):
    assert_one_clear_error(mm("eval", tmp_path), "is not a training run")
