"""Names that moved in 0.2, kept for one release: each use warns (DeprecationWarning) with the new
name; 0.3 removes them."""

from __future__ import annotations

import importlib
import warnings


def moved_attribute(module: str, name: str, moved: dict[str, str]):
    """`module`.`name` for a module's __getattr__: moved[name] is "package.module:new_name", returned
    with a DeprecationWarning at the caller; any other name is an AttributeError as Python words it."""
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, new_name = moved[name].split(":")
    warnings.warn(f"{module}.{name} is deprecated and will be removed in lora-kernels 0.3: use "
                  f"{new_module}.{new_name}", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new_module), new_name)
