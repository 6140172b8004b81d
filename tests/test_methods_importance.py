"""EWC / RW / PI (docs/methods.md §3.5–3.7) on the engine: two-step runs, resume, the missing-importance
guard, and the order of the importance update and the penalty gradient (hand-computed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sats.engine.runner as runner_module
from sats.config import ConfigError
from sats.engine.checkpoint import load_checkpoint
from sats.engine.runner import Runner
from sats.methods import build_method, validate_method_config
from sats.methods._importance import MissingImportanceError
from sats.methods._importance_trackers import EWCImportance, PathIntegralImportance

METHODS = ("ewc", "rw", "pi")
FAST = {"log.tensorboard": False, "log.overlay_images": 0}


class _Interrupt(Exception):
    pass


def _rows(run_dir):
    return json.loads((run_dir / "results.json").read_text())["steps"]


def _no_old_forward(monkeypatch):
    """Make every old model of the engine raise if its forward runs (EWC/RW/PI read only its weights)."""
    original = runner_module.frozen_copy

    def frozen_without_forward(model):
        old = original(model)

        def forbidden(*args, **kwargs):
            raise AssertionError("the old model's forward ran although the method sets old_forward = False")

        old.forward = forbidden
        return old

    monkeypatch.setattr(runner_module, "frozen_copy", frozen_without_forward)


@pytest.mark.parametrize("method", METHODS)
def test_two_steps_penalty_and_resume_matches_uninterrupted(method, tiny_run, monkeypatch):
    _no_old_forward(monkeypatch)
    extra = {**FAST, "train.epochs": 1, "train.epochs_incremental": 2, "train.deterministic": True}
    if method == "rw":
        extra["method.score_interval"] = 3  # a few score updates within the tiny steps
    cfg = tiny_run(method, config=f"demo/{method}.yaml", run_name="uninterrupted", **extra)
    rows = Runner(cfg).run()
    run_dir = cfg.resolved_run_dir()

    assert rows[0]["shared_step0"] is None and not (Path(cfg.data.cache_dir) / "step0").exists()  # own step 0
    assert set(rows[0]["epoch_losses"]) == {"ce"}  # no penalty at step 0 ...
    step0_state = load_checkpoint(run_dir / "checkpoints/step0.ckpt")["method"]["tracker"]
    assert step0_state["name"] == method and step0_state["phase"] == "ended"  # ... but importance accumulated
    losses = rows[1]["epoch_losses"]
    assert set(losses) == {"ce", method} and len(losses[method]) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert all(v > 0 for v in losses[method]), losses  # the penalty is on at step 1

    # interrupt step 1 in its second epoch (after the first epoch checkpoint), resume in a new runner
    cfg_b = tiny_run(method, config=f"demo/{method}.yaml", run_name="interrupted", **extra)
    runner = Runner(cfg_b)
    ckpt_b = cfg_b.resolved_run_dir() / "checkpoints"
    shutil.copyfile(run_dir / "checkpoints/step0.ckpt", ckpt_b / "step0.ckpt")
    original = runner.method.loss

    def flaky_loss(batch, out, old_out, ctx):
        if ctx.step == 1 and ctx.epoch == 1:
            raise _Interrupt()
        return original(batch, out, old_out, ctx)

    monkeypatch.setattr(runner.method, "loss", flaky_loss)
    with pytest.raises(_Interrupt):
        runner.run(steps=[1])
    assert load_checkpoint(ckpt_b / "step1-epoch.ckpt")["method"]["tracker"]["phase"] == "running"
    resumed = Runner(cfg_b).run(steps=[1])[-1]
    assert resumed["iou"] == rows[1]["iou"]
    assert resumed["epoch_losses"] == losses
    # the finished importance (what step 2 would use) is identical too
    final_a = load_checkpoint(run_dir / "checkpoints/step1.ckpt")["method"]["tracker"]
    final_b = load_checkpoint(ckpt_b / "step1.ckpt")["method"]["tracker"]
    tensor_keys = [k for k, v in final_a.items() if isinstance(v, dict)]
    assert tensor_keys and final_a.keys() == final_b.keys()
    for key in tensor_keys:
        assert final_a[key].keys() == final_b[key].keys()
        for name, value in final_a[key].items():
            assert torch.equal(value, final_b[key][name]), (key, name)


def test_foreign_step0_checkpoint_is_refused(tiny_run):
    ft = tiny_run("ft", run_name="ft", **FAST, **{"train.epochs": 1})
    Runner(ft).run(steps=[0])
    for method in METHODS:
        cfg = tiny_run(method, config=f"demo/{method}.yaml", run_name=method, **FAST, **{"train.epochs": 1})
        runner = Runner(cfg)
        shutil.copyfile(ft.resolved_run_dir() / "checkpoints/step0.ckpt",
                        cfg.resolved_run_dir() / "checkpoints/step0.ckpt")
        with pytest.raises(MissingImportanceError, match=rf"step 1: the step 0 checkpoint .* no finished '{method}' "
                                                         r"importance \(its method state is empty"):
            runner.run(steps=[1])


def test_state_of_another_tracker_or_alpha_is_refused():
    tracker = EWCImportance(alpha=0.9)
    w = nn.Parameter(torch.zeros(2))
    tracker.begin_step([("w", w)])
    tracker.end_step([("w", w)])
    with pytest.raises(ValueError, match="holds 'ewc' importance, not 'rw'"):
        build_method({"name": "rw"}).load_state_dict({"tracker": tracker.state_dict()})
    with pytest.raises(ValueError, match=r"alpha=0.9 but method.alpha=0.5"):
        build_method({"name": "ewc", "alpha": 0.5}).load_state_dict({"tracker": tracker.state_dict()})
    with pytest.raises(ValueError, match="unexpected method-state keys"):
        build_method({"name": "ewc"}).load_state_dict({"tracker": tracker.state_dict(), "other": 1})


def test_params_are_validated():
    assert validate_method_config({"name": "rw"}) == {"name": "rw", "reduction": "all_pixels", "lambda_reg": 100.0,
                                                       "alpha": 0.9, "score_interval": 10}
    with pytest.raises(ConfigError, match="alpha"):
        validate_method_config({"name": "ewc", "alpha": 1.5})
    with pytest.raises(ConfigError, match="lambda_reg"):
        validate_method_config({"name": "pi", "lambda_reg": -1.0})
    with pytest.raises(ConfigError, match="score_interval"):
        validate_method_config({"name": "rw", "score_interval": 0})
    assert all(build_method({"name": m}).step0_key() is None for m in METHODS)  # never a shared step 0


# ----------------------------------------------------------------------------------------------
# The hook order on a toy model: w (3,) exists in the old model, `head` (1,) is new.
X = torch.tensor([3.0, -1.0, 2.0])  # main loss  L = x·w + 2·head  →  g_w = x, g_head = 2


class _Toy(nn.Module):
    def __init__(self, w, head=None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        if head is not None:
            self.head = nn.Parameter(torch.tensor(head))

    def main_loss(self):
        return (X * self.w).sum() + 2.0 * self.head.sum()


def _ctx(model, old, grad_scaled=False):
    return SimpleNamespace(step=1, iteration=0, model=model, old_model=old, device=torch.device("cpu"),
                           run_dir="toy", grad_scaled=grad_scaled)


def _ended_state(tracker, fill):
    """A finished step-0 tracker state whose accumulator for `w` holds ``fill``."""
    w = nn.Parameter(torch.zeros(3))
    tracker.begin_step([("w", w)])
    if isinstance(tracker, PathIntegralImportance):
        tracker.end_step([("w", w)])
        tracker.omega["w"] = torch.tensor(fill)
    else:
        tracker.fisher["w"] = torch.tensor(fill)
        tracker.end_step([("w", w)])
    return {"tracker": tracker.state_dict()}


def _backward(method, model, ctx):
    for p in model.parameters():
        p.grad = None
    model.main_loss().backward()
    method.after_backward(ctx)


def test_ewc_updates_importance_from_the_main_loss_then_adds_the_penalty_gradient():
    method = build_method({"name": "ewc", "alpha": 0.5, "lambda_reg": 10.0})
    method.load_state_dict(_ended_state(EWCImportance(alpha=0.5), [1.0, 3.0, 2.0]))  # F̂_prev = [0, 1, 0.5]
    model, old = _Toy([1.0, 2.0, -1.0], head=[0.5]), _Toy([0.0, 0.0, 0.0])
    ctx = _ctx(model, old)
    method.begin_step(ctx)

    out = SimpleNamespace(logits=torch.zeros(1, 2, 1, 1))
    terms = method.loss(SimpleNamespace(labels=torch.zeros(1, 1, 1, dtype=torch.long)), out, None, ctx)
    # λ Σ F̂ (w − w_old)² = 10 · (0·1 + 1·4 + 0.5·1) = 45, detached (its gradient comes in after_backward)
    assert terms["ewc"].item() == pytest.approx(45.0, rel=1e-6) and not terms["ewc"].requires_grad
    assert terms["ce"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())

    _backward(method, model, ctx)
    # F ← α g² + (1 − α) F with g the main-loss gradient only: 0.5·[9, 1, 4] + 0.5·[1, 3, 2]
    torch.testing.assert_close(method.tracker.fisher["w"], torch.tensor([5.0, 2.0, 3.0]))
    torch.testing.assert_close(method.tracker.fisher["head"], torch.tensor([2.5]))  # new: from F = 1
    # p.grad = g + 2λ F̂ (w − w_old) = [3, −1, 2] + 20·[0·1, 1·2, 0.5·(−1)]; the new head is free
    torch.testing.assert_close(model.w.grad, torch.tensor([3.0, 39.0, -8.0]))
    torch.testing.assert_close(model.head.grad, torch.tensor([2.0]))


def test_pi_path_integral_uses_the_main_loss_gradient():
    method = build_method({"name": "pi", "lambda_reg": 10.0})
    method.load_state_dict(_ended_state(PathIntegralImportance(), [1.0, 3.0, 2.0]))
    model, old = _Toy([1.0, 2.0, -1.0], head=[0.5]), _Toy([0.0, 0.0, 0.0])
    ctx = _ctx(model, old)
    method.begin_step(ctx)
    _backward(method, model, ctx)  # first update: only the snapshot θ_prev = θ
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.5, 2.0, -2.0]))  # θ − θ_prev = [0.5, 0, −1]
    _backward(method, model, ctx)
    # δ = −g·(θ − θ_prev) with g = x = [3, −1, 2] (not the penalty-augmented gradient)
    torch.testing.assert_close(method.tracker.delta["w"], torch.tensor([-1.5, 0.0, 2.0]))


def test_fp16_overflow_leaves_the_importance_untouched():
    method = build_method({"name": "ewc", "alpha": 0.5, "lambda_reg": 10.0})
    method.load_state_dict(_ended_state(EWCImportance(alpha=0.5), [1.0, 3.0, 2.0]))
    model, old = _Toy([1.0, 2.0, -1.0], head=[0.5]), _Toy([0.0, 0.0, 0.0])
    ctx = _ctx(model, old, grad_scaled=True)
    method.begin_step(ctx)
    model.w.grad = torch.tensor([1.0, float("inf"), 0.0])
    model.head.grad = torch.tensor([1.0])
    method.after_backward(ctx)  # the GradScaler will skip this step
    torch.testing.assert_close(method.tracker.fisher["w"], torch.tensor([1.0, 3.0, 2.0]))
    torch.testing.assert_close(method.tracker.fisher["head"], torch.tensor([1.0]))
    _backward(method, model, ctx)  # a finite step updates as usual
    torch.testing.assert_close(method.tracker.fisher["w"], torch.tensor([5.0, 2.0, 3.0]))


def test_missing_importance_guard_on_a_fresh_state():
    method = build_method({"name": "rw"})
    method.load_state_dict({})  # e.g. the method state of a plain-CE step-0 checkpoint
    with pytest.raises(MissingImportanceError, match=r"'rw', step 1: .* no finished 'rw' importance"):
        method.begin_step(_ctx(_Toy([1.0, 2.0, -1.0], head=[0.5]), _Toy([0.0, 0.0, 0.0])))
