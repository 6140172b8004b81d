"""Mix Transformer (MiT) encoder of SegFormer, B0-B5 (docs/methods.md §2.2).

Parameter names follow the official NVlabs ``mit_b*.pth`` checkpoints
(``patch_embed1.proj``, ``block1.0.attn.q``, ``.attn.kv``, ``.attn.sr``,
``.attn.norm``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.dwconv.dwconv``,
``.mlp.fc2``, ``block1.0.norm1``, ``norm1`` …), so those checkpoints load
without renaming; `sats.models.weights` converts the Hugging Face names.

Efficient self-attention runs through `F.scaled_dot_product_attention` unless
the attention probabilities are requested; then the last block of every stage
computes ``softmax(q kᵀ · d^-½)`` explicitly (softmax in float32) and returns it,
in the autograd graph, with shape ``(B, heads, N, M)``.

``rc_branches=True`` makes every Mix-FFN depth-wise conv an RC module
(`sats.models.reparam.RCConv`, no norm: keys ``mlp.dwconv.dwconv.conv_a`` / ``.conv_b``).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sats.models.reparam import RCConv

MIT_VARIANTS: dict[str, dict[str, list[int]]] = {
    "mit_b0": {"embed_dims": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]},
    "mit_b1": {"embed_dims": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]},
    "mit_b2": {"embed_dims": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "num_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]},
    "mit_b3": {"embed_dims": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "num_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]},
    "mit_b4": {"embed_dims": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "num_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]},
    "mit_b5": {"embed_dims": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "num_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]},
}
PATCH_KERNEL_STRIDE = ((7, 4), (3, 2), (3, 2), (3, 2))
BLOCK_NORM_EPS = 1e-6  # block and stage LayerNorms; patch-embed and SR LayerNorms use the default 1e-5


class EncoderOutput(NamedTuple):
    """What an encoder hands to the segmenter.

    features: 4 maps fed to the decoder, ``(B, C_s, h_s, w_s)``; ``features[-1]`` is the body; also
        ``ModelOutput.features`` (ResNet: activated).
    stages: 4 maps exposed as ``ModelOutput.stages`` (MiT: = features; ResNet: pre-activation).
    attentions: MiT last-block attention per stage ``(B, heads_s, N_s, M_s)``, or None.
    """

    features: list[Tensor]
    stages: list[Tensor]
    attentions: list[Tensor] | None


def tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    """``(B, N=h·w, C)`` -> ``(B, C, h, w)`` as a channels-last view: no copy (convs take either layout)."""
    return x.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def map_to_tokens(x: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h·w, C)``; a view when ``x`` is channels-last, one copy otherwise."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``p`` (train mode only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv (padding k//2) + LayerNorm: ``(B, C_in, H, W) -> (B, h·w, C), h, w``."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(map_to_tokens(x)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention with keys/values from a spatially reduced map (conv k = s = R, then LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x (B, N=h·w, C)`` -> ``(B, N, C)`` and the probabilities ``(B, heads, N, M)`` if requested."""
        batch, tokens, dim = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        reduced = x
        if self.sr_ratio > 1:
            reduced = map_to_tokens(self.sr(tokens_to_map(x, h, w)))
            reduced = self.norm(reduced)
        kv = self.kv(reduced).reshape(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, heads, M, d) each
        probs = None
        if return_attention:
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            probs = scores.float().softmax(dim=-1)
            out = torch.matmul(probs.to(v.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), probs


class DepthwiseConv(nn.Module):
    """3×3 depth-wise conv (or its RC twin) on a token sequence: ``(B, N, C) -> (B, N, C)``."""

    def __init__(self, dim: int, rc_branches: bool = False) -> None:
        super().__init__()

        def conv() -> nn.Conv2d:
            return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

        self.dwconv: nn.Module = RCConv(conv) if rc_branches else conv()

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, h, w)))


class MixFFN(nn.Module):
    """fc1 -> 3×3 depth-wise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, rc_branches: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden, rc_branches)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float,
                 rc_branches: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio, rc_branches)

    def forward(self, x: Tensor, h: int, w: int, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        attn_out, probs = self.attn(self.norm1(x), h, w, return_attention)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x), h, w))
        return x, probs


class MixTransformer(nn.Module):
    """MiT encoder: 4 stages of (overlapping patch embed, blocks, LayerNorm), strides 4/8/16/32.

    Args:
        embed_dims, depths, num_heads, sr_ratios: 4 values each (see `MIT_VARIANTS`).
        mlp_ratio: Mix-FFN hidden ratio.
        drop_path: stochastic depth of the last block; rises linearly from 0 over all blocks.
        in_channels: image channels.
        rc_branches: RC module in place of every Mix-FFN depth-wise conv (module docstring).
    """

    def __init__(
        self,
        embed_dims: list[int],
        depths: list[int],
        num_heads: list[int],
        sr_ratios: list[int],
        mlp_ratio: int = 4,
        drop_path: float = 0.1,
        in_channels: int = 3,
        rc_branches: bool = False,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        for key, value in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads), ("sr_ratios", sr_ratios)):
            if len(value) != 4:
                raise ValueError(f"MixTransformer {key} needs 4 values, got {list(value)}")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.sr_ratios = list(sr_ratios)
        self.out_channels = list(embed_dims)
        total = sum(depths)
        rates = [drop_path * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        first = 0
        previous = in_channels
        for stage, (kernel, stride) in enumerate(PATCH_KERNEL_STRIDE, start=1):
            dim = embed_dims[stage - 1]
            self.add_module(f"patch_embed{stage}", OverlapPatchEmbed(previous, dim, kernel, stride))
            blocks = [
                Block(dim, num_heads[stage - 1], sr_ratios[stage - 1], mlp_ratio, rates[first + i], rc_branches)
                for i in range(depths[stage - 1])
            ]
            self.add_module(f"block{stage}", nn.ModuleList(blocks))
            self.add_module(f"norm{stage}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            first += depths[stage - 1]
            previous = dim
        self.apply(_init_weights)

    def forward(self, x: Tensor, attentions: bool = False) -> EncoderOutput:
        """``x (B, 3, H, W)`` -> stage maps ``(B, C_s, H/2^(s+1), W/2^(s+1))`` and optional attentions."""
        outputs: list[Tensor] = []
        maps: list[Tensor] = []
        for stage in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{stage}")(x)
            blocks = getattr(self, f"block{stage}")
            probs = None
            recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
            for index, block in enumerate(blocks):
                want = attentions and index == len(blocks) - 1
                if recompute:  # activations recomputed in backward, the random streams replayed
                    tokens, probs = checkpoint(block, tokens, h, w, want, use_reentrant=False)
                else:
                    tokens, probs = block(tokens, h, w, want)
            tokens = getattr(self, f"norm{stage}")(tokens)
            x = tokens_to_map(tokens, h, w)  # the next patch embed reads this channels-last view
            outputs.append(x.contiguous())
            if probs is not None:
                maps.append(probs)
        return EncoderOutput(features=outputs, stages=outputs, attentions=maps if attentions else None)


def _init_weights(module: nn.Module) -> None:
    """Official MiT init: truncated normal(0.02) linears, fan-out normal convs, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_mit(
    variant: str,
    drop_path: float = 0.1,
    mlp_ratio: int = 4,
    arch: dict[str, list[int]] | None = None,
) -> MixTransformer:
    """MiT of a named variant (``mit_b0`` … ``mit_b5``) or, with ``arch``, a custom one."""
    if arch is None:
        if variant not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant {variant!r}; known: {sorted(MIT_VARIANTS)}")
        arch = MIT_VARIANTS[variant]
    return MixTransformer(**arch, mlp_ratio=mlp_ratio, drop_path=drop_path)
