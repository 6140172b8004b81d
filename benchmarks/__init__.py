"""Benchmarks of sats (not part of the test suite): ``python -m benchmarks cost|scaling|accuracy|confusion|all``.

* :mod:`benchmarks.methods`: training / evaluation cost of every method and its ratio to the lower bound.
* :mod:`benchmarks.scaling`: step time and memory vs classes, steps (heads) and resolution.
* :mod:`benchmarks.accuracy`: old / new / all mIoU of every method on the synthetic tasks.
* :mod:`benchmarks.confusion`, :mod:`benchmarks.models`, :mod:`benchmarks.attention_loss`: component costs.

Results (JSON and markdown) go to ``benchmarks/results/``; see ``benchmarks/README.md``.
"""
