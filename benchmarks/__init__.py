"""Benchmarks of sats (not part of the test suite): ``python -m benchmarks cost|scaling|accuracy|confusion|all``.

* :mod:`benchmarks.methods`: training / evaluation cost of every method and its ratio to the lower bound.
* :mod:`benchmarks.scaling`: step time and memory vs classes, steps (heads) and resolution.
* :mod:`benchmarks.accuracy`: old / new / all mIoU of every method on the synthetic tasks.
* :mod:`benchmarks.confusion`, :mod:`benchmarks.models`, :mod:`benchmarks.attention_loss`: component costs.

Results (JSON and markdown) go to ``benchmarks/results/``; see ``benchmarks/README.md``.
"""

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, payload: Any, markdown: str) -> None:
    """``out`` (JSON of ``payload``) and the markdown beside it (``.md``); prints both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")
