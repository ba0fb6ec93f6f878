"""featurize's three overlapping stages: shards written in order, and a failure in any stage is one clear error."""

import errno
import random
import time

import numpy as np
import pytest

from tests.builders import flickr_shards
from trimodal.errors import ShardError, TrimodalError
from trimodal.features import featurize as featurize_module
from trimodal.features.audio import MelExtractor
from trimodal.features.featurize import FeaturizeOptions, featurize
from trimodal.features.store import FeatureStore
from trimodal.pipeline.read.shards import iter_samples

pytestmark = pytest.mark.timeout(120)  # a stage that fails must never leave featurize waiting
AUDIO_ONLY = FeaturizeOptions(device="cpu", image=None, text=None, batch_size=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return flickr_shards(tmp_path_factory.mktemp("stages"), train=8, val=2, test=2, wav_seconds=0.3, max_samples=2)


def test_a_slow_writer_still_writes_shards_in_order_with_contiguous_frames(shards, tmp_path, monkeypatch):
    real = FeatureStore.write_shard
    jitter = random.Random(0)

    def slow(self, slot, features):
        time.sleep(jitter.uniform(0, 0.1))
        return real(self, slot, features)

    monkeypatch.setattr(FeatureStore, "write_shard", slow)
    summary = featurize(shards, tmp_path / "f.zarr", AUDIO_ONLY)
    store = FeatureStore.open(tmp_path / "f.zarr")
    slots = list(store.slots.values())
    assert summary.shards_written == [slot.name for slot in slots] and len(slots) == 6
    end = 0
    for slot in slots:
        assert slot.done and slot.frames[0] == end
        end = slot.frames[1]
    assert end == summary.frames == store.group["audio/mel"].shape[0]
    last = slots[-1].name
    part = store.read_shard(last)
    key, members = next(iter_samples(shards / last))
    expected = MelExtractor().from_bytes([members["0.wav"]])[0]
    first = part.mel[part.frame_offsets[0] : part.frame_offsets[1]]
    assert part.keys[0] == key and np.allclose(first, expected, atol=0.02)


def test_a_reader_failure_is_its_own_error_and_the_shards_before_are_kept(shards, tmp_path, monkeypatch):
    real = featurize_module.read_shard

    def broken_third(path, **kw):
        if path.name == "train-000002.tar":
            raise ShardError(f"cannot read shard {path}: unexpected end of data")
        return real(path, **kw)

    monkeypatch.setattr(featurize_module, "read_shard", broken_third)
    with pytest.raises(ShardError, match="cannot read shard .*train-000002.tar: unexpected end of data"):
        featurize(shards, tmp_path / "f.zarr", AUDIO_ONLY)
    done = [slot.name for slot in FeatureStore.open(tmp_path / "f.zarr").slots.values() if slot.done]
    assert done == ["train-000000.tar", "train-000001.tar"]


def test_a_write_failure_on_the_last_shard_is_raised_too(shards, tmp_path, monkeypatch):
    real = FeatureStore.write_shard

    def full_on_last(self, slot, features):
        if slot.name == "test-000000.tar":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, slot, features)

    monkeypatch.setattr(FeatureStore, "write_shard", full_on_last)
    with pytest.raises(TrimodalError, match=r"cannot write test-000000.tar's features into .*f.zarr: No space left"):
        featurize(shards, tmp_path / "f.zarr", AUDIO_ONLY)
    monkeypatch.setattr(FeatureStore, "write_shard", real)
    summary = featurize(shards, tmp_path / "f.zarr", AUDIO_ONLY)
    assert summary.shards_written == ["test-000000.tar"] and len(summary.shards_skipped) == 5


def test_a_compute_failure_keeps_every_shard_computed_before_it(shards, tmp_path, monkeypatch):
    real = featurize_module._featurize_shard

    def fail_fourth(shard, *args, **kwargs):
        if shard.path.name == "train-000003.tar":
            raise TrimodalError("cannot decode audio: broken")
        return real(shard, *args, **kwargs)

    monkeypatch.setattr(featurize_module, "_featurize_shard", fail_fourth)
    with pytest.raises(TrimodalError, match="cannot decode audio: broken"):
        featurize(shards, tmp_path / "f.zarr", AUDIO_ONLY)
    done = [slot.name for slot in FeatureStore.open(tmp_path / "f.zarr").slots.values() if slot.done]
    assert done == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_stop_after_writes_exactly_that_many_shards_and_reads_no_further(shards, tmp_path, monkeypatch):
    real = featurize_module.read_shard
    read = []
    monkeypatch.setattr(featurize_module, "read_shard", lambda path, **kw: read.append(path.name) or real(path, **kw))
    summary = featurize(shards, tmp_path / "f.zarr", AUDIO_ONLY, stop_after=2)
    assert summary.shards_written == ["train-000000.tar", "train-000001.tar"] and len(read) == 2
