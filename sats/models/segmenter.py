"""Segmenter = encoder + decoder head + incremental classifier (docs/architecture.md, `sats.models`)."""

import copy
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from sats.models.classifier import IncrementalClassifier
from sats.models.config import ModelConfig, as_model_config
from sats.models.heads import ASPP, SegFormerHead, SimpleHead, TorchvisionASPP
from sats.models.mit import DropPath, MixTransformer
from sats.models.resnet import ResNetEncoder

log = logging.getLogger(__name__)

NEEDS = frozenset({"logits_small", "stages", "features", "body", "decoder", "attentions"})
#: what a method may freeze at a step (``Method.frozen_at``): ``norm`` = every BatchNorm layer (running
#: statistics in eval mode, affine parameters out of the optimiser), ``dropout`` = dropout and stochastic depth off
FROZEN_KINDS = frozenset({"norm", "dropout"})


@dataclass
class ModelOutput:
    """Outputs of `Segmenter.forward`; only what was requested is filled, the rest is None.

    logits: ``(B, K, H, W)`` at input size (bilinear, align_corners False).
    logits_small: ``(B, K, h, w)`` classifier output before upsampling.
    stages: 4 maps; MiT stage outputs after their LayerNorm ``(B, C_s, h_s, w_s)``,
        ResNet pre-activation output of the last block of each stage.
    features: 4 maps, the activated output of the last block of each stage ``(B, C_s, h_s, w_s)``
        (MiT: the same tensors as ``stages``; ResNet: after the block's final activation).
    body: encoder output; MiT stage 4, ResNet activated stage 4.
    decoder: ``(B, D, h, w)`` feature fed to the classifier.
    attentions: MiT post-softmax attention of the last block of each stage,
        ``(B, heads_s, N_s, M_s)`` (float32), in the autograd graph.
    """

    logits: Tensor
    logits_small: Tensor | None = None
    stages: list[Tensor] | None = None
    body: Tensor | None = None
    decoder: Tensor | None = None
    attentions: list[Tensor] | None = None
    features: list[Tensor] | None = None


def check_need(need: Collection[str]) -> frozenset[str]:
    """Validated set of requested outputs; unknown names raise ValueError."""
    if isinstance(need, str):
        raise ValueError(f"need must be a collection of names from {sorted(NEEDS)}, got the string {need!r}")
    requested = frozenset(need)
    unknown = requested - NEEDS
    if unknown:
        raise ValueError(f"unknown model outputs {sorted(unknown)}; known: {sorted(NEEDS)} (logits are always returned)")
    return requested


class Segmenter(nn.Module):
    """Encoder -> head -> `IncrementalClassifier`; ``forward(x, need)`` returns a `ModelOutput`.

    Submodule names (state-dict prefixes): ``encoder``, ``head``, ``classifier``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, classifier: IncrementalClassifier, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classifier = classifier
        self.cfg = cfg

    @property
    def head_sizes(self) -> list[int]:
        """Channels of every classifier head, in step order."""
        return self.classifier.head_sizes

    @property
    def num_outputs(self) -> int:
        """Total output channels ``K``."""
        return self.classifier.num_outputs

    @property
    def has_attention(self) -> bool:
        """Whether the encoder can return attention maps (MiT)."""
        return isinstance(self.encoder, MixTransformer)

    def forward(self, x: Tensor, need: Collection[str] = ()) -> ModelOutput:
        """``x (B, 3, H, W)`` -> `ModelOutput` with logits and the outputs named in ``need`` (see `NEEDS`)."""
        requested = check_need(need)
        if "attentions" in requested and not self.has_attention:
            raise ValueError(f"'attentions' requested but the encoder {type(self.encoder).__name__} has no attention maps")
        encoded = self.encoder(x, attentions="attentions" in requested)
        decoder = self.head(encoded.features)
        logits_small = self.classifier(decoder)
        logits = F.interpolate(logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return ModelOutput(
            logits=logits,
            logits_small=logits_small if "logits_small" in requested else None,
            stages=list(encoded.stages) if "stages" in requested else None,
            body=encoded.features[-1] if "body" in requested else None,
            decoder=decoder if "decoder" in requested else None,
            attentions=encoded.attentions if "attentions" in requested else None,
            features=list(encoded.features) if "features" in requested else None,
        )

    def add_step(self, num_new: int, init: str = "default", source: int = 0) -> None:
        """Append a classifier head of ``num_new`` channels (``"default"``, ``"background"``, ``"unknown"``,
        ``"copy"`` of output channel ``source``; `IncrementalClassifier.add_step`)."""
        self.classifier.add_step(num_new, init, source)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """The encoder of ``cfg`` (random init; see `sats.models.weights` for pretrained weights)."""
    if cfg.is_mit:
        return MixTransformer(**cfg.mit_arch(), mlp_ratio=cfg.mlp_ratio, drop_path=cfg.drop_path,
                              rc_branches=cfg.rc_branches, checkpoint_activations=cfg.checkpoint_activations)
    return ResNetEncoder(cfg.backbone, output_stride=cfg.output_stride, norm=cfg.norm, activation=cfg.activation,
                         dilation_mode=cfg.dilation_mode, bn_momentum=cfg.encoder_bn_momentum,
                         stem_activation=cfg.stem_activation, rc_branches=cfg.rc_branches)


def build_head(cfg: ModelConfig, in_channels: list[int]) -> nn.Module:
    """The decoder head of ``cfg`` on encoder maps with ``in_channels``."""
    rc = cfg.rc_branches
    if cfg.head == "simple":
        return SimpleHead(in_channels, cfg.decoder_dim, rc_branches=rc)
    if cfg.head == "segformer":
        return SegFormerHead(in_channels, cfg.decoder_dim, norm=cfg.norm, dropout=cfg.head_dropout, rc_branches=rc)
    dilations = (6, 12, 18) if cfg.output_stride == 16 else (12, 24, 36)
    if cfg.head == "aspp_tv":
        return TorchvisionASPP(in_channels[-1], cfg.decoder_dim, cfg.decoder_dim, dilations, norm=cfg.norm,
                               dropout=cfg.head_dropout, rc_branches=rc)
    return ASPP(in_channels[-1], cfg.decoder_dim, cfg.decoder_dim, dilations, norm=cfg.norm, activation=cfg.activation,
                rc_branches=rc)


def build_segmenter(cfg: ModelConfig | Mapping[str, Any], head_sizes: list[int]) -> Segmenter:
    """Segmenter of ``cfg`` with one classifier head per entry of ``head_sizes``.

    When ``cfg.pretrained`` is set, the encoder weights are loaded from that local
    file (`sats.models.weights.load_encoder_weights`); the load report is logged.
    """
    cfg = as_model_config(cfg)
    encoder = build_encoder(cfg)
    if cfg.pretrained:
        from sats.models.weights import load_encoder_weights

        report = load_encoder_weights(encoder, cfg.pretrained, cfg.pretrained_format, partial=cfg.partial_load)
        log.info("%s", report)
    head = build_head(cfg, list(encoder.out_channels))
    classifier = IncrementalClassifier(head.out_channels, list(head_sizes), weight_init=cfg.classifier_init)
    return Segmenter(encoder, head, classifier, cfg)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (``BatchNorm*d``, ``SyncBatchNorm``): what ``"norm"`` freezes."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_mode(model: nn.Module, frozen: Collection[str] = ()) -> nn.Module:
    """``model.train()``, then the layers named by ``frozen`` (`FROZEN_KINDS`) back in eval mode: BatchNorm
    layers for ``"norm"`` (they normalise with, and keep, their running statistics), dropout and stochastic
    depth for ``"dropout"``. Returns ``model``."""
    unknown = set(frozen) - FROZEN_KINDS
    if unknown:
        raise ValueError(f"unknown frozen kinds {sorted(unknown)}; known: {sorted(FROZEN_KINDS)}")
    model.train()
    if "norm" in frozen:
        for layer in norm_layers(model):
            layer.eval()
    if "dropout" in frozen:
        for layer in model.modules():
            if isinstance(layer, nn.modules.dropout._DropoutNd | DropPath):
                layer.eval()
    return model


def frozen_copy(model: Segmenter) -> Segmenter:
    """Deep copy in eval mode with every parameter frozen (the old model of step ``t``)."""
    frozen = copy.deepcopy(model)
    frozen.eval()
    frozen.requires_grad_(False)
    for parameter in frozen.parameters():
        parameter.grad = None
    return frozen


