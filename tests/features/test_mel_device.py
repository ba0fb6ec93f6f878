"""Log-mels on the extractor's device: resampling, padding and the transform run there, float16 comes back."""

import numpy as np
import pytest
import torch

from trimodal.features.audio import MelExtractor


def test_resampling_and_padding_happen_on_the_extractors_device():
    # The meta device stands in for CUDA: it holds no data, but every tensor says where it was made.
    extractor = MelExtractor(device="meta")
    long = extractor.resample(np.zeros(44_100, np.float32), 44_100)
    short = extractor.resample(np.zeros(300, np.float32), 16_000)
    assert long.device.type == short.device.type == "meta" and long.shape == (16_000,)
    seen = []
    transform = extractor._transform
    extractor._transform = lambda batch: seen.append(batch) or transform(batch)
    with pytest.raises(NotImplementedError):  # copying the result back is where meta stops
        extractor([long, short])
    assert seen[0].device.type == "meta" and seen[0].shape == (2, 16_000)


def test_float16_log_mels_are_the_float32_ones_rounded():
    extractor = MelExtractor()
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(rng.normal(size=n).astype(np.float32)) for n in (4000, 300, 9000)]
    full = extractor.batched(waves, batch_size=2)
    half = extractor.batched(waves, batch_size=2, dtype=torch.float16)
    for a, b in zip(full, half):
        assert b.dtype == np.float16 and np.array_equal(a.astype(np.float16), b)


def test_utterances_shorter_than_one_window_give_one_frame():
    extractor = MelExtractor()
    mels = extractor([torch.zeros(100), torch.zeros(399)])
    assert [m.shape for m in mels] == [(1, 80), (1, 80)]
