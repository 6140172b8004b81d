"""``sats report``: tables and figures across run directories, written to one folder.

Files written to ``out``::

    summary.md            table across runs (+ the paper's numbers where a run matches) + figure list
    summary.csv           the same table, machine-readable (percent)
    paper_comparison.csv  paper vs ours, only when at least one finished run matches a published row
    seeds.md              runs that differ only in train.seed grouped: old / new / all / hIoU per step, mean ± std (n)
    per_class.{md,csv,tex}  per-class IoU after the last step and forgetting, per group (appendix tables)
    leaderboard.{md,html} methods × tasks ("all", mean ± std over seeds), best of each task in bold
    miou_per_step.png     all / old / new mIoU after each step, one line per run
    per_class_iou/<run>.png   per-class IoU heat map (classes × steps), one per run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sats.io import write_text_atomic
from sats.report.plots import plot_class_heatmap, plot_step_curves
from sats.report.runs import RunResult, load_runs, safe_filename
from sats.report.stats import group_seeds, leaderboard, leaderboard_markdown, seeds_markdown, write_statistics
from sats.report.tables import paper_csv, paper_markdown, paper_matches, summary_csv, summary_markdown


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    summary_md: Path
    summary_csv: Path
    curves_png: Path
    heatmaps: Dict[str, Path] = field(default_factory=dict)  # run label → PNG
    paper_csv: Optional[Path] = None
    statistics: Dict[str, Path] = field(default_factory=dict)  # seeds_md, per_class_*, leaderboard_*


def write_report(run_dirs: Sequence[str | Path], out: str | Path,
                 seconds: Optional[Dict[str, float]] = None) -> ReportFiles:
    """Load the runs, write every table and figure to ``out``, return the paths."""
    return write_report_for(load_runs(run_dirs), out, seconds)


def write_report_for(runs: List[RunResult], out: str | Path, seconds: Optional[Dict[str, float]] = None) -> ReportFiles:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_markdown(runs, seconds)
    matches = paper_matches(runs)
    curves = plot_step_curves(runs, out / "miou_per_step.png")
    heatmaps = {r.label: plot_class_heatmap(r, out / "per_class_iou" / f"{safe_filename(r.label)}.png") for r in runs}
    files = ReportFiles(summary_md=out / "summary.md", summary_csv=out / "summary.csv", curves_png=curves,
                        heatmaps=heatmaps)
    write_text_atomic(files.summary_csv, summary_csv(runs))
    groups = group_seeds(runs)
    files.statistics = write_statistics(groups, out, runs[0].header.get("class_names") or [])
    parts = ["# Results", "", table, "## Seeds (mean ± std over runs that differ only in train.seed)", "",
             seeds_markdown(groups), "## Leaderboard", "", leaderboard_markdown(leaderboard(groups))]
    if matches:
        files.paper_csv = out / "paper_comparison.csv"
        write_text_atomic(files.paper_csv, paper_csv(matches))
        parts += ["## Published numbers (SATS paper; DKD and STAR READMEs)", "", paper_markdown(matches)]
    else:
        parts += ["No run matches a published row (VOC overlapped 15-1 / 15-5 / 5-3 / 10-1 with mit_b2 or "
                  "resnet101, finished).", ""]
    parts += ["## Figures", "", f"- mIoU after each step: [{curves.name}]({curves.name})"]
    parts += [f"- per-class IoU, {label}: [{p.relative_to(out)}]({p.relative_to(out)})" for label, p in heatmaps.items()]
    parts += ["", "Tables: " + ", ".join(f"[{p.name}]({p.name})" for p in files.statistics.values())]
    write_text_atomic(files.summary_md, "\n".join(parts) + "\n")
    return files
