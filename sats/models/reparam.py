"""RCIL's representation-compensation (RC) modules: twin conv(+norm) branches, their mix, their merge
(docs/methods.md §2.7).

An `RCConv` holds two branches, ``A`` (merged and frozen from step 1 on) and ``B`` (always trained), each a
conv optionally followed by its own norm. Their outputs are mixed per channel after the norms, before any
activation (the block around the module applies it): in training each channel takes ``A``, ``B`` or
``(A + B) / 2`` with probabilities 0.33 / 0.33 / 0.34, one draw per forward call (global CPU RNG), shared by
every image and pixel; in eval the output is ``(A + B) / 2``.

`merge_rc_branches` folds that eval output into branch A (conv with bias; its norm is skipped from then on,
so it needs no eval-mode trick), `freeze_merged_branches` takes the merged tensors out of training.
Branch A's conv always has a bias and every module a ``merged`` buffer, so one state-dict key set serves
every step; `twin_plain_state` maps a plain (non-RC) encoder checkpoint onto both branches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

#: r < MIX_A: branch A; MIX_A ≤ r < MIX_B: branch B; r ≥ MIX_B: the average (r ~ U(0, 1) per channel)
MIX_A, MIX_B = 0.33, 0.66
BRANCH_INITS = ("keep", "merged")


def branch_a_weights(r: Tensor) -> Tensor:
    """``r (C,)`` uniforms → ``(C,)`` weight of branch A: 1 (``r < 0.33``), 0 (``0.33 ≤ r < 0.66``), 0.5
    otherwise; branch B gets ``1 − w``."""
    return torch.where(r < MIX_A, 1.0, torch.where(r < MIX_B, 0.0, 0.5))


def mix_branches(a: Tensor, b: Tensor, r: Tensor | None = None) -> Tensor:
    """``a, b (B, C, …)`` → per-channel mix by ``r (C,)`` (`branch_a_weights`), or ``(a + b) / 2`` when ``r``
    is None. Exact: a chosen channel is bit-identical to its branch."""
    if r is None:
        return (a + b) * 0.5
    w = branch_a_weights(r).to(device=a.device, dtype=a.dtype).view(1, -1, *([1] * (a.ndim - 2)))
    return a * w + b * (1.0 - w)


class RCConv(nn.Module):
    """RC module: twin conv(+norm) branches mixed per channel (module docstring).

    Args:
        conv: factory of the branch conv (called twice, so the branches start independent).
        norm: factory of the norm that follows each conv (BatchNorm), or None.
        plain_norm: name, beside this module, of the norm the plain (non-RC) model has (``"bn2"``): what
            `twin_plain_state` copies into ``norm_a`` / ``norm_b``; None when there is none to load.

    State: ``conv_a`` (always with a bias: zero and ``requires_grad = False`` while a norm follows it and
    nothing is merged), ``norm_a``, ``conv_b``, ``norm_b``, ``merged`` (bool buffer).
    Forward: ``x (B, C_in, H, W)`` → ``(B, C_out, h, w)``.
    """

    def __init__(self, conv: Callable[[], nn.Conv2d], norm: Callable[[], nn.Module] | None = None,
                 plain_norm: str | None = None) -> None:
        super().__init__()
        self.conv_a = conv()
        self.norm_a = norm() if norm is not None else None
        self.conv_b = conv()
        self.norm_b = norm() if norm is not None else None
        self.plain_norm = plain_norm
        self.plain_bias = self.conv_a.bias is not None
        if not self.plain_bias:
            self.conv_a.bias = nn.Parameter(torch.zeros(self.conv_a.out_channels), requires_grad=False)
        self.register_buffer("merged", torch.zeros((), dtype=torch.bool))
        self._merged = False  # Python mirror of the buffer: no device sync in forward

    @property
    def is_merged(self) -> bool:
        """Whether branch A holds a merge (conv with bias, norm skipped)."""
        return self._merged

    def branch_a(self, x: Tensor) -> Tensor:
        """Branch A alone (its norm skipped once merged)."""
        out = self.conv_a(x)
        return out if self.norm_a is None or self._merged else self.norm_a(out)

    def branch_b(self, x: Tensor) -> Tensor:
        """Branch B alone."""
        out = self.conv_b(x)
        return out if self.norm_b is None else self.norm_b(out)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.branch_a(x), self.branch_b(x)
        return mix_branches(a, b, torch.rand(a.shape[1]) if self.training else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._merged = bool(self.merged)

    def merged_parameters(self) -> list[nn.Parameter]:
        """Branch-A tensors (conv weight and bias, norm affine)."""
        return [*self.conv_a.parameters(), *(self.norm_a.parameters() if self.norm_a is not None else ())]

    @torch.no_grad()
    def merge(self, trainable_branch_init: str = "keep") -> None:
        """Fold the eval output ``(A + B) / 2`` into branch A, in place (docs/methods.md §2.7); ``"merged"``
        also gives branch B that function (``"keep"`` leaves it as it is)."""
        if trainable_branch_init not in BRANCH_INITS:
            raise ValueError(f"trainable_branch_init must be one of {list(BRANCH_INITS)}, got {trainable_branch_init!r}")
        weight_a, bias_a = _half_affine(self.conv_a, None if self._merged else self.norm_a)
        weight_b, bias_b = _half_affine(self.conv_b, self.norm_b)
        weight, bias = weight_a + weight_b, bias_a + bias_b
        self.conv_a.weight.copy_(weight)
        self.conv_a.bias.copy_(bias)
        if self.norm_a is not None:
            _set_identity(self.norm_a)
        self.merged.fill_(True)
        self._merged = True
        if trainable_branch_init == "merged":
            self.conv_b.weight.copy_(weight)
            if self.conv_b.bias is not None:
                self.conv_b.bias.copy_(bias)
                if self.norm_b is not None:
                    _set_identity(self.norm_b)
            elif self.norm_b is not None:
                _set_identity(self.norm_b, bias)
            else:
                raise ValueError("RCConv: branch B has neither a bias nor a norm to carry the merged bias")

    def extra_repr(self) -> str:
        return f"merged={self._merged}"


def _half_affine(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[Tensor, Tensor]:
    """Half of ``norm(conv(x))`` (or of ``conv(x)``) in eval as one conv: ``(weight, bias)`` in float64."""
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if norm is not None:
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("RCConv merge needs norms with running statistics")
        scale = (norm.running_var.double() + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        bias = (bias - norm.running_mean.double()) * scale
        if norm.bias is not None:
            bias = bias + norm.bias.double()
        weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
    return weight * 0.5, bias * 0.5


def _set_identity(norm: nn.Module, shift: Tensor | None = None) -> None:
    """Eval-mode BatchNorm → ``x + shift`` (γ = 1, β = shift or 0, μ = 0, σ² = 1 − ε)."""
    if norm.weight is not None:
        norm.weight.fill_(1.0)
    if norm.bias is not None and shift is not None:
        norm.bias.copy_(shift)
    elif norm.bias is not None:
        norm.bias.zero_()
    elif shift is not None:
        raise ValueError("RCConv: a norm without affine bias cannot carry the merged bias")
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)


def rc_modules(model: nn.Module) -> list[RCConv]:
    """Every `RCConv` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, RCConv)]


def has_rc_branches(model: nn.Module) -> bool:
    """Whether ``model`` has RC modules (``model.rc_branches``)."""
    return any(isinstance(m, RCConv) for m in model.modules())


def merge_rc_branches(model: nn.Module, trainable_branch_init: str = "keep") -> int:
    """Merge every RC module of ``model`` (`RCConv.merge`) in place, parameters kept (``copy_``); returns
    how many. After it, in eval, branch A alone equals the model before the merge; ``"keep"`` (the
    reference) leaves branch B as it is, so the model computes ``¼A + ¾B`` per module, ``"merged"`` gives
    branch B the merged function, so the model is unchanged in eval."""
    if trainable_branch_init not in BRANCH_INITS:
        raise ValueError(f"trainable_branch_init must be one of {list(BRANCH_INITS)}, got {trainable_branch_init!r}")
    modules = rc_modules(model)
    for module in modules:
        module.merge(trainable_branch_init)
    return len(modules)


def rc_merged_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Branch-A tensors of every merged RC module (conv weight and bias, norm affine): what is frozen."""
    return [p for m in rc_modules(model) if m.is_merged for p in m.merged_parameters()]


def freeze_merged_branches(model: nn.Module) -> int:
    """``requires_grad = False`` on `rc_merged_parameters`; returns how many tensors."""
    params = rc_merged_parameters(model)
    for parameter in params:
        parameter.requires_grad_(False)
    return len(params)


def twin_plain_state(state: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], set[str]]:
    """A plain (non-RC) state dict in ``model``'s names: each RC module's plain conv (the module's own name)
    and norm (``plain_norm``) tensors go into both branches (copies); other keys pass unchanged.

    Returns ``(state, keys of model a plain checkpoint never has)``: branch-A biases the plain conv lacks and
    the ``merged`` buffers.
    """
    out = dict(state)
    extra: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, RCConv):
            continue
        parent = name.rpartition(".")[0]
        sources = [(name, ("conv_a", "conv_b"))]
        if module.plain_norm is not None:
            sources.append((f"{parent}.{module.plain_norm}" if parent else module.plain_norm, ("norm_a", "norm_b")))
        for source, branches in sources:
            for key in [k for k in out if k.startswith(f"{source}.") and "." not in k[len(source) + 1:]]:
                value = out.pop(key)
                for branch in branches:
                    out[f"{name}.{branch}.{key[len(source) + 1:]}"] = value.clone()
        extra.add(f"{name}.merged")
        if not module.plain_bias:
            extra.add(f"{name}.conv_a.bias")
    return out, extra
