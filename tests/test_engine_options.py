"""Engine options the sigmoid-head methods declare (docs/methods.md §2.6, §3.14, §3.15), each off by default:
parameter groups, the warm-up-poly schedule, frozen normalisation, the "copy" head init, sigmoid prediction,
the torchvision DeepLab, DKD's memory (round robin, concatenated, current labels), and configs recorded
before these keys existed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sats.config import ConfigError, TrainConfig, config_to_dict, without_later_defaults
from sats.data.memory import StepMemory, load_memory, save_memory
from sats.engine.checkpoint import state_digest
from sats.engine.data import ExperimentData
from sats.engine.distributed import DistInfo
from sats.engine.optim import build_optimizer, optimizer_groups, poly_lambda
from sats.engine.rundir import RunDir, RunError, SharedStep0
from sats.experiment import load_experiment
from sats.methods import build_method
from sats.methods.base import ParamGroup, part_groups
from sats.models import ModelConfig, build_segmenter, load_encoder_state
from sats.models.classifier import IncrementalClassifier
from sats.models.segmenter import train_mode
from sats.rng import step_seed


def _dist() -> DistInfo:
    return DistInfo(0, 1, 0, torch.device("cpu"), True, None)


def _tiny(head: str = "simple", sizes=(16, 5)):
    return build_segmenter(ModelConfig(backbone="mit_custom", embed_dims=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                       num_heads=[1, 2, 2, 4], sr_ratios=[8, 4, 2, 1], head=head, decoder_dim=8),
                           list(sizes))


# -- optimiser groups ------------------------------------------------------------------------------------
def test_one_default_group_is_the_plain_optimiser():
    model = _tiny()
    method = build_method({"name": "mib"})
    plain = build_optimizer(method.trainable_parameters(model, 1), TrainConfig(), 0.01)
    grouped = build_optimizer(optimizer_groups(method, model, 1), TrainConfig(), 0.01)
    assert plain.state_dict() == grouped.state_dict()
    assert method.frozen_at(1) == frozenset()


def test_part_groups_and_multipliers():
    model = _tiny()
    groups = part_groups(model, {"decoder": 10, "new_head": 100}, {"encoder": 0.0})
    assert [g.name for g in groups] == ["encoder", "decoder", "old_heads", "new_head"]
    opt = build_optimizer(groups, TrainConfig(weight_decay=1e-4), 0.001)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (0.001, 0.0), (pytest.approx(0.01), 1e-4), (0.001, 1e-4), (pytest.approx(0.1), 1e-4)]
    assert sum(len(g.params) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="unknown model parts"):
        part_groups(model, {"backbone": 2})
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer([ParamGroup([], 2.0)], TrainConfig(), 0.1)


def test_group_learning_rates_follow_the_schedule():
    model = _tiny()
    opt = build_optimizer(part_groups(model, {"decoder": 10}), TrainConfig(), 0.001)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(10, 0.9))
    opt.step()
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])


# -- schedule --------------------------------------------------------------------------------------------
def test_warmup_keys_are_validated_and_default_to_the_plain_poly():
    assert TrainConfig().warmup_fraction == 0.0
    with pytest.raises(ConfigError, match="two warm-ups"):
        TrainConfig(warmup_iters=5, warmup_fraction=0.2)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.0)
    old = poly_lambda(100, 0.9, 10)
    assert [old(i) for i in (0, 9, 10, 50)] == [0.1, 1.0, 0.9 ** 0.9, 0.5 ** 0.9]


# -- frozen normalisation and dropout -----------------------------------------------------------------------
def test_train_mode_freezes_what_is_asked():
    model = _tiny(head="segformer")
    train_mode(model, {"norm"})
    assert not model.head.fuse_bn.training and model.head.dropout.training
    train_mode(model, {"dropout"})
    assert model.head.fuse_bn.training and not model.head.dropout.training
    assert all(not m.training for m in model.modules() if type(m).__name__ == "DropPath")
    train_mode(model)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="unknown frozen kinds"):
        train_mode(model, {"everything"})


# -- head init, classifier init ----------------------------------------------------------------------------
def test_copy_init_of_any_channel_and_kaiming_heads():
    classifier = IncrementalClassifier(4, [3, 2])
    classifier.add_step(2, init="copy", source=4)  # channel 4 = row 1 of head 1
    new = classifier.heads[2]
    assert torch.equal(new.weight[0], classifier.heads[1].weight[1]) and torch.equal(new.bias,
                                                                                      classifier.heads[1].bias[1].expand(2))
    with pytest.raises(ValueError, match="source channel 9"):
        classifier.add_step(1, init="copy", source=9)
    torch.manual_seed(0)
    kaiming = IncrementalClassifier(256, [21], weight_init="kaiming_normal")
    assert kaiming.heads[0].weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.1)
    default = IncrementalClassifier(256, [21])
    assert default.heads[0].weight.std().item() < 0.05


def test_sigmoid_prediction_and_confidence_are_declared():
    logits = torch.tensor([[9.0, -1.0, 2.0], [9.0, -2.0, -1.0]]).t().reshape(1, 3, 1, 2)
    assert build_method({"name": "star"}).predict(logits).tolist() == [[[2, 0]]]
    assert build_method({"name": "ft"}).predict(logits).tolist() == [[[0, 0]]]
    scores, channels = build_method({"name": "dkd"}).confidence(logits)
    assert channels.tolist() == [[[2, 2]]] and scores[0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)))


# -- the torchvision DeepLab ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stride, first4, rest4, first3", [(16, 1, 2, 1), (8, 2, 4, 1)])
def test_torchvision_resnet_dilation_and_momentum(stride, first4, rest4, first3):
    cfg = ModelConfig(backbone="resnet50", head="aspp_tv", norm="bn", activation="relu", output_stride=stride,
                      dilation_mode="torchvision", encoder_bn_momentum=0.01, decoder_dim=16)
    model = build_segmenter(cfg, [16])
    layer4 = model.encoder.layer4
    assert (layer4[0].conv2.dilation[0], layer4[1].conv2.dilation[0]) == (first4, rest4)
    assert model.encoder.layer3[0].conv2.dilation[0] == first3
    assert {m.momentum for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    assert {m.momentum for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    stage = build_segmenter(ModelConfig(backbone="resnet50", head="aspp", output_stride=stride, decoder_dim=16), [16])
    assert stage.encoder.layer4[0].conv2.dilation[0] == rest4  # the In-Place-ABN flavour: every block dilated
    model.train()
    out = model(torch.randn(2, 3, 64, 64), need={"decoder"})
    assert out.decoder.shape == (2, 16, 64 // stride, 64 // stride) and (out.decoder >= 0).all()


def test_torchvision_weights_load_into_the_torchvision_flavour():
    cfg = ModelConfig(backbone="resnet50", head="aspp_tv", activation="relu", dilation_mode="torchvision")
    encoder = build_segmenter(cfg, [2]).encoder
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    report = load_encoder_state(encoder, state, "auto")
    assert report.format == "torchvision" and not report.missing and not report.unexpected
    assert report.dropped == ["fc.bias", "fc.weight"]
    assert torch.equal(encoder.conv1.weight, state["conv1.weight"])


def test_state_digest_of_zero_dim_tensors():
    assert state_digest({"n": torch.tensor(3)}) != state_digest({"n": torch.tensor(4)})


# -- configs recorded before the new keys ------------------------------------------------------------------
def test_a_config_recorded_without_the_new_keys_still_matches(tmp_path, tiny_run):
    cfg = tiny_run("ft")
    recorded = config_to_dict(cfg)
    for section, key in (("train", "warmup_fraction"), ("train", "warmup_factor"), ("model", "dilation_mode"),
                         ("model", "classifier_init"), ("memory", "selection"), ("memory", "pseudo_threshold")):
        recorded[section].pop(key)
    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    from omegaconf import OmegaConf

    (rundir.path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recorded)))
    (rundir.path / "results.json").write_text("{}")  # the run has trained: its config must not change
    rundir.record_config(cfg)  # no RunError
    key = SharedStep0.for_run(cfg, "ce:all_pixels", "data", 1).dir.name
    assert without_later_defaults(config_to_dict(cfg))["train"].get("warmup_fraction") is None
    changed = tiny_run("ft", **{"train.warmup_iters": 0, "train.warmup_fraction": 0.1})
    assert SharedStep0.for_run(changed, "ce:all_pixels", "data", 1).dir.name != key
    with pytest.raises(RunError, match="warmup_fraction"):
        rundir.record_config(changed)


# -- DKD's memory -------------------------------------------------------------------------------------------
def test_memory_keys_are_validated():
    with pytest.raises(ConfigError, match="memory.pseudo_threshold"):
        load_experiment(None, ["memory.pseudo_threshold=0.9"])
    with pytest.raises(ConfigError, match="memory.per_class"):
        load_experiment(None, ["memory.selection=round_robin", "memory.per_class=7"])
    with pytest.raises(ConfigError, match="memory.batching"):
        load_experiment(None, ["memory.batching=mixed"])


def test_round_robin_memory_is_stored_with_its_classes(tiny_run, tmp_path):
    extra = {"memory.enabled": True, "memory.selection": "round_robin", "memory.size": 12, "data.task": "15-1"}
    cfg = tiny_run("dkd", config="demo/dkd.yaml", **extra)
    data = ExperimentData.build(cfg, _dist())
    memory = data.step_memory(1, tmp_path, write=True)
    assert memory.per_class == 0 and len(memory) == sum(map(len, memory.lists.values())) <= 12
    sizes = sorted(len(v) for v in memory.lists.values() if v)
    assert sizes[-1] - sizes[0] <= 1  # one image per class and turn
    for c, positions in memory.lists.items():
        assert all(c in memory.classes_of[p] for p in positions)
    again = load_memory(tmp_path / "memory/step1.json", data.train_files, data.task, 1, 0)
    assert again.lists == memory.lists and again.classes_of == memory.classes_of

    calls = []

    def confidence(images):  # the step-1 model, as a stub: class 1 everywhere, σ = 0.95
        calls.append(len(images))
        return torch.full(images.shape[:1] + images.shape[2:], 0.95), torch.ones(images.shape[:1] + images.shape[2:],
                                                                                 dtype=torch.long)

    cfg2 = tiny_run("dkd", config="demo/dkd.yaml", run_name="pseudo", **{**extra, "memory.pseudo_threshold": 0.9})
    data2 = ExperimentData.build(cfg2, _dist())
    second = data2.step_memory(2, tmp_path / "p", write=True, confidence=confidence)
    assert calls, "the step-1 model pseudo-labels step 1's images"
    step1 = set(data2.splits[1].train.tolist())
    assert any(1 in second.classes_of[p] for p in second.classes_of if p in step1)


def test_concatenated_memory_with_current_labels(tiny_run, tmp_path):
    extra = {"memory.enabled": True, "memory.selection": "round_robin", "memory.batching": "concat",
             "memory.labels": "current", "memory.size": 8}
    cfg = tiny_run("dkd", config="demo/dkd.yaml", **extra)
    data = ExperimentData.build(cfg, _dist())
    memory = data.step_memory(1, tmp_path, write=True)
    loader = data.train_loader(1, False, cfg.train, _dist(), step_seed(42, 1), memory=memory)
    loader.set_epoch_seed(step_seed(42, 1, 0))
    total = data.splits[1].train.size + len(memory)
    assert len(loader) == total // cfg.data.batch_size and loader.num_current == data.splits[1].train.size
    flags = []
    for batch in loader:
        flags += batch.is_memory.tolist()
        assert not ((batch.labels >= 1) & (batch.labels <= 15)).any()  # memory images too: old classes → 0
    assert 0 < sum(flags) <= len(memory) and len(flags) == len(loader) * cfg.data.batch_size


def test_dkd_m_and_star_m_runs(tiny_run):
    from sats.engine.runner import Runner

    cfg = tiny_run("dkd", config="demo/dkd-m.yaml", **{"data.task": "15-1", "train.epochs": 1})
    assert (cfg.memory.size, cfg.memory.batching) == (100, "concat")
    rows = Runner(cfg).run()
    assert len(rows) == 6
    stored = [json.loads((cfg.resolved_run_dir() / f"memory/step{t}.json").read_text()) for t in (1, 2)]
    assert set(stored[1]["classes"]) == {str(c) for c in range(1, 17)} and "image_classes" in stored[1]
    plain = Runner(tiny_run("dkd", config="demo/dkd.yaml", run_name="plain", **{"train.epochs": 1})).run()
    star = tiny_run("star", config="demo/star-m.yaml", run_name="star", **{"train.epochs": 1})
    star_rows = Runner(star).run()
    assert star.memory.size == 50 and star_rows[1]["iterations"] > plain[1]["iterations"]  # memory joins the list


def test_stored_memory_without_image_classes_loads(tiny_synthetic, tmp_path):
    from sats.data.datasets import build_files
    from sats.data.tasks import get_task

    files = build_files("voc", tiny_synthetic, "train")
    task = get_task("voc", "15-5")
    memory = StepMemory(step=1, per_class=2, lists={c: [c] for c in range(1, 16)})
    save_memory(memory, files, tmp_path / "m.json")
    assert "image_classes" not in json.loads((tmp_path / "m.json").read_text())
    assert load_memory(tmp_path / "m.json", files, task, 1, 2).classes_of is None
    assert np.array_equal(memory.positions, np.arange(1, 16))


def test_gpu_feeding_options_and_persistent_workers_keep_each_epochs_crops(tiny_run):
    """On CUDA the training loader pins memory, prefetches and keeps its workers across epochs; a kept worker
    still crops each item with its epoch's seed (the seed travels with the index), as a fresh one does."""
    from torch.utils.data import DataLoader

    from sats.engine.data import CUDA_PREFETCH, feeding

    assert feeding(torch.device("cpu"), 2, persistent=True) == {"pin_memory": False}
    assert feeding(torch.device("cuda"), 2, persistent=True) == {"pin_memory": True, "prefetch_factor": CUDA_PREFETCH,
                                                                 "persistent_workers": True}
    assert feeding(torch.device("cuda"), 0, persistent=True) == {"pin_memory": True}
    cfg = tiny_run()
    data = ExperimentData.build(cfg, _dist())
    fresh = data.train_loader(1, False, cfg.train, _dist(), step_seed(42, 1))
    kept = DataLoader(fresh.current.dataset, batch_size=4, sampler=fresh.current.sampler, num_workers=1,
                      drop_last=True, persistent_workers=True)
    for epoch in range(2):
        fresh.set_epoch_seed(step_seed(42, 1, epoch))  # the sampler and dataset of both loaders
        expected = [b.images for b in fresh]
        got = [images for images, _ in kept]
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
