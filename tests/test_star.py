"""STAR (docs/methods.md §3.15): the hand-computable cases of its statistics, replay counts, rebalanced BCE,
OCFM, SAD, thresholds and grid rule, no logit distillation, and tiny runs (step 0 from the shared cache too)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sats.config import TrainConfig
from sats.engine.optim import build_optimizer, optimizer_groups
from sats.losses.prototypes import (class_feature_sums, feature_statistics, grid_sample_positions, masked_feature_mse,
                                    prototype_separation, replay_plan, synthetic_features)
from sats.losses.sigmoid import foreground_prediction, mbce
from sats.methods import build_method
from sats.models import ModelConfig, build_segmenter
from sats.models.segmenter import ModelOutput

LN2 = math.log(2.0)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# -- 1: prototype statistics ---------------------------------------------------------------------------------
def test_prototype_statistics_of_two_positions():
    features = torch.tensor([[3.0, 0.0], [4.0, 2.0]]).view(1, 2, 1, 2)  # (B, D, 1, 2): f = [3, 4] and [0, 2]
    labels = torch.tensor([[[7, 7]]])
    stats = feature_statistics(class_feature_sums(features, labels, torch.tensor([7])))
    torch.testing.assert_close(stats["prototype"][0], torch.tensor([0.31623, 0.94868]), atol=1e-5, rtol=0)
    assert stats["norm_mean"].item() == pytest.approx(3.5)
    assert stats["norm_std"].item() == pytest.approx(2.12132, abs=1e-5)  # unbiased
    torch.testing.assert_close(stats["spread"][0], torch.tensor([0.30044, 0.11122]), atol=1e-5, rtol=0)
    empty = feature_statistics(class_feature_sums(features, labels, torch.tensor([8])))
    assert not any(t.abs().sum() for t in empty.values())  # no position: zeros, never NaN


# -- 2-3: replay counts --------------------------------------------------------------------------------------
def test_replay_counts_overlapped_and_disjoint():
    previous, predicted = torch.tensor([1000.0, 600, 90]), torch.tensor([400.0, 100, 30])
    plan = replay_plan(previous, predicted, iterations=10, num_new=1, overlap=True)
    assert plan.per_class.tolist() == [50, 6] and plan.background_ratio == pytest.approx(1.975)
    assert plan.numbers.tolist() == [1190.0, 600.0, 90.0]
    plan = replay_plan(previous, predicted, iterations=10, num_new=1, overlap=False)
    assert plan.per_class.tolist() == [60, 9] and plan.background_ratio == pytest.approx(2.5)
    assert plan.numbers.tolist() == [1400.0, 700.0, 120.0]


def test_replay_counts_truncate_and_clamp():
    plan = replay_plan(torch.tensor([10.0, 35, 59]), torch.tensor([0.0, 50, 0]), iterations=10, num_new=1)
    assert plan.per_class.tolist() == [0, 5] and plan.background_ratio == 0.0  # no predicted background: ρ = 0


# -- 4: pooling weights of the rebalanced BCE ----------------------------------------------------------------
def _star_ctx(method, k: int = 2, num_new: int = 1, dim: int = 2):
    model = build_segmenter(ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                        num_heads=[1, 2, 2, 4], sr_ratios=[8, 4, 2, 1], decoder_dim=dim), [k, num_new])
    return SimpleNamespace(step=1, num_old=k, num_outputs=k + num_new, model=model)


def test_rebalanced_bce_pools_replay_and_background_by_their_counts():
    """N = 2, a 2×2 grid each (|G| = 8), Q = 4 replayed features, M = 3 background positions, ρ = 1.975."""
    method = build_method({"name": "star", "grid_stride": 2, "lambda_ocfm": 0.0, "lambda_sad": 0.0})
    ctx = _star_ctx(method)
    head = ctx.model.classifier.heads[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.5)  # replayed and background logits: 0.5
    method.stats = {"numbers": torch.tensor([1.0, 1.0]), "prototypes": torch.tensor([[1.0, 0.0]]),
                    "spread": torch.zeros(1, 2), "norm_mean": torch.ones(1), "norm_std": torch.zeros(1)}
    method.pending = {"step": 1, "per_class": torch.tensor([4]), "background_ratio": 1.975}
    labels = torch.full((2, 4, 4), 255, dtype=torch.long)
    labels[0, 1, 1] = labels[0, 1, 3] = labels[1, 3, 1] = 0  # three grid pixels (offset 1, stride 2) labelled 0
    out = ModelOutput(logits=torch.full((2, 3, 4, 4), -1.0), decoder=torch.ones(2, 2, 2, 2))
    old_out = ModelOutput(logits=torch.full((2, 2, 4, 4), -3.0), decoder=torch.ones(2, 2, 2, 2))
    terms = method.loss(SimpleNamespace(labels=labels), out, old_out, ctx)
    w_f, w_b = 4 / 8, 1.975 * 3 / 8
    assert (w_f, w_b) == pytest.approx((0.5, 0.740625))
    expected = (_softplus(-1.0) + w_f * _softplus(0.5) + w_b * _softplus(0.5)) / (1 + w_f + w_b)
    assert terms["mbce"].item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        head.bias.zero_()
    out = ModelOutput(logits=torch.zeros(2, 3, 4, 4), decoder=torch.ones(2, 2, 2, 2))
    assert method.loss(SimpleNamespace(labels=labels), out, old_out, ctx)["mbce"].item() == pytest.approx(LN2)


def test_empty_replay_and_empty_background_are_finite():
    method = build_method({"name": "star", "grid_stride": 2})
    ctx = _star_ctx(method)
    method.stats = {"numbers": torch.tensor([1.0, 1.0]), "prototypes": torch.tensor([[1.0, 0.0]]),
                    "spread": torch.zeros(1, 2), "norm_mean": torch.ones(1), "norm_std": torch.zeros(1)}
    method.pending = {"step": 1, "per_class": torch.tensor([0]), "background_ratio": 2.0}
    labels = torch.full((1, 4, 4), 2, dtype=torch.long)  # no background, no old class anywhere
    out = ModelOutput(logits=torch.zeros(1, 3, 4, 4), decoder=torch.rand(1, 2, 2, 2))
    old_out = ModelOutput(logits=torch.full((1, 2, 4, 4), -3.0), decoder=torch.rand(1, 2, 2, 2))
    terms = method.loss(SimpleNamespace(labels=labels), out, old_out, ctx)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["ocfm"].item() == 0.0


# -- 5: replay with zero spread ------------------------------------------------------------------------------
def test_replay_with_zero_spread_and_std_is_the_scaled_prototype():
    prototypes = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    index = torch.tensor([0, 0, 1])
    for per_element in (False, True):
        replayed = synthetic_features(prototypes, torch.zeros(2, 2), torch.tensor([2.0, 5.0]), torch.zeros(2), index,
                                      per_element_norm=per_element)
        assert torch.equal(replayed, torch.tensor([[1.2, 1.6], [1.2, 1.6], [5.0, 0.0]]))
    torch.manual_seed(0)
    per_feature = synthetic_features(prototypes, torch.zeros(2, 2), torch.ones(2), torch.ones(2), index)
    ratio = per_feature / prototypes[index].clamp_min(1e-9)
    assert torch.allclose(ratio[:2, 0], ratio[:2, 1])  # one norm per feature keeps its direction


# -- 6: OCFM -------------------------------------------------------------------------------------------------
def test_ocfm_masked_mean_and_empty_mask():
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # channel × position
    old = torch.zeros(1, 2, 1, 2)
    assert masked_feature_mse(new, old, torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)).item() == pytest.approx(5.0)
    assert masked_feature_mse(new, old, torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)).item() == pytest.approx(7.5)
    empty = masked_feature_mse(new.requires_grad_(), old, torch.zeros(1, 1, 1, 2))
    assert empty.item() == 0.0 and torch.isfinite(empty)


# -- 7: SAD --------------------------------------------------------------------------------------------------
def test_sad_inverse_distance_to_the_nearest_old_prototype():
    prototypes = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    features = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    labels = torch.full((1, 1, 1), 5, dtype=torch.long)
    value = prototype_separation(features, labels, 5, 1, prototypes)
    assert value.item() == pytest.approx(1 / math.sqrt(0.8), abs=1e-5)  # distances 1.41421, 0.89443 → 1.11803
    with_absent = prototype_separation(features, labels, 5, 2, prototypes)  # class 6 absent: adds 1
    assert with_absent.item() == pytest.approx((1.11803 + 1) / 2, abs=1e-5)  # 1.05902


# -- 8: thresholds -------------------------------------------------------------------------------------------
def test_old_model_threshold_on_the_raw_logit():
    logits = torch.tensor([[-9.0, 0.55, 0.3], [-9.0, 0.4, 0.3]]).t().reshape(1, 3, 1, 2)
    assert foreground_prediction(logits, 0.5).tolist() == [[[1, 0]]]  # the reference: logit > 0.5 (σ > 0.62)
    assert foreground_prediction(logits, 0.0).tolist() == [[[1, 1]]]  # σ > 0.5


# -- 9: grid sampling ----------------------------------------------------------------------------------------
def test_grid_rule_takes_pixel_eight_of_every_sixteen():
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[0, 8, 8] = 3
    grid, _ = grid_sample_positions(mask, 16)
    assert grid.shape == (1, 4, 4) and grid[0, 0, 0] == 3 and grid.sum() == 3
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[0, 0, 0] = 3
    assert grid_sample_positions(mask, 16)[0].sum() == 0
    features = torch.arange(16.0).view(1, 1, 4, 4)  # stride 16: every cell
    assert torch.equal(grid_sample_positions(mask, 16, features)[1], features)
    fine = torch.arange(256.0).view(1, 1, 16, 16)  # stride 4: cell 2 of every 4
    assert torch.equal(grid_sample_positions(mask, 16, fine)[1], fine[:, :, 2::4, 2::4])


# -- 10: no logit distillation -------------------------------------------------------------------------------
def test_old_rows_move_only_by_weight_decay():
    method = build_method({"name": "star"})
    ctx = _star_ctx(method, k=3, num_new=2, dim=4)
    model = ctx.model
    method.stats = {"numbers": torch.tensor([50.0, 10.0, 10.0]), "prototypes": torch.eye(4)[:2],
                    "spread": torch.full((2, 4), 0.1), "norm_mean": torch.ones(2), "norm_std": torch.full((2,), 0.1)}
    method.pending = {"step": 1, "per_class": torch.tensor([2, 1]), "background_ratio": 0.5}
    ctx.old_model = build_segmenter(model.cfg, [3])
    ctx.old_model.load_state_dict({k: v for k, v in model.state_dict().items() if "heads.1" not in k})
    cfg = TrainConfig(weight_decay=1e-4, momentum=0.9, nesterov=True)
    lr = 1e-3
    optimizer = build_optimizer(optimizer_groups(method, model, 1), cfg, lr)
    old_rows = model.classifier.heads[0].weight.detach().clone()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 10:20, 10:20] = 3
    out = model(images, need={"decoder"})
    with torch.no_grad():
        old_out = ctx.old_model(images, need={"decoder"})
    sum(method.loss(SimpleNamespace(labels=labels), out, old_out, ctx).values()).backward()
    assert model.classifier.heads[0].weight.grad.abs().max() == 0  # no loss reads an old channel
    optimizer.step()
    head_lr = lr * method.params.lr_mult_classifier
    expected = old_rows * (1 - 1.9 * head_lr * 1e-4)  # first Nesterov step: Δw = −1.9 · lr · wd · w
    torch.testing.assert_close(model.classifier.heads[0].weight.detach(), expected)


# -- 11: step-0 loss -----------------------------------------------------------------------------------------
def test_step0_loss_is_pos_weighted_mbce():
    method = build_method({"name": "star"})
    labels = torch.tensor([[[1, 0], [255, 0]]])
    terms = method.loss(SimpleNamespace(labels=labels), ModelOutput(logits=torch.zeros(1, 2, 2, 2)), None,
                        SimpleNamespace(step=0))
    assert set(terms) == {"mbce"} and terms["mbce"].item() == pytest.approx(7 * LN2 / 4, abs=1e-6)  # 1.21301
    assert mbce(torch.zeros(1, 1, 2, 2), labels, 1, 4.0).item() == pytest.approx(1.21301, abs=1e-5)


# -- 12: tiny runs -------------------------------------------------------------------------------------------
def _stats_shapes(state, classes: int, dim: int) -> None:
    assert state["numbers"].shape == (1 + classes,)
    assert state["prototypes"].shape == state["spread"].shape == (classes, dim)
    assert state["norm_mean"].shape == state["norm_std"].shape == (classes,)
    assert "pending" not in state and torch.isfinite(state["prototypes"]).all()


def test_two_tiny_steps_store_statistics_and_replay(tiny_run):
    from sats.engine.checkpoint import load_checkpoint
    from sats.engine.runner import Runner

    cfg = tiny_run("star", config="demo/star.yaml", **{"train.share_step0": False, "log.tensorboard": False})
    runner = Runner(cfg)
    seen = []
    original = runner.method.loss

    def loss(batch, out, old_out, ctx):
        if ctx.step > 0:
            seen.append(int(runner.method._index.numel()))
        return original(batch, out, old_out, ctx)

    runner.method.loss = loss
    rows = runner.run()
    assert set(rows[0]["epoch_losses"]) == {"mbce"} and set(rows[1]["epoch_losses"]) == {"mbce", "ocfm", "sad"}
    states = [load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / f"step{t}.ckpt")["method"] for t in (0, 1)]
    dim = cfg.model.decoder_dim
    _stats_shapes(states[0], 15, dim)
    _stats_shapes(states[1], 20, dim)
    for key in ("prototypes", "spread", "norm_mean", "norm_std"):
        assert torch.equal(states[1][key][:15], states[0][key])  # old entries carried unchanged
    assert seen and len(set(seen)) == 1  # the same Σ q_c features at every iteration of the step


def test_step0_from_the_shared_cache_keeps_its_statistics(tiny_run):
    from sats.engine.checkpoint import load_checkpoint
    from sats.engine.runner import Runner

    first = tiny_run("star", config="demo/star.yaml", run_name="a", **{"log.tensorboard": False})
    Runner(first).run([0])
    second = tiny_run("star", config="demo/star.yaml", run_name="b", **{"log.tensorboard": False})
    rows = Runner(second).run()
    assert rows[0]["shared_step0"] is not None  # adopted, not trained
    state = load_checkpoint(second.resolved_run_dir() / "checkpoints" / "step0.ckpt")["method"]
    _stats_shapes(state, 15, second.model.decoder_dim)
    assert set(rows[1]["epoch_losses"]) == {"mbce", "ocfm", "sad"}
    other = tiny_run("star", config="demo/star.yaml", run_name="c", **{"log.tensorboard": False,
                                                                      "method.grid_stride": 8})
    assert Runner(other).run([0])[0]["shared_step0"] is None  # other statistics: another step-0 key


def test_a_star_step_without_statistics_is_an_error():
    method = build_method({"name": "star"})
    with pytest.raises(RuntimeError, match="class statistics of step 0"):
        method.begin_step(SimpleNamespace(step=1))
