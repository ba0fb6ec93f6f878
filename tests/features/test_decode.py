"""The device path for images: tensor preprocessing that matches PIL's, nvjpeg routing, PIL fallback, selection."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.builders import make_jpeg
from trimodal.errors import TrimodalError
from trimodal.features.decode import DevicePixels, device_pixels, nvjpeg_decodable
from trimodal.distributed import resolve_device
from trimodal.features.image import EncoderSpec, ImagePreprocess

# torchvision 0.29 deprecates its decoders for torchcodec; decode_jpeg is still what batches nvjpeg.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# Two grey levels after normalisation by the smallest std: nvjpeg aside, the device path is PIL's to the level.
TWO_LEVELS = 2 / 255 / 0.22


def encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def smooth_jpeg(size: tuple[int, int], seed: int) -> bytes:
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([127 + 120 * np.sin(x / (7 + seed) + c) * np.cos(y / (11 + c)) for c in range(3)], -1)
    return encoded(Image.fromarray(pixels.astype(np.uint8)), format="JPEG", quality=85)


# Landscape and portrait, odd margins, fine noise and smooth photos, and one smaller than the crop.
JPEGS = [make_jpeg(1, (500, 375), 70), make_jpeg(2, (375, 500), 70), smooth_jpeg((640, 480), 3),
         smooth_jpeg((333, 517), 4), smooth_jpeg((301, 257), 5), make_jpeg(5, (64, 48))]


@pytest.fixture(scope="module")
def open_clip_tower():
    from trimodal.features.open_clip_image import OpenClipImageEncoder

    return OpenClipImageEncoder(EncoderSpec("open_clip", "ViT-S-32"), torch.device("cpu"))


@pytest.fixture(scope="module")
def timm_tower():
    from trimodal.features.timm_image import TimmImageEncoder

    return TimmImageEncoder(EncoderSpec("timm", "vit_small_patch14_dinov2"), torch.device("cpu"))


@pytest.mark.parametrize("tower", ["open_clip_tower", "timm_tower"])
def test_tensor_preprocessing_matches_the_pil_path(tower, request):
    extractor = request.getfixturevalue(tower)
    pil = extractor.pixels(JPEGS)
    tensor = DevicePixels(extractor.device_preprocess, "cpu")(JPEGS)
    assert tensor.shape == pil.shape == (len(JPEGS), 3, 224, 224) and tensor.dtype == torch.float32
    difference = (tensor - pil).abs()
    assert difference.max() <= TWO_LEVELS and difference.mean() < 1e-3


def test_tensor_preprocessing_gives_the_same_embeddings(open_clip_tower):
    pil, _ = open_clip_tower.encode_pixels(open_clip_tower.pixels(JPEGS[:3]))
    tensor, _ = open_clip_tower.encode_pixels(DevicePixels(open_clip_tower.device_preprocess, "cpu")(JPEGS[:3]))
    assert np.allclose(pil, tensor, atol=2e-2)


def test_the_timm_crop_floors_an_odd_margin_as_hugging_face_does(timm_tower):
    # 301x257 -> 299x256 (resize 256): the width margin 75 is split 37 | 38, torchvision would take 38 | 37.
    assert timm_tower.device_preprocess.crop_offset == "floor"
    image = Image.open(io.BytesIO(JPEGS[4])).convert("RGB").resize((299, 256), Image.BICUBIC)
    expected = torch.from_numpy(np.array(image)[16:240, 37:261]).permute(2, 0, 1).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (timm_tower.device_preprocess.mean, timm_tower.device_preprocess.std))
    assert torch.allclose(timm_tower.pixels([JPEGS[4]])[0], (expected - mean) / std, atol=1e-5)


def test_images_nvjpeg_should_not_see_are_decoded_by_pil(open_clip_tower):
    rgb = Image.open(io.BytesIO(JPEGS[2])).convert("RGB")
    blobs = [encoded(rgb, format="PNG"), encoded(rgb.convert("CMYK"), format="JPEG"), JPEGS[2],
             encoded(rgb, format="JPEG", progressive=True)]
    tensor = DevicePixels(open_clip_tower.device_preprocess, "cpu")(blobs)
    assert (tensor - open_clip_tower.pixels(blobs)).abs().max() <= TWO_LEVELS


@pytest.mark.parametrize("make, decodable", [
    (lambda image: encoded(image, format="JPEG"), True),
    (lambda image: encoded(image, format="JPEG", progressive=True), True),
    (lambda image: encoded(image.convert("L"), format="JPEG"), True),
    (lambda image: encoded(image.convert("CMYK"), format="JPEG"), False),
    (lambda image: encoded(image, format="PNG"), False),
    (lambda image: b"\xff\xd8\xff\xe0not a jpeg at all", False),
])
def test_nvjpeg_gets_8_bit_one_or_three_component_jpegs_only(make, decodable):
    assert nvjpeg_decodable(make(Image.new("RGB", (40, 30), (10, 200, 30)))) is decodable


def test_an_undecodable_image_is_the_same_clear_error_on_the_device_path(open_clip_tower):
    truncated = JPEGS[0][:300]
    with pytest.raises(TrimodalError, match="cannot decode an image"):
        DevicePixels(open_clip_tower.device_preprocess, "cpu")([JPEGS[1], truncated])


def test_a_batch_of_good_jpegs_is_decoded_in_one_call(open_clip_tower, monkeypatch):
    device = DevicePixels(open_clip_tower.device_preprocess, "cpu")
    calls = []
    real = device._decode_one
    monkeypatch.setattr(device, "_decode_one", lambda data: calls.append(1) or real(data))
    images = device.decode([JPEGS[0], JPEGS[1]])
    assert [tuple(i.shape) for i in images] == [(3, 375, 500), (3, 500, 375)] and len(calls) == 1  # the probe only


def test_the_device_path_is_chosen_only_on_cuda(open_clip_tower):
    assert device_pixels(open_clip_tower, torch.device("cpu")) is None
    chosen = device_pixels(open_clip_tower, torch.device("cuda"))  # building it touches no GPU
    assert isinstance(chosen, DevicePixels) and chosen.device.type == "cuda"


def test_auto_resolves_to_cuda_and_so_to_the_device_path_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device("auto")
    tower = SimpleNamespace(needs_pixels=True, device_preprocess=ImagePreprocess(256, (224, 224), (0.5,) * 3, (0.5,) * 3))
    assert device.type == "cuda" and isinstance(device_pixels(tower, device), DevicePixels)


def test_no_device_path_without_pixels_or_a_tensor_form_of_the_preprocessing():
    cuda = torch.device("cuda")
    assert device_pixels(None, cuda) is None
    assert device_pixels(SimpleNamespace(needs_pixels=False), cuda) is None
    assert device_pixels(SimpleNamespace(needs_pixels=True, device_preprocess=None), cuda) is None


def test_featurize_on_cpu_uses_the_pil_path(tmp_path, monkeypatch):
    from tests.builders import build_flickr_tree
    from trimodal.features.featurize import FeaturizeOptions, featurize
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset

    build_flickr_tree(tmp_path / "data", train=4, val=2, test=2, wav_seconds=0.1)
    shard_dataset("flickr8k", tmp_path / "data", tmp_path / "shards", ShardOptions(max_samples=4))

    def refuse(self, blobs):
        raise AssertionError("the device path ran on a CPU")

    monkeypatch.setattr(DevicePixels, "crops", refuse)
    summary = featurize(tmp_path / "shards", tmp_path / "f.zarr", FeaturizeOptions(
        device="cpu", image="open_clip:ViT-S-32", audio=None, text=None, splits=("val",)))
    assert summary.rows == 2 and summary.config["image"]["model"] == "ViT-S-32"
