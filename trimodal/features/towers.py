"""Pretrained towers cut after any block: `stem -> blocks -> head`, for partial caching.

`mm featurize` runs a tower's stem and its first L blocks once and stores the states after block L
(`:layer=L`); a model (`cman`) then runs the remaining blocks and the head itself, with LoRA on them,
from those cached states. Both sides use the same `TowerCut`, so running `top(L)` on the stored states
gives what the whole tower gives (tests check this to float tolerance).

    cut = open_clip_image_cut(visual)         # or open_clip_text_cut(model), speech_cut(wav2vec2)
    states, context = cut.embed(inputs)       # the stem
    states = cut.run_blocks(states, context, 0, L)
    pooled = cut.top(L)(states, context)      # blocks L.. and the head

Contexts: images have none; captions carry their token ids (the causal mask and the end-of-text pooling
come from them); speech carries the frame mask (True where a frame is real).

open_clip blocks keep q, k and v in one `nn.MultiheadAttention.in_proj_weight`, which peft's LoRA cannot
wrap as a `Linear`; `split_attention` replaces each such module by `ProjectedAttention`, the same
computation with `q_proj`, `k_proj`, `v_proj` and `out_proj` as separate `nn.Linear`s (weights copied).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from trimodal.errors import ConfigError


class ProjectedAttention(nn.Module):
    """`nn.MultiheadAttention` (self-attention, batch first) with its projections as separate Linears."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        dim, heads = attention.embed_dim, attention.num_heads
        if not attention.batch_first or attention._qkv_same_embed_dim is False:
            raise ConfigError("only batch-first self-attention with one in_proj can be split")
        self.heads = heads
        weights = attention.in_proj_weight.detach().chunk(3)
        biases = attention.in_proj_bias.detach().chunk(3) if attention.in_proj_bias is not None else (None,) * 3
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            linear = nn.Linear(dim, dim, bias=bias is not None)
            linear.weight.data.copy_(weight)
            if bias is not None:
                linear.bias.data.copy_(bias)
            setattr(self, name, linear)
        self.out_proj = nn.Linear(dim, dim, bias=attention.out_proj.bias is not None)
        self.out_proj.load_state_dict(attention.out_proj.state_dict())

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None):
        batch, length, dim = query.shape
        shape = (batch, length, self.heads, dim // self.heads)
        q, k, v = (projection(query).view(shape).transpose(1, 2)
                   for projection in (self.q_proj, self.k_proj, self.v_proj))
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), None


def split_attention(module: nn.Module) -> nn.Module:
    """Replace every `nn.MultiheadAttention` under `module` by an equivalent `ProjectedAttention`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, ProjectedAttention(child))
        else:
            split_attention(child)
    return module


class TowerCut(nn.Module):
    """A tower as stem, blocks and head. Subclasses implement `embed`, `block` and `head`; the stem's
    modules live in `self.stem` (absent from a `top()`)."""

    blocks: nn.ModuleList

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, inputs):
        raise NotImplementedError

    def run_blocks(self, states: torch.Tensor, context, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks `start` to `stop` (all by default) on `states`."""
        for block in self.blocks[start:stop]:
            states = block(states)
        return states

    def head(self, states: torch.Tensor, context) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, states: torch.Tensor, context=None) -> torch.Tensor:
        """All of this cut's blocks, then the head: the pooled output."""
        return self.head(self.run_blocks(states, context), context)

    def encode(self, inputs) -> torch.Tensor:
        """The whole tower on raw inputs."""
        states, context = self.embed(inputs)
        return self(states, context)

    def top(self, start: int) -> "TowerCut":
        """A copy of blocks `start`.. and the head, without the stem (what a model runs on cached states)."""
        if not 0 <= start <= self.depth:
            raise ConfigError(f"a tower of {self.depth} blocks cannot be cut after block {start}")
        stem, blocks = self.stem, self.blocks
        del self.stem
        self.blocks = nn.ModuleList()
        try:
            top = copy.deepcopy(self)
        finally:
            self.stem, self.blocks = stem, blocks
        top.blocks = copy.deepcopy(nn.ModuleList(list(blocks)[start:]))
        return top


# -- open_clip ------------------------------------------------------------------------------------

class OpenClipImageCut(TowerCut):
    """open_clip's VisionTransformer: patch embedding + class token + positions + ln_pre; resblocks;
    ln_post, class-token (or mean) pooling, projection. States are (B, 1 + patches, width)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise ConfigError(f"{type(visual).__name__} is not a ViT pooled by its class token or mean; "
                              "it cannot be cut into blocks")
        self.stem = visual  # its _embeds runs conv1, the class token, positions, patch dropout and ln_pre
        self.blocks = visual.transformer.resblocks
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.pool_type, self.final_ln_after_pool = visual.pool_type, visual.final_ln_after_pool

    def embed(self, pixels: torch.Tensor):
        return self.stem._embeds(pixels), None

    def head(self, states, context):
        if self.final_ln_after_pool:
            pooled = self.ln_post(_pool_image(states, self.pool_type))
        else:
            pooled = _pool_image(self.ln_post(states), self.pool_type)
        return pooled @ self.proj if self.proj is not None else pooled


def _pool_image(states: torch.Tensor, pool_type: str) -> torch.Tensor:
    if pool_type == "avg":
        return states[:, 1:].mean(dim=1)
    if pool_type == "tok":
        return states[:, 0]
    raise ConfigError(f"open_clip pool_type {pool_type!r} cannot be pooled from cached states")


class OpenClipTextCut(TowerCut):
    """open_clip's text transformer (CLIP's, or a TextTransformer without a class token): token embedding
    + positions; causal resblocks; ln_final, pooling at the end-of-text token (the highest id), projection.

    With the causal mask a position sees only itself and earlier ones, so a batch is cut to its longest
    caption (through its end-of-text token) without changing any output: the stem does that, and states
    past a caption's end-of-text token are never read."""

    def __init__(self, model: nn.Module):
        super().__init__()
        text = getattr(model, "text", model)
        if getattr(text, "cls_emb", None) is not None:
            raise ConfigError("open_clip text towers with a class token (CoCa) cannot be cut into blocks")
        pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if pool_type != "argmax":
            raise ConfigError(f"open_clip text pooling {pool_type!r} is not supported; towers pooled at the "
                              "end-of-text token (argmax) are")
        self.stem = nn.ModuleDict({"token_embedding": text.token_embedding})
        self.positional_embedding = text.positional_embedding
        self.blocks = text.transformer.resblocks
        self.ln_final, self.text_projection = text.ln_final, text.text_projection
        mask = getattr(text, "attn_mask", None)
        self.register_buffer("attn_mask", mask.clone() if mask is not None else None, persistent=False)

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def embed(self, ids: torch.Tensor):
        ids = ids[:, : caption_extent(ids)]
        states = self.stem["token_embedding"](ids) + self.positional_embedding[: ids.shape[1]]
        return states, ids

    def _mask(self, length: int, device) -> torch.Tensor | None:
        return None if self.attn_mask is None else self.attn_mask[:length, :length].to(device)

    def run_blocks(self, states, ids, start=0, stop=None):
        states = states[:, : caption_extent(ids)]
        mask = self._mask(states.shape[1], states.device)
        for block in self.blocks[start:stop]:
            states = block(states, attn_mask=mask)
        return states

    def head(self, states, ids):
        states = self.ln_final(states)
        pooled = states[torch.arange(len(states), device=states.device), ids.argmax(dim=-1)]
        if self.text_projection is None:
            return pooled
        return self.text_projection(pooled) if isinstance(self.text_projection, nn.Linear) else pooled @ self.text_projection


def caption_extent(ids: torch.Tensor) -> int:
    """Positions a batch of open_clip token ids needs: through the latest end-of-text (highest) token. All of
    them while exporting (`exporting`)."""
    if exporting():
        return ids.shape[1]
    return int(ids.argmax(dim=-1).max()) + 1 if len(ids) else 1


def exporting() -> bool:
    """Whether the model is being traced into a graph (`mm export`: torch.export for ONNX). Cutting a batch at
    its last real token only saves work on padding, which every encoder masks (keys) or never reads (causal,
    pooled at the end-of-text token); a graph cannot depend on the data for its shapes, so it reads them all."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


# -- torchaudio wav2vec2 / HuBERT / WavLM ---------------------------------------------------------

class SpeechCut(TowerCut):
    """torchaudio's Wav2Vec2Model (wav2vec 2.0, HuBERT, WavLM): convolutional feature extractor, feature
    projection, convolutional positions; encoder layers; the final LayerNorm (post-LN models) and the
    mean over real frames. States are (B, frames, width), context the frame mask (B, frames).

    The feature extractor's GroupNorm normalises over the whole (padded) input, so `embed` takes one
    utterance at a time; encoder layers see the frame mask as an additive key mask, as torchaudio's own
    encoder builds it (WavLM's layers take it as a key padding mask with the relative position bias of
    the first layer)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.stem = nn.ModuleDict({"feature_extractor": model.feature_extractor,
                                   "feature_projection": model.encoder.feature_projection,
                                   "pos_conv_embed": model.encoder.transformer.pos_conv_embed})
        transformer = model.encoder.transformer
        self.layer_norm_first = transformer.layer_norm_first
        self.pre_norm = transformer.layer_norm if self.layer_norm_first else nn.Identity()
        self.final_norm = nn.Identity() if self.layer_norm_first else transformer.layer_norm
        self.blocks = transformer.layers
        first = transformer.layers[0].attention
        self.wavlm = hasattr(first, "rel_attn_embed")
        # WavLM: the relative position bias every layer uses is computed by the first layer's attention.
        self.bias_source = copy.deepcopy(first) if self.wavlm else None

    @property
    def width(self) -> int:
        return int(self.blocks[0].attention.embed_dim) if len(self.blocks) else int(self.final_norm.normalized_shape[0])

    def embed(self, waveform: torch.Tensor):
        """One utterance (samples,) -> states (1, frames, width) and its mask."""
        features, _ = self.stem["feature_extractor"](waveform.reshape(1, -1), None)
        states = self.stem["feature_projection"](features)
        states = self.pre_norm(states + self.stem["pos_conv_embed"](states))
        return states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)

    def run_blocks(self, states, mask, start=0, stop=None):
        blocks = list(self.blocks)[start:stop]
        if not blocks:
            return states
        if self.wavlm:
            length = states.shape[1]
            bias = self.bias_source.compute_bias(length, length).unsqueeze(0).repeat(len(states), 1, 1, 1)
            padding = torch.zeros(mask.shape, dtype=states.dtype, device=states.device).masked_fill(~mask, float("-inf"))
            for block in blocks:
                states, _ = block(states, None, position_bias=bias, key_padding_mask=padding)
            return states
        additive = (~mask)[:, None, None, :].to(states.dtype) * -10000.0  # as torchaudio's Encoder
        additive = additive.expand(len(states), 1, states.shape[1], states.shape[1])
        for block in blocks:
            states, _ = block(states, additive)
        return states

    def head(self, states, mask):
        return masked_mean(self.final_norm(states), mask)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of (B, T, D) where `mask` (B, T) is True."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# -- timm ViTs (DINOv2) ---------------------------------------------------------------------------

class TimmVitCut(TowerCut):
    """timm's VisionTransformer: patch embedding, prefix tokens + positions, norm_pre; blocks; the final
    norm and class-token pooling (DINOv2's pooler output). States are (B, prefix + patches, width)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "blocks") or getattr(model, "global_pool", "token") != "token":
            raise ConfigError(f"timm model {type(model).__name__} is not a ViT pooled by its class token")
        self.stem = model
        self.blocks = model.blocks
        self.norm = model.norm

    def embed(self, pixels):
        model = self.stem
        states = model._pos_embed(model.patch_embed(pixels))
        return model.norm_pre(model.patch_drop(states)), None

    def head(self, states, context):
        return self.norm(states)[:, 0]
