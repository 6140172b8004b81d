"""Keyed artifacts behind ``ctx.cache``: what a method computes once and may reuse (e.g. thresholds).

An artifact is a dict of tensors and plain values stored as a verified checkpoint file
``<data.cache_dir>/<kind>/<key>.pt``. The key must hold everything the artifact depends on
(methods build it from content digests: ``ctx.old_checkpoint_digest``, ``ctx.data_digest``).
Every rank takes the same branch (a hit only when the file is there for all of them), only
rank 0 writes, and a damaged file is reported and treated as a miss (it is then recomputed and
written again), never an error that stops every run sharing the cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from sats.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sats.engine.distributed import all_agree
from sats.io import FileError

log = logging.getLogger("sats")


class ArtifactCache:
    """``get(kind, key)`` / ``put(kind, key, artifact)`` under ``root``; ``root=None`` caches nothing."""

    def __init__(self, root: Optional[Path], device: torch.device, is_main: bool = True) -> None:
        self.root, self.device, self.is_main = (Path(root) if root is not None else None), device, is_main

    def path(self, kind: str, key: str) -> Path:
        if self.root is None:
            raise RuntimeError("this cache has no folder")
        return self.root / kind / f"{key}.pt"

    def get(self, kind: str, key: str) -> Optional[Dict[str, Any]]:
        """The artifact stored under (``kind``, ``key``), or None (every rank agrees)."""
        if self.root is None:
            return None
        path = self.path(kind, key)
        if not all_agree(path.exists(), self.device):
            return None
        artifact: Optional[Dict[str, Any]] = None
        try:
            artifact = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("cached %s %s is damaged (%s); computing it again", kind, path, exc)
        if not all_agree(artifact is not None, self.device):
            return None
        return artifact

    def put(self, kind: str, key: str, artifact: Dict[str, Any]) -> Optional[Path]:
        """Store ``artifact`` (rank 0 writes; a cache that cannot be written is logged, not fatal)."""
        if self.root is None or not self.is_main:
            return None
        path = self.path(kind, key)
        try:
            save_checkpoint(artifact, path)
        except FileError as exc:
            log.warning("cannot cache %s %s (%s); it will be computed again next time", kind, path, exc)
            return None
        return path
