"""RCIL (sats/methods/rcil.py, docs/methods.md §3.16): freezing after the merge, the head init, the loss terms,
two tiny steps end to end, a mid-step resume, the generated configs and the published numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import CONFIGS
from method_contract import MethodContract
from test_dkd_star_configs import TINY_MIT, _run, ade_fixture, voc_fixture  # noqa: F401 (fixtures)

from sats.config import ConfigError, TrainConfig
from sats.engine.checkpoint import load_checkpoint
from sats.engine.optim import build_optimizer, optimizer_groups
from sats.engine.runner import Runner
from sats.experiment import load_experiment
from sats.losses.pckd import pckd_factors
from sats.methods import build_method, validate_method_config
from sats.models.classifier import IncrementalClassifier
from sats.models.reparam import rc_modules
from sats.models.segmenter import ModelOutput, build_segmenter
from sats.report.paper_results import find_paper_result

#: a tiny MiT with twin Mix-FFN depth-wise convs and the SegFormer head (a twin fuse conv with its BatchNorm)
RC_MODEL = {"backbone": "mit_custom", "embed_dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4],
            "sr_ratios": [8, 4, 2, 1], "head": "segformer", "decoder_dim": 16, "head_dropout": 0.0, "drop_path": 0.0,
            "rc_branches": True}
STEP1_TERMS = {"unce", "unkd", "pckd_spatial", "pckd_channel"}


def rcil(**params):
    return build_method(validate_method_config({"name": "rcil", **params}))


def _step0_model() -> torch.nn.Module:
    """A "trained" step-0 model: random branch norms (statistics and affine), so that the merge is not trivial."""
    torch.manual_seed(0)
    model = build_segmenter(RC_MODEL, [16])
    for module in rc_modules(model):
        for norm in (module.norm_a, module.norm_b):
            if norm is not None:
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
                torch.nn.init.uniform_(norm.bias, -0.2, 0.2)
    return model


def _branch_tensors(model, branch: str):
    """name → clone of every tensor (parameters and buffers) of branch ``a`` or ``b`` of every RC module."""
    out = {}
    for i, module in enumerate(rc_modules(model)):
        for part in (f"conv_{branch}", f"norm_{branch}"):
            sub = getattr(module, part)
            if sub is not None:
                out.update({f"{i}.{part}.{k}": v.detach().clone() for k, v in sub.state_dict().items()})
    return out


def test_merged_branches_are_frozen_and_stay_bit_identical_while_branch_b_trains():
    """§11 test 9: after prepare_model at step 1 (through the engine's optimizer_groups), every branch-A tensor has
    requires_grad False, is left out of the optimiser and is bit-identical after an SGD step with weight decay
    (its BatchNorm statistics too: the merged branch skips its norm in a training forward); branch B moves."""
    model = _step0_model()
    model.add_step(4, init="background_weight")
    method = rcil()
    groups = optimizer_groups(method, model, 1)  # calls method.prepare_model(model, 1)
    modules = rc_modules(model)
    assert len(modules) == 4 + 1 and all(m.is_merged for m in modules)  # 4 Mix-FFN convs (depth 1) + the fuse
    frozen = {id(p) for m in modules for p in m.merged_parameters()}
    assert frozen and all(not p.requires_grad for m in modules for p in m.merged_parameters())
    assert not frozen & {id(p) for g in groups for p in g.params}
    assert all(p.requires_grad for m in modules for p in m.conv_b.parameters())
    before_a, before_b = _branch_tensors(model, "a"), _branch_tensors(model, "b")
    optimizer = build_optimizer(groups, TrainConfig(weight_decay=0.1), lr=0.5)
    model.train()
    out = model(torch.randn(2, 3, 32, 32), need={"features"})
    (out.logits.square().mean() + sum(f.square().mean() for f in out.features)).backward()
    optimizer.step()
    after_a, after_b = _branch_tensors(model, "a"), _branch_tensors(model, "b")
    assert all(torch.equal(after_a[k], v) for k, v in before_a.items())
    moved = [k for k, v in before_b.items() if not torch.equal(after_b[k], v)]
    assert any(k.endswith("conv_b.weight") for k in moved) and any(k.endswith("norm_b.running_mean") for k in moved)


@pytest.mark.parametrize("init, same", [("keep", False), ("merged", True)])
def test_trainable_branch_init_keep_changes_the_function_merged_keeps_it(init, same):
    """In eval, ``merged`` leaves the step t−1 network's logits as they were (to float error); the reference's
    ``keep`` averages the merge with the old branch B again (¼A + ¾B per module) and changes them."""
    model = _step0_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
        rcil(trainable_branch_init=init).prepare_model(model, 1)
        after = model(x).logits
    assert torch.allclose(after, before, atol=1e-5) == same


def test_prepare_model_does_nothing_at_step_0_and_refuses_a_model_without_twins():
    model = _step0_model()
    rcil().prepare_model(model, 0)
    assert not any(m.is_merged for m in rc_modules(model))
    plain = build_segmenter({**RC_MODEL, "rc_branches": False}, [16])
    with pytest.raises(RuntimeError, match="no twin branches"):
        rcil().prepare_model(plain, 1)


def test_reference_head_init_copies_the_background_weight_and_leaves_the_biases():
    """§11 test 10: new weights = w_0; new biases are PyTorch's default init (the same draws as a "default" head:
    uniform in ±1/sqrt(256) = ±0.0625), not b_0 − log(|C^t| + 1); b_0 unchanged."""
    assert rcil().head_init == "background_weight" and rcil(reference_head_init=False).head_init == "background"
    torch.manual_seed(1)
    classifier, plain = IncrementalClassifier(256, [3]), IncrementalClassifier(256, [3])
    b0 = classifier.heads[0].bias[0].item()
    torch.manual_seed(7)
    head = classifier.add_step(2, "background_weight")
    torch.manual_seed(7)
    default = plain.add_step(2, "default")
    assert torch.equal(head.weight, classifier.heads[0].weight[0:1].expand_as(head.weight))
    assert torch.equal(head.bias, default.bias) and head.bias.abs().max() <= 0.0625
    assert classifier.heads[0].bias[0].item() == b0
    assert not torch.allclose(head.bias, torch.full((2,), b0 - math.log(3)))


def _ctx(step: int, num_old: int, num_outputs: int):
    return SimpleNamespace(step=step, num_old=num_old, num_outputs=num_outputs)


def test_loss_terms_and_the_factor_layout_on_hand_computed_maps():
    """Step 1 (K_t = 3, |C^t| = 1): only stage 1 differs between the models (old 0, new 1 on a 1×2×2 map):
    spatial 0.01·sqrt(3)·0.186424/6, channel 0.01·sqrt(3)·(2/3)/5 (test_pckd.py); logits equal on the old
    channels with the new one at 0, so UNCE/UNKD are those of MiB's blocks. Step 0: CE only."""
    torch.manual_seed(0)
    same = [torch.full((1, 2, 2, 2), 0.5) for _ in range(3)]
    decoder, old_logits = torch.rand(1, 4, 2, 2), torch.randn(1, 2, 2, 2)
    new_logits = torch.cat([old_logits, torch.zeros(1, 1, 2, 2)], dim=1)

    def output(stage1, logits):
        return ModelOutput(logits=logits, logits_small=logits, decoder=decoder, features=[stage1, *same])

    out, old = output(torch.ones(1, 1, 2, 2), new_logits), output(torch.zeros(1, 1, 2, 2), old_logits)
    batch = SimpleNamespace(labels=torch.tensor([[[0, 2], [1, 255]]]))
    terms = rcil().loss(batch, out, old, _ctx(1, 2, 3))
    assert set(terms) == STEP1_TERMS
    assert terms["pckd_spatial"].item() == pytest.approx(0.01 * math.sqrt(3) * 0.18642361 / 6, rel=1e-6)
    assert terms["pckd_channel"].item() == pytest.approx(0.01 * math.sqrt(3) * (2 / 3) / 5, rel=1e-6)
    from sats.losses.ce import unbiased_cross_entropy
    from sats.losses.kd import unbiased_kd

    assert terms["unce"].item() == pytest.approx(unbiased_cross_entropy(new_logits, batch.labels, 2).item())
    assert terms["unkd"].item() == pytest.approx(100 * unbiased_kd(new_logits, old_logits).item())
    assert set(rcil().loss(batch, out, None, _ctx(0, 0, 3))) == {"ce"}
    ade = rcil(pckd_feature_factor=5e-6, pckd_last_factor=5e-7)
    assert ade.loss(batch, out, old, _ctx(1, 2, 3))["pckd_spatial"].item() == pytest.approx(
        5e-6 * math.sqrt(3) * 0.18642361 / 6, rel=1e-6)
    assert pckd_factors(6, 5e-6, 5e-7)[1][-1] == 5e-7


def test_params_are_checked_and_a_model_without_twins_is_refused(tiny_run):
    with pytest.raises(ConfigError, match="trainable_branch_init"):
        validate_method_config({"name": "rcil", "trainable_branch_init": "fresh"})
    with pytest.raises(ConfigError, match="pckd_windows"):
        validate_method_config({"name": "rcil", "pckd_windows": []})
    with pytest.raises(ConfigError, match="pckd_last_factor"):
        validate_method_config({"name": "rcil", "pckd_last_factor": -1.0})
    with pytest.raises(ConfigError, match=r"model\.rc_branches"):
        tiny_run("rcil", config="demo/rcil.yaml", **{"model.rc_branches": False})


def test_two_tiny_steps_end_to_end_and_the_step1_checkpoint_loads_strictly(tiny_run):
    """§11 test 11, plus: the step-1 checkpoint's branch A is the merge of step 0's (frozen during step 1)."""
    cfg = tiny_run("rcil", config="demo/rcil.yaml", **{"log.tensorboard": False})
    rows = Runner(cfg).run()
    assert set(rows[0]["epoch_losses"]) == {"ce"} and set(rows[1]["epoch_losses"]) == STEP1_TERMS
    ckpts = [load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / f"step{t}.ckpt") for t in (0, 1)]
    fresh = build_segmenter(cfg.model, [16, 5])
    fresh.load_state_dict(ckpts[1]["model"], strict=True)
    assert all(m.is_merged for m in rc_modules(fresh))
    merged = build_segmenter(cfg.model, [16])
    merged.load_state_dict(ckpts[0]["model"], strict=True)
    assert not any(m.is_merged for m in rc_modules(merged))
    rcil().prepare_model(merged, 1)
    expected, saved = _branch_tensors(merged, "a"), _branch_tensors(fresh, "a")
    assert expected.keys() == saved.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())


def test_resume_in_the_middle_of_step_1_with_merged_branch_init_is_identical(tiny_synthetic, tmp_path):
    """The contract's mid-step resume (tests/method_contract.py) with ``trainable_branch_init=merged``: the resumed
    step merges the step-0 model again, then the epoch checkpoint (same keys) replaces it."""
    contract = MethodContract()
    contract.method, contract.overrides = "rcil", {"method.trainable_branch_init": "merged"}
    reference = contract.run(tiny_synthetic, tmp_path / "reference")
    assert set(reference.rows[1]["epoch_losses"]) == STEP1_TERMS
    contract.check_resume_mid_step(reference, tiny_synthetic, tmp_path / "resumed")


def test_generated_configs_have_the_presets():
    """VOC: λ_kd 100, 0.01 / 0.0005, lr 0.02 / 0.001, 30 epochs; ADE: 5e-6 / 5e-7, lr 0.01, 60 epochs; twin branches,
    the stem activation kept, the reference's channel factors and head init; MiT rows say they are ours."""
    voc = load_experiment(CONFIGS / "voc" / "rcil_r101_voc-15-1.yaml")
    p = voc.method
    assert (p["lambda_kd"], p["pckd_feature_factor"], p["pckd_last_factor"]) == (100.0, 0.01, 0.0005)
    assert p["pckd_windows"] == [4, 8, 12, 16, 20, 24] and p["pckd_channel_window"] == 3
    assert p["reference_channel_factors"] and p["reference_head_init"] and p["trainable_branch_init"] == "keep"
    assert voc.model.rc_branches and voc.model.stem_activation and voc.model.head == "aspp"
    assert (voc.train.lr, voc.train.lr_incremental, voc.train.epochs) == (0.02, 0.001, 30)
    ade = load_experiment(CONFIGS / "ade" / "rcil_mit-b2_ade-50-50.yaml")
    assert (ade.method["pckd_feature_factor"], ade.method["pckd_last_factor"], ade.method["lambda_kd"]) == (
        5e-6, 5e-7, 100.0)
    assert (ade.train.lr, ade.train.lr_incremental, ade.train.epochs) == (0.01, 0.001, 60) and ade.model.rc_branches
    assert "our proposal" in (CONFIGS / "ade" / "rcil_mit-b2_ade-50-50.yaml").read_text()
    assert "our proposal" not in (CONFIGS / "voc" / "rcil_r101_voc-15-1.yaml").read_text()
    names = {p.stem for p in (CONFIGS / "voc").glob("rcil_*.yaml")} | {p.stem for p in (CONFIGS / "ade").glob("rcil_*")}
    assert len(names) == 2 * (5 + 3 + 4)
    assert {"rcil_r101_voc-10-1_disjoint", "rcil_mit-b2_voc-19-1", "rcil_r101_ade-100-5"} <= names
    assert "Published (docs/methods.md §5.5" in (CONFIGS / "voc" / "rcil_r101_voc-15-5.yaml").read_text()


@pytest.mark.parametrize("name", ["rcil_r101_voc-15-1", "rcil_mit-b2_voc-15-5_disjoint"])
def test_voc_files_run_every_step(name, voc_fixture, tmp_path):  # noqa: F811
    """The DeepLab file on a tiny MiT keeps its ASPP (twin map convs with BatchNorm): 5 nested merges on 15-1."""
    rows = _run(CONFIGS / "voc" / f"{name}.yaml", voc_fixture, tmp_path, **TINY_MIT)
    assert [r["step"] for r in rows] == list(range(6 if "15-1" in name else 2))
    assert all(set(r["epoch_losses"]) == STEP1_TERMS for r in rows[1:])
    assert all(math.isfinite(v) for r in rows for values in r["epoch_losses"].values() for v in values)


def test_ade_file_runs_every_step(ade_fixture, tmp_path):  # noqa: F811
    rows = _run(CONFIGS / "ade" / "rcil_r101_ade-100-50.yaml", ade_fixture, tmp_path, **TINY_MIT)
    assert len(rows) == 2 and rows[1]["iterations"] > 0


def test_published_numbers_are_in_the_report_table():
    """docs/methods.md §5.5: the README's "all" everywhere, old only where it is not [verify]."""
    row = find_paper_result("rcil", "resnet101", "15-1")
    assert (row.old, row.new, row.all, row.section) == (70.6, None, 59.4, "docs/methods.md §5.5")
    assert find_paper_result("rcil", "resnet101", "15-5", overlap=False).old == 75.0
    assert find_paper_result("rcil", "resnet101", "10-1", overlap=False).all == 18.2
    assert find_paper_result("rcil", "resnet101", "5-3").all == 42.88
    ade = find_paper_result("rcil", "resnet101", "50-50", dataset="ade")
    assert (ade.old, ade.new, ade.all) == (None, None, 32.5)
    assert find_paper_result("rcil", "resnet101", "100-5", dataset="ade").all == 29.6
    assert find_paper_result("rcil", "mit_b2", "15-1") is None  # RCIL on MiT is ours, unpublished
    assert find_paper_result("rcil", "resnet101", "19-1") is None
