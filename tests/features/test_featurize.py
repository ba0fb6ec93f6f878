import json

import numpy as np
import pytest
import torch

from tests.builders import build_flickr_tree
from trimodal.errors import ConfigError, TrimodalError
from trimodal.features import featurize as featurize_module
from trimodal.features.audio import MelExtractor
from trimodal.features.featurize import FeaturizeOptions, featurize
from trimodal.features.store import FeatureStore, StaleCacheError
from trimodal.pipeline.shard.writer import ShardOptions
from trimodal.pipeline.datasets import shard_dataset
from trimodal.pipeline.read.shards import iter_samples

SMALL_ENCODER = "open_clip:ViT-S-32"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    build_flickr_tree(root / "data", train=8, val=3, test=3, wav_seconds=0.6)
    out = root / "shards"
    shard_dataset("flickr8k", root / "data", out, ShardOptions(max_samples=3))
    return out


@pytest.fixture(scope="module")
def store(shards, tmp_path_factory):
    """The default extractors (open_clip ViT-B-32, random init), as `mm featurize` runs them."""
    path = tmp_path_factory.mktemp("store") / "features.zarr"
    summary = featurize(shards, path, FeaturizeOptions(device="cpu", batch_size=4))
    assert summary.random_init and len(summary.shards_written) == 5  # train 3+3+2, val 3, test 3
    return path


def test_rows_keys_and_offsets_agree_with_the_shards(shards, store):
    index = json.loads((shards / "index.json").read_text())
    features = FeatureStore.open(store)
    assert features.config["image"]["model"] == "ViT-B-32" and features.config["image"]["random_init"] is True
    row = 0
    mel = MelExtractor()
    for split in ("train", "val", "test"):
        for shard in index["splits"][split]["shards"]:
            slot = features.slots[shard["name"]]
            assert slot.rows == (row, row + shard["samples"]) and slot.done
            row += shard["samples"]
            part = features.read_shard(shard["name"])
            samples = list(iter_samples(shards / shard["name"]))
            assert part.keys == [key for key, _ in samples]
            assert part.image.shape == (shard["samples"], 512)
            for i, (key, members) in enumerate(samples):
                captions = members["txt"].decode().splitlines()
                c0, c1 = part.caption_offsets[i], part.caption_offsets[i + 1]
                assert c1 - c0 == len(captions) == 5
                assert list(part.caption_ids[c0:c1]) == [0, 1, 2, 3, 4]
                u0, u1 = part.utterance_offsets[i], part.utterance_offsets[i + 1]
                assert list(part.utterance_caption_ids[u0:u1]) == [0, 1, 2, 3, 4]
                first = part.mel[part.frame_offsets[u0] : part.frame_offsets[u0 + 1]]
                expected = mel.from_bytes([members["0.wav"]])[0]
                assert first.shape == expected.shape and np.allclose(first, expected, atol=0.02)
    assert row == 14 and features.group["keys"].shape[0] == 14


def test_tokens_are_the_open_clip_tokenizer_ids(shards, store):
    import open_clip

    features = FeatureStore.open(store)
    part = features.read_shard("val-000000.tar")
    key, members = next(iter_samples(shards / "val-000000.tar"))
    first_caption = members["txt"].decode().splitlines()[0]
    expected = open_clip.get_tokenizer("ViT-B-32")([first_caption])[0].numpy()
    assert part.tokens.shape[1] == 77 and (part.tokens[0] == expected).all()


def test_a_different_config_into_an_existing_store_is_a_stale_cache_error(shards, store):
    with pytest.raises(StaleCacheError, match=r"other settings: .*image"):
        featurize(shards, store, FeaturizeOptions(device="cpu", image=SMALL_ENCODER))


def test_changed_shards_are_a_stale_cache_error(tmp_path, shards, store):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["splits"]["test"]["shards"][0]["sha256"] = "0" * 64
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(StaleCacheError, match="other shards"):
        featurize(copy, store, FeaturizeOptions(device="cpu"))


def test_a_rerun_of_a_complete_store_writes_nothing(shards, store):
    summary = featurize(shards, store, FeaturizeOptions(device="cpu"))
    assert summary.shards_written == [] and len(summary.shards_skipped) == 5


def test_featurize_resumes_after_an_interrupted_run(shards, store, tmp_path):
    path = tmp_path / "resumed.zarr"
    first = featurize(shards, path, FeaturizeOptions(device="cpu", batch_size=4), stop_after=2)
    assert len(first.shards_written) == 2 and not FeatureStore.open(path).complete()
    second = featurize(shards, path, FeaturizeOptions(device="cpu", batch_size=4))
    assert second.shards_skipped == first.shards_written and len(second.shards_written) == 3
    resumed, fresh = FeatureStore.open(path), FeatureStore.open(store)
    for name in ("train-000000.tar", "val-000000.tar", "test-000000.tar"):
        a, b = resumed.read_shard(name), fresh.read_shard(name)
        assert a.keys == b.keys and np.array_equal(a.image, b.image) and np.array_equal(a.mel, b.mel)
        assert np.array_equal(a.frame_offsets, b.frame_offsets) and np.array_equal(a.tokens, b.tokens)


def test_a_crash_inside_a_shard_leaves_it_to_be_redone(shards, tmp_path, monkeypatch):
    path = tmp_path / "crashed.zarr"
    real = featurize_module._featurize_shard
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(featurize_module, "_featurize_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        featurize(shards, path, FeaturizeOptions(device="cpu", image=None))
    monkeypatch.setattr(featurize_module, "_featurize_shard", real)
    summary = featurize(shards, path, FeaturizeOptions(device="cpu", image=None))
    assert len(summary.shards_skipped) == 2 and FeatureStore.open(path).complete()


def test_a_full_disk_is_one_clear_error_and_a_rerun_finishes(shards, tmp_path, monkeypatch):
    import errno

    path = tmp_path / "full.zarr"
    real = FeatureStore.write_shard
    calls = []

    def disk_full_on_second(self, slot, features):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, slot, features)

    monkeypatch.setattr(FeatureStore, "write_shard", disk_full_on_second)
    with pytest.raises(TrimodalError, match=r"cannot write .*full.zarr: No space left on device; shards already written"):
        featurize(shards, path, FeaturizeOptions(device="cpu", image=None))
    monkeypatch.setattr(FeatureStore, "write_shard", real)
    summary = featurize(shards, path, FeaturizeOptions(device="cpu", image=None))
    assert len(summary.shards_skipped) == 1 and FeatureStore.open(path).complete()


def test_splits_select_what_is_featurized(shards, tmp_path):
    summary = featurize(shards, tmp_path / "test.zarr", FeaturizeOptions(device="cpu", image=None, splits=("test",)))
    assert summary.rows == 3 and FeatureStore.open(tmp_path / "test.zarr").splits() == ["test"]
    with pytest.raises(ConfigError, match="--splits names dev"):
        featurize(shards, tmp_path / "x.zarr", FeaturizeOptions(device="cpu", image=None, splits=("dev",)))


def test_image_tokens_are_stored_with_image_tokens(shards, tmp_path):
    featurize(shards, tmp_path / "tokens.zarr", FeaturizeOptions(device="cpu", image=SMALL_ENCODER, image_tokens=True,
                                                                  audio=None, splits=("val",)))
    part = FeatureStore.open(tmp_path / "tokens.zarr").read_shard("val-000000.tar", image_tokens=True)
    assert part.image_tokens.shape == (3, 49, 384) and part.image.shape == (3, 384)


def test_a_local_weights_file_is_loaded(shards, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = open_clip.create_model("ViT-S-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    summary = featurize(shards, tmp_path / "w.zarr", FeaturizeOptions(
        device="cpu", image=f"{SMALL_ENCODER}:{tmp_path / 'w.safetensors'}", audio=None, text=None, splits=("val",)))
    assert not summary.random_init and summary.config["image"]["weights_sha256"]
    blob = next(iter_samples(shards / "val-000000.tar"))[1]["jpg"]
    from trimodal.features.image import parse_encoder
    from trimodal.features.open_clip_image import OpenClipImageEncoder

    encoder = OpenClipImageEncoder(parse_encoder(f"{SMALL_ENCODER}:{tmp_path / 'w.safetensors'}"), torch.device("cpu"))
    stored = FeatureStore.open(tmp_path / "w.zarr").read_shard("val-000000.tar").image[0]
    assert np.allclose(stored, encoder([blob])[0][0], atol=1e-2)


def test_a_weights_file_that_does_not_exist_is_an_error(shards, tmp_path):
    with pytest.raises(ConfigError, match="weights file .*missing.safetensors does not exist"):
        featurize(shards, tmp_path / "x.zarr", FeaturizeOptions(device="cpu", image=f"{SMALL_ENCODER}:{tmp_path}/missing.safetensors"))


@pytest.mark.parametrize("spec, message", [("clip:ViT-B-32", "is not open_clip"), ("open_clip:NoSuchNet", "unknown open_clip model")])
def test_bad_encoder_names_are_errors(shards, tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        featurize(shards, tmp_path / "x.zarr", FeaturizeOptions(device="cpu", image=spec))
