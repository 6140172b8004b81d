"""Continual-learning methods: one file each, registered by name."""

from sats.methods.base import (Batch, Method, StepContext, build_method, get_method_class, iter_methods,
                               list_methods, register_method, validate_method_config)
from sats.methods import ft  # noqa: F401  (registers ft, joint)
from sats.methods import ilt, lwf, lwf_mc, mib, plop, sats  # noqa: F401  (register the distillation methods and SATS)
from sats.methods import ewc, pi, rw  # noqa: F401  (register the importance-regularised methods)
from sats.methods import ssul  # noqa: F401  (registers ssul)

__all__ = ["Batch", "Method", "StepContext", "build_method", "get_method_class", "iter_methods", "list_methods",
           "register_method", "validate_method_config"]
