"""ILT: CE + output distillation + encoder-feature distillation (docs/methods.md §3.4).

``L = CE(z, y) + λ_kd · KD_old(z, z̄) + λ_de · MSE(body, body_old)`` at steps > 0, with the
reference's λ_kd = λ_de = 10 (PLOP/MiB ran ILT with 100/100). KD is LwF's (§3.2); the MSE is a
mean over every element of the encoder output ``body``:

* DeepLab: the activated ResNet stage-4 output (2048 × h × w);
* SegFormer: **the MiT stage-4 output after its LayerNorm** (512 × H/32 × W/32 for MiT-B2). The
  reference's SegFormer has no ``body`` (ILT raises KeyError there, §6 item 8); this is the mapping
  suggested in §2.4.

Step 0 is plain CE (shared). Default head init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from sats.losses.kd import feature_mse, kd_old_channels
from sats.methods.base import Batch, CEParams, Method, StepContext, check_weight, register_method, require_old_logits


@dataclass
class ILTParams(CEParams):
    lambda_kd: float = 10.0  # output distillation weight (reference; PLOP/MiB papers: 100)
    lambda_de: float = 10.0  # encoder-feature MSE weight (reference; PLOP/MiB papers: 100)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_kd", self.lambda_kd)
        check_weight("lambda_de", self.lambda_de)


@register_method
class ILT(Method):
    """``L = CE + λ_kd · KD_old + λ_de · MSE(body)`` (terms ``ce``, ``kd``, ``feature_mse``)."""

    name = "ilt"
    label = "ILT"
    Params = ILTParams
    uses_old_model = True
    needs = frozenset({"body"})
    old_needs = frozenset({"body"})

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        terms = self.ce_terms(batch, out)
        if ctx.step > 0:
            old_logits = require_old_logits(old_out, self.name)
            terms["kd"] = p.lambda_kd * kd_old_channels(out.logits, old_logits, reduction=p.reduction)
            terms["feature_mse"] = p.lambda_de * feature_mse(out.body, old_out.body)
        return terms
