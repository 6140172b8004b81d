"""SSUL: unknown channel, sigmoid BCE, frozen network after step 0 (docs/methods.md §2.5, §3.11).

**Channels.** The model has one extra output, the *unknown* channel, right after the background:
model channels ``[bg, unknown, C^0\\{0}, C^1, …]`` (``extra_channels = 1`` enlarges head 0). Labels
reach the method in task channels; :func:`shift_labels` moves foreground labels ``k ≥ 1`` to
``k + 1`` for the loss and :meth:`SSUL.predict` maps predictions back (unknown → background,
``k ≥ 2 → k − 1``), so evaluation sees task channels. (The released reference lost this shift,
§6 item 5; we apply it.)

**Loss.** Multi-label sigmoid BCE over every model channel against the one-hot target (§3.3
reduction: sum over pixels / all pixels). At steps ``t > 0`` the pixels labelled 0 (background,
old and future classes) are relabelled, in this order:

1. where the old model is confident, ``max_c σ(z̄_c) > old_threshold`` (0.5), and its arg-max is an
   old class (model channel ≥ 2): that channel;
2. else, where the saliency is ``≥ saliency_threshold`` (0.5): unknown (model channel 1);
3. else: background.

This is SSUL's own rule (the default). ``reference_unknown_rule=True`` gives the SATS reference's
rule 2 instead (docs/methods.md §3.11, correction): unknown only where **no** channel is confident,
``max_c σ(z̄_c) ≤ old_threshold`` over every channel (background and unknown included), and the
pixel is salient. Where the old model is confident that a salient pixel is background or unknown,
the reference leaves it background; SSUL's rule makes it unknown. At step 0 (no old model) the two
rules agree.

Ground-truth labels (the new classes; on exemplar-memory images also the old classes) are kept.
Unknown labels exist only at ``t > 0`` as in the reference; ``unknown_at_step0`` applies rule 2 at
step 0 too (SSUL's own protocol, §3.11 [verify]); that step 0 is then never shared.

**Freezing at t > 0.** Only the background and unknown channels (rows 0–1 of head 0) and the new
head are trained. Encoder, decoder and the older heads get ``requires_grad = False`` and are not
in the optimiser (weight decay cannot move them). Rows ≥ 2 of head 0 share a tensor with rows 0–1,
so their gradients are zeroed after ``backward`` and their values are copied back from the frozen
old model after every optimiser step: they stay bit-identical. The model stays in train mode, as
in the reference: BN running statistics (DeepLab) keep updating, stochastic depth stays on
(§6 item 22; SegFormer has no BN). ``freeze_bn=True`` puts every BatchNorm layer in eval mode
before each forward at steps > 0 (running statistics used and kept), like SSUL's own
``--bn_freeze`` [verify].

**Init.** New heads copy the unknown channel's weights (``head_init = "unknown"``); biases keep
PyTorch's default init (the reference does not copy them, §6 item 22).

**Saliency.** From ``batch.saliency`` (``data.saliency_root``, :class:`sats.data.saliency.FolderSaliency`)
or, with ``saliency_model = "package.module:factory"``, from a :class:`sats.data.saliency.SaliencyModel`
run on the batch images. Step 0 (BCE + unknown channel) is keyed ``"bce-unknown"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from sats.losses.ce import IGNORE_INDEX, multilabel_bce
from sats.methods.base import Batch, CEParams, Method, StepContext, register_method, require_old_logits

UNKNOWN = 1  # model channel of the unknown class
FIRST_CLASS = 2  # model channel of the first foreground class


def shift_labels(labels: Tensor) -> Tensor:
    """Task channels → model channels: foreground ``k ≥ 1`` → ``k + 1``; 0 and 255 unchanged. ``(B, H, W)``."""
    return torch.where((labels >= 1) & (labels != IGNORE_INDEX), labels + 1, labels)


def unshift_channels(channels: Tensor) -> Tensor:
    """Model channels → task channels: bg and unknown → 0, ``k ≥ 2`` → ``k − 1``; 255 unchanged."""
    return torch.where(channels == IGNORE_INDEX, channels,
                       torch.where(channels >= FIRST_CLASS, channels - 1, torch.zeros_like(channels)))


def ssul_labels(labels: Tensor, old_logits: Optional[Tensor], saliency: Optional[Tensor],
                old_threshold: float = 0.5, saliency_threshold: float = 0.5,
                reference_unknown_rule: bool = False) -> Tensor:
    """SSUL training targets in model channels ``(B, H, W)`` int64 (module docstring, rules 1–3).

    Args:
        labels: ``(B, H, W)`` task channels, 255 = ignore.
        old_logits: ``(B, K_{t−1} + 1, H, W)`` old-model logits in model channels, or None (step 0).
        saliency: ``(B, H, W)`` probabilities in [0, 1], or None (no unknown labels).
        reference_unknown_rule: unknown only where no old-model channel is confident (the SATS
            reference's rule, docs/methods.md §3.11) instead of wherever no old *class* is confident
            (SSUL's rule, the default).
    """
    target = shift_labels(labels)
    free = labels == 0
    if old_logits is not None:
        confidence, channel = torch.sigmoid(old_logits.detach().float()).max(dim=1)
        confident = confidence > old_threshold
        old_class = free & confident & (channel >= FIRST_CLASS)
        target = torch.where(old_class, channel, target)
        # SSUL: every pixel not taken by an old class may become unknown; the reference: only the
        # pixels on which no channel (background and unknown included) is confident
        free = free & ~(confident if reference_unknown_rule else old_class)
    if saliency is not None:
        unknown = free & (saliency >= saliency_threshold)
        target = torch.where(unknown, torch.full_like(target, UNKNOWN), target)
    return target


@dataclass
class SSULParams(CEParams):
    old_threshold: float = 0.5  # old-model sigmoid confidence for an old-class pseudo-label
    saliency_threshold: float = 0.5  # salient pixels (probability >= this) become unknown
    unknown_at_step0: bool = False  # unknown labels at step 0 too (SSUL's own protocol; the reference: t > 0 only)
    saliency_model: Optional[str] = None  # "package.module:factory" of a SaliencyModel instead of data.saliency_root
    freeze_bn: bool = False  # BN layers in eval mode at steps > 0 (SSUL's --bn_freeze); the reference: False
    reference_unknown_rule: bool = False  # unknown only where no old channel is confident (the SATS reference)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("old_threshold", "saliency_threshold"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: must lie in [0, 1], got {value}")


@register_method
class SSUL(Method):
    """BCE on ``[bg, unknown, classes…]`` with old-model and saliency labels (term ``bce``); frozen after step 0."""

    name = "ssul"
    label = "SSUL"
    Params = SSULParams
    uses_old_model = True
    head_init = "unknown"
    step0 = "bce-unknown"
    extra_channels = 1

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.needs_saliency = self.params.saliency_model is None
        self._saliency_model: Any = None
        self._bn_hook: Any = None

    def step0_key(self) -> Optional[str]:
        # with unknown labels at step 0 the saliency source shapes step 0: never share it
        return None if self.params.unknown_at_step0 else super().step0_key()

    def _unknown_at(self, step: int) -> bool:
        return step > 0 or self.params.unknown_at_step0

    def needs_saliency_at(self, step: int) -> bool:
        return self.needs_saliency and self._unknown_at(step)

    def begin_step(self, ctx: StepContext) -> None:
        if self._bn_hook is not None:
            self._bn_hook.remove()
            self._bn_hook = None
        if self.params.freeze_bn and ctx.step > 0:
            norms = [m for m in ctx.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            def norms_to_eval(module: torch.nn.Module, inputs: Any) -> None:
                for norm in norms:
                    norm.eval()

            self._bn_hook = ctx.model.register_forward_pre_hook(norms_to_eval)
        if self.params.saliency_model is not None and self._unknown_at(ctx.step) and self._saliency_model is None:
            from sats.data.saliency import load_saliency_model

            model = load_saliency_model(self.params.saliency_model)
            if isinstance(model, torch.nn.Module):
                model = model.to(ctx.device).eval().requires_grad_(False)
            self._saliency_model = model

    def _saliency(self, batch: Batch) -> Tensor:
        if self._saliency_model is not None:
            from sats.data.saliency import model_saliency

            return model_saliency(self._saliency_model, batch.images)
        if batch.saliency is None:
            raise RuntimeError("ssul: the batch carries no saliency maps (set data.saliency_root or "
                               "method.saliency_model)")
        return batch.saliency

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        old_logits = require_old_logits(old_out, self.name) if ctx.step > 0 else None
        saliency = self._saliency(batch) if self._unknown_at(ctx.step) else None
        target = ssul_labels(batch.labels, old_logits, saliency, p.old_threshold, p.saliency_threshold,
                             reference_unknown_rule=p.reference_unknown_rule)
        return {"bce": multilabel_bce(out.logits, target, reduction=p.reduction)}

    def predict(self, logits: Tensor) -> Tensor:
        """``(B, K_t + 1, H, W)`` model logits → ``(B, H, W)`` task channels (unknown → background)."""
        return unshift_channels(logits.max(dim=1).indices)  # = argmax(1), faster on CPU

    # -- freezing ----------------------------------------------------------------------------------
    def trainable_parameters(self, model: torch.nn.Module, step: int) -> List[torch.nn.Parameter]:
        """All parameters at step 0; then head 0 (bg + unknown rows effectively) and the new head only.

        Side effect at ``step > 0``: every other parameter gets ``requires_grad = False``.
        """
        if step == 0:
            return super().trainable_parameters(model, step)
        heads = model.classifier.heads
        trainable = [heads[0].weight, heads[0].bias, *heads[-1].parameters()]
        model.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        return trainable

    def after_backward(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            head = ctx.model.classifier.heads[0]
            for parameter in (head.weight, head.bias):
                if parameter.grad is not None:
                    parameter.grad[FIRST_CLASS:] = 0

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step > 0:
            if ctx.old_model is None:
                raise RuntimeError("ssul: the frozen old model is needed to keep the old classes fixed")
            head, old_head = ctx.model.classifier.heads[0], ctx.old_model.classifier.heads[0]
            with torch.no_grad():
                head.weight[FIRST_CLASS:] = old_head.weight[FIRST_CLASS:]
                head.bias[FIRST_CLASS:] = old_head.bias[FIRST_CLASS:]
