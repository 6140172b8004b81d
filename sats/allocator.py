"""The host allocator of a sats process: large blocks reused instead of mapped afresh (README, Performance).

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB: it rises to the size of the
largest block freed so far, up to that cap) with a fresh ``mmap`` and returns it with ``munmap`` on free. PyTorch's
CPU allocator calls ``posix_memalign`` for each tensor, so every tensor above 32 MiB — at 512 px and batch 2 a
``(2, 21, 512, 512)`` logit map, the stage-1 attention ``(2, 1, 16384, 256)``, a Mix-FFN hidden map — costs one page
fault per 4 KiB page the first time it is written, in every iteration (``benchmarks/results/allocator-cpu.md``).

:func:`tune_host_allocator`, on glibc (``SATS_HOST_ALLOCATOR=tuned``, the default), calls ``mallopt(M_MMAP_MAX, 0)``
(no block is mapped on its own: large ones come from the heap too) and ``mallopt(M_TRIM_THRESHOLD, -1)`` (freed
memory stays in the process for the next iteration). Measured on a pattern of 4 live and 6 temporary tensors of
1–60 MiB per iteration: 4.5× faster, 22× fewer faults, the same peak RSS (``allocator-cpu.md``); on SATS's training
step at 512 px (MiT-B2, batch 2) paired runs read 1.22 → 1.08, 1.17 → 1.07, 1.20 → 1.19 and 1.34 → 1.19× its bound
(``goals-cpu.md``: this shared machine's noise is of that order), with the step's peak RSS up 5–16 %. (PyTorch's own huge-page path,
``THP_MEM_ALLOC_ENABLE=1``, removes even more faults on the pattern but measured 1.12 / 1.15× with +750 MB of
RSS on the step, so it is not used.) ``SATS_HOST_ALLOCATOR=system`` keeps the C library's defaults; on another C
library (macOS, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "SATS_HOST_ALLOCATOR"
CHOICES = ("tuned", "system")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NO_TRIM = -1  # mallopt takes a C int; -1 disables trimming (mallopt(3))

_state: str | None = None


def tune_host_allocator() -> str:
    """Apply the setting of ``$SATS_HOST_ALLOCATOR`` (default ``tuned``) once per process; return what it did.

    Raises :class:`sats.config.ConfigError` for an unknown value of the variable (a typo must not silently
    fall back).
    """
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if choice not in CHOICES:
        from sats.config import ConfigError  # lazy: this module stays import-light

        raise ConfigError(f"${ENV}={os.environ[ENV]!r} is not one of {list(CHOICES)}")
    if choice == "system":
        _state = f"host allocator: the C library's defaults (${ENV}=system)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = f"host allocator: defaults (the tuning is for glibc; this is {platform.system()})"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        refused = [name for name, param, value in (("M_MMAP_MAX", M_MMAP_MAX, 0),
                                                   ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, NO_TRIM))
                   if libc.mallopt(param, value) != 1]
        _state = ("host allocator: glibc, large blocks reused (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)" if not refused
                  else f"host allocator: glibc refused mallopt({', '.join(refused)}); those keep their defaults")
    return _state

