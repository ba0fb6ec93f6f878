"""BabyLM-format data (captions + DINOv2 vectors, no pixels, no audio) trains and evaluates with the models as they are."""

import pytest

from trimodal.training.config import shipped_config
from trimodal.training.eval_run import evaluate_run
from trimodal.training.trainer import train


@pytest.mark.slow
def test_mmn_learns_image_text_retrieval_from_imported_vectors(babylm_sources, tmp_path):
    shards, features = babylm_sources
    overrides = ['train.modalities=["image", "text"]', 'train.loss_weights={"image-text" = 1.0}', "train.epochs=4",
                 "train.num_workers=0", "train.warmup_steps=5", "model.layers=1", "model.model_dim=64",
                 "model.latent_dim=64", "model.memory_slots=8", "model.central_slots=8"]
    train(shipped_config("mmn-tiny"), shards, features, tmp_path / "run", overrides=overrides)
    result = evaluate_run(tmp_path / "run", split="test", device="cpu")
    assert set(result["directions"]) == {"image->text", "text->image"}
    for direction, metrics in result["directions"].items():
        assert metrics["R@10"] >= 3 * metrics["chance@10"], (direction, metrics)
