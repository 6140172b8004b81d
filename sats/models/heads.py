"""Decoders: reference simplified SegFormer head, official SegFormer head, DeepLabV3 ASPP (MiB/PLOP and
torchvision flavours).

Every head maps the 4 encoder feature maps ``[(B, C_s, h_s, w_s)]`` to one
``(B, D, h, w)`` feature, the input of the incremental classifier, and exposes
``out_channels = D``. With ``rc_branches=True`` (RCIL, docs/methods.md §2.7) the fuse conv (``simple``, ``segformer``
with its BN) or the four map convs with their BN (``aspp``, ``aspp_tv``) are RC modules
(`sats.models.reparam.RCConv`).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sats.models.reparam import RCConv
from sats.models.resnet import LEAKY_SLOPE, activate, make_norm


def _map_convs(in_channels: int, hidden: int, dilations: tuple[int, ...]) -> list[Callable[[], nn.Conv2d]]:
    """Factories of the ASPP map convs: 1×1, then 3×3 with each dilation (no bias)."""

    def conv(dilation: int | None) -> Callable[[], nn.Conv2d]:
        if dilation is None:
            return lambda: nn.Conv2d(in_channels, hidden, 1, bias=False)
        return lambda: nn.Conv2d(in_channels, hidden, 3, padding=dilation, dilation=dilation, bias=False)

    return [conv(d) for d in (None, *dilations)]


def _upsample(x: Tensor, size: torch.Size, mode: str) -> Tensor:
    """``x (B, C, h, w)`` to ``size`` by ``nearest`` or ``bilinear`` (align_corners False); as is when it fits."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


def fuse_stages(features: list[Tensor], proj: nn.ModuleList, fuse: nn.Module, order: list[int], mode: str) -> Tensor:
    """``fuse(cat_{s in order}(up(proj_s(f_s))))``: the all-MLP heads' projection, upsampling and fusion.

    ``features[s] (B, C_s, h_s, w_s)`` -> ``(B, D, h_1, w_1)``; ``order``: the stages in concatenation order; ``mode``:
    ``nearest`` or ``bilinear``. A plain conv fuse goes through :func:`project_and_fuse` (no concatenation); an RC fuse
    (RCIL's twin branches, which mix per output channel) reads the concatenation.
    """
    if isinstance(fuse, nn.Conv2d):
        return project_and_fuse(features, proj, fuse, order, mode)
    maps = [_upsample(stage_proj(feature), features[0].shape[-2:], mode)
            for stage_proj, feature in zip(proj, features, strict=True)]
    return fuse(torch.cat([maps[stage] for stage in order], dim=1))


def project_and_fuse(features: list[Tensor], proj: nn.ModuleList, fuse: nn.Conv2d, order: list[int],
                     mode: str) -> Tensor:
    """``fuse(cat_{s in order}(up(proj_s(f_s))))`` computed as ``Σ_s up((W_f,s·W_p,s) f_s + W_f,s·b_p,s) + b_f``.

    The same function of the same parameters (gradients included, to rounding): 1×1 convs act per pixel and
    nearest / bilinear upsampling (weights summing to 1) per channel, so each stage's slice ``W_f,s`` of the fuse
    conv is composed with its projection and applied at the stage's own resolution. No ``(B, 4·D, h_1, w_1)``
    concatenation and no ``4·D → D`` conv at stride 4 (about 17 of MiT-B2's 85 forward GFLOP at 512 px).
    """
    dim = proj[0].out_channels
    fuse_weight = fuse.weight.flatten(1)  # (D, 4·D)
    mapped: list[Tensor] = []  # per stage (B, D, h_s, w_s), in stage order
    for stage, stage_proj in enumerate(proj):
        slot = order.index(stage)
        block = fuse_weight[:, slot * dim:(slot + 1) * dim]  # (D, D): the fuse conv's columns for this stage
        weight = block @ stage_proj.weight.flatten(1)  # (D, C_s)
        bias = block @ stage_proj.bias if stage_proj.bias is not None else None
        mapped.append(F.conv2d(features[stage], weight[:, :, None, None], bias))
    total = mapped[0]  # the stage-1 grid; a fresh conv output, so accumulated in place
    for stage_map in mapped[1:]:
        _add_upsampled_(total, stage_map, mode)
    return total if fuse.bias is None else total.add_(fuse.bias.view(1, -1, 1, 1))


def _add_upsampled_(total: Tensor, x: Tensor, mode: str) -> None:
    """``total (B, C, H, W) += up(x (B, C, h, w))`` in place. Nearest upsampling by power-of-two factors (MiT's
    stages on a side that is a multiple of 32) is a broadcast over a ``(B, C, h, f, w, g)`` view of ``total``:
    no upsampled map is materialised, forward or backward; every other case goes through ``F.interpolate``."""
    (height, width), (h, w) = total.shape[-2:], x.shape[-2:]
    f, g = height // h, width // w
    if mode == "nearest" and (f * h, g * w) == (height, width) and _is_power_of_two(f) and _is_power_of_two(g):
        total.view(*total.shape[:2], h, f, w, g).add_(x[:, :, :, None, :, None])
    else:
        total.add_(_upsample(x, total.shape[-2:], mode))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class SimpleHead(nn.Module):
    """The reference's simplified all-MLP head (docs/methods.md §2.2).

    Per stage a 1×1 conv with bias to ``D``, **nearest** upsampling to the
    stage-1 grid, concatenation in stage order 1→4 (``4·D`` channels) and a 1×1
    conv with bias to ``D``. No BN, no activation, no dropout. Upsampling goes
    to the stage-1 size rather than by a factor ``2^(s-1)``: identical when the
    input side is a multiple of 32, and still defined when it is not. Computed
    without the concatenation unless the fuse is RC (:func:`fuse_stages`).
    """

    def __init__(self, in_channels: list[int], dim: int = 256, rc_branches: bool = False) -> None:
        super().__init__()
        self.out_channels = dim
        self.proj = nn.ModuleList(nn.Conv2d(channels, dim, 1) for channels in in_channels)

        def fuse() -> nn.Conv2d:
            return nn.Conv2d(len(in_channels) * dim, dim, 1)

        self.fuse: nn.Module = RCConv(fuse) if rc_branches else fuse()

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features`` at strides 4/8/16/32 -> ``(B, D, h_1, w_1)``."""
        return fuse_stages(features, self.proj, self.fuse, [0, 1, 2, 3], "nearest")


class SegFormerHead(nn.Module):
    """The official SegFormer all-MLP head.

    Per stage a linear projection to ``D`` (a 1×1 conv), bilinear upsampling
    (align_corners False) to the stage-1 grid, concatenation in the official
    order 4→1, then 1×1 conv (no bias) + BN + ReLU and ``Dropout2d(0.1)`` (as in
    the mmseg implementation). The ReLU is the official one and does not follow
    ``ModelConfig.activation``. Computed without the concatenation unless the
    fuse is RC (:func:`fuse_stages`).
    """

    def __init__(self, in_channels: list[int], dim: int = 256, norm: str = "bn", dropout: float = 0.1,
                 rc_branches: bool = False) -> None:
        super().__init__()
        self.out_channels = dim
        self.proj = nn.ModuleList(nn.Conv2d(channels, dim, 1) for channels in in_channels)

        def fuse() -> nn.Conv2d:
            return nn.Conv2d(len(in_channels) * dim, dim, 1, bias=False)

        def fuse_bn() -> nn.Module:
            return make_norm(norm)(dim)

        self.fuse: nn.Module = RCConv(fuse, fuse_bn, plain_norm="fuse_bn") if rc_branches else fuse()
        self.fuse_bn: nn.Module = nn.Identity() if rc_branches else fuse_bn()  # the RC module holds both norms
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features`` at strides 4/8/16/32 -> ``(B, D, h_1, w_1)``."""
        fused = F.relu(self.fuse_bn(fuse_stages(features, self.proj, self.fuse, [3, 2, 1, 0], "bilinear")))
        return self.dropout(fused)


class ASPP(nn.Module):
    """DeepLabV3 atrous spatial pyramid pooling on the last feature map (docs/methods.md §2.1).

    Branches 1×1 and 3×3 with dilations ``dilations`` (no bias) -> concat ->
    BN+act -> 1×1 conv to ``D``; image pooling -> 1×1 conv -> BN+act -> 1×1 conv
    to ``D``, **added** to the main branch; final BN+act. In training the pooling
    is a global mean; in eval, with ``pooling_size`` set, it is an average over a
    ``pooling_size``² window (stride 1) replicate-padded back to the input size
    (the MiB/In-Place-ABN behaviour; the same as the global mean whenever the
    map is not larger than the window, e.g. 512 crops at output stride 16).
    ``pooling_size=None`` uses the global mean in both modes.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int = 256,
        hidden: int = 256,
        dilations: tuple[int, int, int] = (6, 12, 18),
        norm: str = "bn",
        activation: str = "leaky_relu",
        pooling_size: int | None = 32,
        rc_branches: bool = False,
    ) -> None:
        super().__init__()
        norm_layer = make_norm(norm)
        self.out_channels = dim
        self.activation = activation
        self.pooling_size = pooling_size
        maps = _map_convs(in_channels, hidden, dilations)
        if rc_branches:  # one BN per map conv and branch: the same per-channel function as one BN over all four
            self.map_convs = nn.ModuleList(RCConv(conv, lambda: norm_layer(hidden)) for conv in maps)
            self.map_bn: nn.Module = nn.Identity()
        else:
            self.map_convs = nn.ModuleList(conv() for conv in maps)
            self.map_bn = norm_layer(hidden * 4)
        self.red_conv = nn.Conv2d(hidden * 4, dim, 1, bias=False)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.global_pooling_bn = norm_layer(hidden)
        self.pool_red_conv = nn.Conv2d(hidden, dim, 1, bias=False)
        self.red_bn = norm_layer(dim)
        gain = nn.init.calculate_gain(activation, LEAKY_SLOPE) if activation == "leaky_relu" else nn.init.calculate_gain(activation)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
            elif isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features[-1] (B, C, h, w)`` -> ``(B, D, h, w)``."""
        x = features[-1]
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(activate(self.map_bn(out), self.activation))
        pooled = self._image_pool(x)
        pooled = self.pool_red_conv(activate(self.global_pooling_bn(self.global_pooling_conv(pooled)), self.activation))
        return activate(self.red_bn(out + pooled), self.activation)

    def _image_pool(self, x: Tensor) -> Tensor:
        """``(B, C, 1, 1)`` global mean, or in eval the windowed mean ``(B, C, h, w)``."""
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        win_h, win_w = min(self.pooling_size, x.shape[2]), min(self.pooling_size, x.shape[3])
        pooled = F.avg_pool2d(x, (win_h, win_w), stride=1)
        # pad (left, right, top, bottom) so the map is back to (h, w); odd extra goes right/bottom
        pad = ((win_w - 1) // 2, win_w // 2, (win_h - 1) // 2, win_h // 2)
        return F.pad(pooled, pad, mode="replicate")


class TorchvisionASPP(nn.Module):
    """The torchvision-style DeepLabV3 ASPP of the DKD/STAR code (docs/methods.md §2.6).

    Five parallel branches on the last map, each conv (no bias) → BN → ReLU: a 1×1 conv, 3×3 convs with
    ``dilations``, and image pooling (global mean → 1×1 conv → BN → ReLU → bilinear back to ``h × w``);
    **concatenated** (5·hidden channels) → 1×1 conv → BN → ReLU → ``Dropout(dropout)`` → 3×3 conv → BN →
    ReLU. The output ``(B, D, h, w)`` is non-negative. Convs Kaiming-normal (fan in), BN weight 1 / bias 0.
    """

    def __init__(self, in_channels: int, dim: int = 256, hidden: int = 256,
                 dilations: tuple[int, int, int] = (6, 12, 18), norm: str = "bn", dropout: float = 0.1,
                 rc_branches: bool = False) -> None:
        super().__init__()
        norm_layer = make_norm(norm)
        self.out_channels = dim

        def branch(conv: nn.Module) -> nn.Sequential:
            return nn.Sequential(conv, norm_layer(hidden), nn.ReLU())

        def rc_branch(conv: Callable[[], nn.Conv2d]) -> nn.Sequential:
            return nn.Sequential(RCConv(conv, lambda: norm_layer(hidden)), nn.ReLU())

        maps = _map_convs(in_channels, hidden, dilations)
        self.branches = nn.ModuleList(rc_branch(conv) if rc_branches else branch(conv()) for conv in maps)
        self.pool = branch(nn.Conv2d(in_channels, hidden, 1, bias=False))
        self.project = nn.Sequential(nn.Conv2d(hidden * 5, dim, 1, bias=False), norm_layer(dim), nn.ReLU(),
                                     nn.Dropout(dropout))
        self.last = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), norm_layer(dim), nn.ReLU())
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        """``features[-1] (B, C, h, w)`` -> ``(B, D, h, w)``, every value ``>= 0``."""
        x = features[-1]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        maps = [branch(x) for branch in self.branches]
        maps.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.last(self.project(torch.cat(maps, dim=1)))
