"""Continual-learning methods: one file each, registered by name.

Every module of this package is imported here (:func:`discover_methods`), so a method file dropped
into ``sats/methods/`` registers itself (``@register_method``) without editing another file. Modules
whose name starts with ``_`` are shared frames of several methods (``_pseudo``, ``_importance``, …);
they are imported too, so a broken frame fails at import, not at the first run that needs it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, List

from sats.methods.addon import (AddOn, build_method, compose_method, get_addon_class, list_addons, register_addon,
                                validate_method_config)
from sats.methods.base import (Batch, CEParams, Method, StepContext, check_weight, get_method_class, iter_methods,
                               list_methods, register_method, require_old_logits)


def discover_methods(package: str = __name__, path: Iterable[str] = __path__) -> List[str]:
    """Import every module of ``package`` (found on ``path``, in name order); returns their dotted names.

    Importing a method module runs its ``@register_method`` decorators. Sub-packages are not entered.
    """
    names = [f"{package}.{info.name}" for info in pkgutil.iter_modules(list(path)) if not info.ispkg]
    for name in names:
        importlib.import_module(name)
    return names


MODULES = discover_methods()  # the modules of sats.methods, every method registered

__all__ = ["AddOn", "Batch", "CEParams", "MODULES", "Method", "StepContext", "build_method", "check_weight",
           "compose_method", "discover_methods", "get_addon_class", "get_method_class", "iter_methods", "list_addons",
           "list_methods", "register_addon", "register_method", "require_old_logits", "validate_method_config"]
