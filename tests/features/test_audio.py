import numpy as np
import pytest
import torch

from tests.builders import make_wav
from trimodal.errors import TrimodalError
from trimodal.features.audio import MelConfig, MelExtractor, decode_wav


def reference_logmel(signal: np.ndarray, config: MelConfig) -> np.ndarray:
    """An independent numpy log-mel: Hann window, |rfft|^2, HTK triangular filters, no normalisation."""
    window = np.hanning(config.n_fft + 1)[:-1]  # periodic Hann, as torch.hann_window
    frames = 1 + (len(signal) - config.n_fft) // config.hop_length
    stacked = np.stack([signal[i * config.hop_length : i * config.hop_length + config.n_fft] * window for i in range(frames)])
    power = np.abs(np.fft.rfft(stacked, axis=1)) ** 2
    hz_to_mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    mel_to_hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = mel_to_hz(np.linspace(hz_to_mel(config.f_min), hz_to_mel(config.f_max), config.n_mels + 2))
    bins = np.linspace(0, config.sample_rate / 2, config.n_fft // 2 + 1)
    filters = np.zeros((config.n_fft // 2 + 1, config.n_mels))
    for m in range(config.n_mels):
        low, centre, high = edges[m : m + 3]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        filters[:, m] = np.maximum(0, np.minimum(rising, falling))
    return np.log(power @ filters + config.log_offset)


def test_mel_of_a_pure_tone_matches_an_independent_reference():
    config = MelConfig()
    t = np.arange(16_000) / 16_000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    ours = MelExtractor(config)([torch.from_numpy(tone)])[0]
    reference = reference_logmel(tone.astype(np.float64), config)
    assert ours.shape == reference.shape == (config.frames(16_000), 80) == (98, 80)
    assert (ours.argmax(axis=1) == reference.argmax(axis=1)).all()
    loud = reference > reference.max() - 20  # compare where there is energy, not the log floor
    assert np.abs(ours - reference)[loud].max() < 0.05


def test_frames_use_a_25ms_window_and_a_10ms_hop():
    config = MelConfig()
    assert (config.n_fft, config.hop_length) == (400, 160)
    assert config.frames(16_000) == 98 and config.frames(100) == 1


def test_batching_gives_each_utterance_exactly_its_own_frames():
    extractor = MelExtractor()
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(rng.normal(size=n).astype(np.float32)) for n in (8000, 16000, 3000)]
    batched = extractor(waves)
    for wave, mel in zip(waves, batched):
        alone = extractor([wave])[0]
        assert mel.shape == alone.shape and np.allclose(mel, alone, atol=1e-4)


def test_other_sample_rates_are_resampled_to_16khz():
    samples, rate = decode_wav(make_wav(1.0, rate=44_100))
    waveform = MelExtractor().resample(samples, rate)
    assert rate == 44_100 and abs(len(waveform) - 16_000) <= 1


def test_undecodable_audio_is_a_clear_error():
    with pytest.raises(TrimodalError, match="cannot decode audio"):
        decode_wav(b"RIFF....WAVEnot audio")
