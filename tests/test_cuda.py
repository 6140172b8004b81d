"""The CUDA paths: the same code as on the CPU, checked where a GPU is present (skipped elsewhere).

* loss blocks (the analytic-gradient UNCE / UNKD, POD, the SATS attention loss, pseudo-labels):
  values and gradients on CUDA equal the CPU's;
* the segmenter: CUDA's fused attention kernels vs the explicit softmax path that returns the
  attention maps, and CUDA vs CPU logits;
* the on-device confusion matrix equals the CPU one;
* every method runs a tiny two-step experiment on CUDA (fp32), the AMP modes (bf16, fp16 with
  its GradScaler) run SATS / PLOP / MiB, and a CUDA checkpoint resumes on the CPU;
* ``torchrun`` with the NCCL backend (one process per visible GPU, at most 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, tiny_overrides

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32 in matrix products / convolutions, so CUDA and CPU float32 agree to ~1e-5."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _value_and_grads(fn, *tensors: torch.Tensor, device: torch.device):
    """fn(*tensors on device) -> (value, grads of the floating inputs), all on the CPU."""
    moved = [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in tensors]
    value = fn(*moved)
    grads = torch.autograd.grad(value, [t for t in moved if t.requires_grad], allow_unused=True)
    return value.detach().cpu(), [None if g is None else g.cpu() for g in grads]


def _assert_same_on_cuda(fn, *tensors: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    cpu_value, cpu_grads = _value_and_grads(fn, *tensors, device=torch.device("cpu"))
    gpu_value, gpu_grads = _value_and_grads(fn, *tensors, device=CUDA)
    assert torch.isfinite(cpu_value).all()
    torch.testing.assert_close(gpu_value, cpu_value, rtol=rtol, atol=atol)
    assert [g is None for g in gpu_grads] == [g is None for g in cpu_grads]
    for g_gpu, g_cpu in zip(gpu_grads, cpu_grads):
        if g_cpu is not None:
            torch.testing.assert_close(g_gpu, g_cpu, rtol=rtol, atol=atol)


def _labels(b: int, h: int, w: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b, h, w), generator=gen)
    y[:, :2] = 255
    return y


# ---------------------------------------------------------------------------------------- loss blocks
def test_loss_blocks_match_cpu():
    from sats.losses import (cross_entropy, entropy_pseudo_labels, kd_old_channels, local_pod_loss,
                             normalized_entropy, unbiased_cross_entropy, unbiased_kd)

    gen = torch.Generator().manual_seed(0)
    new, old = torch.randn(2, 7, 16, 12, generator=gen), torch.randn(2, 5, 16, 12, generator=gen)
    y = _labels(2, 16, 12, 7)
    _assert_same_on_cuda(lambda z: cross_entropy(z, y.to(z.device)), new)
    _assert_same_on_cuda(lambda z: unbiased_cross_entropy(z, y.to(z.device), num_old=5), new)
    _assert_same_on_cuda(lambda z, q: unbiased_kd(z, q), new, old)
    _assert_same_on_cuda(lambda z, q: kd_old_channels(z, q), new, old)
    maps_old = [torch.randn(2, c, s, s, generator=gen) for c, s in ((8, 16), (16, 8), (7, 16))]
    maps_new = [m + 0.1 * torch.randn(m.shape, generator=gen) for m in maps_old]
    _assert_same_on_cuda(lambda *m: local_pod_loss(m[:3], m[3:], 0.01, num_classes_seen=7, num_new=2),
                         *maps_old, *maps_new)
    # pseudo-labels: integer outputs, identical
    thresholds = torch.full((5,), 0.5)
    cpu = entropy_pseudo_labels(y, old, thresholds, normalized_entropy(old), num_old=5)
    gpu = entropy_pseudo_labels(y.to(CUDA), old.to(CUDA), thresholds.to(CUDA), normalized_entropy(old.to(CUDA)),
                                num_old=5)
    assert torch.equal(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])


def test_sats_attention_loss_matches_cpu():
    from sats.losses.attention import sats_attention_loss

    gen = torch.Generator().manual_seed(1)
    # two stages: (B, heads, N, M) attention with N = 8x8 and 4x4 queries, keys reduced
    old = [torch.softmax(torch.randn(2, 1, 64, 16, generator=gen), -1),
           torch.softmax(torch.randn(2, 2, 16, 16, generator=gen), -1)]
    new = [torch.softmax(a.log() + 0.3 * torch.randn(a.shape, generator=gen), -1) for a in old]
    y = _labels(2, 32, 32, 6, seed=2)
    for pooling in ("class", "global"):
        _assert_same_on_cuda(
            lambda *a: sats_attention_loss(a[2:], a[:2], y.to(a[0].device), pooling=pooling, num_channels=6,
                                           grid_sizes=[(8, 8), (4, 4)]),
            *old, *new)


# ------------------------------------------------------------------------------------------ the model
def _tiny_model(attention_heads=(1, 2, 2, 4)):
    from sats.models.config import ModelConfig
    from sats.models.segmenter import build_segmenter

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mit_custom", embed_dims=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                      num_heads=list(attention_heads), sr_ratios=[4, 2, 1, 1], decoder_dim=32, drop_path=0.0,
                      head="simple")
    return build_segmenter(cfg, [16, 5]).eval()


def test_segmenter_cuda_matches_cpu_and_attention_paths_agree():
    model = _tiny_model()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cpu = model(x, need={"attentions"})
        gpu_model = model.to(CUDA)
        fused = gpu_model(x.to(CUDA))  # fused SDPA kernels
        explicit = gpu_model(x.to(CUDA), need={"attentions"})
    torch.testing.assert_close(fused.logits, explicit.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(explicit.logits.cpu(), cpu.logits, rtol=1e-4, atol=1e-4)
    for a_gpu, a_cpu in zip(explicit.attentions, cpu.attentions):
        torch.testing.assert_close(a_gpu.cpu(), a_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_segmenter_autocast_backward_is_finite(dtype):
    model = _tiny_model().train().to(CUDA)
    x = torch.randn(2, 3, 64, 64, device=CUDA)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x, need={"attentions", "stages", "decoder"})
        loss = out.logits.float().logsumexp(1).mean() + sum(a.float().mean() for a in out.attentions)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------ evaluation
def test_confusion_matrix_on_cuda_equals_cpu():
    from sats.engine.evaluator import ConfusionMatrix

    gen = torch.Generator().manual_seed(4)
    pred = torch.randint(0, 6, (3, 20, 20), generator=gen)
    target = _labels(3, 20, 20, 6, seed=5)
    on_cpu, on_gpu = ConfusionMatrix(6, "cpu"), ConfusionMatrix(6, CUDA)
    for _ in range(2):
        on_cpu.update(pred, target)
        on_gpu.update(pred.to(CUDA), target.to(CUDA))
    a, b = on_cpu.compute(), on_gpu.compute()
    assert a.miou == pytest.approx(b.miou) and list(a.class_iou) == pytest.approx(list(b.class_iou), nan_ok=True)


# ------------------------------------------------------------------------------------------ end to end
def _run(tiny_run, method: str, name: str, **extra):
    from sats.engine.runner import Runner

    config = f"demo/{method}.yaml" if (CONFIGS / f"demo/{method}.yaml").exists() else "demo/ft.yaml"
    cfg = tiny_run(method=method, config=config, run_name=name, **{"device": "cuda", **extra})
    rows = Runner(cfg).run()
    return cfg, rows


def _registered_methods() -> list[str]:
    from sats.methods.base import list_methods

    return sorted(list_methods())


@pytest.mark.parametrize("method", _registered_methods())
def test_every_method_runs_on_cuda(tiny_run, method):
    cfg, rows = _run(tiny_run, method, f"cuda-{method}")
    assert rows and all(0.0 <= r["miou"] <= 1.0 for r in rows)
    ckpt = Path(cfg.run_dir) / f"checkpoints/step{rows[-1]['step']}.ckpt"
    from sats.engine.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt, map_location="cpu")  # a CUDA checkpoint opens on a machine without one
    tensors = [v for v in state["model"].values() if isinstance(v, torch.Tensor)]
    assert tensors and all(v.device.type == "cpu" for v in tensors)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["sats", "plop", "mib"])
def test_amp_runs(tiny_run, method, amp):
    _, rows = _run(tiny_run, method, f"amp-{method}-{amp}", **{"train.amp": amp})
    assert [r["step"] for r in rows] == [0, 1] and all(0.0 <= r["miou"] <= 1.0 for r in rows)


def test_cuda_run_resumes_on_cpu(tiny_run):
    """Step 0 on CUDA, step 1 resumed from its checkpoint on the CPU."""
    from sats.engine.runner import Runner

    cfg = tiny_run(method="sats", config="demo/sats.yaml", run_name="resume", **{"device": "cuda"})
    assert [r["step"] for r in Runner(cfg).run(steps=[0])] == [0]
    cpu_cfg = tiny_run(method="sats", config="demo/sats.yaml", run_name="resume", **{"device": "cpu"})
    rows = Runner(cpu_cfg).run()
    assert [r["step"] for r in rows] == [0, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_nccl(tiny_synthetic, tmp_path):
    nproc = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "nccl"
    overrides = tiny_overrides(tiny_synthetic, run_dir, tmp_path / "cache", **{"data.batch_size": 2,
                                                                                "device": "cuda"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "sats.cli", "train",
           str(CONFIGS / "demo/sats.yaml"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["step"] for r in results["steps"]] == [0, 1]
    assert all(0.0 <= r["miou"] <= 1.0 for r in results["steps"])
