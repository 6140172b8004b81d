"""SSUL (docs/methods.md §2.5, §3.11): label shift, old-model/saliency labels, prediction, freezing, saliency sources."""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS
from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.data.datasets import DataError, build_files
from sats.data.saliency import FolderSaliency, load_saliency_model, write_saliency_from_masks
from sats.data.tasks import Task
from sats.data.transforms import train_transform
from sats.engine.checkpoint import load_checkpoint
from sats.engine.runner import Runner
from sats.methods import build_method, validate_method_config
from sats.methods.base import Batch, StepContext
from sats.methods.ssul import shift_labels, ssul_labels, unshift_channels
from sats.models.segmenter import ModelOutput

IGN = 255
TASK = Task(dataset="custom", name="2-1", steps=((0, 1, 2), (3,)), num_classes=4)  # K_0 = 3, step 1 adds class 3


def ssul(**params):
    return build_method(validate_method_config({"name": "ssul", **params}))


def ctx_for(step: int, **fields) -> StepContext:
    values = dict(step=step, task=TASK, cfg=load_experiment(CONFIGS / "demo/ft.yaml"), model=None, old_model=None,
                  device=torch.device("cpu"), run_dir=None, old_checkpoint_digest=None,
                  train_loader=lambda **_: iter(()), autocast=contextlib.nullcontext, log_scalar=lambda n, v: None)
    values.update(fields)
    return StepContext(**values)


def test_label_shift_and_unshift_round_trip():
    y = torch.tensor([[[0, 1, 2, 15, 20, IGN]]])
    shifted = shift_labels(y)
    assert shifted.tolist() == [[[0, 2, 3, 16, 21, IGN]]]
    assert torch.equal(unshift_channels(shifted), y)
    # predictions: unknown (1) and background (0) are both background in task channels
    assert unshift_channels(torch.tensor([0, 1, 2, 3, 21])).tolist() == [0, 0, 1, 2, 20]


def test_labels_from_old_model_and_saliency_on_a_hand_built_case():
    # model channels of the old model: [bg, unknown, class 1, class 2]; task: class 3 is new (model channel 4)
    old = torch.tensor([
        [-5, -5, 2, -5],     # 0: old class 1 confident (σ 0.88)               → 2, although salient
        [-5, -5, -5, -0.4],  # 1: old class 2 not confident (σ 0.40), salient   → unknown
        [3, -5, -5, -5],     # 2: background confident, saliency exactly 0.5    → unknown
        [-5, 3, -5, -5],     # 3: arg-max unknown (not an old class), not salient → background
        [-5, -5, 3, -5],     # 4: ground truth of the new class 3 is kept       → 4
        [-5, -5, 3, -5],     # 5: ignore stays ignore, even where salient
        [-5, -5, -5, 3],     # 6: old-class ground truth (a memory image) kept  → 2, not the old model's 3
        [-5, -5, -5, 0.0],   # 7: σ = 0.5 is not > 0.5; saliency 0.49 < 0.5     → background
    ], dtype=torch.float32).t().reshape(1, 4, 1, 8)
    labels = torch.tensor([0, 0, 0, 0, 3, IGN, 1, 0]).view(1, 1, 8)
    saliency = torch.tensor([1.0, 0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 0.49]).view(1, 1, 8)
    target = ssul_labels(labels, old, saliency)
    assert target.view(-1).tolist() == [2, 1, 1, 0, 4, IGN, 2, 0]
    # step 0 (no old model): saliency alone; without saliency only the shift
    assert ssul_labels(labels, None, saliency).view(-1).tolist() == [1, 1, 1, 0, 4, IGN, 2, 0]
    assert ssul_labels(labels, None, None).view(-1).tolist() == [0, 0, 0, 0, 4, IGN, 2, 0]


def test_reference_unknown_rule_needs_every_channel_unconfident():
    # 1×1×2×2, every pixel salient and labelled 0; old channels [bg, unknown, class 1, class 2]
    old = torch.tensor([
        [3, -5, -5, -5],    # (0, 0): background confident (σ 0.95)
        [-5, 3, -5, -5],    # (0, 1): unknown confident
        [-5, -5, -5, -1],   # (1, 0): nothing confident (max σ 0.27)
        [-5, -5, -5, 3],    # (1, 1): old class 2 confident → model channel 3 under both rules
    ], dtype=torch.float32).t().reshape(1, 4, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    saliency = torch.full((1, 2, 2), 0.9)
    # SSUL's rule (default): unknown wherever no old class is confident
    assert ssul_labels(labels, old, saliency).tolist() == [[[1, 1], [1, 3]]]
    # the reference: a salient pixel the old model confidently calls background / unknown stays background
    assert ssul_labels(labels, old, saliency, reference_unknown_rule=True).tolist() == [[[0, 0], [1, 3]]]
    # through the method: the switch reaches the BCE target
    z = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0]).view(1, 5, 1, 1)
    batch = Batch(torch.zeros(1, 3, 1, 1), torch.tensor([[[0]]]), saliency=torch.tensor([[[0.9]]]))
    old_bg = ModelOutput(logits=torch.tensor([3.0, -5.0, -5.0, -5.0]).view(1, 4, 1, 1))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for params, one_hot in (({}, [0.0, 1, 0, 0, 0]), ({"reference_unknown_rule": True}, [1.0, 0, 0, 0, 0])):
        terms = ssul(**params).loss(batch, ModelOutput(logits=z), old_bg, ctx_for(1))
        assert torch.allclose(terms["bce"], bce(z.view(5), torch.tensor(one_hot), reduction="sum"))


def test_loss_is_bce_on_the_shifted_targets_and_predict_maps_back():
    method = ssul()
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0]], dtype=torch.float32).view(1, 5, 1, 1)  # K_1 + 1 = 5 channels
    old = torch.tensor([[-5.0, -5.0, -5.0, -5.0]]).view(1, 4, 1, 1)  # nothing confident
    batch = Batch(torch.zeros(1, 3, 1, 1), torch.tensor([[[0]]]), saliency=torch.tensor([[[0.8]]]))
    terms = method.loss(batch, ModelOutput(logits=z), ModelOutput(logits=old), ctx_for(1))
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # salient, unlabelled → unknown
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z.view(5), one_hot, reduction="sum")
    assert torch.allclose(terms["bce"], expected)
    # step 0: no unknown labels by default, the saliency is not even needed
    terms0 = method.loss(Batch(batch.images, batch.labels), ModelOutput(logits=z[:, :4]), None, ctx_for(0))
    assert torch.allclose(terms0["bce"], torch.nn.functional.binary_cross_entropy_with_logits(
        z.view(5)[:4], torch.tensor([1.0, 0, 0, 0]), reduction="sum"))
    assert method.predict(torch.tensor([[0.0, 3.0, 1.0]]).view(1, 3, 1, 1)).item() == 0  # unknown → bg
    assert method.predict(torch.tensor([[0.0, 1.0, 3.0]]).view(1, 3, 1, 1)).item() == 1


def test_channel_layout_step0_key_and_saliency_needs():
    method = ssul()
    assert method.model_head_sizes(TASK, 0) == [4] and method.model_head_sizes(TASK, 1) == [4, 1]
    assert method.step0_key() == "bce-unknown:all_pixels"
    assert build_method(validate_method_config({"name": "mib"})).step0_key() != method.step0_key()
    assert not method.needs_saliency_at(0) and method.needs_saliency_at(1)
    at_step0 = ssul(unknown_at_step0=True)
    assert at_step0.step0_key() is None and at_step0.needs_saliency_at(0)


def test_saliency_model_interface(monkeypatch):
    module = types.ModuleType("fake_saliency")
    module.factory = lambda: (lambda images: torch.sigmoid(images[:, :1] * 100))  # salient where channel 0 > 0
    monkeypatch.setitem(sys.modules, "fake_saliency", module)
    method = ssul(saliency_model="fake_saliency:factory")
    assert not method.needs_saliency_at(1)  # no saliency maps needed from the data
    method.begin_step(ctx_for(1))
    images = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    batch = Batch(images, torch.tensor([[[0, 0]]]))
    old = torch.full((1, 4, 1, 2), -5.0)
    z = torch.zeros(1, 5, 1, 2, requires_grad=True)
    method.loss(batch, ModelOutput(logits=z), ModelOutput(logits=old), ctx_for(1))["bce"].backward()
    # d BCE / dz = σ(z) − target: target unknown (channel 1) only at the salient pixel 0
    assert torch.allclose(z.grad[0, 1, 0] * 2, torch.tensor([-0.5, 0.5]))
    with pytest.raises(ValueError, match="package.module:factory"):
        load_saliency_model("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_saliency_model("no_such_module_xyz:factory")


def test_folder_saliency_missing_file_and_mask_derived_maps(tmp_path, tiny_synthetic):
    files = build_files("voc", tiny_synthetic, "train")
    out = write_saliency_from_masks(files, tmp_path / "sal", positions=[0, 1])
    mask = files.read_mask(0)
    saliency = FolderSaliency(out).read(files.ids[0], shape=mask.shape)
    assert np.array_equal(saliency == 255, (mask != 0) & (mask != IGN)) and set(np.unique(saliency)) <= {0, 255}
    with pytest.raises(DataError, match=f"{files.ids[2]}.png: missing saliency map"):
        FolderSaliency(out).read(files.ids[2])
    with pytest.raises(DataError, match=r"38 saliency map\(s\) missing"):
        FolderSaliency(out).check(files.ids)
    with pytest.raises(DataError, match="differs from its image"):
        FolderSaliency(out).read(files.ids[0], shape=(3, 3))
    with pytest.raises(DataError, match="saliency folder not found"):
        FolderSaliency(tmp_path / "nowhere")


def test_saliency_goes_through_the_same_crop_flip_and_resize_as_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, size=(37, 53)).astype(np.uint8)
    image = Image.fromarray(rng.integers(0, 255, size=(37, 53, 3)).astype(np.uint8))
    transform = train_transform(16, rng=torch.Generator().manual_seed(3))
    for _ in range(5):  # both flip outcomes occur
        _, y, aux = transform(image, mask, mask * 12)
        assert aux.dtype == torch.float32 and torch.equal((aux * 255 / 12).round().long(), y)


def test_runner_refuses_ssul_without_saliency(tiny_run):
    with pytest.raises(ConfigError, match="data.saliency_root"):
        Runner(tiny_run("ssul", config="demo/ssul.yaml", **{"data.saliency_root": "null"}))


def test_two_step_ssul_run_keeps_frozen_parameters_bit_identical(tiny_run):
    cfg = tiny_run("ssul", config="demo/ssul.yaml", **{"train.epochs": 1})
    rows = Runner(cfg).run()
    assert len(rows[0]["iou"]) == 16 and len(rows[1]["iou"]) == 21  # evaluated in task channels (predict)
    ckpt = cfg.resolved_run_dir() / "checkpoints"
    before, after = load_checkpoint(ckpt / "step0.ckpt"), load_checkpoint(ckpt / "step1.ckpt")
    assert before["head_sizes"] == [17] and after["head_sizes"] == [17, 5]
    w0, w1 = before["model"], after["model"]
    frozen = [k for k in w0 if not k.startswith("classifier.")]
    assert frozen and all(torch.equal(w0[k], w1[k]) for k in frozen)  # encoder and decoder
    for key in ("classifier.heads.0.weight", "classifier.heads.0.bias"):
        assert torch.equal(w0[key][2:], w1[key][2:])  # old classes (AdamW weight decay did not move them)
        assert not torch.equal(w0[key][:2], w1[key][:2])  # background and unknown were trained
    # the new head started as a copy of the unknown channel and was trained from there
    assert not torch.equal(w1["classifier.heads.1.weight"][0], w0["classifier.heads.0.weight"][1])
    # the saliency maps of the synthetic data were derived from its masks, under data.root
    assert (Path(cfg.data.root) / "saliency_map" / "saliency.json").is_file()


def test_ssul_step0_is_not_shared_with_plain_ce_but_with_ssul_m(tiny_run):
    ft = Runner(tiny_run("ft", run_name="ft", **{"train.epochs": 1})).run(steps=[0])
    first = Runner(tiny_run("ssul", config="demo/ssul.yaml", run_name="ssul", **{"train.epochs": 1})).run(steps=[0])
    runner = Runner(tiny_run("ssul", config="demo/ssul.yaml", run_name="ssul-m", **{"train.epochs": 1,
                                                                                    "memory.enabled": True}))
    again = runner.run()
    assert ft[0]["shared_step0"] is None and first[0]["shared_step0"] is None
    assert again[0]["shared_step0"] is not None and again[0]["iou"] == first[0]["iou"]
    # with memory a batch holds 4 / 2 current images: one epoch = step-1 images // 2 iterations
    assert again[1]["iterations"] == runner.data.splits[1].train.size // 2


def test_freeze_bn_keeps_batchnorm_statistics_at_later_steps():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = model[1].running_mean.clone()
    method = ssul(freeze_bn=True)
    method.begin_step(ctx_for(1, model=model))
    model.train()
    model(torch.randn(2, 3, 4, 4) + 3.0)
    assert not model[1].training and torch.equal(model[1].running_mean, before)
    method.begin_step(ctx_for(0, model=model))  # step 0 (and freeze_bn=False): statistics update
    model.train()
    model(torch.randn(2, 3, 4, 4) + 3.0)
    assert model[1].training and not torch.equal(model[1].running_mean, before)
