"""SATS: composition of its terms, gradients, switches, and tiny end-to-end runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.engine.runner import Runner
from sats.losses.attention import sats_attention_loss
from sats.losses.ce import cross_entropy
from sats.losses.kd import unbiased_kd
from sats.methods import build_method, validate_method_config
from sats.methods.base import Batch
from sats.models.config import ModelConfig
from sats.models.segmenter import build_segmenter, frozen_copy

TINY = ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                   sr_ratios=[8, 4, 2, 1], decoder_dim=16, drop_path=0.0)


def _method(**params):
    return build_method(validate_method_config({"name": "sats", **params}))


class _Ctx:
    """The few StepContext fields SATS reads in ``loss``."""

    def __init__(self, step, num_old, num_outputs):
        from types import SimpleNamespace

        self.step, self.num_old, self.num_outputs = step, num_old, num_outputs
        self.cfg = SimpleNamespace(memory=SimpleNamespace(reference_labels=False))


def _models(num_old=3, num_new=2):
    torch.manual_seed(0)
    old = build_segmenter(TINY, [num_old])
    new = build_segmenter(TINY, [num_old])
    new.load_state_dict(old.state_dict())
    new.add_step(num_new, init="background")
    return new, frozen_copy(old)


def _batch(num_old=3, num_new=2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)  # 64 px: the tiny MiT's stage 1 attends to 2x2 reduced keys
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, :32, :32] = num_old  # a new class
    labels[1, 32:, 16:48] = num_old + 1
    labels[1, :2] = 255
    return Batch(images, labels)


def test_loss_is_the_documented_composition():
    method = _method(lambda_kd=7.0, lambda_sat=3.0)
    new, old = _models()
    batch = _batch()
    out = new(batch.images, need=method.needs)
    old_out = old(batch.images, need=method.old_needs)
    method.pseudo.thresholds = torch.full((3,), 1.01)  # accept every background pixel (uncertainty <= 1)
    terms = method.loss(batch, out, old_out, _Ctx(1, 3, 5))
    assert set(terms) == {"ce", "unkd", "sat"}
    pseudo, _ = method.pseudo.pseudo_labels(batch.labels, old_out.logits, 5)
    assert torch.allclose(terms["ce"], cross_entropy(out.logits, pseudo))
    assert torch.allclose(terms["unkd"], 7.0 * unbiased_kd(out.logits, old_out.logits))
    assert torch.allclose(terms["sat"], 3.0 * sats_attention_loss(out.attentions, old_out.attentions, pseudo))
    # the model is asked only for attention maps, not for features SATS does not read
    assert method.needs == frozenset({"attentions"}) and method.old_needs == frozenset({"attentions"})


def test_gradient_reaches_new_attention_parameters_and_not_the_old_model():
    method = _method(lambda_kd=0.0, lambda_sat=1.0)
    new, old = _models()
    with torch.no_grad():  # make the two models differ so the transfer loss is non-zero
        for p in new.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    out = new(batch.images, need=method.needs)
    with torch.no_grad():
        old_out = old(batch.images, need=method.old_needs)
    method.pseudo.thresholds = torch.full((3,), 1.01)
    sat = method.loss(batch, out, old_out, _Ctx(1, 3, 5))["sat"]
    assert sat.item() > 0
    sat.backward()
    q_grads = [p.grad for n, p in new.encoder.named_parameters() if ".attn.q." in n and n.endswith("weight")]
    assert q_grads and all(g is not None and g.abs().sum() > 0 for g in q_grads)
    assert all(p.grad is None and not p.requires_grad for p in old.parameters())
    # the classifier is not part of the attention path
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in new.classifier.parameters())


def _perturbed_attention():
    """A batch and the attention outputs of a new model (encoder nudged away from the old one) and the old one."""
    new, old = _models()
    with torch.no_grad():
        for p in new.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    return batch, new(batch.images, need={"attentions"}), old(batch.images, need={"attentions"})


def test_reference_layout_switch_changes_the_loss_only_with_several_heads():
    batch, out, old_out = _perturbed_attention()
    values = {}
    for ref in (False, True):
        m = _method(reference_attention_layout=ref, lambda_kd=0.0)
        m.pseudo.thresholds = torch.full((3,), 1.01)
        values[ref] = m.loss(batch, out, old_out, _Ctx(1, 3, 5))["sat"].item()
    assert not math.isclose(values[False], values[True], rel_tol=1e-6)  # stages 2-4 have 2-4 heads
    one_head = [a[:, :1] for a in out.attentions], [a[:, :1] for a in old_out.attentions]
    pseudo = torch.zeros(2, 64, 64, dtype=torch.long)
    pseudo[:, :16] = 1
    assert sats_attention_loss(*one_head, pseudo, reference_layout=True).item() == pytest.approx(
        sats_attention_loss(*one_head, pseudo, reference_layout=False).item())


def test_ablation_weights_and_bad_values():
    assert _method(pooling="global", lambda_sat=20.0)._transfer_weight() == 20.0
    assert _method(pooling="global", lambda_sat=20.0, reference_ablation_weight=True)._transfer_weight() == 1.0
    assert _method(pooling="class", lambda_sat=20.0, reference_ablation_weight=True)._transfer_weight() == 20.0
    features = _method(source="features")
    assert features.needs == frozenset({"stages", "decoder"})
    with pytest.raises(ConfigError, match="pooling"):
        validate_method_config({"name": "sats", "pooling": "max"})
    with pytest.raises(ConfigError, match="pooling=class only"):
        validate_method_config({"name": "sats", "source": "features", "pooling": "plop"})
    with pytest.raises(ConfigError, match="lambda_sat"):
        validate_method_config({"name": "sats", "lambda_sat": -1.0})


def test_reference_ablation_weight_gives_lambda_only_to_class_pooled_attention():
    """The release multiplies only ``sats-selfattn`` by λ_sat (docs/methods.md §6 item 23): the CNN-feature
    variant (class pooling, source=features) gets weight 1 too."""
    def weight(**params):
        return _method(lambda_sat=20.0, reference_ablation_weight=True, **params)._transfer_weight()

    assert weight(source="features", pooling="class") == 1.0
    assert weight(source="attention", pooling="class") == 20.0
    assert weight(pooling="none") == weight(pooling="global") == weight(pooling="plop") == 1.0
    # without the switch every variant gets λ_sat (the bytecode's weighting)
    for params in ({"source": "features"}, {"pooling": "none"}, {"pooling": "global"}, {"pooling": "plop"}):
        assert _method(lambda_sat=20.0, **params)._transfer_weight() == 20.0


def test_plop_selfattn_term_is_the_scaled_per_row_distance():
    batch, out, old_out = _perturbed_attention()
    no_pooling = sats_attention_loss(out.attentions, old_out.attentions, None, pooling="none")
    for reference_weight, lam in ((True, 1.0), (False, 3.0)):
        method = _method(pooling="plop", lambda_sat=3.0, lambda_kd=0.0, reference_ablation_weight=reference_weight)
        assert method.needs == frozenset({"attentions"})
        method.pseudo.thresholds = torch.full((3,), 1.01)
        sat = method.loss(batch, out, old_out, _Ctx(1, 3, 5))["sat"]
        # K_t = 5 channels, |C^t| = 2 new classes: 100 · sqrt(5 / 2) times the NP value
        assert sat.item() == pytest.approx(lam * 100 * math.sqrt(5 / 2) * no_pooling.item(), rel=1e-6)
        assert sat.item() > 0


def test_plop_selfattn_ablation_configs_load():
    from conftest import CONFIGS

    for task in ("15-1", "15-5"):
        path = CONFIGS / "voc" / "ablations" / f"sats-plop-selfattn_mit-b2_voc-{task}.yaml"
        cfg = load_experiment(path)
        assert cfg.name == path.stem and cfg.data.task == task and cfg.method_name == "sats"
        assert cfg.model.backbone == "mit_b2" and cfg.data.overlap and not cfg.memory.enabled
        assert cfg.method["pooling"] == "plop" and cfg.method["reference_ablation_weight"] is True
        assert build_method(validate_method_config(dict(cfg.method)))._transfer_weight() == 1.0


def test_plop_selfattn_trains_one_tiny_step(tiny_run):
    cfg = tiny_run("sats", config="demo/sats.yaml", **{"method.pooling": "plop",
                                                       "method.reference_ablation_weight": True})
    rows = Runner(cfg).run()
    losses = rows[1]["epoch_losses"]
    assert set(losses) == {"ce", "unkd", "sat"}
    assert all(math.isfinite(v) for vs in losses.values() for v in vs)
    assert losses["sat"][-1] > 0  # zero at the first iteration (the new model is a copy), then not


def test_step0_is_plain_ce_and_shared_with_ft():
    method = _method()
    assert method.step0_key() == build_method(validate_method_config({"name": "ft"})).step0_key()
    new, _ = _models()
    batch = _batch()
    out = new(batch.images)
    terms = method.loss(batch, out, None, _Ctx(0, 0, 5))
    assert set(terms) == {"ce"}


def test_two_tiny_steps_and_zero_transfer_at_the_first_iteration(tiny_run, monkeypatch):
    cfg = tiny_run("sats", config="demo/sats.yaml", **{"data.crop_size": 64, "data.eval_size": 64,
                                                       "train.epochs_incremental": 2})
    runner = Runner(cfg)
    first = {}
    original = runner.method.loss

    def spy(batch, out, old_out, ctx):
        terms = original(batch, out, old_out, ctx)
        if ctx.step == 1 and "sat" not in first:
            first["sat"] = terms["sat"].item()  # the new model starts as a copy of the old one
        return terms

    monkeypatch.setattr(runner.method, "loss", spy)
    rows = runner.run()
    assert first["sat"] == pytest.approx(0.0, abs=1e-6)
    losses = rows[1]["epoch_losses"]
    assert set(losses) == {"ce", "unkd", "sat"}
    assert all(math.isfinite(v) for vs in losses.values() for v in vs)
    assert losses["sat"][-1] > 0  # the models drift apart once training moves the new one
    saved = json.loads((cfg.resolved_run_dir() / "results.json").read_text())
    assert saved["method"] == "sats" and len(saved["steps"]) == 2
