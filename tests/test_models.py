"""sats.models: config validation, output shapes, attention, heads, classifier init, growing a model."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sats.engine.checkpoint import CheckpointError, load_state_strict
from sats.models import (
    ASPP,
    NEEDS,
    IncrementalClassifier,
    ModelConfig,
    SegFormerHead,
    Segmenter,
    SimpleHead,
    as_model_config,
    build_mit,
    build_segmenter,
    frozen_copy,
)
from sats.models.resnet import ResNetEncoder

TINY = dict(backbone="mit_custom", embed_dims=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_heads=[1, 2, 3, 4], sr_ratios=[4, 2, 2, 1], decoder_dim=16)


def tiny_model(head_sizes=(3,), **extra) -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter(ModelConfig(**{**TINY, **extra}), list(head_sizes))


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value",
    [("backbone", "mit_b9"), ("head", "fcn"), ("norm", "gn"), ("activation", "gelu"), ("pretrained_format", "timm"), ("output_stride", 32)],
)
def test_config_rejects_bad_choice_naming_key(key, value):
    with pytest.raises(ValueError, match=f"model.{key}"):
        ModelConfig(**{key: value})


def test_config_arch_overrides_only_for_custom_and_checked():
    with pytest.raises(ValueError, match="model.embed_dims is only used with backbone='mit_custom'"):
        ModelConfig(backbone="mit_b0", embed_dims=[8, 16, 24, 32])
    with pytest.raises(ValueError, match="model.depths must be 4 positive"):
        ModelConfig(backbone="mit_custom", depths=[1, 1, 1])
    with pytest.raises(ValueError, match=r"embed_dims\[2\]=24 is not divisible by model.num_heads\[2\]=5"):
        ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 5, 8])
    arch = ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4]).mit_arch()
    assert arch == {"embed_dims": [8, 16, 24, 32], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 3, 4], "sr_ratios": [8, 4, 2, 1]}


def test_config_from_omegaconf_structured_and_unknown_keys():
    structured = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"backbone": "mit_custom", "embed_dims": [8, 16, 24, 32], "num_heads": [1, 2, 3, 4]})
    cfg = as_model_config(structured)
    assert isinstance(cfg, ModelConfig) and cfg.embed_dims == [8, 16, 24, 32] and type(cfg.embed_dims) is list
    bad = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"head": "aspp"})
    bad.head = "fcn"  # OmegaConf does not run __post_init__; as_model_config must
    with pytest.raises(ValueError, match="model.head"):
        as_model_config(bad)
    with pytest.raises(ValueError, match=r"unknown model config keys \['heads'\]"):
        as_model_config({"heads": "simple"})


# ------------------------------------------------------------------------------------------- MiT


def test_mit_b0_output_shapes_and_parameter_counts():
    model = build_segmenter(ModelConfig(backbone="mit_b0"), [16, 5]).eval()
    out = model(torch.randn(2, 3, 64, 64), need=NEEDS)
    assert out.logits.shape == (2, 21, 64, 64)
    assert out.logits_small.shape == (2, 21, 16, 16)
    assert [tuple(s.shape) for s in out.stages] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 160, 4, 4), (2, 256, 2, 2)]
    assert out.body.shape == (2, 256, 2, 2)
    assert out.decoder.shape == (2, 256, 16, 16)
    # (B, heads, N = h·w, M = (h/R)·(w/R)); R = 8, 4, 2, 1
    assert [tuple(a.shape) for a in out.attentions] == [(2, 1, 256, 4), (2, 2, 64, 4), (2, 5, 16, 4), (2, 8, 4, 4)]
    # official MiT encoders without the ImageNet head (same counts as transformers' SegformerModel)
    assert sum(p.numel() for p in model.encoder.parameters()) == 3_319_392
    with torch.device("meta"):
        b2 = build_mit("mit_b2")
    assert sum(p.numel() for p in b2.parameters()) == 24_196_288
    assert [len(getattr(b2, f"block{s}")) for s in range(1, 5)] == [3, 4, 6, 3]


def test_mit_eps_and_drop_path_schedule():
    with torch.device("meta"):
        model = build_mit("mit_b2", drop_path=0.1)
    assert model.patch_embed1.norm.eps == 1e-5 and model.block1[0].attn.norm.eps == 1e-5
    assert model.block1[0].norm1.eps == 1e-6 and model.block4[2].norm2.eps == 1e-6 and model.norm4.eps == 1e-6
    rates = [b.drop_path.p for s in range(1, 5) for b in getattr(model, f"block{s}")]
    assert len(rates) == 16 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates[5] == pytest.approx(0.1 * 5 / 15)
    assert model.patch_embed1.proj.kernel_size == (7, 7) and model.patch_embed1.proj.stride == (4, 4) and model.patch_embed1.proj.padding == (3, 3)
    assert model.patch_embed3.proj.kernel_size == (3, 3) and model.patch_embed3.proj.stride == (2, 2)
    assert model.block1[0].attn.sr.stride == (8, 8) and not hasattr(model.block4[0].attn, "sr")


def test_requesting_attention_does_not_change_outputs():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    plain = model(x, need={"stages"})
    with_attn = model(x, need=NEEDS)
    assert plain.attentions is None
    # tiny mit_custom: dims 8/16/24/32, heads 1/2/3/4, R = 4/2/2/1 -> keys (16/4)², (8/2)², (4/2)², 2²
    assert [tuple(s.shape) for s in with_attn.stages] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)]
    assert [tuple(a.shape) for a in with_attn.attentions] == [(2, 1, 256, 16), (2, 2, 64, 16), (2, 3, 16, 4), (2, 4, 4, 4)]
    assert with_attn.decoder.shape == (2, 16, 16, 16) and with_attn.logits_small.shape == (2, 3, 16, 16)
    torch.testing.assert_close(with_attn.logits, plain.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(with_attn.stages, plain.stages):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_is_a_distribution_in_the_graph_and_matches_manual():
    model = tiny_model()
    model.eval()
    x = torch.randn(1, 3, 64, 64)  # stage 4 is 2×2: 4 keys, so its softmax is not constant
    out = model(x, need={"attentions"})
    for attn in out.attentions:
        assert attn.dtype == torch.float32 and attn.requires_grad
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    # gradient of an attention-only loss reaches the query projection of the stage-4 last block
    out.attentions[3].pow(2).sum().backward()
    assert model.encoder.block4[-1].attn.q.weight.grad.abs().sum() > 0
    # stage 4 (R = 1): recompute softmax(q kᵀ/√d) from the block input
    captured = {}
    block = model.encoder.block4[-1]
    handle = block.attn.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
    out = model(x, need={"attentions"})
    handle.remove()
    tokens = captured["x"]  # (1, N, 32) = norm1 output
    heads, dim = 4, 32
    q = block.attn.q(tokens).reshape(1, -1, heads, dim // heads).transpose(1, 2)
    k = block.attn.kv(tokens)[..., :dim].reshape(1, -1, heads, dim // heads).transpose(1, 2)
    manual = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)
    torch.testing.assert_close(out.attentions[3], manual, atol=1e-6, rtol=1e-5)


def test_need_validation_and_only_requested_outputs():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"unknown model outputs \['attn'\]"):
        model(x, need={"attn"})
    with pytest.raises(ValueError, match="got the string"):
        model(x, need="stages")
    out = model(x, need=["body"])
    assert out.body is not None and out.stages is None and out.decoder is None and out.logits_small is None and out.attentions is None
    assert out.body.shape == (1, 32, 1, 1)


def test_mit_custom_forward_backward_all_parameters_get_gradients():
    model = tiny_model(head_sizes=(3, 2)).train()
    out = model(torch.randn(2, 3, 32, 32), need={"attentions"})
    (out.logits.logsumexp(1).mean() + sum(a.mean() for a in out.attentions)).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_logits_are_bilinear_upsampling_of_small_logits():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 36, 44)  # not a multiple of 32: the simple head upsamples to the stage-1 grid
    out = model(x, need={"logits_small"})
    assert out.logits_small.shape == (1, 3, 9, 11)
    torch.testing.assert_close(out.logits, F.interpolate(out.logits_small, size=(36, 44), mode="bilinear", align_corners=False))


# ------------------------------------------------------------------------------------------- ResNet


def test_resnet50_shapes_dilations_and_preactivation():
    torch.manual_seed(0)
    model = build_segmenter(ModelConfig(backbone="resnet50", head="aspp", activation="leaky_relu"), [4]).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), need={"stages", "body", "decoder", "logits_small"})
    assert [tuple(s.shape) for s in out.stages] == [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4), (2, 2048, 4, 4)]
    assert out.body.shape == (2, 2048, 4, 4) and out.decoder.shape == (2, 256, 4, 4) and out.logits.shape == (2, 4, 64, 64)
    torch.testing.assert_close(out.body, F.leaky_relu(out.stages[-1], 0.01))
    assert (out.stages[-1] < 0).any() and (out.body >= -0.01 * out.stages[-1].abs().max()).all()
    enc = model.encoder
    assert [b.conv2.dilation for b in enc.layer4] == [(2, 2)] * 3 and enc.layer4[0].conv2.stride == (1, 1)
    assert enc.layer3[0].conv2.stride == (2, 2) and enc.layer3[0].conv2.dilation == (1, 1)
    assert model.head.map_convs[1].dilation == (6, 6) and model.head.map_convs[3].dilation == (18, 18)
    model(torch.randn(2, 3, 32, 32)).logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="no attention maps"):
        model(torch.randn(2, 3, 32, 32), need={"attentions"})


def test_resnet_output_stride_8_and_relu():
    enc = ResNetEncoder("resnet50", output_stride=8, activation="relu").eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in out.features] == [(16, 16), (8, 8), (8, 8), (8, 8)]
    assert enc.layer3[0].conv2.dilation == (2, 2) and enc.layer4[1].conv2.dilation == (4, 4)
    torch.testing.assert_close(out.features[-1], F.relu(out.stages[-1]))
    assert isinstance(ResNetEncoder("resnet50", norm="syncbn").bn1, torch.nn.SyncBatchNorm)


def test_resnet101_forward_tiny():
    torch.manual_seed(0)
    model = build_segmenter(ModelConfig(backbone="resnet101", head="aspp"), [2]).eval()
    assert len(model.encoder.layer3) == 23
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), need={"body"})
    assert out.logits.shape == (1, 2, 32, 32) and out.body.shape == (1, 2048, 2, 2)


# ------------------------------------------------------------------------------------------- heads


def test_simple_head_nearest_upsampling_and_concat_order():
    head = SimpleHead([1, 1, 1, 1], dim=1)
    with torch.no_grad():
        for proj in head.proj:
            proj.weight.fill_(1.0)
            proj.bias.zero_()
        head.fuse.weight.copy_(torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(1, 4, 1, 1))
        head.fuse.bias.fill_(0.5)
    feats = [torch.arange(n * n, dtype=torch.float32).view(1, 1, n, n) for n in (8, 4, 2, 1)]
    up = [f.repeat_interleave(8 // f.shape[-1], -1).repeat_interleave(8 // f.shape[-1], -2) for f in feats]
    expected = up[0] + 10 * up[1] + 100 * up[2] + 1000 * up[3] + 0.5
    torch.testing.assert_close(head(feats), expected)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules()) == 0


def test_segformer_head_order_bilinear_and_bn():
    head = SegFormerHead([1, 1, 1, 1], dim=1).eval()
    with torch.no_grad():
        for proj in head.proj:
            proj.weight.fill_(1.0)
            proj.bias.zero_()
        head.fuse.weight.copy_(torch.tensor([1000.0, 100.0, 10.0, 1.0]).view(1, 4, 1, 1))  # official order c4, c3, c2, c1
    feats = [torch.rand(1, 1, n, n) for n in (8, 4, 2, 1)]
    up = [F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=False) for f in feats]
    expected = F.relu((up[0] + 10 * up[1] + 100 * up[2] + 1000 * up[3]) / math.sqrt(1 + 1e-5))
    torch.testing.assert_close(head(feats), expected)
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1


@pytest.mark.parametrize("head_type, order, mode", [(SimpleHead, [0, 1, 2, 3], "nearest"),
                                                     (SegFormerHead, [3, 2, 1, 0], "bilinear")])
@pytest.mark.parametrize("sides, extra_width", [((16, 8, 4, 2), 0), ((9, 5, 3, 2), 1)])
def test_head_fuses_per_stage_as_the_concatenation_would(head_type, order, mode, sides, extra_width):
    """The composed per-stage fuse equals fuse(cat(up(proj))) in value and in every parameter's gradient:
    on MiT's power-of-two stage grids (the broadcast upsampling) and on uneven ones (F.interpolate)."""
    torch.manual_seed(0)
    head = head_type([3, 4, 5, 6], dim=7).eval()
    fuse = head.fuse
    with torch.no_grad():
        if fuse.bias is not None:
            fuse.bias.normal_()
    feats = [torch.randn(2, c, n, n + extra_width, dtype=torch.float64, requires_grad=True)
             for c, n in zip([3, 4, 5, 6], sides)]
    head = head.double()
    fused = head(feats)
    size = feats[0].shape[-2:]
    maps = [F.interpolate(proj(f), size=size, mode=mode) if mode == "nearest" else
            F.interpolate(proj(f), size=size, mode=mode, align_corners=False) for proj, f in zip(head.proj, feats)]
    reference = fuse(torch.cat([maps[s] for s in order], dim=1))
    if head_type is SegFormerHead:
        reference = F.relu(head.fuse_bn(reference))
    assert fused.shape == (2, 7, sides[0], sides[0] + extra_width)
    torch.testing.assert_close(fused, reference)
    weights = torch.randn_like(fused)
    params = [*head.parameters(), *feats]
    grads = torch.autograd.grad((fused * weights).sum(), params)
    reference_grads = torch.autograd.grad((reference * weights).sum(), params)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad)


def test_aspp_eval_pooling_window_and_global_mean():
    aspp = ASPP(in_channels=2, dim=4, hidden=4, dilations=(1, 2, 3), activation="relu").eval()
    x = torch.rand(1, 2, 40, 40)
    pooled = aspp._image_pool(x)
    assert pooled.shape == (1, 2, 40, 40)
    # output (i, j) averages the 32×32 window starting at clamp(i - 15, 0, 8)
    for i, j in [(0, 0), (20, 5), (39, 39)]:
        r, c = min(max(i - 15, 0), 8), min(max(j - 15, 0), 8)
        torch.testing.assert_close(pooled[0, :, i, j], x[0, :, r : r + 32, c : c + 32].mean(dim=(1, 2)))
    small = torch.rand(1, 2, 8, 8)  # map not larger than the window: same as the global mean
    torch.testing.assert_close(aspp._image_pool(small), small.mean(dim=(2, 3), keepdim=True).expand(1, 2, 8, 8))
    aspp.train()
    assert aspp._image_pool(x).shape == (1, 2, 1, 1)
    assert aspp([torch.rand(2, 2, 40, 40)]).shape == (2, 4, 40, 40)


# ------------------------------------------------------------------------------------------- classifier


def test_incremental_classifier_concatenates_heads_in_order():
    clf = IncrementalClassifier(4, [3, 2])
    x = torch.randn(2, 4, 5, 5)
    expected = torch.cat([F.conv2d(x, h.weight, h.bias) for h in clf.heads], dim=1)
    torch.testing.assert_close(clf(x), expected)
    assert clf.head_sizes == [3, 2] and clf.num_outputs == 5
    with pytest.raises(ValueError, match="head init must be one of"):
        clf.add_step(2, "zeros")


def test_background_init_splits_old_background_probability_exactly():
    model = tiny_model(head_sizes=(4, 2)).eval()
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)  # a non-trivial background bias
    x = torch.randn(2, 3, 32, 32)
    old = model(x).logits.softmax(1)
    b0 = model.classifier.heads[0].bias[0].item()
    model.add_step(3, init="background")
    assert model.head_sizes == [4, 2, 3]
    new = model(x).logits.softmax(1)
    assert new.shape[1] == 9
    torch.testing.assert_close(new[:, 1:6], old[:, 1:6], atol=1e-6, rtol=1e-5)
    for channel in (0, 6, 7, 8):
        torch.testing.assert_close(new[:, channel], old[:, 0] / 4, atol=1e-6, rtol=1e-5)
    head = model.classifier.heads[2]
    assert torch.equal(head.weight, model.classifier.heads[0].weight[0:1].expand(3, -1, -1, -1))
    assert head.bias.tolist() == pytest.approx([b0 - math.log(4)] * 3)
    assert model.classifier.heads[0].bias[0].item() == pytest.approx(b0 - math.log(4))


def test_unknown_and_default_init():
    clf = IncrementalClassifier(6, [3]).double()
    head = clf.add_step(2, "unknown")
    assert head.weight.dtype == torch.float64
    assert torch.equal(head.weight, clf.heads[0].weight[1:2].expand(2, -1, -1, -1))
    assert not torch.equal(head.bias, clf.heads[0].bias[1].expand(2))
    before = clf.heads[0].bias.clone()
    clf.add_step(1, "default")
    assert torch.equal(clf.heads[0].bias, before)
    with pytest.raises(ValueError, match="copies channel 1"):
        IncrementalClassifier(6, [1]).add_step(1, "unknown")


# ------------------------------------------------------------------------------------------- copies and growth


def test_frozen_copy_is_independent_eval_and_frozen():
    model = tiny_model().train()
    old = frozen_copy(model)
    assert not old.training and all(not p.requires_grad for p in old.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.classifier.heads[0].bias.add_(1.0)
    assert not torch.equal(old.classifier.heads[0].bias, model.classifier.heads[0].bias)


def test_a_grown_model_keeps_every_old_weight_and_inits_the_new_head_from_background():
    prev = tiny_model(head_sizes=(4,))
    state = prev.state_dict()
    grown = build_segmenter(ModelConfig(**TINY), [4])
    load_state_strict(grown, state, "prev.ckpt")  # the engine's path: strict load, then one new head
    grown.add_step(2, init="background")
    assert grown.head_sizes == [4, 2]
    grown_state = grown.state_dict()
    for key, value in state.items():
        if key != "classifier.heads.0.bias":
            assert torch.equal(grown_state[key], value), key
    assert grown_state["classifier.heads.0.bias"][0].item() == pytest.approx(state["classifier.heads.0.bias"][0].item() - math.log(3))
    assert torch.equal(grown_state["classifier.heads.1.weight"][1], state["classifier.heads.0.weight"][0])
    with pytest.raises(CheckpointError, match="head.fuse.bias"):
        load_state_strict(build_segmenter(ModelConfig(**TINY), [4]), {k: v for k, v in state.items()
                                                                       if k != "head.fuse.bias"}, "prev.ckpt")
