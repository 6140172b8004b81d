"""EWF (docs/methods.md §3.17): the fusion coefficient, the fusion by hand, frozen old heads, and what is tested."""

from __future__ import annotations

import math

import pytest
import torch

from sats.data.tasks import get_task
from sats.engine.checkpoint import load_checkpoint
from sats.engine.evaluation import retest_run
from sats.engine.loop import StepTrainer
from sats.engine.runner import Runner
from sats.methods import build_method
from sats.methods.ewf import EWF, fuse_states, fusion_alpha

#: docs/methods.md §3.17: α_1 … α_T per task (background counted in K_t)
ALPHAS = {
    ("voc", "19-1"): [0.2182],
    ("voc", "15-5"): [0.4880],
    ("voc", "15-1"): [0.2425, 0.2357, 0.2294, 0.2236, 0.2182],
    ("voc", "10-1"): [0.2887, 0.2774, 0.2673, 0.2582, 0.2500, 0.2425, 0.2357, 0.2294, 0.2236, 0.2182],
    ("voc", "5-3"): [0.5774, 0.5000, 0.4472, 0.4082, 0.3780],
    ("ade", "100-50"): [0.5754],
    ("ade", "100-10"): [0.3002, 0.2875, 0.2763, 0.2663, 0.2573],
    ("ade", "100-5"): [0.2172, 0.2122, 0.2076, 0.2033, 0.1992, 0.1954, 0.1917, 0.1883, 0.1851, 0.1820],
    ("ade", "50-50"): [0.7036, 0.5754],
}


@pytest.mark.parametrize("dataset, name", sorted(ALPHAS))
def test_fusion_coefficient_per_task(dataset, name):
    task = get_task(dataset, name)
    alphas = [fusion_alpha(len(task.new_classes(t)), task.num_outputs(t)) for t in range(1, task.num_steps)]
    assert [round(a, 4) for a in alphas] == ALPHAS[(dataset, name)]


def test_fusion_coefficient_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 < |C"):
        fusion_alpha(0, 16)


def test_fusion_by_hand_new_head_and_integer_buffers_keep_the_new_value():
    old = {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([4.0]),
           "bn.num_batches_tracked": torch.tensor(10), "head.0": torch.tensor([0.0])}
    new = {"w": torch.tensor([3.0, -2.0]), "bn.running_var": torch.tensor([2.0]),
           "bn.num_batches_tracked": torch.tensor(17), "head.0": torch.tensor([1.0]), "head.1": torch.tensor([5.0])}
    fused = fuse_states(old, new, 0.25)
    assert fused["w"].tolist() == [1.5, 1.0]  # 0.75·old + 0.25·new
    assert fused["bn.running_var"].tolist() == [3.5] and fused["head.0"].tolist() == [0.25]
    assert fused["bn.num_batches_tracked"].item() == 17 and fused["bn.num_batches_tracked"].dtype == torch.int64
    assert fused["head.1"] is new["head.1"]  # the step's head: only in the new model, kept as trained
    kept = fuse_states(old, new, 0.25, keep_new=frozenset({"bn.running_var"}))  # ewf.fuse_buffers=false
    assert kept["bn.running_var"].tolist() == [2.0] and kept["w"].tolist() == [1.5, 1.0]


def test_fusion_names_a_tensor_whose_shape_changed():
    with pytest.raises(ValueError, match=r"'w' has shape \(2,\) in the step t-1 model but \(3,\)"):
        fuse_states({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)


def test_threshold_variant_fuses_the_entries_that_moved_most():
    torch.manual_seed(0)
    old = {"a": torch.randn(1000), "b": torch.randn(10, 100)}
    new = {"a": torch.randn(1000), "b": torch.randn(10, 100)}
    fused = fuse_states(old, new, 0.3, threshold_fraction=0.45)
    changed = sum(int((fused[k] != new[k]).sum()) for k in old)
    assert abs(changed / 2000 - 0.45) <= 0.001
    moved = torch.cat([(old[k] - new[k]).abs().flatten() for k in old])
    fused_moved = torch.cat([(old[k] - new[k]).abs()[fused[k] != new[k]].flatten() for k in old])
    assert fused_moved.min() >= moved.kthvalue(2000 - 900).values  # exactly the largest changes
    plain = fuse_states(old, new, 0.3)
    every = fuse_states(old, new, 0.3, threshold_fraction=1.0)
    assert all(torch.equal(every[k], plain[k]) for k in old)


def test_ewf_parameters_are_checked():
    with pytest.raises(ValueError, match="threshold_fraction"):
        EWF.Params(threshold_fraction=1.5)


def _record_end_steps(monkeypatch):
    """Wrap EWF.end_step: per step, the trained model θ_t, the old model θ̂_{t−1} and the fused model."""
    seen = {}
    original = EWF.end_step

    def end_step(self, ctx, method):
        trained = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        old = {k: v.detach().clone() for k, v in ctx.old_model.state_dict().items()} if ctx.old_model else None
        original(self, ctx, method)
        seen[ctx.step] = {"trained": trained, "old": old,
                          "fused": {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}}

    monkeypatch.setattr(EWF, "end_step", end_step)
    return seen


def test_three_steps_fuse_recursively_freeze_old_heads_and_test_the_fused_model(tiny_run, monkeypatch):
    seen = _record_end_steps(monkeypatch)
    starts = {}
    original_begin = EWF.begin_step

    def begin_step(self, ctx, method):
        starts[ctx.step] = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        original_begin(self, ctx, method)

    monkeypatch.setattr(EWF, "begin_step", begin_step)
    cfg = tiny_run("mib+ewf", "demo/mib_ewf.yaml",
                   **{"data.task": "15-1", "data.batch_size": 2, "train.share_step0": False})
    rows = Runner(cfg).run([0, 1, 2])
    ckpt = {t: load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / f"step{t}.ckpt")["model"] for t in range(3)}
    task = get_task("voc", "15-1")
    assert 0 not in seen or seen[0]["fused"].keys() == seen[0]["trained"].keys()
    assert all(torch.equal(seen[0]["fused"][k], seen[0]["trained"][k]) for k in seen[0]["trained"])  # no fusion
    for t in (1, 2):
        alpha = fusion_alpha(1, task.num_outputs(t))
        trained, old, saved = seen[t]["trained"], seen[t]["old"], ckpt[t]
        assert all(torch.equal(old[k], ckpt[t - 1][k]) for k in old)  # the old model is the fused step t−1 model
        for name in old:  # the saved step-t model: (1−α)·θ̂_{t−1} + α·θ_t on shared tensors
            expected = torch.lerp(old[name].float(), trained[name].float(), alpha)
            torch.testing.assert_close(saved[name].float(), expected, rtol=0, atol=1e-6, msg=name)
        new_head = f"classifier.heads.{t}.weight"
        assert new_head not in old and torch.equal(saved[new_head], trained[new_head])  # kept as trained
        for h in range(t):  # old heads (background row included) did not move during the step
            for suffix in ("weight", "bias"):
                name = f"classifier.heads.{h}.{suffix}"
                assert torch.equal(trained[name], starts[t][name]), name
        # the MiB init lowered b_0 by log(|C^t| + 1) and froze it: fused b̂_0 = b_0 − α·log 2
        b0_old, b0_saved = old["classifier.heads.0.bias"][0], saved["classifier.heads.0.bias"][0]
        assert b0_saved.item() == pytest.approx(b0_old.item() - alpha * math.log(2), abs=1e-5)
        assert torch.equal(saved["classifier.heads.0.bias"][1:], old["classifier.heads.0.bias"][1:])
        encoder = next(k for k in old if k.startswith("encoder.") and old[k].is_floating_point()
                       and not torch.equal(old[k], trained[k]))  # the encoder trained, and was fused
        assert not torch.equal(saved[encoder], trained[encoder])
    assert retest_run(cfg.resolved_run_dir())  # the recorded numbers are the saved (fused) model's
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_best_val_selection_fuses_the_selected_weights(tiny_run, monkeypatch):
    seen = _record_end_steps(monkeypatch)
    selected = {}
    original_validate = StepTrainer._validate

    def validate(self, ctx, epoch, best):
        best = original_validate(self, ctx, epoch, best)
        selected[ctx.step] = best["state"]
        return best

    monkeypatch.setattr(StepTrainer, "_validate", validate)
    cfg = tiny_run("mib+ewf", "demo/mib_ewf.yaml", **{"train.select": "best_val", "train.val_every": 1,
                                                       "train.epochs_incremental": 3, "train.share_step0": False})
    Runner(cfg).run()
    assert selected[1] is not None
    assert all(torch.equal(seen[1]["trained"][k], selected[1][k].to(seen[1]["trained"][k].device))
               for k in selected[1])  # end_step fused the selected snapshot, not the last epoch
    saved = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / "step1.ckpt")["model"]
    assert all(torch.equal(saved[k], seen[1]["fused"][k]) for k in saved)
    assert retest_run(cfg.resolved_run_dir())


def test_ewf_adds_no_loss_term_and_shares_the_base_step0():
    mib, mib_ewf = build_method({"name": "mib"}), build_method({"name": "mib+ewf"})
    assert mib_ewf.step0_key() == mib.step0_key() and mib_ewf.head_init == mib.head_init == "background"
    assert type(mib_ewf).loss is type(mib).loss
    plop_ewf = build_method({"name": "plop", "addons": ["ewf"]})
    assert plop_ewf.step0_key() == build_method({"name": "plop"}).step0_key()


def test_ft_with_ewf_keeps_the_old_model_without_running_it(tiny_run, monkeypatch):
    seen = _record_end_steps(monkeypatch)
    cfg = tiny_run("ft+ewf", **{"train.share_step0": False})
    method = build_method(cfg.method)
    assert method.uses_old_model and not method.old_forward and method.name == "ft+ewf"
    Runner(cfg).run()
    assert seen[1]["old"] is not None and set(seen[1]["old"]) < set(seen[1]["fused"])


def test_the_unfused_model_can_be_tested_for_diagnosis(tiny_run, caplog):
    """ewf.evaluate_unfused: the trained model's test mIoU is logged before the fusion; the recorded row is the
    fused model's (a re-test of the checkpoint reproduces it)."""
    import logging

    cfg = tiny_run("mib+ewf", "demo/mib_ewf.yaml", **{"method.ewf.evaluate_unfused": True,
                                                       "train.share_step0": False})
    with caplog.at_level(logging.INFO, logger="sats"):
        rows = Runner(cfg).run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EWF step")]
    assert len(lines) == 1 and lines[0].startswith("EWF step 1: the trained (unfused) model tests at mIoU")
    unfused = float(lines[0].split("mIoU ")[1].split(";")[0])
    assert unfused != pytest.approx(rows[1]["miou"] * 100, abs=1e-6)  # the recorded row is the fused model's
    assert retest_run(cfg.resolved_run_dir())
