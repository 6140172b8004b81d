"""The method contract: what every continual-learning method must do, checked on tiny CPU runs.

Like segmentation_models.pytorch's ``BaseModelTester``: :class:`MethodContract` holds the checks,
and every method has one small subclass (``tests/test_method_contract.py``) that names the method
and what is particular to it (its loss terms per step, config overrides). The tests of
``tests/test_method_contract.py`` run the checks over the whole registry: a registered ``sats.*``
method without a subclass is checked with the plain :class:`MethodContract` (its demo config,
no expected terms), so a method file dropped into ``sats/methods/`` is checked at once.

The checks, each on the tiny synthetic 15-5 task (tiny MiT, 32 px, 2 + 1 epochs):

* :meth:`~MethodContract.check_two_steps`: ``Runner(cfg).run()`` end to end; every step's
  ``epoch_losses`` are finite, named (``{term: [one value per epoch]}``), and the subclass's terms;
* :meth:`~MethodContract.check_declared_outputs`: ``method.loss`` gets model outputs whose
  undeclared fields raise on access, and reads every output it declares (``needs_at(t)`` of the
  new model, ``old_needs`` of the old one, and the old output at all when the engine runs the old
  model for it);
* :meth:`~MethodContract.check_state_round_trip`: ``state_dict`` → ``load_state_dict`` gives the same
  state, also into a fresh instance, for the state saved at the end of the run;
* :meth:`~MethodContract.check_resume_mid_step`: a run stopped (SIGTERM) in the middle of its last
  step and resumed gives exactly the numbers, weights and method state of an uninterrupted run (the
  mid-step method state round-trips too).
"""

from __future__ import annotations

import math
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple, Type

import pytest
import torch

from conftest import CONFIGS, tiny_overrides
from sats.config import ExperimentConfig
from sats.experiment import load_experiment
from sats.engine.checkpoint import load_checkpoint
from sats.engine.runner import Runner
from sats.engine.signals import RunInterrupted
from sats.methods import Method, build_method
from sats.models.segmenter import ModelOutput

#: every field of the model's output; ``logits`` are always there
OUTPUT_FIELDS: FrozenSet[str] = frozenset(ModelOutput.__dataclass_fields__)
#: the numbers of a results row that must not change when a run is resumed
RESULT_NUMBERS = ("iou", "miou", "num_pixels", "iterations", "epoch_losses", "nonfinite_skipped")
TERM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: method name → its contract subclass (filled when a subclass is defined)
CONTRACTS: Dict[str, Type["MethodContract"]] = {}


class UndeclaredOutputError(AssertionError):
    """A method's loss read a model output it did not declare (``needs`` / ``old_needs``)."""


class TrackedOutput:
    """A :class:`ModelOutput` stand-in: declared fields pass through and are recorded, undeclared ones raise."""

    def __init__(self, out: ModelOutput, allowed: FrozenSet[str], where: str) -> None:
        self._out, self._allowed, self._where, self.read = out, allowed, where, set()

    def __getattr__(self, name: str) -> Any:
        if name in OUTPUT_FIELDS:
            if name not in self._allowed:
                raise UndeclaredOutputError(f"{self._where}: the loss read {name!r}, which is not declared "
                                            f"(declared: {sorted(self._allowed)})")
            self.read.add(name)
        return getattr(self._out, name)


@dataclass
class Reads:
    """What a method's loss read in one step."""

    new: Set[str]
    old: Set[str]
    old_calls: int  # calls that received an old-model output
    calls: int


@dataclass
class RunRecord:
    """A finished tiny run: its config, results rows and the state of its method at the end."""

    cfg: ExperimentConfig
    rows: List[Dict[str, Any]]
    method_state: Dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.cfg.resolved_run_dir()

    def step_checkpoint(self, t: int) -> Dict[str, Any]:
        return load_checkpoint(self.run_dir / "checkpoints" / f"step{t}.ckpt")


def assert_same_state(actual: Any, expected: Any, where: str = "state") -> None:
    """Deep equality of method states: same keys, types, and tensors equal in value, dtype and shape."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}, expected a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{where}: {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
        assert torch.equal(actual.cpu(), expected.cpu()), f"{where}: tensor values differ"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: {type(actual).__name__}, expected a mapping"
        assert set(actual) == set(expected), f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{where}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def result_numbers(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: r[k] for k in RESULT_NUMBERS} for r in rows]


class MethodContract:
    """The checks every method passes; a subclass per method sets :attr:`method` and what is particular to it."""

    #: registered method name (``method.name``), with its add-ons after ``+`` (``mib+ewf``)
    method: ClassVar[str] = ""
    #: config file under ``configs/`` (default ``demo/<method>.yaml``)
    config: ClassVar[Optional[str]] = None
    #: extra config overrides of every run of this method
    overrides: ClassVar[Mapping[str, Any]] = {}
    #: loss-term names of each step (``epoch_losses`` keys); None: not checked
    terms: ClassVar[Optional[Tuple[FrozenSet[str], ...]]] = None
    #: more config overrides under which the method declares other outputs (each gets check_declared_outputs)
    output_variants: ClassVar[Tuple[Mapping[str, Any], ...]] = ()

    #: every run of the contract: no step-0 sharing between its runs, stochastic depth on (the resume must
    #: restore its random streams), no tensorboard or overlays
    BASE_OVERRIDES: ClassVar[Mapping[str, Any]] = {"train.share_step0": False, "model.drop_path": 0.1,
                                                   "log.tensorboard": False, "log.overlay_images": 0}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            if cls.method in CONTRACTS:
                raise TypeError(f"two contract classes for method {cls.method!r}: {CONTRACTS[cls.method]} and {cls}")
            CONTRACTS[cls.method] = cls

    @classmethod
    def for_method(cls, name: str) -> "MethodContract":
        """The contract of method ``name``: its subclass, or the plain contract with the method's defaults."""
        if name in CONTRACTS:
            return CONTRACTS[name]()
        generic = cls()
        generic.method = name  # instance attribute: the plain contract, only the name set
        return generic

    # -- runs --------------------------------------------------------------------------------------
    def make_config(self, data_root: Path, work: Path, run_name: str,
                    variant: Optional[Mapping[str, Any]] = None) -> ExperimentConfig:
        path = CONFIGS / (self.config or f"demo/{self.method}.yaml")
        if not path.is_file():
            pytest.fail(f"method {self.method!r}: no config {path} for its contract runs (add configs/demo/"
                        f"{self.method}.yaml or set `config` in its MethodContract subclass)")
        extra = {**self.BASE_OVERRIDES, **self.overrides, **(variant or {})}
        overrides = tiny_overrides(data_root, work / run_name, work / "cache", **extra)
        return load_experiment(path, [*overrides, f"method.name={self.method}"])

    def run(self, data_root: Path, work: Path, run_name: str = "reference") -> RunRecord:
        """An uninterrupted tiny run."""
        cfg = self.make_config(data_root, work, run_name)
        runner = Runner(cfg)
        rows = runner.run()
        return RunRecord(cfg, rows, runner.method.state_dict())

    # -- the checks ----------------------------------------------------------------------------------
    def check_two_steps(self, reference: RunRecord) -> None:
        """Every step trained and evaluated; its per-epoch losses finite and named."""
        method = build_method(reference.cfg.method)
        rows, cfg = reference.rows, reference.cfg
        num_steps = 1 if method.joint else 2  # the tiny task: 15-5
        assert [r["step"] for r in rows] == list(range(num_steps))
        for row in rows:
            t, losses = row["step"], row["epoch_losses"]
            epochs = cfg.train.epochs if t == 0 else cfg.train.epochs_incremental
            assert isinstance(losses, dict) and losses, f"step {t}: no loss terms recorded"
            for name, values in losses.items():
                assert isinstance(name, str) and TERM_NAME.match(name), f"step {t}: loss term name {name!r}"
                assert len(values) == epochs, f"step {t}, term {name!r}: {len(values)} values for {epochs} epochs"
                assert all(isinstance(v, float) and math.isfinite(v) for v in values), f"step {t}, {name}: {values}"
            assert row["iterations"] > 0 and row["nonfinite_skipped"] == 0
            assert all(v is None or 0.0 <= v <= 1.0 for v in row["iou"]) and 0.0 <= row["miou"] <= 1.0
            if self.terms is not None:
                assert set(losses) == set(self.terms[t]), f"step {t}: terms {sorted(losses)}, expected {sorted(self.terms[t])}"
        if self.terms is not None:
            assert len(self.terms) == num_steps

    def check_declared_outputs(self, data_root: Path, work: Path,
                               variant: Optional[Mapping[str, Any]] = None) -> Dict[int, Reads]:
        """The loss reads only declared outputs (others raise) and every declared one; returns what it read."""
        cfg = self.make_config(data_root, work, "tracked", variant)
        runner = Runner(cfg)
        method: Method = runner.method
        original = method.loss
        reads: Dict[int, Reads] = {}

        def tracked_loss(batch, out, old_out, ctx):
            t = ctx.step
            seen = reads.setdefault(t, Reads(set(), set(), 0, 0))
            new = TrackedOutput(out, frozenset(method.needs_at(t)) | {"logits"},
                                f"method {method.name!r}, step {t}, new model (needs_at({t}))")
            old = None
            if old_out is not None:
                old = TrackedOutput(old_out, frozenset(method.old_needs) | {"logits"},
                                    f"method {method.name!r}, step {t}, old model (old_needs)")
            terms = original(batch, new, old, ctx)
            seen.new |= new.read
            seen.calls += 1
            if old is not None:
                seen.old |= old.read
                seen.old_calls += 1
            return terms

        method.loss = tracked_loss  # type: ignore[method-assign]
        runner.run()
        for t, seen in sorted(reads.items()):
            declared = set(method.needs_at(t))
            assert declared <= seen.new, (f"method {method.name!r}, step {t}: declares new-model outputs "
                                          f"{sorted(declared - seen.new)} that its loss never reads")
            runs_old = t > 0 and method.old_model_at(t) and method.old_forward
            assert (seen.old_calls == seen.calls) if runs_old else seen.old_calls == 0, (
                f"method {method.name!r}, step {t}: old-model output in {seen.old_calls}/{seen.calls} loss calls")
            if runs_old:
                assert seen.old, (f"method {method.name!r}, step {t}: the engine runs the old model for it "
                                  "(uses_old_model, old_forward) but its loss never reads the old output")
                assert set(method.old_needs) <= seen.old, (
                    f"method {method.name!r}, step {t}: declares old-model outputs "
                    f"{sorted(set(method.old_needs) - seen.old)} that its loss never reads")
        return reads

    def check_state_round_trip(self, reference: RunRecord) -> None:
        """The method state survives ``state_dict`` → ``load_state_dict`` (same and fresh instance, and a file)."""
        last = reference.rows[-1]["step"]
        saved = reference.step_checkpoint(last)["method"]
        assert_same_state(saved, reference.method_state, "saved step checkpoint vs. the method")
        self.check_state_loads(reference.cfg, reference.method_state)
        fresh = build_method(reference.cfg.method)
        self.check_state_loads(reference.cfg, fresh.state_dict())  # a fresh (step-0) state too

    @staticmethod
    def check_state_loads(cfg: ExperimentConfig, state: Dict[str, Any]) -> None:
        for method in (build_method(cfg.method), build_method(cfg.method)):
            method.load_state_dict(state)
            assert_same_state(method.state_dict(), state, f"method {method.name!r} state after load_state_dict")
            method.load_state_dict(method.state_dict())  # and again from its own output
            assert_same_state(method.state_dict(), state, f"method {method.name!r} state, loaded twice")

    def check_resume_mid_step(self, reference: RunRecord, data_root: Path, work: Path,
                              stop_after: int = 2) -> None:
        """SIGTERM after iteration ``stop_after`` of the last step, then resume: exactly the reference."""
        last = reference.rows[-1]["step"]
        cfg = self.make_config(data_root, work, "stopped")
        runner = Runner(cfg)
        original = runner.method.after_optimizer_step
        calls = {"n": 0}

        def after_optimizer_step(ctx):
            original(ctx)
            calls["n"] += ctx.step == last
            if ctx.step == last and calls["n"] == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)  # the runner's handler: stop after this iteration

        runner.method.after_optimizer_step = after_optimizer_step  # type: ignore[method-assign]
        with pytest.raises(RunInterrupted, match=rf"at step {last} epoch 1 \(after iteration {stop_after}/"):
            runner.run()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        epoch_ckpt = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / f"step{last}-epoch.ckpt")
        assert epoch_ckpt["partial"]["batches_done"] == stop_after
        self.check_state_loads(cfg, epoch_ckpt["method"])  # the mid-step state round-trips too
        del runner
        resumed = Runner(cfg).run()
        assert result_numbers(resumed) == result_numbers(reference.rows)
        mine = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / f"step{last}.ckpt")
        theirs = reference.step_checkpoint(last)
        assert_same_state(mine["model"], theirs["model"], "final weights")
        assert_same_state(mine["method"], theirs["method"], "final method state")
