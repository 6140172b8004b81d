"""`sats report` statistics: seeds grouped into mean ± std, hIoU, forgetting, per-class tables, leaderboard."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS, tiny_overrides
from sats.report.runs import load_runs
from sats.report.stats import (Stat, forgetting, group_seeds, hiou, leaderboard, leaderboard_html,
                               leaderboard_markdown, per_class_latex, seeds_markdown)


def _fake_run(root: Path, name: str, seed: int, rows: list[dict], method: str = "mib", lr: float = 0.01,
              task: str = "2-1") -> Path:
    """A run directory with a config.yaml and a results.json (class 0 and 1 at step 0, class 2 at step 1)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": name, "run_dir": str(run), "train": {"seed": seed, "lr": lr}, "method": {"name": method},
           "data": {"task": task}}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    steps = []
    for step, (ious, old, new, all_) in enumerate(rows):
        steps.append({"step": step, "iou": ious, "class_ids": list(range(len(ious))), "old": old, "new": new,
                      "all": all_, "miou": all_, "new_classes": [0, 1] if step == 0 else [2],
                      "groups": {"old": [0, 1], "new": [2] if step else []}})
    header = {"name": name, "method": method, "dataset": "voc", "task": task, "overlap": True, "backbone": "mit_b2",
              "num_steps": len(rows), "class_names": ["background", "cat", "dog"]}
    (run / "results.json").write_text(json.dumps({**header, "steps": steps}))
    return run


def test_seed_groups_mean_std_hiou_and_forgetting(tmp_path):
    a = _fake_run(tmp_path, "mib-s1", 1, [([0.9, 0.7], 0.8, None, 0.8), ([0.8, 0.5, 0.3], 0.65, 0.3, 0.5333)])
    b = _fake_run(tmp_path, "mib-s2", 2, [([0.9, 0.5], 0.7, None, 0.7), ([0.8, 0.3, 0.5], 0.55, 0.5, 0.5333)])
    other = _fake_run(tmp_path, "mib-lr", 1, [([0.9, 0.7], 0.8, None, 0.8), ([0.8, 0.6, 0.2], 0.7, 0.2, 0.5333)],
                      lr=0.02)
    groups = group_seeds(load_runs([a, b, other]))
    assert [len(g.runs) for g in groups] == [2, 1] and groups[0].seeds == [1, 2]  # another lr: another group
    final = groups[0].final()
    assert final["old"].mean == pytest.approx(60.0) and final["old"].std == pytest.approx(math.sqrt(50.0))
    assert final["new"].mean == pytest.approx(40.0) and final["new"].n == 2
    # hIoU per run, then averaged: 2·65·30/95 and 2·55·50/105
    assert final["hiou"].mean == pytest.approx((2 * 65 * 30 / 95 + 2 * 55 * 50 / 105) / 2)
    assert groups[0].at(0)["hiou"].mean is None  # no new group at step 0
    assert hiou(0.0, 0.0) == 0.0 and hiou(50.0, None) is None
    # forgetting: IoU when learned minus IoU at the end; class 2 (learned last) forgets nothing
    assert forgetting(load_runs([a])[0]) == pytest.approx({0: 10.0, 1: 20.0, 2: 0.0})
    assert groups[0].class_forgetting()[1].mean == pytest.approx(20.0)
    table = seeds_markdown(groups)
    assert "1,2 (n=2)" in table and "60.00 ± 7.07" in table
    assert Stat.of([1.0]).text() == "1.00" and Stat.of([]).text() == "–"


def test_leaderboard_marks_the_best_of_each_task_and_renders_as_a_page(tmp_path):
    runs = [_fake_run(tmp_path, f"{m}-{t}", 1, [([0.9, 0.7], 0.8, None, 0.8), ([0.8, 0.5, 0.3], 0.6, 0.3, all_)],
                      method=m, task=t)
            for m, t, all_ in [("mib", "2-1", 0.50), ("sats", "2-1", 0.55), ("mib", "1-2", 0.40), ("sats", "1-2", 0.30)]]
    board = leaderboard(group_seeds(load_runs(runs)))
    assert board.best("voc 2-1 (mit_b2)") == "sats" and board.best("voc 1-2 (mit_b2)") == "mib"
    md = leaderboard_markdown(board)
    assert "| sats | **55.00** | 30.00 |" in md and "| mib | 50.00 | **40.00** |" in md
    page = leaderboard_html(board)
    assert page.count('class="best"') == 2 and "<table id=\"leaderboard\">" in page
    tex = per_class_latex(group_seeds(load_runs(runs[:1])), ["background", "cat", "dog"])
    assert "\\toprule" in tex and "1 cat & 50.00 \\\\" in tex


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_leaderboard_page_in_a_headless_browser(tmp_path):
    """The page as a browser draws it: a bordered table whose best cells are green (looked at by eye too)."""
    runs = [_fake_run(tmp_path, f"{m}", 1, [([0.9, 0.7], 0.8, None, 0.8), ([0.8, 0.5, 0.3], 0.6, 0.3, all_)],
                      method=m) for m, all_ in [("mib", 0.50), ("sats", 0.55)]]
    page = tmp_path / "leaderboard.html"
    page.write_text(leaderboard_html(leaderboard(group_seeds(load_runs(runs)))))
    shot = tmp_path / "leaderboard.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=900,400", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    green = (np.abs(pixels - np.array([0xE6, 0xF4, 0xE6])).sum(axis=2) < 8).sum()
    header = (np.abs(pixels - np.array([0xEE, 0xEE, 0xFF])).sum(axis=2) < 8).sum()
    dark = (pixels.sum(axis=2) < 200).sum()  # text and borders
    assert green > 500 and header > 500 and dark > 500, (green, header, dark)


def test_sats_report_over_three_seeds_prints_mean_std_and_hiou(tiny_synthetic, tmp_path, capsys):
    from sats.cli import main

    dirs = []
    for seed in (1, 2, 3):
        run = tmp_path / f"ft-seed{seed}"
        args = ["train", str(CONFIGS / "demo/ft.yaml"),
                *tiny_overrides(tiny_synthetic, run, tmp_path / "cache", **{"train.seed": seed, "train.epochs": 1,
                                                                             "log.tensorboard": False})]
        assert main(args) == 0
        dirs.append(str(run))
    capsys.readouterr()
    assert main(["report", *dirs, "-o", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "1,2,3 (n=3)" in out and "±" in out and "hIoU" in out
    for name in ("seeds.md", "per_class.csv", "per_class.tex", "leaderboard.md", "leaderboard.html"):
        assert (tmp_path / "report" / name).is_file()


def test_sats_predict_writes_class_id_masks_overlays_and_areas(tiny_run, tmp_path, capsys):
    from sats.cli import main
    from sats.engine.runner import Runner

    cfg = tiny_run(**{"log.tensorboard": False})
    Runner(cfg).run()
    images = Path(cfg.data.root) / "JPEGImages"
    picked = sorted(images.iterdir())[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in picked[:2]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "pred"
    assert main(["predict", str(cfg.resolved_run_dir()), str(folder), str(picked[2]), "-o", str(out),
                 "--mode", "sliding"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["step"] == 1 and len(summary["images"]) == 3
    for p in picked:
        mask = Image.open(out / f"{p.stem}.png")
        assert mask.mode == "P" and mask.size == Image.open(p).size
        ids = np.asarray(mask)
        assert set(np.unique(ids)) <= set(range(21))  # dataset class ids, not channels
        areas = json.loads((out / f"{p.stem}.json").read_text())["areas"]
        assert sum(a["pixels"] for a in areas) == ids.size
        assert (out / f"{p.stem}_overlay.jpg").is_file()
    assert main(["predict", str(cfg.resolved_run_dir()), str(tmp_path / "nowhere.jpg"), "-o", str(out)]) == 3
    assert "no such image file" in capsys.readouterr().err


_real_find = __import__("importlib.util").util.find_spec


class _FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.metrics, self.finished = kwargs, [], [], False

    def log(self, values):
        self.logged.append(values)

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def finish(self):
        self.finished = True


def test_wandb_mirrors_the_tensorboard_scalars_and_images(tiny_run, monkeypatch):
    """log.wandb=true (offline by default) logs what tensorboard gets; a fake module stands in for wandb."""
    import sys
    import types

    from sats.engine.runner import Runner

    import importlib.machinery

    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: runs.append(_FakeWandbRun(**kw)) or runs[-1]
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_run(**{"log.tensorboard": False, "log.wandb": True, "train.log_every": 1})
    Runner(cfg).run()
    [run] = runs
    assert run.init["mode"] == "offline" and run.init["project"] == "sats" and run.init["resume"] == "allow"
    keys = {k for entry in run.logged for k in entry}
    assert {"test/miou", "test/old", "step0/loss/ce", "step1/lr", "predictions/step1"} <= keys
    assert ("test/*", "test/step") in run.metrics
    images = [e["predictions/step0"] for e in run.logged if "predictions/step0" in e]
    assert images and images[0][0] == "image" and images[0][1][2] == 3


def test_wandb_without_the_package_is_a_config_error(tiny_run, monkeypatch):
    import sys

    from sats.config import ConfigError
    from sats.engine.runner import Runner

    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable (wandb is not a dependency)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else _real_find(name, *a))
    cfg = tiny_run(**{"log.tensorboard": False, "log.wandb": True})
    with pytest.raises(ConfigError, match="pip install wandb"):
        Runner(cfg)  # at start-up, before anything is written
    assert not cfg.resolved_run_dir().exists()
