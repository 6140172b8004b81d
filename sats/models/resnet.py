"""Dilated ResNet-50/101 encoder for DeepLabV3 (docs/methods.md §2.1).

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0/1`` …) so torchvision ImageNet checkpoints load as-is;
`sats.models.weights` converts the In-Place-ABN checkpoint names.

Bottleneck v1.5 (stride on the 3×3 conv). Output stride 16: stage 4 has no
stride and dilation 2; output stride 8: stages 3 and 4 have dilations 2 and 4.
As in the In-Place-ABN/PLOP ResNet, *every* block of a dilated stage uses that
stage's dilation (``dilation_mode="stage"``); ``dilation_mode="torchvision"`` gives
the first block the previous stage's dilation, as torchvision (and the DKD/STAR
code, docs/methods.md §2.6) do.
The activation (ReLU or LeakyReLU 0.01) follows each BN except the last BN of
a block, where it comes after the residual addition, and the stem BN when
``stem_activation=False`` (the RCIL reference). ``rc_branches=True`` makes every
block's ``conv2`` an RC module (`sats.models.reparam.RCConv`: twin conv + BN,
keys ``conv2.conv_a`` / ``conv2.norm_a`` / ``conv2.conv_b`` / ``conv2.norm_b``) and
``bn2`` an identity.
"""

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from sats.models.mit import EncoderOutput
from sats.models.reparam import RCConv

RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
STAGE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}
DILATION_MODES = ("stage", "torchvision")
LEAKY_SLOPE = 0.01
ACTIVATIONS = ("relu", "leaky_relu")


def make_norm(kind: str) -> Callable[[int], nn.Module]:
    """Factory ``channels -> BatchNorm2d`` (``"bn"``) or ``SyncBatchNorm`` (``"syncbn"``)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "syncbn":
        return nn.SyncBatchNorm
    raise ValueError(f"norm must be 'bn' or 'syncbn', got {kind!r}")


def activate(x: Tensor, kind: str) -> Tensor:
    """ReLU (``"relu"``) or LeakyReLU with slope 0.01 (``"leaky_relu"``)."""
    if kind == "relu":
        return F.relu(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, LEAKY_SLOPE)
    raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {kind!r}")


class Bottleneck(nn.Module):
    """1×1 -> 3×3 (stride, dilation) -> 1×1 (×4 channels) with projection shortcut when needed."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        dilation: int,
        norm: Callable[[int], nn.Module],
        activation: str,
        rc_branches: bool = False,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.activation = activation
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm(width)

        def conv2() -> nn.Conv2d:
            return nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)

        self.conv2: nn.Module = RCConv(conv2, lambda: norm(width), plain_norm="bn2") if rc_branches else conv2()
        self.bn2: nn.Module = nn.Identity() if rc_branches else norm(width)  # the RC module holds both norms
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(activated output, pre-activation sum)``, both ``(B, 4·width, h, w)``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = activate(self.bn1(self.conv1(x)), self.activation)
        out = activate(self.bn2(self.conv2(out)), self.activation)
        preact = self.bn3(self.conv3(out)) + shortcut
        return activate(preact, self.activation), preact


class ResNetEncoder(nn.Module):
    """ResNet body without the classifier; exposes activated and pre-activation stage outputs.

    Args:
        depth: ``"resnet50"`` or ``"resnet101"``.
        output_stride: 16 or 8.
        norm: ``"bn"`` or ``"syncbn"``.
        activation: ``"relu"`` or ``"leaky_relu"``.
        dilation_mode: ``"stage"`` or ``"torchvision"`` (module docstring).
        bn_momentum: momentum of every BatchNorm of the encoder (None: PyTorch's 0.1).
        stem_activation: activation after the stem BN (False: none, the RCIL reference).
        rc_branches: RC module in place of every block's ``conv2``/``bn2`` (module docstring).
    """

    def __init__(self, depth: str = "resnet101", output_stride: int = 16, norm: str = "bn", activation: str = "relu",
                 dilation_mode: str = "stage", bn_momentum: float | None = None, stem_activation: bool = True,
                 rc_branches: bool = False) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"unknown ResNet {depth!r}; known: {sorted(RESNET_LAYERS)}")
        if output_stride not in STAGE_DILATIONS:
            raise ValueError(f"ResNet output_stride must be 8 or 16, got {output_stride!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if dilation_mode not in DILATION_MODES:
            raise ValueError(f"dilation_mode must be one of {list(DILATION_MODES)}, got {dilation_mode!r}")
        norm_layer = make_norm(norm)
        self.activation = activation
        self.output_stride = output_stride
        self.stem_activation = stem_activation
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        self.out_channels: list[int] = []
        previous = 1
        for stage, (blocks, dilation) in enumerate(zip(RESNET_LAYERS[depth], STAGE_DILATIONS[output_stride]), start=1):
            width = 64 * 2 ** (stage - 1)
            stride = 2 if stage > 1 and dilation == 1 else 1
            first = previous if dilation_mode == "torchvision" else dilation
            layer = []
            for index in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride if index == 0 else 1, first if index == 0 else dilation,
                                        norm_layer, activation, rc_branches))
                in_channels = width * Bottleneck.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
            self.out_channels.append(in_channels)
            previous = dilation
        self._init_weights()
        if bn_momentum is not None:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
                    module.momentum = bn_momentum

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.SyncBatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, attentions: bool = False) -> EncoderOutput:
        """``x (B, 3, H, W)`` -> activated stage maps (features) and their pre-activation (stages).

        Stage sizes at output stride 16: ``H/4, H/8, H/16, H/16``.
        """
        if attentions:
            raise ValueError("ResNet encoders have no attention maps; do not request 'attentions'")
        x = self.bn1(self.conv1(x))
        x = self.maxpool(activate(x, self.activation) if self.stem_activation else x)
        features: list[Tensor] = []
        preacts: list[Tensor] = []
        for stage in range(1, 5):
            preact = x
            for block in getattr(self, f"layer{stage}"):
                x, preact = block(x)
            features.append(x)
            preacts.append(preact)
        return EncoderOutput(features=features, stages=preacts, attentions=None)

