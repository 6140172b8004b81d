"""Publish a run's step checkpoints on the Hugging Face Hub, and get a published run back (the ``hub`` extra).

``sats hub push RUN_DIR USER/REPO`` uploads, per finished step ``t``, ``step{t}.safetensors`` (the model weights)
and ``step{t}.json`` (everything else of the step checkpoint: the results row, head sizes, task, backbone, and the
method state, whose tensors go to ``step{t}.method.safetensors``), plus the run's ``config.yaml``, ``results.json``
and a model card (``README.md``) holding the config and the results table. ``sats hub pull USER/REPO DIR``
rebuilds a run directory from them (verified step checkpoints), so ``sats test DIR`` re-tests the published run
on local data with one command (``--test`` does it at once). No pickle crosses the network: weights are
safetensors, the rest JSON.

The folder to upload is built by :func:`export_run` and read back by :func:`import_run`; only :func:`push` and
:func:`pull` talk to the Hub (through ``huggingface_hub``, imported when they run).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from sats.engine import results as results_io
from sats.engine.checkpoint import load_checkpoint, save_checkpoint
from sats.engine.rundir import RunDir
from sats.io import write_text_atomic

__all__ = ["HubError", "export_run", "import_run", "model_card", "pull", "push"]

FORMAT = "sats-run/1"
_TENSOR = "__tensor__"
_STEP_FILE = re.compile(r"^step(\d+)\.json$")


class HubError(RuntimeError):
    """A run could not be exported, published or rebuilt (names the file or repository)."""


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError as exc:  # pragma: no cover - the hub extra installs it
        raise HubError("sats hub needs safetensors: pip install 'sats[hub]'") from exc
    return save_file, load_file


def split_tensors(obj: Any, prefix: str = "") -> Tuple[Any, Dict[str, torch.Tensor]]:
    """A nested structure → (the same structure with every tensor replaced by ``{"__tensor__": path}``, the
    tensors by path). Tuples become lists (JSON has no tuples)."""
    tensors: Dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {_TENSOR: path}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise HubError(f"{path or 'state'}: only string keys can be published, got {list(value)[:4]}")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise HubError(f"{path or 'state'}: a {type(value).__name__} cannot be published (tensors, numbers, "
                       "strings, lists and string-keyed mappings only)")

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def model_card(header: Dict[str, Any], config_text: str, repo_id: str) -> str:
    """The README.md of a published run: front matter, what ran, the results table, the config, how to re-test."""
    rows = header.get("steps", [])
    front = {"library_name": "sats", "tags": ["continual-learning", "semantic-segmentation",
                                               str(header.get("method", "")), str(header.get("dataset", ""))]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {header.get('name', repo_id)}", "",
             f"Method `{header.get('method')}`, task {header.get('dataset')} {header.get('task')} "
             f"({'overlapped' if header.get('overlap') else 'disjoint'}), backbone `{header.get('backbone')}`: "
             f"the step checkpoints of a [sats](https://pypi.org/project/sats/) run.", "",
             "## Results (mIoU %, after each step)", "", results_io.markdown_table(header, rows).strip(), "",
             "## Re-test", "", "```bash", "pip install 'sats[hub]'",
             f"sats hub pull {repo_id} runs/{header.get('name', 'published')} --test   # needs the dataset locally",
             "```", "", "## Config", "", "```yaml", config_text.strip(), "```", ""]
    return "\n".join(lines)


def export_run(run_dir: Path, out: Path, repo_id: str = "USER/REPO") -> List[int]:
    """Write the folder a push uploads: safetensors + JSON per finished step, config, results, model card.
    Returns the steps exported. Every step checkpoint is verified on the way."""
    run_dir, out = Path(run_dir), Path(out)
    rundir = RunDir(run_dir)
    if not rundir.config_path.is_file():
        raise HubError(f"{run_dir}: not a run directory (no config.yaml)")
    rows = results_io.load_rows(run_dir)
    steps = [t for t in sorted(rows) if rundir.step_checkpoint(t).is_file()]
    if not steps:
        raise HubError(f"{run_dir}: no finished step with a checkpoint to publish")
    save_file, _ = _safetensors()
    out.mkdir(parents=True, exist_ok=True)
    for t in steps:
        ckpt = load_checkpoint(rundir.step_checkpoint(t))
        model = {k: v.detach().cpu().contiguous() for k, v in ckpt.pop("model").items()}
        save_file(model, str(out / f"step{t}.safetensors"), metadata={"format": FORMAT, "step": str(t)})
        skeleton, method_tensors = split_tensors(ckpt)
        if method_tensors:
            save_file(method_tensors, str(out / f"step{t}.method.safetensors"), metadata={"format": FORMAT})
        (out / f"step{t}.json").write_text(json.dumps({"format": FORMAT, **skeleton}, indent=1))
    config_text = rundir.config_path.read_text()
    shutil.copyfile(rundir.config_path, out / "config.yaml")
    header = results_io.load(run_dir)
    header["steps"] = [rows[t] for t in steps]
    (out / "results.json").write_text(json.dumps(header, indent=1))
    (out / "README.md").write_text(model_card(header, config_text, repo_id))
    return steps


def import_run(folder: Path, run_dir: Path) -> List[int]:
    """Rebuild a run directory from an exported folder: ``config.yaml``, ``results.json`` and verified
    ``checkpoints/step{t}.ckpt``. Refuses to overwrite a run directory that already has a config."""
    folder, run_dir = Path(folder), Path(run_dir)
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    if not steps or not (folder / "config.yaml").is_file():
        raise HubError(f"{folder}: not a published sats run (no config.yaml or step*.json)")
    if (run_dir / "config.yaml").exists():
        raise HubError(f"{run_dir} already holds a run (config.yaml); pull into a new directory")
    _, load_file = _safetensors()
    rundir = RunDir(run_dir)
    rundir.ckpt_dir.mkdir(parents=True, exist_ok=True)
    for t in steps:
        meta = json.loads((folder / f"step{t}.json").read_text())
        if meta.pop("format", None) != FORMAT:
            raise HubError(f"{folder / f'step{t}.json'}: not written by sats hub ({FORMAT})")
        tensors_path = folder / f"step{t}.method.safetensors"
        method_tensors = load_file(str(tensors_path)) if tensors_path.is_file() else {}
        try:
            state = join_tensors(meta, method_tensors)
        except KeyError as exc:
            raise HubError(f"{tensors_path}: misses tensor {exc} that step{t}.json refers to") from exc
        state["model"] = load_file(str(folder / f"step{t}.safetensors"))
        save_checkpoint(state, rundir.step_checkpoint(t))
    write_text_atomic(rundir.config_path, (folder / "config.yaml").read_text())
    published = json.loads((folder / "results.json").read_text())
    rows = {int(r["step"]): r for r in published.pop("steps", [])}
    results_io.write(run_dir, published, {t: rows[t] for t in steps if t in rows})
    return steps


def _hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError("sats hub needs huggingface_hub: pip install 'sats[hub]'") from exc
    return huggingface_hub


def push(run_dir: Path, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Export ``run_dir`` and upload it to the model repository ``repo_id`` (created if missing); returns its URL."""
    hub = _hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sats-hub-") as tmp:
        steps = export_run(Path(run_dir), Path(tmp), repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=tmp, repo_id=repo_id, repo_type="model",
                          commit_message=f"sats run {Path(run_dir).name}: steps {steps}")
    return f"https://huggingface.co/{repo_id}"


def pull(repo_id: str, run_dir: Path, revision: Optional[str] = None, token: Optional[str] = None) -> List[int]:
    """Download ``repo_id`` and rebuild a run directory at ``run_dir``; returns the steps."""
    hub = _hub()
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, token=token, repo_type="model")
    except (OSError, ValueError) as exc:  # the Hub's HTTP, offline and not-found errors are OSErrors
        raise HubError(f"could not download {repo_id!r} from the Hugging Face Hub: {exc}") from exc
    return import_run(Path(folder), Path(run_dir))
