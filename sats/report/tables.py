"""Tables across runs: old / new / all after the last step and averaged over steps, and the paper's numbers.

Values in the tables are percentages (the results files hold fractions).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from sats.report.paper_results import PaperResult, find_paper_result, paper_method_key
from sats.report.runs import RunResult, class_span


def pct(value: Optional[float]) -> Optional[float]:
    """Fraction → percent (None stays None)."""
    return None if value is None else 100.0 * float(value)


def _cell(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _group_headers(runs: Sequence[RunResult]) -> Dict[str, str]:
    """Column names; "old 0-15" / "new 16-20" when every run has the same final groups."""
    headers = {"old": "old", "new": "new", "all": "all"}
    for group in ("old", "new"):
        spans = {class_span(r.group_classes(group)) for r in runs}
        if len(spans) == 1 and "–" not in spans:
            headers[group] = f"{group} {spans.pop()}"
    return headers


def summary_markdown(runs: Sequence[RunResult], seconds: Optional[Dict[str, float]] = None) -> str:
    """One row per run: old / new / all mIoU (%) after its last step and "all" averaged over steps.

    ``seconds`` (run label → wall time) replaces the time recorded in the rows (the demo's timing).
    A run that has not reached its task's last step shows ``k/T`` in the steps column.
    """
    if not runs:
        raise ValueError("summary_markdown: no runs")
    settings = {r.setting for r in runs}
    one_setting = len(settings) == 1
    names = _group_headers(runs)
    head = ["run", "method"] + ([] if one_setting else ["setting"]) + [
        "steps", names["old"], names["new"], names["all"], "avg all over steps", "time"]
    lines = []
    if one_setting:
        lines += [f"Setting: {settings.pop()}. mIoU (%) after the last step; old includes background.", ""]
    else:
        lines += ["mIoU (%) after the last step; old includes background.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (3 if one_setting else 4) + ["---:"] * 5) + "|"]
    for r in runs:
        steps = f"{r.steps_done}" if r.finished else f"{r.steps_done}/{r.num_steps} (unfinished)"
        secs = seconds[r.label] if seconds and r.label in seconds else r.seconds
        cells = [r.label, r.method] + ([] if one_setting else [r.setting]) + [
            steps, _cell(pct(r.final("old"))), _cell(pct(r.final("new"))), _cell(pct(r.final("all"))),
            _cell(pct(r.average("all"))), format_seconds(secs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("run", "run_dir", "method", "paper_method", "dataset", "task", "protocol", "backbone", "steps_done",
               "num_steps", "finished", "old", "new", "all", "avg_all", "seconds")


def summary_csv(runs: Sequence[RunResult]) -> str:
    """The summary as CSV (percent values, full precision; empty cell = no value)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in runs:
        values = [pct(r.final("old")), pct(r.final("new")), pct(r.final("all")), pct(r.average("all"))]
        writer.writerow([r.label, str(r.run_dir or ""), r.method, paper_method_key(r.header), r.dataset, r.task,
                         "overlapped" if r.overlap else "disjoint", r.backbone, r.steps_done, r.num_steps,
                         r.finished, *["" if v is None else repr(round(v, 6)) for v in values],
                         round(r.seconds, 3)])
    return buf.getvalue()


@dataclass
class PaperComparison:
    run: RunResult
    paper: PaperResult


def paper_matches(runs: Sequence[RunResult]) -> List[PaperComparison]:
    """Runs that finished and have a published row (same method key, backbone, task, dataset and protocol)."""
    out = []
    for r in runs:
        if not r.finished:
            continue
        paper = find_paper_result(paper_method_key(r.header), r.backbone, r.task, r.dataset, r.overlap)
        if paper is not None:
            out.append(PaperComparison(r, paper))
    return out


def _delta(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def paper_markdown(matches: Sequence[PaperComparison]) -> str:
    """Side by side: paper / ours / difference for old, new and all (percent)."""
    lines = ["| run | paper row | task | old paper | old ours | Δ | new paper | new ours | Δ | all paper | all ours | Δ |",
             "|---|---|---|" + "---:|" * 9]
    for m in matches:
        cells = [m.run.label, f"{m.paper.label}{' ★' if m.paper.quoted else ''} ({m.paper.network})", m.paper.task]
        for group in ("old", "new", "all"):
            ours, paper = pct(m.run.final(group)), getattr(m.paper, group)
            delta = _delta(ours, paper)
            cells += [_cell(paper), _cell(ours), "–" if delta is None else f"{delta:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "★ = quoted in the SATS paper from the original publication (not run with the SATS code)."]
    sources = sorted({m.paper.source for m in matches})
    lines += ["", "Sources: " + "; ".join(sources) + "."] if sources else []
    return "\n".join(lines) + "\n"


def paper_csv(matches: Sequence[PaperComparison]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "paper_method", "paper_label", "network", "quoted", "task",
                     "old_paper", "old_ours", "new_paper", "new_ours", "all_paper", "all_ours", "source"])
    for m in matches:
        row: List[object] = [m.run.label, m.paper.method, m.paper.label, m.paper.network, m.paper.quoted, m.paper.task]
        for group in ("old", "new", "all"):
            ours = pct(m.run.final(group))
            row += [getattr(m.paper, group), "" if ours is None else repr(round(ours, 6))]
        writer.writerow([*row, m.paper.source])
    return buf.getvalue()
