"""One raw query (a caption, an image file, a recording) through exactly the featurizer a store was made with.

A search query must reach the model as the indexed items did: the same tokenizer, image transform and
tower, resampling and log-mel (or speech tower), and the store's float16 rounding. The featurizer is rebuilt
from the store's own record of it (`store.config`), and its record is compared with the store's before
any query is answered: a featurizer that cannot be rebuilt identically (weights that moved, another
library version) is an error that names the difference, never a silently different query space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trimodal.errors import ConfigError, TrimodalError
from trimodal.features.audio import decode_wav, make_audio_extractor
from trimodal.features.image import make_image_extractor
from trimodal.features.store import config_differences
from trimodal.features.text import OpenClipTokenizer, make_text_extractors


@dataclass
class QueryFeatures:
    """What the store would hold for one query: an image's pooled vector or tokens, a caption's ids (and
    tower features), an utterance's frames; float16-rounded as stored."""

    image: np.ndarray | None = None
    tokens: np.ndarray | None = None
    text_features: np.ndarray | None = None
    frames: np.ndarray | None = None


class QueryFeaturizer:
    """Featurizes queries as `mm featurize` featurized the store whose `config` is given.

    `image_input` / `text_input` are what the model reads ("embedding" or "tokens"; "ids", "embedding" or
    "states"), `text_spec` the tokenizer used when the store holds no caption tokens (read from the tars).
    """

    def __init__(self, config: dict, device: torch.device, *, image_input: str = "embedding",
                 text_input: str = "ids", text_spec: str | None = None):
        self.device = device
        self.image_input, self.text_input = image_input, text_input
        image, text, audio = config.get("image"), config.get("text"), config.get("audio")
        self.image = self.image_why = None
        if image is None:
            self.image_why = "the store holds no image features"
        elif image.get("family") == "precomputed":
            self.image_why = (f"the store's image vectors were precomputed ({image.get('model')}) and no image "
                              "tower is known to make one for a new image")
        else:
            self.image = make_image_extractor(image["encoder"], device, tokens=bool(image.get("tokens")))
            _same(image, self.image.attrs(), "image")
        self.tokenizer = self.text_tower = None
        if text is not None:
            tower = text.get("tower")
            if tower is not None:
                self.tokenizer, self.text_tower = make_text_extractors(tower["encoder"], device,
                                                                       tokens=bool(tower.get("tokens")))
                _same(tower, self.text_tower.attrs(), "text tower")
            else:
                self.tokenizer = OpenClipTokenizer(text["tokenizer"])
            _same({k: v for k, v in text.items() if k != "tower"}, self.tokenizer.attrs(), "tokenizer")
        elif text_spec:
            self.tokenizer = OpenClipTokenizer(text_spec)
        self.audio = None
        if audio is not None:
            self.audio = make_audio_extractor(audio.get("encoder") or audio["name"], device)
            _same(audio, self.audio.attrs(), "audio")

    @property
    def modalities(self) -> list[str]:
        """The query kinds this featurizer can make."""
        return [name for name, ready in (("image", self.image), ("text", self.tokenizer), ("audio", self.audio))
                if ready is not None]

    def image_query(self, data: bytes) -> QueryFeatures:
        if self.image is None:
            raise ConfigError(f"image queries cannot be featurized: {self.image_why}")
        pooled, tokens = self.image.encode_pixels(self.image.pixels([data]))
        value = tokens if self.image_input == "tokens" else pooled
        if value is None:
            raise ConfigError("the model reads image tokens, which the store's image tower does not give")
        return QueryFeatures(image=_as_stored(value[0]))

    def text_query(self, text: str) -> QueryFeatures:
        if self.tokenizer is None:
            raise ConfigError("text queries cannot be featurized: the store has no tokenizer record")
        if not text.strip():
            raise ConfigError("the text query is empty")
        ids = self.tokenizer([text])
        features = None
        if self.text_input in ("embedding", "states"):
            if self.text_tower is None:
                raise ConfigError(f"the model reads the text tower's {self.text_input}, but the store has no tower")
            pooled, states = self.text_tower(ids, 1)
            features = _as_stored((states if self.text_input == "states" else pooled)[0])
        return QueryFeatures(tokens=ids[0], text_features=features)

    def audio_query(self, data: bytes, max_frames: int) -> QueryFeatures:
        """An utterance's frames, its central `max_frames` when longer (as evaluation crops them)."""
        from trimodal.training.data import crop_frames

        if self.audio is None:
            raise ConfigError("audio queries cannot be featurized: the store holds no speech features")
        try:
            waveform = self.audio.resample(*decode_wav(data))
        except TrimodalError:
            raise
        except Exception as error:  # noqa: BLE001 - soundfile's and torchaudio's errors share no base
            raise TrimodalError(f"cannot decode the audio: {error}") from error
        (frames,) = self.audio.batched([waveform], 1, dtype=torch.float16)
        return QueryFeatures(frames=crop_frames(frames, max_frames, None))


def _as_stored(value: np.ndarray) -> np.ndarray:
    """As the store keeps it (float16), read back as the data loader does (float32)."""
    return np.asarray(value, dtype=np.float16).astype(np.float32)


def _same(stored: dict, rebuilt: dict, what: str) -> None:
    differences = config_differences(_plain(stored), _plain(rebuilt))
    if differences:
        raise TrimodalError(f"the {what} the store was featurized with cannot be rebuilt identically here "
                            f"({'; '.join(differences[:4])}); queries would not land in the indexed space")


def _plain(value):
    import json

    return json.loads(json.dumps(value))
