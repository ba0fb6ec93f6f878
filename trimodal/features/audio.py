"""Speech features: wav bytes decoded with soundfile, resampled when needed, log-mel spectrograms.

The mel front-end is torchaudio's `MelSpectrogram` with `center=False` (every frame lies inside the
signal, as Kaldi's `snip_edges`), so a batch padded with zeros gives each utterance exactly the frames
it gives alone. Resampling, padding and the transform all run on the extractor's device.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import soundfile
import torch
import torchaudio
from torch.nn.utils.rnn import pad_sequence

from trimodal.errors import TrimodalError


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16_000
    n_fft: int = 400  # 25 ms window
    hop_length: int = 160  # 10 ms hop
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0
    power: float = 2.0
    mel_scale: str = "htk"
    window: str = "hann"
    log_offset: float = 1e-6
    center: bool = False

    @property
    def name(self) -> str:
        return f"mel{self.n_mels}"

    def attrs(self) -> dict:
        return {"extractor": "torchaudio.transforms.MelSpectrogram", "name": self.name, **asdict(self),
                "log": f"ln(power + {self.log_offset})", "torchaudio": torchaudio.__version__}

    def frames(self, samples: int) -> int:
        """Frames of an utterance of `samples` samples (short ones are zero-padded to one window)."""
        return 1 + (max(samples, self.n_fft) - self.n_fft) // self.hop_length


AUDIO_FEATURES = {"mel80": MelConfig()}


def mel_config(name: str) -> MelConfig:
    if name not in AUDIO_FEATURES:
        raise TrimodalError(f"unknown audio feature {name!r}; known: {', '.join(AUDIO_FEATURES)}, "
                            "torchaudio:<HUBERT_BASE|WAV2VEC2_BASE|WAVLM_BASE>[:<weights>][:layer=N]")
    return AUDIO_FEATURES[name]


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of wav (or flac) bytes."""
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise TrimodalError(f"cannot decode audio: {error}") from error
    return samples.mean(axis=1), rate


def waveform_on(samples: np.ndarray, rate: int, target_rate: int, device: torch.device) -> torch.Tensor:
    """Mono samples as a float32 tensor on `device`, resampled there to `target_rate` when needed."""
    waveform = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(device)
    if rate != target_rate:
        waveform = torchaudio.functional.resample(waveform, rate, target_rate)
    return waveform


class MelExtractor:
    """Log-mel spectrograms of many utterances at once, on CPU or GPU."""

    def __init__(self, config: MelConfig = MelConfig(), device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self._transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, win_length=config.n_fft,
            hop_length=config.hop_length, f_min=config.f_min, f_max=config.f_max, n_mels=config.n_mels,
            power=config.power, center=config.center, mel_scale=config.mel_scale, norm=None,
        ).to(self.device)

    @property
    def frame_dim(self) -> int:
        return self.config.n_mels

    random_init = False

    def attrs(self) -> dict:
        return self.config.attrs()

    def resample(self, samples: np.ndarray, rate: int) -> torch.Tensor:
        """The waveform on the extractor's device, at the configured rate (resampled there)."""
        return waveform_on(samples, rate, self.config.sample_rate, self.device)

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
        """(frames, n_mels) log-mels, one per waveform (already at the configured rate).

        Padding happens on the device; `dtype` (e.g. float16 for the store) is applied there too, so
        only that many bytes come back.
        """
        if not waveforms:
            return []
        lengths = [max(len(w), self.config.n_fft) for w in waveforms]
        batch = pad_sequence([w.to(self.device) for w in waveforms], batch_first=True)
        if batch.shape[1] < max(lengths):  # every utterance shorter than one window
            batch = torch.nn.functional.pad(batch, (0, max(lengths) - batch.shape[1]))
        power = self._transform(batch)  # (batch, n_mels, frames)
        logmel = torch.log(power + self.config.log_offset).transpose(1, 2).to(dtype).cpu().numpy()
        return [logmel[row, : self.config.frames(length)] for row, length in enumerate(lengths)]

    def batched(self, waveforms: list[torch.Tensor], batch_size: int = 32, on_batch=None,
                dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
        """Log-mels of many waveforms, batching utterances of similar length together."""
        order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
        features: list[np.ndarray | None] = [None] * len(waveforms)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for index, mel in zip(chunk, self([waveforms[i] for i in chunk], dtype)):
                features[index] = mel
            if on_batch:
                on_batch(len(chunk))
        return features

    def from_bytes(self, blobs: list[bytes], batch_size: int = 32) -> list[np.ndarray]:
        """Decode, resample and featurise wav bytes."""
        return self.batched([self.resample(*decode_wav(blob)) for blob in blobs], batch_size)


def make_audio_extractor(spec: str, device: torch.device):
    """The extractor an `--audio` value names: mel80 (log-mels) or torchaudio:<tower>[:<weights>][:layer=N]."""
    if spec.startswith("torchaudio:"):
        from trimodal.features.speech import make_speech_extractor

        return make_speech_extractor(spec, device)
    return MelExtractor(mel_config(spec), device)

