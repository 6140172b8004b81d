"""The engine end to end on tiny runs: steps, results, resume, re-test, step-0 sharing, non-finite guard."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from sats.engine.checkpoint import CheckpointError
from sats.engine.evaluation import retest_run
from sats.engine.runner import NonFiniteLossError, RunError, Runner
from sats.losses.ce import cross_entropy
from sats.methods.base import Method, register_method


@dataclass
class _FailParams:
    fail_at: int = 3  # iteration (1-based, within the step) whose loss is non-finite
    fail_step: int = 0


@register_method
class _NaNAtIteration(Method):
    """Test-only: CE whose loss is NaN at one iteration of one step."""

    name = "test-nan"
    Params = _FailParams
    step0 = None

    calls = 0

    def loss(self, batch, out, old_out, ctx):
        ce = cross_entropy(out.logits, batch.labels)
        self.calls = self.calls + 1 if ctx.step == self.params.fail_step else 0
        if self.calls == self.params.fail_at:
            return {"ce": ce, "bad_term": ce * float("nan")}
        return {"ce": ce}


class _Interrupt(Exception):
    pass


def _rows(run_dir):
    return json.loads((run_dir / "results.json").read_text())["steps"]


def test_two_step_ft_run(tiny_run):
    cfg = tiny_run("ft", **{"train.epochs": 3})
    rows = Runner(cfg).run()
    run_dir = cfg.resolved_run_dir()
    assert [r["step"] for r in rows] == [0, 1]
    assert len(rows[0]["iou"]) == 16 and len(rows[1]["iou"]) == 21  # 15-5: K_0 = 16, K_1 = 21
    assert rows[1]["groups"]["old"] == list(range(16)) and rows[1]["groups"]["new"] == list(range(16, 21))
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and r["iterations"] > 0 and r["train_images_per_s"] > 0
    ce = rows[0]["epoch_losses"]["ce"]
    assert len(ce) == 3 and ce[-1] < ce[0], ce  # the loss decreases over step 0
    assert (run_dir / "checkpoints/step0.ckpt").exists() and (run_dir / "checkpoints/step1.ckpt").exists()
    assert not (run_dir / "checkpoints/step1-epoch.ckpt").exists()  # epoch checkpoints are cleaned up
    assert (run_dir / "results.md").read_text().count("\n|") > 3
    assert list((run_dir / "tb").iterdir())  # tensorboard events
    # sats test reproduces the recorded numbers exactly
    assert retest_run(run_dir)
    # a second call resumes nothing and retrains nothing
    again = Runner(cfg).run()
    assert [r["miou"] for r in again] == [r["miou"] for r in rows]


def test_resume_after_interrupted_epoch_matches_uninterrupted(tiny_run, monkeypatch):
    extra = {"train.epochs": 3, "train.share_step0": False, "train.deterministic": True}
    reference = Runner(tiny_run("ft", run_name="uninterrupted", **extra)).run()

    cfg = tiny_run("ft", run_name="interrupted", **extra)
    runner = Runner(cfg)
    original = runner.method.loss
    calls = {"n": 0}

    def flaky_loss(batch, out, old_out, ctx):  # dies in the middle of epoch 3 of step 0
        if ctx.step == 0 and ctx.epoch == 2:
            raise _Interrupt()
        calls["n"] += 1
        return original(batch, out, old_out, ctx)

    monkeypatch.setattr(runner.method, "loss", flaky_loss)
    with pytest.raises(_Interrupt):
        runner.run()
    assert (cfg.resolved_run_dir() / "checkpoints/step0-epoch.ckpt").exists()
    monkeypatch.undo()
    resumed = Runner(cfg).run()
    assert [r["iou"] for r in resumed] == [r["iou"] for r in reference]


def test_step0_is_shared_between_plain_ce_methods(tiny_run):
    first = Runner(tiny_run("ft", run_name="a")).run()
    second = Runner(tiny_run("ft", run_name="b")).run()
    assert first[0]["shared_step0"] is None and second[0]["shared_step0"] is not None
    assert second[0]["iou"] == first[0]["iou"]
    # a different step-0 schedule gets its own step 0
    third = Runner(tiny_run("ft", run_name="c", **{"train.lr": 0.001})).run()
    assert third[0]["shared_step0"] is None


def test_nonfinite_loss_stops_with_a_clear_message(tiny_run):
    cfg = tiny_run("test-nan", **{"method.fail_at": 3, "method.fail_step": 1})
    with pytest.raises(NonFiniteLossError, match=r"step 1, epoch 1, iteration 3, term\(s\) \['bad_term'\]"):
        Runner(cfg).run()
    assert (cfg.resolved_run_dir() / "checkpoints/step0.ckpt").exists()  # the finished step survives


def test_nonfinite_skip_counts_batches(tiny_run):
    cfg = tiny_run("test-nan", **{"method.fail_at": 2, "train.on_nonfinite": "skip"})
    rows = Runner(cfg).run()
    assert rows[0]["nonfinite_skipped"] == 1 and rows[1]["nonfinite_skipped"] == 0


def test_run_dir_with_another_config_is_refused(tiny_run):
    Runner(tiny_run("ft")).run(steps=[0])
    with pytest.raises(RunError, match="train.lr"):
        Runner(tiny_run("ft", **{"train.lr": 0.5}))


def test_truncated_checkpoint_is_refused(tiny_run):
    cfg = tiny_run("ft", **{"train.share_step0": False})
    runner = Runner(cfg)
    runner.run(steps=[0])
    path = cfg.resolved_run_dir() / "checkpoints/step0.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step0.ckpt"):
        Runner(cfg).run(steps=[1])


def test_joint_training_reports_incremental_groups(tiny_run):
    cfg = tiny_run("joint", config="demo/joint.yaml", **{"train.epochs": 1})
    rows = Runner(cfg).run()
    assert len(rows) == 1 and len(rows[0]["iou"]) == 21
    assert rows[0]["groups"]["old"] == list(range(16)) and rows[0]["groups"]["new"] == list(range(16, 21))


def test_steps_range_needs_previous_checkpoint(tiny_run):
    with pytest.raises(RunError, match="step 0 checkpoint"):
        Runner(tiny_run("ft")).run(steps=[1])


def test_bf16_full_image_eval_and_best_val_selection(tiny_run):
    cfg = tiny_run("ft", **{"train.amp": "bf16", "data.eval_mode": "full", "train.val_every": 1,
                            "train.select": "best_val", "train.share_step0": False})
    rows = Runner(cfg).run()
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows)
    assert all(all(torch.isfinite(torch.tensor(v)) for v in r["epoch_losses"]["ce"]) for r in rows)
    # full-image evaluation sees every pixel of the original 40-56 px images, not a 32 px crop
    assert rows[-1]["num_pixels"] > 12 * 32 * 32
