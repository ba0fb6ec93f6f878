import pytest
import torch
from torch.utils.data import DataLoader

from trimodal.errors import ConfigError
from trimodal.pipeline.read import shards as stream_module
from trimodal.training.data import TrimodalDataset, load_split, open_sources


def test_batches_carry_padded_tensors_and_masks(mini_shards, mini_features):
    dataset = TrimodalDataset(mini_shards, mini_features, "train", batch_size=16, max_audio_frames=300)
    batch = next(iter(dataset))
    assert batch["image"].shape == (16, 512) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (16, 77) and batch["text"].dtype == torch.long
    frames = batch["audio"].shape[1]
    assert batch["audio"].shape == (16, frames, 80) and batch["audio_mask"].shape == (16, frames) and frames <= 300
    assert batch["audio_mask"].sum(1).max() == frames
    assert all(batch[f"{m}_present"].all() for m in ("image", "text", "audio"))


def test_an_epoch_visits_every_training_image_once(mini_shards, mini_features):
    dataset = TrimodalDataset(mini_shards, mini_features, "train", batch_size=32)
    keys = [key for batch in dataset for key in batch["keys"]]
    assert len(keys) == 200 and len(set(keys)) == 200


def test_the_order_depends_on_seed_and_epoch_only(mini_shards, mini_features):
    def order(seed, epoch):
        return [k for b in TrimodalDataset(mini_shards, mini_features, "train", batch_size=50, seed=seed, epoch=epoch)
                for k in b["keys"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)


def _keys(dataset, workers):
    return [batch["keys"] for batch in DataLoader(dataset, batch_size=None, num_workers=workers)]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_share_each_global_batch_and_together_read_what_one_process_reads(mini_shards, mini_features, workers):
    common = dict(batch_size=50, streams=2, drop_last=True, seed=3, epoch=1)
    alone = _keys(TrimodalDataset(mini_shards, mini_features, "train", **common), workers)
    ranks = [_keys(TrimodalDataset(mini_shards, mini_features, "train", rank=rank, world_size=2, **common), workers)
             for rank in range(2)]
    assert len(alone) == len(ranks[0]) == len(ranks[1]) == 4  # 200 samples // 50
    assert all(len(batch) == 25 for rank in ranks for batch in rank)
    assert [first + second for first, second in zip(*ranks)] == alone  # row for row
    keys = [k for batch in alone for k in batch]
    assert len(set(keys)) == 200


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_an_epoch_continued_from_a_batch_is_the_rest_of_the_epoch(mini_shards, mini_features, monkeypatch, workers):
    """Whatever the loader workers and the batch a resumed epoch starts at; the skipped samples are not read."""
    dataset = TrimodalDataset(mini_shards, mini_features, "train", batch_size=16, drop_last=True, seed=5,
                              shuffle_buffer=40, modalities=["image", "text"])
    dataset.set_epoch(2)
    whole = _keys(dataset, workers)
    assert len(whole) == 12
    read = []
    original = TrimodalDataset._load
    monkeypatch.setattr(TrimodalDataset, "_load", lambda self, piece, *a: read.append(piece) or original(self, piece, *a))
    for start in (1, 5, 11, 12):
        dataset.set_epoch(2, start)
        assert _keys(dataset, workers) == whole[start:], start
    if workers == 0:  # loaded in this process: nothing is read for an epoch continued from its end
        read.clear()
        dataset.set_epoch(2, 12)
        assert _keys(dataset, 0) == [] and read == []


def test_the_epoch_length_comes_from_the_index_whatever_the_shards(tmp_path, mini_root):
    from trimodal.features.featurize import FeaturizeOptions, featurize
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset

    shards = tmp_path / "shards"
    shard_dataset("mini", mini_root, shards, ShardOptions(max_samples=70, workers=2))  # train: 70, 70, 60
    store = tmp_path / "f.zarr"
    featurize(shards, store, FeaturizeOptions(device="cpu", image="open_clip:ViT-S-32", audio=None, splits=("train",)))
    for world, workers in ((2, 0), (2, 2), (4, 1)):
        counts = [len(_keys(TrimodalDataset(shards, store, "train", batch_size=24, rank=rank, world_size=world,
                                            drop_last=True, modalities=["image", "text"]), workers))
                  for rank in range(world)]
        assert counts == [200 // 24] * world, (world, workers)
    dataset = TrimodalDataset(shards, store, "train", batch_size=24, drop_last=True, modalities=["image", "text"])
    assert dataset.plan(2).dropped == 200 - 8 * 24


def test_pairs_match_a_caption_with_the_utterance_that_speaks_it(mini_shards, mini_features):
    dataset = TrimodalDataset(mini_shards, mini_features, "val", batch_size=40, shuffle=False)
    picked = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        batch = next(iter(dataset))
        picked |= {(k, int(c)) for k, c in zip(batch["keys"], batch["caption_id"])}
    assert len({caption for _, caption in picked}) == 5  # over epochs every caption number is seen


def test_when_the_store_holds_everything_no_tar_is_read(mini_shards, mini_features, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tar was read")

    monkeypatch.setattr(stream_module, "iter_samples", refuse)
    assert sum(len(b["keys"]) for b in TrimodalDataset(mini_shards, mini_features, "test", batch_size=64)) == 60


def test_what_the_store_lacks_is_read_from_the_tars(mini_shards, tmp_path):
    from trimodal.features.featurize import FeaturizeOptions, featurize

    store = tmp_path / "image-only.zarr"
    featurize(mini_shards, store, FeaturizeOptions(device="cpu", audio=None, text=None, splits=("val",),
                                                   image="open_clip:ViT-S-32"))
    dataset = TrimodalDataset(mini_shards, store, "val", batch_size=8, shuffle=False)
    batch = next(iter(dataset))
    assert batch["text"].shape == (8, 77) and batch["text_present"].all()
    assert batch["audio_mask"].any(1).all() and batch["audio"].shape[2] == 80


def test_load_split_expands_every_caption_and_utterance(mini_shards, mini_features):
    split = load_split(open_sources(mini_shards, mini_features), "test")
    assert len(split.keys) == 60 and split.images.shape == (60, 512)
    assert split.tokens.shape == (300, 77) and len(split.mels) == 300
    assert (split.caption_image == torch.arange(60).repeat_interleave(5).numpy()).all()


def test_unknown_modalities_and_splits_are_errors(mini_shards, mini_features):
    with pytest.raises(ConfigError, match="modalities"):
        TrimodalDataset(mini_shards, mini_features, "train", modalities=["smell"])
    with pytest.raises(ConfigError, match="split 'dev' is not in"):
        TrimodalDataset(mini_shards, mini_features, "dev")


def test_the_dataset_is_exported_at_the_top_level():
    import trimodal

    assert trimodal.TrimodalDataset is TrimodalDataset
