"""NeST (docs/methods.md §3.18): the generated classifiers, the similarity statistics, pre-tuning and the
write-back on hand-made tensors, and tiny end-to-end runs (the contract run is in tests/test_method_contract.py)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS
from sats.config import ConfigError
from sats.data.batch import Batch
from sats.data.tasks import Task
from sats.engine.checkpoint import load_checkpoint
from sats.engine.runner import Runner
from sats.experiment import load_experiment
from sats.methods import build_method, validate_method_config
from sats.methods.base import StepContext
from sats.methods.nest import (FrozenBody, NeST, NeSTParams, PretuneRecord, Transformation, generated_classifier,
                               generated_new_rows, initial_transformation, num_transformation_parameters,
                               old_classifier, poly_lr, pretune_loss, reference_bias_draw, sign_statistics,
                               statistics_pixels, write_back)
from sats.models.config import ModelConfig
from sats.models.segmenter import build_segmenter, frozen_copy
from sats.rng import pass_seed

TASK = Task("voc", "custom", ((0, 1, 2), (3, 4)), 21)  # K' = 3 old channels, N = 2 new ones
NAMES = ["3 (channel 3)", "4 (channel 4)"]


@functools.lru_cache(maxsize=None)
def _cfg():
    return load_experiment(CONFIGS / "demo/mib_nest.yaml", ["train.lr_incremental=0.01"])


def tiny_model(head: str = "segformer"):
    """A step-1 model (heads [3, 2]) with BatchNorm and dropout in its decoder, and its frozen step-0 copy."""
    torch.manual_seed(0)
    model = build_segmenter(ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], num_heads=[1, 2, 2, 4],
                                        decoder_dim=16, head=head), [3])
    old = frozen_copy(model)
    model.add_step(2)
    return model, old


def tiny_batches(n: int = 3, size: int = 32) -> List[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 3, (2, size, size), generator=g)
        labels[0, 8:24, 8:24], labels[1, 4:20, 12:28], labels[:, :4] = 3, 4, 255
        out.append(Batch(torch.randn(2, 3, size, size, generator=g), labels))
    return out


def make_ctx(model, old, batches: Optional[List[Batch]] = None, step: int = 1, iteration: int = 0, calls=None,
             logged=None) -> StepContext:
    def loader(label_table=None, name=None):
        if batches is None:
            raise AssertionError("the data was read")
        if calls is not None:
            calls.append(name)
        return iter(batches)

    return StepContext(step=step, task=TASK, cfg=_cfg(), model=model, old_model=old, device=torch.device("cpu"),
                       run_dir=None, old_checkpoint_digest=None, train_loader=loader, autocast=contextlib.nullcontext,
                       log_scalar=lambda name, value: logged.append(name) if logged is not None else None,
                       iteration=iteration)


METHOD = functools.lru_cache(maxsize=None)(lambda: build_method(validate_method_config({"name": "mib+nest"})))


# -- the transformation and the generated classifier -------------------------------------------------------------------
def test_the_transformation_has_the_papers_parameter_count():
    assert num_transformation_parameters(1, 20, 256) == 5398  # VOC 15-1 step 5: "≈ 5.4 K extra parameters"
    t = Transformation.create(torch.rand(1, 20, 256), torch.rand(1, 20), torch.zeros(1))
    assert [tuple(x.shape) for x in t.tensors()] == [(1, 20, 256), (1, 20), (1,), (1, 256), (1, 1)]
    assert t.num_parameters() == 5398 and all(x.is_leaf and x.requires_grad for x in t.tensors())
    assert torch.equal(t.M0, torch.ones(1, 256)) and torch.equal(t.P0, torch.ones(1, 1))


def test_generated_classifier_identities_and_the_per_class_loop():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    t = Transformation.create(torch.ones(2, 3, 4), F.one_hot(torch.tensor([2, 0]), 3).float(), torch.tensor([.5, -.5]))
    weight, bias = generated_classifier(W, b, t)
    assert torch.equal(weight[:3], W)  # M0 = 1, P0 = 1: ŵ_0 = w̄_0; old rows unchanged
    assert torch.equal(weight[3], W[2]) and torch.equal(weight[4], W[0])  # M = 1, P = one-hot(k): w_c = w̄_k
    assert torch.equal(bias, torch.tensor([*b.tolist(), 0.5, -0.5]))  # every old bias unchanged
    t = Transformation.create(torch.rand(2, 3, 4, generator=g), torch.rand(2, 3, generator=g), torch.zeros(2))
    with torch.no_grad():
        t.M0.copy_(torch.rand(1, 4, generator=g))
        t.P0.fill_(0.7)
    loop = torch.stack([sum(t.P[c, k] * (t.M[c, k] * W[k]) for k in range(3)) for c in range(2)])
    assert torch.allclose(generated_new_rows(W, t), loop)
    weight, _ = generated_classifier(W, b, t)
    assert torch.allclose(weight[0], 0.7 * t.M0[0] * W[0]) and torch.equal(weight[1:3], W[1:])


# -- the similarity statistics -----------------------------------------------------------------------------------------
def test_sign_statistics_equal_the_brute_force_sum():
    g = torch.Generator().manual_seed(1)
    W, f = torch.randn(3, 4, generator=g), torch.randn(7, 4, generator=g)
    W[0, 1], f[2, 3] = 0.0, 0.0  # a zero factor: the product is not > 0
    q = torch.softmax(torch.randn(7, 3, generator=g), dim=1)
    classes = torch.tensor([0, 1, 1, 0, 1, 1, 0])
    sums, counts = sign_statistics(q, f, classes, W, num_new=3)  # new class 2 has no pixel
    brute = torch.zeros(3, 3, 4)
    for u in range(7):
        brute[classes[u]] += q[u][:, None] * (f[u][None, :] * W > 0).float()  # q_u ⊗ 1 ⊙ 1[f_u · w̄_k > 0]
    assert torch.allclose(sums, brute) and counts.tolist() == [3.0, 4.0, 0.0]
    assert sums[0, 0, 1] == 0 and not sums[2].any()


def test_statistics_pixels_keep_only_new_classes_on_the_grid():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0, 0], labels[0, 0, 4], labels[0, 4, 0], labels[0, 4, 4] = 3, 255, 1, 4  # what "nearest" samples
    labels[0, 1:4, :] = 3  # never sampled by the 4× "nearest" grid
    logits = torch.randn(1, 3, 8, 8)
    feature = torch.randn(1, 4, 2, 2)
    W = torch.randn(3, 4)
    q, f, classes = statistics_pixels(logits, feature, labels, W, (2, 2), "nearest", "model_softmax")
    assert classes.tolist() == [0, 1]  # new class 3 at (0, 0) and 4 at (4, 4); 255 and the old class 1 ignored
    assert torch.equal(f, feature[0, :, [0, 1], [0, 1]].T)  # the feature grid is the statistics grid here
    small = F.interpolate(logits, size=(2, 2), mode="bilinear", align_corners=False)
    assert torch.allclose(q, torch.softmax(small[0, :, [0, 1], [0, 1]].T, dim=1))
    q, f, _ = statistics_pixels(logits, feature, labels, W, (2, 2), "nearest", "bias_free")
    assert torch.allclose(q, torch.softmax(f @ W.T, dim=1))  # the paper's: bias-free products of the embedding


def test_label_resize_modes_pick_the_documented_pixels():
    """4× reduction: "nearest" (the reference) samples index 4i, "nearest-exact" index 4i + 2."""
    labels = torch.full((1, 8, 8), 4, dtype=torch.long)
    labels[0, :, [0, 4]] = 3
    args = (torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 2, 2), labels)
    _, _, nearest = statistics_pixels(*args, torch.ones(3, 4), (2, 2), "nearest", "model_softmax")
    _, _, exact = statistics_pixels(*args, torch.ones(3, 4), (2, 2), "nearest-exact", "model_softmax")
    assert nearest.tolist() == [0, 0, 0, 0] and exact.tolist() == [1, 1, 1, 1]


def test_initialisation_from_the_statistics_and_an_absent_class():
    sums, counts = torch.rand(3, 3, 4), torch.tensor([2.0, 5.0, 0.0])
    with pytest.raises(RuntimeError, match=r"new class\(es\) \['cow'\] have no pixel .*empty_class=background"):
        initial_transformation(sums, counts, "error", ["a", "b", "cow"])
    A, beta, empty = initial_transformation(sums, counts, "background", ["a", "b", "cow"])
    assert empty == [2] and torch.isfinite(A).all() and torch.isfinite(beta).all()
    assert torch.allclose(A[0], sums[0] / 2) and torch.allclose(A[1], sums[1] / 5)
    assert torch.allclose(beta[:2], torch.softmax(A[:2].sum(-1), dim=-1))  # P[c] = softmax_k Σ_d A_c
    assert torch.equal(A[2], torch.ones(3, 4)) and beta[2].tolist() == [1.0, 0.0, 0.0]  # the background copy
    W = torch.randn(3, 4)
    t = Transformation.create(A, beta, torch.zeros(3))
    assert torch.equal(generated_new_rows(W, t)[2], W[0])


def test_statistics_are_summed_over_ranks():
    """Sums and counts both go through ctx.all_reduce_sum_ (here: two identical ranks): A = S / n is unchanged."""
    model, old = tiny_model()
    W, _ = old_classifier(model, 3)
    one = make_ctx(model, old, tiny_batches())
    two = make_ctx(model, old, tiny_batches())
    two.all_reduce_sum_ = lambda tensor: tensor.mul_(2)
    s1, n1, batches1 = NeST().statistics(one, W, 2)
    s2, n2, batches2 = NeST().statistics(two, W, 2)
    assert torch.allclose(s2, 2 * s1) and torch.equal(n2, 2 * n1) and batches1 == batches2 == 3 and (n1 > 0).all()
    a1, _, _ = initial_transformation(s1, n1, "error", NAMES)
    a2, _, _ = initial_transformation(s2, n2, "error", NAMES)
    assert torch.allclose(a1, a2)


# -- pre-tuning --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pretuning_changes_only_the_transformation(mode):
    model, old = tiny_model()
    model.classifier.heads[0].bias.requires_grad_(False)  # a frozen parameter stays frozen after
    model.train()
    model.head.eval()  # a module's own mode is restored too
    ctx = make_ctx(model, old, tiny_batches())
    addon = NeST(NeSTParams(pretune_epochs=2, pretune_body_mode=mode))
    W, b = old_classifier(model, 3)
    sums, counts, per_epoch = addon.statistics(ctx, W, 2)
    A, beta, _ = initial_transformation(sums, counts, "error", NAMES)
    t = Transformation.create(A, beta, torch.zeros(2))
    start = [x.detach().clone() for x in t.tensors()]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    grads = {k: v.requires_grad for k, v in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    record = PretuneRecord(1, [], [], 0.0, per_epoch)
    with FrozenBody(model, mode, ()):
        addon.pretune(ctx, W, b, t, record)
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())  # bit-identical
    assert all(p.grad is None for p in model.parameters())
    assert all(x.grad is not None for x in t.tensors())  # M, P, b_new, M_0, P_0: the only gradients
    assert all(not torch.equal(x, x0) for x, x0 in zip(t.tensors(), start))
    moved = [k for k, v in model.named_buffers() if not torch.equal(v, buffers[k])]
    if mode == "eval":
        assert moved == []
    else:  # the reference: BatchNorm updates its running statistics although every parameter is frozen
        assert any(k.endswith("running_mean") for k in moved)
    assert {k: v.requires_grad for k, v in model.named_parameters()} == grads
    assert {k: m.training for k, m in model.named_modules()} == modes


def test_pretuning_loss_is_unce_with_the_old_channels_by_hand():
    W, b = torch.eye(2), torch.zeros(2)
    t = Transformation.create(torch.ones(1, 2, 2), torch.tensor([[0.5, 0.5]]), torch.zeros(1))
    feature = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)  # logits z = [1, 2, 1.5] at every pixel
    labels = torch.tensor([[[0, 1], [2, 255]]])  # background, old class 1 (= background), new, ignored
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(1.5))
    background = math.log(math.exp(1) + math.exp(2)) - lse
    new = 1.5 - lse
    expected = -(2 * background + new) / 4  # all four pixels in the denominator
    assert pretune_loss(feature, labels, W, b, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("off_by_one", [False, True])
def test_pretuning_iterations_and_poly_schedule(off_by_one):
    model, old = tiny_model()
    calls, logged = [], []
    ctx = make_ctx(model, old, tiny_batches(3), calls=calls, logged=logged)
    addon = NeST(NeSTParams(pretune_epochs=2, pretune_lr_scale=7.0, scheduler_off_by_one=off_by_one))
    addon.begin_step(ctx, METHOD())
    record = addon.record
    base = 0.01 * 7.0
    assert record.per_epoch == 3 and record.iterations == 6 and len(record.epoch_losses) == 2
    shift = 1 if off_by_one else 0
    assert record.lrs == pytest.approx([base * (1 - (i + shift) / 6) ** 0.9 for i in range(6)])
    assert (record.lrs[0] == base) != off_by_one and (record.lrs[-1] == 0.0) == off_by_one
    assert poly_lr(1.0, 5, 6) == pytest.approx((1 / 6) ** 0.9) and poly_lr(1.0, 5, 6, True) == 0.0
    assert calls == ["nest/statistics", "nest/pretune/0", "nest/pretune/1"]  # named passes: own order and crops
    assert {"nest/pretune_loss", "nest/pretune_loss_first_epoch"} <= set(logged)


# -- write-back --------------------------------------------------------------------------------------------------------
def test_write_back_norms_and_directions():
    model, _ = tiny_model()
    W, b = old_classifier(model, 3)
    g = torch.Generator().manual_seed(3)
    t = Transformation.create(torch.rand(2, 3, 16, generator=g), torch.softmax(torch.rand(2, 3, generator=g), 1),
                              torch.tensor([0.3, -0.1]))
    with torch.no_grad():
        t.M0.copy_(torch.rand(1, 16, generator=g) + 0.1)
        t.P0.fill_(2.0)
    identity = [id(p) for p in model.parameters()]
    written = write_back(model, W, b, t)
    head0, new = model.classifier.heads
    background = head0.weight[0].flatten()
    transformed = t.M0[0].detach() * W[0]
    assert background.norm().item() == pytest.approx(W[0].norm().item(), rel=1e-5)  # the original norm
    assert F.cosine_similarity(background, transformed, dim=0).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(head0.weight[1:].flatten(1), W[1:]) and torch.equal(head0.bias, b)  # b̄_0 unchanged
    assert new.bias.norm().item() == pytest.approx(b.norm().item(), rel=1e-5)  # ‖b_new‖ = ‖b̄‖ (whole vectors)
    assert torch.allclose(new.bias / new.bias.norm(), t.bias.detach() / t.bias.detach().norm())
    old_rows = torch.cat([background[None], W[1:]])
    rows = new.weight.flatten(1)
    assert rows.norm(dim=1).mean().item() == pytest.approx(old_rows.norm(dim=1).mean().item(), rel=1e-5)
    assert F.cosine_similarity(rows, generated_new_rows(W, t).detach(), dim=1).min().item() == pytest.approx(1.0)
    assert written["weight_align_gamma"] != 1.0 and [id(p) for p in model.parameters()] == identity
    plain, _ = tiny_model()
    write_back(plain, W, b, t, bias_rescale="none", weight_align=False)
    assert torch.equal(plain.classifier.heads[1].bias, t.bias.detach())
    assert torch.allclose(plain.classifier.heads[1].weight.flatten(1), generated_new_rows(W, t).detach())


def test_nest_replaces_mibs_head_init():
    method = METHOD()
    assert method.head_init == "default" and build_method({"name": "mib"}).head_init == "background"
    assert method.uses_old_model and method.name == "mib+nest" and method.label == "MiB+NeST"


# -- step 0, resume, the reference switches ----------------------------------------------------------------------------
def test_step_zero_and_a_resumed_step_do_not_pretune():
    model, old = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    addon = NeST()
    addon.begin_step(make_ctx(model, None, None, step=0), METHOD())  # the data is never read
    addon.begin_step(make_ctx(model, old, None, step=1, iteration=5), METHOD())  # resumed: in the loaded weights
    assert addon.record is None and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_reference_bias_init_is_a_fresh_head0_draw_under_the_step_seed():
    torch.manual_seed(1234)
    expected = torch.nn.Conv2d(16, 3, 1).bias[0].item()
    before = torch.random.get_rng_state()
    assert reference_bias_draw(16, 3, 1234) == expected
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    model, old = tiny_model()
    b0 = model.classifier.heads[0].bias[0].item()
    reference = NeST(NeSTParams(bias_init="reference", pretune_epochs=0, bias_rescale="none", weight_align=False))
    reference.begin_step(make_ctx(model, old, tiny_batches()), METHOD())
    seed = pass_seed(_cfg().train.seed, 1, 0, "nest/bias_init")
    assert reference.record.initial_bias == reference_bias_draw(16, 3, seed)
    assert model.classifier.heads[1].bias.tolist() == [pytest.approx(reference.record.initial_bias)] * 2
    model, old = tiny_model()
    background = NeST(NeSTParams(pretune_epochs=0, bias_rescale="none"))
    background.begin_step(make_ctx(model, old, tiny_batches()), METHOD())
    assert background.record.initial_bias == pytest.approx(b0) and background.record.iterations == 0


@pytest.mark.parametrize("key, value, message", [
    ("pretune_epochs", -1, "pretune_epochs: must be an integer >= 0"),
    ("pretune_lr_scale", 0.0, "pretune_lr_scale: must be a finite number > 0"),
    ("bias_init", "zero", r"bias_init: 'zero' is not one of \['background', 'reference'\]"),
    ("label_resize", "bilinear", "label_resize: 'bilinear' is not one of"),
    ("empty_class", "skip", "empty_class: 'skip' is not one of"),
    ("stat_grid", 0, "stat_grid: must be an integer >= 1"),
])
def test_bad_parameters_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_method_config({"name": "mib+nest", "nest": {key: value}})


def test_nest_refuses_bases_without_a_softmax_background():
    with pytest.raises(ConfigError, match=r"NeST needs a softmax base .*'dkd' has prediction='sigmoid'"):
        validate_method_config({"name": "dkd+nest"})
    with pytest.raises(ConfigError, match=r"'ssul' has .*extra_channels=1"):
        validate_method_config({"name": "ssul+nest"})


# -- end to end --------------------------------------------------------------------------------------------------------
def _scalars(monkeypatch) -> List[str]:
    tags: List[str] = []
    monkeypatch.setattr(Runner, "_scalar", lambda self, tag, value, it: tags.append(tag))
    return tags


def test_mib_nest_reports_mibs_terms_and_logs_the_pretuning(tiny_run, monkeypatch, caplog):
    tags = _scalars(monkeypatch)
    cfg = tiny_run("mib+nest", config="demo/mib_nest.yaml", **{"data.task": "14-3", "method.nest.pretune_epochs": 5})
    runner = Runner(cfg)
    with caplog.at_level(logging.INFO, logger="sats"):
        rows = runner.run()
    assert [set(r["epoch_losses"]) for r in rows] == [{"ce"}, {"unce", "unkd"}, {"unce", "unkd"}]
    assert {"step1/nest/pretune_loss", "step2/nest/pretune_loss"} <= set(tags)
    assert "nest: step 2 pre-tuning epoch 5/5: loss" in caplog.text
    record = runner.method.addons[0].record
    assert record.step == 2 and len(record.counts) == 3 and len(record.epoch_losses) == 5
    assert record.num_parameters == num_transformation_parameters(3, 18, cfg.model.decoder_dim)
    assert all(math.isfinite(v) for v in record.epoch_losses)
    ckpt = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / "step2.ckpt")
    heads = sorted(k for k in ckpt["model"] if k.startswith("classifier."))
    assert heads == [f"classifier.heads.{i}.{p}" for i in range(3) for p in ("bias", "weight")]  # nothing of NeST
    assert ckpt["method"] == {}


def test_plop_nest_keeps_the_old_heads_frozen_and_is_reproducible(tiny_run):
    """freeze_old_heads: head 0 is its step-0 value except the pre-tuned background row, which the main training
    then keeps. A second run (thresholds from the cache, one unnamed data pass less) gives the same weights."""
    finals, pretuned = [], []
    for name in ("first", "second"):
        cfg = tiny_run("plop+nest", config="demo/plop_nest.yaml", run_name=name,
                       **{"method.nest.freeze_old_heads": True, "method.nest.pretune_epochs": 2})
        runner = Runner(cfg)
        addon = runner.method.addons[0]
        original = addon.begin_step

        def begin_step(ctx, method, original=original):
            original(ctx, method)
            pretuned.append({k: v.detach().clone() for k, v in ctx.model.classifier.heads[0].named_parameters()})

        addon.begin_step = begin_step
        rows = runner.run()
        assert set(rows[1]["epoch_losses"]) == {"ce", "pod"}
        step0 = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / "step0.ckpt")["model"]
        final = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / "step1.ckpt")["model"]
        finals.append(final)
        w0, w1 = step0["classifier.heads.0.weight"], final["classifier.heads.0.weight"]
        assert torch.equal(w1[1:], w0[1:]) and torch.equal(final["classifier.heads.0.bias"],
                                                           step0["classifier.heads.0.bias"])
        assert not torch.equal(w1[0], w0[0]) and torch.equal(w1, pretuned[-1]["weight"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_the_fp16_path_steps_through_a_grad_scaler_of_its_own(monkeypatch):
    """ctx.grad_scaled: the pre-tuning backward goes through its own GradScaler (power-of-two scale: in fp32 the same
    updates as without it)."""
    steps = []

    class Spy(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            steps.append(self.get_scale())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    results = []
    for scaled in (False, True):
        model, old = tiny_model()
        ctx = make_ctx(model, old, tiny_batches())
        ctx.grad_scaled = scaled
        NeST(NeSTParams(pretune_epochs=2)).begin_step(ctx, METHOD())
        results.append([p.detach().clone() for p in model.classifier.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))
    assert len(steps) == 6 and steps[0] > 1  # only the scaled run: 2 epochs × 3 batches
