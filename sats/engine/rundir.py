"""The run directory: its layout, the one-writer lock, the config record, the log, and the one
way from a step checkpoint to a model.

Files of a run directory::

    config.yaml                      the resolved config (a run that has trained must keep it)
    .lock                            held (flock) by the one `sats train` process writing here
    checkpoints/step{t}.ckpt         end-of-step model + method state + results row (atomic, hashed)
    checkpoints/step{t}-epoch.ckpt   last completed epoch (or mid-epoch stop) of the step in progress
    checkpoints/discarded-<time>/    checkpoints set aside by ``--redo-step`` (never deleted)
    memory/step{t}.json              exemplar memory of step t (image ids; only with memory.enabled)
    results.json / results.md        one row per finished step
    tb/  train.log                   tensorboard events, the log
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from sats.config import RESULT_NEUTRAL_KEYS, ExperimentConfig, config_to_dict, save_config, without_later_defaults
from sats.data.tasks import Task
from sats.data.fingerprint import file_fingerprints
from sats.engine.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint, verify_checkpoint
from sats.engine.distributed import all_agree, barrier
from sats.io import digest
from sats.models.builtin import pretrained_file
from sats.models.config import ModelConfig
from sats.models.segmenter import Segmenter, build_segmenter

log = logging.getLogger("sats")

try:  # POSIX; elsewhere runs are not locked (logged once)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class RunError(RuntimeError):
    """A run directory or checkpoint does not match the experiment, or is in use."""


#: config keys that may change between the starts of one run (logging, machine, paths)
CONFIG_KEYS_FREE_TO_CHANGE = set(RESULT_NEUTRAL_KEYS)  # e.g. device: a run may move between machines


class RunDir:
    """Paths and bookkeeping of one run directory (nothing is created until asked)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._created = False
        self._start_records: Optional[logging.handlers.MemoryHandler] = None

    # -- layout ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def step_checkpoint(self, t: int) -> Path:
        return self.ckpt_dir / f"step{t}.ckpt"

    def epoch_checkpoint(self, t: int) -> Path:
        return self.ckpt_dir / f"step{t}-epoch.ckpt"

    def has_trained(self) -> bool:
        """Whether any step (or epoch) checkpoint or results row exists: the config is then fixed."""
        return (self.path / "results.json").exists() or (self.ckpt_dir.is_dir() and
                                                         any(self.ckpt_dir.glob("step*.ckpt")))

    # -- one writer -----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the exclusive lock of the run directory (created if needed) or raise RunError naming the holder.

        ``fcntl.flock`` locks belong to the open file: the OS releases them when the process dies
        (also on SIGKILL), so a stale lock file never blocks a later run.
        """
        if self._lock_fd is not None:
            return
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot create the run directory {self.path}: {e.strerror or e}") from e
        if fcntl is None:  # pragma: no cover
            log.warning("this platform has no fcntl: %s is not locked against a second writer", self.path)
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunError(f"{self.path} is in use by another sats process ({holder}); wait for it to finish or "
                           f"stop it, or give this run another directory (name=... or run_dir=...)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        if fcntl is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    def abandon(self) -> None:
        """After a failed start: release the lock and remove the directory if this start created it and
        nothing but the lock file is in it (a typo never leaves a run directory behind)."""
        created = self._created
        self._drop_start_log()
        self.unlock()
        if created and self.path.is_dir() and [p.name for p in self.path.iterdir()] == [".lock"]:
            self.lock_path.unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass  # another process created something meanwhile: leave it

    # -- config record --------------------------------------------------------------------------
    def record_config(self, cfg: ExperimentConfig) -> None:
        """Write ``config.yaml``, or check it: a run that has trained keeps its config (RunError naming the
        keys that differ); one that has trained nothing takes the new config, with a log line."""
        current = json.loads(json.dumps(config_to_dict(cfg), default=str))
        if self.config_path.exists():
            saved = json.loads(json.dumps(_load_yaml(self.config_path), default=str))
            diff = config_diff(without_later_defaults(saved), without_later_defaults(current))
            if not diff:
                return
            if self.has_trained():
                raise RunError(f"{self.path} holds a run with another config ({'; '.join(diff[:5])}"
                               f"{'; …' if len(diff) > 5 else ''}); choose another name/run_dir, or delete the "
                               "directory to start over")
            log.info("%s has trained nothing yet: its config is replaced (%s)", self.path, "; ".join(diff[:8]))
        save_config(cfg, self.config_path)

    def hold_start_log(self) -> None:
        """Keep the log records of a start until :meth:`attach_log` writes them to ``train.log`` (a start that
        fails validation leaves no log behind; one that passes has its data-check warnings in the log)."""
        if self._start_records is None:
            self._start_records = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
            logging.getLogger("sats").addHandler(self._start_records)

    def _drop_start_log(self) -> Optional[logging.handlers.MemoryHandler]:
        held, self._start_records = self._start_records, None
        if held is not None:
            logging.getLogger("sats").removeHandler(held)
        return held

    def attach_log(self) -> None:
        """Log to ``train.log`` from now on, after the records held since the start."""
        handler = _attach_file_log(self.log_path)
        held = self._drop_start_log()
        if held is not None:
            for record in held.buffer:
                handler.handle(record)
            held.close()

    def remove_stale_temp_files(self) -> None:
        for folder in (self.path, self.ckpt_dir):
            if folder.is_dir():
                _remove_stale_temp_files(folder)

    # -- checkpoints of finished steps ----------------------------------------------------------
    def verify_finished(self, t: int) -> None:
        """RunError (with what to do) when step ``t``'s checkpoint, which a rerun would skip over, is damaged."""
        path = self.step_checkpoint(t)
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            raise RunError(f"step {t} finished earlier, but {e}. Its checkpoint is what later steps and "
                           f"`sats test` rely on: retrain it with `sats train CONFIG --redo-step {t}` (the damaged "
                           f"file and those of later steps are moved to {self.ckpt_dir}/discarded-<time>/), or "
                           f"delete {path} and the checkpoints of the steps after it") from e

    def warn_if_data_changed(self, now: Dict[str, Any], what: str = "later steps train on the current files") -> None:
        """Log which recorded steps saw other files than ``now`` (:meth:`ExperimentData.fingerprint`; the root may
        differ: a moved copy of the same files is the same data)."""
        from sats.engine import results as results_io
        from sats.engine.data import same_data

        rows = results_io.load_rows(self.path)
        changed = [t for t, r in sorted(rows.items()) if r.get("data") is not None and not same_data(r["data"], now)]
        if changed:
            log.warning("%s: the dataset's files changed since step(s) %s were evaluated (recorded in results.json: "
                        "%s; now: %s); %s", self.path, changed, rows[changed[0]]["data"], now, what)

    def verify_finished_steps(self, steps: Sequence[int], device: torch.device, is_main: bool) -> None:
        """:meth:`verify_finished` for every step of ``steps`` that has a checkpoint (the main process reads the
        files); every rank raises when one is damaged, before anything trains."""
        error: Optional[RunError] = None
        if is_main:
            try:
                for t in (t for t in steps if self.step_checkpoint(t).exists()):
                    self.verify_finished(t)
            except RunError as exc:
                error = exc
        if not all_agree(error is None, device):
            raise error or RunError(f"{self.path}: a step checkpoint is damaged (see the main process's error)")

    def row_from_checkpoint(self, t: int, head_sizes: List[int], backbone: str, task: Task) -> Optional[Dict[str, Any]]:
        """The results row stored in a finished step's checkpoint (a run stopped before writing results.json)."""
        path = self.step_checkpoint(t)
        if not path.exists():
            return None
        ckpt = load_checkpoint(path)
        check_step_checkpoint(ckpt, path, t, head_sizes, backbone, task)
        if "row" not in ckpt:
            return None
        log.info("step %d finished before the run stopped; its results row is taken from %s", t, path)
        return ckpt["row"]

    def discard_steps_from(self, t: int) -> List[Path]:
        """Move the checkpoints (and memory files) of steps ≥ ``t`` aside and drop their results rows."""
        from sats.engine import results as results_io

        moved: List[Path] = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.ckpt_dir / f"discarded-{stamp}"
        for path in sorted([*self.ckpt_dir.glob("step*.ckpt"), *(self.path / "memory").glob("step*.json")]):
            step = _step_of(path.name)
            if step is not None and step >= t:
                target.mkdir(parents=True, exist_ok=True)
                dest = target / (path.name if path.parent == self.ckpt_dir else f"memory-{path.name}")
                path.replace(dest)
                moved.append(dest)
        rows = results_io.load_rows(self.path)
        if any(k >= t for k in rows):
            header = {k: v for k, v in results_io.load(self.path).items() if k != "steps"}
            results_io.write(self.path, header, {k: v for k, v in rows.items() if k < t})
        if moved:
            log.info("--redo-step %d: moved %d file(s) to %s", t, len(moved), target)
        return moved


class SharedStep0:
    """A plain-CE step 0 shared by every run whose step 0 is the same: ``<data.cache_dir>/step0/<key>/``
    (``step0.ckpt`` and its results row ``row.json``). ``key`` hashes everything that determines the step
    (the runner builds it: the method's step-0 recipe, the images by content, model, schedule, pipeline,
    process count). An entry counts only with both files; the row is written last."""

    #: train keys that do not change a step-0 checkpoint (left out of the key)
    FREE_TRAIN_KEYS = ("lr_incremental", "epochs_incremental", "log_every", "share_step0", "threads", "val_every",
                       "select", "on_nonfinite", "max_skipped_fraction", "dist_timeout_s")

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.dir = Path(cache_dir) / "step0" / key

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, recipe: str, data_digest: str, world_size: int) -> "SharedStep0":
        """The entry of a run's step 0: ``recipe`` (the method's step-0 key), ``data_digest`` (the step's images
        by content), the model (and the bytes of ``model.pretrained``), schedule, pipeline and process count."""
        as_dict = without_later_defaults(config_to_dict(cfg))  # entries written before a key existed stay valid
        determinants = {
            "recipe": recipe, "data": data_digest, "model": as_dict["model"],
            "pretrained": file_fingerprints([pretrained_file(cfg.model.pretrained)], Path(cfg.data.cache_dir) / "data")[0]
            if cfg.model.pretrained else None,
            "train": {k: v for k, v in as_dict["train"].items() if k not in cls.FREE_TRAIN_KEYS},
            "data_pipeline": {k: getattr(cfg.data, k) for k in ("crop_size", "scale_min", "scale_max", "batch_size",
                                                                 "eval_size", "eval_mode")},
            "world_size": world_size,
        }
        return cls(Path(cfg.data.cache_dir), digest(determinants))

    @property
    def checkpoint(self) -> Path:
        return self.dir / "step0.ckpt"

    @property
    def row_path(self) -> Path:
        return self.dir / "row.json"

    def available(self) -> bool:
        return self.checkpoint.exists() and self.row_path.exists()

    def read(self) -> tuple[Dict[str, Any], Dict[str, Any]]:
        """(checkpoint, results row); CheckpointError/OSError/ValueError when the entry is damaged."""
        return load_checkpoint(self.checkpoint), json.loads(self.row_path.read_text())

    def adopt(self, step0_checkpoint: Path, head_sizes: List[int], backbone: str, task: Task, device: torch.device,
              is_main: bool) -> Optional[Dict[str, Any]]:
        """Copy the entry to a run's ``step0_checkpoint`` and return its row (marked ``shared_step0``); a damaged
        entry is set aside and None returned (every rank agrees), so one bad entry never fails every run."""
        problem, ckpt, row = "", None, None
        try:
            ckpt, row = self.read()  # the checkpoint's hash is verified before it is adopted
        except (CheckpointError, OSError, ValueError) as exc:
            problem = str(exc)
        if not all_agree(not problem, device):
            if is_main:
                self.set_aside(problem)
            barrier()
            return None
        assert ckpt is not None and row is not None
        check_step_checkpoint(ckpt, self.checkpoint, 0, head_sizes, backbone, task)
        if is_main:  # unchanged bytes: caches keyed by its digest stay shared
            save_checkpoint(ckpt, step0_checkpoint)
        barrier()
        row["shared_step0"] = self.dir.name
        log.info("step 0: reusing the shared plain-CE step-0 checkpoint %s (mIoU %.2f)", self.dir, row["miou"] * 100)
        return row

    def set_aside(self, problem: str) -> Path:
        """Move a damaged entry to ``<key>.damaged-<time>`` (kept for inspection, never used again)."""
        aside = self.dir.with_name(f"{self.dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        self.dir.replace(aside)
        log.warning("step 0: the shared step-0 checkpoint is damaged (%s); moved it to %s and training step 0 again",
                    problem or "on another rank", aside)
        return aside

    def store(self, step0_checkpoint: Path, row: Dict[str, Any]) -> None:
        """Copy a run's step-0 checkpoint in (atomically), then its row."""
        from sats.engine import results as results_io

        tmp = self.dir / f"step0.ckpt.tmp-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(step0_checkpoint, tmp)
            tmp.replace(self.checkpoint)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write the shared step-0 checkpoint {self.checkpoint}: "
                                  f"{exc.strerror or exc}") from exc
        results_io.write_json(self.row_path, row)


def _step_of(name: str) -> Optional[int]:
    digits = name[4:].split("-", 1)[0].split(".", 1)[0]
    return int(digits) if name.startswith("step") and digits.isdigit() else None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return "its PID is unknown"
    return (f"PID {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '')}").strip()


# -- from a step checkpoint to a model --------------------------------------------------------------
def check_step_checkpoint(ckpt: Dict[str, Any], path: Path, t: int, head_sizes: List[int], backbone: str,
                          task: Task) -> None:
    """RunError when a step-``t`` checkpoint does not belong to this run's model and task."""
    if ckpt.get("head_sizes") != head_sizes or ckpt.get("backbone") != backbone:
        raise RunError(f"{path}: checkpoint of backbone {ckpt.get('backbone')!r} with heads "
                       f"{ckpt.get('head_sizes')} does not match this run ({backbone!r}, heads {head_sizes} at "
                       f"step {t})")
    saved = ckpt.get("task")  # the classes of steps 0..t must agree (later steps may differ: 15-5 vs 15-1)
    ours = {"dataset": task.dataset, "steps": [list(c) for c in task.steps[:t + 1]]}
    if saved is not None and {"dataset": saved.get("dataset"), "steps": saved.get("steps", [])[:t + 1]} != ours:
        raise RunError(f"{path}: checkpoint of task {saved.get('dataset')}/{saved.get('name')} with classes "
                       f"{saved.get('steps', [])[:t + 1]} up to step {t}; this run's task "
                       f"{task.dataset}/{task.name} has {ours['steps']}")


def load_step_model(path: Path, t: int, model_cfg: ModelConfig, head_sizes: List[int], task: Task,
                    device: torch.device | str = "cpu") -> tuple[Segmenter, Dict[str, Any]]:
    """The model saved at the end of step ``t`` (verified file, matching heads and task, strict load) and
    the checkpoint dict; the model is on ``device``. Every reader of step checkpoints goes through here."""
    if not path.is_file():
        raise RunError(f"{path}: step {t} has no checkpoint (has step {t} finished?)")
    ckpt = load_checkpoint(path)
    check_step_checkpoint(ckpt, path, t, head_sizes, model_cfg.backbone, task)
    model = build_segmenter(_without_pretrained(model_cfg), head_sizes)
    load_state_strict(model, ckpt["model"], path)
    return model.to(device), ckpt


def _without_pretrained(model_cfg: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(model_cfg, pretrained=None)


# -- helpers ----------------------------------------------------------------------------------------
def _remove_stale_temp_files(folder: Path) -> None:
    """Delete ``*.tmp-<pid>`` files that atomic writes of a killed process left (never a live process's)."""
    for tmp in folder.glob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            log.info("removing %s, left by a run that was killed while writing it", tmp)
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _load_yaml(path: Path) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def config_diff(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Keys whose values differ between two nested dicts (ignoring :data:`CONFIG_KEYS_FREE_TO_CHANGE`)."""
    if prefix.rstrip(".") in CONFIG_KEYS_FREE_TO_CHANGE:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out: List[str] = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} → {b!r}"]


def _attach_file_log(path: Path) -> logging.FileHandler:
    """Log to ``path``; a previous run's file handler in this process (e.g. the demo's runs) is closed."""
    root = logging.getLogger("sats")
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(h.baseFilename) == path.resolve():
            return h
        root.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return handler
