"""The benchmark commands run on a tiny setting and write what they promise (benchmarks are not timed here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import summarize_seeds  # noqa: E402
from benchmarks.methods import Spec, run_isolated, synthetic_batch  # noqa: E402
from benchmarks.scaling import heads_markdown  # noqa: E402
from sats.data.tasks import get_task  # noqa: E402

TINY = ["--backbones", "mit_custom-tiny", "--sizes", "32", "--iters", "1", "--warmup", "1", "--threads", "1"]


def test_sats_bench_cost_writes_json_and_markdown(tmp_path):
    from sats.cli import main

    out = tmp_path / "methods.json"
    assert main(["bench", "cost", *TINY, "--methods", "ft,mib", "--no-isolate", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ft", "mib"}
    ft, mib = rows["ft"], rows["mib"]
    # FT runs no old model: its bound is the FT iteration alone
    assert not ft["old_model"] and ft["old_forward_ms"] == 0 and ft["bound_ms"] == pytest.approx(ft["ft_ms"])
    # MiB at step 1 of 15-5: heads [16, 5], its own terms, bound = FT + old forward, ratio = train / bound
    assert mib["step"] == 1 and mib["head_sizes"] == [16, 5] and mib["terms"] == ["unce", "unkd"]
    assert mib["old_model"] and mib["old_forward_ms"] > 0 and mib["old_needs"] == []
    assert mib["bound_ms"] == pytest.approx(mib["ft_ms"] + mib["old_forward_ms"], abs=1e-3)
    assert mib["ratio"] == pytest.approx(mib["train_ms"] / mib["bound_ms"], rel=1e-3)
    assert mib["images_per_s"] == pytest.approx(2 / mib["train_ms"] * 1000, rel=1e-3)
    markdown = out.with_suffix(".md").read_text()
    assert "| mib | 1 |" in markdown and "| ft | 1 |" in markdown


def test_isolated_measurement_reports_cpu_memory():
    row = run_isolated(Spec(backbone="mit_custom-tiny", size=32, method="sats", iters=1, warmup=1, threads=1))
    assert row["needs"] == ["attentions"] and row["old_needs"] == ["attentions"]
    assert row["terms"] == ["ce", "sat", "unkd"]
    assert row["train_peak_mb"] > 0 and row["train_peak_growth_mb"] >= 0
    assert row["memory_measure"].startswith("cpu peak RSS")


def test_synthetic_batch_labels_are_the_steps_channels():
    task = get_task("voc", "15-5")
    batch = synthetic_batch(task, 1, batch=2, size=32, device=torch.device("cpu"), saliency=True)
    labels = batch.labels
    assert labels.shape == (2, 32, 32) and batch.saliency.shape == (2, 32, 32)
    assert set(labels.unique().tolist()) <= {0, 16, 17, 18, 19, 20, 255}
    # border of 32 // 32 = 1 px; rectangles [4:16, 4:16] and [16:28, 10:26] of new channels 16, 17 / 18, 19
    assert (labels[:, 0] == 255).all() and (labels[:, :, -1] == 255).all() and labels[0, 1, 1] == 0
    assert (labels[0, 4:16, 4:16] == 16).all() and (labels[0, 16:28, 10:26] == 17).all()
    assert (labels[1, 4:16, 4:16] == 18).all() and (labels[1, 16:28, 10:26] == 19).all()


def _row(method: str, task: str, step: int, head_sizes: list, ms: float, ratio: float) -> dict:
    return {"backbone": "b", "size": 64, "batch": 2, "amp": "off", "method": method, "dataset": "ade", "task": task,
            "step": step, "num_outputs": sum(head_sizes), "head_sizes": head_sizes, "train_ms": ms, "ft_ms": ms,
            "ratio": ratio, "train_peak_mb": 1.0, "train_peak_growth_mb": 1.0}


def test_step_index_check_pairs_equal_old_and_total_channels():
    eleven = [101] + [5] * 10  # ade 100-5 step 10: K_t = 151, K_{t-1} = 146
    rows = [_row("ft", "145-5", 1, [146, 5], 100.0, 1.00), _row("ft", "100-5", 10, eleven, 90.0, 1.05),
            _row("sats", "145-5", 1, [146, 5], 100.0, 1.10), _row("sats", "100-5", 10, eleven, 95.0, 1.25),
            _row("sats", "100-50", 1, [101, 50], 100.0, 3.00)]  # K_{t-1} = 101: not paired with the others
    text = heads_markdown(rows)
    check = text[text.index("Step index"):]
    assert "| ft | 151 | 146 | 2 → 11 | 100.0 → 90.0 | 1.00 → 1.05 | +0.05 | ok |" in check
    assert "| sats | 151 | 146 | 2 → 11 | 100.0 → 95.0 | 1.10 → 1.25 | +0.15 | **grows** |" in check
    assert "| sats | 151 | 101 |" not in check and "3.00" not in check


def test_accuracy_summary_over_seeds():
    entries = [{"old": 0.5, "new": 0.1, "all": 0.4, "avg_old": 0.6, "avg_new": 0.1, "avg_all": 0.5, "seconds": 10.0},
               {"old": 0.7, "new": 0.3, "all": 0.6, "avg_old": 0.8, "avg_new": None, "avg_all": 0.7, "seconds": 20.0}]
    s = summarize_seeds(entries)
    assert s["seeds"] == 2 and s["old"] == pytest.approx(0.6) and s["old_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert s["avg_new"] == pytest.approx(0.1) and s["avg_new_std"] == 0.0 and s["seconds"] == 15.0


def test_models_benchmark_reports_flop_rate_per_option(tmp_path):
    from benchmarks.models import main as models_main

    out = tmp_path / "models.json"
    assert models_main(["--backbones", "mit_b0", "--sizes", "32", "--attentions", "off", "--iters", "1",
                        "--warmup", "0", "--threads", "1", "--options", "plain", "checkpoint", "--out", str(out)]) == 0
    rows = {r["option"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"plain", "checkpoint"}
    plain = rows["plain"]
    assert plain["forward_gflop"] > 0 and rows["checkpoint"]["forward_gflop"] == plain["forward_gflop"]
    rate = 3 * plain["forward_gflop"] / (plain["train_ms"] / 1000)
    assert plain["train_gflops"] == pytest.approx(rate, rel=0.02, abs=0.06)  # rounded to 0.1
    assert "| mit_b0 | 32 | 2 | no | checkpoint |" in out.with_suffix(".md").read_text()


def test_scan_and_optimizer_benchmarks_write_their_tables(tmp_path):
    from benchmarks.optim import main as optim_main
    from benchmarks.scan import main as scan_main

    scan = scan_main(["--num", "12", "--workers", "1", "2", "--out", str(tmp_path / "scan.json")])
    assert [r["workers"] for r in scan["rows"]] == [1, 2] and all(r["masks"] == 12 for r in scan["rows"])
    assert (tmp_path / "scan.md").read_text().count("\n| ") == 3  # header + 2 rows
    optim = optim_main(["--backbone", "mit_custom", "--optimizers", "sgd", "--iters", "1",
                        "--out", str(tmp_path / "optimizer.json")])
    assert [r["kernel"] for r in optim["results"]] == ["loop", "foreach", "fused", "auto"]
    assert all(r["step_ms"] > 0 for r in optim["results"])
