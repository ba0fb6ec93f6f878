"""BabyLM-format data (captions + DINOv2 vectors, no pixels, no audio) trains and evaluates with the models as they are."""

import pytest

from trimodal.features.featurize import FeaturizeOptions, featurize
from trimodal.pipeline.shard import ShardOptions, shard_dataset
from trimodal.pipeline.synthetic_babylm import write_babylm
from trimodal.training.config import shipped_config
from trimodal.training.eval_run import evaluate_run
from trimodal.training.trainer import train


@pytest.mark.slow
def test_mmn_learns_image_text_retrieval_from_imported_vectors(tmp_path):
    write_babylm(tmp_path / "data" / "babylm-mm", cc3m=900, noise=0.5)
    shard_dataset("babylm-mm", tmp_path / "data", tmp_path / "shards", ShardOptions(max_samples=200),
                  source_options={"val_fraction": 0.05, "test_fraction": 0.05})
    featurize(tmp_path / "shards", tmp_path / "f.zarr", FeaturizeOptions(device="cpu", audio=None))
    overrides = ['train.modalities=["image", "text"]', 'train.loss_weights={"image-text" = 1.0}', "train.epochs=4",
                 "train.num_workers=0", "train.warmup_steps=5", "model.layers=1", "model.model_dim=64",
                 "model.latent_dim=64", "model.memory_slots=8", "model.central_slots=8"]
    train(shipped_config("mmn-tiny"), tmp_path / "shards", tmp_path / "f.zarr", tmp_path / "run", overrides=overrides)
    result = evaluate_run(tmp_path / "run", split="test", device="cpu")
    assert set(result["directions"]) == {"image->text", "text->image"}
    for direction, metrics in result["directions"].items():
        assert metrics["R@10"] >= 3 * metrics["chance@10"], (direction, metrics)
