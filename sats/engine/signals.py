"""Graceful stop on SIGINT/SIGTERM and the RNG state that a mid-epoch resume restores.

The first SIGINT or SIGTERM only sets a flag (so a checkpoint being written is always finished);
the runner looks at it at its safe points (after every training iteration, after an epoch
checkpoint, after a step), writes a checkpoint of the current state and raises
:class:`RunInterrupted`, whose message says how to resume. A second signal stops at once
(SIGINT: ``KeyboardInterrupt``; SIGTERM: the default action); the last checkpoint is kept.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Dict, Iterator, List, Optional

import torch

from sats.engine.distributed import all_reduce_sum_, is_distributed

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(RuntimeError):
    """The run stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class StopRequest:
    """Records the first SIGINT/SIGTERM while installed (``with stop: ...``).

    Handlers are installed only in the main thread (elsewhere Python refuses them, and the
    request is then never set); the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def __enter__(self) -> "StopRequest":
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write: no locks taken inside a signal handler (logging may hold one right now)
            os.write(2, f"\nsats: {name} received: the run stops after the current iteration or checkpoint write "
                        f"and saves its state; send {name} again to stop at once\n".encode())
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        os.write(2, f"\nsats: second {name}: stopping at once (the last checkpoint is kept)\n".encode())
        if callable(previous):  # e.g. Python's default SIGINT handler: KeyboardInterrupt
            previous(signum, frame)
        elif signum == signal.SIGINT:  # SIGINT was ignored or default where we started (e.g. a background job)
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agreed(self, device: torch.device) -> bool:
        """True if any rank has a request (one all-reduce under DDP, so every rank stops at the same point)."""
        if not is_distributed():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce_sum_(flag).item() > 0)


def gather_per_rank(obj: Any) -> List[Any]:
    """Every rank's ``obj``, indexed by rank (a collective under DDP: all ranks must call it).

    Used for the per-rank part of a mid-epoch checkpoint (RNG states, loss sums); tensors in
    ``obj`` should be on the CPU (CUDA generator states from :func:`capture_rng` are).
    """
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class StoppableFetch:
    """Iterates ``iterable``; a fetch that fails after a stop request ends the iteration instead of raising.

    DataLoader workers receive a terminal's SIGINT (and a scheduler's SIGTERM) too and exit, so
    the next fetch fails although the training state is intact; the error is kept in ``failed``.
    """

    def __init__(self, iterable: Any, stop: StopRequest) -> None:
        self.iterable, self.stop = iterable, stop
        self.failed: Optional[BaseException] = None

    def __iter__(self) -> Iterator[Any]:
        items = iter(self.iterable)
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except RuntimeError as exc:  # "DataLoader worker (pid ...) exited unexpectedly"
                if not self.stop.requested:
                    raise
                self.failed = exc
                return
            yield item
