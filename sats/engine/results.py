"""Results of a run: one row per finished step in ``results.json`` and a ``results.md`` table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sats.data.tasks import Task
from sats.io import write_json_atomic, write_text_atomic
from sats.engine.evaluator import Metrics

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _clean(v: Optional[float]) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def make_row(step: int, metrics: Metrics, groups: Dict[str, List[int]], task: Task,
             class_names: Sequence[str]) -> Dict[str, Any]:
    """A JSON-able row: per-channel IoU with class ids and names, the old/new/all groups, accuracies."""
    num = metrics.num_classes
    channel_classes = list(task.channel_classes[:num])
    row: Dict[str, Any] = {
        "step": step,
        "num_classes": num,
        "new_classes": list(task.new_classes(step)),
        "iou": [_clean(v) for v in metrics.class_iou],
        "class_ids": channel_classes,
        "class_names": [class_names[c] for c in channel_classes],
        "miou": _clean(metrics.miou),
        "pixel_acc": _clean(metrics.pixel_acc),
        "mean_acc": _clean(metrics.mean_class_acc),
        "fw_iou": _clean(metrics.fw_iou),
        "num_pixels": metrics.num_pixels,  # evaluated (non-ignored) pixels
    }
    row.update({k: _clean(v) for k, v in metrics.group_miou(groups).items()})
    row["groups"] = groups
    return row


def training_record(counters: Dict[str, Any], iterations: int, eval_time_s: float) -> Dict[str, Any]:
    """The training part of a step's row: times, images/s, iterations, skipped iterations, epoch losses."""
    return {"train_time_s": round(counters["train_time_s"], 3), "eval_time_s": round(eval_time_s, 3),
            "train_images_per_s": round(counters["images"] / max(counters["train_time_s"], 1e-9), 2),
            "iterations": iterations, "nonfinite_skipped": counters["nonfinite_skipped"],
            "epoch_losses": counters["epoch_losses"]}


def run_header(cfg: Any, method: str, task: Task, num_steps: int, joint: bool, class_names: Sequence[str],
               skipped: Dict[str, int], data: Dict[str, Any]) -> Dict[str, Any]:
    """The run-level part of ``results.json``: what ran (config, method, task, classes) on which data."""
    return {"name": cfg.name, "method": method, "method_params": cfg.method, "dataset": cfg.data.dataset,
            "task": task.name, "overlap": cfg.data.overlap, "backbone": cfg.model.backbone, "num_steps": num_steps,
            "joint": joint, "memory": cfg.memory.size if cfg.memory.enabled else None,
            "channel_classes": list(task.channel_classes), "class_names": [class_names[c] for c in task.channel_classes],
            "skipped_bad_files": skipped, "data": data}


def load_rows(run_dir: Path) -> Dict[int, Dict[str, Any]]:
    path = Path(run_dir) / RESULTS_JSON
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); it was not written by sats or was edited") from exc
    return {int(r["step"]): r for r in data.get("steps", [])}


def load(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / RESULTS_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results (has the run finished a step?)")
    return json.loads(path.read_text())


def write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


def write(run_dir: Path, header: Dict[str, Any], rows: Dict[int, Dict[str, Any]]) -> None:
    ordered = [rows[k] for k in sorted(rows)]
    write_json_atomic(Path(run_dir) / RESULTS_JSON, {**header, "steps": ordered})
    write_text_atomic(Path(run_dir) / RESULTS_MD, markdown_table(header, ordered))


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v * 100:.2f}"


def markdown_table(header: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """Per-step old/new/all table, then per-class IoU of the last step."""
    skipped = any(r.get("nonfinite_skipped") for r in rows)  # iterations skipped for a non-finite loss/gradient
    lines = [f"# {header.get('name', '')}: {header.get('method', '')} on {header.get('dataset', '')} "
             f"{header.get('task', '')} ({'overlapped' if header.get('overlap') else 'disjoint'}), "
             f"{header.get('backbone', '')}", "",
             "| step | old | new | all | mIoU | pixel acc | train s | images/s |" + (" skipped |" if skipped else ""),
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if skipped else "")]
    for r in rows:
        lines.append(f"| {r['step']} | {_fmt(r.get('old'))} | {_fmt(r.get('new'))} | {_fmt(r.get('all'))} | "
                     f"{_fmt(r.get('miou'))} | {_fmt(r.get('pixel_acc'))} | {r.get('train_time_s', 0):.1f} | "
                     f"{r.get('train_images_per_s', 0):.1f} |" + (f" {r.get('nonfinite_skipped', 0)} |" if skipped else ""))
    if rows:
        last = rows[-1]
        lines += ["", f"Per-class IoU after step {last['step']}:", "", "| channel | class | IoU |", "|---:|---|---:|"]
        for ch, (cid, name, iou) in enumerate(zip(last["class_ids"], last["class_names"], last["iou"])):
            lines.append(f"| {ch} | {cid} {name} | {_fmt(iou)} |")
    return "\n".join(lines) + "\n"
