"""Typed defaults of every model option (docs/methods.md §2).

`ModelConfig` is a plain dataclass that OmegaConf can use as a structured
config, so its fields use only OmegaConf-supported types (str, int, float,
bool, Optional, List[int]). OmegaConf does not run ``__post_init__`` on merges;
`sats.models.build_segmenter` therefore re-validates by rebuilding a
`ModelConfig` from whatever mapping it is given (`as_model_config`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, List, Optional

MIT_BACKBONES = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5", "mit_custom")
RESNET_BACKBONES = ("resnet50", "resnet101")
BACKBONES = MIT_BACKBONES + RESNET_BACKBONES
HEADS = ("simple", "segformer", "aspp", "aspp_tv")
DILATION_MODES = ("stage", "torchvision")
CLASSIFIER_INITS = ("default", "kaiming_normal")
NORMS = ("bn", "syncbn")
ACTIVATIONS = ("relu", "leaky_relu")
OUTPUT_STRIDES = (8, 16)
PRETRAINED_FORMATS = ("auto", "mit", "hf", "torchvision", "iabn")


@dataclass
class ModelConfig:
    """Every model default in one place.

    Attributes:
        backbone: encoder; ``mit_b0`` … ``mit_b5`` (official hyper-parameters),
            ``mit_custom`` (MiT built from ``embed_dims``/``depths``/``num_heads``/
            ``sr_ratios``, B0 values for the ones left ``None``), ``resnet50``,
            ``resnet101``.
        embed_dims: MiT channels per stage (4 values); ``mit_custom`` only.
        depths: MiT blocks per stage (4 values); ``mit_custom`` only.
        num_heads: MiT attention heads per stage (4 values); ``mit_custom`` only.
        sr_ratios: MiT spatial-reduction ratio per stage (4 values); ``mit_custom`` only.
        mlp_ratio: Mix-FFN hidden ratio (MiT; official value 4).
        head: decoder; ``simple`` = the reference's simplified all-MLP head (§2.2:
            1×1 convs, nearest upsampling, no BN/activation/dropout), ``segformer``
            = the official SegFormer head (bilinear, BN+ReLU fuse, dropout 0.1),
            ``aspp`` = DeepLabV3 ASPP on the encoder output (§2.1), ``aspp_tv`` = the
            torchvision-style ASPP of the DKD/STAR code (concatenated pooling branch,
            BN+ReLU, dropout, an extra 3×3 conv; §2.6).
        decoder_dim: channels of the decoder output fed to the classifier.
        output_stride: ResNet output stride (16: stage 4 dilated; 8: stages 3-4
            dilated); also sets the ASPP dilations (6/12/18 at 16, 12/24/36 at 8).
        norm: BatchNorm flavour of ResNet / ASPP / official SegFormer head:
            ``bn`` or ``syncbn`` (MiT uses LayerNorm regardless).
        activation: ResNet and ASPP activation: ``relu`` or ``leaky_relu``
            (slope 0.01, what the In-Place-ABN ImageNet checkpoint assumes).
        dilation_mode: ResNet dilated stages; ``stage`` = every block of a dilated
            stage uses its dilation (In-Place-ABN/PLOP), ``torchvision`` = the first
            block keeps the previous stage's dilation (torchvision, DKD/STAR; §2.6).
        encoder_bn_momentum: BatchNorm momentum of the ResNet encoder (None: PyTorch's
            0.1; DKD/STAR: 0.01). The head's norms keep 0.1.
        head_dropout: dropout rate of the ``segformer`` and ``aspp_tv`` heads.
        classifier_init: weights of every classifier head; ``default`` = PyTorch's conv
            init, ``kaiming_normal`` = Kaiming-normal (fan in), biases PyTorch's (DKD/STAR).
        drop_path: MiT stochastic-depth rate of the last block (linear from 0).
        pretrained: local checkpoint file loaded into the encoder, ``builtin:<name>``
            (weights shipped with the package, `sats.models.builtin`), or None.
        pretrained_format: ``auto`` (detected from the keys), ``mit`` (official
            ``mit_b*.pth``), ``hf`` (Hugging Face SegFormer/MiT), ``torchvision``,
            ``iabn`` (In-Place-ABN ResNet, ``resnet101_iabn_sync.pth.tar``).
        partial_load: accept a checkpoint that misses some encoder keys.
        rc_branches: RCIL's twin branches (RC modules, `sats.models.reparam`, docs/methods.md §2.7):
            every ResNet bottleneck's 3×3 conv + BN, the ASPP map convs + BN (``aspp``, ``aspp_tv``),
            every MiT Mix-FFN depth-wise conv, the fuse conv (+ BN) of the ``simple``/``segformer``
            heads; pretrained encoder weights go into both branches.
        stem_activation: ResNet activation after the stem BN; ``false`` = none (the RCIL reference,
            docs/methods.md §2.7). ResNet only.
        checkpoint_activations: recompute each MiT block's activations in the backward pass instead of
            keeping them (activation checkpointing: less memory, one more forward of the encoder; the
            random streams of stochastic depth are replayed, so results do not change). MiT only.
    """

    backbone: str = "mit_b2"
    embed_dims: Optional[List[int]] = None
    depths: Optional[List[int]] = None
    num_heads: Optional[List[int]] = None
    sr_ratios: Optional[List[int]] = None
    mlp_ratio: int = 4
    head: str = "simple"
    decoder_dim: int = 256
    output_stride: int = 16
    norm: str = "bn"
    activation: str = "leaky_relu"
    dilation_mode: str = "stage"
    encoder_bn_momentum: Optional[float] = None
    head_dropout: float = 0.1
    classifier_init: str = "default"
    drop_path: float = 0.1
    pretrained: Optional[str] = None
    pretrained_format: str = "auto"
    partial_load: bool = False
    rc_branches: bool = False
    stem_activation: bool = True
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("head", self.head, HEADS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("pretrained_format", self.pretrained_format, PRETRAINED_FORMATS)
        _check_choice("dilation_mode", self.dilation_mode, DILATION_MODES)
        _check_choice("classifier_init", self.classifier_init, CLASSIFIER_INITS)
        _check_choice("rc_branches", self.rc_branches, (False, True))
        _check_choice("stem_activation", self.stem_activation, (True, False))
        _check_choice("checkpoint_activations", self.checkpoint_activations, (False, True))
        if self.checkpoint_activations and not self.is_mit:
            raise ValueError(f"model.checkpoint_activations is a MiT option; backbone={self.backbone!r}")
        if not self.stem_activation and self.is_mit:
            raise ValueError(f"model.stem_activation=false is a ResNet option; backbone={self.backbone!r} has no "
                             f"stem activation (leave it true)")
        if self.encoder_bn_momentum is not None and not 0.0 < self.encoder_bn_momentum <= 1.0:
            raise ValueError(f"model.encoder_bn_momentum must lie in (0, 1], got {self.encoder_bn_momentum!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"model.head_dropout must be in [0, 1), got {self.head_dropout!r}")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"model.output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r}")
        if self.decoder_dim <= 0:
            raise ValueError(f"model.decoder_dim must be positive, got {self.decoder_dim!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"model.drop_path must be in [0, 1), got {self.drop_path!r}")
        for key in ("embed_dims", "depths", "num_heads", "sr_ratios"):
            value = getattr(self, key)
            if value is None:
                continue
            if self.backbone != "mit_custom":
                raise ValueError(
                    f"model.{key} is only used with backbone='mit_custom' (got backbone={self.backbone!r}); "
                    f"leave it null for the named variants"
                )
            value = [int(v) for v in value]
            if len(value) != 4 or any(v <= 0 for v in value):
                raise ValueError(f"model.{key} must be 4 positive integers, got {value!r}")
            setattr(self, key, value)
        if self.backbone == "mit_custom":
            arch = self.mit_arch()
            for stage, (dim, head) in enumerate(zip(arch["embed_dims"], arch["num_heads"])):
                if dim % head:
                    raise ValueError(f"model.embed_dims[{stage}]={dim} is not divisible by model.num_heads[{stage}]={head}")

    @property
    def is_mit(self) -> bool:
        """True for the Mix Transformer backbones."""
        return self.backbone in MIT_BACKBONES

    def mit_arch(self) -> dict[str, list[int]]:
        """MiT hyper-parameters: ``embed_dims``, ``depths``, ``num_heads``, ``sr_ratios`` (4 values each)."""
        from sats.models.mit import MIT_VARIANTS

        if self.backbone == "mit_custom":
            base = MIT_VARIANTS["mit_b0"]
            return {key: list(getattr(self, key) or base[key]) for key in base}
        if self.backbone not in MIT_VARIANTS:
            raise ValueError(f"model.backbone={self.backbone!r} is not a MiT backbone")
        return {key: list(value) for key, value in MIT_VARIANTS[self.backbone].items()}


def _check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"model.{key} must be one of {list(allowed)}, got {value!r}")


def as_model_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Validated `ModelConfig` from a `ModelConfig`, a dict or an OmegaConf DictConfig.

    Unknown keys raise ValueError naming them; list values (OmegaConf ListConfig
    included) become plain lists of int.
    """
    if isinstance(cfg, ModelConfig):
        return ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})
    if not isinstance(cfg, Mapping) and not hasattr(cfg, "keys"):
        raise TypeError(f"model config must be a ModelConfig or a mapping, got {type(cfg).__name__}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
    values: dict[str, Any] = {}
    for key in cfg.keys():
        value = cfg[key]
        if key in ("embed_dims", "depths", "num_heads", "sr_ratios") and value is not None:
            value = [int(v) for v in value]
        values[str(key)] = value
    return ModelConfig(**values)
