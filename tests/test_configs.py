"""Every experiment config of configs/voc and configs/ade loads, validates and says what its name says."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS
from sats.experiment import load_experiment
from sats.data.tasks import get_task
from sats.report.paper_results import VOC_OVERLAPPED

FILES = sorted((CONFIGS / "voc").glob("*.yaml")) + sorted((CONFIGS / "ade").glob("*.yaml"))
NAME = re.compile(r"^(?P<method>[a-z0-9-]+(?:\+[a-z0-9-]+)*)_(?P<backbone>mit-b[0-5]|r50|r101)_(?P<dataset>voc|ade)-"
                  r"(?P<task>\d+-\d+)(?P<disjoint>_disjoint)?$")
BACKBONE_TOKENS = {"r50": "resnet50", "r101": "resnet101", **{f"mit-b{i}": f"mit_b{i}" for i in range(6)}}
PAPER_ONLY = {"sdr", "recall", "st_cil"}  # methods of the paper's table that sats does not implement


@functools.lru_cache(maxsize=None)
def _load(path: Path):
    return load_experiment(path)


def _generator():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert len(FILES) >= 100


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_config_validates_and_matches_its_name(path: Path):
    cfg = _load(path)
    parts = NAME.match(path.stem)
    assert parts, f"{path.name} does not follow {{method}}_{{backbone}}_{{dataset}}-{{task}}[_disjoint].yaml"
    assert cfg.name == path.stem
    token = parts["method"]
    memory = token.endswith("-m")
    assert cfg.method_name == token.removesuffix("-m").replace("-", "_")
    assert cfg.memory.enabled == memory
    assert cfg.model.backbone == BACKBONE_TOKENS[parts["backbone"]]
    assert cfg.data.dataset == parts["dataset"]
    assert cfg.data.task == parts["task"]
    assert cfg.data.overlap == (parts["disjoint"] is None)
    get_task(cfg.data.dataset, cfg.data.task)  # a task the dataset knows
    assert cfg.model.pretrained  # every paper row starts from ImageNet weights
    if cfg.method_name in ("dkd", "star"):  # their own schedules (docs/methods.md §3.14, §3.15)
        assert cfg.train.epochs == (100 if cfg.data.dataset == "ade" else 60) and cfg.train.seed == 1
        assert cfg.train.warmup_fraction == (0.2 if cfg.data.dataset == "ade" else 0.0)
    elif cfg.data.dataset == "ade":
        assert cfg.train.epochs == 60 and cfg.data.root.endswith("ADEChallengeData2016")
    elif cfg.method_name != "ssul":  # SSUL trains 50 epochs (docs/methods.md §4)
        assert cfg.train.epochs == 30


def test_every_paper_row_has_a_config():
    """Each (method, backbone, task) cell of the VOC table that sats can run has its file."""
    tokens = {"mit_b2": "mit-b2", "resnet101": "r101"}
    expected = {f"{r.method.replace('_', '-')}_{tokens[r.backbone]}_voc-{r.task}.yaml"
                for r in VOC_OVERLAPPED if r.backbone is not None and r.method not in PAPER_ONLY and r.all is not None}
    present = {p.name for p in FILES}
    assert len(expected) == 18 * 4  # 7 DeepLabV3 rows + 11 SegFormer-B2 rows, 4 tasks each
    assert sorted(expected - present) == []


def test_method_values_of_special_rows():
    """Hand-checked values: Appendix A, the ADE λ_sat = 30 tasks, PLOP's ADE DeepLab POD factors."""
    voc = CONFIGS / "voc"
    ade = CONFIGS / "ade"
    sats = _load(voc / "sats_mit-b2_voc-15-1.yaml")
    assert (sats.method["lambda_kd"], sats.method["lambda_sat"], sats.method["source"]) == (20.0, 20.0, "attention")
    assert sats.train.lr == 0.01 and sats.train.lr_incremental == 0.001 and sats.data.overlap
    assert _load(voc / "sats_r101_voc-15-5.yaml").method["source"] == "features"
    assert _load(ade / "sats_mit-b2_ade-25-25.yaml").method["lambda_sat"] == 30.0
    assert _load(ade / "sats_mit-b2_ade-50-10.yaml").method["lambda_sat"] == 30.0
    assert _load(ade / "sats_mit-b2_ade-100-10.yaml").method["lambda_sat"] == 20.0
    plop_r101 = _load(ade / "plop_r101_ade-100-10.yaml").method
    assert (plop_r101["pod_factor"], plop_r101["pod_logits_factor"]) == (0.001, 0.00001)
    plop_b2 = _load(ade / "plop_mit-b2_ade-100-10.yaml").method
    assert (plop_b2["pod_factor"], plop_b2["pod_logits_factor"]) == (0.01, 0.0005)
    assert _load(voc / "mib_mit-b2_voc-15-5.yaml").method["lambda_kd"] == 40.0
    disjoint = _load(voc / "mib_r101_voc-15-1_disjoint.yaml")
    assert not disjoint.data.overlap and disjoint.data.task == "15-1"
    assert _load(voc / "joint_r101_voc-10-1.yaml").method_name == "joint"


def test_generated_files_are_in_sync(capsys):
    """configs/generate.py --check: nothing missing, nothing edited by hand."""
    generate = _generator()
    assert generate.main(["--check"]) == 0, capsys.readouterr().out
    stems = [r.stem for r in generate.all_rows()]
    assert len(stems) == len(set(stems))


def test_dkd_and_star_rows_use_their_own_model_schedule_and_memory():
    """DKD / STAR files: the torchvision DeepLab (or MiT-B2 with the official head), the official lr, pos_weight,
    memory budgets (docs/methods.md §3.14, §3.15)."""
    voc, ade = CONFIGS / "voc", CONFIGS / "ade"
    dkd = _load(voc / "dkd_r101_voc-15-1.yaml")
    assert (dkd.model.head, dkd.model.dilation_mode, dkd.model.activation, dkd.model.encoder_bn_momentum) == (
        "aspp_tv", "torchvision", "relu", 0.01)
    assert dkd.model.pretrained_format == "torchvision" and dkd.model.classifier_init == "kaiming_normal"
    assert (dkd.train.lr, dkd.train.lr_incremental, dkd.data.batch_size) == (0.001, 0.0001, 8)
    assert (dkd.method["pos_weight"], dkd.method["pos_weight_incremental"], dkd.method["lambda_kd"]) == (2.0, 1.0, 5.0)
    assert not dkd.memory.enabled
    dkd_ade = _load(ade / "dkd-m_r101_ade-100-10.yaml")
    assert dkd_ade.method["pos_weight"] == dkd_ade.method["pos_weight_incremental"] == 35.0
    assert (dkd_ade.memory.size, dkd_ade.memory.selection, dkd_ade.memory.batching, dkd_ade.memory.labels) == (
        300, "round_robin", "concat", "current")
    assert _load(voc / "dkd-m_mit-b2_voc-15-1.yaml").memory.size == 100
    star = _load(voc / "star-m_r101_voc-10-1.yaml")
    assert (star.method["pos_weight"], star.method["lr_mult_new_head"], star.memory.size, star.data.batch_size) == (
        4.0, 100.0, 50, 24)
    star_b2 = _load(ade / "star_mit-b2_ade-50-50.yaml")
    assert (star_b2.model.head, star_b2.method["pos_weight"], star_b2.train.lr) == ("segformer", 30.0, 0.0025)
    assert not (ade / "star-m_r101_ade-100-10.yaml").exists()  # STAR-M is VOC only
    disjoint = _load(voc / "star_mit-b2_voc-19-1_disjoint.yaml")
    assert not disjoint.data.overlap and disjoint.data.task == "19-1"


def test_nest_rows_follow_the_released_scripts():
    """MiB / PLOP + NeST files (docs/methods.md §3.18): step-0 lr 0.02, λ_kd 10, PLOP's original settings with the old
    heads frozen on VOC only, the ADE pre-tuning (15 epochs at 500× the lr) and POD factors, 10 epochs per incremental
    step on VOC 10-1; SATS + NeST keeps SATS's own schedule (shared step 0)."""
    voc, ade = CONFIGS / "voc", CONFIGS / "ade"
    mib = _load(voc / "mib+nest_r101_voc-15-1.yaml")
    nest = mib.method["nest"]
    assert mib.method_name == "mib+nest" and mib.method["lambda_kd"] == 10.0
    assert (mib.train.lr, mib.train.lr_incremental, mib.train.epochs_at(1)) == (0.02, 0.001, 30)
    assert (nest["pretune_epochs"], nest["pretune_lr_scale"], nest["freeze_old_heads"]) == (5, 1.0, False)
    assert (nest["bias_init"], nest["scheduler_off_by_one"], nest["label_resize"]) == ("background", False, "nearest")
    assert _load(voc / "mib+nest_mit-b2_voc-10-1.yaml").train.epochs_at(1) == 10
    plop = _load(voc / "plop+nest_r101_voc-10-1.yaml")
    assert plop.train.epochs_at(1) == 10 and plop.train.lr == 0.02 and plop.method["nest"]["freeze_old_heads"]
    assert (plop.method["threshold_mode"], plop.method["threshold_pixels"], plop.method["adaptive_factor"]) == (
        "reference", "label0", True)
    assert (plop.method["pod_factor"], plop.method["pod_logits_factor"]) == (0.01, 0.0005)
    plop_ade = _load(ade / "plop+nest_mit-b2_ade-100-5.yaml").method
    assert (plop_ade["pod_factor"], plop_ade["pod_logits_factor"]) == (0.001, 0.00001)
    assert (plop_ade["nest"]["pretune_epochs"], plop_ade["nest"]["pretune_lr_scale"]) == (15, 500.0)
    assert not plop_ade["nest"]["freeze_old_heads"]
    mib_ade = _load(ade / "mib+nest_r101_ade-50-50.yaml")
    assert (mib_ade.method["nest"]["pretune_epochs"], mib_ade.method["nest"]["pretune_lr_scale"]) == (15, 500.0)
    assert (mib_ade.method["lambda_kd"], mib_ade.train.lr, mib_ade.train.epochs) == (10.0, 0.02, 60)
    sats = _load(voc / "sats+nest_mit-b2_voc-10-1.yaml")
    assert (sats.train.lr, sats.train.epochs_at(1), sats.method["nest"]["pretune_epochs"]) == (0.01, 30, 5)
    assert not (voc / "sats+nest_r101_voc-15-1.yaml").exists()
    from sats.report.paper_results import POST_2022_RESULTS

    published = [r for r in POST_2022_RESULTS if r.method.endswith("+nest")]
    assert len(published) == 8 and all(
        (CONFIGS / r.dataset / f"{r.method}_r101_{r.dataset}-{r.task}.yaml").is_file() for r in published)
