"""Where a run's scalars and images go: tensorboard (``log.tensorboard``) and, optionally, Weights & Biases
(``log.wandb``; ``pip install wandb``), both behind one :class:`RunLogger`.

W&B mirrors exactly what tensorboard gets (the same tags, with the iteration or step as W&B's ``step``
of that tag family), in ``log.wandb_mode`` (``offline`` by default: nothing leaves the machine until
``wandb sync``; ``online`` uploads). Only the main process logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

log = logging.getLogger("sats")


class RunLogger:
    """``add_scalar(tag, value, step)``, ``add_image(tag, (H, W, 3) uint8, step)``, ``flush()``, ``close()``
    fanned out to the configured sinks; with no sink configured it is falsy and does nothing."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb: bool = False, wandb_project: str = "sats",
                 wandb_mode: str = "offline", run_name: str = "", config: Optional[Dict[str, Any]] = None) -> None:
        self.sinks: List[Any] = []
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.sinks.append(SummaryWriter(str(Path(run_dir) / "tb")))
        if wandb:
            self.sinks.append(_WandbSink(Path(run_dir), wandb_project, wandb_mode, run_name, config or {}))

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for sink in self.sinks:
            sink.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        for sink in self.sinks:
            sink.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class _WandbSink:
    """The tensorboard writer's calls, as W&B logs (``tag`` keys; the tensorboard step is logged as
    ``<tag family>/step`` and used as that family's x axis)."""

    def __init__(self, run_dir: Path, project: str, mode: str, name: str, config: Dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            from sats.config import ConfigError

            raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or set log.wandb=false)"
                              ) from exc
        self.wandb = wandb
        # resume="allow" with the run directory's id: a resumed run continues its W&B run
        run_id = "sats-" + "".join(ch if ch.isalnum() else "-" for ch in str(run_dir.resolve()))[-60:]
        self.run = wandb.init(project=project, name=name or run_dir.name, dir=str(run_dir), mode=mode,
                              config=config, id=run_id, resume="allow")
        self.families: set = set()

    def _family(self, tag: str) -> str:
        family = tag.rsplit("/", 1)[0] if "/" in tag else tag
        if family not in self.families:
            self.families.add(family)
            self.run.define_metric(f"{family}/step")
            self.run.define_metric(f"{family}/*", step_metric=f"{family}/step")
        return family

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: float(value), f"{self._family(tag)}/step": int(step)})

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str = "HWC") -> None:
        self.run.log({tag: self.wandb.Image(np.asarray(image)), f"{self._family(tag)}/step": int(step)})

    def flush(self) -> None:  # W&B writes as it goes
        pass

    def close(self) -> None:
        self.run.finish()
