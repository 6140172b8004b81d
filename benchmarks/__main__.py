"""``python -m benchmarks COMMAND [options]`` (also ``sats bench COMMAND [options]`` from a source checkout).

Commands:

* ``cost``: every method's training ms/iter, images/s, peak memory, evaluation images/s and its
  ratio to the lower bound (FT + old-model forward) — :mod:`benchmarks.methods`;
* ``scaling``: step time and memory vs classes, heads (steps) and resolution — :mod:`benchmarks.scaling`;
* ``accuracy``: old / new / all mIoU of every method on the synthetic tasks — :mod:`benchmarks.accuracy`;
* ``confusion``: the confusion-matrix update vs the reference's NumPy bincount — :mod:`benchmarks.confusion`;
* ``models``: segmenter forward / forward+backward cost — :mod:`benchmarks.models`;
* ``attention``: the SATS attention loss, vectorised vs a per-class loop — :mod:`benchmarks.attention_loss`;
* ``sdpa``: MiT's attention core, fused SDPA vs the explicit softmax path — :mod:`benchmarks.sdpa`;
* ``dataloader``: the training data pipeline's images/s per worker on VOC-sized files — :mod:`benchmarks.dataloader`;
* ``optimizer``: the optimiser step per kernel (``train.optimizer_impl``) — :mod:`benchmarks.optim`;
* ``allocator``: page faults and time with the host allocator tuned or not (``SATS_HOST_ALLOCATOR``) — :mod:`benchmarks.allocator`;
* ``scan``: the one-off mask scan (content fingerprints, class presence) at ADE20K's scale — :mod:`benchmarks.scan`;
* ``all``: cost, scaling, confusion and accuracy with their defaults (long on a CPU).

``python -m benchmarks COMMAND --help`` lists a command's options. Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional


MODULES = {"cost": "methods", "scaling": "scaling", "accuracy": "accuracy", "confusion": "confusion",
           "models": "models", "attention": "attention_loss", "sdpa": "sdpa", "dataloader": "dataloader",
           "scan": "scan", "optimizer": "optim", "allocator": "allocator"}


def _command(name: str) -> Callable[[Optional[Sequence[str]]], Any]:
    """The ``main(argv)`` of a command's module (imported on demand: torch-heavy imports stay lazy)."""
    return importlib.import_module(f"benchmarks.{MODULES[name]}").main


ALL = ("cost", "scaling", "confusion", "accuracy")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = [*MODULES, "all"]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in names:
        print(f"benchmarks: unknown command {command!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    if command == "all":
        if rest:
            print("benchmarks: `all` takes no options (run the commands one by one to set them)", file=sys.stderr)
            return 2
        for name in ALL:
            print(f"== {name}", flush=True)
            _command(name)([])
        return 0
    result = _command(command)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
