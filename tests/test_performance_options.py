"""Speed and memory switches change speed and memory only: activation checkpointing, optimiser kernels,
channels-last, torch.compile (its wiring; inductor itself is timed in benchmarks/, not here)."""

from __future__ import annotations

import pytest
import torch

from sats.config import ConfigError, TrainConfig
from sats.engine.checkpoint import load_checkpoint
from sats.engine.optim import build_optimizer
from sats.engine.runner import Runner
from sats.models.config import ModelConfig
from sats.models.segmenter import build_segmenter

TINY_MIT = dict(backbone="mit_custom", embed_dims=[8, 16, 16, 32], num_heads=[1, 2, 2, 4], decoder_dim=16)


def _logits_and_grads(checkpoint: bool, need=()):
    torch.manual_seed(0)
    model = build_segmenter(ModelConfig(**TINY_MIT, drop_path=0.3, checkpoint_activations=checkpoint), [5, 2])
    model.train()
    torch.manual_seed(1)  # stochastic depth draws: the recomputation must replay them
    out = model(torch.randn(2, 3, 64, 64), need=need)
    loss = out.logits.square().mean() + (sum(a.mean() for a in out.attentions) if "attentions" in need else 0)
    loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("need", [(), ("attentions",)])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(need):
    plain_logits, plain_grads = _logits_and_grads(False, need)
    logits, grads = _logits_and_grads(True, need)
    assert torch.equal(logits, plain_logits)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_is_a_mit_option():
    with pytest.raises(ValueError, match="checkpoint_activations is a MiT option"):
        ModelConfig(backbone="resnet50", head="aspp", checkpoint_activations=True)


@pytest.mark.parametrize("impl", ["foreach", "fused", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimiser_kernels_make_the_same_update(impl, optimizer):
    def updated(kind: str) -> list:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        opt = build_optimizer(params, TrainConfig(optimizer=optimizer, optimizer_impl=kind), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            sum((p ** 2).sum() for p in params).backward()
            opt.step()
        return [p.detach().clone() for p in params]

    for mine, reference in zip(updated(impl), updated("auto")):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-7)


def test_bad_optimiser_kernel_is_a_config_error():
    with pytest.raises(ConfigError, match="train.optimizer_impl: 'fast'"):
        TrainConfig(optimizer_impl="fast")


def test_channels_last_run_saves_weights_that_load_into_a_plain_model(tiny_run):
    cfg = tiny_run(**{"train.channels_last": True, "train.share_step0": False})
    rows = Runner(cfg).run([0])
    plain = tiny_run(run_name="plain", **{"train.share_step0": False})
    reference = Runner(plain).run([0])
    assert rows[0]["epoch_losses"]["ce"] == pytest.approx(reference[0]["epoch_losses"]["ce"], rel=1e-4)
    state = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / "step0.ckpt")["model"]
    fresh = build_segmenter(cfg.model, [16])
    fresh.load_state_dict(state)  # strict: same keys and shapes whatever the memory layout


def test_compile_trains_the_compiled_model_and_saves_the_plain_one(tiny_run, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")  # the wiring, not inductor's code generation

    monkeypatch.setattr(torch, "compile", recording_compile)
    cfg = tiny_run(**{"train.compile": True, "train.share_step0": False})
    rows = Runner(cfg).run([0])
    assert len(compiled) == 1 and rows[0]["iterations"] > 0
    state = load_checkpoint(cfg.resolved_run_dir() / "checkpoints" / "step0.ckpt")["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)
    reference = Runner(tiny_run(run_name="eager", **{"train.share_step0": False})).run([0])
    assert rows[0]["epoch_losses"]["ce"] == pytest.approx(reference[0]["epoch_losses"]["ce"], rel=1e-4)
