"""EWC / RW / PI importance trackers (docs/methods.md §3.5–3.7) on hand-computed toy problems."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sats.engine.distributed import all_reduce_sum_
from sats.losses.importance import minmax_normalize, quadratic_penalty
from sats.methods._importance_trackers import (
    EWCImportance,
    ImportanceTracker,
    PathIntegralImportance,
    RWImportance,
    build_importance_tracker,
)


def _params(**values: list[float]) -> dict[str, nn.Parameter]:
    return {name: nn.Parameter(torch.tensor(v, dtype=torch.float64)) for name, v in values.items()}


def _set(params: dict[str, nn.Parameter], **values_and_grads: tuple[list[float], list[float]]) -> None:
    """Set parameter values and gradients by hand."""
    for name, (value, grad) in values_and_grads.items():
        params[name].data = torch.tensor(value, dtype=torch.float64)
        params[name].grad = torch.tensor(grad, dtype=torch.float64)


def _close(actual: torch.Tensor, expected: list, rel: float = 1e-9) -> None:
    expected_t = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected_t.shape
    assert actual.flatten().tolist() == pytest.approx(expected_t.flatten().tolist(), rel=rel, abs=1e-12)


# --------------------------------------------------------------------------- basics


def test_minmax_normalize() -> None:
    _close(minmax_normalize(torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)), [0.0, 0.5, 1.0], rel=1e-7)
    assert minmax_normalize(torch.full((3,), 5.0)).tolist() == [0.0, 0.0, 0.0]
    _close(minmax_normalize(torch.tensor([[-1.0, 1.0]], dtype=torch.float64)), [[0.0, 1.0]], rel=1e-7)


def test_quadratic_penalty_skips_new_and_frozen_parameters() -> None:
    params = _params(a=[1.0, 2.0], head=[5.0], frozen=[3.0])
    params["frozen"].requires_grad_(False)
    old = {"a": torch.tensor([0.0, 0.0], dtype=torch.float64), "frozen": torch.tensor([0.0], dtype=torch.float64)}
    importance = {"a": torch.tensor([2.0, 0.5], dtype=torch.float64), "frozen": torch.tensor([1.0])}
    penalty = quadratic_penalty(params.items(), old, importance)
    assert penalty.item() == pytest.approx(2 * 1 + 0.5 * 4)
    penalty.backward()
    _close(params["a"].grad, [2 * 2 * 1.0, 2 * 0.5 * 2.0])  # 2·imp·(θ − θ_old)
    assert params["head"].grad is None
    with pytest.raises(KeyError, match="'a'"):
        quadratic_penalty(params.items(), old, {})


# --------------------------------------------------------------------------- EWC


def test_ewc_fisher_update_and_penalty_hand_computed() -> None:
    params = _params(a=[1.0, 2.0, 4.0], b=[[3.0]])
    ewc = EWCImportance(alpha=0.9)
    ewc.begin_step(params.items())  # step 0: no old model, F = 1
    assert not ewc.penalty_active
    assert ewc.fisher["a"].tolist() == [1.0, 1.0, 1.0] and ewc.fisher["a"].dtype == torch.float64
    fisher_a = ewc.fisher["a"]

    _set(params, a=([1.0, 2.0, 4.0], [1.0, -2.0, 0.0]), b=([[3.0]], [[0.5]]))
    ewc.update(params.items())
    _close(ewc.fisher["a"], [1.0, 3.7, 0.1])  # 0.9 g² + 0.1 · 1
    _close(ewc.fisher["b"], [[0.325]])
    _set(params, a=([1.0, 2.0, 4.0], [0.0, 1.0, 2.0]), b=([[3.0]], [[1.0]]))
    ewc.update(params.items())
    _close(ewc.fisher["a"], [0.1, 1.27, 3.61])
    _close(ewc.fisher["b"], [[0.9325]])
    assert ewc.fisher["a"] is fisher_a  # updated in place
    assert ewc.penalty(params.items()).item() == 0.0
    ewc.end_step(params.items())
    state = ewc.state_dict()

    # step 1: old model = step-0 weights, one new head "c"
    old = {name: p.detach().clone() for name, p in params.items()}
    params1 = _params(a=[5.0, 5.0, 5.0], b=[[1.0]], c=[7.0])
    ewc1 = EWCImportance(alpha=0.9)
    ewc1.load_state_dict(state)
    ewc1.begin_step(params1.items(), old)
    assert ewc1.penalty_active
    _close(ewc1.penalty_importance["a"], [0.0, 1 / 3, 1.0], rel=1e-7)  # (F − 0.1) / 3.51
    _close(ewc1.penalty_importance["b"], [[0.0]])  # a single value normalises to 0
    assert "c" not in ewc1.penalty_importance
    _close(ewc1.fisher["a"], [0.1, 1.27, 3.61])  # F carries over
    assert ewc1.fisher["c"].tolist() == [1.0]  # new parameter starts at ones
    penalty = ewc1.penalty(params1.items())
    assert penalty.item() == pytest.approx(0 * 16 + (1 / 3) * 9 + 1 * 1, rel=1e-7)
    penalty.backward()
    _close(params1["a"].grad, [0.0, 2.0, 2.0], rel=1e-7)  # 2 · imp · (θ − θ_old)
    assert params1["c"].grad is None  # new head is free


def test_add_penalty_grad_matches_autograd() -> None:
    params = _params(a=[1.0, 2.0, 4.0], head=[1.0])
    ewc = EWCImportance()
    ewc.begin_step(params.items())
    _run_iterations(ewc, params, seed=3, n=3)
    ewc.end_step(params.items())
    old = {"a": params["a"].detach() - torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    ewc.begin_step(params.items(), old)
    for p in params.values():
        p.grad = None
    (3.0 * ewc.penalty(params.items())).backward()
    expected = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    assert expected.keys() == {"a"} and expected["a"].abs().sum() > 0
    for p in params.values():
        p.grad = torch.ones_like(p)
    value = ewc.add_penalty_grad_(params.items(), weight=3.0)
    assert value.item() == pytest.approx(ewc.penalty(params.items()).item(), rel=1e-12)
    torch.testing.assert_close(params["a"].grad, expected["a"] + 1.0)
    assert params["head"].grad.tolist() == [1.0]  # new head: untouched


def test_ewc_without_previous_importance_warns_and_does_not_penalise() -> None:
    params = _params(a=[1.0, 2.0])
    ewc = EWCImportance()
    with pytest.warns(UserWarning, match="penalty is off"):
        ewc.begin_step(params.items(), {"a": torch.zeros(2, dtype=torch.float64)})
    assert ewc.penalty(params.items()).item() == 0.0


def test_phase_errors() -> None:
    params = _params(a=[1.0])
    tracker = EWCImportance()
    with pytest.raises(RuntimeError, match="begin_step"):
        tracker.update(params.items())
    tracker.begin_step(params.items())
    with pytest.raises(RuntimeError, match="resume_step"):
        tracker.begin_step(params.items())
    with pytest.raises(ValueError, match="'pi'"):
        tracker.load_state_dict(PathIntegralImportance().state_dict())


# --------------------------------------------------------------------------- RW


def test_rw_score_hand_computed_with_end_of_step_clamp_and_average() -> None:
    params = _params(w=[1.0, 1.0])
    rw = RWImportance(alpha=0.9, score_interval=2)
    rw.begin_step(params.items())
    _set(params, w=([1.0, 1.0], [1.0, 1.0]))
    rw.update(params.items())  # count 0: snapshot [1, 1] only; F = 1
    _set(params, w=([2.0, 0.0], [2.0, 2.0]))
    rw.update(params.items())  # count 1: no score; F = 0.9·4 + 0.1 = 3.7
    assert rw.score["w"].tolist() == [0.0, 0.0]
    _set(params, w=([3.0, 3.0], [1.0, -1.0]))
    rw.update(params.items())  # count 2: Δθ = [2, 2], s += −g·Δθ / (½·3.7·4 + 1e-8)
    den = 0.5 * 3.7 * 4 + 1e-8
    _close(rw.score["w"], [-2.0 / den, 2.0 / den])
    _close(rw.snapshot["w"], [3.0, 3.0])
    _close(rw.fisher["w"], [1.27, 1.27])
    rw.end_step(params.items())
    _close(rw.score["w"], [0.0, 2.0 / den])  # clamped at 0, no previous score
    state = rw.state_dict()

    params1 = _params(w=[4.0, 5.0], head=[0.0])
    rw1 = RWImportance(alpha=0.9, score_interval=2)
    rw1.load_state_dict(state)
    rw1.begin_step(params1.items(), {"w": torch.tensor([3.0, 3.0], dtype=torch.float64)})
    _close(rw1.penalty_importance["w"], [0.0, 1.0], rel=1e-7)  # minmax(F = const) + minmax(s)
    assert rw1.penalty(params1.items()).item() == pytest.approx(0 * 1 + 1 * 4, rel=1e-7)
    assert rw1.score["w"].tolist() == [0.0, 0.0]  # a fresh running score
    _set(params1, w=([4.0, 5.0], [0.0, 0.0]), head=([0.0], [0.0]))
    rw1.update(params1.items())  # snapshot; F = 0.127
    rw1.update(params1.items())  # F = 0.0127
    _set(params1, w=([5.0, 5.0], [-1.0, 0.0]), head=([0.0], [0.0]))
    rw1.update(params1.items())  # Δθ = [1, 0]
    new_score = 1.0 / (0.5 * 0.0127 + 1e-8)
    _close(rw1.score["w"], [new_score, 0.0])
    rw1.end_step(params1.items())
    _close(rw1.score["w"], [0.5 * (new_score + 0.0), 0.5 * (0.0 + 2.0 / den)])
    assert rw1.score["head"].tolist() == [0.0]  # no previous score: only clamped


def test_rw_score_updates_every_tenth_iteration() -> None:
    params = _params(w=[1.0, -1.0])
    rw = RWImportance()  # score_interval = 10
    rw.begin_step(params.items())
    changed_at = []
    for it in range(25):
        value = params["w"].detach() * 0.9 + 0.01
        _set(params, w=(value.tolist(), [0.5 + it, -0.3]))
        before = rw.score["w"].clone()
        rw.update(params.items())
        if not torch.equal(before, rw.score["w"]):
            changed_at.append(it)
    assert changed_at == [10, 20]


# --------------------------------------------------------------------------- PI


def _quadratic_grad(w: torch.Tensor) -> list[float]:
    """Gradient of L(w) = w₁² + 3 w₂²."""
    return [2 * w[0].item(), 6 * w[1].item()]


def test_path_integral_on_quadratic_toy_problem() -> None:
    # L = w₁² + 3 w₂², SGD lr 0.1 from (1, 1); update() after each backward, before the step:
    # δ += −g_k · (θ_k − θ_{k−1})
    params = _params(w=[1.0, 1.0])
    pi = PathIntegralImportance()
    pi.begin_step(params.items())
    lr = 0.1
    for _ in range(3):
        w = params["w"].detach().clone()
        _set(params, w=(w.tolist(), _quadratic_grad(w)))
        pi.update(params.items())
        params["w"].data -= lr * params["w"].grad
    # θ: (1, 1) → (0.8, 0.4) → (0.64, 0.16) → (0.512, 0.064)
    # δ = −g₁·(θ₁−θ₀) − g₂·(θ₂−θ₁) = (1.6·0.2 + 1.28·0.16, 2.4·0.6 + 0.96·0.24)
    delta = [0.32 + 0.2048, 1.44 + 0.2304]
    _close(pi.delta["w"], delta)
    _close(params["w"].detach(), [0.512, 0.064])
    pi.end_step(params.items())
    omega0 = [delta[0] / ((0.512 - 1) ** 2 + 1e-20), delta[1] / ((0.064 - 1) ** 2 + 1e-20)]
    _close(pi.omega["w"], omega0)  # ≈ (2.2037, 1.9066)
    state = pi.state_dict()

    # step 1: old model = (0.512, 0.064); a new head starts at 1 with loss head²
    old = {"w": params["w"].detach().clone()}
    params1 = _params(w=[0.512, 0.064], head=[1.0])
    pi1 = PathIntegralImportance()
    pi1.load_state_dict(state)
    pi1.begin_step(params1.items(), old)
    _close(pi1.penalty_importance["w"], [1.0, 0.0], rel=1e-7)  # minmax(ω₀)
    for _ in range(2):
        w, head = params1["w"].detach().clone(), params1["head"].detach().clone()
        _set(params1, w=(w.tolist(), _quadratic_grad(w)), head=(head.tolist(), [2 * head.item()]))
        pi1.update(params1.items())
        params1["w"].data -= lr * params1["w"].grad
        params1["head"].data -= lr * params1["head"].grad
    # θ: (0.512, 0.064) → (0.4096, 0.0256) → (0.32768, 0.01024); head: 1 → 0.8 → 0.64
    assert pi1.penalty(params1.items()).item() == pytest.approx(1.0 * (0.32768 - 0.512) ** 2, rel=1e-6)
    delta1 = [0.8192 * 0.1024, 0.1536 * 0.0384]
    _close(pi1.delta["w"], delta1)
    _close(pi1.delta["head"], [1.6 * 0.2])
    pi1.end_step(params1.items())
    omega1 = [
        delta1[0] / (0.32768 - 0.512) ** 2 + omega0[0],
        delta1[1] / (0.01024 - 0.064) ** 2 + omega0[1],
    ]
    _close(pi1.omega["w"], omega1)
    _close(pi1.omega["head"], [0.32 / (0.64 - 1.0) ** 2])  # θ_start of a new head = value at begin_step


def test_path_integral_clamps_negative_omega() -> None:
    params = _params(w=[0.0, 0.0])
    pi = PathIntegralImportance()
    pi.begin_step(params.items())
    _set(params, w=([0.0, 0.0], [1.0, 1.0]))
    pi.update(params.items())
    _set(params, w=([1.0, -1.0], [1.0, 1.0]))
    pi.update(params.items())  # δ = −g·Δθ = (−1, +1)
    pi.end_step(params.items())
    _close(pi.omega["w"], [0.0, 1.0])


# --------------------------------------------------------------------------- state


def _run_iterations(tracker: ImportanceTracker, params: dict[str, nn.Parameter], seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params.values():
            p.data += 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        tracker.update(params.items())


def _all_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {f"{k}/{n}": t for k, v in state.items() if isinstance(v, dict) for n, t in v.items()}


@pytest.mark.parametrize("name", ["ewc", "rw", "pi"])
def test_state_dict_round_trip_mid_step(name: str) -> None:
    kwargs = {"score_interval": 3} if name == "rw" else {}
    params = _params(a=[1.0, 2.0, 3.0], b=[[0.5, -0.5]])
    old = {"a": torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)}
    first = build_importance_tracker(name, **kwargs)
    first.begin_step(params.items())
    _run_iterations(first, params, seed=0, n=4)
    first.end_step(params.items())
    second = build_importance_tracker(name, **kwargs)
    second.load_state_dict(first.state_dict())
    second.begin_step(params.items(), old)
    _run_iterations(second, params, seed=1, n=5)

    state = second.state_dict()
    tensors = _all_tensors(state)
    assert tensors and all(t.device.type == "cpu" for t in tensors.values())
    assert "penalty_importance/a" in tensors
    resumed = build_importance_tracker(name, **kwargs)
    resumed.load_state_dict(state)
    resumed.resume_step(params.items(), old)
    restored = _all_tensors(resumed.state_dict())
    assert restored.keys() == tensors.keys()
    for key, t in tensors.items():
        assert torch.equal(restored[key], t), key
        assert restored[key].dtype == torch.float64
    assert resumed.penalty(params.items()).item() == second.penalty(params.items()).item()

    # both continue identically, and the saved state is not aliased by the trackers
    snapshot = {k: t.clone() for k, t in tensors.items()}
    params_copy = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    _run_iterations(second, params, seed=2, n=4)
    _run_iterations(resumed, params_copy, seed=2, n=4)
    second.end_step(params.items())
    resumed.end_step(params_copy.items())
    final, final_resumed = _all_tensors(second.state_dict()), _all_tensors(resumed.state_dict())
    assert final.keys() == final_resumed.keys()
    for key in final:
        assert torch.equal(final[key], final_resumed[key]), key
    for key, t in tensors.items():
        assert torch.equal(t, snapshot[key]), key


def test_load_state_dict_moves_to_device_and_parameter_dtype() -> None:
    params = {"a": nn.Parameter(torch.ones(2, dtype=torch.float32))}
    ewc = EWCImportance()
    ewc.begin_step(params.items())
    ewc.end_step(params.items())
    state = ewc.state_dict()
    state["fisher"]["a"] = state["fisher"]["a"].double()
    loaded = EWCImportance()
    loaded.load_state_dict(state, device="cpu")
    loaded.begin_step(params.items(), {"a": torch.zeros(2)})
    assert loaded.fisher["a"].dtype == torch.float32
    assert loaded.penalty_importance["a"].dtype == torch.float32


# --------------------------------------------------------------------------- DDP


def _all_reduce_worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        params = {"a": nn.Parameter(torch.zeros(2))}
        ewc = EWCImportance()
        ewc.begin_step(params.items())
        ewc.fisher["a"].fill_(float(rank + 1))  # rank 0: 1, rank 1: 2
        ewc.all_reduce_(all_reduce_sum_, world_size)
        assert ewc.fisher["a"].tolist() == [1.5, 1.5], ewc.fisher["a"]
    finally:
        dist.destroy_process_group()


def test_all_reduce_is_a_noop_without_distributed() -> None:
    params = _params(a=[1.0])
    pi = PathIntegralImportance()
    pi.begin_step(params.items())
    pi.delta["a"].fill_(3.0)
    pi.all_reduce_(all_reduce_sum_, world_size=1)
    assert pi.delta["a"].tolist() == [3.0]


def test_all_reduce_goes_through_the_given_sum_and_world_size() -> None:
    """Trackers reach DDP only through what the step context passes (ctx.all_reduce_sum_, ctx.world_size)."""
    params = _params(a=[1.0, 3.0])
    rw = RWImportance()
    rw.begin_step(params.items())
    rw.fisher["a"].fill_(2.0)
    reduced = []

    def two_equal_ranks(t: torch.Tensor) -> torch.Tensor:
        reduced.append(t)
        return t.mul_(2)

    rw.all_reduce_(two_equal_ranks, world_size=2)
    assert rw.fisher["a"].tolist() == [2.0, 2.0] and rw.score["a"].tolist() == [0.0, 0.0]
    assert len(reduced) == 2 and reduced[0] is rw.fisher["a"]  # in place, every accumulator (F and s)


@pytest.mark.slow
def test_all_reduce_averages_across_two_ranks(tmp_path) -> None:
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_penalty_value_and_gradient_share_one_pass_and_follow_parameter_updates() -> None:
    """The training path (penalty_value in the loss, add_penalty_grad_ after backward) equals the autograd
    penalty, also across optimiser steps (the shared √Î·(θ − θ_old) is recomputed when θ changes)."""
    params = _params(a=[1.0, 2.0, 4.0], b=[[0.5, -1.0], [2.0, 3.0]], head=[1.0])
    ewc = EWCImportance()
    ewc.begin_step(params.items())
    _run_iterations(ewc, params, seed=5, n=3)
    ewc.end_step(params.items())
    old = {name: params[name].detach() - 0.3 for name in ("a", "b")}
    ewc.begin_step(params.items(), old)
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, foreach=True)
    for _ in range(3):
        value = ewc.penalty_value(params.items())
        assert value.item() == pytest.approx(ewc.penalty(params.items()).item(), rel=1e-12)
        for p in params.values():
            p.grad = None
        (2.0 * ewc.penalty(params.items())).backward()
        expected = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
        for p in params.values():
            p.grad = torch.zeros_like(p)
        assert ewc.add_penalty_grad_(params.items(), weight=2.0).item() == pytest.approx(value.item(), rel=1e-12)
        for name, grad in expected.items():
            torch.testing.assert_close(params[name].grad, grad)
        assert params["head"].grad.abs().sum() == 0
        optimizer.step()  # θ changes in place: the next iteration must not reuse this one's differences
