"""Numerical parity of our MiT with transformers' SegformerModel, through our HF weight converter."""

import re
import sys

import pytest
import torch

transformers_segformer = pytest.importorskip("transformers.models.segformer.modeling_segformer")

from sats.models import build_mit, load_encoder_state  # noqa: E402

DEPTHS = [1, 2, 1, 2]


def test_importing_transformers_segformer_does_not_import_torchvision():
    assert "transformers.models.segformer.modeling_segformer" in sys.modules
    assert "torchvision" not in sys.modules


def tiny_hf_model() -> torch.nn.Module:
    config = transformers_segformer.SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=DEPTHS,
        sr_ratios=[4, 2, 2, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 2, 3, 4],
        mlp_ratios=[4, 4, 4, 4],
        drop_path_rate=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers_segformer.SegformerModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # LayerNorms and biases non-trivial: a wrong mapping shows
    # HF builds block and stage LayerNorms with eps 1e-5; the official MiT (and ours) use 1e-6
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and ("layernorm_" in name or re.fullmatch(r"stages\.\d+\.layer_norm", name)):
            module.eps = 1e-6
    return model


def test_hf_state_dict_converts_and_outputs_match():
    hf = tiny_hf_model()
    eps = {n: m.eps for n, m in hf.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps["stages.0.layer_norm"] == 1e-6 and eps["stages.1.blocks.1.layernorm_after"] == 1e-6
    assert eps["stages.0.patch_embeddings.layer_norm"] == 1e-5 and eps["stages.0.blocks.0.attention.sequence_reduction.layer_norm"] == 1e-5

    ours = build_mit("mit_custom", drop_path=0.0, arch={"embed_dims": [8, 16, 24, 32], "depths": DEPTHS, "num_heads": [1, 2, 3, 4], "sr_ratios": [4, 2, 2, 1]}).eval()
    report = load_encoder_state(ours, hf.state_dict())
    assert report.format == "hf" and report.missing == [] and report.unexpected == [] and report.dropped == []

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True, output_attentions=True)
        out = ours(x, attentions=True)
    assert len(ref.hidden_states) == 4 and len(ref.attentions) == sum(DEPTHS)
    for stage in range(4):
        torch.testing.assert_close(out.stages[stage], ref.hidden_states[stage], atol=1e-5, rtol=1e-5)
    last_blocks = [0, 2, 3, 5]  # index of the last block of each stage among all blocks
    for stage, index in enumerate(last_blocks):
        assert out.attentions[stage].shape == ref.attentions[index].shape
        torch.testing.assert_close(out.attentions[stage], ref.attentions[index], atol=1e-5, rtol=1e-5)


def test_hf_mit_b0_architecture_loads_strictly():
    torch.manual_seed(0)
    hf = transformers_segformer.SegformerModel(transformers_segformer.SegformerConfig())  # the mit-b0 defaults
    ours = build_mit("mit_b0")
    report = load_encoder_state(ours, {f"segformer.{k}": v for k, v in hf.state_dict().items()})
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(ours.state_dict())
    kv = ours.block3[1].attn.kv.weight
    hf_attn = hf.stages[2].blocks[1].attention
    assert torch.equal(kv[:160], hf_attn.k_proj.weight) and torch.equal(kv[160:], hf_attn.v_proj.weight)
