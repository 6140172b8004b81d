"""Incremental classifier: one 1×1 conv (with bias) per step, outputs concatenated (docs/methods.md §2.3)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_INITS = ("default", "background", "background_weight", "unknown", "copy")
WEIGHT_INITS = ("default", "kaiming_normal")


class IncrementalClassifier(nn.Module):
    """``heads[t]`` maps the ``D``-channel decoder feature to the ``|C^t|`` logits of step ``t``.

    Output channel order is the concatenation of the heads in step order.
    Parameter names: ``heads.{t}.weight (|C^t|, D, 1, 1)``, ``heads.{t}.bias (|C^t|,)``.
    ``weight_init``: ``"default"`` (PyTorch's conv init) or ``"kaiming_normal"`` (weights of every head,
    new ones included, Kaiming-normal with fan in; biases PyTorch's; the DKD/STAR code).
    """

    def __init__(self, in_channels: int, head_sizes: list[int], weight_init: str = "default") -> None:
        super().__init__()
        if not head_sizes or any(int(size) <= 0 for size in head_sizes):
            raise ValueError(f"head_sizes must be a non-empty list of positive ints, got {head_sizes!r}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"classifier weight init must be one of {list(WEIGHT_INITS)}, got {weight_init!r}")
        self.in_channels = in_channels
        self.weight_init = weight_init
        self.heads = nn.ModuleList(self._new_head(int(size)) for size in head_sizes)

    def _new_head(self, size: int) -> nn.Conv2d:
        head = nn.Conv2d(self.in_channels, size, 1)
        if self.weight_init == "kaiming_normal":
            nn.init.kaiming_normal_(head.weight)
        return head

    @property
    def head_sizes(self) -> list[int]:
        """Channels of every head, in step order."""
        return [head.out_channels for head in self.heads]

    @property
    def num_outputs(self) -> int:
        """Total output channels ``K``."""
        return sum(self.head_sizes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, h, w) -> (B, K, h, w)``: one conv with the stacked head weights."""
        weight = torch.cat([head.weight for head in self.heads], dim=0)
        bias = torch.cat([head.bias for head in self.heads], dim=0)
        return F.conv2d(x, weight, bias)

    def add_step(self, num_new: int, init: str = "default", source: int = 0) -> nn.Conv2d:
        """Append a head of ``num_new`` channels, initialised by ``init``; returns it.

        * ``"default"``: the classifier's ``weight_init``.
        * ``"background"`` (MiB): new weights copy the background weight ``w_0``
          (channel 0), new biases and the background bias become
          ``b_0 - log(num_new + 1)``, so at init the old background probability
          is split evenly over background and the new classes.
        * ``"background_weight"`` (RCIL's code): new weights copy ``w_0``; new biases keep the default
          init and ``b_0`` is unchanged.
        * ``"unknown"`` (SSUL): new weights copy channel 1 (the unknown channel);
          biases keep the default init.
        * ``"copy"`` (DKD): every new row copies the weight **and** bias of output channel ``source``
          (counted over the concatenated heads), so at init every new logit equals that channel's.
        """
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {list(HEAD_INITS)}, got {init!r}")
        if int(num_new) <= 0:
            raise ValueError(f"num_new must be positive, got {num_new!r}")
        if init == "copy" and not 0 <= source < self.num_outputs:
            raise ValueError(f"'copy' init: source channel {source} is not one of the {self.num_outputs} outputs")
        first = self.heads[0]
        head = self._new_head(int(num_new)).to(device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            if init == "copy":
                weight = torch.cat([h.weight for h in self.heads])[source:source + 1]
                bias = torch.cat([h.bias for h in self.heads])[source]
                head.weight.copy_(weight.expand_as(head.weight))
                head.bias.fill_(bias)
            elif init in ("background", "background_weight"):
                head.weight.copy_(first.weight[0:1].expand_as(head.weight))
                if init == "background":
                    bias = first.bias[0] - math.log(num_new + 1)
                    head.bias.fill_(bias)
                    first.bias[0] = bias
            elif init == "unknown":
                if first.out_channels < 2:
                    raise ValueError(
                        f"'unknown' init copies channel 1 of head 0, which has only {first.out_channels} channel(s)"
                    )
                head.weight.copy_(first.weight[1:2].expand_as(head.weight))
        head.requires_grad_(first.weight.requires_grad)
        self.heads.append(head)
        return head
