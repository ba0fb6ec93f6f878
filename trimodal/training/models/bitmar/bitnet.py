"""BitNet b1.58 (Ma et al. 2024): `BitLinear` and the LLaMA-alike Transformer built from it.

`BitLinear` is the official "Training Tips, Code and FAQ" layer: an RMSNorm inside, per-token absmax
8-bit activations, per-tensor absmean ternary weights {-1, 0, +1}·γ, both through straight-through
estimators, so the latent full-precision weights receive the gradients. Blocks are LLaMA-alike: rotary
positions, SwiGLU, no biases; the block's own pre-norms are the norms inside every BitLinear.
`quantisation_report` says how the ternary weights are spread and what the model weighs packed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TERNARY_BITS = math.log2(3)  # the information in one {-1, 0, +1} weight


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary weights, dequantised: RoundClip(W/γ, -1, 1)·γ with γ = mean|W|."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit activations, dequantised: symmetric in [-128, 127], no zero point."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The {-1, 0, +1} codes of a weight (in its dtype) and its scale γ = mean|W|, rounded as `weight_quant`
    rounds them (W_q = codes·γ)."""
    scale = 1.0 / w.detach().abs().mean().clamp(min=1e-5)
    return (w.detach() * scale).round().clamp(-1, 1), 1.0 / scale


def ternary(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The int8 {-1, 0, +1} codes of a weight and its scale γ (W ≈ codes·γ)."""
    codes, gamma = ternary_codes(w)
    return codes.to(torch.int8), float(gamma)


def quantised_linear(x_norm: torch.Tensor, codes: torch.Tensor, gamma: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """A BitLinear at inference, as BitNet's kernels compute it: the 8-bit integer activations times the ternary
    codes, then scaled by γ/s. The product is a sum of integers, exact in float32 whatever order a kernel sums
    in (|Σ| ≤ 128·in_features < 2²⁴), so torch and onnxruntime agree on it to the bit; the straight-through
    form, (x_int/s)·(codes·γ), is the same up to float rounding."""
    scale = 127.0 / x_norm.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    x_int = (x_norm * scale).round().clamp(-128, 127)
    out = F.linear(x_int, codes.to(x_int.dtype)) * (gamma.to(x_int.dtype) / scale)
    return out if bias is None else out + bias


class BitLinear(nn.Linear):
    """y = x_q·W_qᵀ with x_q = absmax8(RMSNorm(x)) and W_q = absmean-ternary(W), straight-through in training;
    integer activations times ternary codes at inference (`quantised_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = nn.RMSNorm(in_features, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm(x)
        if not self.training:
            return quantised_linear(x_norm, *ternary_codes(self.weight), self.bias)
        x_q = x_norm + (activation_quant(x_norm) - x_norm).detach()
        w_q = self.weight + (weight_quant(self.weight) - self.weight).detach()
        return F.linear(x_q, w_q, self.bias)

    def exported(self) -> TernaryLinear:
        """This layer as an exported graph holds it (`trimodal.export`): ternary codes, not latent weights."""
        return TernaryLinear(self)


class TernaryLinear(nn.Module):
    """A trained BitLinear as an exported graph holds it: its ternary codes as int8 and its scale γ, the
    RMSNorm, and `quantised_linear`; no latent weights. The same numbers as the BitLinear in eval mode."""

    quantises_activations = True  # an activation within float rounding of an 8-bit level may round either way

    def __init__(self, layer: BitLinear):
        super().__init__()
        codes, gamma = ternary_codes(layer.weight)
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("gamma", gamma)
        self.norm, self.bias = layer.norm, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantised_linear(self.norm(x), self.codes, self.gamma, self.bias)


def rotary(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Rotary position embedding (RoFormer) of (B, heads, T, head_dim) queries or keys."""
    half = x.shape[-1] // 2
    frequencies = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * frequencies
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half : 2 * half]
    return torch.cat([first * cos - second * sin, first * sin + second * cos, x[..., 2 * half :]], dim=-1)


class BitAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv, self.out = BitLinear(dim, 3 * dim), BitLinear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q), rotary(k)
        attend = None
        if mask is not None:  # (B, T) valid keys, combined with the causal triangle
            attend = mask[:, None, None, :]
            if causal:
                attend = attend & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, is_causal=causal and attend is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(batch, length, dim))


class BitFeedForward(nn.Module):
    """SwiGLU: W_down(SiLU(W_gate·x) ⊙ W_up·x), every matrix a BitLinear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up, self.down = BitLinear(dim, 2 * hidden), BitLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class BitBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.attention = BitAttention(dim, heads, dropout)
        self.feed_forward = BitFeedForward(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        x = x + self.drop(self.attention(x, mask, causal))
        return x + self.drop(self.feed_forward(x))


class BitTransformer(nn.Module):
    """A stack of BitNet blocks and a final RMSNorm; `causal` for the decoder."""

    def __init__(self, dim: int, heads: int, layers: int, *, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 causal: bool = False):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(BitBlock(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: (B, T) True where a position is a real token (keys elsewhere are not attended)."""
        for block in self.blocks:
            x = block(x, mask, self.causal)
        return self.norm(x)


def quantisation_report(model: nn.Module) -> dict:
    """Per BitLinear: its shares of -1/0/+1 weights; for the model: bytes at fp16 and packed, with the
    ternary weights at log2(3) bits (plus one fp16 scale per layer) and every other tensor at fp16."""
    layers, ternary_weights, ternary_bytes = {}, 0, 0.0
    quantised = set()
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            codes, _ = ternary(module.weight)
            count = codes.numel()
            layers[name] = {"weights": count, **{label: float((codes == value).sum()) / count
                                                  for label, value in (("-1", -1), ("0", 0), ("+1", 1))}}
            ternary_weights += count
            ternary_bytes += count * TERNARY_BITS / 8 + 2
            quantised.add(f"{name}.weight")
    other = sum(t.numel() for n, t in model.state_dict().items() if n not in quantised and t.is_floating_point())
    fp16_bytes = 2 * (ternary_weights + other)
    packed_bytes = ternary_bytes + 2 * other
    return {"layers": layers, "ternary_weights": ternary_weights, "full_precision_values": other,
            "fp16_bytes": int(fp16_bytes), "packed_bytes": int(math.ceil(packed_bytes)),
            "packed_ternary_bytes": int(math.ceil(ternary_bytes)),
            "compression": fp16_bytes / packed_bytes if packed_bytes else 1.0}
