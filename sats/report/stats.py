"""Statistics over runs: seeds grouped into mean ± std, hIoU, forgetting, per-class tables, a leaderboard.

* :func:`group_seeds`: runs whose configs differ only in ``train.seed`` (and in how they are named
  or placed) form one :class:`SeedGroup`; per step, old / new / all / hIoU are averaged with their
  sample standard deviation (``n − 1``; 0 for one run) and ``n``.
* hIoU = harmonic mean of old and new, ``2·old·new / (old + new)`` (None without a new group).
* forgetting of class ``c`` = its IoU at the step it was learned minus its IoU after the last step
  (positive = forgotten), per run, then averaged over the group.
* :func:`leaderboard`: one cell per method and task ("all" after the last step, mean ± std over
  seeds), the best of each task in bold; markdown and a self-contained HTML page.

All values are percentages.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sats.config import RESULT_NEUTRAL_KEYS
from sats.report.runs import RunResult

#: config keys that may differ between the runs of one seed group (the seed, naming, placement, logging)
SEED_FREE_KEYS = ("train.seed", "name", *RESULT_NEUTRAL_KEYS)
GROUPS = ("old", "new", "all", "hiou")


def hiou(old: Optional[float], new: Optional[float]) -> Optional[float]:
    """Harmonic mean of old and new (None when either is missing; 0 when both are 0)."""
    if old is None or new is None:
        return None
    return 0.0 if old + new == 0 else 2.0 * old * new / (old + new)


@dataclass
class Stat:
    """Mean, sample standard deviation and count of the values that exist (percent)."""

    mean: Optional[float]
    std: Optional[float]
    n: int

    @classmethod
    def of(cls, values: Sequence[Optional[float]]) -> "Stat":
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return cls(None, None, 0)
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return cls(mean, std, len(vals))

    def text(self, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        if self.n <= 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def latex(self, digits: int = 2) -> str:
        if self.mean is None:
            return "--"
        return f"{self.mean:.{digits}f}" if self.n <= 1 else f"{self.mean:.{digits}f} $\\pm$ {self.std:.{digits}f}"


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * float(v)


def step_values(run: RunResult, step: int) -> Dict[str, Optional[float]]:
    """old / new / all / hIoU (percent) after ``step`` (None where the run has no such row or group)."""
    row = next((r for r in run.rows if int(r["step"]) == step), None)
    if row is None:
        return dict.fromkeys(GROUPS)
    old, new, all_ = _pct(row.get("old")), _pct(row.get("new")), _pct(row.get("all"))
    return {"old": old, "new": new, "all": all_, "hiou": hiou(old, new)}


def forgetting(run: RunResult) -> Dict[int, Optional[float]]:
    """Class id → IoU (%) at the step it was learned minus IoU after the last step (classes learned last: 0)."""
    if not run.rows:
        return {}
    last = run.rows[-1]
    final = {int(c): v for c, v in zip(last["class_ids"], last["iou"])}
    learned: Dict[int, Optional[float]] = {}  # IoU in the row of the step that added the class
    for row in run.rows:
        new = {int(c) for c in row.get("new_classes", [])}
        for c, v in zip(row["class_ids"], row["iou"]):
            if int(c) in new:
                learned.setdefault(int(c), v)
    return {c: (None if learned.get(c) is None or final.get(c) is None else 100.0 * (learned[c] - final[c]))
            for c in final}


def _config(run: RunResult) -> Optional[Dict[str, Any]]:
    if run.run_dir is None or not (run.run_dir / "config.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(run.run_dir / "config.yaml")), default=str))


def _without(tree: Any, keys: Sequence[str], prefix: str = "") -> Any:
    if not isinstance(tree, dict):
        return tree
    return {k: _without(v, keys, f"{prefix}{k}.") for k, v in tree.items() if f"{prefix}{k}" not in keys}


def _seed(run: RunResult, cfg: Optional[Dict[str, Any]]) -> Optional[int]:
    return cfg.get("train", {}).get("seed") if cfg else None


@dataclass
class SeedGroup:
    """Runs of one configuration that differ only in ``train.seed``."""

    runs: List[RunResult]
    seeds: List[Optional[int]] = field(default_factory=list)

    @property
    def first(self) -> RunResult:
        return self.runs[0]

    @property
    def label(self) -> str:
        return self.first.label if len(self.runs) == 1 else f"{self.first.method} ({len(self.runs)} seeds)"

    @property
    def steps(self) -> List[int]:
        return sorted({int(r["step"]) for run in self.runs for r in run.rows})

    def at(self, step: int) -> Dict[str, Stat]:
        """old / new / all / hIoU after ``step`` over the group's runs."""
        values = [step_values(run, step) for run in self.runs]
        return {g: Stat.of([v[g] for v in values]) for g in GROUPS}

    def final(self) -> Dict[str, Stat]:
        return self.at(self.steps[-1])

    def average_all(self) -> Stat:
        """Mean over steps of "all", then over seeds."""
        return Stat.of([run.average("all") and 100.0 * run.average("all") for run in self.runs])

    def class_final(self) -> Dict[int, Stat]:
        """Class id → IoU (%) after the last step over the group's runs."""
        per: Dict[int, List[Optional[float]]] = {}
        for run in self.runs:
            last = run.rows[-1]
            for c, v in zip(last["class_ids"], last["iou"]):
                per.setdefault(int(c), []).append(_pct(v))
        return {c: Stat.of(v) for c, v in per.items()}

    def class_forgetting(self) -> Dict[int, Stat]:
        per: Dict[int, List[Optional[float]]] = {}
        for run in self.runs:
            for c, v in forgetting(run).items():
                per.setdefault(c, []).append(v)
        return {c: Stat.of(v) for c, v in per.items()}


def group_seeds(runs: Sequence[RunResult]) -> List[SeedGroup]:
    """Runs grouped by their config without :data:`SEED_FREE_KEYS` (the config is the run directory's
    ``config.yaml``; without one a run is grouped by its results header). Order: first appearance."""
    groups: List[Tuple[str, SeedGroup]] = []
    for run in runs:
        cfg = _config(run)
        key = json.dumps(_without(cfg, SEED_FREE_KEYS) if cfg is not None else
                         {k: run.header.get(k) for k in ("method", "method_params", "dataset", "task", "overlap",
                                                          "backbone", "memory", "name")}, sort_keys=True)
        for k, g in groups:
            if k == key:
                g.runs.append(run)
                g.seeds.append(_seed(run, cfg))
                break
        else:
            groups.append((key, SeedGroup([run], [_seed(run, cfg)])))
    return [g for _, g in groups]


# -- tables --------------------------------------------------------------------------------------------
def seeds_markdown(groups: Sequence[SeedGroup]) -> str:
    """Per group and step: old / new / all / hIoU, mean ± std over seeds (n), and "all" averaged over steps."""
    lines = ["| run | seeds | step | old | new | all | hIoU |", "|---|---|---:|---:|---:|---:|---:|"]
    for g in groups:
        seeds = ",".join("?" if s is None else str(s) for s in g.seeds)
        for step in g.steps:
            s = g.at(step)
            lines.append(f"| {g.label} | {seeds} (n={len(g.runs)}) | {step} | {s['old'].text()} | {s['new'].text()} | "
                         f"{s['all'].text()} | {s['hiou'].text()} |")
    lines += ["", "| run | all, averaged over steps |", "|---|---:|"]
    lines += [f"| {g.label} | {g.average_all().text()} |" for g in groups]
    return "\n".join(lines) + "\n"


def per_class_rows(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of the per-class table: IoU after the last step and forgetting, per group."""
    classes = sorted({c for g in groups for c in g.class_final()})
    header = ["class"] + [f"{g.label} {what}" for g in groups for what in ("IoU", "forgetting")]
    rows = []
    for c in classes:
        name = class_names[c] if c < len(class_names) else str(c)
        cells = [f"{c} {name}"]
        for g in groups:
            cells += [g.class_final().get(c, Stat(None, None, 0)).text(), g.class_forgetting().get(c, Stat(None, None, 0)).text()]
        rows.append(cells)
    return header, rows


def per_class_markdown(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> str:
    header, rows = per_class_rows(groups, class_names)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def per_class_csv(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> str:
    """Machine-readable per-class table: one line per (group, class) with mean, std and n of both measures."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "class_id", "class", "iou_mean", "iou_std", "forgetting_mean", "forgetting_std", "n"])
    for g in groups:
        final, forget = g.class_final(), g.class_forgetting()
        for c in sorted(final):
            f = forget.get(c, Stat(None, None, 0))
            writer.writerow([g.label, c, class_names[c] if c < len(class_names) else c,
                             *["" if v is None else round(v, 6) for v in (final[c].mean, final[c].std, f.mean, f.std)],
                             final[c].n])
    return buf.getvalue()


def per_class_latex(groups: Sequence[SeedGroup], class_names: Sequence[str]) -> str:
    """The per-class IoU after the last step as a LaTeX ``tabular`` (booktabs), for an appendix."""
    classes = sorted({c for g in groups for c in g.class_final()})
    lines = ["\\begin{tabular}{l" + "r" * len(groups) + "}", "\\toprule",
             "class & " + " & ".join(_tex(g.label) for g in groups) + " \\\\", "\\midrule"]
    for c in classes:
        name = class_names[c] if c < len(class_names) else str(c)
        lines.append(_tex(f"{c} {name}") + " & " + " & ".join(
            g.class_final().get(c, Stat(None, None, 0)).latex() for g in groups) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
        text = text.replace(a, b)
    return text


# -- leaderboard -----------------------------------------------------------------------------------------
@dataclass
class Leaderboard:
    """Methods × tasks: "all" after the last step (mean ± std over seeds); ``best`` per task column."""

    tasks: List[str]
    methods: List[str]
    cells: Dict[Tuple[str, str], Stat]

    def best(self, task: str) -> Optional[str]:
        scored = [(self.cells[(m, task)].mean, m) for m in self.methods
                  if (m, task) in self.cells and self.cells[(m, task)].mean is not None]
        return max(scored)[1] if scored else None


def leaderboard(groups: Sequence[SeedGroup]) -> Leaderboard:
    """One cell per method and setting (dataset, task, protocol, backbone) of the finished groups."""
    cells: Dict[Tuple[str, str], Stat] = {}
    tasks: List[str] = []
    methods: List[str] = []
    for g in groups:
        if not all(run.finished for run in g.runs):
            continue
        run = g.first
        memory = "-M" if run.header.get("memory") else ""
        method = f"{run.method}{memory}"
        task = f"{run.dataset} {run.task}{'' if run.overlap else ' disjoint'} ({run.backbone})"
        tasks += [task] if task not in tasks else []
        methods += [method] if method not in methods else []
        cells[(method, task)] = g.final()["all"]
    return Leaderboard(tasks, methods, cells)


def leaderboard_markdown(board: Leaderboard) -> str:
    lines = ["| method | " + " | ".join(board.tasks) + " |", "|---|" + "---:|" * len(board.tasks)]
    for m in board.methods:
        cells = []
        for t in board.tasks:
            stat = board.cells.get((m, t))
            text = "–" if stat is None else stat.text()
            cells.append(f"**{text}**" if stat is not None and board.best(t) == m else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_html(board: Leaderboard, title: str = "sats leaderboard") -> str:
    """A self-contained page (inline CSS, no script): the leaderboard table, best of each task in bold."""
    head = "".join(f"<th>{html.escape(t)}</th>" for t in board.tasks)
    body = []
    for m in board.methods:
        cells = []
        for t in board.tasks:
            stat = board.cells.get((m, t))
            best = stat is not None and board.best(t) == m
            cells.append(f"<td class=\"{'best' if best else ''}\">{html.escape('–' if stat is None else stat.text())}</td>")
        body.append(f"<tr><th scope=\"row\">{html.escape(m)}</th>{''.join(cells)}</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #bbb; padding: 0.35em 0.8em; text-align: right; }}
thead th {{ background: #eef; }}
tbody th {{ text-align: left; background: #f7f7f7; }}
td.best {{ font-weight: bold; background: #e6f4e6; }}
caption {{ caption-side: bottom; padding-top: 0.6em; font-size: 0.85em; color: #555; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<table id="leaderboard"><thead><tr><th>method</th>{head}</tr></thead>
<tbody>{''.join(body)}</tbody>
<caption>mIoU (%) of all seen classes after the last step, mean ± standard deviation over seeds; best of each task in bold.</caption>
</table></body></html>
"""


def write_statistics(groups: Sequence[SeedGroup], out: Path, class_names: Sequence[str]) -> Dict[str, Path]:
    """Write seeds.md, per_class.{md,csv,tex}, leaderboard.{md,html} into ``out``; return the paths."""
    from sats.io import write_text_atomic

    board = leaderboard(groups)
    files = {"seeds_md": out / "seeds.md", "per_class_md": out / "per_class.md", "per_class_csv": out / "per_class.csv",
             "per_class_tex": out / "per_class.tex", "leaderboard_md": out / "leaderboard.md",
             "leaderboard_html": out / "leaderboard.html"}
    write_text_atomic(files["seeds_md"], seeds_markdown(groups))
    write_text_atomic(files["per_class_md"], per_class_markdown(groups, class_names))
    write_text_atomic(files["per_class_csv"], per_class_csv(groups, class_names))
    write_text_atomic(files["per_class_tex"], per_class_latex(groups, class_names))
    write_text_atomic(files["leaderboard_md"], leaderboard_markdown(board))
    write_text_atomic(files["leaderboard_html"], leaderboard_html(board))
    return files
