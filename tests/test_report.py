"""Reports, prediction grids and t-SNE on tiny runs; the published-numbers table."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, tiny_overrides
from sats.report.paper_results import VOC_OVERLAPPED, find_paper_result, paper_method_key
from sats.report.plots import iou_matrix
from sats.report.runs import RunResult, class_span, load_run
from sats.report.summary import write_report
from sats.report.tables import paper_markdown, paper_matches, summary_markdown
from sats.report.tsne import collect_decoder_features, embed_tsne, select_per_class


@pytest.fixture(scope="module")
def runs(tiny_synthetic, tmp_path_factory):
    """A tiny FT run (15-5: 2 steps) and a joint run (1 step) sharing one cache."""
    from sats.experiment import load_experiment
    from sats.engine.runner import Runner

    root = tmp_path_factory.mktemp("report_runs")
    out = {}
    for method in ("ft", "joint"):
        extra = {"log.tensorboard": False, "train.epochs": 1}
        overrides = tiny_overrides(tiny_synthetic, root / method, root / "cache", **extra)
        cfg = load_experiment(CONFIGS / "demo/ft.yaml", [*overrides, f"method.name={method}", f"name=tiny-{method}"])
        Runner(cfg).run()
        out[method] = root / method
    return out


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _fake_run(rows, num_steps=2, **header) -> RunResult:
    base = {"name": "fake", "method": "sats", "dataset": "voc", "task": "15-5", "overlap": True,
            "backbone": "mit_b2", "num_steps": num_steps, "joint": False, "memory": None}
    return RunResult(label=header.pop("label", "fake"), header={**base, **header}, rows=rows)


def _row(step, iou, old, new, all_, new_classes):
    ids = list(range(len(iou)))
    return {"step": step, "iou": iou, "class_ids": ids, "class_names": [f"c{i}" for i in ids], "old": old,
            "new": new, "all": all_, "new_classes": new_classes,
            "groups": {"old": [0, 1], "new": list(range(2, len(iou))), "all": ids}}


# -- the published numbers ----------------------------------------------------------------------
def test_paper_table_lookup():
    assert len(VOC_OVERLAPPED) == 21 * 4
    sats = find_paper_result("sats", "mit_b2", "15-1")
    assert (sats.old, sats.new, sats.all, sats.quoted) == (78.38, 62.02, 74.48, False)
    mib = find_paper_result("mib", "resnet101", "15-5")
    assert (mib.all, mib.quoted, mib.label, mib.network) == (69.0, True, "MiB", "DeepLabV3")
    assert find_paper_result("sats-m", "mit_b2", "10-1").all == 69.27
    assert find_paper_result("joint", "resnet101", "5-3").new == 77.63
    assert find_paper_result("sats", "resnet101", "15-1") is None  # DeepLab SATS is not in the table
    assert find_paper_result("sats", "mit_b2", "15-1", overlap=False) is None
    assert find_paper_result("sats", "mit_b2", "100-10", dataset="ade") is None
    assert find_paper_result("st_cil", "resnet101", "5-3") is None  # N/A cell
    starred = {(r.label, r.network) for r in VOC_OVERLAPPED if r.quoted}
    assert starred == {("LwF-MC", "DeepLabV3"), ("ILT", "DeepLabV3"), ("MiB", "DeepLabV3"), ("PLOP", "DeepLabV3"),
                       ("SDR", "DeepLabV3+"), ("RECALL", "DeepLabV2"), ("ST-CIL", "DeepLabV3"),
                       ("SSUL", "DeepLabV3"), ("SSUL-M", "DeepLabV3")}


def test_paper_method_key():
    assert paper_method_key({"method": "mib", "name": "mib_mit-b2_voc-15-1", "memory": None}) == "mib"
    assert paper_method_key({"method": "mib", "name": "x", "memory": 100}) == "mib-m"
    assert paper_method_key({"method": "sats", "name": "sats-m_mit-b2_voc-15-1"}) == "sats-m"
    assert paper_method_key({"method": "lwf_mc", "name": "lwf-mc_r101_voc-15-1", "memory": None}) == "lwf_mc"


def test_paper_comparison_numbers():
    rows = [_row(0, [0.9, 0.8], 0.85, None, 0.85, [0, 1]), _row(1, [0.8, 0.7, 0.6], 0.75, 0.6, 0.7, [2])]
    run = _fake_run(rows, task="15-1", num_steps=2)
    unfinished = _fake_run(rows[:1], task="15-1", num_steps=2, label="half")
    matches = paper_matches([run, unfinished])
    assert [m.run.label for m in matches] == ["fake"]  # an unfinished run is never compared
    text = paper_markdown(matches)
    # paper SATS 15-1: 78.38 / 62.02 / 74.48; ours 75.00 / 60.00 / 70.00
    assert "| 78.38 | 75.00 | -3.38 | 62.02 | 60.00 | -2.02 | 74.48 | 70.00 | -4.48 |" in text


# -- tables and figures from hand-made rows ------------------------------------------------------
def test_summary_and_matrix_from_rows():
    rows = [_row(0, [0.9, None], 0.9, None, 0.9, [0, 1]), _row(1, [0.5, 0.25, 0.0], 0.375, 0.0, 0.25, [2])]
    run = _fake_run(rows, num_steps=3)
    assert not run.finished and run.average("all") == pytest.approx(0.575)
    text = summary_markdown([run])
    assert "| fake | sats | 2/3 (unfinished) | 37.50 | 0.00 | 25.00 | 57.50 |" in text
    matrix = iou_matrix(run)
    assert matrix.shape == (3, 2)
    np.testing.assert_allclose(matrix[:, 1], [50.0, 25.0, 0.0])
    assert matrix[0, 0] == 90.0 and math.isnan(matrix[1, 0]) and math.isnan(matrix[2, 0])
    assert class_span([16, 17, 18]) == "16-18" and class_span([3]) == "3" and class_span([1, 5]) == "1,5"


# -- a report from tiny runs ---------------------------------------------------------------------
def test_report_files_hold_the_recorded_numbers(runs, tmp_path):
    files = write_report([runs["ft"], runs["joint"]], tmp_path / "report")
    recorded = {name: json.loads((runs[name] / "results.json").read_text())["steps"] for name in runs}
    assert files.paper_csv is None  # synthetic data: no published row
    with open(files.summary_csv) as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert set(table) == {"tiny-ft", "tiny-joint"}
    for name in ("ft", "joint"):
        steps, row = recorded[name], table[f"tiny-{name}"]
        assert int(row["steps_done"]) == len(steps) == (2 if name == "ft" else 1)
        for group in ("old", "new", "all"):
            assert float(row[group]) == pytest.approx(100 * steps[-1][group], abs=1e-5)
        mean_all = sum(s["all"] for s in steps) / len(steps)
        assert float(row["avg_all"]) == pytest.approx(100 * mean_all, abs=1e-5)
        assert f"{100 * steps[-1]['all']:.2f}" in files.summary_md.read_text()
    assert "old 0-15" in files.summary_md.read_text() and "new 16-20" in files.summary_md.read_text()
    curves = _png(files.curves_png)
    assert curves.shape[0] > 200 and curves.shape[1] > 600 and curves.std() > 0
    assert set(files.heatmaps) == {"tiny-ft", "tiny-joint"}
    for path in files.heatmaps.values():
        assert _png(path).std() > 0


def test_cli_report_and_visualize(runs, tmp_path, capsys):
    from sats.cli import main

    assert main(["report", str(runs["ft"]), "-o", str(tmp_path / "rep")]) == 0
    assert "tiny-ft" in capsys.readouterr().out and (tmp_path / "rep" / "summary.csv").is_file()
    out = tmp_path / "grid.png"
    assert main(["visualize", str(runs["ft"]), "--images", "2", "--step", "1", "-o", str(out)]) == 0
    assert _png(out).std() > 0
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "results.json" in capsys.readouterr().err


# -- prediction grid -----------------------------------------------------------------------------
def test_prediction_grid_per_step(runs, tmp_path):
    from sats.data.overlay import colorize
    from sats.report.visualize import open_run, plot_prediction_grid, predict_grid

    ctx = open_run(runs["ft"], "cpu")
    grid = predict_grid(ctx, num_images=3)
    assert sorted(grid.predictions) == [0, 1] and len(grid.images) == 3
    test_set = ctx.data.eval_loader(1, False, "test", ctx.dist).dataset
    for i in range(3):
        np.testing.assert_array_equal(grid.labels[i], test_set[i][1].numpy())
        assert grid.predictions[0][i].max() < 16  # after step 0 the model has 16 channels (0-15)
        assert grid.predictions[1][i].max() < 21
        assert grid.images[i].dtype == np.uint8 and grid.images[i].shape[-1] == 3
    label = torch.tensor([[[0, 16, 255]]])
    np.testing.assert_array_equal(colorize(label, ctx.palette, grid.channel_classes)[0, 0],
                                  [[0, 0, 0], [0, 64, 0], [255, 255, 255]])  # VOC palette: 16 pottedplant
    path = plot_prediction_grid(grid, ctx, tmp_path / "grid.png")
    image = _png(path)
    assert image.shape[1] > image.shape[0] * 0.8  # 4 columns × 3 rows of square panels, legend below

    ids = [grid.image_ids[2], grid.image_ids[0]]
    picked = predict_grid(ctx, steps=[1], ids=ids)
    assert picked.image_ids == ids and sorted(picked.predictions) == [1]
    np.testing.assert_array_equal(picked.predictions[1][1], grid.predictions[1][0])
    with pytest.raises(ValueError, match="nope"):
        predict_grid(ctx, ids=["nope"])
    with pytest.raises(FileNotFoundError, match="step"):
        predict_grid(ctx, steps=[2])


# -- t-SNE ---------------------------------------------------------------------------------------
def test_select_per_class_keeps_lowest_priorities():
    labels = torch.tensor([2, 0, 2, 2, 1, 0, 2, 5])
    priorities = torch.tensor([0.9, 0.1, 0.2, 0.5, 0.3, 0.05, 0.1, 0.7])
    keep = select_per_class(labels, priorities, 2)
    # class 2 keeps its two lowest priorities (0.1 at 6, 0.2 at 2); the others keep everything
    assert keep.tolist() == [False, True, True, False, True, True, True, True]


class _LabelEchoModel(torch.nn.Module):
    """Decoder feature = the image's first channel at half resolution (tests write the label there)."""

    def forward(self, x, need=()):
        from types import SimpleNamespace

        return SimpleNamespace(decoder=x[:, :1, ::2, ::2])


def test_collect_decoder_features_samples_each_class():
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[0, :4] = 3  # 16 pixels at half resolution: 8 of class 3, 8 of class 0
    labels[1, :, :2] = 255  # ignored
    labels[1, :, 2:4] = 7  # 4 pixels at half resolution, >= num_channels: dropped
    labels[1, 0:2, 4:] = 1  # 2 pixels of class 1
    images = torch.cat([labels[:, None].float(), torch.zeros(2, 2, 8, 8)], 1)
    loader = [(images[:1], labels[:1]), (images[1:], labels[1:])]
    got = collect_decoder_features(_LabelEchoModel(), loader, num_channels=5, per_class=6, max_images=10)
    counts = np.bincount(got.labels, minlength=5)
    assert counts.tolist() == [6, 2, 0, 6, 0]  # class 0: 8 + 6 pixels available, capped at 6
    np.testing.assert_array_equal(got.features[:, 0], got.labels)  # every feature sits with its own label
    assert got.images == 2


def test_tsne_without_opentsne_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openTSNE", None)  # makes `import openTSNE` fail
    with pytest.raises(ImportError, match=r"pip install 'sats\[tsne\]'"):
        embed_tsne(np.zeros((10, 3), np.float32))


def test_write_tsne_plumbing_with_a_stand_in_embedding(runs, tmp_path, monkeypatch):
    """write_tsne end to end with a stand-in openTSNE (first two feature columns as coordinates)."""
    from types import ModuleType

    from sats.report.tsne import write_tsne

    calls = {}

    class StandInTSNE:
        def __init__(self, n_components, perplexity, random_state, n_jobs, verbose):
            calls.update(n_components=n_components, perplexity=perplexity, random_state=random_state)

        def fit(self, x):
            calls["points"] = x.shape
            return x[:, :2]

    module = ModuleType("openTSNE")
    module.TSNE = StandInTSNE
    monkeypatch.setitem(sys.modules, "openTSNE", module)
    path = write_tsne(runs["ft"], tmp_path / "tsne.png", step=1, per_class=4, max_images=6, device="cpu", seed=3)
    points, dims = calls["points"]
    assert dims == 16 and 4 <= points <= 4 * 21  # decoder_dim 16; at most 4 pixels of each of 21 channels
    assert calls["n_components"] == 2 and calls["random_state"] == 3
    assert calls["perplexity"] == min(30.0, (points - 1) / 3)
    assert _png(path).std() > 0


def test_tsne_png(runs, tmp_path):
    pytest.importorskip("openTSNE")
    from sats.report.tsne import write_tsne

    path = write_tsne(runs["ft"], tmp_path / "tsne.png", step=1, per_class=20, max_images=8, device="cpu")
    assert _png(path).std() > 0


def test_load_run_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_run(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(tmp_path)
