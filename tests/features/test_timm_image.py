"""`--image timm:<model>[:weights]`: DINOv2's normed CLS token (and patch tokens) into the store."""

import copy
import hashlib

import numpy as np
import pytest
import torch

from tests.builders import flickr_shards
from trimodal.errors import ConfigError
from trimodal.features.featurize import FeaturizeOptions, featurize
from trimodal.features.image import EncoderSpec, make_image_extractor
from trimodal.features.store import FeatureStore
from trimodal.features.timm_image import TimmImageEncoder
from trimodal.pipeline.read.shards import iter_samples

DINO = "vit_small_patch14_dinov2"  # the base model's small sibling: same code, a quarter of the time
WIDTH = 384


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return flickr_shards(tmp_path_factory.mktemp("timm"), train=4, val=2, test=2, wav_seconds=0.1, max_samples=4)


@pytest.fixture(scope="module")
def val_jpegs(shards):
    return [members["jpg"] for _, members in iter_samples(shards / "val-000000.tar")]


@pytest.fixture(scope="module")
def tower():
    return TimmImageEncoder(EncoderSpec("timm", DINO), torch.device("cpu"), tokens=True)


def featurize_val(shards, path, image: str, **options):
    summary = featurize(shards, path, FeaturizeOptions(device="cpu", image=image, audio=None, text=None,
                                                       splits=("val",), **options))
    return summary, FeatureStore.open(path).read_shard("val-000000.tar", image_tokens=True)


def test_dinov2_stores_the_normed_cls_token_and_patch_tokens(shards, tmp_path, tower, val_jpegs):
    summary, part = featurize_val(shards, tmp_path / "dino.zarr", f"timm:{DINO}", image_tokens=True)
    assert summary.random_init and summary.config["image"]["family"] == "timm"
    assert summary.config["image"]["random_init"] is True and summary.config["image"]["img_size"] == 224
    assert part.image.shape == (2, WIDTH) and part.image_tokens.shape == (2, 16 * 16, WIDTH)
    # `tower` was built apart from featurize's: equal outputs also say the random init is seeded.
    with torch.inference_mode():
        hidden = tower.model.forward_features(tower.pixels(val_jpegs))  # final LayerNorm applied
    assert np.allclose(part.image, hidden[:, 0].numpy(), atol=2e-2)  # float16 in the store
    assert np.allclose(part.image_tokens, hidden[:, 1:].numpy(), atol=2e-2)
    # LayerNorm at init (weight 1, bias 0): each stored vector has mean 0 and standard deviation 1.
    assert np.allclose(part.image.mean(axis=1), 0, atol=1e-2) and np.allclose(part.image.std(axis=1), 1, atol=1e-2)


def test_dinov2_preprocessing_is_hugging_faces(tower):
    preprocess = tower.device_preprocess
    assert (preprocess.resize, preprocess.crop, preprocess.interpolation) == (256, (224, 224), "bicubic")
    assert preprocess.mean == (0.485, 0.456, 0.406) and preprocess.std == (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def trained(tower, tmp_path_factory):
    """`tower` with its weights moved off the seeded init, and those weights saved as safetensors."""
    from safetensors.torch import save_file

    source = copy.deepcopy(tower)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for parameter in source.model.parameters():
            parameter.data.add_(0.01 * torch.randn_like(parameter))
    weights = tmp_path_factory.mktemp("weights") / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(weights))
    return source, weights


def test_a_weights_file_of_the_tower_loads_and_gives_identical_output(trained, val_jpegs):
    source, weights = trained
    loaded = make_image_extractor(f"timm:{DINO}:{weights}", torch.device("cpu"))
    assert not loaded.random_init and loaded.attrs()["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert np.array_equal(loaded(val_jpegs)[0], source(val_jpegs)[0])


def test_a_518_pixel_checkpoint_has_its_position_embeddings_resampled(tmp_path, val_jpegs):
    import timm

    original = timm.create_model(DINO, pretrained=False, num_classes=0)  # DINOv2's own 37x37 grid
    assert original.pos_embed.shape[1] == 1 + 37 * 37
    weights = tmp_path / "dino518.pth"
    torch.save(original.state_dict(), weights)
    loaded = TimmImageEncoder(EncoderSpec("timm", DINO, str(weights)), torch.device("cpu"))
    assert loaded.model.pos_embed.shape[1] == 1 + 16 * 16
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)


def test_weights_of_another_model_are_a_clear_error(tmp_path, trained):
    clip = tmp_path / "clip.pt"  # names of a CLIP checkpoint, none of the ViT's
    torch.save({"text_projection": torch.zeros(4, 4), "logit_scale": torch.zeros(())}, clip)
    with pytest.raises(ConfigError, match=rf"{clip} does not hold the weights of timm model {DINO} \(\d+ missing"):
        TimmImageEncoder(EncoderSpec("timm", DINO, str(clip)), torch.device("cpu"))
    narrower = tmp_path / "narrower.pt"  # the right names, one tensor of the wrong shape
    state = dict(trained[0].model.state_dict())
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:-1]
    torch.save(state, narrower)
    with pytest.raises(ConfigError, match=rf"{narrower} does not hold the weights of timm model {DINO}"):
        TimmImageEncoder(EncoderSpec("timm", DINO, str(narrower)), torch.device("cpu"))


def test_unreadable_or_missing_weights_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=f"cannot read weights file {junk}"):
        TimmImageEncoder(EncoderSpec("timm", DINO, str(junk)), torch.device("cpu"))
    with pytest.raises(ConfigError, match="weights file .*missing.pt does not exist"):
        TimmImageEncoder(EncoderSpec("timm", DINO, str(tmp_path / "missing.pt")), torch.device("cpu"))


@pytest.mark.parametrize("spec, message", [("timm:no_such_net", "unknown timm model 'no_such_net'"),
                                           ("timm:resnet18", "cannot be built as a 224-pixel ViT"),
                                           ("dino:vit_base", "is not open_clip:")])
def test_bad_timm_names_are_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_image_extractor(spec, torch.device("cpu"))
