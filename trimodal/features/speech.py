"""Speech tower features: frame states of torchaudio's wav2vec 2.0 / HuBERT / WavLM after a chosen layer.

`--audio torchaudio:HUBERT_BASE[:<weights file>|:pretrained][:layer=N]` (also WAV2VEC2_BASE, WAVLM_BASE)
stores, per utterance, the encoder's states after layer N (default: the last) as `audio/frames`, ragged
like the mels, 50 frames a second. Without weights the tower is randomly initialised from the fixed seed
(with a notice); a local file is a state dict of torchaudio's model (what `bundle.get_model()` holds);
`pretrained` fetches the bundle's weights through torchaudio (needs the network). Waveforms are resampled
to 16 kHz; each utterance runs alone through the convolutional front end (its GroupNorm spans the whole
input, so padding would change it) and the layers, so an utterance's frames never depend on its batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio

from trimodal.errors import ConfigError
from trimodal.features.audio import waveform_on
from trimodal.features.image import RANDOM_INIT_SEED, EncoderSpec, file_sha256, load_state_dict, parse_encoder, seeded
from trimodal.features.towers import SpeechCut

# torchaudio bundle -> the factory of the same architecture (base models: no waveform normalisation).
SPEECH_TOWERS = {"HUBERT_BASE": "hubert_base", "WAV2VEC2_BASE": "wav2vec2_base", "WAVLM_BASE": "wavlm_base"}
SAMPLE_RATE = 16_000
FRAME_RATE = 50  # the convolutional front end's stride is 320 samples


def build_speech_model(spec: EncoderSpec) -> tuple[torch.nn.Module, str | None]:
    """The torchaudio model `spec` names, with its weights, and the sha256 of a weights file."""
    if spec.model not in SPEECH_TOWERS:
        raise ConfigError(f"unknown speech tower {spec.model!r}; known: {', '.join(SPEECH_TOWERS)}")
    factory = getattr(torchaudio.models, SPEECH_TOWERS[spec.model])
    if spec.weights is None:
        return seeded(factory), None
    if spec.weights == "pretrained":
        try:
            return getattr(torchaudio.pipelines, spec.model).get_model(), None
        except Exception as error:  # download failures come in many types
            raise ConfigError(f"cannot fetch the pretrained weights of {spec.model}: {error}; with no network, "
                              "pass a local weights file instead") from error
    path = Path(spec.weights).expanduser()
    state = load_state_dict(path)
    model = factory()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise ConfigError(f"{path} does not hold the weights of torchaudio's {spec.model}: "
                          f"{str(error).splitlines()[0]}") from error
    return model, file_sha256(path)


class SpeechTowerExtractor:
    """Waveforms -> (frames, width) states after layer `layer` of a torchaudio speech tower."""

    def __init__(self, spec: EncoderSpec, device: torch.device):
        model, self.weights_sha256 = build_speech_model(spec)
        self.spec, self.device = spec, torch.device(device)
        self.cut = SpeechCut(model.eval()).eval().to(self.device)
        self.layer = self.cut.depth if spec.layer is None else spec.layer
        if self.layer > self.cut.depth:
            raise ConfigError(f"--audio {spec}: the tower has {self.cut.depth} layers, so layer must be 0..{self.cut.depth}")
        self.frame_dim = self.cut.width

    @property
    def random_init(self) -> bool:
        return self.spec.weights is None

    def attrs(self) -> dict:
        return {"encoder": str(self.spec), "family": "torchaudio", "model": self.spec.model,
                "weights": self.spec.weights, "weights_sha256": self.weights_sha256, "random_init": self.random_init,
                "random_init_seed": RANDOM_INIT_SEED if self.random_init else None, "layer": self.layer,
                "depth": self.cut.depth, "frame_dim": self.frame_dim, "sample_rate": SAMPLE_RATE,
                "frame_rate": FRAME_RATE, "torchaudio": torchaudio.__version__,
                "frames_are": f"encoder states after layer {self.layer} of {self.cut.depth}"}

    def resample(self, samples: np.ndarray, rate: int) -> torch.Tensor:
        return waveform_on(samples, rate, SAMPLE_RATE, self.device)

    @torch.inference_mode()
    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """States (frames, width) of one utterance (shorter than the front end's 400-sample window: one frame
        of zero-padded input)."""
        if len(waveform) < 400:
            waveform = torch.nn.functional.pad(waveform, (0, 400 - len(waveform)))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            states, mask = self.cut.embed(waveform.to(self.device))
            states = self.cut.run_blocks(states, mask, 0, self.layer)
        return states[0].float()

    def batched(self, waveforms: list[torch.Tensor], batch_size: int = 32, on_batch=None,
                dtype: torch.dtype = torch.float32) -> list[np.ndarray]:
        out = []
        for number, waveform in enumerate(waveforms):
            out.append(self.frames(waveform).to(dtype).cpu().numpy())
            if on_batch and ((number + 1) % batch_size == 0 or number + 1 == len(waveforms)):
                on_batch((number % batch_size) + 1)
        return out


def make_speech_extractor(spec: str, device: torch.device) -> SpeechTowerExtractor:
    try:
        encoder = parse_encoder(spec, ("torchaudio",))
    except ConfigError:
        raise ConfigError(f"--audio {spec!r} is not mel80, none or torchaudio:<{'|'.join(SPEECH_TOWERS)}>"
                          "[:<weights file>|:pretrained][:layer=N]") from None
    return SpeechTowerExtractor(encoder, device)
