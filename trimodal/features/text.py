"""Text features: open_clip tokenizer ids (context 77) for every caption, and optionally an open_clip text
tower's per-caption embedding and its token states after a block (partial caching).

`--text auto` (the default) stores the ids of ViT-B-32's tokenizer, what models with their own text
encoders read. `--text open_clip:<model>[:<weights>][:layer=L]` stores that model's ids and its text
tower's pooled embedding; with `--text-tokens`, the states after block L as well (`(C, context, width)`,
zero past each caption's end-of-text token: causal attention never reads them).
"""

from __future__ import annotations

import numpy as np
import torch

from trimodal.errors import ConfigError
from trimodal.features.image import RANDOM_INIT_SEED, EncoderSpec, parse_encoder
from trimodal.features.towers import OpenClipTextCut

DEFAULT_TOKENIZER = "open_clip:ViT-B-32"


class OpenClipTokenizer:
    """`open_clip:<model>` -> that model's tokenizer; captions -> (N, context) int32 ids, 0-padded."""

    def __init__(self, spec: str):
        import open_clip

        encoder = parse_encoder(spec, ("open_clip",))
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

    def special_ids(self) -> tuple[int, int]:
        """(start-of-text, end-of-text) ids, what a caption decoder starts from and stops at."""
        start, end = getattr(self._tokenizer, "sot_token_id", None), getattr(self._tokenizer, "eot_token_id", None)
        if start is None or end is None or not hasattr(self._tokenizer, "decode"):
            raise ConfigError(f"captions cannot be generated with the tokenizer {self.spec} "
                              f"({type(self._tokenizer).__name__} has no start/end-of-text ids or decode)")
        return int(start), int(end)

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text, without padding and start/end-of-text."""
        special = {0, *self.special_ids()}
        return self._tokenizer.decode([i for i in ids if i not in special]).strip()


class OpenClipTextTower:
    """Token ids (C, context) -> pooled embeddings (C, D) and, with `tokens`, the states after block `layer`."""

    def __init__(self, spec: EncoderSpec, device: torch.device, *, tokens: bool = False):
        from trimodal.features.open_clip_image import create_open_clip

        model, self.weights_sha256 = create_open_clip(spec, "text", "text")
        self.spec, self.device, self.tokens = spec, device, tokens
        self.cut = OpenClipTextCut(model).eval().to(device)
        del model  # the image tower is not needed
        self.layer = self.cut.depth if spec.layer is None else spec.layer
        if spec.layer is not None and not tokens:
            raise ConfigError(f"--text {spec}: layer={spec.layer} says where the token states are taken; "
                              "add --text-tokens")
        if self.layer > self.cut.depth:
            raise ConfigError(f"--text {spec}: the tower has {self.cut.depth} blocks, so layer must be 0..{self.cut.depth}")
        self.width = int(self.cut.positional_embedding.shape[1])
        with torch.inference_mode():
            probe = self.cut.encode(torch.tensor([[1, 2]], device=device))
        self.embed_dim = int(probe.shape[-1])

    @property
    def random_init(self) -> bool:
        return self.spec.weights is None

    def attrs(self) -> dict:
        return {"encoder": str(self.spec), "family": self.spec.family, "model": self.spec.model,
                "weights": self.spec.weights, "weights_sha256": self.weights_sha256, "random_init": self.random_init,
                "random_init_seed": RANDOM_INIT_SEED if self.random_init else None, "embed_dim": self.embed_dim,
                "tokens": self.tokens, "layer": self.layer if self.tokens else None, "depth": self.cut.depth,
                "width": self.width, "pooling": "the end-of-text token after ln_final, projected"}

    def token_shape(self) -> list[int]:
        return [self.cut.context_length, self.width]

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        pooled, states = [], []
        for start in range(0, len(ids), batch_size):
            batch = torch.from_numpy(ids[start : start + batch_size].astype(np.int64)).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                hidden, context = self.cut.embed(batch)
                hidden = self.cut.run_blocks(hidden, context, 0, self.layer)
                if self.tokens:
                    states.append(_pad_states(hidden.float(), context, self.cut.context_length))
                hidden = self.cut.run_blocks(hidden, context, self.layer)
                pooled.append(self.cut.head(hidden, context).float().cpu().numpy())
        width = (self.cut.context_length, self.width)
        return (np.concatenate(pooled) if pooled else np.zeros((0, self.embed_dim), np.float32),
                (np.concatenate(states) if states else np.zeros((0, *width), np.float32)) if self.tokens else None)


def _pad_states(states: torch.Tensor, ids: torch.Tensor, context: int) -> np.ndarray:
    """(B, context, W) with every position after a caption's end-of-text token zero."""
    keep = torch.arange(states.shape[1], device=states.device)[None, :] <= ids.argmax(dim=-1)[:, None]
    out = torch.zeros(len(states), context, states.shape[2], device=states.device)
    out[:, : states.shape[1]] = states * keep.unsqueeze(-1)
    return out.cpu().numpy()


def make_text_extractors(spec: str | None, device: torch.device, *, tokens: bool = False):
    """(tokenizer, tower or None) for a `--text` value: auto, none, or open_clip:<model>[:<weights>][:layer=L]."""
    if spec in (None, "none"):
        if tokens:
            raise ConfigError("--text-tokens needs a text tower: --text open_clip:<model>[:<weights>][:layer=L]")
        return None, None
    if spec == "auto":
        if tokens:
            raise ConfigError("--text-tokens needs a text tower: --text open_clip:<model>[:<weights>][:layer=L]")
        return OpenClipTokenizer(DEFAULT_TOKENIZER), None
    try:
        encoder = parse_encoder(spec, ("open_clip",))
    except ConfigError:
        raise ConfigError(f"--text {spec!r} is not auto, none or open_clip:<model>[:<pretrained tag or weights "
                          "file>][:layer=L]") from None
    return OpenClipTokenizer(f"open_clip:{encoder.model}"), OpenClipTextTower(encoder, device, tokens=tokens)

