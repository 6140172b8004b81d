"""sats.models: MiT / ResNet encoders, decoder heads, incremental classifier, Segmenter, weight loading."""

from sats.models.classifier import HEAD_INITS, IncrementalClassifier
from sats.models.config import ModelConfig, as_model_config
from sats.models.heads import ASPP, SegFormerHead, SimpleHead, TorchvisionASPP
from sats.models.mit import MIT_VARIANTS, EncoderOutput, MixTransformer, build_mit
from sats.models.resnet import ResNetEncoder
from sats.models.segmenter import (
    NEEDS,
    ModelOutput,
    Segmenter,
    build_encoder,
    build_head,
    build_segmenter,
    check_need,
    frozen_copy,
)
from sats.models.weights import (
    LoadReport,
    WeightsError,
    convert_state_dict,
    detect_format,
    download_hf_weights,
    load_encoder_state,
    load_encoder_weights,
    read_checkpoint,
)

__all__ = [
    "ASPP",
    "HEAD_INITS",
    "MIT_VARIANTS",
    "NEEDS",
    "EncoderOutput",
    "IncrementalClassifier",
    "LoadReport",
    "MixTransformer",
    "ModelConfig",
    "ModelOutput",
    "ResNetEncoder",
    "SegFormerHead",
    "Segmenter",
    "SimpleHead",
    "TorchvisionASPP",
    "WeightsError",
    "as_model_config",
    "build_encoder",
    "build_head",
    "build_mit",
    "build_segmenter",
    "check_need",
    "convert_state_dict",
    "detect_format",
    "download_hf_weights",
    "frozen_copy",
    "load_encoder_state",
    "load_encoder_weights",
    "read_checkpoint",
]
