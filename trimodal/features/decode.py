"""Image bytes to a tower's input on the device: jpgs decoded in batches (nvjpeg on CUDA), then the
extractor's resize, centre crop and normalisation as tensor operations.

The resize reproduces PIL's (what the CPU path uses): two separable antialiased passes, width then
height, each rounded to 8 bits as PIL rounds them, so the result is within one grey level of PIL's. Any
image nvjpeg should not or cannot decode (PNG, CMYK, 12-bit, corrupt) is decoded by PIL instead, and
then preprocessed like the rest.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trimodal.errors import TrimodalError
from trimodal.features.image import ImagePreprocess

# SOF markers of 8-bit Huffman-coded JPEGs (baseline, extended, progressive): what nvjpeg decodes.
_NVJPEG_FRAMES = {0xC0, 0xC1, 0xC2}
_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_INTERPOLATIONS = {"bicubic", "bilinear"}  # PIL's and torch's antialiased filters agree for these


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, "JPEG")
    return buffer.getvalue()


_PROBE_JPEG = _tiny_jpeg()  # decoded once per DevicePixels to learn whether this torchvision has nvjpeg


def device_pixels(extractor, device: torch.device) -> "DevicePixels | None":
    """The device path for `extractor` on `device`: only on CUDA, and only for a tower whose preprocessing
    has a tensor form; None means PIL on CPU threads, as on a CPU-only machine."""
    if device.type != "cuda" or not getattr(extractor, "needs_pixels", False):
        return None
    preprocess = getattr(extractor, "device_preprocess", None)
    if preprocess is None or preprocess.interpolation not in _INTERPOLATIONS:
        return None
    return DevicePixels(preprocess, device)


def nvjpeg_decodable(blob: bytes) -> bool:
    """Whether `blob` is an 8-bit, 1- or 3-component Huffman JPEG (read from its frame header)."""
    if blob[:2] != b"\xff\xd8":
        return False
    at = 2
    while at + 4 <= len(blob):
        if blob[at] != 0xFF:
            return False
        marker = blob[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in _NVJPEG_FRAMES or marker in _OTHER_FRAMES:
            if marker in _OTHER_FRAMES or at + 10 > len(blob):
                return False
            precision, components = blob[at + 4], blob[at + 9]
            return precision == 8 and components in (1, 3)
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return False
        at += 2 + int.from_bytes(blob[at + 2 : at + 4], "big")
    return False


def pil_decode(blob: bytes) -> torch.Tensor:
    """(3, H, W) uint8 RGB, decoded by PIL as the CPU path decodes."""
    try:
        image = Image.open(io.BytesIO(blob)).convert("RGB")
    except OSError as error:
        raise TrimodalError(f"cannot decode an image: {error}") from error
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class DevicePixels:
    """Image bytes -> (N, 3, H, W) float pixels on `device`, as the extractor's CPU preprocessing gives.

    `crops(blobs)` stops at the uint8 centre crops (a quarter of the float size, for holding a shard
    ahead); `normalize(crops)` finishes them. Construction touches no device.
    """

    def __init__(self, preprocess: ImagePreprocess, device: torch.device | str, *, chunk: int = 64):
        self.preprocess, self.device, self.chunk = preprocess, torch.device(device), chunk
        self._nvjpeg: bool | None = None  # unknown until the first decode
        self._stream = None  # CUDA only, made on first use
        self._mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.std).view(1, 3, 1, 1)

    def __call__(self, blobs: list[bytes]) -> torch.Tensor:
        return self.normalize(self.crops(blobs))

    def crops(self, blobs: list[bytes]) -> torch.Tensor:
        """(N, 3, crop) uint8 on the device. On CUDA the work runs on a stream of its own (featurize calls
        this from its reader thread while the tower runs) and is complete when this returns."""
        if self.device.type != "cuda":
            return self._crops(blobs)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            out = self._crops(blobs)
        self._stream.synchronize()
        return out

    @torch.no_grad()
    def _crops(self, blobs: list[bytes]) -> torch.Tensor:
        out = torch.empty(len(blobs), 3, *self.preprocess.crop, dtype=torch.uint8, device=self.device)
        for start in range(0, len(blobs), self.chunk):
            images = self.decode(blobs[start : start + self.chunk])
            # Images of one size are resized together: one kernel per size instead of one per image.
            by_size: dict[tuple[int, int], list[int]] = {}
            for position, image in enumerate(images):
                by_size.setdefault(tuple(image.shape[1:]), []).append(position)
            for positions in by_size.values():
                batch = torch.stack([images[p] for p in positions])
                rows = torch.tensor(positions, device=self.device) + start
                out.index_copy_(0, rows, self.resize_and_crop(batch))
        return out

    @torch.no_grad()
    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.is_cuda:  # made on our stream, read on the caller's: keep the memory until that is done
            crops.record_stream(torch.cuda.current_stream(crops.device))
        pixels = crops.float().div_(255)  # ToTensor
        if self._mean.device != pixels.device:
            self._mean, self._std = self._mean.to(pixels.device), self._std.to(pixels.device)
        return pixels.sub_(self._mean).div_(self._std)

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """(3, H, W) uint8 RGB on the device, one per blob: nvjpeg where it can, PIL for the rest."""
        images: list[torch.Tensor | None] = [None] * len(blobs)
        jpegs = [i for i, blob in enumerate(blobs) if nvjpeg_decodable(blob)] if self._nvjpeg is not False else []
        if jpegs:
            encoded = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]
            for i, image in zip(jpegs, self._decode_jpegs(encoded)):
                images[i] = image
        for i, image in enumerate(images):
            if image is None:
                images[i] = pil_decode(blobs[i]).to(self.device, non_blocking=True)
        return images

    def _decode_jpegs(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if self._nvjpeg is None:
            self._nvjpeg = self._decode_one(torch.frombuffer(bytearray(_PROBE_JPEG), dtype=torch.uint8)) is not None
        if not self._nvjpeg:  # torchvision built without nvjpeg: PIL decodes everything
            return [None] * len(encoded)
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # One bad image fails the whole batch: decode one by one, PIL taking whichever fail again.
            return [self._decode_one(data) for data in encoded]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)[0]
        except RuntimeError:
            return None

    def resize_and_crop(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 of one size -> (N, 3, crop) uint8: shortest edge resized, then centre crop."""
        height, width = images.shape[-2:]
        new_height, new_width = resized_size(height, width, self.preprocess.resize)
        mode = self.preprocess.interpolation
        pixels = images.float()
        # PIL resamples width then height, rounding to 8 bits after each pass; doing the same keeps the
        # result within one grey level of PIL's (a single float pass differs by up to ~6 on fine texture).
        if new_width != width:
            pixels = _resample(pixels, (height, new_width), mode)
        if new_height != height:
            pixels = _resample(pixels, (new_height, new_width), mode)
        top, left = crop_origin((new_height, new_width), self.preprocess.crop, self.preprocess.crop_offset)
        crop_height, crop_width = self.preprocess.crop
        return pixels[:, :, top : top + crop_height, left : left + crop_width].to(torch.uint8)


def _resample(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(pixels, size=size, mode=mode, align_corners=False, antialias=True).round_().clamp_(0, 255)


def resized_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) with the shortest edge at `shortest`, the other truncated as torchvision and HF do."""
    if width <= height:
        return int(shortest * height / width), shortest
    return shortest, int(shortest * width / height)


def crop_origin(size: tuple[int, int], crop: tuple[int, int], offset: str) -> tuple[int, int]:
    """(top, left) of a centre crop: torchvision rounds half the margin, HF floors it."""
    if offset == "floor":
        return (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    return int(round((size[0] - crop[0]) / 2.0)), int(round((size[1] - crop[1]) / 2.0))
