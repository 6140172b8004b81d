"""Entropy pseudo-label thresholds of one step, shared by PLOP and SATS (docs/methods.md §3.9, §6 items 10–12).

Method-agnostic: a method holds one :class:`EntropyThresholds`, calls :meth:`~EntropyThresholds.prepare`
in ``begin_step`` (steps > 0) and :meth:`~EntropyThresholds.pseudo_labels` in ``loss``, and puts
:meth:`~EntropyThresholds.state_dict` into its own state. :class:`PseudoLabelMethod` is that frame
(step-0 CE, pseudo-label CE, state), which PLOP and SATS complete with their distillation terms.

``prepare`` takes the per-class thresholds ``τ`` ``(K_{t−1},)`` from, in order:

1. the method state (a resumed step: nothing is recomputed);
2. the step's artifact cache ``ctx.cache`` (``<data.cache_dir>/thresholds/<key>.pt``, verified files);
3. one pass of the frozen old model (eval, no grad, the run's autocast) over the step's training
   batches: per-class histograms of the uncertainty of the pixels selected by ``pixels``
   (:class:`~sats.losses.pseudo_labels.ThresholdAccumulator`), summed over DDP ranks
   (``ctx.all_reduce_sum_``), then the median per class; the result is put into the cache.

The cache key hashes everything the thresholds depend on (§6 item 12 fixed): the old checkpoint's
content digest, the step, the task's class lists, the step's image lists (``ctx.data_digest``), the
settings below, the crop/batch pipeline, the seed and the world size. The pass runs under its own
RNG (``ctx.isolated_rng()``, seeded from (seed, step, rank)), so its random crops do not depend on
what ran before it and the training RNG is left exactly as it was.

Settings:

* ``mode="correct"`` (default): uncertainty = true normalised entropy ∈ [0, 1], true median;
  ``mode="reference"``: the reference's uncertainty scaling (mean over classes, two log
  normalisations) and its buggy median walk (§6 item 11), whose thresholds collapse to ≈ 0.005.
* ``pixels="label0"`` (default): pixels whose *training* label is 0 — background plus old and
  future classes, as in PLOP's original code; ``pixels="true_background"``: pixels whose *raw*
  mask value is 0, which is what the SATS reference counted (its dataset masking is disabled,
  §3.9 note); the pass then reads the raw masks (``ctx.train_loader(label_table=identity)``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, ContextManager, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from sats.io import digest
from sats.losses.pseudo_labels import (ThresholdAccumulator, entropy_pseudo_labels, normalized_entropy,
                                       reference_uncertainty)
from sats.losses.ce import cross_entropy
from sats.methods.base import Batch, CEParams, Method, StepContext, require_old_logits

log = logging.getLogger("sats")

THRESHOLD_MODES = ("correct", "reference")
THRESHOLD_PIXELS = ("label0", "true_background")
_CACHE_VERSION = 1
CACHE_KIND = "thresholds"  # ctx.cache entries <data.cache_dir>/thresholds/<key>.pt


@dataclass(frozen=True)
class ThresholdSettings:
    """How thresholds are computed (part of the cache key)."""

    mode: str = "correct"  # "correct" | "reference" (module docstring)
    pixels: str = "label0"  # "label0" | "true_background"
    bins: int = 100  # histogram bins on [0, 1]
    floor: float = 0.001  # τ_c = max(median_c, floor) (PLOP)

    def __post_init__(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode: {self.mode!r} is not one of {THRESHOLD_MODES}")
        if self.pixels not in THRESHOLD_PIXELS:
            raise ValueError(f"threshold_pixels: {self.pixels!r} is not one of {THRESHOLD_PIXELS}")
        if self.bins < 1:
            raise ValueError(f"threshold_bins: must be >= 1, got {self.bins}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"threshold_floor: must lie in [0, 1), got {self.floor}")


@dataclass
class ThresholdParams(CEParams):
    """Method parameters of the entropy pseudo-labels (shared by PLOP and SATS)."""

    threshold_mode: str = "correct"  # correct (normalised entropy, true median) | reference (§6 item 11)
    threshold_pixels: str = "label0"  # label0 (PLOP: bg + old + future) | true_background (SATS reference)
    threshold_floor: float = 0.001  # τ_c = max(median_c, floor)
    threshold_bins: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.threshold_settings()  # validates the threshold keys

    def threshold_settings(self) -> ThresholdSettings:
        return ThresholdSettings(mode=self.threshold_mode, pixels=self.threshold_pixels, bins=self.threshold_bins,
                                 floor=self.threshold_floor)


def pixel_uncertainty(old_logits: Tensor, num_outputs: int, mode: str) -> Tensor:
    """Per-pixel uncertainty of the old model, on the scale the thresholds of ``mode`` use.

    Args:
        old_logits: ``(B, K_{t−1}, H, W)``.
        num_outputs: ``K_t`` (the reference scaling divides by ``log K_t``).
        mode: ``"correct"`` → normalised entropy ∈ [0, 1]; ``"reference"`` → the reference's value.
    Returns:
        ``(B, H, W)`` float32.
    """
    if mode == "reference":
        return reference_uncertainty(old_logits, num_outputs)
    if mode == "correct":
        return normalized_entropy(old_logits)
    raise ValueError(f"pixel_uncertainty: mode {mode!r} is not one of {THRESHOLD_MODES}")


def raw_label_table() -> np.ndarray:
    """Identity lookup table (256,) uint8: the pass sees raw mask values (``pixels="true_background"``)."""
    return np.arange(256, dtype=np.uint8)


def accumulate_thresholds(old_model: torch.nn.Module, batches: Iterable[Batch], num_outputs: int,
                          settings: ThresholdSettings, autocast: Callable[[], ContextManager[Any]],
                          device: torch.device, all_reduce_sum_: Callable[[Tensor], Tensor] = lambda t: t
                          ) -> Tuple[Tensor, Tensor]:
    """One pass of ``old_model`` over ``batches`` → ``(thresholds, histogram)``.

    ``thresholds`` ``(K_{t−1},)`` float32, ``histogram`` ``(K_{t−1}, bins)`` int64 (on the CPU).

    Counts the pixels whose label is 0 (with the caller's label table), by the old model's arg-max
    class; the histogram is summed over DDP ranks before the medians are taken.
    """
    accumulator: Optional[ThresholdAccumulator] = None
    with torch.no_grad():
        for batch in batches:
            with autocast():
                old_logits = old_model(batch.images).logits
            old_logits = old_logits.float()
            if accumulator is None:
                accumulator = ThresholdAccumulator(old_logits.shape[1], settings.bins, settings.mode, device=device)
            uncertainty = pixel_uncertainty(old_logits, num_outputs, settings.mode)
            accumulator.update(uncertainty, old_logits.max(dim=1).indices, batch.labels == 0)
    if accumulator is None:
        raise RuntimeError("pseudo-label thresholds: the training loader yielded no batch")
    all_reduce_sum_(accumulator.histogram)  # every rank's pixels (ctx.all_reduce_sum_ under DDP)
    return accumulator.thresholds(settings.floor), accumulator.histogram.cpu()


class EntropyThresholds:
    """Per-class entropy thresholds ``τ`` of the current step and the pseudo-labelling that uses them.

    Attributes:
        thresholds: ``(K_{t−1},)`` float32 on the step's device, or None before :meth:`prepare`.
        key: the cache key of ``thresholds``.
        data_passes: how many passes over the training data this object ran (tests, logs).
    """

    def __init__(self, settings: ThresholdSettings) -> None:
        self.settings = settings
        self.thresholds: Optional[Tensor] = None
        self.key: Optional[str] = None
        self.data_passes = 0

    # -- key and cache -----------------------------------------------------------------------
    def key_fields(self, ctx: StepContext) -> Optional[Dict[str, Any]]:
        """What the thresholds of ``ctx``'s step depend on; None if the step cannot be identified."""
        if ctx.old_checkpoint_digest is None or ctx.data_digest is None:
            return None
        data, train = ctx.cfg.data, ctx.cfg.train
        return {
            "version": _CACHE_VERSION,
            "old_checkpoint": ctx.old_checkpoint_digest,
            "step": ctx.step,
            "task": {"dataset": ctx.task.dataset, "steps": [list(s) for s in ctx.task.steps]},
            "data": ctx.data_digest,
            "settings": asdict(self.settings),
            "pipeline": {"crop_size": data.crop_size, "scale": [data.scale_min, data.scale_max],
                         "batch_size": data.batch_size, "drop_last": train.drop_last, "seed": train.seed,
                         "world_size": ctx.world_size},
        }

    # -- the thresholds of a step -------------------------------------------------------------
    def prepare(self, ctx: StepContext) -> Tensor:
        """Thresholds ``(K_{t−1},)`` of the step: from the state, the cache, or one pass over the data."""
        if ctx.step < 1 or ctx.old_model is None:
            raise RuntimeError(f"pseudo-label thresholds need a step > 0 and the old model (step {ctx.step})")
        fields = self.key_fields(ctx)
        key = digest(fields) if fields is not None else None
        if key is not None and key == self.key and self.thresholds is not None:
            self.thresholds = self.thresholds.to(ctx.device)
            log.info("step %d: pseudo-label thresholds restored from the method state (key %s)", ctx.step, key)
            return self.thresholds
        cached = ctx.cache.get(CACHE_KIND, key) if key is not None and ctx.cache is not None else None
        if cached is not None:
            if cached.get("key") != key or cached["thresholds"].shape != (ctx.num_old,):
                raise RuntimeError(f"threshold cache entry {key} holds key {cached.get('key')!r} and shape "
                                   f"{tuple(cached['thresholds'].shape)}; expected ({ctx.num_old},)")
            thresholds = cached["thresholds"]
            log.info("step %d: pseudo-label thresholds taken from the cache (key %s)", ctx.step, key)
        else:
            if key is None:
                log.warning("step %d: the step has no old-checkpoint/data digest, so the pseudo-label thresholds "
                            "are computed but not cached", ctx.step)
            thresholds, histogram = self._compute(ctx)
            if key is not None and ctx.cache is not None:
                written = ctx.cache.put(CACHE_KIND, key, {"key": key, "fields": fields, "thresholds": thresholds.cpu(),
                                                          "histogram": histogram})
                if written is not None:
                    log.info("step %d: pseudo-label thresholds cached to %s", ctx.step, written)
        self.thresholds, self.key = thresholds.float().to(ctx.device), key
        ctx.log_scalar("thresholds/mean", float(self.thresholds.mean()))
        return self.thresholds

    def _compute(self, ctx: StepContext) -> Tuple[Tensor, Tensor]:
        label_table = raw_label_table() if self.settings.pixels == "true_background" else None
        self.data_passes += 1
        with ctx.isolated_rng():
            batches = ctx.train_loader(label_table=label_table) if label_table is not None else ctx.train_loader()
            return accumulate_thresholds(ctx.old_model, batches, ctx.num_outputs, self.settings, ctx.autocast,
                                         ctx.device, ctx.all_reduce_sum_)

    # -- per iteration -------------------------------------------------------------------------
    def pseudo_labels(self, labels: Tensor, old_logits: Tensor, num_outputs: int,
                      keep_old_labels: bool = False) -> Tuple[Tensor, Tensor]:
        """Entropy pseudo-labels → ``(ỹ (B, H, W) int64, ν (B, 1, 1) float32)``.

        Pixels with a label ``< K_{t−1}`` (0 after the step's table) take the old model's arg-max
        class where its uncertainty is below that class's threshold, else 255; current-class labels
        are kept. ``ν`` is PLOP's adaptive factor (accepted / background pixels per image).
        ``keep_old_labels``: old-class ground truth (only memory images carry any) is kept instead of
        being overwritten by pseudo-labels as the reference does (§3.12).
        """
        if self.thresholds is None:
            raise RuntimeError("pseudo_labels called before prepare(): no thresholds for this step")
        uncertainty = pixel_uncertainty(old_logits, num_outputs, self.settings.mode)
        return entropy_pseudo_labels(labels, old_logits, self.thresholds, uncertainty, old_logits.shape[1],
                                     keep_old_labels=keep_old_labels)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self.thresholds is None:
            return {}
        return {"thresholds": self.thresholds.detach().cpu(), "key": self.key}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        unknown = set(state) - {"thresholds", "key"}
        if unknown:
            raise ValueError(f"pseudo-label threshold state has unknown entries {sorted(unknown)}")
        self.thresholds = state.get("thresholds")
        self.key = state.get("key")


class PseudoLabelMethod(Method):
    """Shared frame of PLOP and SATS: plain CE at step 0; at steps > 0 the CE on entropy
    pseudo-labels ``ỹ`` (times PLOP's adaptive factor ν when ``params.adaptive_factor``) plus the
    method's own :meth:`distillation_terms`. Thresholds are prepared in ``begin_step`` and kept in
    the method state under ``state_key``. Params must derive from :class:`ThresholdParams` and
    define ``adaptive_factor``.
    """

    uses_old_model = True
    head_init = "background"
    state_key: ClassVar[str] = "pseudo_labels"

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.pseudo = EntropyThresholds(self.params.threshold_settings())

    def begin_step(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            self.pseudo.prepare(ctx)

    def loss(self, batch: Batch, out: Any, old_out: Optional[Any], ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        if ctx.step == 0:
            return self.ce_terms(batch, out)
        old_logits = require_old_logits(old_out, self.name)
        labels, adaptive = self.pseudo.pseudo_labels(batch.labels, old_logits, ctx.num_outputs,
                                                     keep_old_labels=not ctx.cfg.memory.reference_labels)
        ce = cross_entropy(out.logits, labels, pixel_weight=adaptive if p.adaptive_factor else None,
                           reduction=p.reduction)
        return {"ce": ce, **self.distillation_terms(out, old_out, labels, ctx)}

    def distillation_terms(self, out: Any, old_out: Any, pseudo_labels: Tensor, ctx: StepContext) -> Dict[str, Tensor]:
        """The method's terms beside the CE at steps > 0 (``pseudo_labels``: ``ỹ (B, H, W)``)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        state = self.pseudo.state_dict()
        return {self.state_key: state} if state else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        unknown = set(state) - {self.state_key}
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown state entries {sorted(unknown)}")
        self.pseudo.load_state_dict(state.get(self.state_key, {}))
