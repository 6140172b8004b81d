"""sats.models.weights: converters round-trip (official MiT, HF, torchvision, In-Place-ABN), strictness."""

import re

import pytest
import torch
from safetensors.torch import save_file

from sats.models import (
    ModelConfig,
    WeightsError,
    build_mit,
    build_segmenter,
    detect_format,
    load_encoder_state,
    load_encoder_weights,
    read_checkpoint,
)
from sats.models.resnet import ResNetEncoder

TINY_ARCH = {"embed_dims": [8, 16, 24, 32], "depths": [1, 2, 1, 1], "num_heads": [1, 2, 3, 4], "sr_ratios": [4, 2, 2, 1]}


def random_mit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_mit("mit_custom", arch=TINY_ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # LayerNorms and biases too, so a wrong mapping cannot go unnoticed
    return model


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


# ---------------------------------------------------------------- foreign formats written independently of the loader

HF_INNER = {
    "norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query", "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1",
    "mlp.fc2": "mlp.dense2", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
}


def to_hf_hub_names(state: dict, prefix: str) -> dict:
    """Our MiT names -> Hugging Face hub names (``encoder.block.0.0.attention.self.query`` …)."""
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)", module):
            sub = {"proj": "proj", "norm": "layer_norm"}[m.group(2)]
            out[f"{prefix}encoder.patch_embeddings.{int(m.group(1)) - 1}.{sub}.{param}"] = value
        elif m := re.fullmatch(r"norm(\d)", module):
            out[f"{prefix}encoder.layer_norm.{int(m.group(1)) - 1}.{param}"] = value
        elif m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)", module):
            base = f"{prefix}encoder.block.{int(m.group(1)) - 1}.{m.group(2)}"
            if m.group(3) == "attn.kv":
                half = value.shape[0] // 2
                out[f"{base}.attention.self.key.{param}"] = value[:half].clone()
                out[f"{base}.attention.self.value.{param}"] = value[half:].clone()
            else:
                out[f"{base}.{HF_INNER[m.group(3)]}.{param}"] = value
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def to_iabn_names(state: dict) -> dict:
    """Our torchvision names -> In-Place-ABN ResNet names with ``module.``; BN weights stored as w - eps."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # In-Place ABN has no such buffer
        if m := re.fullmatch(r"(conv1|bn1)\.(\w+)", key):
            name = f"mod1.{m.group(1)}.{m.group(2)}"
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)", key):
            part = {"downsample.0": "proj_conv", "downsample.1": "proj_bn"}.get(m.group(3), f"convs.{m.group(3)}")
            name = f"mod{int(m.group(1)) + 1}.block{int(m.group(2)) + 1}.{part}.{m.group(4)}"
        else:
            raise AssertionError(f"unmapped key {key}")
        if re.search(r"(bn\d|proj_bn)\.weight$", name):
            value = value - 1e-5
            value[::3] = -value[::3]  # In-Place ABN uses |w| + eps: the sign must not matter
        out[f"module.{name}"] = value
    out["module.classifier.fc.weight"] = torch.zeros(10, 2048)
    out["module.classifier.fc.bias"] = torch.zeros(10)
    return out


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = ResNetEncoder("resnet50")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if re.search(r"(bn\d|downsample\.1)\.(weight|running_var)$", name):
                tensor.uniform_(0.5, 1.5)
            elif re.search(r"(bn\d|downsample\.1)\.(bias|running_mean)$", name):
                tensor.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------------------------------------- MiT


def test_official_mit_round_trip_with_wrapper_and_head(tmp_path):
    source = random_mit(0)
    state = {**source.state_dict(), "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}
    path = tmp_path / "mit_tiny.pth"
    torch.save({"state_dict": state, "epoch": 300}, path)
    target = random_mit(1)
    report = load_encoder_weights(target, path)
    assert report.format == "mit" and report.missing == [] and report.unexpected == []
    assert report.dropped == ["head.bias", "head.weight"] and len(report.loaded) == len(source.state_dict())
    assert_same_state(source, target)


def test_mmseg_and_segmenter_checkpoints_keep_only_the_encoder():
    source = random_mit(0)
    mmseg = {**{f"backbone.{k}": v for k, v in source.state_dict().items()}, "decode_head.conv_seg.weight": torch.zeros(2)}
    target = random_mit(1)
    report = load_encoder_state(target, mmseg)
    assert report.format == "mit" and report.dropped == ["decode_head.conv_seg.weight"]
    assert_same_state(source, target)
    seg = build_segmenter(ModelConfig(backbone="mit_custom", **TINY_ARCH, decoder_dim=8), [3])
    fresh = random_mit(2)
    report = load_encoder_state(fresh, seg.state_dict())
    assert report.format == "mit" and all(k.startswith(("head.", "classifier.")) for k in report.dropped)
    assert_same_state(seg.encoder, fresh)


@pytest.mark.parametrize("suffix, prefix", [(".safetensors", ""), (".bin", "segformer.")])
def test_hf_hub_names_round_trip(tmp_path, suffix, prefix):
    source = random_mit(0)
    state = to_hf_hub_names(source.state_dict(), prefix)
    state[f"{prefix}classifier.weight"] = torch.zeros(1000, 32)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    target = random_mit(1)
    report = load_encoder_weights(target, path, fmt="auto")
    assert report.format == "hf" and report.missing == [] and report.unexpected == []
    assert report.dropped == [f"{prefix}classifier.weight"]
    assert_same_state(source, target)


def test_missing_encoder_key_refused_unless_partial():
    source = random_mit(0)
    state = source.state_dict()
    del state["block2.1.attn.kv.weight"]
    target = random_mit(1)
    before = target.state_dict()["block2.1.attn.kv.weight"].clone()
    with pytest.raises(WeightsError, match=r"missing: block2\.1\.attn\.kv\.weight"):
        load_encoder_state(target, state)
    report = load_encoder_state(target, state, partial=True)
    assert report.missing == ["block2.1.attn.kv.weight"]
    assert torch.equal(target.state_dict()["block2.1.attn.kv.weight"], before)
    assert torch.equal(target.state_dict()["block2.1.attn.q.weight"], source.state_dict()["block2.1.attn.q.weight"])


def test_unexpected_key_and_shape_mismatch_refused():
    source = random_mit(0)
    with pytest.raises(WeightsError, match=r"unexpected: block9\.0\.foo"):
        load_encoder_state(random_mit(1), {**source.state_dict(), "block9.0.foo": torch.zeros(1)})
    b0 = build_mit("mit_b0")
    with pytest.raises(WeightsError, match=r"shape mismatch .*patch_embed1\.proj\.weight: checkpoint \(8, 3, 7, 7\) vs encoder \(32, 3, 7, 7\)"):
        load_encoder_state(b0, source.state_dict())


def test_build_segmenter_loads_pretrained_file(tmp_path):
    source = random_mit(0)
    path = tmp_path / "enc.pth"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(backbone="mit_custom", **TINY_ARCH, decoder_dim=8, pretrained=str(path))
    model = build_segmenter(cfg, [3])
    assert_same_state(source, model.encoder)
    with pytest.raises(WeightsError, match="not found"):
        build_segmenter(ModelConfig(backbone="mit_custom", pretrained=str(tmp_path / "none.pth")), [3])


# ---------------------------------------------------------------------------------------------- ResNet


def test_torchvision_round_trip(resnet50):
    state = {**resnet50.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    target = ResNetEncoder("resnet50")
    report = load_encoder_state(target, state)
    assert report.format == "torchvision" and report.dropped == ["fc.bias", "fc.weight"] and report.missing == []
    assert_same_state(resnet50, target)


def test_iabn_round_trip(resnet50):
    # file reading and {"state_dict": …} unwrapping are covered by the MiT file test; this stays in memory (100 MB)
    target = ResNetEncoder("resnet50")
    report = load_encoder_state(target, to_iabn_names(resnet50.state_dict()))
    assert report.format == "iabn" and report.missing == [] and report.unexpected == []
    assert report.dropped == ["classifier.fc.bias", "classifier.fc.weight"]
    assert_same_state(resnet50, target, atol=1e-6)


def test_detect_format_and_unreadable_inputs(tmp_path):
    assert detect_format(["patch_embed1.proj.weight", "head.weight"]) == "mit"
    assert detect_format(["segformer.encoder.patch_embeddings.0.proj.weight"]) == "hf"
    assert detect_format(["stages.0.blocks.0.attention.q_proj.weight"]) == "hf"
    assert detect_format(["conv1.weight", "layer1.0.conv1.weight"]) == "torchvision"
    assert detect_format(["module.mod1.conv1.weight", "module.mod2.block1.convs.conv1.weight"]) == "iabn"
    with pytest.raises(WeightsError, match="cannot recognise"):
        detect_format(["features.0.weight"], "vgg.pth")
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {"a.weight": torch.zeros(1), "note": "x"}}, path)
    with pytest.raises(WeightsError, match=r"\['note'\] are not tensors"):
        read_checkpoint(path)
    with pytest.raises(WeightsError, match="unknown checkpoint format 'timm'"):
        load_encoder_state(random_mit(0), random_mit(0).state_dict(), fmt="timm")
