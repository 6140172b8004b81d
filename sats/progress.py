"""Progress bars that never flood a log: drawn only on an interactive terminal.

tqdm writes a ``\\r``-terminated record per update; when stderr is a file or a pipe (CI, ``nohup``,
a cluster's job log) that is tens of kilobytes of noise for a 1.5 KB log. ``log.progress: true``
therefore means "bars when stderr is a terminal"; elsewhere the engine's one log line per epoch
is the progress report. ``log.progress: false`` turns bars off everywhere.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def interactive() -> bool:
    """Whether stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable[T], enabled: bool, desc: str, total: Optional[int] = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and stderr is a terminal, else unchanged."""
    if not (enabled and interactive()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
