"""RCIL's model side: RC modules (twin branches, mix, merge, freeze), pretrained weights into both branches,
the ``features`` output, ``model.stem_activation``, and non-RC models left bit-identical."""

import hashlib
import re

import pytest
import torch
import torch.nn.functional as F
from test_weights import to_hf_hub_names, to_iabn_names
from torch import nn

from sats.config import LATER_DEFAULTS, ConfigError, load_config, without_later_defaults
from sats.engine.checkpoint import load_state_strict
from sats.models import (
    ModelConfig,
    build_segmenter,
    load_encoder_state,
    load_encoder_weights,
)
from sats.models.builtin import builtin_record
from sats.models.mit import MixTransformer
from sats.models.reparam import (
    RCConv,
    freeze_merged_branches,
    has_rc_branches,
    merge_rc_branches,
    mix_branches,
    rc_merged_parameters,
    rc_modules,
)
from sats.models.resnet import ResNetEncoder

TINY_MIT = {"backbone": "mit_custom", "embed_dims": [8, 16, 24, 32], "depths": [1, 2, 1, 1], "num_heads": [1, 2, 3, 4],
            "sr_ratios": [4, 2, 2, 1], "decoder_dim": 16}
TINY_R50 = {"backbone": "resnet50", "decoder_dim": 16}
#: (name, model config) of every RC model the merge is checked on: each head, both encoders
RC_MODELS = [
    ("mit_simple", {**TINY_MIT, "head": "simple"}),
    ("mit_segformer", {**TINY_MIT, "head": "segformer"}),
    ("r50_aspp", {**TINY_R50, "head": "aspp"}),
    ("r50_aspp_tv", {**TINY_R50, "head": "aspp_tv", "activation": "relu"}),
]


def build(seed: int = 0, head_sizes=(3, 2), **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return build_segmenter(ModelConfig(**cfg), list(head_sizes))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN statistics / affine and conv biases, so that every fold term counts."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.2)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            sign = torch.randint(0, 2, (module.num_features,), generator=gen) * 2 - 1  # PyTorch BN: γ, not |γ|
            module.weight.copy_(sign * (torch.rand(module.num_features, generator=gen) * 0.5 + 0.25))
            module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.2)
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model


def perturb_branch_b(model: nn.Module, seed: int) -> None:
    """Stand-in for a step of training: every branch-B tensor moves."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in rc_modules(model):
            for p in [*module.conv_b.parameters(), *(module.norm_b.parameters() if module.norm_b is not None else ())]:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def images(seed: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


def module_io(model: nn.Module, x: torch.Tensor) -> dict[RCConv, tuple[torch.Tensor, torch.Tensor]]:
    """Eval input and output of every RC module on ``x``."""
    seen: dict[RCConv, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, (inp[0], out))) for m in rc_modules(model)]
    eval_logits(model, x)
    for hook in hooks:
        hook.remove()
    return seen


def scalar_bn(gamma: float, beta: float, mean: float, var: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(1, eps=0.0)
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.bias.fill_(beta)
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
    return bn


def hand_module() -> RCConv:
    """§11 test 1: A(x) = 2x / 2 = x (W 2, γ 1, β 0, μ 0, σ² 4); B(x) = 0.5 (4x − 2) + 1 = 2x."""
    norms = iter([scalar_bn(1.0, 0.0, 0.0, 4.0), scalar_bn(0.5, 1.0, 2.0, 1.0)])
    module = RCConv(lambda: nn.Conv2d(1, 1, 1, bias=False), lambda: next(norms))
    with torch.no_grad():
        module.conv_a.weight.fill_(2.0)
        module.conv_b.weight.fill_(4.0)
    return module.eval()


THREE = torch.full((1, 1, 1, 1), 3.0)


# ------------------------------------------------------------------------------------ merge, hand cases


def test_hand_case_merge_equals_the_eval_mix():
    module = hand_module()
    assert module.branch_a(THREE).item() == 3.0 and module.branch_b(THREE).item() == 6.0
    assert module(THREE).item() == 4.5
    merge_rc_branches(module)
    assert module.conv_a.weight.item() == 1.5 and module.conv_a.bias.item() == 0.0
    assert module.is_merged and bool(module.merged)
    assert module.branch_a(THREE).item() == pytest.approx(4.5, abs=1e-6)


def test_step_t_init_keep_gives_quarter_three_quarters_and_merged_keeps_the_function():
    keep = hand_module()
    b_before = {k: v.clone() for k, v in keep.state_dict().items() if "_b." in k}
    assert merge_rc_branches(keep, "keep") == 1
    assert keep(THREE).item() == pytest.approx(5.25, abs=1e-6)  # ½·4.5 + ½·6, not 4.5
    assert all(torch.equal(keep.state_dict()[k], v) for k, v in b_before.items())
    merged = hand_module()
    merge_rc_branches(merged, "merged")
    assert merged(THREE).item() == pytest.approx(4.5, abs=1e-6)
    assert merged.branch_b(THREE).item() == pytest.approx(4.5, abs=1e-6)
    with pytest.raises(ValueError, match="trainable_branch_init"):
        merge_rc_branches(hand_module(), "reset")


def test_nested_merge_3x3_eight_channels():
    torch.manual_seed(0)
    module = randomise(RCConv(lambda: nn.Conv2d(8, 8, 3, padding=1, bias=False), lambda: nn.BatchNorm2d(8)), seed=3).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        first = module(x)
        merge_rc_branches(module)
        torch.testing.assert_close(module.branch_a(x), first, atol=1e-6, rtol=0)
        randomise(module.norm_b, seed=4)  # a new branch B'
        module.conv_b.weight.normal_(0.0, 0.1)
        expected = 0.5 * module.branch_a(x) + 0.5 * module.branch_b(x)
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=0)
        merge_rc_branches(module)
        torch.testing.assert_close(module.branch_a(x), expected, atol=1e-6, rtol=0)
        module.norm_a.running_mean.fill_(5.0)  # skipped once merged: no effect
        torch.testing.assert_close(module.branch_a(x), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- mixing


def test_mix_forced_draws_and_eval_average():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = mix_branches(a, b, torch.tensor([0.1, 0.5, 0.9]))
    assert torch.equal(out[:, 0], a[:, 0]) and torch.equal(out[:, 1], b[:, 1])
    assert torch.equal(out[:, 2], (a[:, 2] + b[:, 2]) / 2)
    assert torch.equal(mix_branches(a, b), (a + b) / 2)
    edges = mix_branches(a, b, torch.tensor([0.329, 0.33, 0.66]))  # the thresholds: [0, 0.33) A, [0.33, 0.66) B
    assert torch.equal(edges, torch.stack([a[:, 0], b[:, 1], (a[:, 2] + b[:, 2]) / 2], 1))


def test_drop_path_frequencies_shared_per_channel_and_eval_average():
    channels, calls = 1000, 100  # 10^5 draws
    module = RCConv(lambda: nn.Conv2d(1, channels, 1))
    with torch.no_grad():  # A ≡ 0, B ≡ 1: the output tells which case each channel drew
        for conv, value in ((module.conv_a, 0.0), (module.conv_b, 1.0)):
            conv.weight.zero_()
            conv.bias.fill_(value)
    x = torch.randn(2, 1, 3, 3)
    module.train()
    torch.manual_seed(0)
    counts = torch.zeros(3)
    with torch.no_grad():
        for _ in range(calls):
            out = module(x)
            per_channel = out[0, :, 0, 0]
            assert torch.equal(out, per_channel.view(1, -1, 1, 1).expand_as(out))  # one draw for batch and pixels
            counts += torch.stack([(per_channel == v).sum() for v in (0.0, 1.0, 0.5)]).float()
        assert counts.sum() == channels * calls
        freq = counts / counts.sum()
        assert abs(freq[0] - 0.33) < 0.01 and abs(freq[1] - 0.33) < 0.01 and abs(freq[2] - 0.34) < 0.01
        torch.manual_seed(7)
        first = module(x)
        torch.manual_seed(7)
        assert torch.equal(module(x), first)  # the global CPU RNG
        assert torch.equal(module.eval()(x), torch.full_like(out, 0.5))


# --------------------------------------------------------------------------------- merge on whole models


@pytest.mark.parametrize("name, cfg", RC_MODELS, ids=[n for n, _ in RC_MODELS])
def test_merge_on_models_is_exact_nested_and_strictly_reloadable(name, cfg):
    model = randomise(build(**cfg, rc_branches=True))
    x = images()
    assert has_rc_branches(model) and not rc_merged_parameters(model)
    expected_count = {"mit_simple": 5 + 1, "mit_segformer": 5 + 1, "r50_aspp": 16 + 4, "r50_aspp_tv": 16 + 4}[name]
    assert len(rc_modules(model)) == expected_count
    keys = list(model.state_dict())
    before = module_io(model, x)
    # step 1, reference init: every merged branch A alone computes its module's step-0 eval output
    assert merge_rc_branches(model, "keep") == expected_count
    with torch.no_grad():
        for module, (inp, out) in before.items():
            torch.testing.assert_close(module.branch_a(inp), out, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys
    # a fresh RC model takes the merged checkpoint strictly and computes the same
    fresh = build(seed=9, **cfg, rc_branches=True)
    load_state_strict(fresh, model.state_dict(), "merged")
    assert all(m.is_merged for m in rc_modules(fresh))
    torch.testing.assert_close(eval_logits(fresh, x), eval_logits(model, x), atol=0, rtol=0)
    # step 2: branch B has trained; a nested merge with the "merged" init keeps the network's eval function
    perturb_branch_b(model, seed=5)
    step1 = eval_logits(model, x)
    merge_rc_branches(model, "merged")
    torch.testing.assert_close(eval_logits(model, x), step1, atol=1e-5, rtol=1e-5)


def test_merged_init_keeps_a_model_and_keep_changes_it():
    model = randomise(build(**TINY_MIT, head="segformer", rc_branches=True))
    x = images()
    step0 = eval_logits(model, x)
    kept = randomise(build(**TINY_MIT, head="segformer", rc_branches=True))
    merge_rc_branches(model, "merged")
    merge_rc_branches(kept, "keep")
    torch.testing.assert_close(eval_logits(model, x), step0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eval_logits(kept, x), step0, atol=1e-3)


def test_freeze_merged_branches_and_step0_gradients():
    model = build(**TINY_R50, head="aspp", rc_branches=True).train()
    first = rc_modules(model)[0]
    assert not first.conv_a.bias.requires_grad and not first.conv_a.bias.any()  # zero, frozen: a BN follows
    model(images()).logits.sum().backward()
    assert first.conv_a.weight.grad is not None and first.conv_b.weight.grad is not None
    assert freeze_merged_branches(model) == 0  # nothing merged yet
    merge_rc_branches(model)
    frozen = rc_merged_parameters(model)
    assert freeze_merged_branches(model) == len(frozen) == 20 * 4  # conv weight, bias, BN weight, bias
    ids = {id(p) for p in frozen}
    for module in rc_modules(model):
        assert {id(p) for p in module.merged_parameters()} <= ids
        assert all(p.requires_grad for p in module.conv_b.parameters())
    mit = build(**TINY_MIT, rc_branches=True)
    assert rc_modules(mit)[0].conv_a.bias.requires_grad  # the MiT dw-conv has its own bias: trained at step 0


# -------------------------------------------------------------------------------------- pretrained weights


def branch_pairs(encoder: nn.Module):
    """(plain conv key, RC module) of every RC module of ``encoder``."""
    return [(name, module) for name, module in encoder.named_modules() if isinstance(module, RCConv)]


def assert_both_branches_hold(encoder: nn.Module, plain: dict[str, torch.Tensor]) -> None:
    """Both branches of every RC module of ``encoder`` hold exactly the plain encoder's tensors."""
    pairs = branch_pairs(encoder)
    assert pairs
    for name, module in pairs:
        parent = name.rpartition(".")[0]
        for branch in ("a", "b"):
            conv = getattr(module, f"conv_{branch}")
            torch.testing.assert_close(conv.weight, plain[f"{name}.weight"], atol=0, rtol=0)
            if module.plain_bias:
                torch.testing.assert_close(conv.bias, plain[f"{name}.bias"], atol=0, rtol=0)
            if module.plain_norm is not None:
                norm = getattr(module, f"norm_{branch}")
                for key, value in norm.state_dict().items():
                    if key != "num_batches_tracked":
                        torch.testing.assert_close(value, plain[f"{parent}.{module.plain_norm}.{key}"], atol=0, rtol=0)
        assert not module.is_merged
        if not module.plain_bias:
            assert not module.conv_a.bias.any()


@pytest.fixture(scope="module")
def plain_resnet50():
    torch.manual_seed(0)
    model = randomise(ResNetEncoder("resnet50"), seed=6)
    return model


@pytest.mark.parametrize("fmt", ["torchvision", "iabn"])
def test_resnet_weights_go_into_both_branches(plain_resnet50, fmt):
    state = plain_resnet50.state_dict()
    foreign = to_iabn_names(state) if fmt == "iabn" else {**state, "fc.weight": torch.zeros(10, 2048)}
    target, plain = ResNetEncoder("resnet50", rc_branches=True), ResNetEncoder("resnet50")
    report = load_encoder_state(target, foreign)
    assert report.format == fmt and report.missing == [] and report.unexpected == []
    load_encoder_state(plain, foreign)
    assert_both_branches_hold(target, plain.state_dict())
    # a checkpoint without one conv2 reports both branches missing, the RC-only keys never
    del foreign["layer1.0.conv2.weight" if fmt == "torchvision" else "module.mod2.block1.convs.conv2.weight"]
    report = load_encoder_state(ResNetEncoder("resnet50", rc_branches=True), foreign, partial=True)
    assert report.missing == ["layer1.0.conv2.conv_a.weight", "layer1.0.conv2.conv_b.weight"]


def test_mit_weights_go_into_both_branches_in_every_format(tmp_path):
    source = build(**TINY_MIT).encoder
    randomise(source, seed=7)
    state = source.state_dict()
    for fmt, foreign in (("mit", {**state, "head.weight": torch.zeros(10, 32)}), ("hf", to_hf_hub_names(state, "segformer."))):
        target = build(seed=3, **TINY_MIT, rc_branches=True).encoder
        report = load_encoder_state(target, foreign)
        assert report.format == fmt and report.missing == [] and report.unexpected == []
        assert_both_branches_hold(target, state)
        assert len(report.loaded) == len(state) + 2 * 5  # 5 dw-convs: weight and bias once more, for branch B
    record = builtin_record("mit-tiny-synthetic")["model"]
    arch = {k: record[k] for k in ("embed_dims", "depths", "num_heads", "sr_ratios")}
    plain, twin = MixTransformer(**arch), MixTransformer(**arch, rc_branches=True)
    load_encoder_weights(plain, "builtin:mit-tiny-synthetic")
    report = load_encoder_weights(twin, "builtin:mit-tiny-synthetic")
    assert report.missing == [] and report.unexpected == []
    assert_both_branches_hold(twin, plain.state_dict())
    path = tmp_path / "enc.pth"
    torch.save(state, path)
    model = build_segmenter(ModelConfig(**TINY_MIT, rc_branches=True, pretrained=str(path)), [3])
    assert_both_branches_hold(model.encoder, state)


# ----------------------------------------------------------------------------------------- features output


def test_features_output_resnet_activated_mit_stages():
    model = build(**TINY_R50, head="aspp", activation="leaky_relu", rc_branches=True).eval()
    with torch.no_grad():
        out = model(images(), need={"features", "stages", "body"})
        plain = model(images())
    assert plain.features is None
    assert [tuple(f.shape) for f in out.features] == [(2, 256, 8, 8), (2, 512, 4, 4), (2, 1024, 2, 2), (2, 2048, 2, 2)]
    for feature, stage in zip(out.features, out.stages, strict=True):
        torch.testing.assert_close(feature, F.leaky_relu(stage, 0.01))
    assert out.features[-1] is out.body or torch.equal(out.features[-1], out.body)
    mit = build(**TINY_MIT).eval()
    with torch.no_grad():
        out = mit(images(), need={"features", "stages"})
    assert [tuple(f.shape) for f in out.features] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 24, 2, 2), (2, 32, 1, 1)]
    assert all(f is s for f, s in zip(out.features, out.stages, strict=True))


# ------------------------------------------------------------------------------------ stem and config keys


def test_stem_activation_switch():
    default = build(**TINY_R50, head="aspp")
    bare = build(**TINY_R50, head="aspp", stem_activation=False)
    assert list(bare.state_dict()) == list(default.state_dict())
    bare.load_state_dict(default.state_dict())
    x = images()
    assert not torch.allclose(eval_logits(bare, x), eval_logits(default, x))

    def body(encoder: ResNetEncoder, stem_act: bool) -> torch.Tensor:
        out = encoder.bn1(encoder.conv1(x))
        out = encoder.maxpool(F.leaky_relu(out, 0.01) if stem_act else out)
        for stage in range(1, 5):
            for block in getattr(encoder, f"layer{stage}"):
                out, _ = block(out)
        return out

    with torch.no_grad():
        for model, stem_act in ((bare, False), (default, True)):
            torch.testing.assert_close(model.encoder(x).features[-1], body(model.encoder, stem_act), atol=0, rtol=0)
    with pytest.raises(ValueError, match="stem_activation"):
        ModelConfig(**TINY_MIT, stem_activation=False)


def test_config_keys_validated_and_registered_as_later_defaults():
    with pytest.raises(ValueError, match="model.rc_branches"):
        ModelConfig(rc_branches="yes")
    assert LATER_DEFAULTS["model.rc_branches"] is False and LATER_DEFAULTS["model.stem_activation"] is True
    cfg = load_config(None, ["model.rc_branches=true", "model.backbone=resnet50", "model.stem_activation=false"])
    assert cfg.model.rc_branches is True and cfg.model.stem_activation is False
    with pytest.raises(ConfigError, match="model.stem_activation=false is a ResNet option"):
        load_config(None, ["model.stem_activation=false"])  # the default backbone is a MiT
    trimmed = without_later_defaults({"rc_branches": False, "stem_activation": True, "head": "aspp"}, "model.")
    assert trimmed == {"head": "aspp"}


# ------------------------------------------------------------------- non-RC models: bit-identical to before

#: recorded with the code before RC modules existed (same seeds, 1 thread as in conftest): state-dict key digest,
#: key count, eval logits sum and |sum|, train-mode |sum| (seed 5), |sum| of every state tensor
BEFORE = {
    "mit_simple": ("95e382577bd4df5b", 134, -139.18973259895574, 1381.1217509014532, 1381.166275350377, 3891.9945130249152),
    "mit_segformer": ("8298a992370d7cee", 138, -62.472900389984716, 2254.1092850614223, 4944.123273561243, 3922.371295739421),
    "r50_aspp": ("5d8a29917bc6598a", 344, -310.1106361498969, 4402.957186487722, 3086.213939692476, 785321.8249136811),
    "r50_aspp_tv": ("e04beba77a965fa1", 364, 248.52362690662267, 3105.7840033958782, 2751.544790965927, 781795.5902713169),
}


@pytest.mark.parametrize("name, cfg", RC_MODELS, ids=[n for n, _ in RC_MODELS])
def test_default_models_unchanged(name, cfg):
    model = build(**cfg)
    assert not has_rc_branches(model)
    keys = list(model.state_dict())
    assert not any(re.search(r"conv_[ab]|norm_[ab]|merged", k) for k in keys)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits = eval_logits(model, x).double()
    model.train()
    torch.manual_seed(5)
    with torch.no_grad():
        train_logits = model(x).logits.double()
    weights = torch.cat([v.double().flatten() for v in model.state_dict().values()]).abs().sum().item()
    got = (hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16], len(keys), logits.sum().item(),
           logits.abs().sum().item(), train_logits.abs().sum().item(), weights)
    assert got[:2] == BEFORE[name][:2]  # same keys, in the same order
    assert got[5] == pytest.approx(BEFORE[name][5], rel=1e-7)  # same initial weights (same RNG use)
    assert got[2:5] == pytest.approx(BEFORE[name][2:5], rel=1e-4)  # same forward (recorded on 1 thread)
