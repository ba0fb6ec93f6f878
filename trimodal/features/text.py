"""Text features: open_clip tokenizer ids (context 77) for every caption."""

from __future__ import annotations

import numpy as np

from trimodal.errors import ConfigError
from trimodal.features.image import parse_encoder


class OpenClipTokenizer:
    """`open_clip:<model>` -> that model's tokenizer; captions -> (N, context) int32 ids, 0-padded."""

    def __init__(self, spec: str):
        import open_clip

        encoder = parse_encoder(spec)
        if encoder.model not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {encoder.model!r} for --text")
        self.spec = f"open_clip:{encoder.model}"
        self._tokenizer = open_clip.get_tokenizer(encoder.model)
        self.context_length = int(self._tokenizer.context_length)
        self.vocab_size = int(getattr(self._tokenizer, "vocab_size", 49408))

    def attrs(self) -> dict:
        return {"tokenizer": self.spec, "context_length": self.context_length, "vocab_size": self.vocab_size,
                "class": type(self._tokenizer).__name__, "padding": 0}

    def __call__(self, captions: list[str]) -> np.ndarray:
        if not captions:
            return np.zeros((0, self.context_length), dtype=np.int32)
        return self._tokenizer(captions).numpy().astype(np.int32)
