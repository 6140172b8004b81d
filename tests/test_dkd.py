"""DKD (docs/methods.md §3.14): the hand-computable cases of its loss blocks, init, prediction, frozen
normalisation, optimiser groups, ADE warm-up, DKD-M's round robin, and two tiny steps end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sats.config import TrainConfig
from sats.data.memory import round_robin_memory, round_robin_take
from sats.engine.optim import build_optimizer, optimizer_groups, poly_lambda
from sats.losses.kd import bce_kd
from sats.losses.sigmoid import decomposed_logits, mbce, negative_bce
from sats.methods import build_method
from sats.models import ModelConfig, build_segmenter
from sats.models.segmenter import ModelOutput, norm_layers, train_mode

LN2 = math.log(2.0)


def _bce(x: float, target: float) -> float:
    return -(target * math.log(torch.sigmoid(torch.tensor(x)).item())
             + (1 - target) * math.log(1 - torch.sigmoid(torch.tensor(x)).item()))


def tiny_model(head_sizes, head: str = "segformer") -> torch.nn.Module:
    cfg = ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                      sr_ratios=[8, 4, 2, 1], head=head, decoder_dim=8, drop_path=0.1)
    return build_segmenter(cfg, head_sizes)


# -- 1-2: mBCE -----------------------------------------------------------------------------------------------
def test_mbce_counts_ignored_pixels_as_negatives_and_weights_positives():
    c = 3
    labels = torch.tensor([[[c, 0], [255, 0]]])
    logits = torch.zeros(1, 1, 2, 2)
    assert mbce(logits, labels, c, pos_weight=2.0).item() == pytest.approx(5 * LN2 / 4)  # 0.8664
    assert mbce(logits, labels, c, pos_weight=4.0).item() == pytest.approx(7 * LN2 / 4)  # 1.2130
    assert mbce(logits, labels, c, pos_weight=2.0).item() == pytest.approx(0.86643, abs=1e-5)


def test_mbce_sums_per_class_means():
    labels = torch.zeros(2, 3, 3, dtype=torch.long)
    assert mbce(torch.zeros(2, 2, 3, 3), labels, 5).item() == pytest.approx(2 * LN2)  # 1.38629


# -- 3: KD is an entropy at the optimum ----------------------------------------------------------------------
def test_bce_kd_at_the_optimum_is_the_entropy_and_has_no_gradient():
    p = 1 / (1 + math.exp(-2.0))
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert entropy == pytest.approx(0.36533, abs=1e-5)
    for classes in (1, 3):
        z = torch.full((1, classes, 2, 2), 2.0, requires_grad=True)
        loss = bce_kd(z, torch.full((1, classes, 2, 2), 2.0))
        assert loss.item() == pytest.approx(classes * entropy)
        loss.backward()
        assert z.grad.abs().max().item() < 1e-7


# -- 4: decomposition ----------------------------------------------------------------------------------------
def test_decomposed_logits_split_the_logit_and_route_gradients_by_sign():
    f = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    w_new = torch.tensor([[3.0, -1.0]], requires_grad=True)
    w_old = torch.tensor([[2.0, -1.0]])
    pos, neg = decomposed_logits(f, w_new)
    old_pos, old_neg = decomposed_logits(f, w_old)
    assert (pos.item(), neg.item(), old_pos.item(), old_neg.item()) == (3.0, -2.0, 2.0, -2.0)
    bias = 0.7
    assert pos.item() + neg.item() + bias == pytest.approx(F.conv2d(f, w_new.view(1, 2, 1, 1), torch.tensor([bias])).item())
    dkd_pos = bce_kd(pos, old_pos)
    assert dkd_pos.item() == pytest.approx(0.40620, abs=1e-5)
    assert dkd_pos.item() == pytest.approx(_bce(3.0, torch.sigmoid(torch.tensor(2.0)).item()))
    assert bce_kd(neg, old_neg).item() == pytest.approx(0.36533, abs=1e-5)
    dkd_pos.backward()
    assert w_new.grad[0, 1].item() == 0.0 and w_new.grad[0, 0].item() != 0.0


# -- 5: auxiliary loss ---------------------------------------------------------------------------------------
def test_auxiliary_loss_values_and_no_gradient_into_the_features():
    assert negative_bce(torch.zeros(2, 1, 3, 3)).item() == pytest.approx(LN2)
    assert negative_bce(torch.ones(2, 1, 3, 3)).item() == pytest.approx(math.log(1 + math.e))  # 1.31326
    from sats.methods.dkd import auxiliary_logits

    model = tiny_model([16])
    decoder = torch.rand(2, 8, 4, 4, requires_grad=True)
    negative_bce(auxiliary_logits(model, decoder, torch.Size([16, 16]))).backward()
    assert decoder.grad is None
    assert model.classifier.heads[0].weight.grad[0].abs().sum() > 0  # the auxiliary row learns
    assert model.classifier.heads[0].weight.grad[1:].abs().sum() == 0


# -- 6: init -------------------------------------------------------------------------------------------------
def test_new_heads_copy_the_auxiliary_weight_and_bias():
    model = tiny_model([16])
    with torch.no_grad():
        model.classifier.heads[0].bias[0] = -3.0
    model.add_step(5, init="copy", source=0)
    head0, new = model.classifier.heads[0], model.classifier.heads[1]
    assert torch.equal(new.weight, head0.weight[:1].expand_as(new.weight))
    assert torch.equal(new.bias, head0.bias[:1].expand(5))
    model.eval()
    logits = model(torch.randn(1, 3, 32, 32)).logits
    assert torch.allclose(logits[:, 16:], logits[:, :1].expand(-1, 5, -1, -1))


# -- 7: prediction -------------------------------------------------------------------------------------------
def test_sigmoid_prediction_ignores_the_auxiliary_channel():
    method = build_method({"name": "dkd"})
    logits = torch.tensor([[5.0, -1.0, 0.2], [5.0, -1.0, -0.1], [-5.0, 3.0, 3.0]]).t().reshape(1, 3, 1, 3)
    assert method.predict(logits).tolist() == [[[2, 0, 1]]]


# -- 8: frozen normalisation ---------------------------------------------------------------------------------
def test_frozen_norm_and_dropout_at_steps_after_zero():
    method = build_method({"name": "dkd"})
    model = tiny_model([16, 5])
    assert method.frozen_at(0) == frozenset() and method.frozen_at(1) == {"norm", "dropout"}
    groups = optimizer_groups(method, model, 1)
    norms = norm_layers(model)
    assert norms, "the segformer head has a BatchNorm"
    norm_params = {id(p) for layer in norms for p in layer.parameters()}
    assert not any(id(p) in norm_params for g in groups for p in g.params)
    before = {k: v.clone() for k, v in model.state_dict().items() if "fuse_bn" in k}
    optimizer = build_optimizer(groups, TrainConfig(), 0.01)
    train_mode(model, method.frozen_at(1))
    x = torch.randn(2, 3, 32, 32)
    a, b = model(x).logits, model(x).logits
    assert torch.equal(a, b)  # dropout and stochastic depth off, BN on its running statistics
    a.square().mean().backward()
    optimizer.step()
    after = {k: v for k, v in model.state_dict().items() if "fuse_bn" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- 9: optimiser groups -------------------------------------------------------------------------------------
def test_optimizer_groups_at_step_one():
    method = build_method({"name": "dkd"})
    model = build_segmenter(ModelConfig(backbone="resnet50", head="aspp_tv", norm="bn", activation="relu",
                                        dilation_mode="torchvision", decoder_dim=16), [16, 1])
    optimizer = build_optimizer(optimizer_groups(method, model, 1), TrainConfig(weight_decay=1e-4), 1e-4)
    encoder = [g for g in optimizer.param_groups if g["lr"] == pytest.approx(1e-4)]
    assert len(encoder) == 1 and encoder[0]["weight_decay"] == 0.0
    assert sorted((round(g["lr"], 8), g["weight_decay"]) for g in optimizer.param_groups) == [
        (1e-4, 0.0), (1e-3, 0.0), (1e-3, 0.0), (1e-3, 1e-4)]
    new_head = [g for g in optimizer.param_groups if g["weight_decay"] == 1e-4][0]
    assert {id(p) for p in new_head["params"]} == {id(p) for p in model.classifier.heads[-1].parameters()}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_groups & {id(p) for layer in norm_layers(model) for p in layer.parameters()}
    assert all(g["params"] for g in optimizer.param_groups)
    step0 = build_optimizer(optimizer_groups(method, model, 0), TrainConfig(weight_decay=1e-4), 1e-3)
    assert sorted(round(g["lr"], 8) for g in step0.param_groups) == [1e-3, 1e-2, 1e-2, 1e-2]
    assert all(g["weight_decay"] == 1e-4 for g in step0.param_groups)


# -- 10: ADE warm-up -----------------------------------------------------------------------------------------
def test_ade_warmup_poly_factor():
    factor = poly_lambda(1000, 0.9, warmup_fraction=0.2, warmup_factor=0.001)
    assert factor(0) == pytest.approx(0.001)
    assert factor(100) == pytest.approx((0.001 * 0.5 + 0.5) * 0.9 ** 0.9)  # 0.45522
    assert factor(100) == pytest.approx(0.45522, abs=1e-5)
    assert factor(200) == pytest.approx(0.8 ** 0.9)  # 0.81805
    plain = poly_lambda(1000, 0.9)
    assert [plain(i) for i in (0, 500, 999)] == [poly_lambda(1000, 0.9, 0)(i) for i in (0, 500, 999)]


# -- 11: memory round robin ----------------------------------------------------------------------------------
def test_memory_round_robin_takes_one_image_per_class_and_turn():
    a, b, c, d = 10, 11, 12, 13
    candidates = [(a, [1]), (b, [1, 2]), (c, [2]), (d, [3])]
    assert round_robin_take(candidates, [2, 1, 3], 3) == {1: [a], 2: [b], 3: [d]}
    assert round_robin_take(candidates, [2, 1, 3], 4) == {1: [a], 2: [b, c], 3: [d]}
    assert round_robin_take(candidates, [2, 1, 3], 10) == {1: [a], 2: [b, c], 3: [d]}  # stops: no candidate left
    pool = {p: [1 + p % 3] for p in range(30)}
    first = round_robin_memory(pool, [1, 2, 3], 7, seed=5)
    assert first == round_robin_memory(pool, [1, 2, 3], 7, seed=5)  # seeded
    assert sum(map(len, first.values())) == 7 and sorted(map(len, first.values())) == [2, 2, 3]


# -- 12: two tiny steps --------------------------------------------------------------------------------------
def test_two_tiny_steps_train_old_rows_and_keep_bn_buffers(tiny_run):
    from sats.engine.checkpoint import load_checkpoint
    from sats.engine.runner import Runner

    cfg = tiny_run("dkd", config="demo/dkd.yaml", **{"train.share_step0": False, "log.tensorboard": False})
    rows = Runner(cfg).run()
    assert set(rows[0]["epoch_losses"]) == {"mbce", "ac"}
    assert set(rows[1]["epoch_losses"]) == {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}
    ckpt = [load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / f"step{t}.ckpt")["model"] for t in (0, 1)]
    old_rows = "classifier.heads.0.weight"
    assert not torch.equal(ckpt[0][old_rows][1:], ckpt[1][old_rows][1:])  # old classes are trained
    buffers = [k for k in ckpt[0] if k.endswith(("running_mean", "running_var"))]
    assert buffers and all(torch.equal(ckpt[0][k], ckpt[1][k]) for k in buffers)
    affine = [k for k in ckpt[0] if "fuse_bn" in k and k.endswith(("weight", "bias"))]
    assert affine and all(torch.equal(ckpt[0][k], ckpt[1][k]) for k in affine)


def test_dkd_loss_terms_on_known_tensors():
    """mBCE on the new channels, KD on old foreground channels, AC on channel 0 only."""
    method = build_method({"name": "dkd", "lambda_kd": 1.0, "lambda_dkd_pos": 1.0, "lambda_dkd_neg": 1.0})
    model, old = tiny_model([3, 1]), tiny_model([3])
    with torch.no_grad():
        for m in (model, old):
            for head in m.classifier.heads:
                head.weight.zero_()
                head.bias.zero_()
    labels = torch.tensor([[[3, 0], [255, 0]]])
    out = ModelOutput(logits=torch.zeros(1, 4, 2, 2), decoder=torch.ones(1, 8, 1, 1))
    old_out = ModelOutput(logits=torch.zeros(1, 3, 2, 2), decoder=torch.ones(1, 8, 1, 1))
    ctx = SimpleNamespace(step=1, num_old=3, model=model, old_model=old)
    terms = method.loss(SimpleNamespace(labels=labels), out, old_out, ctx)
    assert terms["mbce"].item() == pytest.approx(LN2)  # pos_weight 1 at steps > 0
    assert terms["kd"].item() == pytest.approx(2 * LN2)  # two old foreground channels at σ = 0.5
    assert terms["dkd_pos"].item() == pytest.approx(2 * LN2) and terms["dkd_neg"].item() == pytest.approx(2 * LN2)
    assert terms["ac"].item() == pytest.approx(LN2)
    step0 = method.loss(SimpleNamespace(labels=labels), ModelOutput(logits=torch.zeros(1, 3, 2, 2),
                                                                    decoder=torch.ones(1, 8, 1, 1)),
                        None, SimpleNamespace(step=0, num_old=0, model=old, old_model=None))
    assert set(step0) == {"mbce", "ac"}
    assert step0["mbce"].item() == pytest.approx(2 * LN2)  # channels 1, 2: no positive pixel
